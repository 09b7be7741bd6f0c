"""Flax layers for qlin: ``nnx.QLinear``, ``linen.QDense``, post-training conversion, sharding, checkpoints.

See docs/flax.md for the tour. Submodules import flax lazily only where needed::

    from qlin.flax import QLinear, QDense, QuantRule, quantize_nnx, quantize_linen
"""

from qlin.flax.nnx import QLinear, QuantVar
from qlin.flax.linen import QDense, QuantizedLinen
from qlin.flax.convert import QuantRule, RuleWarning, calibrate_scale, quantize_kernel, quantize_linen, quantize_nnx

__all__ = [
    "QLinear", "QuantVar", "QDense", "QuantizedLinen",
    "QuantRule", "RuleWarning", "calibrate_scale", "quantize_kernel", "quantize_linen", "quantize_nnx",
]
