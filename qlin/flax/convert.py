"""Post-training quantization of trained Flax models, selected by a rule list, with calibration.

Rules are tried in order; the first whose ``pattern`` ``re.fullmatch``-es a layer's
path decides it (like qwix's rules). ``config=None`` keeps the layer float; a layer
no rule matches stays float too. A rule that matches no layer is almost always a
typo: it warns (:class:`RuleWarning`), or raises with ``strict=True``.

Paths are the module path joined by "/": nnx ``"blocks/0/mlp/up"`` (attribute
names and list indices), linen ``"Block_0/Dense_1"`` (the params tree keys).

Static activation configs need an ``input_scale`` per layer, measured on sample
batches (``calibration_data``) by the rule's ``calibration`` method:

* ``"absmax"``: ``qlin.calibrate_static`` of every input the layer saw;
* ``"percentile"``: the same on inputs clipped to the ``percentile``-th percentile
  of ``|x|`` (asymmetric int8: to the ``[100-p, p]`` percentiles of x), which
  ignores rare outliers.

Dynamic configs need no data. Stacked layers (an ``nnx.vmap``-built stack run by
``nnx.scan``) get one scale per layer: each recorded input is matched to its layer
by the weights the call used.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, MMLinearLayerConfig
from qlin.errors import ConfigError, InputError
from qlin.quantize import calibrate_static, quantize_weight
from qlin.flax._common import BIAS

CALIBRATIONS = ("absmax", "percentile")


class RuleWarning(UserWarning):
    """A quantization rule matched no layer."""


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` (regex, full match on the layer path) -> ``config`` (None: keep the layer float).

    ``calibration`` / ``percentile`` choose how static input scales are measured;
    ``kernel`` forces a kernel by name for the matched layers.
    """

    pattern: str
    config: MMLinearLayerConfig | None
    calibration: Literal["absmax", "percentile"] = "absmax"
    percentile: float = 99.99
    kernel: str | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"pattern: {self.pattern!r} is not a valid regex ({e})") from None
        if self.config is not None and not isinstance(self.config, (FP8ScaledMMConfig, Int8ScaledMMConfig)):
            raise ConfigError(f"config: expected an FP8ScaledMMConfig, Int8ScaledMMConfig or None, got {self.config!r}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration: expected one of {CALIBRATIONS}, got {self.calibration!r}")
        if not (0.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"percentile: expected 0 < percentile <= 100, got {self.percentile!r}")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


def _as_rules(rules) -> tuple[QuantRule, ...]:
    if isinstance(rules, QuantRule):
        rules = (rules,)
    out = []
    for r in rules:
        if isinstance(r, QuantRule):
            out.append(r)
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            out.append(QuantRule(r[0], r[1]))
        else:
            raise ConfigError(f"rules: expected QuantRule or (pattern, config) pairs, got {r!r}")
    if not out:
        raise ConfigError("rules: expected at least one rule")
    return tuple(out)


def resolve_rules(paths: Sequence[str], rules, *, strict: bool = False) -> dict[str, QuantRule | None]:
    """``{path: first matching rule or None}``; warns (or raises if ``strict``) for rules matching nothing."""
    rules = _as_rules(rules)
    chosen: dict[str, QuantRule | None] = {}
    used = [False] * len(rules)
    for path in paths:
        chosen[path] = None
        for i, rule in enumerate(rules):
            if rule.matches(path):
                chosen[path] = rule
                used[i] = True
                break
    unused = [r.pattern for r, u in zip(rules, used) if not u]
    if unused:
        shown = ", ".join(list(paths)[:20]) + (" ..." if len(paths) > 20 else "")
        msg = (f"quantization rule(s) {unused} matched no layer (patterns are re.fullmatch-ed, first match wins, "
               f"so an earlier rule may shadow them); layer paths are: {shown or '(no linear layers found)'}")
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, RuleWarning, stacklevel=3)
    return chosen


# -- weights ------------------------------------------------------------------------------

