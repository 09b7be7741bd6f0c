"""``flax.nnx`` quantized linear layer: :class:`QLinear`.

>>> layer = QLinear.from_linear(nnx.Linear(512, 1024, rngs=nnx.Rngs(0)), FP8ScaledMMConfig())
>>> y = layer(x)                      # x: [..., 512] -> [..., 1024] in config.out_dtype

The 8-bit weight, scales, zero point and ``azp_adj`` are :class:`QuantVar`
variables (inference constants: not ``nnx.Param``, so optimizers and
``nnx.state(model, nnx.Param)`` skip them); the bias stays an ``nnx.Param``.
A layer whose variables carry leading axes (created from a stacked
``nnx.Linear`` of an ``nnx.vmap``-built stack) is meant to run under ``nnx.scan``.

The variables hold the params *processed* for the layer's kernel (``from_*``
constructors and ``checkpoint.load_nnx`` run ``process_weights_after_loading`` once;
e.g. ``mosaic_gpu`` pads N and K), so a call hands them to the kernel as they are.
:meth:`QLinear.process` re-processes after the kernel changes or variables were set
by hand; :meth:`QLinear.qparams` / :meth:`QLinear.logical_arrays` give the unpadded params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlin.config import MMLinearLayerConfig
from qlin.errors import InputError, NoKernelError
from qlin.params import Params
from qlin.flax import _common
from qlin.flax._common import BIAS


class QuantVar(nnx.Variable):
    """A quantized layer's constant: 8-bit weight, scales, zero point, ``azp_adj`` (not trainable)."""


