"""Flax layers for qlin: ``nnx.QLinear``, ``linen.QDense``, post-training conversion, sharding, checkpoints.

See docs/flax.md for the tour. Submodules import flax lazily only where needed::

    from qlin.flax import QLinear, QDense, QuantRule, quantize_nnx, quantize_linen

Layers hold their params processed once for the kernel that runs them (see docs/flax.md).
"""

from qlin.flax.nnx import QLinear, QuantVar, process_nnx
from qlin.flax.linen import QDense, QuantizedLinen
from qlin.flax.convert import QuantRule, RuleWarning, calibrate_scale, quantize_kernel, quantize_linen, quantize_nnx

__all__ = [
    "QLinear", "QuantVar", "process_nnx", "QDense", "QuantizedLinen",
    "QuantRule", "RuleWarning", "calibrate_scale", "quantize_kernel", "quantize_linen", "quantize_nnx",
]
