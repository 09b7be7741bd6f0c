"""qlin.flax.nnx.QLinear: accuracy vs float and vs the float64 oracle, transforms, shapes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlin
from qlin.errors import InputError, ParamsError
from qlin.flax import QLinear, QuantVar
from qlin.testing import reference_linear_np
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err

F32 = jnp.float32
CONFIGS = [
    qlin.FP8ScaledMMConfig(out_dtype=F32),
    qlin.FP8ScaledMMConfig(weight_granularity="per_tensor", activation="dynamic_per_tensor", out_dtype=F32),
    qlin.Int8ScaledMMConfig(out_dtype=F32),
    qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32),
    qlin.FP8ScaledMMConfig(weight_granularity=(16, 16), activation="dynamic_per_group", group_size=16, out_dtype=F32),
]
IDS = [c.describe() for c in CONFIGS]


def _linear(k=48, n=32, seed=0):
    return nnx.Linear(k, n, rngs=nnx.Rngs(seed), bias_init=nnx.initializers.normal(0.5))


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, F32)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_float_and_oracle(config):
    lin = _linear()
    q = QLinear.from_linear(lin, config)
    x = _x((3, 5, 48))
    y = q(x)
    assert y.shape == (3, 5, 32) and y.dtype == F32
    assert rel_err(y, lin(x)) <= quant_rtol(config)
    oracle = reference_linear_np(x, q.qparams(), config, lin.bias[...])
    assert rel_err(y, oracle) <= kernel_rtol(F32)


def test_variables_are_qlin_params_and_bias_is_param():
    q = QLinear.from_linear(_linear(), qlin.Int8ScaledMMConfig(symmetric=False))
    assert isinstance(q.weight, QuantVar) and q.weight[...].dtype == jnp.int8 and q.weight[...].shape == (32, 48)
    assert isinstance(q.bias, nnx.Param)
    p = q.qparams()
    assert isinstance(p, qlin.Int8Params) and p.azp_adj.shape == (32,)
    np.testing.assert_array_equal(p.azp_adj, np.asarray(q.weight[...], np.int32).sum(1))
    # the Params attribute names are the variable names (vLLM-style from_layer works off the arrays)
    assert set(p.to_mapping()) | {"bias"} == set(q.arrays())
    # no QuantVar is a Param: optimizers over nnx.Param never see 8-bit arrays
    params = jax.tree.leaves(nnx.state(q, nnx.Param))
    assert all(jnp.issubdtype(a.dtype, jnp.floating) for a in params) and len(params) == 1


def test_dtype_overrides_out_dtype_and_leading_shapes():
    q = QLinear.from_linear(_linear(), qlin.FP8ScaledMMConfig(), dtype=jnp.float16)
    assert q.config.out_dtype == jnp.float16
    for shape in [(48,), (7, 48), (2, 3, 4, 48)]:
        y = q(_x(shape))
        assert y.shape == shape[:-1] + (32,) and y.dtype == jnp.float16


def test_from_params_and_from_float_agree():
    cfg = qlin.FP8ScaledMMConfig()
    lin = _linear()
    w = lin.kernel[...]
    a = QLinear.from_float(w, cfg, lin.bias[...])
    b = QLinear.from_params(qlin.quantize_weight(w.T, cfg), cfg, lin.bias[...])
    x = _x((4, 48))
    np.testing.assert_array_equal(a(x), b(x))


def test_jit_nnx_jit_vmap_eval_shape():
    cfg = qlin.Int8ScaledMMConfig()
    q = QLinear.from_linear(_linear(), cfg)
    x = _x((6, 48))
    y = q(x)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(q, x), y)
    graphdef, state = nnx.split(q)
    np.testing.assert_array_equal(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), y)
    yv = jax.vmap(q)(x.reshape(2, 3, 48))
    np.testing.assert_array_equal(yv.reshape(6, 32), y)  # per-token scales: batching changes nothing
    out = jax.eval_shape(q, jax.ShapeDtypeStruct((9, 2, 48), F32))
    assert out.shape == (9, 2, 32) and out.dtype == cfg.out_dtype
    abstract = nnx.eval_shape(lambda: QLinear(48, 32, config=cfg))
    assert abstract.weight.get_value().shape == (32, 48) and abstract.weight.get_value().dtype == jnp.int8


def test_scan_over_stacked_layers():
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return nnx.Linear(16, 16, rngs=rngs)

    stack = make(nnx.Rngs(0))
    q = QLinear.from_linear(stack, cfg)
    assert q.stack_shape == (3,) and q.weight[...].shape == (3, 16, 16)

    def run(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)
        return body(x, layers)

    x = _x((5, 16))
    y = nnx.jit(run)(q, x)
    # same as applying each layer's own params in turn
    expect = x
    for i in range(3):
        layer = QLinear.from_arrays({k: v[i] for k, v in q.arrays().items()}, cfg)
        expect = layer(expect)
    assert rel_err(y, expect) <= kernel_rtol(F32)
    assert rel_err(y, run(stack, x)) <= 3 * quant_rtol(cfg)
    # nnx.vmap over the stack: each layer on the same x
    yv = nnx.vmap(lambda layer, x: layer(x), in_axes=(0, None))(q, x)
    for i in range(3):
        layer = QLinear.from_arrays({k: v[i] for k, v in q.arrays().items()}, cfg)
        assert rel_err(yv[i], layer(x)) <= kernel_rtol(F32)
    with pytest.raises(InputError, match="stacked layer"):
        q(x)


def test_bad_input():
    cfg = qlin.FP8ScaledMMConfig()
    q = QLinear.from_linear(_linear(), cfg)
    with pytest.raises(InputError, match=r"\[\.\.\., 48\]"):
        q(_x((4, 47)))
    with pytest.raises(ParamsError, match="weight_scale has shape"):
        QLinear.from_arrays({"weight": q.weight[...], "weight_scale": jnp.ones(31)}, cfg)
    with pytest.raises(ParamsError, match="unexpected \\['input_scale'\\]"):
        QLinear.from_arrays({"weight": q.weight[...], "weight_scale": q.weight_scale[...],
                             "input_scale": jnp.float32(1)}, cfg)
    with pytest.raises(ParamsError, match="dtype"):
        QLinear.from_arrays({"weight": q.weight[...].astype(jnp.int8), "weight_scale": q.weight_scale[...]}, cfg)
    with pytest.raises(ParamsError, match="weight_scale: scales must be > 0"):
        QLinear.from_arrays({"weight": q.weight[...], "weight_scale": -q.weight_scale[...]}, cfg)
    with pytest.raises(ParamsError, match="finite"):
        QLinear.from_arrays({"weight": q.weight[...][None].repeat(2, 0),
                             "weight_scale": jnp.stack([q.weight_scale[...], q.weight_scale[...] * jnp.inf])}, cfg)
    with pytest.raises(qlin.ConfigError, match="config"):
        QLinear(4, 4, config="fp8")
    with pytest.raises(InputError, match="nnx.Linear"):
        QLinear.from_linear(q, cfg)
    with pytest.raises(InputError, match="NaN"):
        QLinear.from_float(jnp.full((4, 4), jnp.nan), cfg)
