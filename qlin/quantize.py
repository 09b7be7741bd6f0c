"""Quantization math, written once. Every kernel and test uses these functions.

Notation: ``x`` is an activation ``[..., K]``, ``W`` a weight ``(N, K)``, ``q``
the 8-bit value, ``s`` a float32 scale, ``zp`` an int32 zero point.

FP8 (e4m3fn, max 448; e5m2, max 57344)::

    s   = max(absmax(x over the group), eps) / FP8_MAX        (dynamic; or given: static)
    q   = fp8(clip(x / s, -FP8_MAX, FP8_MAX))                  (saturating: e4m3fn has no inf)
    x  ~= s * q

  ``scale_ub`` (dynamic per-token only) caps the per-token absmax before the
  division, as vLLM's ``input_scale_ub`` does, so one outlier token cannot
  blow up its scale.

INT8 symmetric::

    s = max(absmax, eps) / 127,   q = clip(round(x / s), -128, 127),   x ~= s * q

INT8 asymmetric (activations only; the range is widened to include 0, so 0
is exact and ``zp`` lies in [-128, 127])::

    xmin = min(min(x), 0),  xmax = max(max(x), 0)
    s  = max(xmax - xmin, eps) / 255
    zp = clip(round(-128 - xmin / s), -128, 127)             (int32)
    q  = clip(round(x / s) + zp, -128, 127),                  x ~= s * (q - zp)

Linear layer, per-token/tensor activation scale ``s_x`` and per-channel/tensor
weight scale ``s_w``::

    y[m, n] = s_x[m] * s_w[n] * (sum_k q_x[m, k] q_w[n, k]  -  zp[m] * azp_adj[n]) + bias[n]
    azp_adj[n] = sum_k q_w[n, k]          (int32; precomputed once per weight)

The integer part is exact in int32 while ``K * 128 * 128 < 2**31``, i.e.
``K < 131072`` (:data:`INT8_MAX_EXACT_K`); past that int32 accumulation can wrap.
With a zero point, ``|q_x - zp| <= 255`` so the bound is ``K * 255 * 127 < 2**31``
(:data:`INT8_ASYM_MAX_EXACT_K` = 66311).
Block scales (``(bn, bk)`` weights, ``1 x g`` activation groups) apply per K
block: ``y = sum_b s_x[m, b] s_w[n // bn, b] (q_x q_w^T)_b``.

Rounding is round-half-to-even (``jnp.round``), as in ``torch.round``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import FP8_FORMATS, FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.errors import InputError, ParamsError
from qlin.params import FP8Params, Int8Params

Granularity = Literal["per_tensor", "per_token", "per_group"]

#: Smallest absmax a dynamic scale is computed from (avoids 0/0 on all-zero rows).
SCALE_EPS = 1e-12
INT8_QMAX = 127
INT8_QMIN = -128
#: Largest K for which an int8 x int8 dot product is exact in int32 for every input.
INT8_MAX_EXACT_K = (2**31 - 1) // (128 * 128)
#: Same with an activation zero point (|q_x - zp| <= 255, |q_w| <= 127).
INT8_ASYM_MAX_EXACT_K = (2**31 - 1) // (255 * 127)


def fp8_dtype(fp8_format: str = "e4m3fn") -> np.dtype:
    try:
        return jnp.dtype(FP8_FORMATS[fp8_format])
    except KeyError:
        raise InputError(f"fp8_format: expected one of {tuple(FP8_FORMATS)}, got {fp8_format!r}") from None


def fp8_max(fp8_format: str = "e4m3fn") -> float:
    return float(jnp.finfo(fp8_dtype(fp8_format)).max)


def saturate_to_fp8(x: jax.Array, dtype=jnp.float8_e4m3fn) -> jax.Array:
    """Cast to fp8 clipping to +-max first (a bare cast turns 500 into NaN in e4m3fn)."""
    fmax = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32), -fmax, fmax).astype(dtype)


def _is_concrete(a) -> bool:
    return a is not None and not isinstance(a, jax.core.Tracer)


def _check_float_input(x, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 2:
        raise InputError(f"{name}: expected a float16/bfloat16/float32 array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise InputError(f"{name}: expected an array of shape [..., K], got a scalar")
    return x


def _check_static_scale(scale, name: str = "scale") -> jax.Array:
    scale = jnp.asarray(scale, jnp.float32)
    if scale.size != 1:
        raise InputError(f"{name}: a static activation scale must be a scalar (shape () or (1,)), got {scale.shape}")
    scale = scale.reshape(())
    if _is_concrete(scale):
        v = float(scale)
        if not np.isfinite(v) or v <= 0:
            raise InputError(f"{name}: must be finite and > 0, got {v}")
    return scale


def _check_static_zero_point(zero_point, name: str = "zero_point") -> jax.Array:
    zp = jnp.asarray(zero_point)
    if zp.size != 1 or not jnp.issubdtype(zp.dtype, jnp.integer):
        raise InputError(f"{name}: expected an integer scalar, got shape {zp.shape} dtype {zp.dtype}")
    return zp.reshape(()).astype(jnp.int32)


# -- reductions over the quantization groups of an activation ---------------------------

def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    """``[..., K]`` -> ``[..., G, group_size]`` (zero-padding a ragged last group)."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    pad = groups * group_size - k
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], groups, group_size)


