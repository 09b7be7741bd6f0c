"""Processed params are made once and then used as they are: qlin.linear, QuantizedLinear, params_for_kernel.

On the CPU the chosen kernel (xla) never pads, so these tests register ``PadNKernel``:
the xla kernel plus a ``process_weights_after_loading`` that pads N to a multiple of 16
(idempotent, like mosaic_gpu's) and counts its calls. ``tests/test_flax_processed.py``
uses it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin.api import QuantizedLinear, in_kernel_layout, kernel_for, logical_params, params_for_kernel
from qlin.kernels.xla import XLAKernel
from qlin.params import Int8Params
from qlin.quantize import activation_granularity
from qlin.select import register_kernel, unregister_kernel
from qlin.testing import reference_linear_np
from qlin.tolerances import kernel_rtol, rel_err
from qlin.validate import normalize_params

F32 = jnp.float32
N_MULT = 16


class PadNKernel(XLAKernel):
    """The xla kernel on weights whose N is zero-padded to a multiple of 16 (logical N in out_features)."""

    name = "test_pad_n"
    # (weight shape, on concrete arrays?) of every process_weights_after_loading call; traced calls are
    # qlin.api.in_kernel_layout's abstract probe or processing inside a jitted call
    calls: list[tuple[tuple[int, ...], bool]] = []

    @classmethod
    def can_implement(cls, config):
        ok, why = super().can_implement(config)
        if ok and (config.weight_block is not None or activation_granularity(config) == "per_group"):
            return False, "test kernel: per-tensor / per-channel weights only"
        return ok, why

    def process_weights_after_loading(self, params):
        params = self._get_layer_params(params)
        type(self).calls.append((tuple(np.shape(params.weight)), not isinstance(params.weight, jax.core.Tracer)))
        n, k = params.n, params.k
        n_pad = -(-n // N_MULT) * N_MULT
        if params.out_features is not None and tuple(np.shape(params.weight)) == (n_pad, k):
            return params  # already processed: idempotent, nothing to do
        p = normalize_params(logical_params(params), self.config)
        if n_pad == n:
            return p
        changes = {"weight": jnp.pad(p.weight, ((0, n_pad - n), (0, 0))), "out_features": n, "in_features": k}
        if p.weight_scale.ndim == 1:
            changes["weight_scale"] = jnp.pad(p.weight_scale, (0, n_pad - n), constant_values=1.0)
        if isinstance(p, Int8Params) and p.azp_adj is not None:
            changes["azp_adj"] = jnp.pad(p.azp_adj, (0, n_pad - n))
        return p.replace(**changes)

    def _matmul(self, params, x2d, bias):
        n_pad = params.weight.shape[0]
        assert n_pad % N_MULT == 0, f"unprocessed weight {params.weight.shape} reached the test kernel"
        if bias is not None:
            bias = jnp.pad(bias, (0, n_pad - bias.shape[0]))
        y = super()._matmul(params.replace(out_features=None, in_features=None), x2d, bias)
        return y[:, : params.n]


@pytest.fixture
def pad_kernel():
    """PadNKernel registered first on the CPU (so the default selection picks it); call log cleared."""
    register_kernel(PadNKernel, platforms=("cpu",), first=True)
    PadNKernel.calls.clear()
    yield PadNKernel
    unregister_kernel(PadNKernel.name)
    PadNKernel.calls.clear()


def iter_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, sub-jaxprs (pjit, scan, shard_map, custom calls) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from iter_eqns(sub)


def weight_copies(jaxpr, weight_dtype, shapes=None) -> list[str]:
    """Pads / slices / concatenations that read or write an array of the weight's dtype and one of ``shapes``
    (the logical and the padded weight shape; None: any shape): what re-processing the weight in a call
    would show."""
    shapes = None if shapes is None else {tuple(s) for s in shapes}
    hits = []
    for eqn in iter_eqns(jaxpr):
        if eqn.primitive.name not in ("pad", "slice", "dynamic_slice", "concatenate", "gather"):
            continue
        for v in list(eqn.invars) + list(eqn.outvars):
            aval = getattr(v, "aval", None)
            if (aval is not None and getattr(aval, "dtype", None) == weight_dtype
                    and (shapes is None or tuple(aval.shape) in shapes)):
                hits.append(f"{eqn.primitive.name} {aval}")
    return hits


def concrete_calls(kernel_cls) -> list[tuple[int, ...]]:
    return [shape for shape, concrete in kernel_cls.calls if concrete]


def _w(n, k, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, k), F32)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, F32)


CONFIGS = [
    qlin.FP8ScaledMMConfig(out_dtype=F32),
    qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32),
    qlin.FP8ScaledMMConfig(weight_granularity="per_tensor", activation="static", out_dtype=F32),
]


def _params(cfg, n=13, k=24):
    kw = {"input_scale": 0.05} if cfg.is_static else {}
    return qlin.quantize_weight(_w(n, k), cfg, **kw)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_quantized_linear_processes_once(pad_kernel, cfg):
    params = _params(cfg)
    layer = QuantizedLinear(params, cfg, bias=jnp.linspace(-1, 1, 13))
    assert layer.kernel.name == "test_pad_n" and concrete_calls(pad_kernel) == [(13, 24)]
    assert layer.params.weight.shape == (16, 24) and (layer.out_features, layer.in_features) == (13, 24)
    before = list(pad_kernel.calls)
    x = _x((3, 24))
    ys = [layer(x), layer(x * 2), layer(_x((2, 5, 24)))]
    assert pad_kernel.calls == before  # three calls (two traces), not one process_weights_after_loading
    ref = reference_linear_np(x, params, cfg, np.linspace(-1, 1, 13))
    assert ys[0].shape == (3, 13) and rel_err(ys[0], ref) <= kernel_rtol(F32)
    assert ys[2].shape == (2, 5, 13)
    # the unpadded params are exactly the quantized ones
    lp = layer.logical_params()
    np.testing.assert_array_equal(np.asarray(lp.weight, np.float32), np.asarray(params.weight, np.float32))
    assert lp.out_features is None and lp.weight.shape == (13, 24)
    np.testing.assert_array_equal(lp.weight_scale, normalize_params(params, cfg).weight_scale)


def test_linear_processed_params_are_not_padded_again(pad_kernel):
    cfg = qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)
    params = _params(cfg)
    k = kernel_for(cfg)
    processed = k.process_weights_after_loading(params)
    x = _x((4, 24))
    fn = lambda p, x: qlin.linear(x, p, cfg)
    shapes = [(13, 24), (16, 24)]
    # unprocessed params still work, processed inside the call: the jaxpr pads the weight
    assert weight_copies(jax.make_jaxpr(fn)(params, x), jnp.dtype(jnp.int8), shapes)
    # processed params go through as they are: no pad / slice of the weight in the jaxpr
    assert weight_copies(jax.make_jaxpr(fn)(processed, x), jnp.dtype(jnp.int8), shapes) == []
    y_raw, y_proc = jax.jit(fn)(params, x), jax.jit(fn)(processed, x)
    np.testing.assert_array_equal(y_raw, y_proc)
    assert rel_err(y_proc, reference_linear_np(x, params, cfg)) <= kernel_rtol(F32)


def test_params_for_kernel_layouts(pad_kernel):
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    params = _params(cfg)
    pad = kernel_for(cfg)
    xla = kernel_for(cfg, override="xla")
    padded = params_for_kernel(pad, params)
    assert padded.weight.shape == (16, 24) and (padded.n, padded.k) == (13, 24)
    assert in_kernel_layout(pad, padded) and not in_kernel_layout(pad, params)
    assert in_kernel_layout(xla, params) and not in_kernel_layout(xla, padded)
    assert params_for_kernel(pad, padded) is padded  # idempotent
    # padded for another kernel: unpadded first, bit for bit
    back = params_for_kernel(xla, padded)
    assert back.weight.shape == (13, 24) and back.out_features is None
    np.testing.assert_array_equal(np.asarray(back.weight, np.float32), np.asarray(params.weight, np.float32))
    np.testing.assert_array_equal(back.weight_scale, params.weight_scale)
    assert logical_params(params) is params
    x = _x((2, 24))
    np.testing.assert_array_equal(qlin.linear(x, padded, cfg, kernel="xla"), qlin.linear(x, params, cfg, kernel="xla"))