class QLinear(nnx.Module):
    """Quantized ``y = x @ W^T + b`` holding qlin params as variables; drop-in for ``nnx.Linear``.

    Args:
      in_features, out_features: K and N.
      config: the qlin layer config (``FP8ScaledMMConfig`` / ``Int8ScaledMMConfig``).
      use_bias: keep a float bias (``param_dtype``), added in the kernel's f32 epilogue.
      dtype: output dtype; overrides ``config.out_dtype`` when given (``self.config`` is the result).
      kernel: force a kernel by name (default: ``qlin.kernel_for(config)`` picks one per machine).
      stack_shape: leading axes of a stacked layer (for ``nnx.scan`` over layers).
      input_scale_ub: allocate an fp8 ``input_scale_ub`` (dynamic per-token cap).

    The constructor allocates placeholder arrays (zero weight, unit scales) of the logical
    shapes and dtypes, for ``nnx.eval_shape`` and checkpoint loading; build a real layer
    with :meth:`from_linear`, :meth:`from_float` or :meth:`from_params`, which also
    process the params for the kernel once (:meth:`process`). ``processed_for`` names
    that kernel (None: not processed; a call then processes inside the traced call).
    """

    def __init__(self, in_features: int, out_features: int, *, config: MMLinearLayerConfig, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, kernel: str | None = None,
                 stack_shape: tuple[int, ...] = (), input_scale_ub: bool = False, rngs: nnx.Rngs | None = None):
        del rngs  # accepted for nnx.Linear signature compatibility; nothing is random
        self.config = _common.effective_config(config, dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(use_bias)
        self.param_dtype = param_dtype
        self.kernel_name = kernel
        self.processed_for: str | None = None
        self._processed_layout: tuple | None = None
        self.stack_shape = tuple(int(s) for s in stack_shape)
        specs = _common.variable_specs(self.config, self.in_features, self.out_features, use_bias=use_bias,
                                       param_dtype=param_dtype, stack_shape=self.stack_shape,
                                       input_scale_ub=input_scale_ub)
        # a tuple, not a dict: nnx keeps plain attributes in the (hashed) graphdef
        self._spec_items = tuple((name, tuple(shape), jnp.dtype(dt).name, fill) for name, (shape, dt, fill) in specs.items())
        for name, value in _common.placeholder_arrays(specs).items():
            setattr(self, name, nnx.Param(value) if name == BIAS else QuantVar(value))

    @property
    def _specs(self) -> dict[str, tuple[tuple[int, ...], Any, float]]:
        return {name: (shape, jnp.dtype(dt), fill) for name, shape, dt, fill in self._spec_items}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], config: MMLinearLayerConfig, *, dtype: Any = None,
                    kernel: str | None = None) -> "QLinear":
        """A layer from ``{variable name: array}`` (a ``Params.to_mapping()`` plus ``bias``); shapes are checked.

        The weight is ``(*stack, N, K)``; every array keeps its dtype bit for bit.
        """
        w = arrays.get("weight")
        if w is None or np.ndim(w) < 2:
            raise InputError(f"arrays: expected a 'weight' of shape (..., N, K), got {None if w is None else np.shape(w)}")
        *stack, n, k = np.shape(w)
        bias = arrays.get(BIAS)
        ub = arrays.get("input_scale_ub") is not None
        layer = cls(k, n, config=config, use_bias=bias is not None, dtype=dtype, kernel=kernel,
                    param_dtype=jnp.result_type(bias) if bias is not None else jnp.float32,
                    stack_shape=tuple(stack), input_scale_ub=ub)
        arrays = {name: a for name, a in arrays.items() if a is not None}
        _common.check_arrays(arrays, layer._specs, f"QLinear({k} -> {n})")
        _common.check_values(layer.config, arrays, stack)
        for name, a in arrays.items():
            getattr(layer, name).set_value(jnp.asarray(a))
        layer.process(strict=False)
        return layer

    @classmethod
    def from_params(cls, params: Params, config: MMLinearLayerConfig, bias=None, *, dtype: Any = None,
                    kernel: str | None = None) -> "QLinear":
        """A layer from qlin ``params`` (e.g. ``qlin.quantize_weight(w, config)``), validated against ``config``."""
        from qlin.validate import normalize_params

        cfg = _common.effective_config(config, dtype)
        if np.ndim(params.weight) == 2:
            params = normalize_params(params, cfg)
        arrays = params.to_mapping()
        if bias is not None:
            arrays[BIAS] = bias
        return cls.from_arrays(arrays, cfg, kernel=kernel)

    @classmethod
    def from_float(cls, w, config: MMLinearLayerConfig, bias=None, *, input_scale=None, input_zero_point=None,
                   dtype: Any = None, kernel: str | None = None) -> "QLinear":
        """Quantize a float weight ``(K, N)`` (flax kernel layout) with ``qlin.quantize_weight``."""
        from qlin.flax.convert import quantize_kernel

        cfg = _common.effective_config(config, dtype)
        arrays = quantize_kernel(w, cfg, bias=bias, input_scale=input_scale, input_zero_point=input_zero_point)
        return cls.from_arrays(arrays, cfg, kernel=kernel)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, config: MMLinearLayerConfig, *, input_scale=None, input_zero_point=None,
                    dtype: Any = None, kernel: str | None = None) -> "QLinear":
        """Quantize a trained ``nnx.Linear`` (stacked ones too: kernel ``(*stack, K, N)``)."""
        if not isinstance(linear, nnx.Linear):
            raise InputError(f"linear: expected an nnx.Linear, got {type(linear).__name__}")
        bias = linear.bias.get_value() if getattr(linear, "bias", None) is not None else None
        return cls.from_float(linear.kernel.get_value(), config, bias, input_scale=input_scale,
                              input_zero_point=input_zero_point, dtype=dtype, kernel=kernel)

    # -- processing ----------------------------------------------------------------------
    def process(self, kernel: str | None = None, *, strict: bool = True) -> "QLinear":
        """Process the variables for the layer's kernel, in place, once; returns the layer.

        ``kernel``: switch the layer to that kernel (by name) first. Idempotent: variables
        already processed for the kernel stay as they are; ones processed for another
        kernel are unpadded and processed again. Call it after setting variables by hand
        (e.g. ``nnx.update`` with logical arrays) or after the kernel selection changed
        (``QLIN_KERNEL``, ``QLIN_DISABLED_KERNELS``, a newly registered kernel).
        ``strict=False``: when no kernel can run the config on this machine, leave the
        variables unprocessed (the call raises the selection error) instead of raising.
        """
        from qlin.api import kernel_for

        if kernel is not None:
            self.kernel_name = kernel
        try:
            k = kernel_for(self.config, override=self.kernel_name)
        except NoKernelError:
            if strict:
                raise
            self.processed_for = self._processed_layout = None
            return self
        new = _common.process_arrays(self.config, self.arrays(), self.out_features, self.in_features, k,
                                     self.stack_shape)
        for name, a in new.items():
            getattr(self, name).set_value(a)
        self.processed_for = k.name
        self._processed_layout = _common.layout(new, len(self.stack_shape))
        return self

    # -- use --------------------------------------------------------------------------
    def arrays(self) -> dict[str, jax.Array]:
        """``{variable name: current value}`` of this layer (as stored: processed for ``processed_for``)."""
        return {name: getattr(self, name).get_value() for name in self._specs}

    def logical_arrays(self) -> dict[str, jax.Array]:
        """The variables without the kernel's padding (qlin's canonical layout; what checkpoints store)."""
        return _common.logical_arrays(self.config, self.arrays(), self.out_features, self.in_features,
                                      self.stack_shape)

    def qparams(self) -> Params:
        """The layer's typed qlin params, canonical layout (unpadded; unstacked layers only for kernels)."""
        return _common.build_params(self.config, self.logical_arrays())

    def kernel_params(self) -> Params:
        """The typed params as stored (in the kernel's layout; logical N / K in out/in_features)."""
        return _common.build_params(self.config, self.arrays(), self.out_features, self.in_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _common.apply_quantized(self.config, self.arrays(), x, n=self.out_features, k=self.in_features,
                                       kernel=self.kernel_name, processed_for=self.processed_for,
                                       processed_layout=self._processed_layout,
                                       where=f"QLinear({self.in_features} -> {self.out_features})")

    def __repr__(self) -> str:  # short, unlike nnx's full-state repr
        stack = f", stack={self.stack_shape}" if self.stack_shape else ""
        return (f"QLinear({self.in_features} -> {self.out_features}, {self.config.describe()}, "
                f"bias={self.use_bias}{stack})")


def process_nnx(model, kernel: str | None = None) -> int:
    """:meth:`QLinear.process` every QLinear of ``model`` (in place); returns how many there are."""
    count = 0
    for _, m in nnx.iter_modules(model):
        if isinstance(m, QLinear):
            m.process(kernel)
            count += 1
    return count
