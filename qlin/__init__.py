"""qlin: FP8/INT8 quantized linear layers for JAX.

Params and configs are pytrees/frozen dataclasses; kernels follow vLLM's
``MMLinearKernel`` lifecycle; :func:`choose_kernel` picks the best kernel for the
machine. See README.md for the tour.
"""

from qlin.api import QuantizedLinear, kernel_for, linear
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, MMLinearLayerConfig, ScaledMMConfig
from qlin.errors import ConfigError, InputError, NoKernelError, ParamsError, QlinError
from qlin.kernel import MMLinearKernel
from qlin.params import FP8Params, Int8Params, Params, static_field
from qlin.quantize import calibrate_static, quantize_fp8, quantize_int8, quantize_weight
from qlin.select import choose_kernel, explain, register_kernel, registered_kernels, unregister_kernel
from qlin import kernels as _kernels  # noqa: F401  (registers the built-in kernels)

__version__ = "0.1.0"

__all__ = [
    "Params", "FP8Params", "Int8Params", "static_field",
    "MMLinearLayerConfig", "ScaledMMConfig", "FP8ScaledMMConfig", "Int8ScaledMMConfig",
    "MMLinearKernel", "choose_kernel", "explain", "register_kernel", "registered_kernels", "unregister_kernel",
    "NoKernelError", "QlinError", "ConfigError", "ParamsError", "InputError",
    "quantize_fp8", "quantize_int8", "quantize_weight", "calibrate_static",
    "linear", "QuantizedLinear", "kernel_for",
]