def quantize_kernel(kernel, config, *, bias=None, input_scale=None, input_zero_point=None) -> dict[str, jax.Array]:
    """Quantize a flax kernel ``(*stack, K, N)`` into QLinear/QDense variables (``(*stack, N, K)`` weight).

    Leading ``stack`` axes (scanned layers) are quantized layer by layer with
    ``qlin.quantize_weight``; ``input_scale`` / ``input_zero_point`` then carry the
    same leading axes (or are scalars shared by every layer).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise InputError(f"kernel: expected a flax kernel of shape (..., K, N), got {tuple(kernel.shape)}")
    *stack, k, n = kernel.shape
    count = int(np.prod(stack)) if stack else 1
    if bias is not None and tuple(np.shape(bias)) != (*stack, n):
        raise InputError(f"bias: expected shape {(*stack, n)} for a kernel of shape {tuple(kernel.shape)}, "
                         f"got {tuple(np.shape(bias))}")

    def per_layer(a, name):
        if a is None:
            return [None] * count
        a = jnp.asarray(a)
        if a.size == 1:
            return [a.reshape(())] * count
        if tuple(a.shape) != tuple(stack):
            raise InputError(f"{name}: expected a scalar or shape {tuple(stack)} (one per stacked layer), got {a.shape}")
        return list(a.reshape(count))

    scales, zps = per_layer(input_scale, "input_scale"), per_layer(input_zero_point, "input_zero_point")
    flat = kernel.reshape(count, k, n)
    layers = []
    for i in range(count):
        p = quantize_weight(flat[i].T, config, scales[i], zps[i])
        layers.append(p.to_mapping())
    out = {name: jnp.stack([m[name] for m in layers]).reshape(*stack, *layers[0][name].shape) for name in layers[0]}
    if bias is not None:
        out[BIAS] = jnp.asarray(bias)
    return out


# -- calibration --------------------------------------------------------------------------

def calibrate_scale(samples, config, *, method: str = "absmax", percentile: float = 99.99, where: str = "x"):
    """Static ``(input_scale, input_zero_point or None)`` for ``config`` from sample activations.

    ``samples``: an array or a list of arrays (any shapes; every element counts).
    """
    if method not in CALIBRATIONS:
        raise ConfigError(f"method: expected one of {CALIBRATIONS}, got {method!r}")
    if not (0.0 < float(percentile) <= 100.0):
        raise ConfigError(f"percentile: expected 0 < percentile <= 100, got {percentile!r}")
    if isinstance(samples, (list, tuple)):
        if not samples:
            raise InputError(f"{where}: no calibration samples")
        x = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in samples])
    else:
        x = np.asarray(samples, np.float32).reshape(-1)
    if x.size == 0:
        raise InputError(f"{where}: calibration samples are empty")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{where}: calibration data contains NaN/inf values; clean the sample batches")
    if method == "percentile" and percentile < 100:
        symmetric = not (isinstance(config, Int8ScaledMMConfig) and not config.symmetric)
        if symmetric:
            a = np.percentile(np.abs(x), percentile)
            x = np.clip(x, -a, a)
        else:
            lo, hi = np.percentile(x, [100.0 - percentile, percentile])
            x = np.clip(x, lo, hi)
    return calibrate_static(jnp.asarray(x), config)


def _select_layers(layers, rules, strict, calibration_data):
    """Match ``rules`` to layer paths: ``(chosen, selected, static)``; static configs need calibration data."""
    chosen = resolve_rules(list(layers), rules, strict=strict)
    selected = {p: r for p, r in chosen.items() if r is not None and r.config is not None}
    static = {p: r for p, r in selected.items() if r.config.is_static}
    if static and calibration_data is None:
        raise InputError(f"calibration_data: layers {sorted(static)} have static activation configs and need "
                         "sample batches (or use a dynamic activation config)")
    return chosen, selected, static


class _Samples:
    """Inputs recorded per layer path, each with the fingerprint of the weights that saw it."""

    def __init__(self):
        self.data: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def record(self, path: str, x, fingerprint) -> None:
        self.data.setdefault(path, []).append((np.asarray(x, np.float32), np.asarray(fingerprint)))

    def scales(self, path: str, rule: QuantRule, config, kernel) -> tuple[Any, Any]:
        """Per-layer static scale(s) for a layer whose float kernel is ``kernel`` ``(*stack, K, N)``."""
        recs = self.data.get(path, [])
        if not recs:
            raise InputError(f"{path}: static calibration saw no input for this layer; check calibration_data "
                             "and that the forward function calls it")
        stack = tuple(np.shape(kernel)[:-2])
        if not stack:
            return calibrate_scale([x for x, _ in recs], config, method=rule.calibration,
                                   percentile=rule.percentile, where=path)
        prints = np.asarray(kernel).reshape(-1, *np.shape(kernel)[-2:])[:, 0, :]
        groups: list[list[np.ndarray]] = [[] for _ in range(prints.shape[0])]
        for x, fp in recs:
            hits = [i for i in range(prints.shape[0]) if np.array_equal(prints[i], fp)]
            if len(hits) != 1:
                raise InputError(f"{path}: cannot tell which stacked layer a calibration input belongs to "
                                 f"({len(hits)} layers have identical weights)")
            groups[hits[0]].append(x)
        out = []
        for i, g in enumerate(groups):
            if not g:
                raise InputError(f"{path}[{i}]: static calibration saw no input for stacked layer {i}")
            out.append(calibrate_scale(g, config, method=rule.calibration, percentile=rule.percentile,
                                       where=f"{path}[{i}]"))
        s = jnp.stack([a for a, _ in out]).reshape(stack)
        zp = None if out[0][1] is None else jnp.stack([b for _, b in out]).reshape(stack)
        return s, zp


def _record(samples: _Samples, path: str, x, kernel, rule: QuantRule) -> None:
    """Send what calibration needs to the host: every value for percentiles, else just (min, max).

    ``calibrate_static`` (absmax, or min/max for asymmetric int8) depends only on the
    extremes, so ``[min, max]`` per call gives exactly the scale of all inputs (NaN/inf
    propagate into the extremes and are still caught).
    """
    if rule.calibration != "percentile" or rule.percentile >= 100:
        xf = jnp.asarray(x, jnp.float32)
        x = jnp.stack([jnp.min(xf), jnp.max(xf)])
    fingerprint = kernel[0] if kernel.ndim == 2 else kernel.reshape(-1)[:1]
    jax.debug.callback(lambda a, f: samples.record(path, a, f), x, fingerprint)


# -- nnx ----------------------------------------------------------------------------------

def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _get(model, path):
    node = model
    for key in path:
        node = _child(node, key)
    return node


def _nnx_linears(model) -> dict[str, tuple[tuple, Any]]:
    from flax import nnx

    return {_path_str(p): (tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear) and p}


def quantize_nnx(model, rules, *, calibration_data: Iterable | None = None, forward: Callable | None = None,
                 strict: bool = False) -> dict[str, MMLinearLayerConfig | None]:
    """Replace the ``nnx.Linear`` layers the ``rules`` select by :class:`~qlin.flax.QLinear`, in place.

    Args:
      model: an nnx module (the root itself cannot be replaced: wrap a bare Linear).
      rules: ``QuantRule``s or ``(pattern, config)`` pairs, tried in order.
      calibration_data: sample batches, needed iff a selected config is static.
      forward: ``forward(model, batch)`` runs one batch (default ``model(batch)``);
        it may use ``jax.jit`` / ``nnx.jit`` / ``nnx.scan`` inside.
      strict: a rule matching no layer raises instead of warning.

    Returns ``{path: config or None}`` for every Linear (None: left float). For a
    converted copy instead, convert ``nnx.clone(model)``.
    """
    from qlin.flax.nnx import QLinear

    linears = _nnx_linears(model)
    chosen, selected, static = _select_layers(linears, rules, strict, calibration_data)

    samples = _Samples()
    if static:
        run = forward or (lambda m, b: m(b))
        recorders = {}
        try:
            for path in static:
                key_path, lin = linears[path]
                rec = _Recorder(lin, path, samples, static[path])
                _set_child(_get(model, key_path[:-1]), key_path[-1], rec)
                recorders[path] = rec
            n_batches = 0
            for batch in calibration_data:
                jax.block_until_ready(run(model, batch))
                n_batches += 1
            jax.effects_barrier()
        finally:
            for path, rec in recorders.items():
                key_path, lin = linears[path]
                _set_child(_get(model, key_path[:-1]), key_path[-1], lin)
        if n_batches == 0:
            raise InputError("calibration_data: no batches")

    report: dict[str, MMLinearLayerConfig | None] = {}
    for path, (key_path, lin) in linears.items():
        rule = selected.get(path)
        if rule is None:
            report[path] = None
            continue
        kernel = lin.kernel.get_value()
        scale = zp = None
        if rule.config.is_static:
            scale, zp = samples.scales(path, rule, rule.config, kernel)
        bias = lin.bias.get_value() if lin.bias is not None else None
        try:
            arrays = quantize_kernel(kernel, rule.config, bias=bias, input_scale=scale, input_zero_point=zp)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        q = QLinear.from_arrays(arrays, rule.config, kernel=rule.kernel)
        _set_child(_get(model, key_path[:-1]), key_path[-1], q)
        report[path] = q.config
    return report


def _recorder_cls():
    from flax import nnx

    class Recorder(nnx.Module):
        def __init__(self, inner, path, samples, rule):
            self.inner = inner
            self._path = path
            self._samples = samples
            self._rule = rule

        def __call__(self, x):
            _record(self._samples, self._path, x, self.inner.kernel.get_value(), self._rule)
            return self.inner(x)

    return Recorder


def _Recorder(inner, path, samples, rule):
    return _recorder_cls()(inner, path, samples, rule)


# -- linen --------------------------------------------------------------------------------

def _linen_denses(tree, prefix=()) -> dict[str, tuple[tuple, dict]]:
    """Dense-like parameter dicts ``{'kernel': (..., K, N)[, 'bias']}`` of a params tree, by path."""
    out = {}
    if hasattr(tree, "items"):
        keys = set(tree.keys())
        if "kernel" in keys and keys <= {"kernel", "bias"} and np.ndim(tree["kernel"]) >= 2:
            out[_path_str(prefix)] = (prefix, tree)
        else:
            for k, v in tree.items():
                out.update(_linen_denses(v, prefix + (k,)))
    return out


def _set_in(tree, path, value):
    if not path:
        return value
    tree = dict(tree)
    if len(path) == 1:
        tree[path[0]] = value
    else:
        tree[path[0]] = _set_in(tree[path[0]], path[1:], value)
    return tree


def quantize_linen(model, variables, rules, *, calibration_data: Iterable | None = None,
                   forward: Callable | None = None, strict: bool = False):
    """Convert a trained linen model's ``nn.Dense`` params; returns ``(QuantizedLinen, new_variables)``.

    ``variables`` is the float ``{'params': ...}`` tree; the result is a NEW tree in
    which each selected Dense's ``{'kernel', 'bias'}`` became QDense's variables,
    processed once for the layer's kernel (skipped layers are the very same arrays). ``qm.apply(new_variables, x)`` runs
    the float model definition with the selected layers quantized; a model written
    with :class:`~qlin.flax.QDense` in their place applies ``new_variables`` directly.

    ``forward(apply_fn, variables, batch)`` runs one calibration batch (default
    ``apply_fn(variables, batch)``). Static calibration of layers inside ``nn.scan``
    is not supported (flax's scan rejects the recording callback): use a dynamic
    activation config there.
    """
    import flax.linen as nn

    from qlin.flax.linen import QuantizedLinen, _path_str as lpath

    if "params" not in variables:
        raise InputError(f"variables: expected a dict with a 'params' collection, got keys {sorted(variables)}")
    denses = _linen_denses(variables["params"])
    chosen, selected, static = _select_layers(denses, rules, strict, calibration_data)

    samples = _Samples()
    if static:

        def interceptor(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name == "__call__" and isinstance(m, nn.Dense) and lpath(m.path) in static:
                _record(samples, lpath(m.path), args[0], m.get_variable("params", "kernel"), static[lpath(m.path)])
            return next_fun(*args, **kwargs)

        run = forward or (lambda apply_fn, v, b: apply_fn(v, b))
        n_batches = 0
        with nn.intercept_methods(interceptor):
            for batch in calibration_data:
                try:
                    jax.block_until_ready(run(model.apply, variables, batch))
                except ValueError as e:
                    if "broadcasted variable has a data dependency" in str(e):
                        raise InputError("static calibration of layers inside nn.scan is not supported for linen; "
                                         "use a dynamic activation config for them") from None
                    raise
                n_batches += 1
        jax.effects_barrier()
        if n_batches == 0:
            raise InputError("calibration_data: no batches")

    params = variables["params"]
    layers, dims = [], []
    for path, rule in selected.items():
        key_path, d = denses[path]
        scale = zp = None
        if rule.config.is_static:
            scale, zp = samples.scales(path, rule, rule.config, d["kernel"])
        try:
            arrays = quantize_kernel(d["kernel"], rule.config, bias=d.get("bias"), input_scale=scale,
                                     input_zero_point=zp)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        *stack, k, n = np.shape(d["kernel"])
        arrays = _process_for_kernel(rule, arrays, int(n), int(k), tuple(stack))
        params = _set_in(params, key_path, arrays)
        layers.append((path, rule.config, rule.kernel))
        dims.append((path, int(n), int(k)))
    new_vars = dict(variables)
    new_vars["params"] = params
    return QuantizedLinen(model, tuple(layers), tuple(dims)), new_vars


def _process_for_kernel(rule: QuantRule, arrays, n: int, k: int, stack: tuple[int, ...]):
    """A converted layer's arrays processed once for its kernel (left logical if no kernel can run it here)."""
    from qlin.api import kernel_for
    from qlin.errors import NoKernelError
    from qlin.flax import _common

    try:
        kern = kernel_for(rule.config, override=rule.kernel)
    except NoKernelError:
        return arrays  # the call will raise the selection error, as for an unprocessed tree
    return _common.process_arrays(rule.config, arrays, n, k, kern, stack)
