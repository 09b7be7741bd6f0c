"""The ``mosaic_gpu`` MMLinearKernel (qlin/kernels/mosaic_gpu.py), in Mosaic GPU interpret mode.

Checks the lifecycle against the core's float64 oracle (qlin.testing):
odd N / K padded once in ``process_weights_after_loading`` and sliced back,
leading dimensions, every supported activation scheme, symmetric and
asymmetric int8, plus the hardware / config gates and the registration
ahead of ``xla`` on cuda.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qlin import select
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.kernels import mosaic_gpu_scaled_mm as mm
from qlin.kernels.mosaic_gpu import INT8_GEMV_MAX_K, MosaicGPUScaledMMKernel, uses_xla_gemv
from qlin.quantize import quantize_weight
from qlin.testing import reference_linear_np

SMALL = mm.TuningConfig(
    tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
)

CONFIGS = [
    FP8ScaledMMConfig(),
    FP8ScaledMMConfig(weight_granularity="per_tensor", activation="dynamic_per_tensor", out_dtype=jnp.float16),
    FP8ScaledMMConfig(activation="static", out_dtype=jnp.float32),
    Int8ScaledMMConfig(),
    Int8ScaledMMConfig(symmetric=False),
    Int8ScaledMMConfig(symmetric=False, activation="static", weight_granularity="per_tensor"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe().replace(" ", "_"))
def test_apply_weights_matches_float64_oracle(config):
    rng = np.random.default_rng(0)
    n, k = 50, 40  # padded to (64, 64): N to 16 (8 for f32 out), K to 32
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    kw = {}
    if config.is_static:
        kw["input_scale"] = 0.03
        if isinstance(config, Int8ScaledMMConfig) and not config.symmetric:
            kw["input_zero_point"] = 5
    params = quantize_weight(w, config, **kw)
    ker = MosaicGPUScaledMMKernel(config, interpret=True, tuning=SMALL)
    pp = ker.process_weights_after_loading(params)
    n_mult, k_mult = mm.required_alignment(pp.weight.dtype, config.out_dtype)
    assert pp.weight.shape[0] % n_mult == 0 and pp.weight.shape[1] % k_mult == 0
    assert (pp.n, pp.k) == (n, k)
    y = ker.apply_weights(pp, x, bias)
    assert y.shape == (2, 3, n) and y.dtype == config.out_dtype
    ref = reference_linear_np(np.asarray(x), params, config, np.asarray(bias))
    y = np.asarray(y.astype(jnp.float32))
    tol = 1e-5 if config.out_dtype == jnp.float32 else 8e-3
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < tol


@pytest.mark.parametrize("config", [FP8ScaledMMConfig(), Int8ScaledMMConfig(symmetric=False)],
                         ids=lambda c: c.describe().split(" ")[0])
@pytest.mark.parametrize("m", [1, 5])
def test_decode_rows_need_no_pad_before_the_gemm(config, m):
    """M % 8 != 0: the fused quantize kernel allocates the 8-row tile itself (rows past M never written),
    so neither the interpret run nor the CUDA lowering pads q, and the output is still exact."""
    import jax

    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, 128)), jnp.bfloat16)
    params = quantize_weight(w, config)
    ker = MosaicGPUScaledMMKernel(config, interpret=True, tuning=SMALL)
    pp = ker.process_weights_after_loading(params)
    y = ker.apply_weights(pp, x)
    assert y.shape == (m, 64)
    ref = reference_linear_np(np.asarray(x), params, config)
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 8e-3
    gpu = MosaicGPUScaledMMKernel(config, interpret=False)
    text = jax.jit(gpu.apply_weights).trace(pp, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.pad" not in text
    # int8 decode: the xla kernel's quantize + GEMV
    if uses_xla_gemv(pp.weight.dtype, m, pp.weight.shape[1], pp.weight.shape[0]):
        assert "mosaic_gpu" not in text and "stablehlo.dot_general" in text
    else:
        assert text.count("mosaic_gpu") >= 2


def test_int8_gemv_route_truth_table(monkeypatch):
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    # more weight slabs than SMs (448, 896) or unswapped decode tiles (10240: 80-wide): XLA's GEMV
    assert uses_xla_gemv(jnp.int8, 1, 4096, 28672) and uses_xla_gemv(jnp.int8, 1, 8192, 57344)
    assert uses_xla_gemv(jnp.int8, 1, 8192, 10240) and uses_xla_gemv(jnp.int8, 1, INT8_GEMV_MAX_K, 10240)
    assert not uses_xla_gemv(jnp.int8, 1, 28672, 8192)  # long K: the wgmma kernel was faster (H100)
    assert not uses_xla_gemv(jnp.int8, 2, 4096, 6144) and not uses_xla_gemv(jnp.float8_e4m3fn, 1, 4096, 6144)
    # swapped slabs in one wave (96, 128): the kernel was the faster one
    assert not uses_xla_gemv(jnp.int8, 1, 4096, 6144) and not uses_xla_gemv(jnp.int8, 1, 8192, 8192)
    assert not uses_xla_gemv(jnp.int8, 1, INT8_GEMV_MAX_K, 8192)
    # few weight slabs: the kernel splits K between the two CTAs of a cluster and is the faster one
    assert not uses_xla_gemv(jnp.int8, 1, 14336, 4096) and not uses_xla_gemv(jnp.int8, 1, 4096, 4096)
    # ... with a 16-bit output; a float32 one keeps XLA-summed split-K partials or unswapped tiles: the GEMV
    assert uses_xla_gemv(jnp.int8, 1, 14336, 4096, jnp.float32) and uses_xla_gemv(jnp.int8, 1, 4096, 6144, jnp.float32)


@pytest.mark.parametrize(
    "config",
    [
        Int8ScaledMMConfig(activation="static"),
        Int8ScaledMMConfig(symmetric=False),
        Int8ScaledMMConfig(symmetric=False, activation="static", weight_granularity="per_tensor",
                           out_dtype=jnp.float32),
    ],
    ids=lambda c: c.describe().replace(" ", "_"),
)
def test_int8_decode_runs_xla_gemv_and_matches_float64_oracle(config):
    """int8, M = 1: XLA's int8 dot (a GEMV on the GPU) on the padded weight, zero points, bias, N sliced."""
    import jax

    rng = np.random.default_rng(7)
    n, k = 50, 40  # padded to (64, 64)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    kw = {}
    if config.is_static:
        kw["input_scale"] = 0.03
        if not config.symmetric:
            kw["input_zero_point"] = -7
    params = quantize_weight(w, config, **kw)
    ker = MosaicGPUScaledMMKernel(config, interpret=True, tuning=SMALL)
    pp = ker.process_weights_after_loading(params)
    assert pp.weight.shape[0] > n and uses_xla_gemv(pp.weight.dtype, 1, pp.weight.shape[1], pp.weight.shape[0])
    y = ker.apply_weights(pp, x, bias)
    assert y.shape == (1, n) and y.dtype == config.out_dtype
    ref = reference_linear_np(np.asarray(x), params, config, np.asarray(bias, np.float64))
    tol = 1e-5 if config.out_dtype == jnp.float32 else 8e-3
    assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < tol
    gpu = MosaicGPUScaledMMKernel(config, interpret=False)
    text = jax.jit(gpu.apply_weights).trace(pp, x, bias).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.dot_general" in text and "xi8>" in text
    assert "mosaic_gpu" not in text  # jnp quantize (XLA fuses it into the GEMV), no Mosaic kernel


