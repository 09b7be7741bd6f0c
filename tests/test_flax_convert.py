"""qlin.flax.convert: rule lists, calibration math, stacked layers, bad input."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlin
from qlin.errors import ConfigError, InputError
from qlin.flax import QLinear, QuantRule, RuleWarning, calibrate_scale, quantize_kernel, quantize_linen, quantize_nnx
from qlin.tolerances import quant_rtol, rel_err

F32 = jnp.float32
FP8_STATIC = qlin.FP8ScaledMMConfig(activation="static", out_dtype=F32)
INT8_ASYM_STATIC = qlin.Int8ScaledMMConfig(symmetric=False, activation="static", out_dtype=F32)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x))).astype(F32)


class Net(nnx.Module):
    def __init__(self, rngs, stacked=False):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        if stacked:
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)
            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.stacked = stacked
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x).astype(F32)
        if self.stacked:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)
            x = body(x, self.blocks)
        else:
            for b in self.blocks:
                x = b(x)
        return self.head(x)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, F32)


def _linear_kernels(model):
    return {"/".join(map(str, p)): np.asarray(m.kernel[...]) for p, m in nnx.iter_modules(model)
            if isinstance(m, nnx.Linear)}


def test_rules_first_match_wins_and_skipped_layers_untouched():
    net = Net(nnx.Rngs(0))
    before = _linear_kernels(net)
    head_kernel = net.head.kernel
    report = quantize_nnx(net, [
        QuantRule("head", None),
        QuantRule(r"blocks/\d+/down", qlin.Int8ScaledMMConfig()),
        QuantRule(r"blocks/.*", qlin.FP8ScaledMMConfig()),
    ])
    assert report == {"embed": None, "head": None,
                      "blocks/0/up": qlin.FP8ScaledMMConfig(), "blocks/0/down": qlin.Int8ScaledMMConfig(),
                      "blocks/1/up": qlin.FP8ScaledMMConfig(), "blocks/1/down": qlin.Int8ScaledMMConfig()}
    assert isinstance(net.blocks[1].down, QLinear) and net.blocks[1].down.weight[...].dtype == jnp.int8
    assert isinstance(net.blocks[0].up, QLinear) and net.blocks[0].up.weight[...].dtype == jnp.float8_e4m3fn
    assert type(net.embed) is nnx.Linear and type(net.head) is nnx.Linear
    assert net.head.kernel is head_kernel
    np.testing.assert_array_equal(net.embed.kernel[...], before["embed"])
    assert net(_x((2, 8))).shape == (2, 4)


def test_rule_matching_nothing_warns_or_raises():
    with pytest.warns(RuleWarning, match=r"\['blocks/9/up'\] matched no layer.*embed"):
        quantize_nnx(Net(nnx.Rngs(0)), [("blocks/9/up", qlin.FP8ScaledMMConfig()), ("embed", None)])
    with pytest.raises(ConfigError, match="matched no layer"):
        quantize_nnx(Net(nnx.Rngs(0)), [("nope", qlin.FP8ScaledMMConfig())], strict=True)
    # a rule shadowed by an earlier one also never matches
    with pytest.warns(RuleWarning, match="shadow"):
        quantize_nnx(Net(nnx.Rngs(0)), [(".*", None), ("head", qlin.FP8ScaledMMConfig())])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_nnx(Net(nnx.Rngs(0)), [("head", qlin.FP8ScaledMMConfig())])


def test_rule_validation():
    with pytest.raises(ConfigError, match="regex"):
        QuantRule("(", qlin.FP8ScaledMMConfig())
    with pytest.raises(ConfigError, match="calibration"):
        QuantRule(".*", FP8_STATIC, calibration="mse")
    with pytest.raises(ConfigError, match="percentile"):
        QuantRule(".*", FP8_STATIC, calibration="percentile", percentile=0)
    with pytest.raises(ConfigError, match="config"):
        QuantRule(".*", "int8")
    with pytest.raises(ConfigError, match="at least one"):
        quantize_nnx(Net(nnx.Rngs(0)), [])


def test_calibration_math_absmax_and_percentile():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32) * 3
    b[0, 0] = 100.0  # one outlier
    allx = np.concatenate([a.ravel(), b.ravel()])
    s, zp = calibrate_scale([a, b], FP8_STATIC)
    assert zp is None and float(s) == pytest.approx(100.0 / 448.0, rel=1e-6)
    s, zp = calibrate_scale([a, b], FP8_STATIC, method="percentile", percentile=99.0)
    assert float(s) == pytest.approx(np.percentile(np.abs(allx), 99.0) / 448.0, rel=1e-6)
    assert float(s) < 100.0 / 448.0 / 5
    # asymmetric int8: the [1, 99] percentile range maps onto 255 levels, zero point from its low end
    s, zp = calibrate_scale([a, b], INT8_ASYM_STATIC, method="percentile", percentile=99.0)
    lo, hi = np.percentile(allx, [1.0, 99.0])
    assert float(s) == pytest.approx((hi - lo) / 255.0, rel=1e-6)
    assert int(zp) == int(np.clip(np.round(-128 - lo / float(s)), -128, 127))
    # percentile=100 is absmax
    np.testing.assert_array_equal(calibrate_scale([a, b], FP8_STATIC, method="percentile", percentile=100)[0],
                                  calibrate_scale([a, b], FP8_STATIC)[0])


def test_static_calibration_end_to_end_matches_recorded_inputs():
    net = Net(nnx.Rngs(0))
    batches = [_x((4, 8), seed=s) for s in (1, 2)]
    # the input the first block's `up` sees, computed from the float model
    ups = [np.asarray(net.embed(x)) for x in batches]
    ref = [net(x) for x in batches]
    quantize_nnx(net, [("head", None), (".*", FP8_STATIC)], calibration_data=batches)
    want, _ = qlin.calibrate_static(jnp.asarray(np.concatenate([u.ravel() for u in ups])), FP8_STATIC)
    assert float(net.blocks[0].up.input_scale[...]) == pytest.approx(float(want), rel=1e-6)
    assert float(net.embed.input_scale[...]) == pytest.approx(
        float(qlin.calibrate_static(jnp.concatenate(batches), FP8_STATIC)[0]), rel=1e-6)
    assert all(rel_err(net(x), r) <= 3 * quant_rtol(FP8_STATIC) for x, r in zip(batches, ref))
    # the recorders were removed again
    assert all(type(m).__name__ != "Recorder" for _, m in nnx.iter_modules(net))


def test_stacked_layers_get_one_scale_per_layer():
    net = Net(nnx.Rngs(0), stacked=True)
    x = _x((6, 8))
    # per-layer inputs of blocks/up from an unrolled float run
    h = net.embed(x).astype(F32)
    per_layer = []
    for i in range(3):
        blk = nnx.merge(*_slice(net.blocks, i))
        per_layer.append(np.asarray(h))
        h = blk(h)
    ref = net(x)
    quantize_nnx(net, [(r"blocks/up", INT8_ASYM_STATIC), (r"blocks/down", qlin.FP8ScaledMMConfig(out_dtype=F32))],
                 calibration_data=[x], forward=nnx.jit(lambda m, b: m(b)))
    up = net.blocks.up
    assert up.stack_shape == (3,) and up.input_scale[...].shape == (3,) and up.input_zero_point[...].shape == (3,)
    for i in range(3):
        s, zp = qlin.calibrate_static(jnp.asarray(per_layer[i]), INT8_ASYM_STATIC)
        assert float(up.input_scale[...][i]) == pytest.approx(float(s), rel=1e-6)
        assert int(up.input_zero_point[...][i]) == int(zp)
    assert rel_err(net(x), ref) <= 3 * quant_rtol(INT8_ASYM_STATIC) + 3 * quant_rtol(FP8_STATIC)


def _slice(stacked, i):
    graphdef, state = nnx.split(stacked)
    return graphdef, jax.tree.map(lambda a: a[i], state)


def test_calibration_bad_input():
    with pytest.raises(InputError, match="calibration_data"):
        quantize_nnx(Net(nnx.Rngs(0)), [("embed", FP8_STATIC)])
    bad = _x((4, 8)).at[1, 2].set(jnp.nan)
    with pytest.raises(InputError, match=r"embed: calibration data contains NaN/inf"):
        quantize_nnx(Net(nnx.Rngs(0)), [("embed", FP8_STATIC)], calibration_data=[bad])
    net = Net(nnx.Rngs(0))
    with pytest.raises(InputError, match="no batches"):
        quantize_nnx(net, [("embed", FP8_STATIC)], calibration_data=[])
    assert type(net.embed) is nnx.Linear  # a failed conversion leaves the model float
    with pytest.raises(InputError, match="saw no input"):
        quantize_nnx(Net(nnx.Rngs(0)), [("head", FP8_STATIC)], calibration_data=[_x((2, 8))],
                     forward=lambda m, b: m.embed(b))
    with pytest.raises(InputError, match="NaN/inf"):
        calibrate_scale(np.array([1.0, np.inf]), FP8_STATIC)
    # percentile calibration records every value; NaN is caught there too
    with pytest.raises(InputError, match=r"blocks/0/up: calibration data contains NaN/inf"):
        quantize_nnx(Net(nnx.Rngs(0)), [QuantRule("blocks/0/up", FP8_STATIC, calibration="percentile")],
                     calibration_data=[bad])


def test_incompatible_shapes():
    cfg = qlin.FP8ScaledMMConfig()
    with pytest.raises(InputError, match=r"bias: expected shape \(8,\)"):
        quantize_kernel(jnp.ones((4, 8)), cfg, bias=jnp.ones(4))
    with pytest.raises(InputError, match=r"input_scale: expected a scalar or shape \(3,\)"):
        quantize_kernel(jnp.ones((3, 4, 8)), FP8_STATIC, input_scale=jnp.ones(2))
    with pytest.raises(InputError, match="kernel"):
        quantize_kernel(jnp.ones(4), cfg)
    # block granularity larger than the layer still works (one ragged block), and shapes stay canonical
    arrays = quantize_kernel(jnp.ones((20, 12)), qlin.FP8ScaledMMConfig(weight_granularity=(16, 16)))
    assert arrays["weight"].shape == (12, 20) and arrays["weight_scale"].shape == (1, 2)


def test_linen_calibration_and_rules():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="out")(jax.nn.relu(nn.Dense(16, name="inner")(x)))

    m = M()
    x = _x((5, 8))
    v = m.init(jax.random.key(0), x)
    qm, qv = quantize_linen(m, v, [QuantRule("inner", FP8_STATIC, calibration="percentile", percentile=99.5)],
                            calibration_data=[x])
    want, _ = calibrate_scale(np.asarray(x), FP8_STATIC, method="percentile", percentile=99.5)
    assert float(qv["params"]["inner"]["input_scale"]) == pytest.approx(float(want), rel=1e-6)
    assert qv["params"]["out"] is v["params"]["out"]
    assert rel_err(qm.apply(qv, x), m.apply(v, x)) <= quant_rtol(FP8_STATIC)
    with pytest.warns(RuleWarning, match="matched no layer"):
        quantize_linen(m, v, [("Dense_0", qlin.FP8ScaledMMConfig())])


def test_linen_static_calibration_inside_scan_is_a_clear_error():
    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(8, name="d")(x), None

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="s")(x, None)
            return x

    m = M()
    x = _x((3, 8))
    v = m.init(jax.random.key(0), x)
    with pytest.raises(InputError, match="inside nn.scan is not supported"):
        quantize_linen(m, v, [("s/d", FP8_STATIC)], calibration_data=[x])
    # dynamic configs need no calibration and work there
    qm, qv = quantize_linen(m, v, [("s/d", qlin.FP8ScaledMMConfig(out_dtype=F32))])
    assert qv["params"]["s"]["d"]["weight"].shape == (2, 8, 8)
    assert rel_err(qm.apply(qv, x), m.apply(v, x)) <= 2 * quant_rtol(FP8_STATIC)
