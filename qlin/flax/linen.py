"""``flax.linen`` quantized dense layer: :class:`QDense`, and :class:`QuantizedLinen` for converted models.

Two ways to serve a linen model quantized:

* write (or parametrize) the model with :class:`QDense` where it had ``nn.Dense``
  -- same constructor fields plus ``config`` -- and apply it to params converted by
  :func:`qlin.flax.quantize_linen` (its output tree has exactly QDense's variables);
* keep the float model definition and apply the converted params through the
  :class:`QuantizedLinen` that :func:`quantize_linen` returns: it intercepts each
  converted ``nn.Dense`` call (``nn.intercept_methods``) and runs the qlin kernel
  on the quantized variables instead. Works under ``jax.jit``, ``nn.scan`` and ``nn.vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlin.config import MMLinearLayerConfig
from qlin.errors import InputError
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

    ``init`` allocates placeholders (zero weight, unit scales); real values come from
    :func:`qlin.flax.quantize_linen` or :func:`qlin.flax.checkpoint.load_linen`.
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
            name: self.param(name, lambda _rng, shape, dt, fill: jnp.full(shape, fill, dt), shape, dt, fill)
            for name, (shape, dt, fill) in specs.items()
        }
        return _common.apply_quantized(cfg, arrays, x, kernel=self.kernel, where=f"QDense {'/'.join(self.path)}")


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class QuantizedLinen:
    """A float linen model plus the qlin configs of its converted ``nn.Dense`` layers.

    ``qm.apply(variables, *args)`` is ``model.apply`` with every converted Dense
    running quantized (the variables must be the converted tree). Layers are keyed
    by their module path ``"Block_0/Dense_1"`` (``nn.Module.path`` joined by "/").
    """

    model: nn.Module
    layers: tuple[tuple[str, MMLinearLayerConfig, str | None], ...]  # (path, config, kernel override)

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
        if n != module.features:
            raise InputError(f"{path}: quantized weight has N={n} but the nn.Dense has features={module.features}")
        return _common.apply_quantized(config, arrays, args[0], kernel=kernel, where=path)

    def apply(self, variables, *args, **kwargs):
        """``model.apply(variables, *args, **kwargs)`` with the converted layers quantized."""
        with nn.intercept_methods(self._interceptor):
            return self.model.apply(variables, *args, **kwargs)

    def __call__(self, variables, *args, **kwargs):
        return self.apply(variables, *args, **kwargs)