def test_process_weights_is_idempotent_and_pads_once():
    rng = np.random.default_rng(1)
    cfg = Int8ScaledMMConfig(symmetric=False)
    params = quantize_weight(jnp.asarray(rng.standard_normal((50, 40)), jnp.float32), cfg)
    ker = MosaicGPUScaledMMKernel(cfg, interpret=True, tuning=SMALL)
    once = ker.process_weights_after_loading(params)
    twice = ker.process_weights_after_loading(once)
    assert once.weight.shape == twice.weight.shape == (64, 64)
    np.testing.assert_array_equal(np.asarray(once.weight), np.asarray(twice.weight))
    np.testing.assert_array_equal(np.asarray(once.azp_adj), np.asarray(twice.azp_adj))
    # azp_adj = column sums of the (padded) weight over K.
    np.testing.assert_array_equal(np.asarray(once.azp_adj), np.asarray(once.weight, np.int32).sum(axis=1))


def test_aligned_weights_are_not_copied():
    cfg = FP8ScaledMMConfig()
    params = quantize_weight(jnp.ones((64, 128), jnp.float32), cfg)
    pp = MosaicGPUScaledMMKernel(cfg, interpret=True).process_weights_after_loading(params)
    assert pp.weight.shape == (64, 128) and pp.out_features is None


def test_env_forces_interpret(monkeypatch):
    monkeypatch.setenv("QLIN_MOSAIC_INTERPRET", "1")
    assert MosaicGPUScaledMMKernel(FP8ScaledMMConfig()).interpret
    monkeypatch.setenv("QLIN_MOSAIC_INTERPRET", "0")
    assert not MosaicGPUScaledMMKernel(FP8ScaledMMConfig()).interpret


def test_is_supported_only_on_hopper():
    assert MosaicGPUScaledMMKernel.is_supported(90) == (True, None)
    for cc in (80, 89, 100):
        ok, why = MosaicGPUScaledMMKernel.is_supported(cc)
        assert not ok and "9.x" in why
    ok, why = MosaicGPUScaledMMKernel.is_supported()  # the CPU here
    assert not ok and "CUDA" in why


@pytest.mark.parametrize(
    "config, match",
    [
        (FP8ScaledMMConfig(fp8_format="e5m2"), "e4m3fn"),
        (FP8ScaledMMConfig(weight_granularity=(128, 128)), "block-scaled"),
        (Int8ScaledMMConfig(activation="dynamic_per_group", group_size=64), "dynamic_per_group"),
    ],
)
def test_can_implement_rejections(config, match):
    ok, why = MosaicGPUScaledMMKernel.can_implement(config)
    assert not ok and match in why


def test_registered_ahead_of_xla_on_cuda():
    names = [k.name for k in select.registered_kernels("cuda")]
    assert names.index("mosaic_gpu") < names.index("xla")
    assert select.choose_kernel(FP8ScaledMMConfig(), compute_capability=90, platform="cuda").name == "mosaic_gpu"
    assert select.choose_kernel(FP8ScaledMMConfig(), compute_capability=89, platform="cuda").name != "mosaic_gpu"
    assert "mosaic_gpu" not in [k.name for k in select.registered_kernels("cpu")]
