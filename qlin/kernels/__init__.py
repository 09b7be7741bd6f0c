"""Kernel implementations, one module per kernel family, registered in priority order.

* ``reference`` -- the math in jnp, the oracle (every platform, last resort).
* ``xla``       -- 8-bit ``dot_general`` + scale epilogue (every platform).
* Pallas Mosaic GPU kernels for Hopper register themselves ahead of ``xla`` on cuda.
"""

from qlin.kernels.reference import ReferenceKernel
from qlin.kernels.xla import XLAKernel
from qlin.select import register_kernel

register_kernel(XLAKernel)
register_kernel(ReferenceKernel)

# Registers itself ahead of xla on cuda (is_supported: compute capability 9.x).
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel  # noqa: E402
from qlin.kernels.mosaic_gpu_block import MosaicGPUBlockFP8Kernel  # noqa: E402

__all__ = ["MosaicGPUBlockFP8Kernel", "MosaicGPUScaledMMKernel", "ReferenceKernel", "XLAKernel"]
