"""Layer configs: what a quantized linear layer computes, independent of any kernel.

Configs are frozen, hashable dataclasses (usable as ``jax.jit`` static arguments
and as cache keys) and validate themselves on construction.

Vocabulary (shared by quantization, kernels and docs):

* ``weight_granularity``: ``"per_tensor"`` (one scale), ``"per_channel"`` (one per
  output feature, shape ``(N,)``) or a block ``(bn, bk)`` (shape
  ``(ceil(N/bn), ceil(K/bk))``; DeepSeek-style block FP8 uses ``(128, 128)``).
* ``activation``: ``"static"`` (a calibrated per-tensor ``input_scale`` in the
  params), ``"dynamic_per_tensor"``, ``"dynamic_per_token"`` (one scale per row of
  x) or ``"dynamic_per_group"`` (one scale per row and per ``group_size`` columns).
* int8 ``symmetric=False`` adds an activation zero point (static: in the params;
  dynamic: computed per token/tensor) and the ``azp_adj`` correction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax.numpy as jnp
import numpy as np

from qlin.errors import ConfigError

WeightGranularity = Literal["per_tensor", "per_channel"] | tuple[int, int]
ActivationScheme = Literal["static", "dynamic_per_tensor", "dynamic_per_token", "dynamic_per_group"]

ACTIVATION_SCHEMES: tuple[str, ...] = ("static", "dynamic_per_tensor", "dynamic_per_token", "dynamic_per_group")
OUT_DTYPES: tuple[np.dtype, ...] = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
FP8_FORMATS: dict[str, Any] = {"e4m3fn": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
DEFAULT_GROUP_SIZE = 128


class MMLinearLayerConfig:
    """Base of every layer config (plain class, so subclasses may be frozen dataclasses or not).

    Built-in configs are :class:`FP8ScaledMMConfig` and :class:`Int8ScaledMMConfig`;
    a custom kernel may define its own subclass (see the README).
    """


def _normalize_granularity(value: Any) -> str | tuple[int, int]:
    if isinstance(value, str):
        if value not in ("per_tensor", "per_channel"):
            raise ConfigError(
                f"weight_granularity: expected 'per_tensor', 'per_channel' or a block (bn, bk), got {value!r}"
            )
        return value
    try:
        bn, bk = value
        bn, bk = int(bn), int(bk)
    except (TypeError, ValueError):
        raise ConfigError(
            f"weight_granularity: expected 'per_tensor', 'per_channel' or a block (bn, bk), got {value!r}"
        ) from None
    if bn <= 0 or bk <= 0:
        raise ConfigError(f"weight_granularity: block sizes must be positive, got ({bn}, {bk})")
    return (bn, bk)


def _normalize_out_dtype(value: Any) -> np.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ConfigError(f"out_dtype: expected one of bfloat16, float16, float32, got {value!r}") from None
    if dtype not in OUT_DTYPES:
        raise ConfigError(f"out_dtype: expected one of bfloat16, float16, float32, got {dtype.name}")
    return dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledMMConfig(MMLinearLayerConfig):
    """Common part of the W8A8 configs: scale granularities and output dtype."""

    weight_granularity: WeightGranularity = "per_channel"
    activation: ActivationScheme = "dynamic_per_token"
    group_size: int | None = None
    out_dtype: Any = jnp.bfloat16

    quant_kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalization
        set_("weight_granularity", _normalize_granularity(self.weight_granularity))
        set_("out_dtype", _normalize_out_dtype(self.out_dtype))
        if self.activation not in ACTIVATION_SCHEMES:
            raise ConfigError(f"activation: expected one of {ACTIVATION_SCHEMES}, got {self.activation!r}")
        if self.activation == "dynamic_per_group":
            group = self.group_size
            if group is None:
                group = self.weight_block[1] if self.weight_block else DEFAULT_GROUP_SIZE
            if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group <= 0:
                raise ConfigError(f"group_size: expected a positive int, got {group!r}")
            set_("group_size", int(group))
            block = self.weight_block
            if block is not None and block[1] % self.group_size != 0:
                raise ConfigError(
                    f"group_size: activation groups ({self.group_size}) must divide the weight block's "
                    f"K size ({block[1]}) so each K block has one activation scale"
                )
        elif self.group_size is not None:
            raise ConfigError(
                f"group_size: only meaningful with activation='dynamic_per_group', got activation={self.activation!r}"
            )

    # -- derived properties --------------------------------------------------------
    @property
    def weight_block(self) -> tuple[int, int] | None:
        """``(bn, bk)`` for block-wise weight scales, else None."""
        g = self.weight_granularity
        return g if isinstance(g, tuple) else None

    @property
    def is_static(self) -> bool:
        return self.activation == "static"

    @property
    def weight_dtype(self) -> np.dtype:
        raise NotImplementedError

    @property
    def qmax(self) -> float:
        """Largest representable magnitude of the 8-bit type (448 for e4m3fn, 127 for int8)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``fp8-e4m3fn w:per_channel a:dynamic_per_token -> bfloat16``."""
        g = self.weight_granularity
        g = f"block{g[0]}x{g[1]}" if isinstance(g, tuple) else g
        a = self.activation + (f"[{self.group_size}]" if self.activation == "dynamic_per_group" else "")
        return f"{self._kind_label()} w:{g} a:{a} -> {self.out_dtype.name}"

    def _kind_label(self) -> str:
        return self.quant_kind


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8ScaledMMConfig(ScaledMMConfig):
    """FP8 W8A8: both operands in ``fp8_format`` ("e4m3fn", the inference default, or "e5m2")."""

    fp8_format: Literal["e4m3fn", "e5m2"] = "e4m3fn"
    #: Block-scaled weights only: let the kernel add each 128-wide K block's product inside the fp8
    #: tensor-core accumulator (rescaled to that block's scales) instead of promoting every block into
    #: a float32 total on the CUDA cores.  Faster at M > 512 (H100, the 32 Llama-3 grid cases at
    #: M >= 1024: geomean 0.87 of the per-channel kernel vs 0.83 promoted; where its wide tiles would
    #: leave a part-empty last wave, e.g. 1024 x 6144 x 4096, the kernel keeps the promoted tile), with
    #: the per-channel kernel's accumulation error (~1e-3 relative at K = 4096, ~3e-3 at K = 14336, vs
    #: ~1e-4 promoted; fp8 quantization itself is ~3e-2). Like torch's ``_scaled_mm(use_fast_accum=True)``.
    #: Kernels that accumulate in float32 anyway ignore it.
    fast_accum: bool = False

    quant_kind: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.fp8_format not in FP8_FORMATS:
            raise ConfigError(f"fp8_format: expected one of {tuple(FP8_FORMATS)}, got {self.fp8_format!r}")
        if not isinstance(self.fast_accum, (bool, np.bool_)):
            raise ConfigError(f"fast_accum: expected a bool, got {self.fast_accum!r}")
        object.__setattr__(self, "fast_accum", bool(self.fast_accum))
        super().__post_init__()
        if self.fast_accum and self.weight_block is None:
            raise ConfigError(
                "fast_accum: only meaningful with block-wise weight scales (weight_granularity=(128, 128)); "
                f"got weight_granularity={self.weight_granularity!r} (per-tensor / per-channel fp8 kernels "
                "accumulate in the tensor core already)"
            )

    def describe(self) -> str:
        return super().describe() + (" fast_accum" if self.fast_accum else "")

    @property
    def weight_dtype(self) -> np.dtype:
        return jnp.dtype(FP8_FORMATS[self.fp8_format])

    @property
    def qmax(self) -> float:
        return float(jnp.finfo(self.weight_dtype).max)

    def _kind_label(self) -> str:
        return f"fp8-{self.fp8_format}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8ScaledMMConfig(ScaledMMConfig):
    """INT8 W8A8 with int32 accumulation; ``symmetric=False`` adds activation zero points."""

    symmetric: bool = True

    quant_kind: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric: expected a bool, got {self.symmetric!r}")
        super().__post_init__()

    @property
    def weight_dtype(self) -> np.dtype:
        return jnp.dtype(jnp.int8)

    @property
    def qmax(self) -> float:
        return 127.0

    def _kind_label(self) -> str:
        return "int8" + ("" if self.symmetric else "-asym")
