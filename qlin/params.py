"""Typed quantized-layer parameters, as JAX pytrees.

A ``Params`` object is what a kernel reads: the 8-bit weight, its scale(s) and
the activation-side constants. Each field has a class-level *attribute name*
(``WEIGHT = "weight"``, ...) so the same object can be read off any layer-like
object -- a flax module, a torch ``nn.Module``, a ``SimpleNamespace`` -- with
:meth:`Params.from_layer`, exactly like vLLM's ``Params``.

Every subclass is registered as a pytree automatically (fields are looked up at
flatten time, so ``@dataclass`` subclasses that add fields just work), which
lets params pass through ``jax.jit``, ``jax.tree.map``, ``vmap`` and sharding.

Array fields are pytree leaves (``None`` for an absent optional field). Fields
declared with ``static_field()`` are pytree metadata: hashable Python values
that shape the computation (e.g. the logical output width after padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import jax

Array = jax.Array

_STATIC = "qlin_static"


def static_field(default: Any = None) -> Any:
    """A dataclass field stored as pytree metadata instead of a leaf."""
    return dataclasses.field(default=default, metadata={_STATIC: True})


def _is_static(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(_STATIC, False))


def _flatten_with_keys(obj: "Params"):
    fields = dataclasses.fields(obj)
    children = tuple(
        (jax.tree_util.GetAttrKey(f.name), getattr(obj, f.name)) for f in fields if not _is_static(f)
    )
    aux = tuple((f.name, getattr(obj, f.name)) for f in fields if _is_static(f))
    names = tuple(f.name for f in fields if not _is_static(f))
    return children, (names, aux)


def _make_unflatten(cls: type):
    def unflatten(meta, children):
        names, aux = meta
        obj = object.__new__(cls)
        for name, value in zip(names, children):
            object.__setattr__(obj, name, value)
        for name, value in aux:
            object.__setattr__(obj, name, value)
        return obj

    return unflatten


@dataclasses.dataclass(kw_only=True)
class Params:
    """Base parameters of a quantized linear layer ``y = x @ W^T``.

    Attributes:
      weight: quantized weight, shape ``(N, K)`` (out_features, in_features),
        torch/vLLM convention; K-major, which 8-bit tensor-core GEMMs require.
      weight_scale: float32 dequantization scale of the weight: ``()`` per-tensor,
        ``(N,)`` per-channel, ``(ceil(N/bn), ceil(K/bk))`` per block.
      input_scale: float32 ``()`` static activation scale, or ``None`` (dynamic).
      out_features, in_features: logical N and K when a kernel's
        ``process_weights_after_loading`` padded the weight; ``None`` means the
        stored ``weight.shape``. Static (pytree metadata), not arrays.
    """

    weight: Array
    weight_scale: Array
    input_scale: Array | None = None
    out_features: int | None = static_field()
    in_features: int | None = static_field()

    WEIGHT: ClassVar[str] = "weight"
    WEIGHT_SCALE: ClassVar[str] = "weight_scale"
    INPUT_SCALE: ClassVar[str] = "input_scale"
    #: fields a layer must provide; every other array field is optional.
    REQUIRED: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(cls, _flatten_with_keys, _make_unflatten(cls))

    # -- reading params off layers ------------------------------------------------
    @classmethod
    def attribute_name(cls, field_name: str) -> str:
        """The layer attribute that holds ``field_name`` (``cls.FIELD_NAME``, upper-cased)."""
        return getattr(cls, field_name.upper(), field_name)

    @classmethod
    def array_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if not _is_static(f))

    @classmethod
    def attribute_names(cls) -> dict[str, str]:
        """``{field name: layer attribute name}`` for every array field."""
        return {name: cls.attribute_name(name) for name in cls.array_fields()}

    @classmethod
    def _required(cls) -> set[str]:
        required = set(cls.REQUIRED)
        for f in dataclasses.fields(cls):
            if not _is_static(f) and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)
        return required

    @classmethod
    def from_layer(cls, layer: Any) -> Self:
        """Read every field off ``layer`` by its attribute name (missing optional ones become None)."""
        values: dict[str, Any] = {}
        required = cls._required()
        for name, attr in cls.attribute_names().items():
            if hasattr(layer, attr):
                values[name] = getattr(layer, attr)
            elif name in required:
                raise AttributeError(
                    f"{cls.__name__}.from_layer: {type(layer).__name__} has no attribute {attr!r} "
                    f"({cls.__name__}.{name.upper()}), which {cls.__name__} requires"
                )
            else:
                values[name] = None
        return cls(**values)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Self:
        """Like :meth:`from_layer` for a dict keyed by attribute name (a state dict, safetensors)."""
        values: dict[str, Any] = {}
        required = cls._required()
        for name, attr in cls.attribute_names().items():
            if attr in mapping:
                values[name] = mapping[attr]
            elif name in required:
                raise KeyError(
                    f"{cls.__name__}.from_mapping: no entry {attr!r} ({cls.__name__}.{name.upper()}); "
                    f"got keys {sorted(mapping)}"
                )
            else:
                values[name] = None
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """``{attribute name: array}`` for every non-None array field (inverse of from_mapping)."""
        out = {}
        for name, attr in self.attribute_names().items():
            value = getattr(self, name)
            if value is not None:
                out[attr] = value
        return out

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied; qlin never mutates params in place."""
        return dataclasses.replace(self, **changes)

    # -- convenience ---------------------------------------------------------------
    @property
    def n(self) -> int:
        """Logical number of output features."""
        return self.out_features if self.out_features is not None else int(self.weight.shape[0])

    @property
    def k(self) -> int:
        """Logical number of input features (what x's last dimension must be)."""
        return self.in_features if self.in_features is not None else int(self.weight.shape[1])


@dataclasses.dataclass(kw_only=True)
class FP8Params(Params):
    """FP8 layer params; ``input_scale_ub`` caps dynamic per-token activation scales."""

    input_scale_ub: Array | None = None

    INPUT_SCALE_UB: ClassVar[str] = "input_scale_ub"


@dataclasses.dataclass(kw_only=True)
class Int8Params(Params):
    """INT8 layer params.

    Attributes:
      input_zero_point: int32 ``()`` static activation zero point (asymmetric, static).
      azp_adj: int32 ``(N,)`` column sums of the quantized weight over K; the
        asymmetric correction is ``zp * azp_adj`` (see :mod:`qlin.quantize`).
    """

    input_zero_point: Array | None = None
    azp_adj: Array | None = None

    INPUT_ZERO_POINT: ClassVar[str] = "input_zero_point"
    AZP_ADJ: ClassVar[str] = "azp_adj"


# The base class is created before __init_subclass__ could run for it.
jax.tree_util.register_pytree_with_keys(Params, _flatten_with_keys, _make_unflatten(Params))
