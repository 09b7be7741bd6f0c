"""Bad input gets an error naming the argument and the expectation -- never a silent wrong answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin import FP8Params, FP8ScaledMMConfig, InputError, Int8Params, Int8ScaledMMConfig, ParamsError
from qlin.kernels import XLAKernel

FP8 = FP8ScaledMMConfig()
INT8 = Int8ScaledMMConfig()


def _params(config=FP8, n=8, k=16, **kw):
    w = jax.random.normal(jax.random.key(0), (n, k))
    return qlin.quantize_weight(w, config, **kw)


def _x(m=4, k=16, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(1), (m, k), dtype)


# -- activations and bias ------------------------------------------------------------------

def test_x_wrong_last_dim():
    with pytest.raises(InputError, match=r"x: last dimension must equal the weight's K=16, got shape \(4, 15\)"):
        qlin.linear(_x(k=15), _params(), FP8)


def test_x_scalar_and_int_dtype():
    with pytest.raises(InputError, match="x: expected an array of shape"):
        qlin.linear(jnp.float32(1.0), _params(), FP8)
    with pytest.raises(InputError, match="x: expected a float16/bfloat16/float32 activation, got dtype int32"):
        qlin.linear(jnp.ones((2, 16), jnp.int32), _params(), FP8)


def test_bias_wrong_shape_and_dtype():
    with pytest.raises(InputError, match=r"bias: expected shape \(8,\) \(out_features\), got \(7,\)"):
        qlin.linear(_x(), _params(), FP8, bias=jnp.ones(7))
    with pytest.raises(InputError, match="bias: expected a float dtype"):
        qlin.linear(_x(), _params(), FP8, bias=jnp.ones(8, jnp.int32))


# -- weights and scales -------------------------------------------------------------------

def test_weight_rank_and_dtype():
    with pytest.raises(InputError, match=r"w: expected a float weight of shape \(N, K\)"):
        qlin.quantize_weight(jnp.ones(16), FP8)
    with pytest.raises(InputError, match="w: expected a float16/bfloat16/float32 weight"):
        qlin.quantize_weight(jnp.ones((4, 4), jnp.int8), FP8)
    p = _params()
    with pytest.raises(ParamsError, match="weight: expected dtype int8"):
        qlin.linear(_x(), Int8Params(weight=p.weight, weight_scale=p.weight_scale), INT8)
    with pytest.raises(ParamsError, match=r"weight: expected shape \(N, K\)"):
        qlin.linear(_x(), p.replace(weight=p.weight.reshape(-1)), FP8)


def test_params_class_must_match_config():
    p = _params()
    with pytest.raises(ParamsError, match="params: a Int8ScaledMMConfig needs Int8Params, got FP8Params"):
        qlin.linear(_x(), p, INT8)


def test_non_finite_weight_is_rejected():
    w = jnp.ones((4, 16)).at[1, 2].set(jnp.inf)
    with pytest.raises(InputError, match="w: weight contains NaN or inf"):
        qlin.quantize_weight(w, FP8)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_bad_weight_scale_values(bad):
    p = _params()
    scale = p.weight_scale.at[3].set(bad)
    with pytest.raises(ParamsError, match="weight_scale: scales must be"):
        XLAKernel(FP8).process_weights_after_loading(p.replace(weight_scale=scale))


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_bad_static_input_scale(bad):
    cfg = FP8ScaledMMConfig(activation="static")
    with pytest.raises(InputError, match="input_scale: must be finite and > 0"):
        qlin.quantize_weight(jnp.ones((4, 16)), cfg, input_scale=bad)
    p = qlin.quantize_weight(jnp.ones((4, 16)), cfg, input_scale=0.1)
    with pytest.raises(ParamsError, match="input_scale: scales must be"):
        XLAKernel(cfg).process_weights_after_loading(p.replace(input_scale=jnp.float32(bad)))


@pytest.mark.parametrize(
    "gran, bad_shape, want",
    [("per_channel", (7,), r"\(8,\)"), ("per_tensor", (2,), r"\(\)"), ((4, 8), (2, 3), r"\(2, 2\)")],
)
def test_weight_scale_wrong_shape(gran, bad_shape, want):
    cfg = FP8ScaledMMConfig(weight_granularity=gran)
    p = _params(cfg)
    with pytest.raises(ParamsError, match=rf"weight_scale: expected shape {want} for weight_granularity="):
        qlin.linear(_x(), p.replace(weight_scale=jnp.ones(bad_shape)), cfg)


def test_static_config_without_input_scale():
    cfg = FP8ScaledMMConfig(activation="static")
    p = _params()  # dynamic params: no input_scale
    with pytest.raises(ParamsError, match="input_scale: config.activation='static' needs"):
        qlin.linear(_x(), p, cfg)


def test_static_asymmetric_int8_without_zero_point():
    cfg = Int8ScaledMMConfig(activation="static", symmetric=False)
    p = qlin.quantize_weight(jnp.ones((4, 16)), cfg, input_scale=0.1, input_zero_point=jnp.int32(3))
    with pytest.raises(ParamsError, match="input_zero_point: static asymmetric int8 needs a zero point"):
        qlin.linear(_x(), p.replace(input_zero_point=None), cfg)
    with pytest.raises(InputError, match="input_zero_point: expected an integer scalar"):
        qlin.quantize_weight(jnp.ones((4, 16)), cfg, input_scale=0.1, input_zero_point=jnp.float32(0.5))
    with pytest.raises(InputError, match="input_zero_point: given for a symmetric int8 config"):
        qlin.quantize_weight(jnp.ones((4, 16)), INT8, input_zero_point=jnp.int32(1))


def test_azp_adj_wrong_shape():
    cfg = Int8ScaledMMConfig(symmetric=False)
    p = _params(cfg)
    with pytest.raises(ParamsError, match=r"azp_adj: expected shape \(8,\)"):
        qlin.linear(_x(), p.replace(azp_adj=jnp.zeros(5, jnp.int32)), cfg)


def test_int8_k_past_int32_exactness():
    cfg = Int8ScaledMMConfig(symmetric=False)
    k = qlin.quantize.INT8_ASYM_MAX_EXACT_K + 1
    p = Int8Params(weight=jnp.zeros((1, k), jnp.int8), weight_scale=jnp.ones(1))
    with pytest.raises(ParamsError, match=f"weight: K={k} exceeds"):
        XLAKernel(cfg).process_weights_after_loading(p)


def test_fp8_overflowing_activation_saturates_not_nan():
    """A static scale too small for the data must saturate at +-448, never produce NaN."""
    cfg = FP8ScaledMMConfig(activation="static", out_dtype=jnp.float32)
    w = jnp.eye(16)
    p = qlin.quantize_weight(w, cfg, input_scale=0.01)  # 448 * 0.01 = 4.48 representable max
    x = jnp.full((2, 16), 100.0)
    y = qlin.linear(x, p, cfg)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(np.asarray(y), 4.48, rtol=1e-2)


def test_kernel_refuses_a_config_it_cannot_implement():
    class NoInt8(XLAKernel):
        name = "xla_no_int8"
        supports_int8 = False

    with pytest.raises(ValueError, match="xla_no_int8: cannot implement int8"):
        NoInt8(INT8)


def test_vllm_shaped_scales_are_accepted():
    p = _params()
    q = FP8Params(weight=p.weight, weight_scale=p.weight_scale.reshape(8, 1), input_scale=None)
    y = qlin.linear(_x(), q, FP8)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(qlin.linear(_x(), p, FP8), np.float32))
