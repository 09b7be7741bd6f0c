import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin import FP8ScaledMMConfig, InputError, Int8ScaledMMConfig
from qlin.quantize import INT8_MAX_EXACT_K, compute_azp_adj, saturate_to_fp8


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_fp8_cast_saturates_instead_of_nan():
    x = jnp.array([500.0, -1e6, 448.0, 1.0])
    q = saturate_to_fp8(x)
    np.testing.assert_array_equal(np.asarray(q, np.float32), [448.0, -448.0, 448.0, 1.0])
    q, s = qlin.quantize_fp8(x, scale=0.5)  # static scale: 1000 -> saturates to 448
    assert np.all(np.isfinite(np.asarray(q, np.float32)))
    assert float(q.astype(jnp.float32)[0]) == 448.0


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_fp8_dynamic_per_token_math(fmt):
    x = _x((6, 40))
    q, s = qlin.quantize_fp8(x, granularity="per_token", fp8_format=fmt)
    fmax = float(jnp.finfo(q.dtype).max)
    amax = np.abs(np.asarray(x)).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(s), amax / fmax, rtol=1e-6)
    # the absmax element of each row maps exactly to +-fmax
    assert np.allclose(np.abs(np.asarray(q, np.float32)).max(axis=1), fmax)
    deq = np.asarray(q, np.float64) * np.asarray(s)
    rel = np.linalg.norm(deq - np.asarray(x)) / np.linalg.norm(np.asarray(x))
    assert rel < (0.05 if fmt == "e4m3fn" else 0.1)


def test_fp8_scale_ub_caps_per_token_scale():
    x = _x((4, 32)).at[0, 0].set(1000.0)
    q, s = qlin.quantize_fp8(x, granularity="per_token", scale_ub=10.0)
    assert float(s[0, 0]) == pytest.approx(10.0 / 448.0)
    assert float(q.astype(jnp.float32)[0, 0]) == 448.0  # saturated, not NaN
    with pytest.raises(InputError, match="scale_ub"):
        qlin.quantize_fp8(x, granularity="per_tensor", scale_ub=10.0)


def test_per_group_shapes_with_ragged_last_group():
    x = _x((3, 50))
    q, s = qlin.quantize_fp8(x, granularity="per_group", group_size=16)
    assert s.shape == (3, 4) and q.shape == (3, 50)
    amax_last = np.abs(np.asarray(x)[:, 48:]).max(axis=1)
    np.testing.assert_allclose(np.asarray(s)[:, 3], amax_last / 448.0, rtol=1e-6)


def test_per_tensor_and_leading_dims():
    x = _x((2, 3, 16))
    q, s, _ = qlin.quantize_int8(x, granularity="per_tensor")
    assert s.shape == () and q.shape == x.shape and q.dtype == jnp.int8
    q, s, _ = qlin.quantize_int8(x, granularity="per_token")
    assert s.shape == (2, 3, 1)


def test_int8_symmetric_math():
    x = _x((5, 33))
    q, s, zp = qlin.quantize_int8(x)
    assert zp is None
    expect = np.clip(np.round(np.asarray(x) / np.asarray(s)), -128, 127)
    np.testing.assert_array_equal(np.asarray(q), expect)
    assert np.abs(np.asarray(q)).max() == 127


def test_int8_asymmetric_math_roundtrip():
    x = _x((5, 64)) + 3.0  # shifted: asymmetric pays off
    q, s, zp = qlin.quantize_int8(x, symmetric=False)
    assert zp.dtype == jnp.int32 and zp.shape == (5, 1)
    assert np.all(np.asarray(zp) >= -128) and np.all(np.asarray(zp) <= 127)
    deq = (np.asarray(q, np.float64) - np.asarray(zp)) * np.asarray(s)
    assert np.max(np.abs(deq - np.asarray(x))) <= np.max(np.asarray(s)) * 0.5 + 1e-6
    q_sym, s_sym, _ = qlin.quantize_int8(x)
    deq_sym = np.asarray(q_sym, np.float64) * np.asarray(s_sym)
    assert np.linalg.norm(deq - x) < np.linalg.norm(deq_sym - x)


def test_int8_static_asymmetric_requires_zero_point():
    x = _x((2, 16))
    with pytest.raises(InputError, match="zero_point"):
        qlin.quantize_int8(x, scale=0.1, symmetric=False)
    q, s, zp = qlin.quantize_int8(x, scale=0.1, zero_point=jnp.int32(-3), symmetric=False)
    assert int(zp) == -3


@pytest.mark.parametrize("gran, shape", [("per_tensor", ()), ("per_channel", (24,)), ((8, 16), (3, 3))])
@pytest.mark.parametrize("cfg_cls", [FP8ScaledMMConfig, Int8ScaledMMConfig])
def test_quantize_weight_granularities(gran, shape, cfg_cls):
    w = _x((24, 40))
    cfg = cfg_cls(weight_granularity=gran)
    p = qlin.quantize_weight(w, cfg)
    assert p.weight.shape == (24, 40) and p.weight.dtype == cfg.weight_dtype
    assert p.weight_scale.shape == shape and p.weight_scale.dtype == jnp.float32
    deq = np.asarray(qlin.quantize.dequantize_weight(p, cfg), np.float64)
    rel = np.linalg.norm(deq - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert rel < (0.04 if cfg_cls is FP8ScaledMMConfig else 0.01)


def test_quantize_weight_asymmetric_precomputes_azp_adj():
    w = _x((8, 32))
    p = qlin.quantize_weight(w, Int8ScaledMMConfig(symmetric=False))
    np.testing.assert_array_equal(np.asarray(p.azp_adj), np.asarray(p.weight, np.int64).sum(axis=1))
    assert p.azp_adj.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(compute_azp_adj(p.weight)), np.asarray(p.azp_adj))


def test_quantize_weight_static_params():
    w = _x((8, 32))
    cfg = FP8ScaledMMConfig(activation="static")
    with pytest.raises(InputError, match="input_scale"):
        qlin.quantize_weight(w, cfg)
    p = qlin.quantize_weight(w, cfg, input_scale=0.02)
    assert p.input_scale.shape == ()
    with pytest.raises(InputError, match="input_scale: given"):
        qlin.quantize_weight(w, FP8ScaledMMConfig(), input_scale=0.02)


def test_int8_exact_k_bound():
    assert INT8_MAX_EXACT_K * 128 * 128 < 2**31
    assert (INT8_MAX_EXACT_K + 1) * 128 * 128 >= 2**31


def test_calibrate_static_rejects_non_finite():
    with pytest.raises(InputError, match="NaN or inf"):
        qlin.calibrate_static(jnp.array([[1.0, jnp.nan]]), FP8ScaledMMConfig(activation="static"))
    s, zp = qlin.calibrate_static(_x((4, 8)) + 1, Int8ScaledMMConfig(activation="static", symmetric=False))
    assert s.shape == () and zp.shape == ()
