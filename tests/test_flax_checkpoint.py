"""qlin.flax.checkpoint: safetensors round trips are bit-exact; mismatches are clear errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlin
from qlin.errors import InputError, ParamsError
from qlin.flax import QLinear, quantize_linen, quantize_nnx
from qlin.flax.checkpoint import (config_from_dict, config_to_dict, load_arrays, load_linen, load_nnx, save_linen,
                                  save_nnx)

pytest.importorskip("safetensors")
F32 = jnp.float32


class Net(nnx.Module):
    def __init__(self, rngs, width=32):
        self.a = nnx.Linear(16, width, rngs=rngs)
        self.b = nnx.Linear(width, 16, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(16, 16, rngs=rngs)
        self.stack = make(rngs)

    def __call__(self, x):
        x = self.norm(self.b(self.a(x)).astype(F32))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x).astype(F32)
        return body(x, self.stack)


def _bytes(model):
    return {"/".join(map(str, p)): (np.asarray(v.get_value()).dtype, np.asarray(v.get_value()).tobytes())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


@pytest.mark.parametrize("config", [
    qlin.FP8ScaledMMConfig(activation="static", out_dtype=F32),
    qlin.FP8ScaledMMConfig(fp8_format="e5m2", weight_granularity=(16, 16), activation="dynamic_per_group",
                           group_size=16),
    qlin.Int8ScaledMMConfig(symmetric=False, activation="static"),
], ids=lambda c: c.describe())
def test_nnx_round_trip_bit_exact(tmp_path, config):
    x = jax.random.normal(jax.random.key(1), (3, 16))
    net = Net(nnx.Rngs(0))
    quantize_nnx(net, [(".*", config)], calibration_data=None if not config.is_static else [x])
    path = tmp_path / "q.safetensors"
    save_nnx(path, net)
    skeleton = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    loaded = load_nnx(path, skeleton)
    assert isinstance(loaded.a, QLinear) and loaded.a.config == net.a.config
    assert loaded.stack.stack_shape == (2,)
    before, after = _bytes(net), _bytes(loaded)
    assert before.keys() == after.keys()
    assert before == after  # same dtypes, same bytes
    assert loaded.a.weight[...].dtype == config.weight_dtype
    np.testing.assert_array_equal(loaded(x), net(x))
    # the file stores the 8-bit weight itself (1 byte/element), not a float copy
    arrays, meta = load_arrays(path)
    assert arrays["a/weight"].itemsize == 1 and json.loads(meta["layers"])[0]["path"] in ("a", "b", "stack")


def test_nnx_load_errors(tmp_path):
    net = Net(nnx.Rngs(0))
    quantize_nnx(net, [("a", qlin.FP8ScaledMMConfig())])
    path = tmp_path / "q.safetensors"
    save_nnx(path, net)
    with pytest.raises(ParamsError, match=r"a: the model's Linear is 16 -> 48, the checkpoint's weight is 16 -> 32"):
        load_nnx(path, nnx.eval_shape(lambda: Net(nnx.Rngs(0), width=48)))

    class Other(nnx.Module):
        def __init__(self, rngs):
            self.z = nnx.Linear(16, 32, rngs=rngs)
    with pytest.raises(InputError, match="does not exist"):
        load_nnx(path, nnx.eval_shape(lambda: Other(nnx.Rngs(0))))
    save_linen(tmp_path / "l.safetensors", {"params": {"w": jnp.ones(2)}})
    with pytest.raises(InputError, match="load_linen"):
        load_nnx(tmp_path / "l.safetensors", Net(nnx.Rngs(0)))


def test_linen_round_trip(tmp_path):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="out")(nn.Dense(24, name="inner")(x))

    m = M()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    v = m.init(jax.random.key(0), x)
    qm, qv = quantize_linen(m, v, [("inner", qlin.Int8ScaledMMConfig(symmetric=False, activation="static")),
                                   ("out", qlin.FP8ScaledMMConfig())], calibration_data=[x])
    save_linen(tmp_path / "m.safetensors", qv, qm)
    qm2, qv2 = load_linen(tmp_path / "m.safetensors", m)
    assert qm2.layers == qm.layers
    flat1, flat2 = jax.tree_util.tree_leaves_with_path(qv), jax.tree_util.tree_leaves_with_path(qv2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (_, a), (_, b) in zip(flat1, flat2):
        assert a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_array_equal(qm2.apply(qv2, x), qm.apply(qv, x))
    layers, _ = load_linen(tmp_path / "m.safetensors")
    assert [p for p, _, _ in layers] == ["inner", "out"]


def test_config_json_round_trip_and_non_checkpoint(tmp_path):
    for cfg in [qlin.FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group"),
                qlin.FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", fast_accum=True),
                qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=jnp.float16)]:
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not a qlin.flax checkpoint"):
        load_linen(tmp_path / "plain.safetensors")
