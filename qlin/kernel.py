"""The kernel abstraction: vLLM's ``MMLinearKernel`` lifecycle, made functional for JAX.

Lifecycle::

    ok, why = K.is_supported(compute_capability)   # hardware check (classmethod)
    ok, why = K.can_implement(config)              # config check (classmethod)
    kernel = K(config)
    params = kernel.process_weights_after_loading(params)   # once per layer; returns NEW params
    y = kernel.apply_weights(params, x, bias)                # jittable; x is [..., K]

Where vLLM mutates a torch layer, qlin returns new pytrees; ``apply_weights``
also accepts a layer-like object and reads its params by attribute name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

import jax

from qlin.config import MMLinearLayerConfig
from qlin.params import Params

ConfigT = TypeVar("ConfigT", bound=MMLinearLayerConfig)
ParamsT = TypeVar("ParamsT", bound=Params)


class MMLinearKernel(ABC, Generic[ConfigT, ParamsT]):
    """Base class of quantized matmul kernels. Subclass, implement the abstract methods, register.

    Class attributes:
      name: unique short name, used by selection, ``QLIN_DISABLED_KERNELS`` and ``qlin info``.
      params_cls: the Params class the kernel reads (``from_layer`` uses its attribute names).
    """

    name: ClassVar[str] = ""
    params_cls: ClassVar[type[Params]] = Params

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    @classmethod
    @abstractmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        """Can this kernel run on this hardware? ``compute_capability`` like 90 (H100); None = current device."""

    @classmethod
    @abstractmethod
    def can_implement(cls, config: ConfigT) -> tuple[bool, str | None]:
        """Can this kernel compute ``config``? Returns ``(ok, reason if not)``."""

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def process_weights_after_loading(self, params: ParamsT) -> ParamsT:
        """Return params in the layout this kernel wants (validated, padded, re-laid out). Never mutates."""

    @abstractmethod
    def apply_weights(self, params: ParamsT | Any, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """``x @ W^T (+ bias)`` for ``x`` of shape ``[..., K]``; returns ``[..., N]`` in the config's dtype."""

    def get_output_padding(self) -> int | None:
        """Tokens (rows of x) the caller should pad to, or None. Default: no padding."""
        return None

    # -- helpers for subclasses -----------------------------------------------------------
    def _get_layer_params(self, layer: Any) -> ParamsT:
        """Typed params read off ``layer`` (a Params is returned as is)."""
        if isinstance(layer, Params):
            return layer  # type: ignore[return-value]
        return self.params_cls.from_layer(layer)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config!r})"


def flatten_leading(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """``[..., K]`` -> ``(M, K)`` plus the leading shape to restore with :func:`restore_leading`."""
    lead = tuple(x.shape[:-1])
    return x.reshape(math.prod(lead), x.shape[-1]), lead


def restore_leading(y: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    return y.reshape(*lead, y.shape[-1])