def expand_groups(s: jax.Array, k: int, group_size: int) -> jax.Array:
    """Per-group values ``[..., G]`` -> per-column ``[..., K]``."""
    return jnp.repeat(s, group_size, axis=-1)[..., :k]


def _reduce(x: jax.Array, fn, granularity: Granularity, group_size: int | None) -> jax.Array:
    if granularity == "per_tensor":
        return fn(x, axis=None)
    if granularity == "per_token":
        return fn(x, axis=-1, keepdims=True)
    if granularity == "per_group":
        if group_size is None or group_size <= 0:
            raise InputError(f"group_size: per_group quantization needs a positive group_size, got {group_size!r}")
        return fn(_grouped(x, group_size), axis=-1)
    raise InputError(f"granularity: expected 'per_tensor', 'per_token' or 'per_group', got {granularity!r}")


def _broadcast_scale(s: jax.Array, x: jax.Array, granularity: Granularity, group_size: int | None) -> jax.Array:
    if granularity == "per_group":
        return expand_groups(s, x.shape[-1], group_size)
    return s


# -- activations -------------------------------------------------------------------------

def quantize_fp8(
    x,
    *,
    scale=None,
    granularity: Granularity = "per_token",
    group_size: int | None = None,
    scale_ub=None,
    fp8_format: str = "e4m3fn",
) -> tuple[jax.Array, jax.Array]:
    """Quantize an activation ``[..., K]`` to fp8; returns ``(q, scale)``.

    With ``scale`` (static) the given scalar is used; otherwise the scale is
    dynamic: shape ``()`` per-tensor, ``[..., 1]`` per-token, ``[..., G]`` per-group.
    """
    x = _check_float_input(x)
    dtype = fp8_dtype(fp8_format)
    fmax = fp8_max(fp8_format)
    xf = x.astype(jnp.float32)
    if scale is not None:
        s = _check_static_scale(scale)
        return saturate_to_fp8(xf / s, dtype), s
    amax = _reduce(jnp.abs(xf), jnp.max, granularity, group_size)
    if scale_ub is not None:
        if granularity != "per_token":
            raise InputError(f"scale_ub: only applies to dynamic per-token quantization, got granularity={granularity!r}")
        amax = jnp.minimum(amax, _check_static_scale(scale_ub, "scale_ub"))
    s = jnp.maximum(amax, SCALE_EPS) / fmax
    q = saturate_to_fp8(xf / _broadcast_scale(s, xf, granularity, group_size), dtype)
    return q, s


