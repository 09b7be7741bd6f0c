"""``mosaic_gpu``: qlin's Hopper (sm90) W8A8 kernel, a Pallas Mosaic GPU scaled matmul.

Wraps :func:`qlin.kernels.mosaic_gpu_scaled_mm.scaled_mm` in the
``MMLinearKernel`` lifecycle:

* ``is_supported``: CUDA compute capability 9.x only (wgmma + TMA).
* ``can_implement``: fp8 e4m3fn or int8 (symmetric or asymmetric); per-tensor
  or per-channel weight scales; static, dynamic per-tensor or dynamic
  per-token activations.  Block-scaled weights / per-group activations and
  e5m2 are left to other kernels.
* ``process_weights_after_loading``: validates (the core's
  ``normalize_params``), pads N and K once to the kernel's alignment
  (:func:`required_alignment`) and precomputes ``azp_adj`` for asymmetric int8;
  the logical N / K stay in ``out_features`` / ``in_features``.
* ``apply_weights``: quantizes ``x`` (the fused Mosaic GPU quantize kernel for dynamic
  per-token/group activations, else :func:`qlin.quantize.quantize_activation`),
  pads K if the weight was padded, runs the fused kernel, slices N and restores
  the leading dimensions.  int8 decode (M = 1, K <= :data:`INT8_GEMV_MAX_K`) runs
  XLA's int8 dot instead, which XLA lowers to a GEMV, except where the kernel streams the
  weight in one wave (swapped decode slabs or a K split between the two CTAs of a cluster;
  see :func:`uses_xla_gemv`).

Interpret mode (CPU): ``MosaicGPUScaledMMKernel(config, interpret=True)`` or
``QLIN_MOSAIC_INTERPRET=1``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from qlin.config import FP8ScaledMMConfig
from qlin.kernels import mosaic_gpu_scaled_mm as mm
from qlin.kernels.common import ScaledMMKernel
from qlin.kernels.mosaic_gpu_quantize import fused_quantize_activation
from qlin.kernels.xla import scaled_dot
from qlin.params import Int8Params, Params
from qlin.platform import compute_capability as _current_cc
from qlin.quantize import activation_granularity, quantize_activation
from qlin.select import register_kernel
from qlin.validate import normalize_params


#: int8 decode (M = 1) up to this K may run XLA's int8 ``dot_general``, which XLA lowers to a GEMV
#: reduction fusion (no tensor cores, no 64-row wgmma tile).  fp8 has no such GEMV in XLA
#: (cuBLASLt runs a GEMM): the Mosaic kernel is the faster one there at every shape.  Past this K
#: the kernel was faster (H100, 8192 x 28672: 79.0 vs 91.8 us).  Which of the two runs below it:
#: :func:`uses_xla_gemv`.
INT8_GEMV_MAX_K = 16384


def uses_xla_gemv(dtype, m: int, k: int, n: int, out_dtype=jnp.bfloat16) -> bool:
    """Whether ``apply_weights`` routes an (M, K) x (N, K) product to XLA's int8 GEMV.

    int8, M = 1, K <= :data:`INT8_GEMV_MAX_K`: the GEMV, unless the kernel's heuristic config streams
    the weight in one wave: swapped decode slabs (``swap_ab``) or a K split between the two CTAs of a
    cluster, whose work units (slabs x K ranges) fit the SMs.  H100, the kernel against XLA's GEMV,
    same run, mean of two repeats (benchmarks/results/h100_ab_int8_m1.json): one wave 4096^2 8.49 vs
    8.59 us (K-split cluster), 4096 x 14336 22.2 vs 23.5 (K-split cluster), 6144 x 4096 11.2 vs 11.7
    (96 slabs), 8192^2 24.5 vs 25.4 (128 slabs); more units than SMs or unswapped tiles: 28672 x 4096
    43.0 vs 41.0 (448 slabs), 57344 x 8192 154.6 vs 152.6, 10240 x 8192 32.4 vs 30.8 (80-wide tiles).
    K ranges summed by XLA (a float32 output's split-K) keep the GEMV: 4096 x 14336 23.7 vs 23.6
    (benchmarks/results/h100_ab_kcluster.json).
    """
    if not (jnp.dtype(dtype) == jnp.dtype(jnp.int8) and m == 1 and k <= INT8_GEMV_MAX_K):
        return False
    cfg = mm.default_config(m, n, k, dtype, out_dtype)
    streams = cfg.split_k == 1 and (cfg.swap_ab or cfg.cluster == "k")  # (not XLA-summed K ranges)
    return not (streams and mm.weight_units(cfg, n) <= mm.num_sms())


def _env_interpret() -> bool:
    return os.environ.get("QLIN_MOSAIC_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads, constant_values=value)


class MosaicGPUScaledMMKernel(ScaledMMKernel):
    name = "mosaic_gpu"

    def __init__(self, config, *, interpret: bool | None = None, tuning: mm.TuningConfig | None = None) -> None:
        super().__init__(config)
        self.interpret = _env_interpret() if interpret is None else bool(interpret)
        self.tuning = tuning

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        cc = compute_capability
        if cc is None:
            try:
                cc = _current_cc()
            except Exception:  # noqa: BLE001 - no device at all
                cc = None
        if cc is None:
            return False, (
                "not a CUDA GPU: the Mosaic GPU scaled matmul needs an NVIDIA Hopper "
                "GPU (compute capability 9.x); set QLIN_MOSAIC_INTERPRET=1 and build "
                "the kernel directly to run it in interpret mode on the CPU"
            )
        if cc // 10 != 9:
            return False, (
                f"compute capability {cc // 10}.{cc % 10}: the Mosaic GPU scaled matmul "
                "uses Hopper-only wgmma / TMA (needs 9.x)"
            )
        return True, None

    @classmethod
    def can_implement(cls, config: Any) -> tuple[bool, str | None]:
        ok, why = super().can_implement(config)
        if not ok:
            return ok, why
        if isinstance(config, FP8ScaledMMConfig) and config.fp8_format != "e4m3fn":
            return False, f"fp8_format={config.fp8_format!r}: only e4m3fn is implemented"
        if config.weight_block is not None:
            return False, "block-scaled weights are not implemented (per-tensor / per-channel only)"
        if activation_granularity(config) not in ("per_tensor", "per_token"):
            return False, (
                f"activation={config.activation!r}: only static, dynamic_per_tensor and "
                "dynamic_per_token activations are implemented"
            )
        return True, None

    # -- weights -------------------------------------------------------------------------------
    def process_weights_after_loading(self, params: Params | Any) -> Params:
        params = self._get_layer_params(params)
        n, k = params.n, params.k
        n_mult, k_mult = mm.required_alignment(params.weight.dtype, self.config.out_dtype)
        if params.out_features is not None and tuple(params.weight.shape) == (
            _round_up(n, n_mult),
            _round_up(k, k_mult),
        ):
            return params  # already processed for this kernel: no per-call slice + re-pad under jit
        # Normalize the logical (unpadded) params, then pad once.
        logical = params
        if tuple(params.weight.shape) != (n, k):
            logical = params.replace(weight=params.weight[:n, :k], out_features=None, in_features=None)
            if params.weight_scale is not None and jnp.ndim(params.weight_scale) == 1:
                logical = logical.replace(weight_scale=params.weight_scale[:n])
            if isinstance(params, Int8Params) and params.azp_adj is not None:
                logical = logical.replace(azp_adj=jnp.asarray(params.azp_adj).reshape(-1)[:n])
        p = normalize_params(logical, self.config)
        n_mult, k_mult = mm.required_alignment(p.weight.dtype, self.config.out_dtype)
        n_pad = -(-n // n_mult) * n_mult
        k_pad = -(-k // k_mult) * k_mult
        changes: dict[str, Any] = {}
        if (n_pad, k_pad) != (n, k):
            changes["weight"] = jnp.pad(p.weight, ((0, n_pad - n), (0, k_pad - k)))
            if p.weight_scale.ndim == 1:
                changes["weight_scale"] = _pad_to(p.weight_scale, 0, n_pad, 1.0)
            if isinstance(p, Int8Params) and p.azp_adj is not None:
                changes["azp_adj"] = _pad_to(p.azp_adj, 0, n_pad)  # padded rows of W are zero
            changes["out_features"] = n
            changes["in_features"] = k
        return p.replace(**changes) if changes else p

    # -- forward -------------------------------------------------------------------------------
    def _matmul(self, params: Params, x2d: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        m = x2d.shape[0]
        n, k = params.n, params.k
        n_pad, k_pad = params.weight.shape
        if uses_xla_gemv(params.weight.dtype, m, k_pad, n_pad, cfg.out_dtype):
            # int8 decode: the xla kernel's own sequence (jnp quantize + dot) on the padded weight. XLA
            # fuses the quantize into its GEMV; fed by the fused quantize kernel instead, the same GEMV
            # ran 0.4-37 us slower on the H100.
            q, s, zp = quantize_activation(x2d, params, cfg)
            if k_pad != k:
                q = _pad_to(q, 1, k_pad)
            y = scaled_dot(q, s, zp, params, None if bias is None else _pad_to(bias, 0, n_pad), cfg.out_dtype)
            return y[:, :n] if n_pad != n else y
        # Dynamic per-token activations: the fused Mosaic GPU quantize kernel (one pass over x;
        # bit-identical to quantize_activation, checked on an H100); other schemes use the jnp path.
        # The GEMM wants whole 8-row tiles: the fused kernel allocates them itself (rows past m never
        # written, never read back: the output rows they produce are sliced off below), so no
        # separate pad of q and its scales runs.  Above M = 8 TMA requires them (mm.tma_rows); at
        # decode the GEMM would take M < 8 rows as they are, but the 8-row tile measured faster on
        # the H100 through this path (M = 1, 4096^2 fp8: 10.1 vs 11.2 us; +-0.2 us at 8192^2 and
        # 28672 x 4096).
        q, s, zp = fused_quantize_activation(x2d, params, cfg, interpret=self.interpret, rows_out=_round_up(m, mm.TMA_ROW_TILE))
        mq = q.shape[0]  # rounded up when the fused kernel ran, else m (scaled_mm pads then)
        if k_pad != k:
            q = _pad_to(q, 1, k_pad)  # zero columns meet the zero-padded weight columns
        a_scale = jnp.asarray(s, jnp.float32)
        a_scale = a_scale.reshape(1, 1) if a_scale.size == 1 else a_scale.reshape(mq, 1)
        ws = jnp.asarray(params.weight_scale, jnp.float32)
        b_scale = ws.reshape(1, 1) if ws.ndim == 0 or ws.size == 1 else ws.reshape(1, n_pad)
        if bias is not None:
            if jnp.dtype(bias.dtype) not in mm.SUPPORTED_OUT_DTYPES:
                bias = bias.astype(jnp.float32)
            bias = _pad_to(bias, 0, n_pad)
        azp = azp_adj = None
        if zp is not None:
            assert isinstance(params, Int8Params) and params.azp_adj is not None
            azp = jnp.asarray(zp, jnp.int32)
            azp = azp.reshape(1, 1) if azp.size == 1 else azp.reshape(mq, 1)
            azp_adj = jnp.asarray(params.azp_adj, jnp.int32).reshape(1, n_pad)
        y = mm.scaled_mm(
            q,
            params.weight,
            a_scale,
            b_scale,
            bias=bias,
            azp=azp,
            azp_adj=azp_adj,
            out_dtype=cfg.out_dtype,
            config=self.tuning,
            interpret=self.interpret,
        )
        return y[:m, :n] if (n_pad != n or mq != m) else y


# Hopper kernels go ahead of the portable xla kernel on cuda.
register_kernel(MosaicGPUScaledMMKernel, platforms=("cuda",), before="xla")

__all__ = ["INT8_GEMV_MAX_K", "MosaicGPUScaledMMKernel", "uses_xla_gemv"]
