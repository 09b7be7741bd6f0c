"""Every built-in kernel, every mode, against the float64 NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qlin
from qlin import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.kernels import ReferenceKernel, XLAKernel
from qlin.testing import reference_linear_np
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err

KERNELS = [XLAKernel, ReferenceKernel]

CONFIGS = [
    FP8ScaledMMConfig(weight_granularity="per_tensor", activation="static"),
    FP8ScaledMMConfig(weight_granularity="per_tensor", activation="dynamic_per_tensor"),
    FP8ScaledMMConfig(),
    FP8ScaledMMConfig(fp8_format="e5m2"),
    FP8ScaledMMConfig(weight_granularity=(32, 32), activation="dynamic_per_group", group_size=32),
    FP8ScaledMMConfig(weight_granularity=(16, 32), activation="dynamic_per_token"),
    FP8ScaledMMConfig(activation="dynamic_per_group", group_size=16, out_dtype=jnp.float32),
    Int8ScaledMMConfig(),
    Int8ScaledMMConfig(weight_granularity="per_tensor", activation="static"),
    Int8ScaledMMConfig(symmetric=False),
    Int8ScaledMMConfig(symmetric=False, activation="static", weight_granularity="per_tensor"),
    Int8ScaledMMConfig(symmetric=False, activation="dynamic_per_tensor", out_dtype=jnp.float16),
    Int8ScaledMMConfig(weight_granularity=(32, 32), activation="dynamic_per_group", group_size=32),
    Int8ScaledMMConfig(weight_granularity=(32, 32), activation="dynamic_per_group", group_size=16, symmetric=False),
]


def make_layer(config, n, k, seed=0, shift=0.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(k1, (n, k)) / np.sqrt(k)
    x_cal = jax.random.normal(k2, (64, k)) + shift
    kwargs = {}
    if config.is_static:
        s, zp = qlin.calibrate_static(x_cal, config)
        kwargs = dict(input_scale=s, input_zero_point=zp)
    params = qlin.quantize_weight(w, config, **kwargs)
    bias = jax.random.normal(k3, (n,)) * 0.1
    return w, params, bias


@pytest.mark.parametrize("kernel_cls", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_kernel_matches_float64_oracle(kernel_cls, config):
    n, k = 72, 96
    w, params, bias = make_layer(config, n, k)
    x = jax.random.normal(jax.random.key(7), (2, 9, k), jnp.bfloat16)
    kernel = kernel_cls(config)
    params = kernel.process_weights_after_loading(params)
    y = jax.jit(kernel.apply_weights)(params, x, bias)
    assert y.shape == (2, 9, n) and y.dtype == config.out_dtype
    ref = reference_linear_np(x, params, config, bias)
    assert rel_err(y, ref) < kernel_rtol(config.out_dtype)
    # and the quantized layer is close to the float layer
    y_float = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(bias)
    assert rel_err(y, y_float) < quant_rtol(config)


def _config_strategy():
    fp8 = st.builds(
        FP8ScaledMMConfig,
        weight_granularity=st.sampled_from(["per_tensor", "per_channel", (16, 16), (8, 32)]),
        activation=st.sampled_from(["static", "dynamic_per_tensor", "dynamic_per_token"]),
        out_dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
        fp8_format=st.sampled_from(["e4m3fn", "e5m2"]),
    )
    int8 = st.builds(
        Int8ScaledMMConfig,
        weight_granularity=st.sampled_from(["per_tensor", "per_channel", (16, 16)]),
        activation=st.sampled_from(["static", "dynamic_per_tensor", "dynamic_per_token"]),
        out_dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
        symmetric=st.booleans(),
    )
    grouped_int8 = st.builds(
        Int8ScaledMMConfig,
        weight_granularity=st.sampled_from(["per_channel", (16, 16)]),
        activation=st.just("dynamic_per_group"),
        group_size=st.sampled_from([8, 16]),
        symmetric=st.booleans(),
    )
    grouped = st.builds(
        FP8ScaledMMConfig,
        weight_granularity=st.sampled_from(["per_channel", (16, 16), (4, 32)]),
        activation=st.just("dynamic_per_group"),
        group_size=st.sampled_from([8, 16]),
        out_dtype=st.sampled_from([jnp.bfloat16, jnp.float32]),
    )
    return st.one_of(fp8, int8, grouped, grouped_int8)


@given(
    config=_config_strategy(),
    m=st.integers(1, 40),
    n=st.integers(1, 70),
    k=st.integers(1, 90),
    seed=st.integers(0, 2**16),
    use_bias=st.booleans(),
)
def test_xla_kernel_property(config, m, n, k, seed, use_bias):
    """Any M (from 1), odd N and K, every granularity and dtype: xla == float64 oracle."""
    w, params, bias = make_layer(config, n, k, seed=seed, shift=0.5)
    bias = bias if use_bias else None
    x = jax.random.normal(jax.random.key(seed + 1), (m, k), jnp.float32) + 0.5
    y = qlin.linear(x, params, config, bias, kernel="xla")
    assert y.shape == (m, n)
    ref = reference_linear_np(x, params, config, bias)
    assert rel_err(y, ref) < kernel_rtol(config.out_dtype)


def test_vmap_over_leading_dims_matches_batched_call():
    config = FP8ScaledMMConfig()
    _, params, bias = make_layer(config, 24, 48)
    kernel = XLAKernel(config)
    x = jax.random.normal(jax.random.key(3), (5, 3, 48))
    batched = kernel.apply_weights(params, x, bias)
    mapped = jax.vmap(lambda xi: kernel.apply_weights(params, xi, bias))(x)
    np.testing.assert_array_equal(np.asarray(batched, np.float32), np.asarray(mapped, np.float32))


def test_apply_weights_accepts_a_layer_object():
    from types import SimpleNamespace

    config = Int8ScaledMMConfig(symmetric=False)
    _, params, _ = make_layer(config, 16, 32)
    layer = SimpleNamespace(**params.to_mapping())
    kernel = XLAKernel(config)
    x = jax.random.normal(jax.random.key(1), (4, 32))
    np.testing.assert_array_equal(np.asarray(kernel.apply_weights(layer, x), np.float32),
                                  np.asarray(kernel.apply_weights(params, x), np.float32))


def test_process_weights_is_functional_and_normalizes():
    config = FP8ScaledMMConfig()
    _, params, _ = make_layer(config, 16, 32)
    vllm_style = params.replace(weight_scale=params.weight_scale.reshape(16, 1))  # vLLM ships (N, 1)
    out = XLAKernel(config).process_weights_after_loading(vllm_style)
    assert out.weight_scale.shape == (16,) and vllm_style.weight_scale.shape == (16, 1)
    assert out is not vllm_style


def test_asymmetric_int8_fills_missing_azp_adj():
    config = Int8ScaledMMConfig(symmetric=False)
    _, params, _ = make_layer(config, 16, 32)
    stripped = params.replace(azp_adj=None)
    out = XLAKernel(config).process_weights_after_loading(stripped)
    np.testing.assert_array_equal(np.asarray(out.azp_adj), np.asarray(params.azp_adj))


def test_xla_per_channel_path_is_an_8bit_dot():
    """The fast path must hand XLA an 8-bit dot, never dequantize-then-dot."""
    for config, dt in [(FP8ScaledMMConfig(), "f8E4M3FN"), (Int8ScaledMMConfig(symmetric=False), "i8")]:
        _, params, _ = make_layer(config, 16, 32)
        x = jnp.ones((4, 32), jnp.bfloat16)
        hlo = jax.jit(XLAKernel(config).apply_weights).lower(params, x).as_text()
        dots = [line for line in hlo.splitlines() if "dot_general" in line]
        assert dots and all(f"x{dt}>" in line for line in dots), dots


def test_linear_and_quantized_linear_agree():
    config = Int8ScaledMMConfig()
    w, params, bias = make_layer(config, 40, 24)
    layer = qlin.QuantizedLinear.from_float(w, config, bias)
    x = jax.random.normal(jax.random.key(2), (3, 24))
    np.testing.assert_array_equal(np.asarray(layer(x), np.float32),
                                  np.asarray(qlin.linear(x, params, config, bias), np.float32))
    assert (layer.in_features, layer.out_features) == (24, 40)
    assert "QuantizedLinear(24 -> 40" in repr(layer)
