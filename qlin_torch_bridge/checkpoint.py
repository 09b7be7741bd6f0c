"""Load FP8 / INT8 W8A8 checkpoints as vLLM and llm-compressor ship them, into qlin Params / QuantLinear.

Formats (safetensors, one ``<prefix>.<name>`` tensor per parameter):

* **compressed-tensors** (llm-compressor; ``quantization_config.quant_method =
  "compressed-tensors"`` in ``config.json``): ``weight`` (float8_e4m3fn or int8,
  ``(N, K)``), ``weight_scale`` (``()``/``(1,)`` per tensor, ``(N, 1)`` per channel,
  ``(ceil(N/bn), ceil(K/bk))`` per block), ``input_scale`` (static activations),
  ``input_zero_point`` (asymmetric int8 activations), ``weight_zero_point``
  (symmetric weights: all zero, ignored).
* **fp8** (vLLM's ``Fp8Config``; DeepSeek-V3 block fp8: ``quant_method = "fp8"``,
  ``weight_block_size = [128, 128]``): the weight scale is named
  ``weight_scale_inv`` -- despite the name it is the dequantization multiplier, used
  as qlin's ``weight_scale`` as is. Non-block fp8 checkpoints name it ``weight_scale``.

Both names are read for every format (a layer having both is an error).
Without a ``config.json`` the scheme is inferred from the tensors' dtypes and shapes.

Fused layers. A model's fused ``qkv_proj`` / ``gate_up_proj`` is loaded from its
separately stored shards (``q_proj``, ``k_proj``, ``v_proj``), as vLLM does:

* per-channel or block weight scales are concatenated along N;
* per-tensor fp8 weights are **requantized to the largest shard scale** (each shard
  dequantized with its own scale, requantized with the max; saturating cast);
* per-tensor int8 weights keep their values and the shard scales are **expanded to
  one scale per output channel** (the layer becomes ``per_channel``);
* static input scales take the max over shards (symmetric), or for asymmetric int8 a
  scale and zero point covering the union of the shards' ranges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.errors import ConfigError, InputError, ParamsError
from qlin.params import FP8Params, Int8Params, Params
from qlin.quantize import INT8_QMAX, INT8_QMIN, saturate_to_fp8
from qlin_torch_bridge.dlpack import to_jax, to_torch
from qlin_torch_bridge.linear import QuantLinear

__all__ = ["QuantCheckpoint", "config_from_quantization_config", "load_quantized_linears", "DEFAULT_FUSED"]

#: vLLM's fused projections and their checkpoint shards.
DEFAULT_FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_WEIGHT_SCALE_NAMES = ("weight_scale", "weight_scale_inv")
_8BIT = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)


# -- config.json ---------------------------------------------------------------------------------

def _ct_scheme(group: dict[str, Any], out_dtype) -> ScaledMMConfig:
    w = group.get("weights") or {}
    a = group.get("input_activations")
    if w.get("num_bits", 8) != 8:
        raise ConfigError(f"compressed-tensors: qlin runs 8-bit weights, got num_bits={w.get('num_bits')}")
    if not a:
        raise ConfigError("compressed-tensors: weight-only schemes (no input_activations) are not W8A8; qlin needs both")
    if not w.get("symmetric", True):
        raise ConfigError("compressed-tensors: asymmetric weights are not supported (qlin's weights are symmetric)")
    strategy = w.get("strategy", "tensor")
    if strategy == "tensor":
        gran: Any = "per_tensor"
    elif strategy == "channel":
        gran = "per_channel"
    elif strategy == "block":
        gran = tuple(w.get("block_structure") or (128, 128))
    else:
        raise ConfigError(f"compressed-tensors: weight strategy {strategy!r} is not supported (tensor/channel/block)")
    group_size = None
    if not a.get("dynamic", False):
        if a.get("strategy", "tensor") != "tensor":
            raise ConfigError(f"compressed-tensors: static activations must be per tensor, got {a.get('strategy')!r}")
        act = "static"
    else:
        act = {"token": "dynamic_per_token", "tensor": "dynamic_per_tensor", "group": "dynamic_per_group"}.get(
            a.get("strategy", "token"))
        if act is None:
            raise ConfigError(f"compressed-tensors: activation strategy {a.get('strategy')!r} is not supported")
        if act == "dynamic_per_group":
            group_size = a.get("group_size")
    kind = w.get("type", "float")
    common = dict(weight_granularity=gran, activation=act, group_size=group_size, out_dtype=out_dtype)
    if kind == "float":
        return FP8ScaledMMConfig(**common)
    if kind == "int":
        return Int8ScaledMMConfig(**common, symmetric=bool(a.get("symmetric", True)))
    raise ConfigError(f"compressed-tensors: weight type {kind!r} is not supported (float or int)")


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or pattern in ("Linear", "nn.Linear")


def config_from_quantization_config(qc: dict[str, Any], prefix: str, out_dtype=jnp.bfloat16) -> ScaledMMConfig | None:
    """The qlin config ``qc`` (a ``quantization_config`` dict) gives layer ``prefix``; None if it is ignored."""
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        if any(_matches(p, prefix) and p not in ("Linear", "nn.Linear") for p in qc.get("ignore", [])):
            return None
        for group in (qc.get("config_groups") or {}).values():
            if any(_matches(t, prefix) for t in group.get("targets", ["Linear"])):
                return _ct_scheme(group, out_dtype)
        return None
    if method == "fp8":
        if any(_matches(p, prefix) for p in qc.get("ignored_layers", []) or qc.get("modules_to_not_convert", []) or []):
            return None
        fmt = {"e4m3": "e4m3fn", "e4m3fn": "e4m3fn", "e5m2": "e5m2"}[qc.get("fmt", "e4m3")]
        block = qc.get("weight_block_size")
        static = qc.get("activation_scheme", "dynamic") == "static"
        if block:
            if static:
                raise ConfigError("fp8: block-quantized weights need dynamic activations (activation_scheme='dynamic')")
            return FP8ScaledMMConfig(weight_granularity=tuple(block), activation="dynamic_per_group",
                                     group_size=int(block[1]), fp8_format=fmt, out_dtype=out_dtype)
        return FP8ScaledMMConfig(weight_granularity="per_tensor", activation="static" if static else "dynamic_per_tensor",
                                 fp8_format=fmt, out_dtype=out_dtype)
    raise ConfigError(f"quantization_config: quant_method {method!r} is not supported ('compressed-tensors' or 'fp8')")


# -- the checkpoint --------------------------------------------------------------------------------

class QuantCheckpoint:
    """A W8A8 safetensors checkpoint: a directory (``*.safetensors`` + optional ``config.json``) or one file.

    Args:
      path: the directory or ``.safetensors`` file.
      config: force one qlin config for every layer (else from ``config.json``, else inferred).
      out_dtype: output dtype of the layers' configs when not forced (default: config.json's
        ``torch_dtype`` if it is bf16/f16/f32, else bfloat16).
    """

    def __init__(self, path: str | os.PathLike, config: ScaledMMConfig | None = None, out_dtype=None) -> None:
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            cfg_path = os.path.join(path, "config.json")
        elif os.path.isfile(path):
            files, cfg_path = [path], os.path.join(os.path.dirname(path), "config.json")
        else:
            raise InputError(f"path: {path!r} is neither a directory nor a .safetensors file")
        if not files:
            raise InputError(f"path: no .safetensors files in {path!r}")
        self.path = path
        self._handles = [safe_open(f, framework="pt") for f in files]
        self._where: dict[str, Any] = {}
        for h in self._handles:
            for key in h.keys():
                self._where[key] = h
        self.hf_config: dict[str, Any] = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                self.hf_config = json.load(fh)
        self.quantization_config: dict[str, Any] | None = self.hf_config.get("quantization_config")
        if out_dtype is None:
            td = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype")
            out_dtype = td if td in ("bfloat16", "float16", "float32") else "bfloat16"
        self.out_dtype = jnp.dtype(out_dtype)
        self._forced = config

    # -- raw access ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, loaded into (CPU) memory."""
        try:
            return self._where[key].get_tensor(key)
        except KeyError:
            raise KeyError(f"checkpoint {self.path!r} has no tensor {key!r}") from None

    def _opt(self, key: str) -> torch.Tensor | None:
        return self.tensor(key) if key in self._where else None

    def layers(self) -> list[str]:
        """Prefixes of the quantized linear layers (an 8-bit ``<prefix>.weight`` with a weight scale)."""
        out = []
        for key in self._where:
            if key.endswith(".weight"):
                p = key[: -len(".weight")]
                if any(f"{p}.{s}" in self._where for s in _WEIGHT_SCALE_NAMES):
                    out.append(p)
        return sorted(out)

    # -- configs --------------------------------------------------------------------------------
    def config_for(self, prefix: str) -> ScaledMMConfig | None:
        """The qlin config of layer ``prefix`` (None if config.json says the layer is not quantized)."""
        if self._forced is not None:
            return self._forced
        if self.quantization_config is not None:
            return config_from_quantization_config(self.quantization_config, prefix, self.out_dtype)
        return self._infer(prefix)

    def _infer(self, prefix: str) -> ScaledMMConfig:
        w = self.tensor(f"{prefix}.weight")
        s = self._weight_scale(prefix)
        n, k = w.shape
        if s.numel() == 1:
            gran: Any = "per_tensor"
        elif tuple(s.shape) in ((n,), (n, 1)):
            gran = "per_channel"
        elif s.dim() == 2:
            bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
            gran = (bn, bk)
        else:
            raise ParamsError(f"{prefix}.weight_scale: cannot infer the granularity from shape {tuple(s.shape)}")
        static = f"{prefix}.input_scale" in self._where
        act = "static" if static else ("dynamic_per_group" if isinstance(gran, tuple) else "dynamic_per_token")
        group = gran[1] if act == "dynamic_per_group" else None
        if w.dtype == torch.int8:
            return Int8ScaledMMConfig(weight_granularity=gran, activation=act, group_size=group, out_dtype=self.out_dtype,
                                      symmetric=f"{prefix}.input_zero_point" not in self._where)
        fmt = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}.get(w.dtype)
        if fmt is None:
            raise ParamsError(f"{prefix}.weight: expected an 8-bit (fp8 or int8) weight, got {w.dtype}")
        return FP8ScaledMMConfig(weight_granularity=gran, activation=act, group_size=group, out_dtype=self.out_dtype,
                                 fp8_format=fmt)

    def _weight_scale(self, prefix: str) -> torch.Tensor:
        found = [n for n in _WEIGHT_SCALE_NAMES if f"{prefix}.{n}" in self._where]
        if not found:
            raise KeyError(f"checkpoint has no weight scale for {prefix!r} (looked for {list(_WEIGHT_SCALE_NAMES)})")
        if len(found) > 1:
            raise ParamsError(f"{prefix}: both weight_scale and weight_scale_inv are present; which one is meant?")
        return self.tensor(f"{prefix}.{found[0]}")

    # -- params ---------------------------------------------------------------------------------
    def _shard(self, prefix: str, config: ScaledMMConfig) -> dict[str, torch.Tensor | None]:
        w = self.tensor(f"{prefix}.weight")
        if w.dtype not in _8BIT:
            raise ParamsError(f"{prefix}.weight: expected float8/int8, got {w.dtype}")
        wzp = self._opt(f"{prefix}.weight_zero_point")
        if wzp is not None and bool((wzp != 0).any()):
            raise ParamsError(f"{prefix}.weight_zero_point: nonzero weight zero points (asymmetric weights) are not supported")
        return {
            "weight": w,
            "weight_scale": self._weight_scale(prefix).to(torch.float32),
            "input_scale": self._opt(f"{prefix}.input_scale"),
            "input_zero_point": self._opt(f"{prefix}.input_zero_point"),
        }

    def load_params(self, prefixes: str | Sequence[str]) -> tuple[Params, ScaledMMConfig]:
        """``(params, config)`` of one layer, or of the fused layer made of the shards ``prefixes``.

        A single layer's arrays share memory with the loaded tensors; a fused layer's are new.
        """
        single = isinstance(prefixes, str)
        names = [prefixes] if single else list(prefixes)
        if not names:
            raise InputError("prefixes: expected at least one layer prefix")
        configs = [self.config_for(p) for p in names]
        if any(c is None for c in configs):
            raise InputError(f"prefixes: {[p for p, c in zip(names, configs) if c is None]} are not quantized "
                             "in this checkpoint (ignored by its quantization_config)")
        config = configs[0]
        for p, c in zip(names[1:], configs[1:]):
            if c != config:
                raise ParamsError(f"{p}: fused shards must share one scheme; {names[0]} is {config.describe()}, "
                                  f"{p} is {c.describe()}")
        shards = [self._shard(p, config) for p in names]
        cls = FP8Params if isinstance(config, FP8ScaledMMConfig) else Int8Params
        if len(shards) == 1:
            sh = shards[0]
            values = {f: (None if v is None else to_jax(v, name=f"{names[0]}.{f}", copy=True)) for f, v in sh.items()}
            if cls is FP8Params:
                values.pop("input_zero_point")
            return cls(**values), config
        return _fuse(names, shards, config, cls)

    def load_linear(self, prefixes: str | Sequence[str], bias: torch.Tensor | None = None, *,
                    kernel: str | None = None, allow_input_copy: bool = False, device: Any = None) -> QuantLinear:
        """A processed :class:`QuantLinear` for layer ``prefixes`` (fused if several); ``bias`` from the model
        (or ``<prefix>.bias`` of the checkpoint when present). ``device`` moves the tensors first (one copy)."""
        params, config = self.load_params(prefixes)
        names = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        if bias is None:
            biases = [self._opt(f"{p}.bias") for p in names]
            if all(b is not None for b in biases):
                bias = torch.cat(biases) if len(biases) > 1 else biases[0]
        if device is not None and torch.device(device).type != "cpu":
            moved = {f: to_jax(to_torch(getattr(params, f)).to(device)) for f in params.array_fields()
                     if getattr(params, f) is not None}
            params = params.replace(**moved)
            bias = None if bias is None else bias.to(device)
        return QuantLinear.from_params(params, config, bias, kernel=kernel, allow_input_copy=allow_input_copy)


