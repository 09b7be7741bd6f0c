"""``QuantLinear``: a drop-in quantized ``nn.Linear``, and ``quantize_(model, config)`` to swap them in.

    model = quantize_(model, FP8ScaledMMConfig())                         # every nn.Linear, dynamic act
    model = quantize_(model, Int8ScaledMMConfig(activation="static"),
                      filter=lambda mod, fqn: "attention" in fqn,
                      calibrate=lambda m: m(sample_batch))                 # static act scales

The weight is quantized once (qlin's :func:`~qlin.quantize_weight`, the same
math as everywhere in qlin), processed for the kernel once, and each forward is
one jitted qlin kernel call on tensors shared with torch (no copies).
Inference only: parameters have ``requires_grad=False``; an input that requires
grad is an error rather than a silently dropped gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import torch
from torch import nn

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, MMLinearLayerConfig, OUT_DTYPES, ScaledMMConfig
from qlin.errors import InputError
from qlin.params import Params
from qlin.quantize import calibrate_static, quantize_weight
from qlin_torch_bridge.dlpack import jax_dtype, to_jax, to_torch
from qlin_torch_bridge.lifecycle import CONFIG_ATTR, apply_weights, layer_kernel, process_weights_after_loading

__all__ = ["QuantLinear", "quantize_", "default_filter"]


class QuantLinear(nn.Module):
    """A quantized linear layer ``y = x @ W^T + b`` running a qlin kernel.

    Its parameters use qlin's attribute names: ``weight`` (8-bit, ``(N, K)``),
    ``weight_scale``, and as the config needs ``input_scale``, ``input_scale_ub``
    (fp8), ``input_zero_point`` and ``azp_adj`` (asymmetric int8); ``bias`` stays
    in its float dtype. Output dtype: ``config.out_dtype``.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``), :meth:`from_params`
    (already quantized Params, e.g. from a checkpoint), or the constructor plus
    assigning the parameters and calling :meth:`process_weights_after_loading`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: MMLinearLayerConfig, kernel: str | None = None, device: Any = None,
                 bias_dtype: torch.dtype = torch.float32, allow_input_copy: bool = False) -> None:
        super().__init__()
        if not isinstance(config, ScaledMMConfig):
            raise InputError(f"config: expected an FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        object.__setattr__(self, CONFIG_ATTR, config)
        self.kernel_name = kernel
        self.allow_input_copy = allow_input_copy
        wdtype = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
                  "int8": torch.int8}[config.weight_dtype.name]
        n, k = self.out_features, self.in_features
        g = config.weight_granularity
        sshape = () if g == "per_tensor" else (n,) if g == "per_channel" else (-(-n // g[0]), -(-k // g[1]))
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.weight = frozen(torch.zeros(n, k, dtype=wdtype, device=device))
        self.weight_scale = frozen(torch.ones(sshape, dtype=torch.float32, device=device))
        self.bias = frozen(torch.zeros(n, dtype=bias_dtype, device=device)) if bias else None
        if config.is_static:
            self.input_scale = frozen(torch.ones((), dtype=torch.float32, device=device))
            if isinstance(config, Int8ScaledMMConfig) and not config.symmetric:
                self.input_zero_point = frozen(torch.zeros((), dtype=torch.int32, device=device))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Params, config: ScaledMMConfig, bias: torch.Tensor | None = None, *,
                    kernel: str | None = None, allow_input_copy: bool = False) -> "QuantLinear":
        """A processed layer holding ``params`` (JAX arrays or torch tensors, shared, not copied)."""
        n, k = int(params.weight.shape[0]), int(params.weight.shape[1])
        layer = cls(k, n, bias is not None, config=config, kernel=kernel, device="meta",
                    allow_input_copy=allow_input_copy)
        for field, attr in params.attribute_names().items():
            value = getattr(params, field)
            if value is None:
                if attr in layer._parameters:
                    del layer._parameters[attr]
                continue
            t = value if isinstance(value, torch.Tensor) else to_torch(value, name=f"params.{field}")
            layer._parameters[attr] = nn.Parameter(t.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        for t in layer.parameters():
            if t.device.type == "meta":
                raise InputError(f"params: no value for a parameter of {config.describe()}")
        return layer.process_weights_after_loading()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: ScaledMMConfig, *, input_scale=None, input_zero_point=None,
                    input_scale_ub=None, kernel: str | None = None, allow_input_copy: bool = False) -> "QuantLinear":
        """Quantize ``linear``'s weight once with ``config`` (static configs need ``input_scale``)."""
        if not isinstance(linear, nn.Linear):
            raise InputError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = to_jax(linear.weight.detach(), name=f"{type(linear).__name__}.weight", copy=True)
        params = quantize_weight(w, config, input_scale, input_zero_point, input_scale_ub=input_scale_ub)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_params(params, config, bias, kernel=kernel, allow_input_copy=allow_input_copy)

    def process_weights_after_loading(self) -> "QuantLinear":
        process_weights_after_loading(self, getattr(self, CONFIG_ATTR), kernel=self.kernel_name)
        return self

    # -- use --------------------------------------------------------------------------------
    @property
    def config(self) -> ScaledMMConfig:
        return getattr(self, CONFIG_ATTR)

    @property
    def kernel(self):
        return layer_kernel(self)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves every tensor; dtype conversions (``.half()``, ``.to(torch.bfloat16)``)
        touch only the bias -- the 8-bit weight, its float32 scales and the integer zero points keep
        their dtypes (a cast would corrupt them)."""
        bias = self.bias

        def keep_dtype(t):
            moved = fn(t)
            if t is bias or (bias is not None and t is bias.data) or moved.dtype == t.dtype:
                return moved
            return t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_weights(self, x, self.bias, copy=self.allow_input_copy)

    def extra_repr(self) -> str:
        try:
            kname = self.kernel.name
        except InputError:
            kname = None
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"config={self.config.describe()}, kernel={kname!r}")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every ``nn.Linear``."""
    return isinstance(module, nn.Linear)


def _layer_config(config: ScaledMMConfig, linear: nn.Linear, match_dtype: bool) -> ScaledMMConfig:
    if not match_dtype:
        return config
    dt = jnp.dtype(jax_dtype(linear.weight.dtype))
    if dt in OUT_DTYPES and dt != config.out_dtype:
        return dataclasses.replace(config, out_dtype=dt)
    return config


def quantize_(
    model: nn.Module,
    config: ScaledMMConfig,
    filter: Callable[[nn.Module, str], bool] | None = None,  # noqa: A002 - torchao's name
    *,
    calibrate: Callable[[nn.Module], Any] | None = None,
    kernel: str | None = None,
    match_dtype: bool = True,
    allow_input_copy: bool = False,
) -> nn.Module:
    """Swap the ``nn.Linear`` layers of ``model`` (in place) for :class:`QuantLinear`; returns the model.

    Args:
      model: a torch module (if it is itself an ``nn.Linear``, use the returned module).
      config: :class:`qlin.FP8ScaledMMConfig` or :class:`qlin.Int8ScaledMMConfig`.
      filter: ``filter(module, fqn) -> bool`` picks the layers (only ``nn.Linear`` ones are
        swapped); default all of them.
      calibrate: for static activation configs: ``calibrate(model)`` runs representative
        inputs through the float model; each layer's static scale (and int8 zero point)
        comes from the range of the inputs it saw (qlin's :func:`~qlin.calibrate_static`).
      kernel: force a qlin kernel by name.
      match_dtype: give each layer ``out_dtype`` = its float weight dtype (a drop-in keeps
        the model's dtype); ``False`` keeps ``config.out_dtype``.
      allow_input_copy: let layers copy non-contiguous / unaligned inputs (else LayoutError).
    """
    if not isinstance(config, (FP8ScaledMMConfig, Int8ScaledMMConfig)):
        raise InputError(f"config: expected an FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}")
    pick = filter or default_filter
    # remove_duplicate=False: a Linear registered under two names (tied modules) is swapped at both
    targets = [(fqn, m) for fqn, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear) and pick(m, fqn)]
    ranges: dict[str, list[float]] = {}
    if config.is_static:
        if calibrate is None:
            raise InputError("calibrate: config.activation='static' needs calibrate=fn(model) to run sample inputs")
        ranges = _calibrate(model, targets, calibrate)
    elif calibrate is not None:
        raise InputError(f"calibrate: given, but config.activation={config.activation!r} computes scales at run time")

    done: dict[int, QuantLinear] = {}
    for fqn, linear in targets:
        if id(linear) in done:  # the same module under another name: share the quantized layer
            _set_submodule(model, fqn, done[id(linear)])
            continue
        cfg = _layer_config(config, linear, match_dtype)
        scale = zp = None
        if cfg.is_static:
            if fqn not in ranges:
                raise InputError(f"calibrate: layer {fqn!r} saw no input while calibrating; cannot set its static scale")
            lo, hi = ranges[fqn]
            scale, zp = calibrate_static(jnp.asarray([lo, hi], jnp.float32), cfg)
        q = QuantLinear.from_linear(linear, cfg, input_scale=scale, input_zero_point=zp, kernel=kernel,
                                    allow_input_copy=allow_input_copy)
        done[id(linear)] = q
        if fqn == "":
            model = q
        else:
            _set_submodule(model, fqn, q)
    return model


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _calibrate(model: nn.Module, targets: list[tuple[str, nn.Module]], fn: Callable[[nn.Module], Any]):
    ranges: dict[str, list[float]] = {}

    def hook_for(fqn: str):
        def hook(_mod, args):
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            r = ranges.setdefault(fqn, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(fqn)) for fqn, m in targets]
    try:
        with torch.no_grad():
            fn(model)
    finally:
        for h in handles:
            h.remove()
    return ranges
