"""One-call API: ``qlin.linear`` and ``qlin.QuantizedLinear`` for users who skip the lifecycle."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import MMLinearLayerConfig
from qlin.kernel import MMLinearKernel
from qlin.params import Int8Params, Params
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


def logical_params(params: Params) -> Params:
    """``params`` without a kernel's padding: weight ``(N, K)``, per-channel scales and ``azp_adj`` ``(N,)``.

    The inverse of the padding a kernel's ``process_weights_after_loading`` adds (qlin's
    convention: zero rows/columns appended, the logical N / K kept in ``out_features`` /
    ``in_features``); unpadded params are returned as they are. Works on arrays and tracers.
    """
    if np.ndim(params.weight) != 2:
        return params  # not a layer's weight: the kernel's validation names the problem
    n, k = params.n, params.k
    if tuple(np.shape(params.weight)) == (n, k):
        return params if params.out_features is None and params.in_features is None else params.replace(
            out_features=None, in_features=None)
    changes: dict[str, Any] = {"weight": params.weight[:n, :k], "out_features": None, "in_features": None}
    if params.weight_scale is not None and np.ndim(params.weight_scale) == 1 and np.shape(params.weight_scale)[0] != n:
        changes["weight_scale"] = params.weight_scale[:n]
    if isinstance(params, Int8Params) and params.azp_adj is not None and np.size(params.azp_adj) != n:
        changes["azp_adj"] = jnp.reshape(params.azp_adj, -1)[:n]
    return params.replace(**changes)


def _signature(params: Params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)


_LAYOUTS: dict[Any, Any] = {}


def in_kernel_layout(kernel: MMLinearKernel, params: Params) -> bool:
    """Whether ``params`` already have the structure (tree, static N/K, shapes, dtypes) that ``kernel``'s
    ``process_weights_after_loading`` produces from their logical params. Static: no device work.

    True means processing them again is a no-op (processing is idempotent); for a kernel
    that keeps qlin's canonical layout (``xla``), unprocessed canonical params are in it too.
    """
    sig = _signature(params)
    key = (kernel, sig)
    try:
        hit = _LAYOUTS.get(key)
    except TypeError:  # unhashable leaf dtype / kernel: compute every time
        hit, key = None, None
    if hit is None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), params)
        out = jax.eval_shape(lambda p: kernel.process_weights_after_loading(logical_params(p)), abstract)
        hit = _signature(out)
        if key is not None:
            _LAYOUTS[key] = hit
    return hit == sig


def params_for_kernel(kernel: MMLinearKernel, params: Params) -> Params:
    """``params`` in ``kernel``'s layout, processed only when they are not in it yet.

    Params already processed for ``kernel`` go through its idempotent
    ``process_weights_after_loading`` unchanged (no pad, no slice of the weight); logical
    params are processed; params padded for another kernel are unpadded first
    (:func:`logical_params`), then processed.
    """
    if not isinstance(params, Params) or np.ndim(params.weight) != 2 or in_kernel_layout(kernel, params):
        return kernel.process_weights_after_loading(params)
    return kernel.process_weights_after_loading(logical_params(params))


def linear(x: jax.Array, params: Params, config: MMLinearLayerConfig, bias: jax.Array | None = None,
           *, kernel: str | None = None) -> jax.Array:
    """``x @ W^T (+ bias)`` with the quantized ``params``, in ``config.out_dtype``; jittable.

    Selects the kernel once per config (cached) and processes the params for it inside
    the call (:func:`params_for_kernel`): free for params already processed for that
    kernel, a pad of the weight per call for unprocessed params of a shape the kernel
    must pad. For a layer called many times, :class:`QuantizedLinear` processes once.
    """
    k = kernel_for(config, override=kernel)
    return k.apply_weights(params_for_kernel(k, params), x, bias)


class QuantizedLinear:
    """A quantized linear layer: weight quantized and processed once, then ``layer(x)``.

    The constructor runs the kernel's ``process_weights_after_loading`` (e.g. the
    ``mosaic_gpu`` kernel pads N and K to its alignment); ``layer.params`` holds the
    result and every call applies it as it is.

    >>> layer = QuantizedLinear.from_float(w, FP8ScaledMMConfig())   # w: (N, K) float
    >>> y = layer(x)                                                 # x: [..., K]
    """

    def __init__(self, params: Params, config: MMLinearLayerConfig, bias: jax.Array | None = None,
                 *, kernel: str | None = None) -> None:
        self.config = config
        self.kernel = kernel_for(config, override=kernel)
        # processed ONCE here; __call__ hands them to apply_weights as they are
        self.params = params_for_kernel(self.kernel, params)
        self.bias = bias
        self._apply = jax.jit(self.kernel.apply_weights)

    @classmethod
    def from_float(cls, w: jax.Array, config: MMLinearLayerConfig, bias: jax.Array | None = None, *,
                   input_scale=None, input_zero_point=None, kernel: str | None = None) -> "QuantizedLinear":
        """Quantize a float weight ``(N, K)`` with :func:`qlin.quantize_weight` and build the layer."""
        params = quantize_weight(w, config, input_scale, input_zero_point)
        return cls(params, config, bias, kernel=kernel)

    def logical_params(self) -> Params:
        """The layer's params without the kernel's padding (qlin's canonical layout)."""
        return logical_params(self.params)

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
