"""Checks of params, activations and bias against a config, with errors that name the argument.

Shape and dtype checks always run (they are static under ``jax.jit``). Value
checks (finite, positive scales) run when the arrays are concrete, i.e. outside
``jit``: when weights are quantized, loaded or processed -- once per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.errors import InputError, ParamsError
from qlin.params import FP8Params, Int8Params, Params
from qlin.quantize import INT8_ASYM_MAX_EXACT_K, INT8_MAX_EXACT_K, weight_scale_shape


def is_concrete(a) -> bool:
    return a is not None and not isinstance(a, jax.core.Tracer)


def _check_positive_finite(a, name: str) -> None:
    if not is_concrete(a):
        return
    v = np.asarray(jax.device_get(a), dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ParamsError(f"{name}: scales must be finite, found NaN or inf")
    if not np.all(v > 0):
        raise ParamsError(f"{name}: scales must be > 0, found min {v.min()}")


def _scalar(a, name: str, *, integer: bool = False) -> None:
    a_shape = tuple(np.shape(a))
    if int(np.prod(a_shape)) != 1 or len(a_shape) > 1:
        raise ParamsError(f"{name}: expected a scalar (shape () or (1,)), got shape {a_shape}")
    dt = jnp.result_type(a)
    if integer and not jnp.issubdtype(dt, jnp.integer):
        raise ParamsError(f"{name}: expected an integer dtype, got {dt}")
    if not integer and not jnp.issubdtype(dt, jnp.floating):
        raise ParamsError(f"{name}: expected a float dtype, got {dt}")


def expected_params_class(config: ScaledMMConfig) -> type[Params]:
    return FP8Params if isinstance(config, FP8ScaledMMConfig) else Int8Params


def check_params(params: Params, config: ScaledMMConfig, *, canonical: bool = False) -> None:
    """Validate ``params`` for ``config``.

    ``canonical=True`` also demands the canonical scale shapes produced by
    :func:`normalize_params` (``()`` / ``(N,)`` / block grid) -- what kernels see.
    """
    want = expected_params_class(config)
    if not isinstance(params, want):
        raise ParamsError(
            f"params: a {type(config).__name__} needs {want.__name__}, got {type(params).__name__}"
        )
    w = params.weight
    if w is None or np.ndim(w) != 2:
        raise ParamsError(f"weight: expected shape (N, K), got {None if w is None else np.shape(w)}")
    if jnp.result_type(w) != config.weight_dtype:
        raise ParamsError(f"weight: expected dtype {config.weight_dtype.name} for {config.describe()}, got {jnp.result_type(w)}")
    n, k = np.shape(w)
    if isinstance(config, Int8ScaledMMConfig):
        limit = INT8_MAX_EXACT_K if config.symmetric else INT8_ASYM_MAX_EXACT_K
        if k > limit:
            raise ParamsError(
                f"weight: K={k} exceeds {limit}, past which int8 x int8 sums can overflow the int32 accumulator"
            )
    s = params.weight_scale
    if s is None:
        raise ParamsError("weight_scale: required, got None")
    if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
        raise ParamsError(f"weight_scale: expected a float dtype, got {jnp.result_type(s)}")
    want_shape = weight_scale_shape(config, n, k)
    got = tuple(np.shape(s))
    g = config.weight_granularity
    if canonical:
        ok = got == want_shape
    elif g == "per_tensor":
        ok = int(np.prod(got)) == 1 and len(got) <= 2
    elif g == "per_channel":
        ok = got in ((n,), (n, 1), (1, n))
    else:
        ok = got == want_shape
    if not ok:
        raise ParamsError(
            f"weight_scale: expected shape {want_shape} for weight_granularity={g!r} and weight {(n, k)}, got {got}"
        )
    _check_positive_finite(s, "weight_scale")

    if config.is_static:
        if params.input_scale is None:
            raise ParamsError("input_scale: config.activation='static' needs a calibrated input_scale, got None")
        _scalar(params.input_scale, "input_scale")
        _check_positive_finite(params.input_scale, "input_scale")
    if isinstance(params, FP8Params) and params.input_scale_ub is not None:
        _scalar(params.input_scale_ub, "input_scale_ub")
        _check_positive_finite(params.input_scale_ub, "input_scale_ub")
    if isinstance(params, Int8Params):
        if config.symmetric and params.input_zero_point is not None:
            raise ParamsError("input_zero_point: given, but the config is symmetric (symmetric=True)")
        if not config.symmetric and config.is_static:
            if params.input_zero_point is None:
                raise ParamsError("input_zero_point: static asymmetric int8 needs a zero point, got None")
            _scalar(params.input_zero_point, "input_zero_point", integer=True)
        if params.azp_adj is not None:
            if tuple(np.shape(params.azp_adj)) not in ((n,), (1, n)):
                raise ParamsError(f"azp_adj: expected shape ({n},), got {tuple(np.shape(params.azp_adj))}")
            if not jnp.issubdtype(jnp.result_type(params.azp_adj), jnp.integer):
                raise ParamsError(f"azp_adj: expected int32, got {jnp.result_type(params.azp_adj)}")


def normalize_params(params: Params, config: ScaledMMConfig) -> Params:
    """Validated params with canonical shapes/dtypes: f32 scales (``()``/``(N,)``/block), int32 zp,
    and ``azp_adj`` computed for asymmetric int8 if missing. Functional: returns new params."""
    from qlin.quantize import compute_azp_adj

    check_params(params, config)
    n, k = params.weight.shape
    shape = weight_scale_shape(config, n, k)
    changes = {"weight_scale": jnp.asarray(params.weight_scale, jnp.float32).reshape(shape)}
    if params.input_scale is not None:
        changes["input_scale"] = jnp.asarray(params.input_scale, jnp.float32).reshape(())
    if isinstance(params, FP8Params) and params.input_scale_ub is not None:
        changes["input_scale_ub"] = jnp.asarray(params.input_scale_ub, jnp.float32).reshape(())
    if isinstance(params, Int8Params):
        if params.input_zero_point is not None:
            changes["input_zero_point"] = jnp.asarray(params.input_zero_point, jnp.int32).reshape(())
        if not config.symmetric:
            adj = params.azp_adj if params.azp_adj is not None else compute_azp_adj(params.weight)
            changes["azp_adj"] = jnp.asarray(adj, jnp.int32).reshape(n)
    return params.replace(**changes)


def check_input(x, params: Params) -> jax.Array:
    """``x`` must be a float array ``[..., K]`` matching the weight's K."""
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim < 1:
        raise InputError("x: expected an array of shape [..., K], got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 2:
        raise InputError(f"x: expected a float16/bfloat16/float32 activation, got dtype {x.dtype}")
    if x.shape[-1] != params.k:
        raise InputError(f"x: last dimension must equal the weight's K={params.k}, got shape {tuple(x.shape)}")
    return x


def check_bias(bias, n: int):
    if bias is None:
        return None
    bias = jnp.asarray(bias) if not isinstance(bias, jax.Array) else bias
    if tuple(bias.shape) != (n,):
        raise InputError(f"bias: expected shape ({n},) (out_features), got {tuple(bias.shape)}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise InputError(f"bias: expected a float dtype, got {bias.dtype}")
    return bias
