"""Plumbing shared by the nnx and linen layers: variable layout, params assembly, kernel call.

A quantized layer stores one variable per qlin ``Params`` array field, named by
the field's *attribute name* (``weight``, ``weight_scale``, ``input_scale``,
``input_scale_ub``, ``input_zero_point``, ``azp_adj``) plus an optional float
``bias``. So ``Params.from_mapping`` rebuilds the typed params from the variables,
and a saved checkpoint has the same keys as a vLLM/torch state dict.

Layers hold their params *processed* for the kernel that runs them: the kernel's
``process_weights_after_loading`` runs once, when the layer is built, converted or
loaded (e.g. ``mosaic_gpu`` pads N and K to its alignment: weight ``(N_pad, K_pad)``),
never per call. The logical N and K come from the layer (``in_features`` /
``out_features``, linen: ``features`` and x). Checkpoints store the logical, unpadded
arrays (:func:`logical_arrays`), so they load on any machine whatever its kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlin.api import in_kernel_layout, kernel_for, logical_params, params_for_kernel
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, MMLinearLayerConfig, ScaledMMConfig
from qlin.errors import ConfigError, InputError, ParamsError
from qlin.params import Params
from qlin.quantize import weight_scale_shape
from qlin.validate import expected_params_class

BIAS = "bias"


def effective_config(config: Any, dtype: Any = None) -> MMLinearLayerConfig:
    """``config`` with ``out_dtype`` replaced by ``dtype`` when given (the layer's output dtype)."""
    if not isinstance(config, MMLinearLayerConfig):
        raise ConfigError(f"config: expected a qlin layer config (e.g. FP8ScaledMMConfig()), got {config!r}")
    if dtype is None:
        return config
    if not isinstance(config, ScaledMMConfig):
        raise ConfigError(f"dtype: only ScaledMMConfig layers take a dtype override, got {type(config).__name__}")
    return dataclasses.replace(config, out_dtype=dtype)


def params_class(config: MMLinearLayerConfig) -> type[Params]:
    if isinstance(config, ScaledMMConfig):
        return expected_params_class(config)
    return kernel_for(config).params_cls


def variable_specs(config: MMLinearLayerConfig, in_features: int, out_features: int, *, use_bias: bool,
                   param_dtype: Any, stack_shape: tuple[int, ...] = (), input_scale_ub: bool = False
                   ) -> dict[str, tuple[tuple[int, ...], Any, float]]:
    """``{variable name: (shape, dtype, fill value)}`` of a quantized layer of ``config`` (placeholders)."""
    if not isinstance(config, (FP8ScaledMMConfig, Int8ScaledMMConfig)):
        raise ConfigError(f"config: expected an FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{name}: expected a positive int, got {v!r}")
    n, k = int(out_features), int(in_features)
    st = tuple(int(s) for s in stack_shape)
    cls = params_class(config)
    specs: dict[str, tuple[tuple[int, ...], Any, float]] = {
        cls.WEIGHT: (st + (n, k), config.weight_dtype, 0),
        cls.WEIGHT_SCALE: (st + weight_scale_shape(config, n, k), jnp.float32, 1),
    }
    if config.is_static:
        specs[cls.INPUT_SCALE] = (st, jnp.float32, 1)
    if isinstance(config, FP8ScaledMMConfig) and input_scale_ub:
        specs[cls.INPUT_SCALE_UB] = (st, jnp.float32, 1)
    if isinstance(config, Int8ScaledMMConfig) and not config.symmetric:
        if config.is_static:
            specs[cls.INPUT_ZERO_POINT] = (st, jnp.int32, 0)
        specs[cls.AZP_ADJ] = (st + (n,), jnp.int32, 0)
    if use_bias:
        specs[BIAS] = (st + (n,), param_dtype, 0)
    return specs


def placeholder_arrays(specs) -> dict[str, jax.Array]:
    return {name: jnp.full(shape, fill, dtype) for name, (shape, dtype, fill) in specs.items()}


def check_arrays(arrays: dict[str, Any], specs, where: str) -> None:
    """Every array of ``specs`` present with its shape and dtype, and nothing else."""
    missing = sorted(set(specs) - set(arrays))
    extra = sorted(set(arrays) - set(specs))
    if missing or extra:
        raise ParamsError(f"{where}: variables do not match the config: missing {missing}, unexpected {extra}")
    for name, (shape, dtype, _) in specs.items():
        a = arrays[name]
        got_shape, got_dtype = tuple(np.shape(a)), jnp.result_type(a)
        if got_shape != tuple(shape):
            raise ParamsError(f"{where}: {name} has shape {got_shape}, expected {tuple(shape)}")
        if name != BIAS and got_dtype != jnp.dtype(dtype):
            raise ParamsError(f"{where}: {name} has dtype {got_dtype}, expected {jnp.dtype(dtype).name}")
        if name == BIAS and not jnp.issubdtype(got_dtype, jnp.floating):
            raise ParamsError(f"{where}: bias has dtype {got_dtype}, expected a float dtype")


def check_values(config: MMLinearLayerConfig, arrays: dict[str, Any], stack: tuple[int, ...] | list[int] = ()) -> None:
    """qlin's own params check (finite, positive scales; zero points) on each layer of a (stacked) layer."""
    from qlin.validate import check_params

    if not isinstance(config, ScaledMMConfig):
        return
    count = int(np.prod(stack)) if len(stack) else 1
    flat = {name: jnp.reshape(a, (count, *np.shape(a)[len(stack):])) for name, a in arrays.items()}
    for i in range(count):
        check_params(build_params(config, {name: a[i] for name, a in flat.items()}), config)


def build_params(config: MMLinearLayerConfig, arrays: dict[str, Any], n: int | None = None,
                 k: int | None = None) -> Params:
    """Typed qlin params from the layer's variables (the bias is not part of Params).

    ``n`` / ``k``: the layer's logical N and K; recorded in ``out_features`` /
    ``in_features`` when the stored weight is padded (processed for a padding kernel).
    """
    p = params_class(config).from_mapping({k_: v for k_, v in arrays.items() if k_ != BIAS and v is not None})
    shape = tuple(np.shape(p.weight))
    if len(shape) == 2 and n is not None and k is not None and shape != (int(n), int(k)):
        if shape[0] < n or shape[1] < k:
            raise ParamsError(f"weight: shape {shape} is smaller than the layer's logical (N, K) = ({n}, {k})")
        p = p.replace(out_features=int(n), in_features=int(k))
    return p


def _slices(arrays: dict[str, Any], stack: tuple[int, ...]):
    count = int(np.prod(stack)) if len(stack) else 1
    flat = {name: jnp.reshape(a, (count, *np.shape(a)[len(stack):])) for name, a in arrays.items()}
    return count, flat


def _restack(parts: list[dict[str, Any]], stack: tuple[int, ...]) -> dict[str, Any]:
    if not stack:
        return parts[0]
    return {name: jnp.stack([p[name] for p in parts]).reshape(*stack, *np.shape(parts[0][name]))
            for name in parts[0]}


def process_arrays(config: MMLinearLayerConfig, arrays: dict[str, Any], n: int, k: int, kernel,
                   stack: tuple[int, ...] = ()) -> dict[str, Any]:
    """The layer's variables processed for ``kernel`` (an MMLinearKernel instance), layer by layer of a stack.

    Idempotent: arrays already processed for ``kernel`` come back unchanged; arrays
    processed for another kernel are unpadded first. The bias is left as it is.
    """
    bias = arrays.get(BIAS)
    quant = {name: a for name, a in arrays.items() if name != BIAS and a is not None}
    count, flat = _slices(quant, stack)
    parts = []
    for i in range(count):
        p = build_params(config, {name: a[i] for name, a in flat.items()}, n, k)
        out = params_for_kernel(kernel, p).to_mapping()
        if set(out) != set(quant):
            raise ParamsError(f"kernel {kernel.name!r}: processing changed the set of arrays from {sorted(quant)} "
                              f"to {sorted(out)}; a flax layer cannot store that")
        parts.append(out)
    result = _restack(parts, stack)
    if bias is not None:
        result[BIAS] = bias
    return result


def logical_arrays(config: MMLinearLayerConfig, arrays: dict[str, Any], n: int, k: int,
                   stack: tuple[int, ...] = ()) -> dict[str, Any]:
    """The layer's variables without any kernel padding (qlin's canonical layout; what checkpoints store)."""
    bias = arrays.get(BIAS)
    quant = {name: a for name, a in arrays.items() if name != BIAS and a is not None}
    w = quant.get("weight")
    if w is None or tuple(np.shape(w)[-2:]) == (int(n), int(k)):
        return dict(arrays)
    count, flat = _slices(quant, stack)
    parts = [logical_params(build_params(config, {name: a[i] for name, a in flat.items()}, n, k)).to_mapping()
             for i in range(count)]
    result = _restack(parts, stack)
    if bias is not None:
        result[BIAS] = bias
    return result


def layout(arrays: dict[str, Any], stack_ndim: int = 0) -> tuple:
    """Static signature (name, per-layer shape, dtype) of a layer's variables, to tell a processed layout."""
    return tuple(sorted((name, tuple(np.shape(a))[stack_ndim:], jnp.result_type(a).name)
                        for name, a in arrays.items() if a is not None))


def apply_quantized(config: MMLinearLayerConfig, arrays: dict[str, Any], x, *, n: int | None = None,
                    k: int | None = None, kernel: str | None = None, processed_for: str | None = None,
                    processed_layout: tuple | None = None, where: str = "layer") -> jax.Array:
    """``x @ W^T + bias`` with the kernel ``qlin.kernel_for(config)`` selects; x is ``[..., K]``.

    ``n`` / ``k``: the layer's logical N and K (default: the weight's rows; x's last dim).
    ``processed_for`` / ``processed_layout``: the kernel the arrays were processed for and
    their :func:`layout` then; when that kernel is the selected one and the arrays still
    have that layout, they go to ``apply_weights`` as they are (no processing at all).
    Otherwise they pass through :func:`qlin.api.params_for_kernel` in the traced call
    (free if they are in the kernel's layout, a pad of the weight per call if not).
    """
    w = arrays.get("weight")
    if w is None or np.ndim(w) != 2:
        raise InputError(
            f"{where}: the weight has shape {None if w is None else tuple(np.shape(w))}; a stacked layer "
            "(leading layer axes) must be called inside nnx.scan / nnx.vmap / nn.scan, which slice it to (N, K)"
        )
    x = jnp.asarray(x)
    w_n, w_k = (int(d) for d in np.shape(w))
    n = w_n if n is None else int(n)
    if x.ndim < 1 or (k is not None and x.shape[-1] != k) or x.shape[-1] > w_k:
        raise InputError(f"{where}: x must have shape [..., {w_k if k is None else k}] (in_features), "
                         f"got {tuple(x.shape)}")
    kern = kernel_for(config, override=kernel)
    params = build_params(config, arrays, n, int(x.shape[-1]))
    if k is None and x.shape[-1] != w_k and not in_kernel_layout(kern, params):
        raise InputError(f"{where}: x must have shape [..., {w_k}] (in_features), got {tuple(x.shape)}; if the "
                         f"weight was padded to K={w_k} for a kernel other than {kern.name!r}, re-process the "
                         "variables for it (QuantizedLinen.process)")
    trusted = (processed_for is not None and processed_for == kern.name
               and processed_layout is not None and layout(arrays) == processed_layout)
    if processed_for is not None and processed_for != kern.name:
        _warn_reprocess(where, processed_for, kern.name)
    return _jitted(kern, trusted)(params, x, arrays.get(BIAS))


_WARNED: set[tuple[str, str]] = set()


def _warn_reprocess(where: str, was: str, now: str) -> None:
    import warnings

    if (was, now) not in _WARNED:
        _WARNED.add((was, now))
        warnings.warn(f"{where}: params were processed for kernel {was!r} but {now!r} runs now; they are "
                      f"re-processed in every call. Call .process() (or qlin.flax.process_nnx(model)) once.",
                      RuntimeWarning, stacklevel=4)


_JITTED: dict[tuple[int, bool], tuple[Any, Any]] = {}


def _jitted(k, trusted: bool):
    """``apply_weights`` of kernel ``k`` (after :func:`params_for_kernel` unless ``trusted``) as one jitted function.

    Inside an outer ``jax.jit`` / ``nnx.jit`` / scan it is simply inlined; called eagerly
    it runs compiled instead of op by op.
    """
    hit = _JITTED.get((id(k), trusted))
    if hit is None or hit[0] is not k:
        if trusted:
            fn = jax.jit(k.apply_weights)
        else:
            fn = jax.jit(lambda p, x, b: k.apply_weights(params_for_kernel(k, p), x, b))
        hit = _JITTED[(id(k), trusted)] = (k, fn)
    return hit[1]
