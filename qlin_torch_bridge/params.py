"""Read qlin Params off a torch ``nn.Module`` (zero copy), by the Params class-level attribute names.

Every array field of a Params class has a class-level attribute name
(``Params.WEIGHT = "weight"``, ``FP8Params.INPUT_SCALE_UB = "input_scale_ub"``,
``Int8Params.AZP_ADJ = "azp_adj"``, ...; a subclass's extra fields too).
:func:`params_from_module` reads each of them off the module, turns the torch
tensors into JAX arrays with :func:`~qlin_torch_bridge.dlpack.to_jax` and builds
the Params -- no copies.

Weight orientation. qlin's ``weight`` is ``(N, K)`` (out_features, in_features),
K-major, as in ``nn.Linear``: ``weight_layout="nk"`` (the default). vLLM's fp8 and
int8 layers keep ``layer.weight`` as a transposed ``(K, N)`` *view* of K-major
``(N, K)`` memory after loading; ``weight_layout="kn"`` reads such a weight as
``layer.weight.t()`` -- a view of the same memory, so still zero copy. A weight
whose memory is not K-major in the logical ``(N, K)`` orientation raises
:class:`~qlin_torch_bridge.dlpack.LayoutError` unless ``copy=True``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import torch

from qlin.errors import InputError, ParamsError
from qlin.params import Params
from qlin_torch_bridge.dlpack import to_jax

__all__ = ["MissingAttributeError", "params_from_module", "check_same_device", "module_tensors", "static_fields"]

WeightLayout = Literal["nk", "kn"]
#: Layer attribute holding a processed layer's static Params fields (padding), set by the lifecycle.
STATIC_ATTR = "_qlin_static"


class MissingAttributeError(ParamsError, AttributeError):
    """A module lacks an attribute its Params class requires."""


def module_tensors(module: Any, params_cls: type[Params]) -> dict[str, Any]:
    """``{field name: value}`` read off ``module`` by ``params_cls``'s attribute names (None if absent)."""
    required = params_cls._required()
    out: dict[str, Any] = {}
    for field, attr in params_cls.attribute_names().items():
        value = getattr(module, attr, None)
        if value is None and field in required:
            present = sorted(n for n in params_cls.attribute_names().values() if getattr(module, n, None) is not None)
            raise MissingAttributeError(
                f"{params_cls.__name__}: {type(module).__name__} has no attribute {attr!r} "
                f"({params_cls.__name__}.{field.upper()}), which {params_cls.__name__} requires; "
                f"it has {present}"
            )
        out[field] = value
    return out


def check_same_device(tensors: dict[str, Any], what: str = "layer") -> torch.device | None:
    """The one torch device of the tensors in ``tensors``; InputError naming two that differ."""
    first: tuple[str, torch.device] | None = None
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if first is None:
                first = (name, value.device)
            elif value.device != first[1]:
                raise InputError(
                    f"{what}.{name} is on {value.device} but {what}.{first[0]} is on {first[1]}; "
                    "all of a layer's tensors (and its input) must be on one device"
                )
    return None if first is None else first[1]


def static_fields(module: Any) -> dict[str, Any]:
    return dict(getattr(module, STATIC_ATTR, None) or {})


def _as_jax(value: Any, name: str, copy: bool) -> jax.Array | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return to_jax(value, copy=copy, name=name)
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, (int, float)):
        return jnp.asarray(value)
    raise InputError(f"{name}: expected a torch.Tensor (or a Python number), got {type(value).__name__}")


def params_from_module(
    module: Any,
    params_cls: type[Params],
    *,
    weight_layout: WeightLayout = "nk",
    copy: bool = False,
    name: str = "layer",
) -> Params:
    """``params_cls`` built from ``module``'s attributes, sharing their memory.

    Args:
      module: an ``nn.Module`` (or any object) with the attributes ``params_cls`` names.
      params_cls: :class:`qlin.Params` or a subclass (its extra fields are read too).
      weight_layout: ``"nk"`` -- ``module.weight`` is ``(N, K)``; ``"kn"`` -- it is vLLM's
        transposed ``(K, N)`` view and ``weight.t()`` is used.
      copy: allow explicit copies of tensors whose memory JAX cannot share (see ``to_jax``).
      name: how errors call the module.
    """
    if not (isinstance(params_cls, type) and issubclass(params_cls, Params)):
        raise InputError(f"params_cls: expected a qlin Params subclass, got {params_cls!r}")
    if weight_layout not in ("nk", "kn"):
        raise InputError(f"weight_layout: expected 'nk' or 'kn', got {weight_layout!r}")
    values = module_tensors(module, params_cls)
    check_same_device(values, name)
    weight_attr = params_cls.attribute_name("weight")
    w = values.get("weight")
    if isinstance(w, torch.Tensor):
        if w.dim() != 2:
            raise ParamsError(f"{name}.{weight_attr}: expected a 2-D weight, got shape {tuple(w.shape)}")
        if weight_layout == "kn":
            w = w.t()
        _check_declared_features(module, w, weight_attr, name, weight_layout)
        values["weight"] = w
    arrays = {
        field: _as_jax(value, f"{name}.{params_cls.attribute_name(field)}"
                       + (".t()" if field == "weight" and weight_layout == "kn" else ""), copy)
        for field, value in values.items()
    }
    static = {k: v for k, v in static_fields(module).items() if k in ("out_features", "in_features")}
    return params_cls(**arrays, **static)


def _check_declared_features(module: Any, w: torch.Tensor, attr: str, name: str, layout: str) -> None:
    """If the module declares its size (nn.Linear's in/out_features, vLLM's *_size_per_partition), check (N, K)."""
    for n_attr, k_attr in (("output_size_per_partition", "input_size_per_partition"), ("out_features", "in_features")):
        n, k = getattr(module, n_attr, None), getattr(module, k_attr, None)
        if isinstance(n, int) and isinstance(k, int):
            pad = static_fields(module)
            if (pad.get("out_features") or pad.get("in_features")) and tuple(w.shape) != (n, k):
                return  # padded by a kernel: the static fields carry the logical size
            if tuple(w.shape) != (n, k):
                other = "kn" if layout == "nk" else "nk"
                raise ParamsError(
                    f"{name}.{attr}: logical weight must be (out, in) = ({n}, {k}) per {n_attr}/{k_attr}, got "
                    f"{tuple(w.shape)} with weight_layout={layout!r}"
                    + (f"; did you mean weight_layout={other!r}?" if tuple(w.shape) == (k, n) else "")
                )
            return
