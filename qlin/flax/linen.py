"""``flax.linen`` quantized dense layer: :class:`QDense`, and :class:`QuantizedLinen` for converted models.

Two ways to serve a linen model quantized:

* write (or parametrize) the model with :class:`QDense` where it had ``nn.Dense``
  -- same constructor fields plus ``config`` -- and apply it to params converted by
  :func:`qlin.flax.quantize_linen` (its output tree has exactly QDense's variables);
* keep the float model definition and apply the converted params through the
  :class:`QuantizedLinen` that :func:`quantize_linen` returns: it intercepts each
  converted ``nn.Dense`` call (``nn.intercept_methods``) and runs the qlin kernel
  on the quantized variables instead. Works under ``jax.jit``, ``nn.scan`` and ``nn.vmap``.

Processed variables: :func:`qlin.flax.quantize_linen` and
:func:`qlin.flax.checkpoint.load_linen` return the variables already processed for each
layer's kernel (``process_weights_after_loading`` once: e.g. ``mosaic_gpu`` pads N and K),
and a call hands them to the kernel without padding or slicing the weight again.
For a tree built some other way (or after the kernel selection changed), run the
documented step :meth:`QuantizedLinen.process` once; an unprocessed tree still works,
processed inside every call. ``QuantizedLinen.logical(variables)`` unpads (what
``save_linen`` stores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlin.config import MMLinearLayerConfig
from qlin.errors import InputError, ParamsError
from qlin.flax import _common


class QDense(nn.Module):
    """Quantized ``nn.Dense``: variables (collection ``params``) ``weight`` ``(N, K)`` 8-bit, ``weight_scale``,
    and, as the config needs, ``input_scale``, ``input_scale_ub``, ``input_zero_point``, ``azp_adj``, ``bias``.

    Attributes:
      features: N.
      config: qlin layer config.
      use_bias: float bias of ``param_dtype``.
      dtype: output dtype (overrides ``config.out_dtype`` when given).
      kernel: force a kernel by name; default ``qlin.kernel_for(config)``.
      input_scale_ub: allocate an fp8 ``input_scale_ub``.

    ``init`` allocates placeholders (zero weight, unit scales, logical shapes); real values
    come from :func:`qlin.flax.quantize_linen` or :func:`qlin.flax.checkpoint.load_linen`,
    processed for the kernel (weight possibly padded to ``(N_pad, K_pad)``); N is
    ``features`` and K the input's last dimension.
    """

    features: int
    config: MMLinearLayerConfig
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel: str | None = None
    input_scale_ub: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 1:
            raise InputError("x: expected an array of shape [..., K], got a scalar")
        cfg = _common.effective_config(self.config, self.dtype)
        specs = _common.variable_specs(cfg, x.shape[-1], self.features, use_bias=self.use_bias,
                                       param_dtype=self.param_dtype, input_scale_ub=self.input_scale_ub)
        arrays = {
            # existing (possibly padded, processed) variables are read as they are; init makes logical placeholders
            name: self.get_variable("params", name) if self.has_variable("params", name) else
            self.param(name, lambda _rng, shape, dt, fill: jnp.full(shape, fill, dt), shape, dt, fill)
            for name, (shape, dt, fill) in specs.items()
        }
        return _common.apply_quantized(cfg, arrays, x, n=self.features, kernel=self.kernel,
                                       where=f"QDense {'/'.join(self.path)}")


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class QuantizedLinen:
    """A float linen model plus the qlin configs of its converted ``nn.Dense`` layers.

    ``qm.apply(variables, *args)`` is ``model.apply`` with every converted Dense
    running quantized (the variables must be the converted tree). Layers are keyed
    by their module path ``"Block_0/Dense_1"`` (``nn.Module.path`` joined by "/").
    ``dims`` records each layer's logical ``(path, N, K)``, which :meth:`process` and
    :meth:`logical` need once the stored weights are padded.
    """

    model: nn.Module
    layers: tuple[tuple[str, MMLinearLayerConfig, str | None], ...]  # (path, config, kernel override)
    dims: tuple[tuple[str, int, int], ...] = ()  # (path, logical N, logical K)

    @property
    def configs(self) -> dict[str, MMLinearLayerConfig]:
        return {p: c for p, c, _ in self.layers}

    def _interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = _path_str(module.path)
        table = {p: (c, k) for p, c, k in self.layers}
        if path not in table:
            return next_fun(*args, **kwargs)
        config, kernel = table[path]
        if kwargs or len(args) != 1:
            raise InputError(f"{path}: a quantized nn.Dense takes one positional input, got {len(args)} and {sorted(kwargs)}")
        if not module.has_variable("params", "weight"):
            raise InputError(
                f"{path}: converted to {config.describe()} but its variables have no 'weight'; "
                "apply the variables returned by qlin.flax.quantize_linen (or checkpoint.load_linen)"
            )
        arrays = {name: module.get_variable("params", name) for name in module.variables.get("params", {})}
        if "kernel" in arrays:
            raise InputError(f"{path}: has both a float 'kernel' and quantized variables; expected converted params")
        n = int(jnp.shape(arrays["weight"])[-2])
        dims = {p: (dn, dk) for p, dn, dk in self.dims}
        if n != module.features and (path not in dims or dims[path][0] != module.features):
            raise InputError(f"{path}: quantized weight has N={n} but the nn.Dense has features={module.features}")
        k = dims[path][1] if path in dims else None
        return _common.apply_quantized(config, arrays, args[0], n=module.features, k=k, kernel=kernel, where=path)

    # -- processed variables -------------------------------------------------------------------
    def _layer_trees(self, variables):
        if "params" not in variables:
            raise InputError(f"variables: expected a dict with a 'params' collection, got keys {sorted(variables)}")
        dims = {p: (n, k) for p, n, k in self.dims}
        for path, config, kernel in self.layers:
            node = variables["params"]
            for part in path.split("/") if path else ():
                if not hasattr(node, "items") or part not in node:
                    raise InputError(f"variables: no params for quantized layer {path!r}")
                node = node[part]
            if not hasattr(node, "items") or "weight" not in node:
                raise InputError(f"{path}: converted to {config.describe()} but its variables have no 'weight'")
            shape = tuple(jnp.shape(node["weight"]))
            n, k = dims.get(path, shape[-2:])
            yield path, config, kernel, dict(node), (int(n), int(k)), shape[:-2]

    def _replace(self, variables, new: dict[str, dict]):
        from qlin.flax.convert import _set_in

        params = variables["params"]
        for path, arrays in new.items():
            params = _set_in(params, tuple(path.split("/")) if path else (), arrays)
        out = dict(variables)
        out["params"] = params
        return out

    def process(self, variables):
        """``variables`` with every converted layer processed for its kernel (once; idempotent).

        The documented step for a tree that was not made by ``quantize_linen`` /
        ``load_linen`` (those return processed trees), or after the kernel selection
        changed. Returns a new tree; ``self.dims`` must describe padded layers.
        """
        from qlin.api import kernel_for

        new = {}
        for path, config, kernel, arrays, (n, k), stack in self._layer_trees(variables):
            kern = kernel_for(config, override=kernel)
            new[path] = _common.process_arrays(config, arrays, n, k, kern, stack)
        return self._replace(variables, new)

    def logical(self, variables):
        """``variables`` with every converted layer's kernel padding removed (qlin's canonical layout)."""
        new = {}
        for path, config, _, arrays, (n, k), stack in self._layer_trees(variables):
            shape = tuple(jnp.shape(arrays["weight"]))[-2:]
            if shape != (n, k) and (shape[0] < n or shape[1] < k):
                raise ParamsError(f"{path}: weight {shape} is smaller than the logical (N, K) = ({n}, {k})")
            new[path] = _common.logical_arrays(config, arrays, n, k, stack)
        return self._replace(variables, new)

    def apply(self, variables, *args, **kwargs):
        """``model.apply(variables, *args, **kwargs)`` with the converted layers quantized."""
        with nn.intercept_methods(self._interceptor):
            return self.model.apply(variables, *args, **kwargs)

    def __call__(self, variables, *args, **kwargs):
        return self.apply(variables, *args, **kwargs)
