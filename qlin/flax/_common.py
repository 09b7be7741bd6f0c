"""Plumbing shared by the nnx and linen layers: variable layout, params assembly, kernel call.

A quantized layer stores one variable per qlin ``Params`` array field, named by
the field's *attribute name* (``weight``, ``weight_scale``, ``input_scale``,
``input_scale_ub``, ``input_zero_point``, ``azp_adj``) plus an optional float
``bias``. So ``Params.from_mapping`` rebuilds the typed params from the variables,
and a saved checkpoint has the same keys as a vLLM/torch state dict.

Arrays are stored in qlin's canonical layout (weight ``(N, K)``, canonical scale
shapes, unpadded); the kernel's ``process_weights_after_loading`` runs inside the
traced call, where it is free when the kernel needs no other layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlin.api import kernel_for
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


def build_params(config: MMLinearLayerConfig, arrays: dict[str, Any]) -> Params:
    """Typed qlin params from the layer's variables (the bias is not part of Params)."""
    return params_class(config).from_mapping({k: v for k, v in arrays.items() if k != BIAS and v is not None})


def apply_quantized(config: MMLinearLayerConfig, arrays: dict[str, Any], x, *, kernel: str | None = None,
                    where: str = "layer") -> jax.Array:
    """``x @ W^T + bias`` with the kernel ``qlin.kernel_for(config)`` selects; x is ``[..., K]``."""
    w = arrays.get("weight")
    if w is None or np.ndim(w) != 2:
        raise InputError(
            f"{where}: the weight has shape {None if w is None else tuple(np.shape(w))}; a stacked layer "
            "(leading layer axes) must be called inside nnx.scan / nnx.vmap / nn.scan, which slice it to (N, K)"
        )
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != np.shape(w)[1]:
        raise InputError(f"{where}: x must have shape [..., {np.shape(w)[1]}] (in_features), got {tuple(x.shape)}")
    return _jitted(kernel_for(config, override=kernel))(build_params(config, arrays), x, arrays.get(BIAS))


_JITTED: dict[int, tuple[Any, Any]] = {}


def _jitted(k):
    """``process_weights_after_loading`` + ``apply_weights`` of kernel ``k`` as one jitted function.

    Inside an outer ``jax.jit`` / ``nnx.jit`` / scan it is simply inlined; called eagerly
    it runs compiled instead of op by op. Processing canonical params is free under jit
    (reshapes and casts to the same shape/dtype) for kernels that keep qlin's layout.
    """
    hit = _JITTED.get(id(k))
    if hit is None or hit[0] is not k:
        fn = jax.jit(lambda p, x, b: k.apply_weights(k.process_weights_after_loading(p), x, b))
        hit = _JITTED[id(k)] = (k, fn)
    return hit[1]
