"""One-call API: ``qlin.linear`` and ``qlin.QuantizedLinear`` for users who skip the lifecycle."""

from __future__ import annotations

import os
from typing import Any

import jax

from qlin.config import MMLinearLayerConfig
from qlin.kernel import MMLinearKernel
from qlin.params import Params
from qlin.platform import compute_capability, device_platform
from qlin.quantize import quantize_weight
from qlin.select import choose_kernel, registry_version

_KERNELS: dict[Any, MMLinearKernel] = {}


def kernel_for(config: MMLinearLayerConfig, *, platform: str | None = None, override: str | None = None) -> MMLinearKernel:
    """The chosen kernel instance for ``config`` on this machine (cached per config and environment)."""
    if platform is None:
        platform = device_platform()
    cc = compute_capability() if platform == device_platform() else None
    key = (
        config, platform, cc, override, registry_version(),
        os.environ.get("QLIN_DISABLED_KERNELS", ""), os.environ.get("QLIN_KERNEL", ""),
    )
    try:
        cached = _KERNELS.get(key)
    except TypeError:  # unhashable user config: select every time
        cls = choose_kernel(config, cc, platform, override=override)
        return cls(config)
    if cached is None:
        cls = choose_kernel(config, cc, platform, override=override)
        cached = _KERNELS[key] = cls(config)
    return cached


def linear(x: jax.Array, params: Params, config: MMLinearLayerConfig, bias: jax.Array | None = None,
           *, kernel: str | None = None) -> jax.Array:
    """``x @ W^T (+ bias)`` with the quantized ``params``, in ``config.out_dtype``; jittable.

    Selects the kernel once per config (cached), processes the params for it
    (cheap when they are already in its layout) and applies it. For a layer
    called many times, :class:`QuantizedLinear` processes the weight once.
    """
    k = kernel_for(config, override=kernel)
    return k.apply_weights(k.process_weights_after_loading(params), x, bias)


class QuantizedLinear:
    """A quantized linear layer: weight quantized and processed once, then ``layer(x)``.

    >>> layer = QuantizedLinear.from_float(w, FP8ScaledMMConfig())   # w: (N, K) float
    >>> y = layer(x)                                                 # x: [..., K]
    """

    def __init__(self, params: Params, config: MMLinearLayerConfig, bias: jax.Array | None = None,
                 *, kernel: str | None = None) -> None:
        self.config = config
        self.kernel = kernel_for(config, override=kernel)
        self.params = self.kernel.process_weights_after_loading(params)
        self.bias = bias
        self._apply = jax.jit(self.kernel.apply_weights)

    @classmethod
    def from_float(cls, w: jax.Array, config: MMLinearLayerConfig, bias: jax.Array | None = None, *,
                   input_scale=None, input_zero_point=None, kernel: str | None = None) -> "QuantizedLinear":
        """Quantize a float weight ``(N, K)`` with :func:`qlin.quantize_weight` and build the layer."""
        params = quantize_weight(w, config, input_scale, input_zero_point)
        return cls(params, config, bias, kernel=kernel)

    @property
    def in_features(self) -> int:
        return self.params.k

    @property
    def out_features(self) -> int:
        return self.params.n

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(self.params, x, self.bias)

    def __repr__(self) -> str:
        return (f"QuantizedLinear({self.in_features} -> {self.out_features}, "
                f"{getattr(self.config, 'describe', lambda: self.config)()}, kernel={self.kernel.name!r})")