def _fuse(names: list[str], shards: list[dict[str, Any]], config: ScaledMMConfig, cls: type[Params]):
    ks = {int(s["weight"].shape[1]) for s in shards}
    if len(ks) != 1:
        raise ParamsError(f"{names}: fused shards must share in_features, got {sorted(ks)}")
    dtypes = {s["weight"].dtype for s in shards}
    if len(dtypes) != 1:
        raise ParamsError(f"{names}: fused shards must share a weight dtype, got {sorted(map(str, dtypes))}")
    widths = [int(s["weight"].shape[0]) for s in shards]
    g = config.weight_granularity
    ws = [to_jax(s["weight"], copy=True, name=f"{p}.weight") for p, s in zip(names, shards)]
    scales = [to_jax(s["weight_scale"], copy=True, name=f"{p}.weight_scale") for p, s in zip(names, shards)]
    if g == "per_channel":
        weight = jnp.concatenate(ws)
        scale = jnp.concatenate([s.reshape(-1) for s in scales])
    elif isinstance(g, tuple):
        bn = g[0]
        bad = [p for p, w in zip(names, widths) if w % bn]
        if bad:
            raise ParamsError(f"{bad}: block-scaled shards must have out_features divisible by the block ({bn}) to fuse")
        weight = jnp.concatenate(ws)
        scale = jnp.concatenate(scales, axis=0)
    elif isinstance(config, FP8ScaledMMConfig):
        # requantize every shard to the largest per-tensor scale
        flat = [s.reshape(()) for s in scales]
        smax = jnp.max(jnp.stack(flat))
        weight = jnp.concatenate([
            saturate_to_fp8(w.astype(jnp.float32) * s / smax, config.weight_dtype) for w, s in zip(ws, flat)
        ])
        scale = smax
    else:
        # int8 per-tensor shards: keep the values, expand the scales to one per output channel
        weight = jnp.concatenate(ws)
        scale = jnp.concatenate([jnp.full((w,), s.reshape(()), jnp.float32) for w, s in zip(widths, scales)])
        config = dataclasses.replace(config, weight_granularity="per_channel")
    values: dict[str, Any] = {"weight": weight, "weight_scale": scale}
    in_scales = [s["input_scale"] for s in shards]
    if config.is_static:
        missing = [p for p, s in zip(names, in_scales) if s is None]
        if missing:
            raise ParamsError(f"{missing}: static activations need input_scale on every shard")
        iscale = np.array([float(s.reshape(-1)[0]) for s in in_scales], np.float64)
        zps = [s["input_zero_point"] for s in shards]
        if isinstance(config, Int8ScaledMMConfig) and not config.symmetric:
            if any(z is None for z in zps):
                raise ParamsError(f"{names}: asymmetric static int8 needs input_zero_point on every shard")
            zp = np.array([int(z.reshape(-1)[0]) for z in zps], np.float64)
            # the union of the shards' representable ranges [s * (qmin - zp), s * (qmax - zp)]
            hi = float(np.max(iscale * (INT8_QMAX - zp)))
            lo = float(np.min(iscale * (INT8_QMIN - zp)))
            s_new = (hi - lo) / (INT8_QMAX - INT8_QMIN)
            values["input_scale"] = jnp.asarray(s_new, jnp.float32)
            values["input_zero_point"] = jnp.asarray(np.clip(np.round(INT8_QMIN - lo / s_new), INT8_QMIN, INT8_QMAX),
                                                     jnp.int32)
        else:
            values["input_scale"] = jnp.asarray(iscale.max(), jnp.float32)
    return cls(**values), config


