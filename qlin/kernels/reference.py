"""The reference kernel: the quantization math in plain jnp, dequantize-then-dot in float32/float64.

It is the oracle the other kernels are tested against and runs every config on
every platform; it is slow on purpose-built hardware (no 8-bit GEMM) and is
selected only when nothing faster can run. With ``jax_enable_x64`` on, it
computes in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlin.kernels.common import ScaledMMKernel
from qlin.params import Params
from qlin.quantize import dequantize_activation, dequantize_weight, quantize_activation


class ReferenceKernel(ScaledMMKernel):
    name = "reference"

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        return True, None

    def _matmul(self, params: Params, x2d: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
        q, s, zp = quantize_activation(x2d, params, cfg)
        xd = dequantize_activation(q, s, zp, cfg, dtype)
        wd = dequantize_weight(params, cfg, dtype)
        y = jnp.matmul(xd, wd.T, precision=jax.lax.Precision.HIGHEST)
        n = params.n
        y = y[:, :n]
        if bias is not None:
            y = y + bias.astype(dtype)
        return y.astype(cfg.out_dtype)
