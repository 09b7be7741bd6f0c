"""The XLA kernel: the portable fast path on every platform.

Per-tensor / per-token activations x per-tensor / per-channel weights run as ONE
8-bit ``lax.dot_general`` (fp8 x fp8 -> f32, int8 x int8 -> int32) followed by
the scale epilogue; on an sm89+/sm90 GPU XLA lowers it to a cuBLASLt fp8 GEMM,
and int8 to an IMMA GEMM. (Dequantize-then-dot would run as a bf16 GEMM and
move twice the weight bytes: never do that on the per-channel path.)

Block-scaled weights and per-group activations have a scale per K block, which
one GEMM cannot apply; XLA has no fused path for them, so this kernel
dequantizes to bf16 on accelerators (f32 on the CPU) and runs one dot. The
Pallas kernels own the fast block path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qlin.kernels.common import ScaledMMKernel
from qlin.params import Int8Params, Params
from qlin.quantize import activation_granularity, dequantize_activation, dequantize_weight, quantize_activation

_DOT_NT = (((1,), (1,)), ((), ()))  # contract K of x (M, K) with K of W (N, K)


def scaled_dot_epilogue(acc, x_scale, w_scale, bias, out_dtype):
    """``acc * s_x * s_w + bias`` in f32, cast once to ``out_dtype``."""
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)
    y = y * w_scale.astype(jnp.float32).reshape(1, -1) if w_scale.ndim else y * w_scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def scaled_dot(q, s, zp, params: Params, bias, out_dtype) -> jax.Array:
    """One 8-bit ``dot_general`` (f32 / int32 accumulation), the zero-point term, the scale epilogue.

    ``q`` (M, K) against ``params.weight`` (N, K); returns (M, N) for the weight's (maybe padded) N.
    """
    int8 = jnp.issubdtype(q.dtype, jnp.integer)
    acc = jax.lax.dot_general(q, params.weight, _DOT_NT, preferred_element_type=jnp.int32 if int8 else jnp.float32)
    if zp is not None:
        assert isinstance(params, Int8Params) and params.azp_adj is not None
        acc = acc - zp * params.azp_adj.reshape(1, -1)
    return scaled_dot_epilogue(acc, s, params.weight_scale, bias, out_dtype)


class XLAKernel(ScaledMMKernel):
    name = "xla"

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        return True, None

    def _matmul(self, params: Params, x2d: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        q, s, zp = quantize_activation(x2d, params, cfg)
        if cfg.weight_block is not None or activation_granularity(cfg) == "per_group":
            return self._dequantized_dot(params, q, s, zp, bias)
        return scaled_dot(q, s, zp, params, bias, cfg.out_dtype)[:, : params.n]

    def _dequantized_dot(self, params: Params, q, s, zp, bias) -> jax.Array:
        cfg = self.config
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        xd = dequantize_activation(q, s, zp, cfg, jnp.float32).astype(dtype)
        wd = dequantize_weight(params, cfg, jnp.float32).astype(dtype)
        acc = jax.lax.dot_general(xd, wd, _DOT_NT, preferred_element_type=jnp.float32)
        y = acc if bias is None else acc + bias.astype(jnp.float32)
        return y.astype(cfg.out_dtype)[:, : params.n]