def load_quantized_linears(model: nn.Module, ckpt: QuantCheckpoint, *, prefix: str = "",
                           fused: dict[str, Sequence[str]] | None = None, kernel: str | None = None,
                           allow_input_copy: bool = False) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` that the checkpoint quantizes for a loaded :class:`QuantLinear`.

    A module named ``...<fused name>`` (default :data:`DEFAULT_FUSED`, e.g. ``qkv_proj``) is
    loaded from its shards ``...q_proj``, ``...k_proj``, ``...v_proj``. The module's own bias is
    kept. ``prefix`` is prepended to module names to get checkpoint names. Returns the names swapped.
    """
    fused = DEFAULT_FUSED if fused is None else fused
    layers = set(ckpt.layers())
    swapped = []
    for fqn, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        name = prefix + fqn
        parent, _, child = name.rpartition(".")
        if name in layers:
            shards: str | list[str] = name
        elif child in fused and all(f"{parent}.{s}".lstrip(".") in layers for s in fused[child]):
            shards = [f"{parent}.{s}".lstrip(".") for s in fused[child]]
        else:
            continue
        if ckpt.config_for(shards if isinstance(shards, str) else shards[0]) is None:
            continue
        bias = None if mod.bias is None else mod.bias.detach()
        device = mod.weight.device if mod.weight.device.type != "meta" else None  # meta: built empty, load on cpu
        if bias is not None and bias.device.type == "meta":
            bias = None
        q = ckpt.load_linear(shards, bias, kernel=kernel, allow_input_copy=allow_input_copy, device=device)
        if (q.out_features, q.in_features) != (mod.out_features, mod.in_features):
            raise ParamsError(f"{fqn}: checkpoint layer is {q.out_features}x{q.in_features}, the model's "
                              f"{mod.out_features}x{mod.in_features}")
        mparent, _, mchild = fqn.rpartition(".")
        setattr(model.get_submodule(mparent) if mparent else model, mchild, q)
        swapped.append(fqn)
    return swapped