def quantize_int8(
    x,
    *,
    scale=None,
    zero_point=None,
    granularity: Granularity = "per_token",
    group_size: int | None = None,
    symmetric: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Quantize an activation ``[..., K]`` to int8; returns ``(q, scale, zero_point or None)``.

    Static: give ``scale`` (and ``zero_point`` when asymmetric). Dynamic: scale
    and zero point have the shapes described in :func:`quantize_fp8`.
    """
    x = _check_float_input(x)
    xf = x.astype(jnp.float32)
    if scale is not None:
        s = _check_static_scale(scale)
        if symmetric:
            if zero_point is not None:
                raise InputError("zero_point: given for symmetric int8 quantization; pass symmetric=False")
            return jnp.clip(jnp.round(xf / s), INT8_QMIN, INT8_QMAX).astype(jnp.int8), s, None
        if zero_point is None:
            raise InputError("zero_point: static asymmetric int8 quantization needs a zero point")
        zp = _check_static_zero_point(zero_point)
        q = jnp.clip(jnp.round(xf / s) + zp, INT8_QMIN, INT8_QMAX).astype(jnp.int8)
        return q, s, zp
    if zero_point is not None:
        raise InputError("zero_point: dynamic quantization computes its own zero point; pass scale too for static")
    if symmetric:
        amax = _reduce(jnp.abs(xf), jnp.max, granularity, group_size)
        s = jnp.maximum(amax, SCALE_EPS) / INT8_QMAX
        sb = _broadcast_scale(s, xf, granularity, group_size)
        return jnp.clip(jnp.round(xf / sb), INT8_QMIN, INT8_QMAX).astype(jnp.int8), s, None
    # The range always includes 0, so 0 is exact and zp stays in int8 range.
    xmax = jnp.maximum(_reduce(xf, jnp.max, granularity, group_size), 0.0)
    xmin = jnp.minimum(_reduce(xf, jnp.min, granularity, group_size), 0.0)
    s = jnp.maximum(xmax - xmin, SCALE_EPS) / (INT8_QMAX - INT8_QMIN)
    zp = jnp.clip(jnp.round(INT8_QMIN - xmin / s), INT8_QMIN, INT8_QMAX).astype(jnp.int32)
    sb = _broadcast_scale(s, xf, granularity, group_size)
    zb = _broadcast_scale(zp, xf, granularity, group_size)
    q = jnp.clip(jnp.round(xf / sb) + zb, INT8_QMIN, INT8_QMAX).astype(jnp.int8)
    return q, s, zp


_DYNAMIC_GRANULARITY: dict[str, Granularity] = {
    "dynamic_per_tensor": "per_tensor",
    "dynamic_per_token": "per_token",
    "dynamic_per_group": "per_group",
}


def activation_granularity(config: ScaledMMConfig) -> Granularity:
    """The granularity of the activation scale a config produces (static is per-tensor)."""
    return "per_tensor" if config.is_static else _DYNAMIC_GRANULARITY[config.activation]


def quantize_activation(x, params, config: ScaledMMConfig) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Quantize ``x`` as ``config`` says, with the static constants in ``params``.

    Returns ``(q, scale, zero_point or None)``: the one place kernels turn a
    float activation into 8-bit operands.
    """
    gran = activation_granularity(config)
    static = config.is_static
    if static and params.input_scale is None:
        raise ParamsError("input_scale: config.activation='static' needs params.input_scale, got None")
    scale = params.input_scale if static else None
    if isinstance(config, FP8ScaledMMConfig):
        ub = getattr(params, "input_scale_ub", None) if config.activation == "dynamic_per_token" else None
        q, s = quantize_fp8(
            x, scale=scale, granularity=gran, group_size=config.group_size, scale_ub=ub, fp8_format=config.fp8_format
        )
        return q, s, None
    if isinstance(config, Int8ScaledMMConfig):
        zp = params.input_zero_point if (static and not config.symmetric) else None
        if static and not config.symmetric and zp is None:
            raise ParamsError("input_zero_point: static asymmetric int8 needs params.input_zero_point, got None")
        return quantize_int8(
            x, scale=scale, zero_point=zp, granularity=gran, group_size=config.group_size, symmetric=config.symmetric
        )
    raise InputError(f"config: expected an FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}")


def dequantize_activation(q, scale, zero_point, config: ScaledMMConfig, dtype=jnp.float32) -> jax.Array:
    """``s * (q - zp)`` back to float (used by the reference and the grouped XLA path)."""
    per_group = activation_granularity(config) == "per_group"
    k = q.shape[-1]
    v = q
    if zero_point is not None:  # int8 asymmetric: subtract in int32, exact
        v = q.astype(jnp.int32) - (expand_groups(zero_point, k, config.group_size) if per_group else zero_point)
    s = scale.astype(dtype)
    if per_group:
        s = expand_groups(s, k, config.group_size)
    return v.astype(dtype) * s


# -- weights -------------------------------------------------------------------------------

def weight_scale_shape(config: ScaledMMConfig, n: int, k: int) -> tuple[int, ...]:
    """The canonical ``weight_scale`` shape for an ``(n, k)`` weight under ``config``."""
    g = config.weight_granularity
    if g == "per_tensor":
        return ()
    if g == "per_channel":
        return (n,)
    bn, bk = g
    return (-(-n // bn), -(-k // bk))


def expand_weight_scale(weight_scale: jax.Array, config: ScaledMMConfig, n: int, k: int) -> jax.Array:
    """Weight scale broadcastable against the ``(n, k)`` weight."""
    g = config.weight_granularity
    if g == "per_tensor":
        return weight_scale.reshape(1, 1)
    if g == "per_channel":
        return weight_scale.reshape(n, 1)
    bn, bk = g
    return jnp.repeat(jnp.repeat(weight_scale, bn, axis=0), bk, axis=1)[:n, :k]


def dequantize_weight(params, config: ScaledMMConfig, dtype=jnp.float32) -> jax.Array:
    n, k = params.weight.shape
    return params.weight.astype(dtype) * expand_weight_scale(params.weight_scale, config, n, k).astype(dtype)


def compute_azp_adj(weight_q: jax.Array) -> jax.Array:
    """Column sums of the int8 weight over K: ``azp_adj[n] = sum_k W_q[n, k]`` (int32)."""
    return jnp.sum(weight_q.astype(jnp.int32), axis=1)


def quantize_weight(
    w,
    config: ScaledMMConfig,
    input_scale=None,
    input_zero_point=None,
    *,
    input_scale_ub=None,
) -> FP8Params | Int8Params:
    """Quantize a float weight ``(N, K)`` (torch/vLLM layout) into ready params for ``config``.

    Static configs need ``input_scale`` (and ``input_zero_point`` for asymmetric
    int8); dynamic configs must not get them. ``input_scale_ub`` (fp8, dynamic
    per-token) caps per-token activation scales.
    """
    if not isinstance(config, (FP8ScaledMMConfig, Int8ScaledMMConfig)):
        raise InputError(f"config: expected an FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}")
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise InputError(f"w: expected a float weight of shape (N, K) (out_features, in_features), got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.dtype.itemsize < 2:
        raise InputError(f"w: expected a float16/bfloat16/float32 weight, got dtype {w.dtype}")
    if 0 in w.shape:
        raise InputError(f"w: expected a non-empty weight, got shape {w.shape}")
    if _is_concrete(w) and not bool(jnp.all(jnp.isfinite(w))):
        raise InputError("w: weight contains NaN or inf; cannot quantize")
    n, k = w.shape
    wf = w.astype(jnp.float32)
    qmax = config.qmax
    g = config.weight_granularity
    if g == "per_tensor":
        amax = jnp.max(jnp.abs(wf))
    elif g == "per_channel":
        amax = jnp.max(jnp.abs(wf), axis=1)
    else:
        bn, bk = g
        gn, gk = -(-n // bn), -(-k // bk)
        padded = jnp.pad(jnp.abs(wf), ((0, gn * bn - n), (0, gk * bk - k)))
        amax = padded.reshape(gn, bn, gk, bk).max(axis=(1, 3))
    scale = (jnp.maximum(amax, SCALE_EPS) / qmax).astype(jnp.float32)
    scaled = wf / expand_weight_scale(scale, config, n, k)
    if isinstance(config, FP8ScaledMMConfig):
        q = saturate_to_fp8(scaled, config.weight_dtype)
    else:
        q = jnp.clip(jnp.round(scaled), -INT8_QMAX, INT8_QMAX).astype(jnp.int8)

    if config.is_static:
        if input_scale is None:
            raise InputError("input_scale: config.activation='static' needs a calibrated input_scale")
        input_scale = _check_static_scale(input_scale, "input_scale")
    elif input_scale is not None:
        raise InputError(f"input_scale: given, but config.activation={config.activation!r} computes scales at run time")

    if isinstance(config, FP8ScaledMMConfig):
        if input_zero_point is not None:
            raise InputError("input_zero_point: fp8 quantization is symmetric and has no zero point")
        if input_scale_ub is not None:
            if config.activation != "dynamic_per_token":
                raise InputError("input_scale_ub: only used with activation='dynamic_per_token'")
            input_scale_ub = _check_static_scale(input_scale_ub, "input_scale_ub")
        return FP8Params(weight=q, weight_scale=scale, input_scale=input_scale, input_scale_ub=input_scale_ub)

    if input_scale_ub is not None:
        raise InputError("input_scale_ub: only fp8 configs cap activation scales")
    zp = None
    azp_adj = None
    if not config.symmetric:
        azp_adj = compute_azp_adj(q)
        if config.is_static:
            if input_zero_point is None:
                raise InputError("input_zero_point: static asymmetric int8 needs a calibrated zero point")
            zp = _check_static_zero_point(input_zero_point, "input_zero_point")
        elif input_zero_point is not None:
            raise InputError("input_zero_point: dynamic asymmetric quantization computes zero points per call")
    elif input_zero_point is not None:
        raise InputError("input_zero_point: given for a symmetric int8 config; use symmetric=False")
    return Int8Params(weight=q, weight_scale=scale, input_scale=input_scale, input_zero_point=zp, azp_adj=azp_adj)


def calibrate_static(x, config: ScaledMMConfig) -> tuple[jax.Array, jax.Array | None]:
    """Static per-tensor ``(input_scale, input_zero_point or None)`` from sample activations (absmax / min-max)."""
    x = _check_float_input(x)
    if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise InputError("x: calibration data contains NaN or inf")
    if isinstance(config, Int8ScaledMMConfig):
        _, s, zp = quantize_int8(x, granularity="per_tensor", symmetric=config.symmetric)
        return s, zp
    _, s = quantize_fp8(x, granularity="per_tensor", fp8_format=getattr(config, "fp8_format", "e4m3fn"))
    return s, None
