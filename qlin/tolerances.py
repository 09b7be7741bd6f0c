"""Error tolerances, in one place: relative Frobenius error ``||y - ref|| / ||ref||``.

Two kinds of comparison:

* ``KERNEL_RTOL[out_dtype]`` -- a kernel against the float64 reference computed
  from the SAME 8-bit operands and scales. Only accumulation order and the final
  cast differ, so this is the output dtype's rounding (bf16 has 8 mantissa bits:
  2**-9 ~ 2e-3 per element) with headroom.
* ``fp8_accum_rtol(k)`` -- added to ``KERNEL_RTOL`` for fp8 kernels that accumulate
  in Hopper's fp8 ``wgmma`` without promoting partial sums to CUDA-core float32
  (qlin's per-channel Mosaic GPU kernel; cuBLAS without fast accumulation and
  qlin's block-scaled kernel promote).  The tensor core keeps fewer accumulator
  bits than float32 (DeepSeek-V3 reports about 14), so the error grows with K.
  Measured on an H100 (float32 output): 5.7e-4 at K = 1152; with bf16 output
  3.3e-3 at K = 14336 where bf16 rounding alone is ~2e-3.  int8 accumulates
  exactly in int32 and needs no such term.
* ``QUANT_RTOL[scheme]`` -- the quantized layer against the float (unquantized)
  layer on Gaussian data: the quantization error itself. e4m3 has 3 mantissa
  bits (~2**-4 relative per element, averaging down in a dot), e5m2 has 2, int8
  127 levels per scale group.
"""

from __future__ import annotations

import numpy as np

KERNEL_RTOL: dict[str, float] = {
    "bfloat16": 1e-2,
    "float16": 2e-3,
    "float32": 1e-5,
}

QUANT_RTOL: dict[str, float] = {
    "fp8-e4m3fn": 8e-2,
    "fp8-e5m2": 1.6e-1,
    "int8": 3e-2,
    "int8-asym": 3e-2,
}


def kernel_rtol(out_dtype) -> float:
    return KERNEL_RTOL[np.dtype(out_dtype).name]


def fp8_accum_rtol(k: int) -> float:
    """Extra relative error of fp8 wgmma accumulation over a K-long dot (no f32 promotion)."""
    return 1e-3 * max(1.0, float(np.sqrt(k / 1024)))


def fp8_wgmma_kernel_rtol(out_dtype, k: int) -> float:
    """Tolerance of an fp8 wgmma kernel without promotion vs the float64 reference of its operands."""
    return kernel_rtol(out_dtype) + fp8_accum_rtol(k)


def quant_rtol(config) -> float:
    label = config.describe().split(" ")[0]
    return QUANT_RTOL[label]


def rel_err(y, ref) -> float:
    """Relative Frobenius error in float64 (inf if ``y`` has NaN/inf)."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(y - ref) / (denom if denom > 0 else 1.0))
