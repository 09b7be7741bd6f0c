"""Error tolerances, in one place: relative Frobenius error ``||y - ref|| / ||ref||``.

Two kinds of comparison:

* ``KERNEL_RTOL[out_dtype]`` -- a kernel against the float64 reference computed
  from the SAME 8-bit operands and scales. Only accumulation order and the final
  cast differ, so this is the output dtype's rounding (bf16 has 8 mantissa bits:
  2**-9 ~ 2e-3 per element) with headroom.
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
