"""Block-scaled FP8 Mosaic GPU kernel (qlin/kernels/mosaic_gpu_block_scaled_mm.py) and its
MMLinearKernel ``mosaic_gpu_block`` (qlin/kernels/mosaic_gpu_block.py).

The kernel runs on the CPU in Mosaic GPU interpret mode against a float64
NumPy reference built from the same 8-bit operands and block scales; the
MMLinearKernel against qlin's float64 oracle (``reference_linear_np``) and the
reference kernel.  Interpret mode checks neither shared-memory size nor wgmma /
TMA layouts, so every real configuration is also cross-lowered for CUDA on
the CPU.  benchmarks/gpu_block_check.py runs the same kernel on an H100.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlin import select
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.errors import ConfigError
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel
from qlin.kernels.mosaic_gpu_block import MosaicGPUBlockFP8Kernel
from qlin.kernels.reference import ReferenceKernel
from qlin.quantize import quantize_weight
from qlin.testing import load_script, reference_linear_np
from qlin.tolerances import kernel_rtol, rel_err

F8 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct
BLOCK_CFG = FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=128)

# Small tiles keep interpret mode fast; every warpgroup layout is covered.
ONE_WG = bmm.BlockTuningConfig(
    tile_m=64, tile_n=32, max_concurrent_steps=2, num_compute_wgs=1, wg_dimension="n", grid_tile_width=1, epi_tile_n=32
)
TWO_WG_M = bmm.BlockTuningConfig(
    tile_m=64, tile_n=32, max_concurrent_steps=3, num_compute_wgs=2, wg_dimension="m", grid_tile_width=2, epi_tile_n=16
)
# Two K blocks per pipeline step (two accumulators), including a partial last step.
K256 = bmm.BlockTuningConfig(
    tile_m=64,
    tile_n=32,
    tile_k=256,
    max_concurrent_steps=2,
    num_compute_wgs=2,
    wg_dimension="m",
    grid_tile_width=1,
    epi_tile_n=32,
)
# 64 x 256 warpgroup tiles: two weight-scale blocks through one temporary accumulator.
N256 = bmm.BlockTuningConfig(
    tile_m=64, tile_n=256, max_concurrent_steps=2, num_compute_wgs=2, wg_dimension="m", epi_tile_n=64, epi_slots=1
)
N256_WG_N = bmm.BlockTuningConfig(
    tile_m=64, tile_n=256, max_concurrent_steps=2, num_compute_wgs=2, wg_dimension="n", epi_tile_n=32
)
# 64 x 192 warpgroup tiles: one wgmma across the weight-scale block boundary, three 64-column pieces
# promoted (tiles start at column offsets 0 and 64 of a block: N = 400 / 592 has both, and a partial tile).
WIDE_M = bmm.BlockTuningConfig(
    tile_m=64, tile_n=192, max_concurrent_steps=2, num_compute_wgs=2, wg_dimension="m", epi_tile_n=64, epi_slots=1
)
WIDE_N = dataclasses.replace(WIDE_M, wg_dimension="n", epi_tile_n=32)
TWO_WG_N = bmm.BlockTuningConfig(
    tile_m=64,
    tile_n=64,
    max_concurrent_steps=2,
    num_compute_wgs=2,
    wg_dimension="n",
    grid_minor_dim="n",
    grid_tile_width=1,
    epi_tile_n=32,
    epi_slots=1,
)


# Overlapped promotion (two ping-pong accumulators, stages released one step late): the
# parity-picked accumulator (tile_k=128), the static pair (tile_k=256), warpgroups along N,
# one warpgroup with a full 128-wide weight-scale block.
OV_K128 = dataclasses.replace(TWO_WG_M, overlap=True)
OV_K256 = dataclasses.replace(K256, overlap=True)
OV_WG_N = dataclasses.replace(TWO_WG_N, overlap=True)
OV_ONE_WG = bmm.BlockTuningConfig(
    tile_n=128, max_concurrent_steps=3, num_compute_wgs=1, wg_dimension="n", epi_tile_n=64, overlap=True
)
OVERLAP_CONFIGS = (OV_K128, OV_K256, OV_WG_N, OV_ONE_WG)


# Rescaled accumulation (one accumulator in the current K block's units): 128-row warpgroup tiles
# along N and along M, 64-row tiles, two K blocks per step.
RS_M128_WG_N = bmm.BlockTuningConfig(
    tile_m=128, tile_n=32, max_concurrent_steps=2, num_compute_wgs=2, wg_dimension="n", grid_tile_width=1,
    epi_tile_n=16, epi_slots=1, rescale=True,
)  # fmt: skip
RS_M128_WG_M = dataclasses.replace(RS_M128_WG_N, wg_dimension="m", grid_tile_width=2)
RS_TWO_WG_M = dataclasses.replace(TWO_WG_M, rescale=True)
RS_K256 = dataclasses.replace(K256, rescale=True)
RS_ONE_WG = dataclasses.replace(ONE_WG, rescale=True)
RESCALE_CONFIGS = (RS_M128_WG_N, RS_M128_WG_M, RS_TWO_WG_M, RS_K256, RS_ONE_WG)

# Three consumer warpgroups (the M >= 1024 default is 3 x 64 x 128 along M): GPU only -- jax
# 0.11.2's interpreter can deadlock with four warpgroups per CTA (seen here under CPU load), so CI
# cross-lowers them and benchmarks/gpu_block_check.py --phases wg3 runs them on an H100.
W3_M = bmm.BlockTuningConfig(
    tile_m=64, tile_n=32, max_concurrent_steps=3, num_compute_wgs=3, wg_dimension="m", grid_tile_width=2,
    epi_tile_n=16, epi_slots=1,
)  # fmt: skip
W3_N = dataclasses.replace(W3_M, wg_dimension="n", grid_minor_dim="n", grid_tile_width=1)


def _cdiv(a, b):
    return -(-a // b)


def _operands(rng, m, n, k, bias=False):
    a = np.asarray(jnp.asarray(rng.standard_normal((m, k)) * 3, F8))
    b = np.asarray(jnp.asarray(rng.standard_normal((n, k)) * 3, F8))
    # Scales spanning 2**-5 .. 2**2 (outputs stay inside float16): a kernel that applied one
    # block's scale to another block (or skipped the promotion) would be far off.
    a_s = np.exp2(rng.uniform(-5, 2, (m, _cdiv(k, 128)))).astype(np.float32)
    b_s = np.exp2(rng.uniform(-5, 2, (_cdiv(n, 128), _cdiv(k, 128)))).astype(np.float32)
    bias_v = rng.standard_normal(n).astype(np.float32) * 50 if bias else None
    return a, b, a_s, b_s, bias_v


def _reference(a, b, a_s, b_s, bias=None):
    _m, k = a.shape
    n = b.shape[0]
    xa = a.astype(np.float64) * np.repeat(a_s.astype(np.float64), 128, axis=1)[:, :k]
    wb = b.astype(np.float64) * np.repeat(np.repeat(b_s.astype(np.float64), 128, axis=0), 128, axis=1)[:n, :k]
    y = xa @ wb.T
    return y if bias is None else y + bias.astype(np.float64)


def _run(ops, out_dtype, config):
    a, b, a_s, b_s, bias = ops
    out = bmm.block_scaled_mm(
        jnp.asarray(a, F8),
        jnp.asarray(b, F8),
        jnp.asarray(a_s),
        jnp.asarray(b_s),
        bias=None if bias is None else jnp.asarray(bias),
        out_dtype=out_dtype,
        config=config,
        interpret=True,
    )
    assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == jnp.dtype(out_dtype)
    return np.asarray(out.astype(jnp.float32))


def _case_id(c):
    """pytest id of an (M, N, K, bias, out_dtype, config) case."""
    return f"M{c[0]}N{c[1]}K{c[2]}-bias{int(c[3])}-{jnp.dtype(c[4]).name}-{c[5].short()}"


CASES = [
    # (M, N, K, bias, out_dtype, config): partial M / N tiles, N blocks split across
    # warpgroup tiles, K a multiple of 128 but not of the pipeline depth, K % 128 != 0.
    (100, 48, 256, True, jnp.bfloat16, ONE_WG),
    (7, 176, 384, False, jnp.float16, ONE_WG),
    (1, 32, 128, True, jnp.float32, ONE_WG),
    (130, 176, 640, True, jnp.bfloat16, TWO_WG_M),
    (65, 272, 416, False, jnp.float32, TWO_WG_M),
    (70, 272, 384, True, jnp.float32, TWO_WG_N),
    (9, 400, 160, False, jnp.bfloat16, TWO_WG_N),
    (130, 48, 640, True, jnp.bfloat16, K256),
    (5, 176, 96, False, jnp.float32, K256),
    (70, 400, 640, True, jnp.bfloat16, N256),
    (130, 272, 384, False, jnp.float32, N256),
    (9, 560, 256, True, jnp.float16, N256_WG_N),
    (130, 400, 384, True, jnp.bfloat16, WIDE_M),
    (70, 592, 416, False, jnp.float32, WIDE_M),
    (9, 400, 256, True, jnp.float16, WIDE_N),
    # rescaled accumulation: 128-row warpgroup tiles at M = 100 / 130 / 257, K % 128 != 0, one K block
    (130, 176, 640, True, jnp.bfloat16, RS_M128_WG_N),
    (100, 48, 416, False, jnp.float32, RS_M128_WG_N),
    (257, 80, 384, True, jnp.float16, RS_M128_WG_M),
    (7, 272, 128, False, jnp.float32, RS_M128_WG_M),
    (130, 176, 640, True, jnp.bfloat16, RS_TWO_WG_M),
    (65, 48, 640, False, jnp.float32, RS_K256),
    (5, 176, 96, True, jnp.bfloat16, RS_K256),
    (1, 32, 256, True, jnp.float32, RS_ONE_WG),
]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpret_matches_float64_reference(case):
    m, n, k, bias, od, cfg = case
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    ops = _operands(rng, m, n, k, bias)
    out = _run(ops, od, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(od)


@pytest.mark.parametrize("bias_dtype", [jnp.float32, jnp.bfloat16])
def test_two_narrow_warpgroups_along_n_with_bias(bias_dtype):
    """2 x 16-wide warpgroup tiles along N: each warpgroup's bias row is TMA'd into its own 128-byte
    aligned slot (a 64-byte row put the second one off TMA's grid: CUDA_ERROR_MISALIGNED_ADDRESS on an
    H100). Interpret mode cannot see alignment; this checks the padded rows are read back right."""
    cfg = dataclasses.replace(ONE_WG, tile_n=16, epi_tile_n=16, num_compute_wgs=2, wg_dimension="n")
    rng = np.random.default_rng(16)
    a, b, a_s, b_s, bias = _operands(rng, 70, 80, 256, bias=True)
    bias = np.asarray(jnp.asarray(bias, bias_dtype).astype(jnp.float32))
    out = bmm.block_scaled_mm(
        jnp.asarray(a, F8), jnp.asarray(b, F8), jnp.asarray(a_s), jnp.asarray(b_s),
        bias=jnp.asarray(bias, bias_dtype), out_dtype=jnp.bfloat16, config=cfg, interpret=True,
    )
    ref = _reference(a, b, a_s, b_s, bias)
    assert rel_err(np.asarray(out.astype(jnp.float32)), ref) < kernel_rtol(jnp.bfloat16)


def test_each_k_block_gets_its_own_scales():
    # f32 output, exact small integers: every K block contributes with its own activation and
    # weight scale (powers of two, so the sum is exact in float32 up to rounding of the total).
    rng = np.random.default_rng(5)
    m, n, k = 64, 256, 384
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (n, k)).astype(np.float32)
    a_s = np.exp2(rng.integers(-3, 4, (m, 3))).astype(np.float32)
    b_s = np.exp2(rng.integers(-3, 4, (2, 3))).astype(np.float32)
    ops = (np.asarray(jnp.asarray(a, F8)), np.asarray(jnp.asarray(b, F8)), a_s, b_s, None)
    out = _run(ops, jnp.float32, ONE_WG)
    np.testing.assert_array_equal(out, _reference(*ops).astype(np.float32))


@pytest.mark.parametrize("m", [200, 130, 128, 100])
def test_the_last_row_of_tiles_ends_at_m(m):
    # M = 200 / 130 with 128-row CTA tiles: the last row of tiles starts at M - 128 and writes the rows it
    # shares with the row before again (the same values: exact small integers in float32, every row checked);
    # M = 128 (whole tiles) and 100 (less than one tile: zero-filled rows past M) keep their tiles.
    rng = np.random.default_rng(m)
    k = 384
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (272, k)).astype(np.float32)
    a_s = np.exp2(rng.integers(-3, 4, (m, 3))).astype(np.float32)
    b_s = np.exp2(rng.integers(-3, 4, (3, 3))).astype(np.float32)
    ops = (np.asarray(jnp.asarray(a, F8)), np.asarray(jnp.asarray(b, F8)), a_s, b_s, None)
    for cfg in (TWO_WG_M, K256, RS_M128_WG_N):
        assert cfg.cta_tile_m == 128
        np.testing.assert_array_equal(_run(ops, jnp.float32, cfg), _reference(*ops).astype(np.float32))


def test_two_k_blocks_a_step_tile_in_interpret_mode():
    # the mid / M < 2048 default's layout (two 64 x 128 warpgroups, 256-deep steps) at partial M, N and K tiles
    # (K = 416: the second step's second block is past K)
    rng = np.random.default_rng(11)
    ops = _operands(rng, 130, 272, 416, bias=True)
    out = _run(ops, jnp.bfloat16, bmm._two_block_step_tile())
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)


def test_default_config_runs_in_interpret_mode():
    rng = np.random.default_rng(3)
    ops = _operands(rng, 5, 32, 256, bias=True)
    out = _run(ops, jnp.bfloat16, None)  # config=None: the heuristic
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)


@settings(max_examples=4, deadline=None)
@given(
    m=st.integers(1, 140),
    n16=st.integers(1, 20),
    kb=st.integers(1, 3),
    k_tail=st.sampled_from([0, 32, 96]),
    cfg=st.sampled_from([ONE_WG, TWO_WG_M, TWO_WG_N, K256, N256, N256_WG_N, bmm._two_block_step_tile()]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(m, n16, kb, k_tail, cfg, seed):
    n = 16 * n16
    k = 128 * kb - k_tail
    ops = _operands(np.random.default_rng(seed), m, n, k, bias=bool(seed % 2))
    out = _run(ops, jnp.bfloat16, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)


# -- early stage release (config.early_release) ---------------------------------------------------

ER = functools.partial(dataclasses.replace, early_release=True)
EARLY_RELEASE_CASES = [
    # (M, N, K, bias, out_dtype, config): more K steps than pipeline stages, so a stage that were never
    # handed back would stall the producer (the interpreter would hang); every promoted warpgroup layout.
    (130, 48, 640, True, jnp.bfloat16, ER(K256)),  # 3 steps of 256, the last one half past K
    (70, 400, 640, True, jnp.float32, ER(N256)),  # 64 x 256 tiles: the stage is released after both halves
    (130, 400, 384, False, jnp.bfloat16, ER(WIDE_M)),  # 192-wide tiles
    (70, 272, 512, True, jnp.float16, ER(TWO_WG_N)),
    (100, 48, 640, False, jnp.bfloat16, ER(ONE_WG)),
    (257, 272, 992, True, jnp.bfloat16, bmm._two_block_step_tile()),  # the heuristic's (early release on)
]


@pytest.mark.parametrize("case", EARLY_RELEASE_CASES, ids=_case_id)
def test_early_release_interpret_matches_float64_reference(case):
    m, n, k, bias, od, cfg = case
    assert cfg.early_release and _cdiv(k, cfg.tile_k) > cfg.max_concurrent_steps
    ops = _operands(np.random.default_rng(m + n + k), m, n, k, bias)
    assert rel_err(_run(ops, od, cfg), _reference(*ops)) < kernel_rtol(od)


def test_early_release_is_the_two_block_tiles_and_only_theirs():
    # H100 (results/h100_ab_block_release.md, same run each): the two-block tile (three 256-deep stages)
    # level or up to 11 % faster with its stages released before the promotion at 30 of 32 pairs over 28 grid
    # shapes from M = 256 to 2048 (0.97 / 0.995 at 1024 x 4096^2, two runs); the three-warpgroup (four stages)
    # and 128 x 192 (five) tiles 1-3 % slower with it (three barrier arrivals a step, for a stage the producer
    # was not short of).
    two = bmm._two_block_step_tile()
    assert two.early_release and two.short().endswith("q")
    assert not bmm._three_wg_tile().early_release and not bmm._wide_tile().early_release
    for m, n, k in ((256, 8192, 8192), (512, 4096, 4096), (1024, 8192, 8192), (2048, 4096, 4096)):
        assert bmm.default_config(m, n, k) == bmm._fit_smem(two, jnp.dtype(jnp.bfloat16)), (m, n, k)
    for m, n, k in ((16, 4096, 4096), (4096, 4096, 4096), (1024, 6144, 4096)):
        assert not bmm.default_config(m, n, k).early_release
        assert not bmm.default_config(m, n, k, fast_accum=True).early_release
    assert bmm.BlockTuningConfig.from_dict({"tile_n": 128}).early_release is False  # older tuning caches


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(early_release=True, overlap=True), r"early_release .* promoted accumulation only"),
        (dict(early_release=True, rescale=True), r"early_release .* promoted accumulation only"),
        (dict(early_release=1), r"config.early_release=1 must be True or False"),
    ],
)
def test_early_release_config_validation(change, match):
    cfg = dataclasses.replace(bmm.BlockTuningConfig(), **change)
    with pytest.raises((ValueError, TypeError), match=match):
        bmm.block_scaled_mm(*_args(), config=cfg, interpret=True)


def test_early_release_ab_script_layouts_are_valid_and_cross_lower():
    # benchmarks/ab_block_release.py (GPU: check + A/B): every layout it checks is a valid promoted config with
    # the flag on, and the real tiles with it lower for CUDA (the manual consumed barriers)
    mod = load_script("benchmarks/ab_block_release.py")
    assert {"w2m_k256", "w3m_tn128", "w2m_tn192", "w2m_tn256"} <= set(mod.PROMOTED)
    for cfg in mod.PROMOTED.values():
        bmm._validate_config(mod.early(bmm._fit_smem(cfg, jnp.dtype(jnp.float32))), jnp.dtype(jnp.float32))
    d = bmm.default_config(4096, 4096, 4096)
    assert [mod.early(*mod.SIDES[s](d)).early_release for s in ("off", "on", "k256", "k256_on")] == [
        False, True, False, True
    ]
    for cfg in (bmm._two_block_step_tile(), mod.early(bmm._three_wg_tile()), mod.early(bmm._wide_tile())):
        _lower(1000, 13664, 4096, jnp.bfloat16, bmm._fit_smem(cfg, jnp.bfloat16))


# -- overlapped promotion (config.overlap) --------------------------------------------------------

OVERLAP_CASES = [
    # (M, N, K, bias, out_dtype, config).  Pipeline steps: K / tile_k rounded up; an odd count
    # leaves the last K block in the first accumulator, an even one in the second (tile_k=128).
    (130, 176, 640, True, jnp.bfloat16, OV_K128),  # 5 steps, partial M and N tiles
    (65, 272, 416, False, jnp.float32, OV_K128),  # 4 steps, partial last K block (416 = 3.25 x 128)
    (9, 48, 128, True, jnp.float16, OV_K128),  # a single K block: no overlap (nothing to release late)
    (130, 48, 640, True, jnp.bfloat16, OV_K256),  # 3 steps, K not a multiple of 256
    (70, 176, 1024, False, jnp.float16, OV_K256),  # 4 full steps
    (5, 48, 96, False, jnp.float32, OV_K256),  # one partial step
    (70, 272, 384, True, jnp.float32, OV_WG_N),
    (33, 400, 160, False, jnp.bfloat16, OV_WG_N),  # 2 steps, the second a 32-wide K block
    (100, 272, 512, True, jnp.bfloat16, OV_ONE_WG),
]


@pytest.mark.parametrize("case", OVERLAP_CASES, ids=_case_id)
def test_overlap_interpret_matches_float64_reference(case):
    m, n, k, bias, od, cfg = case
    rng = np.random.default_rng(m * 7919 + n * 31 + k + 1)
    ops = _operands(rng, m, n, k, bias)
    out = _run(ops, od, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(od)


@pytest.mark.parametrize("cfg", [OV_K128, OV_K256], ids=lambda c: c.short())
@pytest.mark.parametrize("kb", [3, 4])
def test_overlap_promotes_each_k_block_with_its_own_scales(cfg, kb):
    # Exact f32 result from small integers and power-of-two scales: a promotion that used the
    # current step's scales for the previous step's accumulator (or dropped the last block, or
    # promoted one twice) is off by whole scale factors.  kb = 3 / 4 K blocks: both parities
    # of the last accumulator with tile_k=128, a partial and a full last step with tile_k=256.
    rng = np.random.default_rng(kb)
    m, n, k = 128, 64, 128 * kb
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (n, k)).astype(np.float32)
    a_s = np.exp2(rng.integers(-3, 4, (m, kb))).astype(np.float32)
    b_s = np.exp2(rng.integers(-3, 4, (1, kb))).astype(np.float32)
    ops = (np.asarray(jnp.asarray(a, F8)), np.asarray(jnp.asarray(b, F8)), a_s, b_s, None)
    out = _run(ops, jnp.float32, cfg)
    np.testing.assert_array_equal(out, _reference(*ops).astype(np.float32))


@settings(max_examples=3, deadline=None)
@given(
    m=st.integers(1, 140),
    n16=st.integers(1, 12),
    kb=st.integers(1, 5),
    k_tail=st.sampled_from([0, 32, 96]),
    cfg=st.sampled_from(OVERLAP_CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_overlap_hypothesis_shapes(m, n16, kb, k_tail, cfg, seed):
    n = 16 * n16
    k = 128 * kb - k_tail
    ops = _operands(np.random.default_rng(seed), m, n, k, bias=bool(seed % 2))
    out = _run(ops, jnp.bfloat16, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)


def test_overlap_config_validation():
    # 64 x 256 warpgroup tiles: total (128) + two 64 x 128 accumulators = 256 registers.
    wide = dataclasses.replace(N256, overlap=True)
    with pytest.raises(
        ValueError, match=r"config m64n256k128\S*o \(tile 64x256.*overlap=True.*needs 256 f32 registers"
    ):
        bmm.block_scaled_mm(*_args(), config=wide, interpret=True)
    assert bmm._acc_registers(OV_ONE_WG) == bmm.MAX_ACC_REGISTERS == 192
    with pytest.raises(TypeError, match=r"config.overlap='yes' must be True or False"):
        bmm.block_scaled_mm(*_args(), config=dataclasses.replace(ONE_WG, overlap="yes"), interpret=True)
    assert OV_K128.short() == TWO_WG_M.short() + "o"
    assert bmm.BlockTuningConfig.from_dict(OV_K256.to_dict()) == OV_K256


def test_overlap_variants_close_the_large_m_candidates_and_are_never_the_default():
    # measured slower on an H100 (0.17-0.34 of the per-channel kernel): swept last
    for n, k in LLAMA:
        for m in (1, 16, 64, 128, 256, 512, 1024, 4096, 8192):
            assert not bmm.default_config(m, n, k).overlap
        for m in (1024, 4096):
            cands = bmm.candidate_configs(m, n, k)
            flags = [c.overlap for c in cands]
            assert not any(flags[:-5]) and all(flags[-5:])
            default = cands[0]
            wgs = 3 if m >= 2048 else 2
            assert default.tile_n in ((128,) if m >= 2048 else (128, 192))  # 128 x 192 at some M = 1024 shapes
            assert (default.num_compute_wgs, default.wg_dimension) == (wgs, "m")
            assert {(c.tile_k, c.wg_dimension) for c in cands if c.overlap} == {(128, "m"), (256, "m"), (128, "n")}


def test_two_k_blocks_a_step_from_mid_m(monkeypatch):
    # H100 (results/h100_block_k256_sweep*.json): 128 x 128 tiles with two K blocks a step ran 0.80-0.83 of the
    # per-channel kernel at M = 1024 (0.73-0.77 with one), 0.79-0.87 at M = 512 (the 64 x 256 tile the traffic
    # model picked there: 0.34-0.58).
    monkeypatch.setattr(bmm, "num_sms", lambda: 132)
    two = bmm._two_block_step_tile()
    assert (two.tile_m, two.tile_n, two.tile_k, two.num_compute_wgs, two.wg_dimension) == (64, 128, 256, 2, "m")
    assert bmm._acc_registers(two) == bmm.MAX_ACC_REGISTERS
    for n, k in LLAMA:
        for m in (1000, 1024):  # 192-row tiles would put 12.5 % of M past it (128 x 192 where they fill the waves)
            assert dataclasses.replace(bmm.default_config(m, n, k), cluster=None) in (two, bmm._wide_tile())
        assert bmm.default_config(512, n, k) == two
    assert bmm.default_config(256, 8192, 8192) == two
    assert bmm.default_config(256, 4096, 14336).tile_n == 64  # the model's 64-wide tiles stay (0.78 vs 0.66)
    for m in (129, 256, 512, 1024):  # never the 64 x 256 warpgroup tile by default from M = 129
        for n, k in LLAMA:
            assert bmm.default_config(m, n, k).tile_n <= bmm.WIDE_TILE_N
    assert bmm.default_config(128, 28672, 4096).tile_n == 256  # one row of tiles: not timed with two blocks


def test_three_warpgroups_where_the_wave_model_takes_them(monkeypatch):
    # H100 (results/h100_block_m_tail.json, h100_block_grid13.md): 192 x 128 tiles (three warpgroups) against
    # 128 x 128 two-block tiles, per-channel time / block time: 0.87 vs 0.65 at 768 x 4096^2, 0.96 vs 0.79 at
    # 1100 x 8192^2, 0.91 vs 0.82 at 1536 x 28672 x 4096, 0.85 vs 0.75 at 4096 x 8192^2; two-block tiles 0.80
    # vs 0.62 at 1024 x 4096 x 14336, 0.83 vs 0.64 at 1024 x 6144 x 4096 (fewer, fuller waves).
    monkeypatch.setattr(bmm, "num_sms", lambda: 132)
    three = bmm._fit_smem(bmm._three_wg_tile("m", width=4), jnp.dtype(jnp.bfloat16))
    assert (three.num_compute_wgs, three.tile_m, three.tile_n, three.cta_tile_m) == (3, 64, 128, 192)
    for n, k in LLAMA:
        for m in (768, 1536, 2048, 4096, 8192):  # (the last wave cut in two or not: see the tail_split tests)
            if (m, n, k) == (2048, 4096, 4096):
                continue  # two-block tiles (below)
            assert dataclasses.replace(bmm.default_config(m, n, k), tail_split=1) == three, (m, n, k)
    for m, n, k in ((1100, 8192, 8192), (1152, 4096, 14336), (768, 10240, 8192)):
        assert dataclasses.replace(bmm.default_config(m, n, k), tail_split=1) == three
    # The model: waves x tile area x relative time; at as many waves x area, three warpgroups (the cheaper
    # per output element)...
    assert bmm._wave_cost(768, 8192, 192, 128, 132, 1.0) == bmm._wave_cost(768, 8192, 128, 128, 132, 1.0)
    assert bmm._promoted_tile_cost(768, 8192, 132)[1].num_compute_wgs == 3
    # ...two-block tiles (stages released early) at K <= 4096 where they need >= 1 / 1.1 fewer waves x tile
    # area: 2048 x 4096^2, 2.67 waves of 192 x 128 tiles against 3.9 of 128 x 128 (H100,
    # results/h100_ab_block_release.md: 61.6 vs 64.6 us); at longer K 1.2 (4096 x 14336 199.0 vs 201.5,
    # 8192^2 230.8 vs 225.5, 8192 x 28672 859.5 vs 751.4)
    assert bmm._two_block_rel_time(4096) == 1.1
    assert bmm._two_block_rel_time(8192) == bmm._two_block_rel_time(None) == 1.2
    assert bmm.default_config(2048, 4096, 4096) == bmm._two_block_step_tile()
    assert bmm.default_config(2048, 4096, 14336).num_compute_wgs == 3
    assert bmm.default_config(2048, 6144, 4096).num_compute_wgs == 3  # (as many waves x area: 1.1 loses)
    # ...and two-block tiles where 192-row ones put more than 5 % of M past it, whatever the waves say
    assert bmm._wave_cost(1024, 8192, 192, 128, 132, 1.0) < bmm._wave_cost(1024, 8192, 128, 128, 132, 1.2)
    assert bmm.default_config(1024, 8192, 8192).num_compute_wgs == 2
    assert bmm.default_config(2176, 8192, 8192).num_compute_wgs == 2  # 128 of 2176 rows past M
    for m in (513, 600, 1000, 1100, 1536, 2047, 2048, 3000, 4096):  # every choice is one of the three tiles (8192^2:
        # too small a weight for clusters)
        cfg = dataclasses.replace(bmm.default_config(m, 8192, 8192), tail_split=1)
        assert cfg in (three, bmm._two_block_step_tile(), bmm._wide_tile())


def test_wide_tiles_where_the_wave_model_gives_them_ten_percent(monkeypatch):
    # H100 (results/h100_block_wide_sweep{,2}.json, same run each): 128 x 192 tiles against the two-block
    # tile at M = 1024: 6144 x 4096 45.4 vs 46.8 us, 28672 x 4096 212.4 vs 216.3, 57344 x 8192 805.8 vs
    # 878.1 (the model: 0.83 / 0.89 / 0.85 of the two-block time at three warpgroups' rate) -> taken;
    # 8192^2 123.0 vs 118.7 and 10240 x 8192 163.6 vs 147.6 (0.94 / 1.0) -> not.  At longer K the wide tile's
    # cost falls (_wide_rel_time; results/h100_block_wide_k_sweep.json): 8192 x 28672 416.7 vs 439.5 and
    # 8192 x 14336 210.0 vs 213.0 -> taken; 10240 x 14336 / 28672 282.6 vs 266.1, 560.4 vs 545.3 -> not.
    # M = 600 (results/h100_block_wide_check_time.json): 4096^2 24.5 vs 31.5, 4096 x 14336 72.4 vs 95.9,
    # 8192^2 86.5 vs 90.4, 28672 x 4096 141.6 vs 140.8.
    monkeypatch.setattr(bmm, "num_sms", lambda: 132)
    wide = bmm._wide_tile()
    assert (wide.tile_m, wide.tile_n, wide.cta_tile_m, wide.cta_tile_n, wide.tile_k) == (64, 192, 128, 192, 128)
    assert bmm._acc_registers(wide) == bmm.MAX_ACC_REGISTERS  # 96 total + 96 accumulator
    for n, k in ((6144, 4096), (28672, 4096), (57344, 8192), (8192, 14336)):
        assert bmm.default_config(1024, n, k) == wide, (n, k)
    assert bmm.default_config(1024, 8192, 28672).cluster == "m"  # (two-block clusters: see the cluster tests)
    for n, k in ((8192, 8192), (8192, 4096), (10240, 8192), (10240, 14336), (10240, 28672), (4096, 4096),
                 (4096, 14336)):  # fmt: skip
        # (10240 x 28672: 294 MB of weight, the two-block tile in clusters)
        assert dataclasses.replace(bmm.default_config(1024, n, k), cluster=None) == bmm._two_block_step_tile(), (n, k)
    assert bmm._wide_rel_time(None) == bmm._wide_rel_time(8192) == 1.1
    assert bmm._wide_rel_time(16384) == pytest.approx(1.05) and bmm._wide_rel_time(28672) < bmm._wide_rel_time(14336)
    for m in (768, 1280, 1536):  # three warpgroups stay the fastest there (h100_block_wide_k_sweep.json)
        assert bmm.default_config(m, 8192, 28672).num_compute_wgs == 3, m
    for n, k in ((4096, 4096), (4096, 14336), (8192, 8192)):
        assert bmm.default_config(600, n, k) == wide, (n, k)
    for n, k in LLAMA:  # from M = 2048 three warpgroups' fuller or cut waves win the model (or two-block tiles)
        for m in (2048, 4096, 8192):
            assert bmm.default_config(m, n, k).tile_n == 128, (m, n, k)
    # the wide tile never where three warpgroups take less time by the model: 1280 x 26624 x 4096 (three 288.8k,
    # two-block 288.4k at 1.1 / 314.6k at the 1.2 the wide tile is weighed against, the wide tile 297.4k) is
    # two-block tiles, not 128 x 192
    assert bmm.default_config(1280, 26624, 4096) == bmm._two_block_step_tile()
    assert wide in bmm.candidate_configs(4096, 4096, 4096)


# -- two-CTA clusters (config.cluster) ---------------------------------------------------------------


def test_two_block_clusters_where_the_weight_is_large(monkeypatch):
    # H100, same run each (results/h100_ab_block_cluster.md): the two-block tile as clusters along M (the weight
    # tile multicast) 7-9 % faster than unclustered where the weight is >= 200 MB (8192 x 28672 at M = 1024 /
    # 2048 / 4096, 57344 x 8192 at 1024), 1-4 % slower at the six smaller grid weights.  Costed 1.14 of three
    # warpgroups (the 128 x 192 tile's break-even 1.157 at 1024 x 8192 x 28672: 388.2 vs 407.6 us, 1.12 at 1024 x
    # 57344 x 8192: 792.5 vs 784.8).  Off the grid, against the heuristic before it: 1000 / 1200 x 8192 x 28672
    # 440.1 -> 386.9 / 499.8 -> 489.9 us, 1024 x 16384^2 483.1 -> 453.0, 994 / 1179 x 28672 x 8192 431.3 -> 417.2
    # / 528.4 -> 507.9, 1024 x 8192 x 24576 358.9 -> 343.8, 800 x 8192 x 28672 431.4 -> 398.1.
    monkeypatch.setattr(bmm, "num_sms", lambda: 132)
    two_cm = dataclasses.replace(bmm._two_block_step_tile(), cluster="m")
    assert two_cm.short().endswith("qcm")
    for m, n, k in ((1024, 8192, 28672), (1000, 8192, 28672), (1200, 8192, 28672), (1024, 16384, 16384),
                    (994, 28672, 8192), (1024, 8192, 24576)):  # fmt: skip
        assert bmm.default_config(m, n, k) == two_cm, (m, n, k)
    # not where the 128 x 192 or three-warpgroup tiles win the model (1024 x 57344 x 8192; M >= 2048)
    assert bmm.default_config(1024, 57344, 8192) == bmm._wide_tile()
    for m in (2048, 4096, 8192):
        assert bmm.default_config(m, 8192, 28672).num_compute_wgs == 3
    # an odd count of 128-row tiles computes its last row twice in clusters: the model counts it (600 x 57344 x
    # 8192, five rows: 601.3 us clustered against 494.6 with 128 x 192 tiles, which it takes)
    assert bmm.default_config(600, 57344, 8192) == bmm._wide_tile()
    # never below 200 MB of weight, at M <= 512, or without K
    for m in (256, 512, 1000, 1024, 1536, 2048, 4096):
        for n, k in LLAMA:
            cfg = bmm.default_config(m, n, k)
            assert cfg.cluster is None or (m > 512 and n * k >= bmm._CLUSTER_WEIGHT_BYTES), (m, n, k)
    assert bmm._promoted_tile_cost(1024, 8192, 132)[1].cluster is None
    assert two_cm in bmm.candidate_configs(1024, 8192, 8192)
    assert bmm.BlockTuningConfig.from_dict({"tile_n": 128}).cluster is None  # older tuning caches


CLUSTER_CASES = [
    # (M, N, K, bias, out_dtype, config)
    (384, 1040, 1024, True, jnp.bfloat16, dataclasses.replace(K256, cluster="m")),  # an odd count of tile rows
    (300, 400, 640, True, jnp.float16, dataclasses.replace(TWO_WG_M, cluster="n")),
    (130, 400, 384, False, jnp.bfloat16, dataclasses.replace(WIDE_M, cluster="m")),
]


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=_case_id)
def test_cluster_interpret_runs_the_same_tiles(case):
    # interpret mode has no clusters: the same tiles unclustered (the GPU check runs them clustered)
    m, n, k, bias, od, cfg = case
    ops = _operands(np.random.default_rng(m + n), m, n, k, bias)
    out = _run(ops, od, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(od)
    np.testing.assert_array_equal(out, _run(ops, od, dataclasses.replace(cfg, cluster=None)))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cluster="k"), r"config.cluster='k' must be None, 'm' or 'n'"),
        (dict(cluster="m", tail_split=2), r"config.cluster='m' .* without stream-K"),
        (dict(cluster="n", overlap=True), r"config.cluster='n' .* promoted accumulation"),
        (dict(cluster="m", rescale=True, tile_m=128), r"config.cluster='m' .* promoted accumulation"),
    ],
)
def test_cluster_config_validation(change, match):
    cfg = dataclasses.replace(bmm.BlockTuningConfig(), **change)
    with pytest.raises(ValueError, match=match):
        bmm.block_scaled_mm(*_args(), config=cfg, interpret=True)


def test_clustered_tiles_cross_lower_for_cuda():
    # the clustered kernel is GPU only (interpret mode drops the cluster): lower each clustered promoted layout for
    # CUDA, at partial M / N tiles and odd tile counts (a cluster's second CTA past the edge)
    mod = load_script("benchmarks/ab_block_cluster.py")
    assert {"w2m_k256", "w3m_tn128", "w2m_tn192"} <= set(mod.LAYOUTS)
    for base in mod.LAYOUTS.values():
        for axis in ("m", "n"):
            cfg = bmm._fit_smem(mod.clustered(base, axis), jnp.dtype(jnp.bfloat16))
            bmm._validate_config(cfg, jnp.dtype(jnp.bfloat16))
            # (the CTA's index in its cluster picks its tile of the pair)
            assert "gpu.cluster_block_id" in _lower(1000, 1040, 4096, jnp.bfloat16, cfg).as_text(), cfg.short()
    unclustered = bmm._fit_smem(bmm._two_block_step_tile(), jnp.dtype(jnp.bfloat16))
    assert "gpu.cluster_block_id" not in _lower(1000, 1040, 4096, jnp.bfloat16, unclustered).as_text()
    d = bmm.default_config(1024, 8192, 28672)
    assert [mod.SIDES[s](d).cluster for s in ("cur", "k256", "k256_cm", "k256_cn")] == ["m", None, "m", "n"]
    assert mod.SIDES["cn"](bmm.default_config(2048, 8192, 8192)).tail_split == 1  # (clusters: no stream-K)
    assert mod._shapes("1024:8192:28672,7:16:32") == [(1024, 8192, 28672), (7, 16, 32)]
    for bad in ("1024:8192", "a:b:c", "0:16:32"):
        with pytest.raises(Exception, match="M:N:K"):
            mod._shapes(bad)
    # benchmarks/gpu_block_check.py's check phase runs the clustered two-block tile both ways among its layouts
    g = load_script("benchmarks/gpu_block_check.py")
    assert set(g.CLUSTER_LAYOUTS) <= set(g.LAYOUTS)
    assert {c.cluster for c in g.CLUSTER_LAYOUTS.values()} == {"m", "n"}
    for cfg in g.CLUSTER_LAYOUTS.values():
        bmm._validate_config(cfg, jnp.dtype(jnp.bfloat16))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tile_k": 256}, r"tile_n=192 needs promoted accumulation with one K block a step"),
        ({"overlap": True}, r"tile_n=192 needs promoted accumulation"),
        ({"rescale": True}, r"tile_n=192 must be <= 128 with rescale=True"),
        ({"num_compute_wgs": 3}, r"needs 192 f32 registers per thread .* over 128 with 3 consumer warpgroups"),
        ({"epi_tile_n": 128}, r"epi_tile_n=128 must divide min\(tile_n, 64\)"),
    ],
)
def test_wide_tile_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        bmm._validate_config(dataclasses.replace(bmm._wide_tile(), **change), jnp.bfloat16)


def test_three_warpgroup_register_cap():
    # 3 warpgroups get 160 registers per thread: a 64 x 256 tile's total + accumulator (192) does not fit
    with pytest.raises(ValueError, match="over 128 with 3 consumer warpgroups"):
        bmm._validate_config(dataclasses.replace(bmm._three_wg_tile(), tile_n=256), jnp.bfloat16)
    with pytest.raises(ValueError, match="num_compute_wgs=4 must be 1 or 2 or 3"):
        bmm._validate_config(dataclasses.replace(bmm._three_wg_tile(), num_compute_wgs=4), jnp.bfloat16)


@pytest.mark.parametrize("cfg", [W3_M, W3_N, bmm._three_wg_tile("m"), bmm._three_wg_tile("n", steps=3)],
                         ids=lambda c: c.short())
def test_three_warpgroup_tiles_cross_lower_for_cuda(cfg):
    m, n, k = (400, 272, 640) if cfg.tile_n < 128 else (4096, 4096, 4096)
    args = (S((m, k), jnp.float8_e4m3fn), S((n, k), jnp.float8_e4m3fn), S((m, k // 128), jnp.float32),
            S((-(-n // 128), k // 128), jnp.float32))
    f = jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, config=bmm._fit_smem(cfg, jnp.bfloat16)))
    f.trace(*args).lower(lowering_platforms=("cuda",))


def test_interpret_mode_drops_the_last_wave_cut_planned_for_three_warpgroups(monkeypatch):
    # a default of three warpgroups with a cut last wave runs as two warpgroups, every tile whole: the cut
    # was planned for 192-row tiles (and its K ranges for four pipeline stages, not five)
    monkeypatch.setattr(bmm, "default_config", lambda *a, **kw: W3_T2)
    ops = _operands(np.random.default_rng(7), 700, 256, 1024, bias=False)
    out = _run(ops, jnp.bfloat16, None)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)


def test_interpret_mode_runs_the_three_warpgroup_default_as_two_and_rejects_explicit_ones(monkeypatch):
    # one SM: the wave model sees one tile a wave and takes three warpgroups at a small N
    monkeypatch.setattr(bmm, "num_sms", lambda: 1)
    rng = np.random.default_rng(5)
    ops = _operands(rng, 700, 64, 128, bias=True)
    assert bmm.default_config(700, 64, 128).num_compute_wgs == 3
    out = _run(ops, jnp.bfloat16, None)  # the heuristic, as two warpgroups in interpret mode
    assert rel_err(out, _reference(*ops)) < kernel_rtol(jnp.bfloat16)
    with pytest.raises(ValueError, match="three consumer warpgroups do not run in interpret mode"):
        _run(ops, jnp.bfloat16, W3_M)


# -- stream-K over the last wave (config.tail_split) ---------------------------------------------
# GPU only (jax 0.11.2's interpreter has no global semaphores): the plan, validation and heuristic
# here, the kernel cross-lowered for CUDA; benchmarks/gpu_block_check.py --phases tail runs it.
W3_T2 = dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=2)


def test_tail_plan_cuts_only_the_part_full_last_wave():
    assert bmm.tail_plan(704, 132, 2) == (660, 44)  # 5.33 waves: 44 tail tiles, 88 K ranges
    assert bmm.tail_plan(704, 132, 1) == (704, 0)  # off
    assert bmm.tail_plan(660, 132, 2) == (660, 0)  # whole waves: nothing to cut
    assert bmm.tail_plan(100, 132, 4) == (0, 100)  # under one wave: every tile is tail
    assert bmm.tail_plan(132, 132, 2) == (132, 0)


@pytest.mark.parametrize("tiles,sms,split", [(704, 132, 2), (352, 132, 2), (102, 132, 4), (8, 3, 8), (33, 4, 3)])
def test_tail_units_cover_every_k_range_once_and_owners_never_wait_on_a_waiting_cta(tiles, sms, split):
    # The kernel's unit map, evaluated on plain integers: every whole tile once, every (tail tile, K range)
    # once, the owner of a tile is its last range, and under the persistent grid's round-robin (CTA c runs
    # units c, c + grid, ... in order) no CTA runs an owner before a contributor: an owner only waits for
    # CTAs that never wait before reaching the range it waits for.
    n_full, n_tail = bmm.tail_plan(tiles, sms, split)
    units = n_full + n_tail * split
    grid = min(sms, units)
    seen_whole, seen_range, owner_at = set(), set(), {}
    for u in range(units):
        lin, is_full, is_owner, t_rel, piece = (int(v) for v in bmm._tail_unit(u, n_full, n_tail, split))
        assert 0 <= lin < tiles
        if is_full:
            assert lin == u and lin not in seen_whole
            seen_whole.add(lin)
            continue
        assert lin == n_full + t_rel and (t_rel, piece) not in seen_range
        seen_range.add((t_rel, piece))
        assert bool(is_owner) == (piece == split - 1)
        if is_owner:
            owner_at[t_rel] = u
    assert seen_whole == set(range(n_full))
    assert seen_range == {(t, j) for t in range(n_tail) for j in range(split)}
    for c in range(grid):  # a CTA's owner units come after all of its contributor units
        kinds = [bool(bmm._tail_unit(u, n_full, n_tail, split)[2]) for u in range(c, units, grid) if u >= n_full]
        assert kinds == sorted(kinds)
    for t, u_own in owner_at.items():  # every contributor of a tile precedes its owner
        assert all(n_full + j * n_tail + t < u_own for j in range(split - 1))


def test_tail_split_validation():
    with pytest.raises(ValueError, match="tail_split=0 must be an int from 1 to 8"):
        bmm._validate_config(dataclasses.replace(W3_T2, tail_split=0), jnp.bfloat16)
    with pytest.raises(ValueError, match="tail_split=9 must be an int from 1 to 8"):
        bmm._validate_config(dataclasses.replace(W3_T2, tail_split=9), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs promoted accumulation"):
        bmm._validate_config(dataclasses.replace(bmm._rescale_wide_tile(), tail_split=2), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs promoted accumulation"):
        bmm._validate_config(dataclasses.replace(bmm.BlockTuningConfig(overlap=True), tail_split=2), jnp.bfloat16)
    assert bmm.tail_split_error(W3_T2, 4096) is None
    assert bmm.tail_split_error(W3_T2, 4224) is None  # 33 K steps: ranges of 17 and 16
    assert "needs K a multiple of tile_k = 128; got K=4000" in bmm.tail_split_error(W3_T2, 4000)  # partial K block
    assert "shorter than the pipeline" in bmm.tail_split_error(dataclasses.replace(W3_T2, tail_split=8), 2048)
    assert bmm.tail_split_error(dataclasses.replace(W3_T2, tail_split=3), 1536) is None  # 12 steps: 4, 4, 4
    assert "ranges of 3 steps" in bmm.tail_split_error(dataclasses.replace(W3_T2, tail_split=3), 1408)  # 11: 4, 4, 3
    assert bmm.tail_split_error(dataclasses.replace(W3_T2, tail_split=1), 4000) is None
    assert W3_T2.short().endswith("t2") and not bmm._three_wg_tile().short().endswith("t1")
    # a bad K reaches the caller as an error naming the split, before any kernel is built
    args = [S((2048, 4000), F8), S((4096, 4000), F8), S((2048, 32), jnp.float32), S((32, 32), jnp.float32)]
    with pytest.raises(ValueError, match="tail_split=2 needs K a multiple of"):
        jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, config=W3_T2)).trace(*args)


def test_tail_split_heuristic_takes_three_warpgroups_with_a_half_empty_last_wave():
    # 192 x 128 tiles, 132 SMs: 704 tiles (5.33 waves, a tail of 44) are cut, 352 (2.67, 88) are not
    assert bmm.default_config(4096, 4096, 4096).tail_split == 2
    assert bmm.default_config(2048, 8192, 8192).tail_split == 2
    assert bmm.default_config(2048, 4096, 4096).tail_split == 1
    assert bmm.default_config(4096, 6144, 4096).tail_split == 1  # 1056 tiles: whole waves
    assert bmm.default_config(4096, 4096, 4000).tail_split == 1  # K not whole steps: no cut
    assert bmm.default_config(4096, 4096, 4224).tail_split == 2  # 33 steps: ranges of 17 and 16
    assert bmm.default_config(1024, 4096, 14336).tail_split == 1  # two-block tiles (rows-past rule)
    assert bmm.default_config(4096, 4096, 4096, fast_accum=True).tail_split == 1  # rescaled: never
    # after many whole waves the model's saving is under _TAIL_MIN_GAIN: 37 waves + 44 tiles, 26 + 8
    assert bmm.default_config(2048, 57344, 8192).tail_split == 1
    assert bmm.default_config(8192, 10240, 8192).tail_split == 1
    assert bmm.default_config(8192, 4096, 4096).tail_split == 2  # 10 waves + 56 tiles
    # the cut last wave counts as _TAIL_WAVE of a wave in the tile choice
    assert bmm._wave_cost(4096, 4096, 192, 128, 132, 1.0) == 6 * 192 * 128
    assert bmm._wave_cost(4096, 4096, 192, 128, 132, 1.0, bmm._TAIL_WAVE) == (5 + bmm._TAIL_WAVE) * 192 * 128
    assert bmm._promoted_tile_cost(4096, 4096, 132)[1].tail_split == 1  # K unknown: no cut
    for n, k in LLAMA:
        for m in (1024, 2048, 4096, 8192):
            cfg = bmm.default_config(m, n, k)
            if cfg.tail_split > 1:
                full, tail = bmm.tail_plan(_cdiv(m, cfg.cta_tile_m) * _cdiv(n, cfg.cta_tile_n), 132, 2)
                assert cfg.num_compute_wgs == 3 and 0 < 2 * tail <= 132 and bmm.tail_split_error(cfg, k) is None


TAIL_INTERPRET_CASES = [
    # (M, N, K, config, bias, out dtype, SMs the plan assumes): two-block tiles, 2 x 2 tiles on 3 SMs = a
    # whole wave and a tail of one, K cut in two; a 64 x 256 warpgroup tile (two weight-scale blocks), one
    # tile, all of it tail, K cut in four
    (130, 256, 1536, dataclasses.replace(bmm._two_block_step_tile(), tail_split=2), True, jnp.bfloat16, 3),
    (100, 272, 1024, dataclasses.replace(bmm.BlockTuningConfig(tile_n=256, max_concurrent_steps=2, epi_slots=1),
                                        tail_split=4), False, jnp.float32, 5),
    # K ranges of unequal length: 10 two-block steps in three ranges of 4, 3 and 3
    (130, 256, 2560, dataclasses.replace(bmm._two_block_step_tile(), tail_split=3), True, jnp.float16, 3),
    # 128 x 192 tiles (three promoted pieces a warpgroup in the workspace): 2 x 3 tiles on 4 SMs, a tail of 2
    (130, 400, 1280, dataclasses.replace(bmm._wide_tile(), tail_split=2), True, jnp.bfloat16, 4),
]  # fmt: skip


@pytest.mark.parametrize("case", TAIL_INTERPRET_CASES, ids=lambda c: c[3].short())
def test_tail_split_runs_in_interpret_mode_as_one_cta(monkeypatch, case):
    # Interpret mode (no global semaphores) runs the planned units in one CTA, contributors before owners:
    # the K ranges (their weight-scale and activation-scale offsets), the workspace and the owner's sum
    # are checked against the float64 reference; a lost range would be off by ~1 / split.
    m, n, k, cfg, bias, od, sms = case
    monkeypatch.setattr(bmm, "num_sms", lambda: sms)
    cfg = bmm._fit_smem(cfg, od)
    tiles = _cdiv(m, cfg.cta_tile_m) * _cdiv(n, cfg.cta_tile_n)
    assert bmm.tail_plan(tiles, sms, cfg.tail_split)[1] > 0
    ops = _operands(np.random.default_rng(6), m, n, k, bias=bias)
    out = _run(ops, od, cfg)
    assert rel_err(out, _reference(*ops)) < kernel_rtol(od)


@pytest.mark.parametrize("case", ["w3m_t2", "w3m_t4", "w2m_k256_t2", "w2m_tn256_t2", "w2m_tn192_t2"])
def test_tail_split_configs_cross_lower_for_cuda(case):
    # the GPU check's tail layouts at their cases: semaphores signalled (release) and awaited (an
    # atomic compare-and-swap loop, then an acquire fence) at GPU scope; a whole-tile config has none
    mod = load_script("benchmarks/gpu_block_check.py")
    m, n, k, od, bias, _ = next(c for c in mod.TAIL_CASES if c[5] == case)
    cfg = bmm._fit_smem(mod.TAIL_LAYOUTS[case], jnp.dtype(od))
    text = _lower(m, n, k, jnp.dtype(od), cfg, bias=bias).as_text()
    assert "red.release.gpu.global.add.u32" in text and "atom.relaxed.gpu.global.cas.b32" in text
    assert "fence.acquire.gpu" in text
    plain = _lower(m, n, k, jnp.dtype(od), dataclasses.replace(cfg, tail_split=1), bias=bias).as_text()
    assert "red.release.gpu.global.add.u32" not in plain


def test_gpu_check_script_tail_cases_are_valid():
    mod = load_script("benchmarks/gpu_block_check.py")
    for m, n, k, od, _, layout in mod.TAIL_CASES:
        cfg = bmm._fit_smem(mod.TAIL_LAYOUTS[layout], jnp.dtype(od)) if layout else bmm.default_config(m, n, k)
        bmm._validate_config(cfg, jnp.dtype(od))
        assert cfg.tail_split > 1 and bmm.tail_split_error(cfg, k) is None, (m, n, k, layout)
        tiles = _cdiv(m, cfg.cta_tile_m) * _cdiv(n, cfg.cta_tile_n)
        assert bmm.tail_plan(tiles, 132, cfg.tail_split)[1] > 0, (m, n, k, layout)  # H100: a real tail


OVERLAP_LOWER_SHAPES = [(4096, 4096, 4096), (1024, 4096, 4096), (4096, 28672, 4096), (1024, 28672, 4096)]


def test_overlap_variants_cross_lower_for_cuda():
    # Shared-memory size, TMA and wgmma layouts of every overlap candidate at the target shapes;
    # the lowered kernel really waits for one wgmma group in flight (wait_group 1), the plain
    # kernel never does.
    for m, n, k in OVERLAP_LOWER_SHAPES:
        for cfg in (c for c in bmm.candidate_configs(m, n, k) if c.overlap):
            assert "wgmma.wait_group.sync.aligned 1;" in _lower(m, n, k, jnp.bfloat16, cfg).as_text()
    plain = bmm.default_config(4096, 4096, 4096)
    assert "wgmma.wait_group.sync.aligned 1;" not in _lower(4096, 4096, 4096, jnp.bfloat16, plain).as_text()
    for cfg in OVERLAP_CONFIGS:  # the interpret-mode tiles are real too
        _lower(130, 272, 416, jnp.bfloat16, cfg)


def test_gpu_check_script_overlap_layouts_are_valid():
    # benchmarks/gpu_block_check.py checks these on the GPU (overlap phase): each must be a valid
    # overlap config for every out dtype it is checked with (fewer stages for float32 outputs).
    mod = load_script("benchmarks/gpu_block_check.py")
    assert set(mod.OVERLAP_LAYOUTS) <= set(mod.LAYOUTS) and len(mod.OVERLAP_LAYOUTS) >= 3
    for name, cfg in mod.OVERLAP_LAYOUTS.items():
        assert cfg.overlap
        steps = set()
        for m, n, k, od, _bias, layout in mod.overlap_cases(name):
            assert layout == name
            fitted = bmm._fit_smem(cfg, jnp.dtype(od))
            bmm._validate_config(fitted, jnp.dtype(od))
            steps.add(_cdiv(k, cfg.tile_k))
        # a single step (no overlap), and both parities of the last step's accumulator
        assert 1 in steps and {s % 2 for s in steps if s > 1} == {0, 1}


# -- rescaled accumulation (config.rescale, FP8ScaledMMConfig.fast_accum) -------------------------

@pytest.mark.parametrize("cfg", [RS_M128_WG_N, RS_K256], ids=lambda c: c.short())
def test_rescale_gives_each_k_block_its_own_scales(cfg):
    # Exact small integers and power-of-two scales (2**-3 .. 2**3, varying per row and K block): the
    # rescaled accumulator (ratios of powers of two) is exact, so the output equals the reference.
    rng = np.random.default_rng(6)
    m, n, k = 100, 64, 640
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (n, k)).astype(np.float32)
    a_s = np.exp2(rng.integers(-3, 4, (m, 5))).astype(np.float32)
    b_s = np.exp2(rng.integers(-3, 4, (1, 5))).astype(np.float32)
    ops = (np.asarray(jnp.asarray(a, F8)), np.asarray(jnp.asarray(b, F8)), a_s, b_s, None)
    np.testing.assert_array_equal(_run(ops, jnp.float32, cfg), _reference(*ops).astype(np.float32))


def test_rescale_keeps_rows_whose_scales_are_zero_finite():
    # Rows past M (TMA zero-fills them: zero operands AND zero scales) must not poison their tile:
    # a zero scale keeps the previous unit instead of dividing by zero.  Here real rows carry a zero
    # scale on one K block (zero data there too): their other blocks still add up, no NaN / inf.
    rng = np.random.default_rng(8)
    m, n, k = 70, 48, 384
    a, b, a_s, b_s, _ = _operands(rng, m, n, k)
    a = a.copy()
    a[:10, 128:256] = 0
    a_s[:10, 1] = 0
    out = _run((a, b, a_s, b_s, None), jnp.float32, RS_M128_WG_N)
    assert np.all(np.isfinite(out))
    assert rel_err(out, _reference(a, b, a_s, b_s)) < kernel_rtol(jnp.float32)


@settings(max_examples=4, deadline=None)
@given(
    m=st.integers(1, 300),
    n16=st.integers(1, 20),
    kb=st.integers(1, 3),
    k_tail=st.sampled_from([0, 32, 96]),
    cfg=st.sampled_from(RESCALE_CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_rescale_hypothesis_shapes(m, n16, kb, k_tail, cfg, seed):
    n, k = 16 * n16, 128 * kb - k_tail
    ops = _operands(np.random.default_rng(seed), m, n, k, bias=bool(seed % 2))
    assert rel_err(_run(ops, jnp.bfloat16, cfg), _reference(*ops)) < kernel_rtol(jnp.bfloat16)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(tile_m=128), r"tile_m=128 must be 64 \(128 only with rescale=True"),
        (dict(tile_m=128, tile_n=256, rescale=True), r"tile_n=256 must be <= 128 with rescale=True"),
        (dict(rescale=True, overlap=True), r"rescale and config.overlap are two promotion schemes"),
        (dict(rescale="yes"), r"config.rescale='yes' must be True or False"),
    ],
)
def test_rescale_config_validation(change, match):
    cfg = dataclasses.replace(bmm.BlockTuningConfig(), **change)
    with pytest.raises((ValueError, TypeError), match=match):
        bmm.block_scaled_mm(*_args(), config=cfg, interpret=True)


def test_rescale_registers_allow_128_x_128_warpgroup_tiles():
    wide = bmm._rescale_wide_tile("n")
    assert (wide.tile_m, wide.tile_n, wide.cta_tile_m, wide.cta_tile_n) == (128, 128, 128, 256)
    assert bmm._acc_registers(wide) == 128 <= bmm.MAX_ACC_REGISTERS
    # the same tile with promotion would need the total plus an accumulator: 256 registers
    assert bmm._acc_registers(dataclasses.replace(wide, rescale=False)) == 256 > bmm.MAX_ACC_REGISTERS
    assert wide.short().endswith("r") and not bmm.BlockTuningConfig().short().endswith("r")


def test_fast_accum_picks_rescaled_tiles_only_above_m_512(monkeypatch):
    monkeypatch.setattr(bmm, "num_sms", lambda: 132)
    for m, n, k in ((4096, 4096, 4096), (1024, 8192, 8192), (2048, 28672, 4096), (768, 10240, 8192)):
        cfg = bmm.default_config(m, n, k, fast_accum=True)
        assert cfg.rescale and cfg.tile_m == 128
        assert cfg.wg_dimension == ("m" if m >= 2048 else "n")
        assert not bmm.default_config(m, n, k).rescale
        assert not any(c.rescale for c in bmm.candidate_configs(m, n, k))  # numerics change: opt-in only
        assert any(c.rescale for c in bmm.candidate_configs(m, n, k, fast_accum=True))
    for m in (1, 16, 256, 512):  # measured slower there: the promoted tiles stay
        assert bmm.default_config(m, 4096, 4096, fast_accum=True) == bmm.default_config(m, 4096, 4096)
    # Below M = 2048 the promoted tile stays where 128 x 256 tiles leave a part-empty last wave (H100,
    # h100_block_m_tail.json: 1024 x 6144 x 4096 0.82 vs 0.70 of per-channel, 1024 x 10240 x 8192 0.77 vs 0.73,
    # 1536 x 28672 x 4096 0.91 vs 0.85, 768 x 4096 x 14336 0.89 vs 0.75); it is still a candidate.
    for m, n, k in ((1024, 6144, 4096), (1024, 10240, 8192), (1536, 28672, 4096), (768, 4096, 14336)):
        assert bmm.default_config(m, n, k, fast_accum=True) == bmm.default_config(m, n, k)
        assert any(c.rescale for c in bmm.candidate_configs(m, n, k, fast_accum=True))
    assert bmm.default_config(4096, 6144, 4096, fast_accum=True).rescale  # from M = 2048 always
    with pytest.raises(ValueError, match="fast_accum=1 must be True or False"):
        bmm.block_scaled_mm(*_args(), fast_accum=1, interpret=True)


def test_fast_accum_default_runs_in_interpret_mode():
    ops = _operands(np.random.default_rng(9), 600, 48, 256, bias=True)
    a, b, a_s, b_s, bias = ops
    out = bmm.block_scaled_mm(
        jnp.asarray(a, F8), jnp.asarray(b, F8), jnp.asarray(a_s), jnp.asarray(b_s), bias=jnp.asarray(bias),
        fast_accum=True, interpret=True,
    )  # fmt: skip
    assert rel_err(np.asarray(out.astype(jnp.float32)), _reference(*ops)) < kernel_rtol(jnp.bfloat16)


def test_fast_accum_config_field():
    fast = dataclasses.replace(BLOCK_CFG, fast_accum=True)
    assert fast.describe().endswith(" fast_accum") and not BLOCK_CFG.describe().endswith("fast_accum")
    assert MosaicGPUBlockFP8Kernel.can_implement(fast) == (True, None)
    with pytest.raises(ConfigError, match=r"fast_accum: only meaningful with block-wise weight scales"):
        FP8ScaledMMConfig(fast_accum=True)
    with pytest.raises(ConfigError, match=r"fast_accum: expected a bool, got 'yes'"):
        dataclasses.replace(BLOCK_CFG, fast_accum="yes")


def test_fast_accum_apply_weights_matches_oracle():
    # M = 2 x 300 > 512 rows: the rescaled default tiles; N / K padded (200 -> 208, 300 -> 320).
    rng = np.random.default_rng(11)
    cfg = dataclasses.replace(BLOCK_CFG, fast_accum=True)
    n, k = 200, 300
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 300, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    params = quantize_weight(w, cfg)
    ker = MosaicGPUBlockFP8Kernel(cfg, interpret=True)
    y = np.asarray(ker.apply_weights(ker.process_weights_after_loading(params), x, bias).astype(jnp.float32))
    assert y.shape == (2, 300, n)
    assert rel_err(y, reference_linear_np(np.asarray(x), params, cfg, np.asarray(bias))) < kernel_rtol(jnp.bfloat16)


def test_gpu_check_script_rescale_layouts_are_valid():
    mod = load_script("benchmarks/gpu_block_check.py")
    assert set(mod.RESCALE_LAYOUTS) <= set(mod.LAYOUTS) and len(mod.RESCALE_LAYOUTS) >= 3
    for name, cfg in mod.RESCALE_LAYOUTS.items():
        assert cfg.rescale
        for _m, _n, _k, od, _bias, _layout in mod.rescale_cases(name):
            bmm._validate_config(bmm._fit_smem(cfg, jnp.dtype(od)), jnp.dtype(od))
    assert mod.RESCALE_ACCURACY_CONFIG.rescale


def test_gpu_check_script_wide_layouts_are_valid_and_cross_lower():
    # the wide phase's layouts at its cases (f32 out: fewer stages), lowered for CUDA at a partial-tile case
    mod = load_script("benchmarks/gpu_block_check.py")
    assert set(mod.WIDE_LAYOUTS) <= set(mod.LAYOUTS) and {c.tile_n for c in mod.WIDE_LAYOUTS.values()} == {192}
    for name, cfg in mod.WIDE_LAYOUTS.items():
        bmm._validate_config(cfg, jnp.bfloat16)  # as the ptxas phase compiles it (not fitted)
        for _m, _n, _k, od, _bias, _layout in mod.rescale_cases(name):
            bmm._validate_config(bmm._fit_smem(cfg, jnp.dtype(od)), jnp.dtype(od))
        _lower(1000, 13664, 4096, jnp.bfloat16, bmm._fit_smem(cfg, jnp.bfloat16))


# -- the MMLinearKernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, out_dtype", [(200, 300, jnp.bfloat16), (136, 256, jnp.float32)])
def test_apply_weights_matches_oracle_and_reference_kernel(n, k, out_dtype):
    # N=200 pads to 208, K=300 to 320 (partial 128-blocks in both); N=136, K=256 aligned.
    rng = np.random.default_rng(n + k)
    cfg = dataclasses.replace(BLOCK_CFG, out_dtype=out_dtype)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 35, k)) * np.exp2(rng.uniform(-4, 4, (1, 1, k))), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    params = quantize_weight(w, cfg)
    assert params.weight_scale.shape == (_cdiv(n, 128), _cdiv(k, 128))
    ker = MosaicGPUBlockFP8Kernel(cfg, interpret=True, tuning=TWO_WG_M)
    pp = ker.process_weights_after_loading(params)
    n_mult, k_mult = bmm.required_alignment(out_dtype)
    assert pp.weight.shape[0] % n_mult == 0 and pp.weight.shape[1] % k_mult == 0
    assert (pp.n, pp.k) == (n, k) and pp.weight_scale.shape == params.weight_scale.shape
    y = ker.apply_weights(pp, x, bias)
    assert y.shape == (2, 35, n) and y.dtype == jnp.dtype(out_dtype)
    y = np.asarray(y.astype(jnp.float32))
    oracle = reference_linear_np(np.asarray(x), params, cfg, np.asarray(bias))
    assert rel_err(y, oracle) < kernel_rtol(out_dtype)
    ref = ReferenceKernel(cfg).apply_weights(params, x, bias)
    assert rel_err(y, np.asarray(ref.astype(jnp.float32))) < kernel_rtol(out_dtype)


def test_process_weights_is_idempotent_and_aligned_weights_are_kept():
    rng = np.random.default_rng(1)
    ker = MosaicGPUBlockFP8Kernel(BLOCK_CFG, interpret=True)
    params = quantize_weight(jnp.asarray(rng.standard_normal((50, 200)), jnp.float32), BLOCK_CFG)
    once = ker.process_weights_after_loading(params)
    twice = ker.process_weights_after_loading(once)
    assert once.weight.shape == twice.weight.shape == (64, 224)
    np.testing.assert_array_equal(np.asarray(once.weight, np.float32), np.asarray(twice.weight, np.float32))
    aligned = quantize_weight(jnp.ones((128, 256), jnp.float32), BLOCK_CFG)
    pp = ker.process_weights_after_loading(aligned)
    assert pp.weight.shape == (128, 256) and pp.out_features is None


def test_selection_prefers_block_kernel_on_sm90():
    assert select.choose_kernel(BLOCK_CFG, compute_capability=90, platform="cuda") is MosaicGPUBlockFP8Kernel
    assert select.choose_kernel(FP8ScaledMMConfig(), compute_capability=90, platform="cuda") is MosaicGPUScaledMMKernel
    # Not Hopper: the portable path.
    assert select.choose_kernel(BLOCK_CFG, compute_capability=89, platform="cuda").name == "xla"
    assert select.choose_kernel(BLOCK_CFG, platform="cpu").name == "xla"
    names = [k.name for k in select.registered_kernels("cuda")]
    assert names.index("mosaic_gpu_block") < names.index("xla")


@pytest.mark.parametrize(
    "config, match",
    [
        (FP8ScaledMMConfig(), r"weight_granularity='per_channel'"),
        (
            FP8ScaledMMConfig(weight_granularity=(128, 64), activation="dynamic_per_group", group_size=64),
            r"only \(128, 128\)",
        ),
        (FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_token"), r"dynamic_per_group"),
        (FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=64), r"128"),
        (
            FP8ScaledMMConfig(
                weight_granularity=(128, 128), activation="dynamic_per_group", group_size=128, fp8_format="e5m2"
            ),
            r"e4m3fn",
        ),
        (Int8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group"), r"int8"),
    ],
)
def test_can_implement_reasons(config, match):
    ok, why = MosaicGPUBlockFP8Kernel.can_implement(config)
    assert not ok and re.search(match, why)


def test_is_supported_needs_hopper():
    assert MosaicGPUBlockFP8Kernel.is_supported(90) == (True, None)
    ok, why = MosaicGPUBlockFP8Kernel.is_supported(80)
    assert not ok and "9.x" in why


# -- bad inputs -----------------------------------------------------------------------------------


def _args(m=16, n=32, k=256):
    return (
        jnp.zeros((m, k), F8),
        jnp.zeros((n, k), F8),
        jnp.ones((m, _cdiv(k, 128)), jnp.float32),
        jnp.ones((_cdiv(n, 128), _cdiv(k, 128)), jnp.float32),
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a, b, x, y: (a.astype(jnp.bfloat16), b, x, y), r"a has dtype bfloat16; expected float8_e4m3fn"),
        (lambda a, b, x, y: (a, b.astype(jnp.float8_e5m2), x, y), r"b has dtype float8_e5m2"),
        (lambda a, b, x, y: (a, b.T, x, y), r"b has shape \(256, 32\).*K-major \(N, K\)"),
        (lambda a, b, x, y: (a, b, x[:, :1], y), r"a_scale has shape \(16, 1\); expected \(16, 2\)"),
        (lambda a, b, x, y: (a, b, x, y.T), r"b_scale has shape \(2, 1\); expected \(1, 2\)"),
        (lambda a, b, x, y: (a, b, x.astype(jnp.bfloat16), y), r"a_scale has dtype bfloat16"),
        (lambda a, b, x, y: (a[:, :240], b[:, :240], x, y), r"K=240 .* multiple of 32"),
        (lambda a, b, x, y: (a, b[:24], x, y), r"N=24 .* multiple of 16"),
        (lambda a, b, x, y: (a[0], b, x, y), r"a must be 2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        bmm.block_scaled_mm(*mutate(*_args()), config=ONE_WG, interpret=True)


def test_bad_bias_and_out_dtype():
    with pytest.raises(ValueError, match=r"bias has shape \(31,\)"):
        bmm.block_scaled_mm(*_args(), bias=jnp.zeros(31), interpret=True)
    with pytest.raises(ValueError, match=r"bias has dtype int32"):
        bmm.block_scaled_mm(*_args(), bias=jnp.zeros(32, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"out_dtype int32"):
        bmm.block_scaled_mm(*_args(), out_dtype=jnp.int32, interpret=True)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tile_n": 48}, r"tile_n=48 must be 16, 32, 64 or 128"),
        ({"tile_m": 128}, r"tile_m=128 must be 64"),
        ({"tile_k": 384}, r"tile_k=384 must be 128 or 256"),
        ({"tile_k": 256, "tile_n": 256, "epi_tile_n": 64}, r"needs 256 f32 registers per thread"),
        ({"tile_n": 256, "epi_tile_n": 256}, r"epi_tile_n=256 must divide min\(tile_n, 128\)"),
        ({"num_compute_wgs": 4}, r"num_compute_wgs=4 must be 1 or 2 or 3"),
        ({"max_concurrent_steps": 1}, r"max_concurrent_steps must be >= 2"),
        ({"tile_n": 128, "epi_tile_n": 48}, r"epi_tile_n=48"),
        ({"tile_n": 128, "num_compute_wgs": 2, "max_concurrent_steps": 7}, r"needs \d+ bytes of shared memory"),
    ],
)
def test_bad_tuning_configs(change, match):
    with pytest.raises(ValueError, match=match):
        bmm.block_scaled_mm(*_args(), config=dataclasses.replace(ONE_WG, **change), interpret=True)


# -- static checks: cross-lowering for CUDA on the CPU ------------------------------------------

LLAMA = [(4096, 4096), (28672, 4096), (4096, 14336), (8192, 8192), (6144, 4096), (57344, 8192)]


def test_default_and_candidate_configs_are_valid_for_the_benchmark_grid():
    for n, k in LLAMA:
        for m in (1, 16, 64, 128, 256, 512, 1024, 4096, 8192):
            for od in (jnp.bfloat16, jnp.float32):
                cfgs = [bmm.default_config(m, n, k, od), *bmm.candidate_configs(m, n, k, od)]
                assert cfgs[0] == cfgs[1]
                for cfg in cfgs:
                    bmm._validate_config(cfg, od)
                    assert bmm.smem_bytes(cfg, od) <= bmm.SMEM_LIMIT_BYTES


def _lower(m, n, k, out_dtype, config, bias=True):
    kb, nb = _cdiv(k, 128), _cdiv(n, 128)
    args = [S((m, k), F8), S((n, k), F8), S((m, kb), jnp.float32), S((nb, kb), jnp.float32)]
    args.append(S((n,), jnp.float32) if bias else None)

    def f(a, b, x, y, bias):
        return bmm.block_scaled_mm(a, b, x, y, bias=bias, out_dtype=out_dtype, config=config)

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


LOWER_CASES = [
    # every default regime (M = 16, 256, 4096) on Llama shapes, odd shapes, each out dtype
    (16, 4096, 4096, jnp.bfloat16),
    (256, 4096, 4096, jnp.bfloat16),
    (4096, 4096, 4096, jnp.bfloat16),
    (16, 28672, 4096, jnp.bfloat16),
    (256, 4096, 14336, jnp.float16),
    (4096, 8192, 8192, jnp.float32),
    (1, 272, 384, jnp.bfloat16),
    (1000, 1040, 2080, jnp.float32),
    (100, 13664, 4096, jnp.bfloat16),
    (7, 176, 96, jnp.bfloat16),
    (16, 8192, 8192, jnp.float16),
    (512, 8192, 8192, jnp.bfloat16),  # two K blocks a step (also at M = 1000 above)
    (1024, 28672, 4096, jnp.float32),
]


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}-{jnp.dtype(c[3]).name}")
def test_default_configs_cross_lower_for_cuda(case):
    m, n, k, od = case
    lowered = _lower(m, n, k, od, None)
    assert "mosaic_gpu" in lowered.as_text()[:20000]


def test_every_candidate_config_cross_lowers():
    for m in (16, 256, 4096):
        for cfg in bmm.candidate_configs(m, 4096, 4096, fast_accum=True):  # promoted and rescaled
            _lower(m, 4096, 4096, jnp.bfloat16, cfg, bias=False)
    for cfg in (ONE_WG, TWO_WG_M, TWO_WG_N, K256, N256, N256_WG_N, WIDE_M, WIDE_N, *RESCALE_CONFIGS):  # interpret tiles
        _lower(130, 272, 416, jnp.bfloat16, cfg)


@pytest.mark.parametrize("m, n, k", [(4096, 4096, 4096), (1024, 28672, 4096), (2048, 8192, 8192)])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_fast_accum_defaults_cross_lower_for_cuda(m, n, k, out_dtype):
    cfg = bmm.default_config(m, n, k, out_dtype, fast_accum=True)
    assert cfg.rescale
    assert "mosaic_gpu" in _lower(m, n, k, out_dtype, cfg).as_text()[:20000]


def test_cross_lowering_catches_shared_memory_overflow(monkeypatch):
    big = bmm.BlockTuningConfig(max_concurrent_steps=7)
    monkeypatch.setattr(bmm, "_validate_config", lambda *a, **k: None)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower(1024, 1024, 1024, jnp.bfloat16, big, bias=False)


def test_interpret_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("QLIN_MOSAIC_INTERPRET", "1")
    assert MosaicGPUBlockFP8Kernel(BLOCK_CFG).interpret
    monkeypatch.setenv("QLIN_MOSAIC_INTERPRET", "0")
    assert not MosaicGPUBlockFP8Kernel(BLOCK_CFG).interpret
    assert MosaicGPUBlockFP8Kernel(BLOCK_CFG, interpret=True).interpret


# -- autotune cache (the block kernel's entries) -------------------------------------------------


@pytest.fixture
def tuning_cache(tmp_path, monkeypatch):
    from qlin.kernels import autotune

    path = tmp_path / "tuning.json"
    monkeypatch.setenv("QLIN_TUNING_CACHE", str(path))
    monkeypatch.setattr(autotune, "_MEMO", {})
    return autotune, path


def test_block_autotune_cache_lookup_and_validation(tuning_cache, monkeypatch):
    autotune, path = tuning_cache
    m, n, k = 1000, 4096, 4096
    monkeypatch.setenv("QLIN_AUTOTUNE", "1")  # no GPU here: must not try to tune
    assert autotune.get_block_config(m, n, k, jnp.bfloat16) == bmm.default_config(m, n, k)
    assert not path.exists()
    tuned = bmm._wide_tile(width=4)
    assert tuned != bmm.default_config(m, n, k)
    key = autotune.block_cache_key(m, n, k, jnp.bfloat16)
    assert key != autotune.cache_key(m, n, k, F8, jnp.bfloat16)  # the per-channel kernel's key
    autotune.store_entry(key, tuned, 100.0)
    monkeypatch.setattr(autotune, "_MEMO", {})
    # M = 1000 and 600 share the power-of-two bucket; fast_accum requests have their own keys
    assert autotune.get_block_config(600, n, k, jnp.bfloat16) == tuned
    fa_default = bmm.default_config(m, n, k, fast_accum=True)
    assert autotune.get_block_config(m, n, k, jnp.bfloat16, fast_accum=True) == fa_default
    # invalid entries fall back to the heuristic: a rescaled config for a promoted request (other numerics),
    # a K cut into more ranges than this K has pipeline-deep pieces (32 K steps, 4 stages: at most 8)
    assert bmm.tail_split_error(dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=8), k) is None
    for bad in (bmm._rescale_wide_tile("n"), dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=9)):
        autotune.store_entry(key, bad, 1.0)
        monkeypatch.setattr(autotune, "_MEMO", {})
        assert autotune.get_block_config(m, n, k, jnp.bfloat16) == bmm.default_config(m, n, k), bad.short()
    fa_key = autotune.block_cache_key(m, n, k, jnp.bfloat16, fast_accum=True)
    autotune.store_entry(fa_key, bmm._rescale_wide_tile("n"), 1.0)
    monkeypatch.setattr(autotune, "_MEMO", {})
    assert autotune.get_block_config(m, n, k, jnp.bfloat16, fast_accum=True) == bmm._rescale_wide_tile("n")


def test_block_scaled_mm_takes_the_cached_config_on_the_gpu_path(tuning_cache, monkeypatch):
    # Without a config, the GPU path (interpret=False) asks the tuning cache; interpret mode keeps the heuristic.
    autotune, _ = tuning_cache
    m, n, k = 1000, 4096, 4096
    tuned = bmm._wide_tile(width=4)
    autotune.store_entry(autotune.block_cache_key(m, n, k, jnp.bfloat16), tuned, 100.0)
    seen = []

    def fake_call(args, *, config, has_bias, out_dtype, interpret):
        seen.append(config)
        return jnp.zeros((args[0].shape[0], n), out_dtype)

    monkeypatch.setattr(bmm, "_call", fake_call)
    a, b = jnp.zeros((m, k), F8), jnp.zeros((n, k), F8)
    xs, ws = jnp.ones((m, k // 128), jnp.float32), jnp.ones((n // 128, k // 128), jnp.float32)
    bmm.block_scaled_mm(a, b, xs, ws)
    bmm.block_scaled_mm(a, b, xs, ws, interpret=True)
    assert seen == [tuned, bmm.default_config(m, n, k)]


def test_block_autotune_times_the_candidates_and_stores_the_fastest(tuning_cache, monkeypatch):
    # Asked while the caller's jit traces the kernel (as in a model), the tuner still times concrete
    # arrays: it runs in its own thread (JAX's trace state is per thread); under the trace its operands
    # were tracers and every candidate failed.
    autotune, path = tuning_cache
    m, n, k = 2048, 4096, 4096
    monkeypatch.setenv("QLIN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_device_kind", lambda: "FakeGPU")
    cands = bmm.candidate_configs(m, n, k, limit=autotune.BLOCK_TUNE_CANDIDATES)
    assert len(cands) == autotune.BLOCK_TUNE_CANDIDATES and not any(c.overlap or c.rescale for c in cands)
    fastest = cands[3]
    timed = []

    def fake_time(fn, args, iterations=20):  # a config's time, without running it (no GPU here)
        assert not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        cfg = cands[len(timed)]
        timed.append(cfg)
        return 50.0 if cfg == fastest else 80.0

    monkeypatch.setattr(autotune, "time_fn", fake_time)
    got = []
    jax.jit(lambda x: got.append(autotune.get_block_config(1500, n, k, jnp.bfloat16)) or x).trace(jnp.zeros(2))
    assert got == [fastest] and timed == cands  # tuned at the bucket's M = 2048
    entry = json.loads(path.read_text())[autotune.block_cache_key(m, n, k, jnp.bfloat16)]
    assert bmm.BlockTuningConfig.from_dict(entry["config"]) == fastest and entry["us"] > 0


def test_autotune_warns_when_no_candidate_runs(tuning_cache, monkeypatch):
    autotune, path = tuning_cache
    monkeypatch.setenv("QLIN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_device_kind", lambda: "FakeGPU")

    def failing(fn, args, iterations=20):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(autotune, "time_fn", failing)
    with pytest.warns(RuntimeWarning, match="no candidate config ran .*no such kernel"):
        cfg = autotune.get_block_config(1024, 4096, 4096, jnp.bfloat16)
    assert cfg == bmm.default_config(1024, 4096, 4096) and not path.exists()  # nothing stored
    # An entry without a finite time (what earlier versions stored then) is no tuning result: ignored.
    key = autotune.block_cache_key(1024, 4096, 4096, jnp.bfloat16)
    autotune.store_entry(key, bmm._wide_tile(width=4), float("nan"))
    monkeypatch.setenv("QLIN_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "_MEMO", {})
    assert autotune.get_block_config(1024, 4096, 4096, jnp.bfloat16) == bmm.default_config(1024, 4096, 4096)
