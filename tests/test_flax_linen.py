"""qlin.flax.linen: QDense and QuantizedLinen on converted params; jit, nn.scan, vmap, eval_shape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin.errors import InputError
from qlin.flax import QDense, quantize_linen
from qlin.testing import reference_linear_np
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err

F32 = jnp.float32


class Block(nn.Module):
    dense: type = nn.Dense
    cfg: object = None

    @nn.compact
    def __call__(self, x, _=None):
        kw = {} if self.cfg is None else {"config": self.cfg}
        h = jax.nn.relu(self.dense(64, name="up", **kw)(x))
        return x + self.dense(32, name="down", **kw)(h).astype(x.dtype), None


class Model(nn.Module):
    dense: type = nn.Dense
    cfg: object = None
    scan: bool = True

    @nn.compact
    def __call__(self, x):
        if self.scan:
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(self.dense, self.cfg, name="stack")(x, None)
        else:
            x, _ = Block(self.dense, self.cfg, name="block")(x)
        kw = {} if self.cfg is None else {"config": self.cfg}
        return self.dense(16, name="head", **kw)(x)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, F32)


def test_qdense_matches_oracle_and_float():
    cfg = qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)
    dense = nn.Dense(24)
    x = _x((2, 5, 40))
    v = dense.init(jax.random.key(0), x)
    _, qv = quantize_linen(dense, v, [(".*", cfg)])
    y = QDense(24, cfg).apply(qv, x)
    assert y.shape == (2, 5, 24) and y.dtype == F32
    p = qv["params"]
    params = qlin.Int8Params(weight=p["weight"], weight_scale=p["weight_scale"], azp_adj=p["azp_adj"])
    assert rel_err(y, reference_linear_np(x, params, cfg, p["bias"])) <= kernel_rtol(F32)
    assert rel_err(y, dense.apply(v, x)) <= quant_rtol(cfg)


def test_qdense_init_shapes_and_eval_shape():
    cfg = qlin.FP8ScaledMMConfig(activation="static")
    m = QDense(24, cfg, input_scale_ub=False)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((3, 40), F32))
    got = {k: (v.shape, v.dtype) for k, v in shapes["params"].items()}
    assert got == {"weight": ((24, 40), jnp.dtype(jnp.float8_e4m3fn)), "weight_scale": ((24,), F32),
                   "input_scale": ((), F32), "bias": ((24,), F32)}
    v = m.init(jax.random.key(0), jnp.ones((3, 40)))
    out = jax.eval_shape(m.apply, v, jax.ShapeDtypeStruct((7, 1, 40), F32))
    assert out.shape == (7, 1, 24) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("scan", [True, False], ids=["nn.scan", "unrolled"])
def test_converted_model_qdense_model_and_interceptor_agree(scan):
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    float_model = Model(scan=scan)
    x = _x((4, 6, 32))
    v = float_model.init(jax.random.key(0), x)
    ref = float_model.apply(v, x)

    # every layer quantized: the float definition (interceptor) and a QDense model agree exactly
    qm, qv = quantize_linen(float_model, v, [(".*", cfg)])
    assert set(qm.configs) == {f"{'stack' if scan else 'block'}/{n}" for n in ("up", "down")} | {"head"}
    y_int = jax.jit(qm.apply)(qv, x)
    y_qdense = jax.jit(Model(dense=QDense, cfg=cfg, scan=scan).apply)(qv, x)
    np.testing.assert_array_equal(y_int, y_qdense)
    assert y_int.shape == (4, 6, 16)
    assert rel_err(y_int, ref) <= 2 * quant_rtol(cfg)

    # head skipped: its params are the very same arrays, and it runs float
    qm2, qv2 = quantize_linen(float_model, v, [("head", None), (".*", cfg)])
    assert "head" not in qm2.configs and qv2["params"]["head"] is v["params"]["head"]
    y2 = qm2.apply(qv2, x)
    assert rel_err(y2, ref) <= 2 * quant_rtol(cfg)
    assert rel_err(y2, y_int) > 0


def test_vmap_and_jit():
    cfg = qlin.Int8ScaledMMConfig()
    m = Model(scan=False)
    x = _x((6, 32))
    v = m.init(jax.random.key(0), x)
    qm, qv = quantize_linen(m, v, [(".*", cfg)])
    y = qm.apply(qv, x)
    yv = jax.vmap(lambda xi: qm.apply(qv, xi))(x.reshape(2, 3, 32))
    np.testing.assert_array_equal(yv.reshape(6, 16), y)
    np.testing.assert_array_equal(jax.jit(qm.apply)(qv, x), y)


def test_interceptor_errors_on_float_params():
    m = Model(scan=False)
    x = _x((2, 32))
    v = m.init(jax.random.key(0), x)
    qm, _ = quantize_linen(m, v, [(".*", qlin.FP8ScaledMMConfig())])
    with pytest.raises(InputError, match="no 'weight'"):
        qm.apply(v, x)  # the float tree, not the converted one
    with pytest.raises(InputError, match="'params'"):
        quantize_linen(m, v["params"], [(".*", qlin.FP8ScaledMMConfig())])
