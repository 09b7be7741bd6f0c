"""``mosaic_gpu_block``: block-scaled FP8 (DeepSeek-V3 style) on Hopper, a Pallas Mosaic GPU kernel.

Wraps :func:`qlin.kernels.mosaic_gpu_block_scaled_mm.block_scaled_mm` in the
``MMLinearKernel`` lifecycle:

* ``is_supported``: CUDA compute capability 9.x only (wgmma + TMA).
* ``can_implement``: fp8 e4m3fn, ``weight_granularity=(128, 128)`` and
  ``activation="dynamic_per_group"`` with ``group_size=128`` (one activation
  scale per token per weight K block).  Everything else is left to the other
  kernels (the per-channel ``mosaic_gpu`` kernel, ``xla``).
* ``process_weights_after_loading``: validates (``normalize_params``) and pads
  N and K once to the kernel's alignment; the block-scale grid does not change
  (128 is a multiple of both paddings); the logical N / K stay in
  ``out_features`` / ``in_features``.
* ``apply_weights``: the fused Mosaic GPU per-group quantize kernel, zero
  columns for a padded K, the block-scaled matmul, N sliced back.  With
  ``FP8ScaledMMConfig(fast_accum=True)`` the matmul may accumulate the K blocks
  in the tensor core (rescaled accumulation, M > 512; see
  :class:`~qlin.kernels.mosaic_gpu_block_scaled_mm.BlockTuningConfig`).

Interpret mode (CPU): ``MosaicGPUBlockFP8Kernel(config, interpret=True)`` or
``QLIN_MOSAIC_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qlin.config import FP8ScaledMMConfig
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm
from qlin.kernels.common import ScaledMMKernel
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel, _env_interpret, _pad_to, _round_up
from qlin.kernels.mosaic_gpu_quantize import fused_quantize_activation
from qlin.params import Params
from qlin.select import register_kernel
from qlin.validate import normalize_params


class MosaicGPUBlockFP8Kernel(ScaledMMKernel):
    name = "mosaic_gpu_block"
    supports_int8 = False

    def __init__(self, config, *, interpret: bool | None = None, tuning: bmm.BlockTuningConfig | None = None) -> None:
        super().__init__(config)
        self.interpret = _env_interpret() if interpret is None else bool(interpret)
        self.tuning = tuning

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        # Same hardware rule (and reasons) as the per-channel Mosaic GPU kernel.
        return MosaicGPUScaledMMKernel.is_supported(compute_capability)

    @classmethod
    def can_implement(cls, config: Any) -> tuple[bool, str | None]:
        ok, why = super().can_implement(config)
        if not ok:
            return ok, why
        assert isinstance(config, FP8ScaledMMConfig)
        if config.fp8_format != "e4m3fn":
            return False, f"fp8_format={config.fp8_format!r}: only e4m3fn is implemented"
        if config.weight_block != (bmm.BLOCK, bmm.BLOCK):
            return False, (
                f"weight_granularity={config.weight_granularity!r}: only ({bmm.BLOCK}, {bmm.BLOCK}) "
                "block-scaled weights are implemented"
            )
        if config.activation != "dynamic_per_group" or config.group_size != bmm.BLOCK:
            return False, (
                f"activation={config.activation!r} (group_size={config.group_size}): only "
                f"dynamic_per_group activations with group_size={bmm.BLOCK} are implemented"
            )
        return True, None

    # -- weights -------------------------------------------------------------------------------
    def process_weights_after_loading(self, params: Params | Any) -> Params:
        params = self._get_layer_params(params)
        n, k = params.n, params.k
        n_mult, k_mult = bmm.required_alignment(self.config.out_dtype)
        n_pad, k_pad = _round_up(n, n_mult), _round_up(k, k_mult)
        if params.out_features is not None and tuple(params.weight.shape) == (n_pad, k_pad):
            return params  # already processed for this kernel
        logical = params
        if tuple(params.weight.shape) != (n, k):
            logical = params.replace(weight=params.weight[:n, :k], out_features=None, in_features=None)
        p = normalize_params(logical, self.config)
        if (n_pad, k_pad) == (n, k):
            return p
        # The (ceil(N/128), ceil(K/128)) scale grid is the same for the padded weight.
        return p.replace(
            weight=jnp.pad(p.weight, ((0, n_pad - n), (0, k_pad - k))),
            out_features=n,
            in_features=k,
        )

    # -- forward -------------------------------------------------------------------------------
    def _matmul(self, params: Params, x2d: jax.Array, bias: jax.Array | None) -> jax.Array:
        cfg = self.config
        n, k = params.n, params.k
        n_pad, k_pad = params.weight.shape
        q, s, _ = fused_quantize_activation(x2d, params, cfg, interpret=self.interpret)
        if k_pad != k:
            q = _pad_to(q, 1, k_pad)  # zero columns meet the zero-padded weight columns
        if bias is not None:
            if jnp.dtype(bias.dtype) not in bmm.SUPPORTED_OUT_DTYPES:
                bias = bias.astype(jnp.float32)
            bias = _pad_to(bias, 0, n_pad)
        y = bmm.block_scaled_mm(
            q,
            params.weight,
            jnp.asarray(s, jnp.float32),
            jnp.asarray(params.weight_scale, jnp.float32),
            bias=bias,
            out_dtype=cfg.out_dtype,
            config=self.tuning,
            fast_accum=cfg.fast_accum,
            interpret=self.interpret,
        )
        return y[:, :n] if n_pad != n else y


# Hopper kernels go ahead of the portable xla kernel on cuda.
register_kernel(MosaicGPUBlockFP8Kernel, platforms=("cuda",), before="xla")

__all__ = ["MosaicGPUBlockFP8Kernel"]
