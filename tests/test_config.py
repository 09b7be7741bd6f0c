import jax
import jax.numpy as jnp
import pytest

from qlin import ConfigError, FP8ScaledMMConfig, Int8ScaledMMConfig


def test_defaults_and_normalization():
    c = FP8ScaledMMConfig()
    assert c.weight_granularity == "per_channel" and c.activation == "dynamic_per_token"
    assert c.out_dtype == jnp.dtype(jnp.bfloat16)
    assert FP8ScaledMMConfig(out_dtype="float16").out_dtype == jnp.dtype(jnp.float16)
    assert FP8ScaledMMConfig(weight_granularity=[64, 128]).weight_block == (64, 128)
    assert c.qmax == 448.0 and FP8ScaledMMConfig(fp8_format="e5m2").qmax == 57344.0
    assert Int8ScaledMMConfig().qmax == 127.0


def test_group_size_defaults_to_weight_block_k():
    c = FP8ScaledMMConfig(weight_granularity=(128, 64), activation="dynamic_per_group")
    assert c.group_size == 64
    assert FP8ScaledMMConfig(activation="dynamic_per_group").group_size == 128


def test_frozen_hashable_and_jit_static():
    a, b = FP8ScaledMMConfig(), FP8ScaledMMConfig(out_dtype=jnp.bfloat16)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, Int8ScaledMMConfig()}) == 2
    with pytest.raises(Exception):
        a.activation = "static"  # type: ignore[misc]

    calls = []

    def f(x, config):
        calls.append(config)
        return x.astype(config.out_dtype)

    g = jax.jit(f, static_argnums=1)
    g(jnp.ones(2), a)
    g(jnp.ones(2), b)
    assert len(calls) == 1  # equal configs hit the same trace


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_granularity="per_row"), "weight_granularity"),
        (dict(weight_granularity=(0, 128)), "weight_granularity: block sizes must be positive"),
        (dict(weight_granularity=(1, 2, 3)), "weight_granularity"),
        (dict(activation="per_token"), "activation: expected one of"),
        (dict(out_dtype=jnp.int8), "out_dtype"),
        (dict(out_dtype="not-a-dtype"), "out_dtype"),
        (dict(group_size=64), "group_size: only meaningful"),
        (dict(activation="dynamic_per_group", group_size=0), "group_size: expected a positive int"),
        (dict(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=96), "group_size"),
        (dict(fp8_format="e4m3"), "fp8_format"),
    ],
)
def test_fp8_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FP8ScaledMMConfig(**kwargs)


def test_int8_config_errors():
    with pytest.raises(ConfigError, match="symmetric: expected a bool"):
        Int8ScaledMMConfig(symmetric="no")
    assert Int8ScaledMMConfig(symmetric=False).describe().startswith("int8-asym")
