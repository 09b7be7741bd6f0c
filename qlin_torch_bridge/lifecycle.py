"""qlin's kernel lifecycle on torch modules, vLLM style.

    layer.qlin_config = FP8ScaledMMConfig()          # or pass config=
    process_weights_after_loading(layer)             # once, after the checkpoint is loaded
    y = apply_weights(layer, x, bias)                # torch in, torch out, every forward

:func:`process_weights_after_loading` picks the kernel for the config and for the
platform the layer's tensors live on (torch cpu -> qlin's cpu kernels, cuda ->
cuda kernels), reads the layer's Params zero-copy, runs the kernel's
``process_weights_after_loading`` and *replaces* every parameter the kernel
changed with the processed tensor -- vLLM's ``replace_parameter``: the old
``nn.Parameter`` is dropped and a new ``requires_grad=False`` parameter that
shares memory with the processed JAX array is registered under the same name
(a registered buffer stays a buffer). Parameters the kernel left untouched keep
their identity. The processed Params, the kernel and its jitted
``apply_weights`` are cached on the layer.

:func:`apply_weights` converts ``x`` (and ``bias``) to JAX without copies, calls
the kernel's jitted ``apply_weights`` and returns the result as a torch tensor
sharing the output buffer. If a parameter was replaced or its data moved since
processing (``param.data = ...``, ``layer.to(device)``), the layer's params are
re-read -- and re-processed for the new platform when the device kind changed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import torch

from qlin.api import kernel_for
from qlin.config import MMLinearLayerConfig
from qlin.errors import InputError
from qlin.kernel import MMLinearKernel
from qlin.params import Params
from qlin.platform import PLATFORMS
from qlin.select import registered_kernels
from qlin_torch_bridge import dlpack
from qlin_torch_bridge.dlpack import platform_of, to_jax, to_jax_hot, to_torch, to_torch_hot
from qlin_torch_bridge.params import STATIC_ATTR, WeightLayout, check_same_device, params_from_module

__all__ = ["process_weights_after_loading", "apply_weights", "replace_parameter", "CONFIG_ATTR", "layer_kernel"]

#: Attribute a torch layer may carry its qlin config in (read when ``config`` is not passed).
CONFIG_ATTR = "qlin_config"
_STATE_ATTR = "_qlin_state"
_JITTED: dict[Any, Any] = {}


@dataclasses.dataclass
class _State:
    kernel: MMLinearKernel
    apply: Any
    params: Params
    sources: dict[str, tuple[Any, int, int | None]]  # attribute -> (the torch object read, data pointer, _version)
    weight_layout: str
    copy: bool
    platform: str
    kernel_override: str | None = None
    bias_src: tuple[Any, int, int | None] | None = None  # (bias tensor, data pointer, _version) of bias_jax
    bias_jax: Any = None
    # hot path: the params' leaves and ``call(leaves, x, bias)`` -- the same jitted kernel apply with the
    # pytree already flattened (a Params flatten is Python code: doing it once saves it on every call)
    leaves: tuple = ()
    call: Any = None
    checks: tuple = ()  # ((where to look the attribute up (see _holder), attr, object, data_ptr, _version), ...)
    device: Any = None  # the torch device of the layer's weight
    route: Any = None  # the DLPack route (cached JAX device, streams) of that device, None: public path
    export_ok: bool = False  # the output dtype crosses on the fast export
    direct: Any = None  # the direct route (qlin_torch_bridge.direct.DirectLinear) where it applies

    def refresh(self, layer: Any = None) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(self.params)
        self.leaves, self.call = tuple(leaves), _leaf_call(self.kernel, treedef)
        self.checks = tuple((_holder(layer, attr, obj), attr, obj, ptr, ver)
                            for attr, (obj, ptr, ver) in self.sources.items())
        w = self.sources.get(self.params.attribute_name("weight"), (None, 0, None))[0]
        self.device = w.device if isinstance(w, torch.Tensor) else None
        self.route = dlpack.hot_route(w) if isinstance(w, torch.Tensor) else None
        self.export_ok = dlpack.fast_export_dtype(self.kernel.config.out_dtype)
        self.direct = None
        if self.platform == "cuda":
            from qlin_torch_bridge.direct import direct_for

            self.direct = direct_for(self.kernel, self.params, self.platform,
                                     to_torch=lambda a: to_torch(a, name="processed parameter"))


def _version(t: torch.Tensor) -> int | None:
    """``t._version`` (bumped by every in-place op on ``t`` or a view of it); None for inference tensors."""
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors track no version
        return None


def _holder(layer: Any, attr: str, obj: Any) -> Any:
    """Where the hot path looks ``attr`` up without ``nn.Module.__getattr__`` (slow, and raising inside
    for an absent attribute): the dict holding ``obj`` (``_parameters`` / ``_buffers``); for an attribute
    the layer did not have, the three dicts a later assignment would land in; None: plain getattr."""
    if not isinstance(layer, torch.nn.Module) or type(getattr(type(layer), attr, None)) is property:
        return None
    if attr in layer.__dict__:
        return None  # a plain instance attribute: let getattr decide
    for d in (layer._parameters, layer._buffers):
        if attr in d:
            return d if d[attr] is obj else None
    if obj is None and not hasattr(type(layer), attr):
        return (layer._parameters, layer._buffers, layer.__dict__)
    return None


def _snapshot(layer: Any, attrs) -> dict[str, tuple[Any, int, int | None]]:
    out = {}
    for attr in attrs:
        obj = getattr(layer, attr, None)
        out[attr] = (obj, obj.data_ptr(), _version(obj)) if isinstance(obj, torch.Tensor) else (obj, 0, None)
    return out


def _unchanged_fast(layer: Any, checks: tuple) -> bool:
    """Every parameter read at processing time is still the same object, at the same address, with no
    in-place update since (its ``_version``: ``param.mul_(2)``, ``param.copy_(new)`` under no_grad)."""
    for holder, attr, obj, ptr, ver in checks:
        if holder is None:
            now = getattr(layer, attr, None)
        elif type(holder) is dict:
            now = holder.get(attr)
        else:  # absent when read: still absent (or None)?
            params, buffers, inst = holder
            now = params.get(attr)
            if now is None:
                now = buffers.get(attr)
                if now is None:
                    now = inst.get(attr)
        if now is not obj:
            return False
        if ptr and (now.data_ptr() != ptr or (ver is not None and now._version != ver)):
            return False
    return True


def _unchanged(layer: Any, sources: dict[str, tuple[Any, int, int | None]]) -> bool:
    for attr, (obj, ptr, ver) in sources.items():
        now = getattr(layer, attr, None)
        if now is not obj or (ptr and (now.data_ptr() != ptr or _version(now) != ver)):
            return False
    return True


def replace_parameter(module: torch.nn.Module, name: str, new: torch.Tensor) -> None:
    """Replace ``module.<name>`` by ``new`` (vLLM semantics): a new ``requires_grad=False`` Parameter.

    A registered buffer stays a buffer; a plain attribute or a missing name becomes a parameter.
    ``new`` is wrapped without copying.
    """
    if name in module._buffers:
        module._buffers[name] = new.detach()
        return
    if name in module._parameters:
        del module._parameters[name]
    elif hasattr(module, name):
        delattr(module, name)
    module.register_parameter(name, torch.nn.Parameter(new.detach(), requires_grad=False))


def _kernel_platforms(name: str) -> list[str]:
    return [p for p in PLATFORMS if any(k.name == name for k in registered_kernels(p))]


def _select(config: MMLinearLayerConfig, platform: str, kernel: str | None, what: str) -> MMLinearKernel:
    forced = kernel or os.environ.get("QLIN_KERNEL", "").strip() or None
    if forced is not None:
        where = _kernel_platforms(forced)
        if where and platform not in where:
            source = "kernel" if kernel else "QLIN_KERNEL"
            raise InputError(
                f"{source}: {forced!r} runs on {where} only, but {what}'s tensors are torch tensors on "
                f"{platform}; move the layer to a {where[0]} device or pick a {platform} kernel"
            )
    return kernel_for(config, platform=platform, override=kernel)


def _jitted(k: MMLinearKernel):
    fn = _JITTED.get(id(k))
    if fn is None or fn[0] is not k:
        fn = _JITTED[id(k)] = (k, jax.jit(k.apply_weights))
    return fn[1]


def _leaf_call(k: MMLinearKernel, treedef: Any):
    """``jit(lambda leaves, x, bias: k.apply_weights(unflatten(leaves), x, bias))``, one per kernel and treedef."""
    key = (id(k), treedef)
    fn = _JITTED.get(key)
    if fn is None or fn[0] is not k:
        def call(leaves, x, bias):
            return k.apply_weights(jax.tree_util.tree_unflatten(treedef, leaves), x, bias)

        call.__name__ = call.__qualname__ = f"{type(k).__name__}_apply_weights"
        fn = _JITTED[key] = (k, jax.jit(call))
    return fn[1]


def process_weights_after_loading(
    layer: torch.nn.Module,
    config: MMLinearLayerConfig | None = None,
    *,
    kernel: str | None = None,
    weight_layout: WeightLayout = "nk",
    copy: bool = False,
) -> torch.nn.Module:
    """Process ``layer``'s quantized weights for the chosen kernel, replacing its parameters; returns ``layer``.

    Args:
      layer: a torch module with the attributes of the kernel's Params class
        (``weight``, ``weight_scale``, ``input_scale``, ... by class-level name).
      config: the qlin layer config; default ``layer.qlin_config``. Stored on the layer.
      kernel: force a kernel by name (it must run on the platform of the layer's tensors).
      weight_layout: ``"nk"`` (``nn.Linear``) or ``"kn"`` (vLLM's transposed weight view).
      copy: allow explicit copies of tensors whose memory JAX cannot share.
    """
    if config is None:
        config = getattr(layer, CONFIG_ATTR, None)
        if config is None:
            raise InputError(f"config: not given and {type(layer).__name__} has no {CONFIG_ATTR!r} attribute")
    if not isinstance(config, MMLinearLayerConfig):
        raise InputError(f"config: expected a qlin layer config, got {type(config).__name__}")
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        # Let params_from_module name the missing attribute for the right Params class.
        params_cls = kernel_for(config, platform="cpu", override=kernel).params_cls
        params_from_module(layer, params_cls, name=type(layer).__name__)
        raise InputError(f"{type(layer).__name__}.weight: expected a torch.Tensor, got {type(w).__name__}")
    platform = platform_of(w)
    k = _select(config, platform, kernel, type(layer).__name__)
    name = type(layer).__name__
    params = params_from_module(layer, k.params_cls, weight_layout=weight_layout, copy=copy, name=name)
    processed = k.process_weights_after_loading(params)

    for field, attr in processed.attribute_names().items():
        new = getattr(processed, field)
        if new is None or new is getattr(params, field):
            continue
        replace_parameter(layer, attr, to_torch(new, name=f"processed {name}.{attr}"))
        if field == "weight" and weight_layout == "kn":
            weight_layout = "nk"  # the processed weight is registered in (N, K)
    static = {f.name: getattr(processed, f.name) for f in dataclasses.fields(processed)
              if f.name in ("out_features", "in_features") and getattr(processed, f.name) is not None}
    object.__setattr__(layer, STATIC_ATTR, static)
    object.__setattr__(layer, CONFIG_ATTR, config)
    state = _State(
        kernel=k, apply=_jitted(k), params=processed,
        sources=_snapshot(layer, processed.attribute_names().values()),
        weight_layout=weight_layout, copy=copy, platform=platform, kernel_override=kernel,
    )
    state.refresh(layer)
    object.__setattr__(layer, _STATE_ATTR, state)
    return layer


def layer_kernel(layer: torch.nn.Module) -> MMLinearKernel:
    """The kernel :func:`process_weights_after_loading` chose for ``layer``."""
    return _state(layer).kernel


def _state(layer: Any) -> _State:
    state = getattr(layer, _STATE_ATTR, None)
    if state is None:
        raise InputError(
            f"layer: {type(layer).__name__} has not been processed; call process_weights_after_loading(layer) first"
        )
    return state


def _current_params(layer: torch.nn.Module, state: _State) -> tuple[_State, Params]:
    """The cached params; re-read if a parameter was replaced or its data moved (``param.data = ...``,
    ``module.to(device)``) since processing, and re-processed for the new platform if it changed device kind."""
    if _unchanged(layer, state.sources):
        return state, state.params
    weight = getattr(layer, state.params.attribute_name("weight"), None)
    if isinstance(weight, torch.Tensor) and platform_of(weight) != state.platform:
        process_weights_after_loading(layer, getattr(layer, CONFIG_ATTR), kernel=state.kernel_override,
                                      weight_layout=state.weight_layout, copy=state.copy)
        state = _state(layer)
        return state, state.params
    params = params_from_module(layer, type(state.params), weight_layout=state.weight_layout, copy=state.copy,
                                name=type(layer).__name__)
    state.params = params
    state.sources = _snapshot(layer, params.attribute_names().values())
    state.refresh(layer)
    return state, params


def apply_weights(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, *,
                  copy: bool = False) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with the processed ``layer``; torch tensors in and out, no copies.

    ``x`` is ``[..., K]`` float16/bfloat16/float32 on the layer's device; the result is
    ``[..., N]`` in the config's ``out_dtype``. ``copy=True`` allows an explicit copy of an
    ``x`` (or ``bias``) whose memory is not row-major or not aligned (else LayoutError).

    Steady state (nothing about the layer changed since the last call): check the layer's
    parameters are the ones read (identity, address, ``_version``), hand ``x`` to JAX, one jitted
    call on the cached JAX views of the parameters (and of ``bias``), hand the result back.  On a
    CUDA device, layers of the ``mosaic_gpu`` kernel with dynamic per-token activations launch the
    same compiled Mosaic GPU kernels from torch instead (:mod:`qlin_torch_bridge.direct`).
    """
    state = getattr(layer, _STATE_ATTR, None)
    if state is None or not _unchanged_fast(layer, state.checks):
        state, _ = _current_params(layer, _state(layer))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    dev = state.device
    if x.device != dev or (bias is not None and (not isinstance(bias, torch.Tensor) or bias.device != dev)):
        weight = getattr(layer, state.params.attribute_name("weight"))
        check_same_device({"weight": weight, "x (input)": x} | ({"bias": bias} if bias is not None else {}),
                          type(layer).__name__)
    if state.direct is not None:  # the Mosaic GPU kernels launched from torch: no JAX dispatch
        y = state.direct(x, bias)
        if y is not None:
            return y
    route = state.route
    xj = dlpack.import_hot(x, route) if route is not None else None
    if xj is None:
        xj = to_jax_hot(x, name="x", copy=copy)
    if bias is None:
        bj = None
    else:
        src = state.bias_src
        if src is not None and bias is src[0] and bias.data_ptr() == src[1] and _version(bias) == src[2]:
            bj = state.bias_jax
        else:
            bj = to_jax(bias, copy=copy, name="bias", verify=False)
            state.bias_src, state.bias_jax = (bias, bias.data_ptr(), _version(bias)), bj
    y = state.call(state.leaves, xj, bj)
    if state.export_ok and route is not None:
        t = dlpack.export_hot(y, route)
        if t is not None:
            return t
    return to_torch_hot(y, x, name="y")
