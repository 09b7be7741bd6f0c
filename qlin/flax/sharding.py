"""Tensor-parallel quantized linears on a ``jax.sharding.Mesh`` (Megatron-style), via ``jax.shard_map``.

Weights are ``(N, K)``. On a mesh axis ``axis`` of size ``tp``:

* **column-parallel**: the weight is split along N. ``weight`` ``P(axis, None)``,
  per-channel ``weight_scale`` ``P(axis)`` (scales follow N), block scales
  ``P(axis, None)``, ``azp_adj`` and ``bias`` ``P(axis)``; per-tensor scales and static
  activation constants are replicated. x is replicated, so every shard computes the
  same activation scales as one device would; the output is split along its last dim.
* **row-parallel**: the weight is split along K; x arrives split along its last
  dim (the output of a column-parallel layer). Each shard runs the kernel on its K
  slice with an f32 output and no bias; partial results are summed (``psum``) after
  that scale epilogue, then the bias is added once and the sum cast to ``out_dtype``.
  That sum equals the unsharded layer only if every shard uses the activation scale
  (and zero point) of the FULL row: a per-token scale computed from a K shard
  differs per shard. So for dynamic per-token / per-tensor activations each shard
  reduces its min and max over the mesh axis (``pmin``/``pmax``, M floats) and
  appends them as extra activation columns facing zero weight columns (``pad``
  columns per shard, :func:`default_pad` keeps K's alignment): the selected kernel then
  derives exactly the global scale (and zero point) from its own quantization code,
  while those columns add exactly 0 to the dot product. Asymmetric int8 uses
  per-shard ``azp_adj`` (column sums over the shard's K slice), which add up to the
  full one. Per-group activations need ``K/tp`` to be a multiple of ``group_size``
  (groups never straddle shards) and static ones need nothing.

:class:`TPMLP` is the Megatron MLP block: gate and up column-parallel, SwiGLU,
down row-parallel -- one ``psum`` (plus the scale ``pmin``/``pmax``) per block.

Processing: :func:`shard_column_parallel` / :func:`shard_row_parallel` (and so
``TPMLP``) run the kernel's ``process_weights_after_loading`` once per shard, when
they place the weights (e.g. ``mosaic_gpu`` pads each shard's N / K to its alignment;
the global arrays are the shards' padded blocks side by side). The parallel linears
then hand each shard's params to the kernel without padding or slicing the weight
(processing is idempotent); params placed some other way are processed per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qlin.api import kernel_for, params_for_kernel
from qlin.config import ScaledMMConfig
from qlin.errors import ConfigError, InputError
from qlin.params import Int8Params, Params
from qlin.quantize import activation_granularity, compute_azp_adj, quantize_weight
from qlin.validate import normalize_params

MAX_PAD_ALIGN = 128


def default_pad(k_local: int) -> int:
    """Statistic columns appended per row-parallel shard: as many as keep ``K/tp``'s alignment (up to 128).

    8-bit GEMM kernels want K in multiples of 16-128 (Mosaic GPU: 32, and 128 for its
    fastest swizzle); a pad of that alignment keeps ``K/tp + pad`` as aligned as ``K/tp``
    so no kernel re-pads the weight. Costs ``pad / (K/tp)`` extra work on that layer
    (128 / 1792 = 7% for I=14336 on 8 devices).
    """
    align = 1
    while align < MAX_PAD_ALIGN and k_local % (2 * align) == 0:
        align *= 2
    return max(align, 2)


def _tp(mesh: Mesh, axis: str) -> int:
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise InputError(f"axis: {axis!r} is not an axis of the mesh (axes {tuple(mesh.shape)})")
    return int(mesh.shape[axis])


def _put(a, mesh, spec):
    return None if a is None else jax.device_put(a, NamedSharding(mesh, spec))


def _local_abstract(tree, specs, mesh: Mesh):
    """Abstract per-shard values of a placed ``tree`` whose leaves are split by ``specs``."""
    def local(a, spec):
        if a is None:
            return None
        shape = list(np.shape(a))
        for i, name in enumerate(tuple(spec or ())):
            for n in (name if isinstance(name, tuple) else (name,)):
                if n is not None:
                    shape[i] //= int(mesh.shape[n])
        return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(a))

    return jax.tree.map(local, tree, specs, is_leaf=lambda v: v is None)


def _process_placed(fn, placed, specs_of, mesh: Mesh):
    """``fn`` (one shard's processing) run once on every shard of ``placed``; the result keeps its placement.

    ``specs_of(tree)``: the PartitionSpecs tree of a params tree (built from the tree itself, so
    a kernel's static metadata -- the logical N / K of a padded shard -- carries over).
    """
    in_specs = specs_of(placed)
    out_local = jax.eval_shape(fn, _local_abstract(placed, in_specs, mesh))
    out_specs = specs_of(out_local)
    run = jax.shard_map(fn, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs, check_vma=False)
    return jax.jit(run)(placed)


# -- column-parallel ------------------------------------------------------------------------

def column_specs(params: Params, config: ScaledMMConfig, axis: str) -> Params:
    """PartitionSpecs (as a Params pytree) of a column-parallel layer's params."""
    g = config.weight_granularity
    scale_spec = P() if g == "per_tensor" else (P(axis) if g == "per_channel" else P(axis, None))
    specs = {"weight": P(axis, None), "weight_scale": scale_spec}
    for name in params.array_fields():
        if name not in specs:
            specs[name] = None if getattr(params, name) is None else (P(axis) if name == "azp_adj" else P())
    return params.replace(**specs)


def shard_column_parallel(params: Params, config: ScaledMMConfig, mesh: Mesh, axis: str = "tp", bias=None,
                          *, kernel: str | None = None):
    """Canonical params (and bias) placed for column parallelism and processed once per shard for the
    kernel (``kernel`` by name, default ``qlin.kernel_for(config)``); returns ``(params, bias)``."""
    tp = _tp(mesh, axis)
    params = normalize_params(params, config)
    n, k = params.weight.shape
    if n % tp:
        raise InputError(f"column-parallel: out_features N={n} must be divisible by the mesh axis {axis!r} size {tp}")
    block = config.weight_block
    if block is not None and (n // tp) % block[0]:
        raise InputError(f"column-parallel: N/tp={n // tp} must be a multiple of the weight block's bn={block[0]}")
    specs = column_specs(params, config, axis)
    if bias is not None and tuple(np.shape(bias)) != (n,):
        raise InputError(f"bias: expected shape ({n},), got {tuple(np.shape(bias))}")
    placed = jax.tree.map(lambda a, s: _put(a, mesh, s), params, specs, is_leaf=lambda v: v is None)
    k = kernel_for(config, override=kernel)
    placed = _process_placed(lambda p: params_for_kernel(k, p), placed, lambda t: column_specs(t, config, axis), mesh)
    return placed, _put(bias, mesh, P(axis))


def _column_local(x, params: Params, bias, config, kernel):
    k = kernel_for(config, override=kernel)
    return k.apply_weights(params_for_kernel(k, params), x, bias)


def column_parallel_linear(x, params: Params, config: ScaledMMConfig, mesh: Mesh, axis: str = "tp", bias=None,
                           *, kernel: str | None = None):
    """``x @ W^T + b`` with W split along N; x ``[..., K]`` replicated, result ``[..., N]`` split on its last dim."""
    x = jnp.asarray(x)
    specs = column_specs(params, config, axis)
    out_spec = P(*([None] * (x.ndim - 1)), axis)
    fn = jax.shard_map(lambda x, p, b: _column_local(x, p, b, config, kernel), mesh=mesh,
                       in_specs=(P(), specs, None if bias is None else P(axis)), out_specs=out_spec, check_vma=False)
    return fn(x, params, bias)


# -- row-parallel ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowParallelParams:
    """A row-parallel layer's params in their sharded layout (a pytree).

    ``params.weight`` is ``(N, tp * (K/tp + pad))``: each shard's K slice followed
    by ``pad`` zero columns (see the module doc); block weight scales get one
    extra block column of ones per shard. ``azp_adj`` is ``(tp, N)``: per-shard
    column sums. ``in_features`` is the logical K.
    """

    params: Params
    azp_adj: jax.Array | None
    pad: int
    tp: int
    in_features: int


jax.tree_util.register_pytree_node(
    RowParallelParams,
    lambda r: ((r.params, r.azp_adj), (r.pad, r.tp, r.in_features)),
    lambda aux, ch: RowParallelParams(ch[0], ch[1], *aux),
)


def _needs_stats(config: ScaledMMConfig) -> bool:
    return activation_granularity(config) in ("per_token", "per_tensor") and not config.is_static


def shard_row_parallel(params: Params, config: ScaledMMConfig, mesh: Mesh, axis: str = "tp", bias=None,
                       *, pad: int | None = None, kernel: str | None = None):
    """Canonical params re-laid out, placed for row parallelism and processed once per shard for the
    kernel (``kernel`` by name, default ``qlin.kernel_for`` of the config with an f32 output);
    returns ``(RowParallelParams, bias)``.

    ``pad`` zero columns per shard carry the global activation statistics
    (default :func:`default_pad` when the activation scale is dynamic per token/tensor, else 0).
    """
    tp = _tp(mesh, axis)
    params = normalize_params(params, config)
    n, k = params.weight.shape
    if k % tp:
        raise InputError(f"row-parallel: in_features K={k} must be divisible by the mesh axis {axis!r} size {tp}")
    kl = k // tp
    block = config.weight_block
    if block is not None and kl % block[1]:
        raise InputError(f"row-parallel: K/tp={kl} must be a multiple of the weight block's bk={block[1]}")
    if activation_granularity(config) == "per_group" and kl % config.group_size:
        raise InputError(f"row-parallel: K/tp={kl} must be a multiple of group_size={config.group_size} "
                         "so that activation groups do not straddle shards")
    if pad is None:
        pad = default_pad(kl) if _needs_stats(config) else 0
    if _needs_stats(config) and pad < 2:
        raise InputError(f"pad: dynamic {config.activation} row-parallel layers need pad >= 2, got {pad}")
    if block is not None and pad % block[1]:
        pad = -(-pad // block[1]) * block[1]  # whole weight blocks of zeros
    w = params.weight.reshape(n, tp, kl)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, pad))).reshape(n, tp * (kl + pad))
    changes: dict[str, Any] = {"weight": w}
    specs: dict[str, Any] = {"weight": P(None, axis)}
    g = config.weight_granularity
    if block is not None:
        gn, gk = params.weight_scale.shape
        s = params.weight_scale.reshape(gn, tp, gk // tp)
        s = jnp.pad(s, ((0, 0), (0, 0), (0, pad // block[1])), constant_values=1.0)
        changes["weight_scale"] = s.reshape(gn, -1)
        specs["weight_scale"] = P(None, axis)
    else:
        specs["weight_scale"] = P() if g == "per_tensor" else P(None)
    azp = None
    if isinstance(params, Int8Params) and params.azp_adj is not None:
        azp = jnp.stack([compute_azp_adj(params.weight[:, i * kl:(i + 1) * kl]) for i in range(tp)])
        changes["azp_adj"] = None
    local = params.replace(**changes)
    for name in local.array_fields():
        specs.setdefault(name, None if getattr(local, name) is None else P())
    placed = jax.tree.map(lambda a, s: _put(a, mesh, s), local, local.replace(**specs), is_leaf=lambda v: v is None)
    if bias is not None and tuple(np.shape(bias)) != (n,):
        raise InputError(f"bias: expected shape ({n},), got {tuple(np.shape(bias))}")
    rp = RowParallelParams(placed, _put(azp, mesh, P(axis, None)), int(pad), tp, k)
    kern = kernel_for(dataclasses.replace(config, out_dtype=jnp.float32), override=kernel)
    rp = _process_placed(lambda r: _row_process(kern, r), rp, lambda t: _row_specs(t, config, axis), mesh)
    return rp, _put(bias, mesh, P())


def _row_shard_params(rp: RowParallelParams) -> Params:
    """One shard's kernel params (its ``azp_adj`` row folded in)."""
    params = rp.params
    if rp.azp_adj is not None:
        params = params.replace(azp_adj=rp.azp_adj.reshape(-1))
    return params


def _row_process(kern, rp: RowParallelParams) -> RowParallelParams:
    out = params_for_kernel(kern, _row_shard_params(rp))
    if rp.azp_adj is None:
        return RowParallelParams(out, None, rp.pad, rp.tp, rp.in_features)
    return RowParallelParams(out.replace(azp_adj=None), out.azp_adj.reshape(1, -1), rp.pad, rp.tp, rp.in_features)


def _row_specs(rp: RowParallelParams, config, axis):
    g = config.weight_granularity
    specs = {"weight": P(None, axis),
             "weight_scale": P(None, axis) if config.weight_block else (P() if g == "per_tensor" else P(None))}
    p = rp.params
    for name in p.array_fields():
        specs.setdefault(name, None if getattr(p, name) is None else P())
    return RowParallelParams(p.replace(**specs), None if rp.azp_adj is None else P(axis, None), rp.pad, rp.tp,
                             rp.in_features)


def _row_local(x, rp: RowParallelParams, config: ScaledMMConfig, axis: str, kernel):
    """One shard's f32 partial ``x_shard @ W_shard^T`` with globally consistent activation scales."""
    params = _row_shard_params(rp)
    if rp.pad:
        xf = x.astype(jnp.float32)
        if activation_granularity(config) == "per_token":
            lo, hi = jnp.min(xf, axis=-1, keepdims=True), jnp.max(xf, axis=-1, keepdims=True)
        else:
            lo = jnp.broadcast_to(jnp.min(xf), (*x.shape[:-1], 1))
            hi = jnp.broadcast_to(jnp.max(xf), (*x.shape[:-1], 1))
        lo, hi = jax.lax.pmin(lo, axis), jax.lax.pmax(hi, axis)
        fill = jnp.concatenate([lo, jnp.broadcast_to(hi, (*x.shape[:-1], rp.pad - 1))], axis=-1)
        x = jnp.concatenate([x, fill.astype(x.dtype)], axis=-1)
    cfg32 = dataclasses.replace(config, out_dtype=jnp.float32)
    k = kernel_for(cfg32, override=kernel)
    return k.apply_weights(params_for_kernel(k, params), x, None)


def _row_finish(partial, bias, config, axis):
    y = jax.lax.psum(partial, axis)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(config.out_dtype)


def row_parallel_linear(x, rp: RowParallelParams, config: ScaledMMConfig, mesh: Mesh, axis: str = "tp", bias=None,
                        *, kernel: str | None = None):
    """``x @ W^T + b`` with W split along K; x ``[..., K]`` split on its last dim; result replicated."""
    x = jnp.asarray(x)
    if x.shape[-1] != rp.in_features:
        raise InputError(f"x: last dimension must equal K={rp.in_features}, got shape {tuple(x.shape)}")
    x_spec = P(*([None] * (x.ndim - 1)), axis)
    fn = jax.shard_map(lambda x, r, b: _row_finish(_row_local(x, r, config, axis, kernel), b, config, axis),
                       mesh=mesh, in_specs=(x_spec, _row_specs(rp, config, axis), None if bias is None else P()),
                       out_specs=P(), check_vma=False)
    return fn(x, rp, bias)


# -- the Megatron MLP block -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TPMLP:
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))``: gate/up column-parallel, down row-parallel, on ``mesh[axis]``.

    >>> mlp = TPMLP.from_float(w_gate, w_up, w_down, FP8ScaledMMConfig(), mesh)   # weights (N, K)
    >>> y = jax.jit(mlp.__call__)(x)                                              # x [..., H] -> [..., H]
    """

    gate: Params
    up: Params
    down: RowParallelParams
    down_bias: jax.Array | None
    gate_bias: jax.Array | None
    up_bias: jax.Array | None
    config: ScaledMMConfig = dataclasses.field(metadata={"static": True})
    mesh: Mesh = dataclasses.field(metadata={"static": True})
    axis: str = dataclasses.field(default="tp", metadata={"static": True})
    kernel: str | None = dataclasses.field(default=None, metadata={"static": True})

    @classmethod
    def from_params(cls, gate: Params, up: Params, down: Params, config: ScaledMMConfig, mesh: Mesh,
                    axis: str = "tp", *, down_bias=None, gate_bias=None, up_bias=None,
                    kernel: str | None = None, row_pad: int | None = None) -> "TPMLP":
        """From unsharded canonical params: gate/up ``(I, H)``, down ``(H, I)``; optional float biases."""
        gate = normalize_params(gate, config)
        up = normalize_params(up, config)
        down = normalize_params(down, config)
        (i1, h1), (i2, h2), (h3, i3) = gate.weight.shape, up.weight.shape, down.weight.shape
        if not (i1 == i2 == i3 and h1 == h2 == h3):
            raise InputError(f"TPMLP: incompatible shapes gate {gate.weight.shape}, up {up.weight.shape}, "
                             f"down {down.weight.shape}; expected (I, H), (I, H), (H, I)")
        g, gb = shard_column_parallel(gate, config, mesh, axis, gate_bias, kernel=kernel)
        u, ub = shard_column_parallel(up, config, mesh, axis, up_bias, kernel=kernel)
        d, b = shard_row_parallel(down, config, mesh, axis, down_bias, pad=row_pad, kernel=kernel)
        return cls(g, u, d, b, gb, ub, config, mesh, axis, kernel)

    @classmethod
    def from_qlinears(cls, gate, up, down, mesh: Mesh, axis: str = "tp", *, kernel: str | None = None) -> "TPMLP":
        """From three (unstacked) :class:`~qlin.flax.QLinear` layers sharing one config, e.g. a converted model's MLP."""
        cfgs = {gate.config, up.config, down.config}
        if len(cfgs) != 1:
            raise ConfigError(f"TPMLP.from_qlinears: the layers must share one config, got {sorted(map(str, cfgs))}")
        bias = lambda q: q.bias.get_value() if q.use_bias else None  # noqa: E731
        return cls.from_params(gate.qparams(), up.qparams(), down.qparams(), gate.config, mesh, axis,
                               down_bias=bias(down), gate_bias=bias(gate), up_bias=bias(up),
                               kernel=kernel or gate.kernel_name)

    @classmethod
    def from_float(cls, w_gate, w_up, w_down, config: ScaledMMConfig, mesh: Mesh, axis: str = "tp",
                   **kw) -> "TPMLP":
        """Quantize float weights (torch layout ``(N, K)``) with ``qlin.quantize_weight`` and shard them."""
        if config.is_static:
            raise ConfigError("TPMLP.from_float: static activation configs need calibrated params; use from_params")
        q = [quantize_weight(w, config) for w in (w_gate, w_up, w_down)]
        return cls.from_params(*q, config, mesh, axis, **kw)

    def __call__(self, x):
        x = jnp.asarray(x)
        cfg, axis, kernel = self.config, self.axis, self.kernel

        def body(x, gate, up, down, bias, gate_bias, up_bias):
            h = jax.nn.silu(_column_local(x, gate, gate_bias, cfg, kernel)) * _column_local(x, up, up_bias, cfg, kernel)
            return _row_finish(_row_local(h.astype(cfg.out_dtype), down, cfg, axis, kernel), bias, cfg, axis)

        opt = lambda b, spec: None if b is None else spec  # noqa: E731
        fn = jax.shard_map(
            body, mesh=self.mesh,
            in_specs=(P(), column_specs(self.gate, cfg, axis), column_specs(self.up, cfg, axis),
                      _row_specs(self.down, cfg, axis), opt(self.down_bias, P()), opt(self.gate_bias, P(axis)),
                      opt(self.up_bias, P(axis))),
            out_specs=P(), check_vma=False)
        return fn(x, self.gate, self.up, self.down, self.down_bias, self.gate_bias, self.up_bias)


jax.tree_util.register_dataclass(TPMLP, data_fields=["gate", "up", "down", "down_bias", "gate_bias", "up_bias"],
                                 meta_fields=["config", "mesh", "axis", "kernel"])


# -- placing nnx QLinear variables for jax.jit's own partitioner --------------------------------

def qlinear_partition_specs(layer, mode: str, axis: str = "tp") -> dict[str, P]:
    """``{variable name: PartitionSpec}`` of a :class:`~qlin.flax.QLinear` split ``"column"``- or ``"row"``-wise.

    Column: weight ``P(axis, None)``, per-channel scales / ``azp_adj`` / bias ``P(axis)``.
    Row: weight ``P(None, axis)``, block scales ``P(None, axis)``, everything else replicated.
    Stacked layers keep their leading axes unsplit.
    """
    if mode not in ("column", "row"):
        raise InputError(f"mode: expected 'column' or 'row', got {mode!r}")
    cfg = layer.config
    g = cfg.weight_granularity
    lead = (None,) * len(layer.stack_shape)
    specs = {}
    for name in layer.arrays():
        if name == "weight":
            s = (axis, None) if mode == "column" else (None, axis)
        elif name == "weight_scale":
            if g == "per_tensor":
                s = ()
            elif g == "per_channel":
                s = (axis,) if mode == "column" else (None,)
            else:
                s = (axis, None) if mode == "column" else (None, axis)
        elif name in ("azp_adj", "bias"):
            s = (axis,) if mode == "column" else (None,)
        else:
            s = ()
        specs[name] = P(*lead, *s)
    return specs


def shard_qlinear(layer, mesh: Mesh, mode: str, axis: str = "tp"):
    """Place a QLinear's variables on ``mesh`` (in place) for ``jax.jit``'s SPMD partitioner; returns the layer.

    Under ``jax.jit`` XLA then partitions the XLA kernel's quantize + 8-bit dot +
    epilogue itself, inserting the reductions that keep row-parallel activation
    scales global. A Pallas kernel cannot be partitioned that way (XLA would
    gather its operands): use :func:`column_parallel_linear` /
    :func:`row_parallel_linear` / :class:`TPMLP` (``shard_map``) for those.
    """
    tp = _tp(mesh, axis)
    n, k = layer.out_features, layer.in_features
    dim = n if mode == "column" else k
    stored = int(np.shape(layer.weight.get_value())[-2 if mode == "column" else -1])
    if stored != dim and stored % tp:
        raise InputError(f"{mode}-parallel: the weight is padded to {stored} for kernel {layer.processed_for!r}, "
                         f"not divisible by the mesh axis {axis!r} size {tp}; use the xla kernel "
                         "(layer.process('xla')) or the shard_map linears")
    if dim % tp:
        raise InputError(f"{mode}-parallel: {'N' if mode == 'column' else 'K'}={dim} must be divisible by the "
                         f"mesh axis {axis!r} size {tp}")
    for name, spec in qlinear_partition_specs(layer, mode, axis).items():
        var = getattr(layer, name)
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
    return layer
