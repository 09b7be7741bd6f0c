"""Mosaic GPU scaled matmul (qlin/kernels/mosaic_gpu_scaled_mm.py) and its MMLinearKernel.

The kernels run on the CPU in Mosaic GPU interpret mode against a float64
NumPy reference computed from the same 8-bit operands.  Interpret mode does
not check wgmma layouts, TMA tiling, or shared-memory size, so every real
variant is also cross-lowered for CUDA on the CPU (the Mosaic GPU compiler
runs up to the serialized kernel) - that is what rejects, e.g., a 5-stage
128x256 tile that overflows the 227 KB of shared memory, or an N that the
output's TMA tiling cannot cover.  benchmarks/gpu_check.py runs the same
variants on a real H100.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qlin.kernels import autotune
from qlin.kernels import mosaic_gpu_scaled_mm as mm
from qlin.tolerances import kernel_rtol

F8 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct

# Small tiles keep interpret mode fast; both warpgroup layouts are covered.
ONE_WG = mm.TuningConfig(
    tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
)
TWO_WG_M = mm.TuningConfig(
    tile_m=64,
    tile_n=16,
    tile_k=32,
    max_concurrent_steps=3,
    num_compute_wgs=2,
    wg_dimension="m",
    grid_minor_dim="m",
    epi_tile_m=64,
    epi_tile_n=16,
)
TWO_WG_N = mm.TuningConfig(
    tile_m=64,
    tile_n=16,
    tile_k=64,
    max_concurrent_steps=2,
    num_compute_wgs=2,
    wg_dimension="n",
    grid_tile_width=2,
    epi_tile_m=64,
    epi_tile_n=16,
    epi_slots=1,
)

SPLIT_K3 = dataclasses.replace(ONE_WG, split_k=3, epi_slots=1)
LARGE_SPLIT_K3 = mm.TuningConfig(
    tile_m=128, tile_n=32, tile_k=64, max_concurrent_steps=2, num_compute_wgs=2, wg_dimension="n",
    grid_tile_width=2, epi_tile_m=64, epi_tile_n=32, epi_slots=1, split_k=3,
)  # fmt: skip
INFLIGHT = dict(wgmma_inflight=True, max_concurrent_steps=3)


def _operands(rng, m, n, k, dtype, a_mode="token", b_mode="channel", bias=False, azp=None):
    if dtype == "int8":
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (n, k)).astype(np.int8)
    else:
        a = np.asarray(jnp.asarray(rng.standard_normal((m, k)) * 3, F8))
        b = np.asarray(jnp.asarray(rng.standard_normal((n, k)) * 3, F8))
    a_s = rng.uniform(0.5, 2.0, (m, 1) if a_mode == "token" else (1, 1)).astype(np.float32)
    if dtype == "int8":
        a_s *= 1e-3  # keep int8 outputs well inside float16's range
    b_s = rng.uniform(0.5, 2.0, (1, n) if b_mode == "channel" else (1, 1)).astype(np.float32)
    bias_v = rng.standard_normal(n).astype(np.float32) * 50 if bias else None
    zp = adj = None
    if azp is not None:
        zp = rng.integers(-128, 128, (m, 1) if azp == "token" else (1, 1)).astype(np.int32)
        adj = b.astype(np.int32).sum(axis=1, dtype=np.int32)[None, :]
    return a, b, a_s, b_s, bias_v, zp, adj


def _reference(a, b, a_s, b_s, bias=None, zp=None, adj=None):
    acc = a.astype(np.float64) @ b.astype(np.float64).T
    if zp is not None:
        acc = acc - zp.astype(np.float64) * adj.astype(np.float64)
    y = acc * a_s.astype(np.float64) * b_s.astype(np.float64)
    return y if bias is None else y + bias.astype(np.float64)


def _run(ops, dtype, out_dtype, config):
    a, b, a_s, b_s, bias, zp, adj = ops
    jdt = jnp.int8 if dtype == "int8" else F8
    j = lambda v, d=None: None if v is None else jnp.asarray(v, d)
    out = mm.scaled_mm(
        j(a, jdt),
        j(b, jdt),
        j(a_s),
        j(b_s),
        bias=j(bias),
        azp=j(zp),
        azp_adj=j(adj),
        out_dtype=out_dtype,
        config=config,
        interpret=True,
    )
    assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == jnp.dtype(out_dtype)
    return np.asarray(out.astype(jnp.float32))


def _rel(out, ref):
    assert np.all(np.isfinite(out))
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


# Interpret mode accumulates fp8 in exact float32 (no wgmma), so the output rounding alone.
TOL = {od: kernel_rtol(od) for od in (jnp.bfloat16, jnp.float16, jnp.float32)}

DECODE_N80 = mm.TuningConfig(
    tile_m=64, tile_n=80, tile_k=128, max_concurrent_steps=3, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
)
CASES = [
    # (dtype, M, N, K, a_mode, b_mode, bias, azp, out_dtype, config)
    ("fp8", 100, 48, 96, "token", "channel", True, None, jnp.bfloat16, ONE_WG),
    ("fp8", 7, 48, 64, "tensor", "channel", False, None, jnp.float16, ONE_WG),
    ("fp8", 65, 40, 64, "token", "tensor", True, None, jnp.float32, ONE_WG),
    ("fp8", 1, 32, 96, "tensor", "tensor", True, None, jnp.bfloat16, ONE_WG),
    ("fp8", 130, 48, 96, "token", "channel", True, None, jnp.bfloat16, TWO_WG_M),
    ("fp8", 70, 80, 128, "token", "channel", False, None, jnp.float32, TWO_WG_N),
    ("int8", 100, 48, 96, "token", "channel", True, None, jnp.bfloat16, ONE_WG),
    ("int8", 33, 32, 64, "tensor", "tensor", False, None, jnp.float32, ONE_WG),
    ("int8", 100, 48, 96, "token", "channel", True, "token", jnp.float32, ONE_WG),
    ("int8", 9, 48, 64, "tensor", "channel", False, "tensor", jnp.bfloat16, ONE_WG),
    # Two consumer warpgroups with int8: no zero points here.  GPU interpret
    # mode (jax 0.11.2) intermittently stalls in a barrier wait when two
    # warpgroups each fetch 3-5 epilogue vectors (int8 + zero points); the same
    # variants pass on the H100 (benchmarks/gpu_check.py: mid/big configs with
    # per-token zero points and bias at M = 7, 129, 1000), so CI covers the
    # zero-point epilogue with one consumer warpgroup.
    ("int8", 65, 32, 64, "token", "tensor", False, None, jnp.float16, TWO_WG_M),
    ("int8", 64, 48, 96, "tensor", "channel", True, None, jnp.float32, TWO_WG_N),
    # Split-K: bias and zero-point term added by the first K range only; K = 160 is 3 tiles
    # of 64 (the last one partial), so each of the 3 ranges is one tile.
    ("fp8", 100, 48, 160, "token", "channel", True, None, jnp.bfloat16, SPLIT_K3),
    ("int8", 9, 48, 160, "token", "channel", True, "token", jnp.float32, SPLIT_K3),
    ("int8", 70, 32, 128, "tensor", "tensor", True, "tensor", jnp.bfloat16, dataclasses.replace(TWO_WG_M, split_k=2)),
    # The large-M tile's shape (128-row warpgroup tiles side by side along N) with split-K, a tuner candidate
    # at mid M: partial M, N and K tiles, f32 partials through 64 x 32 epilogue tiles.
    ("fp8", 130, 80, 160, "token", "channel", True, None, jnp.bfloat16, LARGE_SPLIT_K3),
    # One wgmma group in flight (delay_release=1): 2 and 3 K steps, partial last K tile, split-K.
    ("fp8", 130, 80, 160, "token", "channel", True, None, jnp.bfloat16, dataclasses.replace(TWO_WG_N, **INFLIGHT)),
    ("int8", 100, 48, 128, "token", "channel", True, "token", jnp.float32, dataclasses.replace(ONE_WG, **INFLIGHT)),
    ("fp8", 9, 48, 160, "tensor", "channel", False, None, jnp.float16, dataclasses.replace(SPLIT_K3, **INFLIGHT)),
    # The 80-wide decode tile (N = 10240 in one wave of 128 tiles), a partial last N tile.
    ("int8", 5, 208, 256, "token", "channel", True, "token", jnp.bfloat16, DECODE_N80),
    # The heuristic's 128 x 192 tile (two 128 x 96 warpgroups along N, M > 512 with a half-empty last wave of
    # 128 x 256 tiles): partial M, N and K tiles.
    ("fp8", 130, 208, 160, "token", "channel", True, None, jnp.bfloat16, mm._n192_tile()),
    ("int8", 140, 400, 288, "tensor", "channel", True, None, jnp.float32, mm._n192_tile()),
    # The mid-M 64 x 128 tile (two 64 x 64 warpgroups along N; the heuristic runs it as clusters of two along M,
    # which interpret mode drops): partial M, N and K tiles, three row tiles.
    ("fp8", 130, 272, 224, "token", "channel", True, None, jnp.float32,
     dataclasses.replace(mm._row64_cluster_tile(64), cluster=None, max_concurrent_steps=3)),
    ("int8", 100, 208, 160, "tensor", "channel", True, None, jnp.bfloat16,
     dataclasses.replace(mm._row64_cluster_tile(64), cluster=None, max_concurrent_steps=3)),
    # A mid-M width between the powers of two (two 64 x 80 warpgroups along M, 16-wide epilogue tiles).
    ("fp8", 130, 176, 288, "token", "channel", True, None, jnp.bfloat16, mm._mid_m_tile(80)),
    # 512-deep K steps of the small-M tile (mm._deep_small_m_steps): 1.1 steps, partial M / N tiles.
    ("int8", 20, 48, 576, "token", "channel", True, "token", jnp.bfloat16,
     dataclasses.replace(ONE_WG, tile_k=512, max_concurrent_steps=2)),
    # The 128 x 224 tile (two 128 x 112 warpgroups along N, 16-wide epilogue tiles): partial M, N and K tiles.
    ("fp8", 130, 464, 160, "token", "channel", True, None, jnp.bfloat16, mm._n224_tile()),
    ("int8", 140, 240, 288, "tensor", "channel", True, None, jnp.float32,
     mm._fit_smem(mm._n224_tile(), jnp.int8, jnp.float32)),
    # 256-deep K steps at mid M (mm._deep_k_steps): two 64 x 32 warpgroups along M, 1.125 and 2 steps; the 64 x 128
    # row tile (unclustered here) with int8 zero points; K = 288 leaves a partial last step.
    ("fp8", 130, 96, 288, "token", "channel", True, None, jnp.bfloat16,
     dataclasses.replace(mm._mid_m_tile(32), tile_k=256, max_concurrent_steps=3)),
    ("int8", 100, 208, 512, "tensor", "channel", True, "token", jnp.float32,
     dataclasses.replace(mm._row64_cluster_tile(64), cluster=None, tile_k=256, max_concurrent_steps=2)),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        f"{c[0]}-M{c[1]}N{c[2]}K{c[3]}-a{c[4]}-b{c[5]}"
        f"-bias{int(c[6])}-azp{c[7]}-{jnp.dtype(c[8]).name}-w{c[9].num_compute_wgs}"
        f"{c[9].wg_dimension}{'-inflight' if c[9].wgmma_inflight else ''}"
    ),
)
def test_interpret_matches_float64_reference(case):
    dtype, m, n, k, a_mode, b_mode, bias, azp, od, cfg = case
    rng = np.random.default_rng(abs(hash(str(case[:9]))) % 2**32)
    ops = _operands(rng, m, n, k, dtype, a_mode, b_mode, bias, azp)
    out = _run(ops, dtype, od, cfg)
    assert _rel(out, _reference(*ops)) < TOL[od]


def test_tma_rows_of_epilogue_vectors_stay_on_the_128_byte_grid():
    for dt in (jnp.float32, jnp.int32, jnp.bfloat16, jnp.float16):
        for length in (8, 16, 24, 32, 64, 128, 200, 256):
            padded = mm.tma_row_len(length, dt)
            assert padded >= length and (padded * jnp.dtype(dt).itemsize) % mm.TMA_SMEM_ALIGN == 0
            assert padded - length < mm.TMA_SMEM_ALIGN // jnp.dtype(dt).itemsize


@pytest.mark.parametrize("tile_n", [16, 32])
def test_two_warpgroups_with_narrow_column_vectors(tile_n):
    """Two warpgroups, column vectors whose rows are narrower than TMA's 128-byte shared-memory grid
    (f32 at tile_n=16: 64 bytes). The second warpgroup's row used to start 64 bytes in, off the grid
    (an nn.Linear's bf16 bias at tile_n=32, M=256 faulted with CUDA_ERROR_MISALIGNED_ADDRESS on an
    H100); rows are now padded, and this checks they are read back right. Interpret mode cannot see
    the alignment itself, and with two warpgroups it stalls on 16-bit bias vectors (jax 0.11.2, with
    or without the padding), so the bf16 / f16 bias cases run on the GPU (benchmarks/gpu_check.py)."""
    cfg = dataclasses.replace(TWO_WG_M, tile_n=tile_n, epi_tile_n=16)
    rng = np.random.default_rng(tile_n)
    ops = _operands(rng, 130, 80, 96, "fp8", bias=True)
    assert _rel(_run(ops, "fp8", jnp.bfloat16, cfg), _reference(*ops)) < TOL[jnp.bfloat16]


def test_int8_zero_point_correction_is_exact_in_int32():
    # f32 output: int8 products and the zero-point term are exact in int32, so
    # the only error is the final f32 scaling.
    rng = np.random.default_rng(7)
    ops = _operands(rng, 64, 32, 128, "int8", "tensor", "tensor", False, "token")
    a, b, a_s, b_s, _, zp, adj = ops
    a_s[:] = 1.0
    b_s[:] = 1.0
    out = _run(ops, "int8", jnp.float32, ONE_WG)
    want = a.astype(np.int64) @ b.astype(np.int64).T - zp.astype(np.int64) * adj.astype(np.int64)
    np.testing.assert_array_equal(out, want.astype(np.float32))


def test_split_k_int8_is_exact_in_f32():
    # Each K range's partial is exact in int32 and in f32 after scaling by 1.
    rng = np.random.default_rng(11)
    ops = _operands(rng, 20, 32, 256, "int8", "tensor", "tensor", False, "token")
    a, b, a_s, b_s, _, zp, adj = ops
    a_s[:] = 1.0
    b_s[:] = 1.0
    out = _run(ops, "int8", jnp.float32, dataclasses.replace(ONE_WG, split_k=4))
    want = a.astype(np.int64) @ b.astype(np.int64).T - zp.astype(np.int64) * adj.astype(np.int64)
    np.testing.assert_array_equal(out, want.astype(np.float32))


@pytest.mark.parametrize(
    "m, config, azp",
    [(150, ONE_WG, "token"), (150, SPLIT_K3, "token"), (150, TWO_WG_M, None), (150, TWO_WG_N, None),
     (64, ONE_WG, "token"), (40, TWO_WG_M, None)],
    ids=lambda v: v.short() if isinstance(v, mm.TuningConfig) else str(v),
)  # fmt: skip
def test_the_last_row_of_tiles_ends_at_m(m, config, azp):
    # M = 150 (152 rows after tma_rows' padding): the last row of CTA tiles starts at M - cta_m, overlaps the row
    # before and writes the shared rows again with the same values; its per-token scales (and zero points) are
    # read from the same clamped rows.  Exact: int8 products and zero points in int32, power-of-two per-token
    # scales, f32 out.  M = 64 (whole tiles) and 40 (less than a tile) keep their tiles.  (Two warpgroups with
    # per-token zero points stall jax 0.11.2's interpreter, clamp or not; the GPU check runs that combination.)
    rng = np.random.default_rng(m)
    a, b, _, _, _, zp, adj = _operands(rng, m, 48, 192, "int8", azp=azp)
    a_s = np.exp2(rng.integers(-4, 3, (m, 1))).astype(np.float32)
    ops = (a, b, a_s, np.ones((1, 1), np.float32), None, zp, adj)
    acc = a.astype(np.int64) @ b.astype(np.int64).T
    if azp:
        acc = acc - zp.astype(np.int64) * adj.astype(np.int64)
    np.testing.assert_array_equal(_run(ops, "int8", jnp.float32, config), (acc * a_s).astype(np.float32))
    mp, cta = mm.tma_rows(m), config.cta_tile_m
    last = -(-mp // cta) - 1
    assert int(mm._row_start(last, cta, mp)) == (mp - cta if mp > cta and mp % cta else last * cta)


def test_split_k_must_divide_the_k_tiles():
    a = jnp.zeros((8, 192), F8)
    b = jnp.zeros((32, 192), F8)
    with pytest.raises(ValueError, match="split_k=2 must divide the 3 K tiles"):
        mm.scaled_mm(a, b, jnp.ones((8, 1)), jnp.ones((1, 32)), config=dataclasses.replace(ONE_WG, split_k=2),
                     interpret=True)


def test_default_config_runs_in_interpret_mode():
    rng = np.random.default_rng(3)
    ops = _operands(rng, 5, 32, 64, "fp8", bias=True)
    out = _run(ops, "fp8", jnp.bfloat16, None)  # config=None: heuristic / cache
    assert _rel(out, _reference(*ops)) < 8e-3


# -- bad inputs -------------------------------------------------------------------------------


def _args(m=16, n=32, k=64, dtype=F8):
    return (
        jnp.zeros((m, k), dtype),
        jnp.zeros((n, k), dtype),
        jnp.ones((m, 1), jnp.float32),
        jnp.ones((1, n), jnp.float32),
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a, b, x, y: (a.astype(jnp.float16), b, x, y), r"a has dtype float16"),
        (lambda a, b, x, y: (a, b.astype(jnp.int8), x, y), r"b has dtype int8; expected the dtype of a"),
        (lambda a, b, x, y: (a, b.T, x, y), r"b has shape \(64, 32\).*K-major \(N, K\)"),
        (lambda a, b, x, y: (a, b, x.reshape(1, 16), y), r"a_scale has shape \(1, 16\)"),
        (lambda a, b, x, y: (a, b, x, y.reshape(32, 1)), r"b_scale has shape \(32, 1\)"),
        (lambda a, b, x, y: (a, b, x.astype(jnp.bfloat16), y), r"a_scale has dtype bfloat16"),
        (lambda a, b, x, y: (a[:, :48], b[:, :48], x, y), r"K=48 .* multiple of 32"),
        (lambda a, b, x, y: (a, b[:24], x, y[:, :24]), r"N=24 .* multiple of 16"),
        (lambda a, b, x, y: (a[0], b, x, y), r"a must be 2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        mm.scaled_mm(*mutate(*_args()), config=ONE_WG, interpret=True)


def test_bad_epilogue_arguments():
    a, b, x, y = _args()
    with pytest.raises(ValueError, match=r"bias has shape \(31,\)"):
        mm.scaled_mm(a, b, x, y, bias=jnp.zeros(31), interpret=True)
    with pytest.raises(ValueError, match=r"azp and azp_adj must be given together"):
        mm.scaled_mm(a, b, x, y, azp=jnp.zeros((16, 1), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"only supported for int8"):
        mm.scaled_mm(
            a, b, x, y, azp=jnp.zeros((16, 1), jnp.int32), azp_adj=jnp.zeros((1, 32), jnp.int32), interpret=True
        )
    ai, bi, _, _ = _args(dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"azp has dtype float32"):
        mm.scaled_mm(
            ai, bi, x, y, azp=jnp.zeros((16, 1), jnp.float32), azp_adj=jnp.zeros((1, 32), jnp.int32), interpret=True
        )
    with pytest.raises(ValueError, match=r"out_dtype int32"):
        mm.scaled_mm(a, b, x, y, out_dtype=jnp.int32, interpret=True)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(tile_n=12), r"tile_n=12 must be a multiple of 8"),
        (dict(tile_m=96), r"tile_m=96 must be a multiple of 64"),
        (dict(tile_k=48), r"tile_k=48 must be a multiple of 32"),
        (dict(num_compute_wgs=3), r"num_compute_wgs=3"),
        (
            dict(tile_m=128, tile_n=256, tile_k=128, max_concurrent_steps=6, num_compute_wgs=2),
            r"needs \d+ bytes of shared memory",
        ),
        (dict(wgmma_inflight=True, max_concurrent_steps=2), r"wgmma_inflight needs max_concurrent_steps >= 3"),
    ],
)
def test_bad_tuning_configs(change, match):
    with pytest.raises(ValueError, match=match):
        mm.scaled_mm(*_args(), config=dataclasses.replace(ONE_WG, **change), interpret=True)


def test_wgmma_inflight_must_be_a_bool():
    with pytest.raises(TypeError, match="wgmma_inflight=1 must be True or False"):
        mm.scaled_mm(*_args(), config=dataclasses.replace(ONE_WG, wgmma_inflight=1), interpret=True)


def test_large_m_keeps_one_wgmma_in_flight_from_m_2048(monkeypatch):
    # H100: 1.4-2.4 % faster from M = 2048, neutral at 1024, 1.7 % slower at 512 x 28672 x 4096.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for m in (2048, 4096, 8192):
        cfg = mm.default_config(m, 8192, 8192, F8)
        assert cfg.wgmma_inflight and cfg.short().endswith("i") and cfg.cta_tile_n == 256
        assert dataclasses.replace(cfg, wgmma_inflight=False) == mm.default_config(1024, 8192, 8192, F8)
    for m in (1, 16, 128, 512, 1024):
        assert not mm.default_config(m, 8192, 8192, F8).wgmma_inflight
    # the autotuner tries the other side of the switch
    assert any(c.wgmma_inflight for c in mm.candidate_configs(1024, 8192, 8192, F8))
    assert any(not c.wgmma_inflight for c in mm.candidate_configs(4096, 8192, 8192, F8))


def test_tma_rows_pads_only_above_one_row_tile():
    assert [mm.tma_rows(m) for m in (1, 5, 8, 9, 16, 100, 129)] == [1, 5, 8, 16, 16, 104, 136]


@pytest.mark.parametrize("m", [1, 5, 8, 100])
def test_decode_runs_unpadded_and_larger_m_pads(m):
    # Mosaic GPU takes fewer than 8 rows as one partial TMA tile (measured: the XLA pads + slice cost
    # 0.4-3 us at decode); above 8 rows it needs whole 8-row tiles (the CUDA lowering rejects M = 100).
    args = [S((m, 256), F8), S((512, 256), F8), S((m, 1), jnp.float32), S((1, 512), jnp.float32)]
    hlo = jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y)).trace(*args).lower(lowering_platforms=("cuda",))
    text = hlo.as_text()
    assert ("stablehlo.pad" in text) == (m % 8 != 0 and m > 8)


@pytest.mark.parametrize("ablation", ["no_store", "direct"])
def test_epilogue_ablations_lower_for_cuda(monkeypatch, ablation):
    # benchmarks/ab_gemm.py --ab epilogue times the kernel with these (benchmark only, never the default)
    monkeypatch.setattr(mm, "_EPILOGUE_ABLATION", ablation)
    args = [S((256, 256), F8), S((512, 256), F8), S((256, 1), jnp.float32), S((1, 512), jnp.float32)]
    cfg = mm.default_config(256, 512, 256, F8)
    text = (
        jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y, config=cfg))
        .trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    )  # fmt: skip
    assert "mosaic_gpu" in text


def test_required_alignment():
    assert mm.required_alignment(F8, jnp.bfloat16) == (16, 32)
    assert mm.required_alignment(jnp.int8, jnp.float16) == (16, 32)
    assert mm.required_alignment(jnp.int8, jnp.float32) == (8, 32)


# -- static checks: cross-lowering for CUDA on the CPU ----------------------------------------

LLAMA = [
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),
    (10240, 8192),
    (8192, 8192),
    (57344, 8192),
    (8192, 28672),
]


def test_default_configs_are_valid_for_the_benchmark_grid():
    for n, k in LLAMA:
        for m in (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
            for dt in (F8, jnp.int8):
                for od in (jnp.bfloat16, jnp.float32):
                    cfg = mm.default_config(m, n, k, dt, od)
                    mm._validate_config(cfg, dt, od)
                    assert mm.smem_bytes(cfg, dt, od) <= mm.SMEM_LIMIT_BYTES


def test_mid_m_deepens_the_k_steps_of_narrow_tiles(monkeypatch):
    # H100 A/B (results/h100_ab_depth.json): 256-deep K steps with the deepest pipeline that fits beat 128-deep ones
    # where they keep >= 4 stages (128 x 4096^2, 2 x 64 x 32 tiles: 11.0 -> 9.5 us), >= 3 for clusters along M
    # (256 x 8192 x 28672: 100.6 -> 98.8), and at M <= 128 where they hold more K in flight (2 x 64 x 256 tiles at
    # 128 x 28672 x 4096: 49.6 -> 47.5); with 3 stages left elsewhere level, with 2 from M = 256 up to 12 % slower.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    deepened = {  # grid shape -> (tile_k, stages) of the heuristic's mid tile
        (128, 4096, 4096): (256, 5), (128, 6144, 4096): (256, 4), (128, 10240, 8192): (256, 4),
        (128, 8192, 8192): (256, 4), (256, 4096, 4096): (256, 4), (256, 4096, 14336): (256, 4),
        (256, 8192, 28672): (256, 3), (512, 4096, 14336): (256, 3), (128, 28672, 4096): (256, 2),
        (128, 57344, 8192): (256, 2), (128, 16384, 8192): (256, 3),
    }  # fmt: skip
    kept = ((256, 6144, 4096), (256, 10240, 8192), (512, 6144, 4096), (512, 8192, 8192), (256, 8192, 8192),
            (128, 4096, 14336), (256, 28672, 4096), (512, 4096, 4096))  # fmt: skip
    for dt in (F8, jnp.int8):
        for (m, n, k), (tk, stages) in deepened.items():
            cfg = mm.default_config(m, n, k, dt)
            assert (cfg.tile_k, cfg.max_concurrent_steps) == (tk, stages), (m, n, k, cfg.short())
            shallow = mm._fit_smem(mm._mid_m_tiles(m, n, k, dt, jnp.bfloat16, mm.H100_NUM_SMS), dt, jnp.bfloat16)
            assert shallow.tile_k == 128 and cfg == dataclasses.replace(
                shallow, tile_k=tk, max_concurrent_steps=stages, epi_slots=cfg.epi_slots
            ), (m, n, k)
        for m, n, k in kept:
            cfg = mm.default_config(m, n, k, dt)
            assert cfg.tile_k == 128, (m, n, k, cfg.short())
    # K below the measured range, f32 output where the deep pipeline keeps too few stages or does not fit
    assert mm.default_config(128, 4096, 2048, F8).tile_k == 128
    assert mm.default_config(128, 6144, 4096, F8, jnp.float32).tile_k == 128
    tile256 = mm._fit_smem(mm._mid_m_tile(256), F8, jnp.float32)
    assert mm._deep_k_steps(tile256, 128, 4096, F8, jnp.float32) == tile256  # 2 stages of 256 do not fit with f32
    # a K-split cluster keeps an even number of K steps per CTA: K = 4352 is 34 steps of 128 but 17 of 256
    ck = mm._fit_smem(dataclasses.replace(mm._mid_m_tile(32), cluster="k"), F8, jnp.bfloat16)
    assert mm._deep_k_steps(ck, 128, 4352, F8, jnp.bfloat16) == ck
    assert mm._deep_k_steps(ck, 128, 4608, F8, jnp.bfloat16).tile_k == 256


def test_decode_deepens_the_k_steps_where_four_stages_remain(monkeypatch):
    # H100 A/B (results/h100_ab_depth.json): twice as deep K steps at M <= 64 where >= 4 stages of them fit (swapped
    # decode tiles 8 -> 5 / 6 stages of 512, 64 x 32 tiles 8 -> 4, the K-split 64 x 64 tile 8 of 128 -> 6 of 256); with
    # 3 left it was mixed (16 x 6144 x 4096 and 1 x 10240 x 8192 slower in the grid re-run): those keep their steps.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    deepened = {  # (M, N, K) -> (tile_k, stages)
        (1, 4096, 4096): (512, 6), (16, 4096, 4096): (512, 5), (1, 8192, 8192): (512, 5), (16, 57344, 8192): (512, 5),
        (64, 4096, 4096): (512, 4), (64, 4096, 14336): (256, 6),
    }  # fmt: skip
    kept = {(1, 10240, 8192): 256, (16, 10240, 8192): 256, (64, 6144, 4096): 256, (64, 8192, 8192): 256,
            (64, 28672, 4096): 256}  # fmt: skip
    for dt in (F8, jnp.int8):
        for (m, n, k), (tk, stages) in deepened.items():
            cfg = mm.default_config(m, n, k, dt)
            shallow = mm._small_m_tiles(m, n, k, dt, jnp.bfloat16, mm.H100_NUM_SMS)
            assert (cfg.tile_k, cfg.max_concurrent_steps) == (tk, stages), (m, n, k, cfg.short())
            assert shallow.tile_k == tk // 2 and cfg == dataclasses.replace(
                shallow, tile_k=tk, max_concurrent_steps=stages
            ), (m, n, k)
        for (m, n, k), tk in kept.items():
            assert mm.default_config(m, n, k, dt).tile_k == tk, (m, n, k)
    assert mm.default_config(16, 4096, 2048, F8).tile_k == 256  # K below the measured range
    # f32 output: the swapped tiles' XLA-summed split-K halves take 512-deep steps as well (6 stages fit)
    sk = mm.default_config(1, 4096, 14336, F8, jnp.float32)
    assert (sk.swap_ab, sk.split_k, sk.tile_k) == (True, 2, 512)


def test_nine_to_sixteen_tokens_swap_where_deep_slabs_fill_70_percent(monkeypatch):
    # H100 A/B (results/h100_ab_swap_deep.json): with 512-deep steps the swapped tile won at 16 x 6144 x 4096 (96
    # slabs: 73 % of a wave) and 16 x 28672 x 4096 (448: 85 %) at K = 4096, and still lost at 16 x 10240 x 8192 (61 %).
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for dt in (F8, jnp.int8):
        for m in (9, 13, 16):
            assert mm.default_config(m, 6144, 4096, dt).swap_ab and mm.default_config(m, 28672, 4096, dt).swap_ab
            assert not mm.default_config(m, 10240, 8192, dt).swap_ab
        # without the deeper steps (K below 4096) the older rule stands: >= 80 % and K >= 8192 or a K-split cluster
        assert not mm.default_config(16, 28672, 2048, dt).swap_ab


def test_wide_n_mid_m_takes_the_large_tile(monkeypatch):
    # H100: at 256 x 28672 x 4096 the 2x64 x 256 mid tile ran 0.82x XLA, at 512 0.78x; the large-M
    # tiles (128-row warpgroups along N, 4 stages) stream a wave of tiles ~1.45x faster.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    large = mm.default_config(1024, 28672, 4096, F8)
    assert (large.tile_m, large.cta_tile_n) == (128, 256)
    for m, n, k in ((256, 28672, 4096), (256, 16384, 2048)):
        cfg = mm.default_config(m, n, k, F8)
        assert (cfg.tile_m, cfg.num_compute_wgs, cfg.wg_dimension) == (128, 2, "n"), (m, n, k)
    assert mm.default_config(256, 16384, 2048, F8) == large  # (at N = 28672 224-wide: see below)
    assert mm.default_config(128, 28672, 4096, F8).tile_m == 64  # one 128-row tile: the mid-M model decides


def test_wide_n_mid_m_takes_192_wide_tiles_when_they_need_no_more_waves(monkeypatch):
    # H100, 512 x 10240 x 8192 fp8: 2x64 x 192 tiles (216, two waves) 81.3 us, 128 x 256 (160, two waves) 89.3
    # (that shape now takes one wave of 128 x 320 tiles, 58.9 us: see the next test).
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    large = mm.default_config(1024, 28672, 4096, F8)
    for m, n, k in ((256, 10240, 8192), (512, 6144, 4096)):
        for dt in (F8, jnp.int8):
            cfg = mm.default_config(m, n, k, dt)
            assert (cfg.cta_tile_m, cfg.cta_tile_n, cfg.num_compute_wgs, cfg.wg_dimension) == (128, 192, 2, "m")
            assert mm.smem_bytes(cfg, dt, jnp.bfloat16) <= mm.SMEM_LIMIT_BYTES
    # 192-wide tiles would add a wave: keep 128 x 256 (128 vs 172 tiles at 512 x 8192^2).
    assert mm.default_config(512, 8192, 8192, F8) == large


def test_128_by_320_tiles_where_they_save_a_wave(monkeypatch):
    # H100 fp8, same run: 512 x 10240 x 8192 82.8 -> 58.9 us (one wave of 128 x 320 instead of two of
    # 2 x 64 x 192), 1024 x 10240 x 8192 132.2 -> 113.8, 512 x 28672 x 4096 96.1 -> 91.6; slower (kept
    # off) at 1024 x 6144 x 4096, 4096^3 and 256 x 10240 x 8192.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    wide = mm._wide_n_tile()
    assert (wide.cta_tile_m, wide.cta_tile_n) == (128, 320)
    for dt in (F8, jnp.int8):
        for m, n, k in ((512, 10240, 8192), (1024, 10240, 8192)):
            assert mm.default_config(m, n, k, dt) == wide
        for m, n, k in ((1024, 6144, 4096), (4096, 4096, 4096), (256, 10240, 8192), (2048, 28672, 4096)):
            assert mm.default_config(m, n, k, dt).cta_tile_n != 320
        for od in (jnp.bfloat16, jnp.float32):
            mm._validate_config(wide, dt, od, 2, 3)
    assert wide in mm.candidate_configs(4096, 4096, 4096, F8)
    assert wide in mm.candidate_configs(256, 10240, 8192, F8)


def test_128_by_224_tiles_where_they_fill_the_waves(monkeypatch):
    # H100 fp8 / int8, same run (results/h100_ab_n224.json): 256 x 28672 x 4096 55.0 -> 54.4 / 55.4 -> 53.9 us,
    # 512 x 28672 x 4096 91.4 -> 90.6 / 87.4 -> 82.9, 256 x 57344 x 8192 200.9 -> 194.5 / 197.6 -> 188.0; slower
    # (kept off) at 1024 / 2048 x 28672 x 4096 (more waves) and at M = 128 (the mid-M tiles).
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    n224 = mm._n224_tile()
    assert (n224.cta_tile_m, n224.cta_tile_n, n224.num_compute_wgs, n224.wg_dimension) == (128, 224, 2, "n")
    for dt in (F8, jnp.int8):
        for m, n, k in ((256, 28672, 4096), (512, 28672, 4096), (256, 57344, 8192), (500, 27000, 4096)):
            assert mm.default_config(m, n, k, dt) == n224, (m, n, k)
        for m, n, k in ((1024, 28672, 4096), (2048, 28672, 4096), (128, 28672, 4096), (128, 57344, 8192),
                        (512, 10240, 8192), (1024, 6144, 4096), (4096, 4096, 4096)):  # fmt: skip
            assert mm.default_config(m, n, k, dt).cta_tile_n != 224, (m, n, k)
        for od in (jnp.bfloat16, jnp.float16, jnp.float32):
            mm._validate_config(mm._fit_smem(n224, dt, od), dt, od, 2, 3)
    assert n224 in mm.candidate_configs(256, 28672, 4096, F8)
    assert n224 in mm.candidate_configs(4096, 4096, 4096, F8)


def test_cross_lowering_128_by_224_tiles():
    for dt, azp in ((F8, None), (jnp.int8, "token")):
        _lower(256, 28672, 4096, dt, jnp.bfloat16, None, bias=True, azp=azp)  # the heuristic picks it here
        _lower(1000, 1040, 2080, dt, jnp.float32, mm._fit_smem(mm._n224_tile(), dt, jnp.float32), bias=True, azp=azp)
        _lower(3000, 1040, 2080, dt, jnp.bfloat16, mm._n224_tile(inflight=True), bias=True, azp=azp)


def test_cross_lowering_128_by_320_tiles():
    for dt, azp in ((F8, None), (jnp.int8, "token")):
        _lower(512, 10240, 8192, dt, jnp.bfloat16, None, bias=True, azp=azp)  # the heuristic picks it here
        _lower(1000, 1040, 2080, dt, jnp.float32, mm._wide_n_tile(), bias=True, azp=azp)  # partial tiles


def _lower(m, n, k, dtype, out_dtype, config, bias=True, azp=None):
    args = [S((m, k), dtype), S((n, k), dtype), S((m, 1), jnp.float32), S((1, n), jnp.float32)]
    args.append(S((n,), jnp.float32) if bias else None)
    if azp:
        args += [S((m, 1) if azp == "token" else (1, 1), jnp.int32), S((1, n), jnp.int32)]
    else:
        args += [None, None]

    def f(a, b, x, y, bias, zp, adj):
        return mm.scaled_mm(a, b, x, y, bias=bias, azp=zp, azp_adj=adj, out_dtype=out_dtype, config=config)

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


LOWER_CASES = [
    # every heuristic regime x dtype x epilogue, shapes exercising each swizzle
    (1, 4096, 4096, F8, jnp.bfloat16, None),
    (16, 10240, 8192, jnp.int8, jnp.bfloat16, "token"),  # the 80-wide decode tile
    (16, 6144, 4096, jnp.int8, jnp.float32, "token"),
    (64, 28672, 4096, F8, jnp.float16, None),
    (128, 4096, 4096, jnp.int8, jnp.bfloat16, "tensor"),
    (512, 8192, 28672, F8, jnp.bfloat16, None),
    (4096, 4096, 4096, F8, jnp.bfloat16, None),
    (4096, 4096, 4096, jnp.int8, jnp.bfloat16, "token"),
    (1000, 1040, 2080, F8, jnp.float32, None),
    (129, 1008, 1152, jnp.int8, jnp.bfloat16, "token"),
    (7, 272, 224, F8, jnp.bfloat16, None),
]
SPLIT_LOWER_CASES = [
    # split-K candidates of the autotuner at decode and mid M (f32 partials in shared memory)
    (16, 4096, 14336, F8, jnp.bfloat16, None),
    (1, 8192, 28672, jnp.int8, jnp.bfloat16, "token"),
    (128, 4096, 14336, F8, jnp.float16, None),
    (256, 8192, 28672, jnp.int8, jnp.bfloat16, "tensor"),
]


@pytest.mark.parametrize("case", SPLIT_LOWER_CASES, ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}-{jnp.dtype(c[3]).name}")
def test_split_k_candidates_cross_lower_for_cuda(case):
    m, n, k, dt, od, azp = case
    cands = [c for c in mm.candidate_configs(m, n, k, dt, od) if c.split_k > 1]
    assert cands, "the autotuner offers split-K at this shape"
    for cfg in cands:
        _lower(m, n, k, dt, od, cfg, azp=azp)


@pytest.mark.parametrize(
    "case", LOWER_CASES, ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}-{jnp.dtype(c[3]).name}-{jnp.dtype(c[4]).name}-azp{c[5]}"
)
def test_cross_lowers_for_cuda(case):
    m, n, k, dt, od, azp = case
    lowered = _lower(m, n, k, dt, od, None, azp=azp)
    assert "mosaic_gpu" in lowered.as_text()[:20000]


def test_cross_lowering_tuning_candidates():
    for m, n, k in ((16, 4096, 4096), (128, 4096, 4096), (4096, 4096, 4096)):
        for cfg in mm.candidate_configs(m, n, k, F8, jnp.bfloat16)[:6]:
            _lower(m, n, k, F8, jnp.bfloat16, cfg, bias=False)


def test_no_tuning_candidate_spills_a_128_by_256_accumulator():
    # Two 128 x 256 warpgroups (along M: gpu_check's big_m128x256_wgM) are correct but spill their 256 f32
    # accumulator registers a thread: 5.3-6x slower on the H100 (results/h100_ab_big_tile.json).
    for dt in (F8, jnp.int8):
        assert max(c.tile_m * c.tile_n // 128 for c in mm.candidate_configs(4096, 8192, 8192, dt)) == 160  # 128 x 160


def test_large_m_takes_128_by_192_tiles_where_128_by_256_leave_a_half_empty_wave(monkeypatch):
    # H100 A/B (results/h100_ab_big_tile.json): 1024 x 6144 x 4096 fp8 45.9 -> 38.2 us, int8 44.9 -> 35.5;
    # 640 x 4096^2 -17 / -20 %, 768 x 28672 x 4096 -6 / -8 %, 3072 x 6144 x 4096 -3.4 / -6 %; 2048 x 6144 x
    # 4096 +3 / +4 % (kept at 128 x 256).
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    n192 = mm._n192_tile()
    assert (n192.cta_tile_m, n192.cta_tile_n, n192.wg_dimension) == (128, 192, "n")
    for dt in (F8, jnp.int8):
        for m, n, k in ((1024, 6144, 4096), (640, 4096, 4096), (768, 28672, 4096), (3072, 6144, 4096),
                        (1536, 4096, 4096), (768, 8192, 8192)):  # fmt: skip
            assert mm.default_config(m, n, k, dt) == n192, (m, n, k)
        for m, n, k in ((2048, 6144, 4096), (4096, 4096, 4096), (1024, 28672, 4096), (8192, 8192, 8192)):
            assert mm.default_config(m, n, k, dt).cta_tile_n == 256, (m, n, k)
        assert mm.default_config(1024, 10240, 8192, dt) == mm._wide_n_tile()  # 128 x 320 saves more there
        for od in (jnp.bfloat16, jnp.float16, jnp.float32):
            mm._validate_config(n192, dt, od, 2, 3)
        assert n192 in mm.candidate_configs(4096, 4096, 4096, dt)


def test_mid_m_takes_in_between_widths_where_they_fill_the_waves(monkeypatch):
    # H100 A/B (results/h100_ab_mid_tn.json): 128 x 10240 x 8192 with 80-wide tiles (128 of them for 132 SMs,
    # not 80 of 128) fp8 35.1 -> 34.0 us, int8 35.0 -> 34.0; 256 x 6144 x 4096 with 96 -> -4 / -6 %.  Where the
    # model promises less (0.92: 128 x 6144 x 4096, 128 x 28672 x 4096) the widths ran level: powers of two there.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for dt in (F8, jnp.int8):
        for m, n, k, tn in ((128, 10240, 8192, 80), (256, 6144, 4096, 96), (128, 6144, 4096, 64),
                            (128, 28672, 4096, 256)):  # fmt: skip
            cfg = mm.default_config(m, n, k, dt)
            assert (cfg.tile_m, cfg.tile_n, cfg.num_compute_wgs, cfg.wg_dimension) == (64, tn, 2, "m"), (m, n, k)
            assert cfg.tile_n % cfg.epi_tile_n == 0
        _lower(128, 10240, 8192, dt, jnp.bfloat16, None, bias=True, azp="token" if dt == jnp.int8 else None)
        _lower(130, 1000, 1056, dt, jnp.float32, mm._fit_smem(mm._mid_m_tile(96), dt, jnp.float32), bias=True)


def test_cross_lowering_128_by_192_tiles():
    for dt, azp in ((F8, None), (jnp.int8, "token")):
        _lower(1024, 6144, 4096, dt, jnp.bfloat16, None, bias=True, azp=azp)  # the heuristic picks it here
        _lower(1000, 6000, 1056, dt, jnp.float32, mm._n192_tile(), bias=True, azp=azp)  # partial M, N and K tiles


def test_cross_lowering_mid_m_in_between_tiles():
    # The 160 / 192-wide mid-M candidates (wave quantization at wide N; 192 also as 2 x 128 x 96
    # warpgroups along N) compile for sm90, fp8 and int8 (its int32 accumulators).
    for dt in (F8, jnp.int8):
        cands = mm.candidate_configs(512, 10240, 8192, dt, jnp.bfloat16)
        cands = [c for c in cands if c.cta_tile_n in (160, 192) and not c.cluster]
        assert sorted((c.cta_tile_n, c.wg_dimension) for c in cands) == [(160, "m"), (192, "m"), (192, "n")]
        for cfg in cands:
            _lower(512, 10240, 8192, dt, jnp.bfloat16, cfg, bias=True)


def test_cross_lowering_catches_what_interpret_mode_does_not(monkeypatch):
    # Over-full shared memory passes interpret mode but not the Mosaic GPU compiler.
    big = mm.TuningConfig(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=5, epi_slots=2)
    monkeypatch.setattr(mm, "_validate_config", lambda *a, **k: None)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower(1024, 1024, 1024, F8, jnp.bfloat16, big, bias=False)
    # A 128-byte swizzle on a K that is not a multiple of 128: Mosaic's TMA
    # tiling of the GMEM operand rejects it (the kernel itself picks a narrower
    # swizzle, see _pick_swizzle).
    monkeypatch.setattr(mm, "_validate", lambda *a, **k: None)
    monkeypatch.setattr(mm, "_pick_swizzle", lambda *a, **k: 128)
    with pytest.raises(ValueError, match="multiple of its tiling"):
        _lower(
            64,
            1024,
            1040,
            F8,
            jnp.bfloat16,
            mm.TuningConfig(tile_m=64, tile_n=64, tile_k=128, num_compute_wgs=1),
            bias=False,
        )


@pytest.mark.parametrize("k_major", [True, False])
def test_cross_lowering_rejects_non_k_major_8bit_b(k_major):
    """8-bit wgmma needs a K-major B; a (K, N) B tile fails to lower (interpret mode runs it)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(64))

    def body(a_gmem, b_gmem, o_gmem):
        @functools.partial(
            pl.run_scoped,
            a=plgpu.SMEM((64, 64), F8, transforms=tr),
            b=plgpu.SMEM((64, 64), F8, transforms=tr),
            bar=plgpu.Barrier(num_barriers=2),
        )
        def _(a, b, bar):
            plgpu.copy_gmem_to_smem(a_gmem, a, bar.at[0])
            plgpu.copy_gmem_to_smem(b_gmem, b, bar.at[1])
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])

            @functools.partial(pl.run_scoped, acc=plgpu.ACC((64, 64), jnp.float32))
            def _(acc):
                # K-major: b holds (N, K) rows, fed transposed; else b is (K, N).
                plgpu.wgmma(acc, a, b.T if k_major else b)
                o_gmem[...] = acc[...]

    f = plgpu.kernel(body, out_type=S((64, 64), jnp.float32))
    lower = lambda: jax.jit(f).trace(S((64, 64), F8), S((64, 64), F8)).lower(lowering_platforms=("cuda",))
    if k_major:
        lower()
    else:
        with pytest.raises(Exception, match="(?i)transpose"):
            lower()


# -- autotune cache ----------------------------------------------------------------------------


def test_autotune_cache_roundtrip_and_lookup(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("QLIN_TUNING_CACHE", str(path))
    monkeypatch.setenv("QLIN_AUTOTUNE", "1")  # no GPU here: must not try to tune
    monkeypatch.setattr(autotune, "_MEMO", {})
    assert autotune.get_config(100, 4096, 4096, F8, jnp.bfloat16) == mm.default_config(
        100, 4096, 4096, F8, jnp.bfloat16
    )
    assert not path.exists()
    tuned = mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=5, num_compute_wgs=2, wg_dimension="m"
    )
    autotune.store_entry(autotune.cache_key(100, 4096, 4096, F8, jnp.bfloat16), tuned, 12.5)
    data = json.loads(path.read_text())
    (entry,) = data.values()
    assert entry["us"] == 12.5 and mm.TuningConfig.from_dict(entry["config"]) == tuned
    monkeypatch.setattr(autotune, "_MEMO", {})
    # M=100 and M=128 share the power-of-two bucket.
    assert autotune.get_config(128, 4096, 4096, F8, jnp.bfloat16) == tuned
    assert autotune.m_bucket(1) == 16 and autotune.m_bucket(129) == 256


def test_autotune_memo_keeps_each_m_heuristic(tmp_path, monkeypatch):
    # M = 1 and M = 16 share a tuning bucket but not a heuristic config (8 vs 16 swapped token columns
    # here); without a cache entry each M gets its own default, whichever M is asked first.
    monkeypatch.setenv("QLIN_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(autotune, "_MEMO", {})
    shape = (4096, 4096, F8, jnp.bfloat16)
    assert mm.default_config(1, *shape) != mm.default_config(16, *shape)
    for m in (1, 16, 1, 2048, 1500):
        assert autotune.get_config(m, *shape) == mm.default_config(m, *shape), m


def test_autotune_tunes_concrete_arrays_when_asked_under_a_jit_trace(tmp_path, monkeypatch):
    # scaled_mm asks for its config while the caller's jit traces it; the tuner runs in its own thread
    # (JAX's trace state is per thread), so its candidates see concrete operands, not tracers.
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("QLIN_TUNING_CACHE", str(path))
    monkeypatch.setenv("QLIN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_MEMO", {})
    monkeypatch.setattr(autotune, "_device_kind", lambda: "FakeGPU")
    cands = mm.candidate_configs(256, 4096, 4096, F8, jnp.bfloat16)
    timed = []

    def fake_time(fn, args, iterations=20):
        assert not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        timed.append(1)
        return 10.0 + len(timed)  # the first candidate is the fastest

    monkeypatch.setattr(autotune, "time_fn", fake_time)
    got = []
    jax.jit(lambda x: got.append(autotune.get_config(200, 4096, 4096, F8, jnp.bfloat16)) or x).trace(jnp.zeros(2))
    assert got == [cands[0]] and len(timed) == len(cands)
    (entry,) = json.loads(path.read_text()).values()
    assert entry["us"] == pytest.approx(11.0 / 8)  # per call: the timed program runs 8 weight copies


def test_autotune_ignores_corrupt_cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text("{not json")
    monkeypatch.setenv("QLIN_TUNING_CACHE", str(path))
    monkeypatch.setattr(autotune, "_MEMO", {})
    assert autotune.get_config(16, 4096, 4096, jnp.int8, jnp.bfloat16) == mm.default_config(
        16, 4096, 4096, jnp.int8, jnp.bfloat16
    )


def test_cluster_heuristic_and_validation():
    # Mid M, long K, 128-wide tiles, an even number of CTA rows: clusters along M multicast the weight tile.
    for m, n, k in ((256, 8192, 28672), (512, 4096, 14336)):
        for dt in (F8, jnp.int8):
            cfg = mm.default_config(m, n, k, dt)
            assert cfg.cluster == "m" and cfg.split_k == 1, cfg
    # Not at decode, with one row of CTA tiles, short K, split-K or the large-M tiles.
    for m, n, k in ((16, 4096, 14336), (128, 4096, 14336), (256, 8192, 8192), (384, 4096, 14336), (4096, 4096, 4096)):
        assert mm.default_config(m, n, k, F8).cluster in (None, "k"), (m, n, k)
    assert any(c.cluster == "m" for c in mm.candidate_configs(4096, 4096, 4096, F8))
    assert not any(c.cluster in ("m", "n") for c in mm.candidate_configs(16, 4096, 4096, F8))
    with pytest.raises(ValueError, match="cluster and config.split_k"):
        mm._validate_config(dataclasses.replace(SPLIT_K3, cluster="m"), F8, jnp.bfloat16)
    with pytest.raises(ValueError, match="config.cluster='x' must be None"):
        mm._validate_config(dataclasses.replace(ONE_WG, cluster="x"), F8, jnp.bfloat16)
    assert dataclasses.replace(ONE_WG, cluster="m").short().endswith("cm")
    assert mm.TuningConfig.from_dict({**ONE_WG.to_dict(), "cluster": "n"}).cluster == "n"
    assert mm.TuningConfig.from_dict({k: v for k, v in ONE_WG.to_dict().items() if k != "cluster"}).cluster is None


def test_mid_m_takes_clustered_64_row_tiles_where_they_fill_one_wave(monkeypatch):
    # H100 A/B (results/h100_ab_row64.json): where 64 x 128 tiles (an even number of 64-row tiles) make one wave
    # filling >= 90 % of the SMs, clusters of two along M sharing the weight tile beat the 128 x 64 mid tiles
    # (256 x 4096 x 14336 fp8 33.4 -> 31.5 us); past one wave (160-256 tiles) or with half the SMs idle they
    # lose or tie.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for dt in (F8, jnp.int8):
        for m, n, k in ((128, 8192, 8192), (128, 8192, 28672), (256, 4096, 4096), (256, 4096, 14336)):
            cfg = mm.default_config(m, n, k, dt)
            row64 = mm._fit_smem(mm._row64_cluster_tile(64), dt, jnp.bfloat16)
            assert cfg == mm._deep_k_steps(row64, m, k, dt, jnp.bfloat16), (m, n, k)  # (256-deep steps, see below)
            assert (cfg.cta_tile_m, cfg.cta_tile_n, cfg.cluster, cfg.split_k) == (64, 128, "m", 1)
        # 64 tiles (half the SMs), 160 / 192 / 256 tiles (past one wave), three 64-row tiles (a half-idle
        # cluster), M > 256 (not measured), decode (M <= 64)
        for m, n, k in ((128, 4096, 14336), (128, 10240, 8192), (384, 4096, 14336), (256, 8192, 28672),
                        (192, 11008, 4096), (320, 3328, 4096), (64, 16896, 4096)):  # fmt: skip
            cfg = mm.default_config(m, n, k, dt)
            assert not (cfg.tile_m == 64 and cfg.wg_dimension == "n" and cfg.num_compute_wgs == 2), (m, n, k, cfg)
    assert mm._takes_row64_cluster(200, 4096, 4096, mm.H100_NUM_SMS)  # 4 row tiles x 32
    assert not mm._takes_row64_cluster(192, 5632, 4096, mm.H100_NUM_SMS)  # 3 row tiles: odd
    assert not mm._takes_row64_cluster(256, 4096, 2048, mm.H100_NUM_SMS)  # K below the measured range
    # both widths are tuner candidates where the row tiles pair up
    for m, expect in ((128, True), (256, True), (192, False)):
        cands = mm.candidate_configs(m, 4096, 14336, F8)
        assert (mm._fit_smem(mm._row64_cluster_tile(128), F8, jnp.bfloat16) in cands) == expect, m
    # the heuristic's clustered tile lowers for the GPU (interpret mode runs it unclustered: CASES)
    _lower(256, 4096, 14336, F8, jnp.bfloat16, None)
    _lower(128, 8192, 8192, jnp.int8, jnp.float32, None, azp="token")


def test_cross_lowering_deepened_tiles():
    # The heuristic's deepened K steps lower for the GPU: 256-deep mid-M steps (5 / 4 / 3 / 2 stages, clustered along
    # M or not), 512-deep decode steps (swapped tiles with K in a cluster, split by XLA, or whole; the 64 x 32 tile).
    bf, i8 = jnp.bfloat16, jnp.int8
    cases = ((128, 4096, 4096, F8, bf, 256), (256, 4096, 14336, i8, bf, 256), (256, 8192, 28672, F8, bf, 256),
             (128, 28672, 4096, i8, bf, 256), (128, 10240, 8192, F8, bf, 256), (1, 4096, 4096, F8, bf, 512),
             (16, 6144, 4096, i8, bf, 512), (1, 4096, 14336, F8, jnp.float32, 512), (64, 4096, 4096, F8, jnp.float16, 512),
             (64, 4096, 14336, i8, bf, 256))  # fmt: skip
    for m, n, k, dt, od, tk in cases:
        assert mm.default_config(m, n, k, dt, od).tile_k == tk, (m, n, k)
        _lower(m, n, k, dt, od, None, azp="token" if dt == jnp.int8 else None)


def test_gpu_check_script_cases_are_valid():
    # benchmarks/gpu_check.py runs these on the GPU; a case its config cannot run (shared memory with that output
    # dtype, a split that does not divide K, an unaligned N) would only show up as a failure after the device time
    # is spent.  scaled_mm's own checks, traced (eval_shape) once per case up to M.
    from qlin.testing import load_script

    mod = load_script("benchmarks/gpu_check.py")
    cases, n_tier1 = mod.check_cases()
    assert 0 < n_tier1 < len(cases)
    assert {c[0] for c in cases} == set(mod.CHECK_CONFIGS) | {None}  # every config is checked
    seen = set()
    for cname, m, n, k, dtype, a_mode, b_mode, bias, azp, od in cases:
        if (key := (cname, n, k, dtype, a_mode, b_mode, bias, azp, od)) in seen:
            continue
        seen.add(key)
        dt = jnp.int8 if dtype == "int8" else F8
        args = [S((m, k), dt), S((n, k), dt), S((m, 1) if a_mode == "token" else (1, 1), jnp.float32),
                S((1, n) if b_mode == "channel" else (1, 1), jnp.float32),
                S((n,), jnp.dtype(bias) if isinstance(bias, str) else jnp.float32) if bias else None,
                None if azp == "none" else S((m, 1) if azp == "token" else (1, 1), jnp.int32),
                None if azp == "none" else S((1, n), jnp.int32)]  # fmt: skip

        def f(a, b, x, y, bias_, zp, adj, cfg=mod.CHECK_CONFIGS[cname] if cname else None, od=od):
            return mm.scaled_mm(a, b, x, y, bias=bias_, azp=zp, azp_adj=adj, out_dtype=jnp.dtype(od), config=cfg)

        assert jax.eval_shape(f, *args).shape == (m, n), key


@pytest.mark.parametrize("cluster", ["m", "n"])
def test_cluster_configs_cross_lower_for_cuda(cluster):
    # The grid of clusters (cluster_grid x 2 CTAs) and the multicast BlockSpec lower for the GPU.
    fit = lambda c, dt=F8: mm._fit_smem(dataclasses.replace(c, cluster=cluster), dt, jnp.bfloat16)  # noqa: E731
    for m, n, k, base in ((4096, 4096, 4096, mm._large_m_tile()), (256, 8192, 28672, mm._mid_m_tile(128))):
        _lower(m, n, k, F8, jnp.bfloat16, fit(base))
    _lower(129, 1040, 2080, jnp.int8, jnp.bfloat16, fit(mm._mid_m_tile(64), jnp.int8), azp="token")


def test_interpret_mode_drops_a_default_cluster_and_rejects_an_explicit_one(monkeypatch):
    # jax 0.11.2's interpreter stalls with clusters under CPU load (seen in CI-like runs with 4 workers), so
    # interpret mode runs a tuned / heuristic cluster config as plain CTAs (same tiles, same result) and
    # rejects an explicit one.  The cluster path itself: cross-lowering above, GPU checks in gpu_check.py.
    from qlin.kernels import autotune

    rng = np.random.default_rng(5)
    ops = _operands(rng, 130, 80, 160, "fp8", bias=True)
    cfg = dataclasses.replace(ONE_WG, cluster="m")
    with pytest.raises(ValueError, match="clusters .* do not run in interpret mode"):
        _run(ops, "fp8", jnp.bfloat16, cfg)
    launched = []
    monkeypatch.setattr(autotune, "get_config", lambda *a, **kw: cfg)
    real_kernel = mm.plgpu.kernel

    def spy(*a, **kw):
        launched.append(kw)
        return real_kernel(*a, **kw)

    monkeypatch.setattr(mm.plgpu, "kernel", spy)
    out = _run(ops, "fp8", jnp.bfloat16, None)
    assert len(launched) == 1 and "cluster" not in launched[0] and launched[0]["grid_names"] == ("sm",)
    assert _rel(out, _reference(*ops)) < TOL[jnp.bfloat16]


# -- swap_ab: the weight as the wgmma A side, tokens as B (decode) ----------------------------------

SWAP16 = mm.TuningConfig(
    tile_m=64, tile_n=16, tile_k=64, max_concurrent_steps=3, num_compute_wgs=1, wg_dimension="m",
    grid_minor_dim="m", epi_tile_m=64, epi_tile_n=16, epi_slots=1, swap_ab=True,
)  # fmt: skip
SWAP8 = dataclasses.replace(SWAP16, tile_n=8, epi_tile_n=8)


@pytest.mark.parametrize(
    "dtype,m,n,k,a_mode,b_mode,bias,azp,out_dtype,config",
    [
        ("fp8", 5, 192, 128, "token", "channel", True, None, jnp.bfloat16, SWAP16),
        ("fp8", 1, 128, 96, "tensor", "channel", False, None, jnp.float16, SWAP16),
        ("fp8", 40, 256, 64, "token", "tensor", True, None, jnp.bfloat16, SWAP16),  # 3 token tiles
        ("int8", 13, 128, 128, "token", "channel", True, "token", jnp.bfloat16, SWAP8),  # padded to 16
        ("int8", 7, 192, 128, "tensor", "tensor", False, "tensor", jnp.float16, SWAP8),
        # split-K: float32 partials (weight rows, tokens padded to the tile), summed + transposed by XLA
        ("fp8", 1, 80, 192, "token", "channel", True, None, jnp.float32, dataclasses.replace(SWAP8, split_k=3)),
        ("int8", 9, 144, 256, "token", "channel", True, "token", jnp.bfloat16, dataclasses.replace(SWAP16, split_k=2)),
        # 512-deep steps (mm._deep_small_m_steps): one partial step, and 2 + a partial one with K split in two
        ("fp8", 16, 128, 416, "token", "channel", True, None, jnp.bfloat16,
         dataclasses.replace(SWAP16, tile_k=512, max_concurrent_steps=2)),
        ("int8", 3, 64, 1120, "token", "channel", False, "token", jnp.float32,
         dataclasses.replace(SWAP8, tile_k=512, max_concurrent_steps=2, split_k=3)),
    ],
)
def test_swap_ab_matches_reference(dtype, m, n, k, a_mode, b_mode, bias, azp, out_dtype, config):
    rng = np.random.default_rng(m * 7 + n + k)
    ops = _operands(rng, m, n, k, dtype, a_mode, b_mode, bias, azp)
    assert _rel(_run(ops, dtype, out_dtype, config), _reference(*ops)) < TOL[out_dtype]


PROPERTY_CONFIGS = [
    ONE_WG, TWO_WG_N, SPLIT_K3, DECODE_N80, dataclasses.replace(ONE_WG, **INFLIGHT), SWAP16,
    dataclasses.replace(SWAP8, split_k=2), mm._n192_tile(),
]  # fmt: skip


@settings(max_examples=10, deadline=None)
@given(
    dtype=st.sampled_from(["fp8", "int8"]),
    m=st.integers(1, 140),
    n16=st.integers(1, 12),
    kb=st.integers(1, 8),
    a_mode=st.sampled_from(["token", "tensor"]),
    b_mode=st.sampled_from(["channel", "tensor"]),
    bias=st.booleans(),
    azp=st.sampled_from([None, "token", "tensor"]),
    out_dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]),
    config=st.sampled_from(PROPERTY_CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_granularities_and_configs(
    dtype, m, n16, kb, a_mode, b_mode, bias, azp, out_dtype, config, seed
):
    # Any M from 1 (partial row tiles, decode), N in steps of 16 and K in steps of 32 (the kernel's
    # alignment; qlin pads weights to it once), every scale granularity, bias, int8 zero points, each output
    # dtype, across the tile layouts: one / two warpgroups, split-K, in-flight wgmma, the 80-wide decode
    # tile, the 128 x 192 large-M tile and swap-AB (N in weight slabs of 64 without split-K, 16-bit outputs:
    # what it supports).
    n, k = 16 * n16, 32 * kb
    assume(-(-k // config.tile_k) % config.split_k == 0)
    if config.swap_ab and config.split_k == 1:
        n = -(-n // 64) * 64
        out_dtype = jnp.bfloat16 if out_dtype == jnp.float32 else out_dtype
    if dtype == "fp8" or config.num_compute_wgs == 2:  # (see CASES: two warpgroups + zero points in interpret mode)
        azp = None
    ops = _operands(np.random.default_rng(seed), m, n, k, dtype, a_mode, b_mode, bias, azp)
    assert _rel(_run(ops, dtype, out_dtype, config), _reference(*ops)) < TOL[out_dtype]


def test_swap_ab_limits_and_choice():
    args = [jnp.zeros((4, 128), F8), jnp.zeros((96, 128), F8), jnp.ones((4, 1)), jnp.ones((1, 96))]
    with pytest.raises(ValueError, match="N=96 must be a multiple of 64"):
        mm.scaled_mm(*args, config=SWAP16, interpret=True)
    args[1], args[3] = jnp.zeros((128, 128), F8), jnp.ones((1, 128))
    with pytest.raises(ValueError, match="16-bit out_dtype"):
        mm.scaled_mm(*args, out_dtype=jnp.float32, config=SWAP16, interpret=True)
    for bad in (dict(num_compute_wgs=2), dict(cluster="m")):
        with pytest.raises(ValueError, match="swap_ab needs num_compute_wgs=1 and cluster None or 'k'"):
            mm._validate_config(dataclasses.replace(SWAP16, **bad), F8, jnp.bfloat16)
    with pytest.raises(TypeError, match="swap_ab=1 must be True or False"):
        mm._validate_config(dataclasses.replace(SWAP16, swap_ab=1), F8, jnp.bfloat16)
    assert SWAP16.short().endswith("t") and mm.TuningConfig.from_dict(SWAP16.to_dict()) == SWAP16
    # the decode candidates include it (16 token columns; 8 up to M = 8 with K in two for few weight slabs), with
    # the heuristic's 512-deep K steps (mm._deep_small_m_steps) and the 256-deep ones it started from
    c1 = [c for c in mm.candidate_configs(1, 4096, 14336, F8) if c.swap_ab]
    c1_wide = [c for c in mm.candidate_configs(1, 8192, 8192, F8) if c.swap_ab]
    c16 = [c for c in mm.candidate_configs(16, 8192, 8192, F8) if c.swap_ab]
    assert [(c.tile_n, mm.k_parts(c), c.tile_k) for c in c1] == [(8, 2, 512), (8, 2, 256)]
    assert [(c.tile_n, c.split_k, c.tile_k) for c in c16] == [(16, 1, 512), (16, 1, 256)]
    assert [(c.tile_n, c.split_k, c.tile_k) for c in c1_wide] == [(16, 1, 512), (16, 1, 256)]
    assert not any(c.swap_ab for c in mm.candidate_configs(64, 8192, 8192, F8))
    assert not any(c.swap_ab for c in mm.candidate_configs(16, 8200, 8192, F8, jnp.bfloat16))  # N % 64


def test_decode_takes_80_wide_tiles_where_they_fill_one_wave(monkeypatch):
    # H100 A/B (benchmarks/results/h100_ab_decode_tn.json): N = 10240 in 128 tiles of 80 beat 107 of 96
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for m in (1, 8, 16):
        for dt in (F8, jnp.int8):
            cfg = mm.default_config(m, 10240, 8192, dt)
            assert (cfg.tile_n, cfg.epi_tile_n, cfg.swap_ab) == (80, 16, False), (m, cfg)
    assert mm.default_config(64, 10240, 8192, F8).tile_n == 96  # not timed above M = 16


def test_swap_ab_heuristic_takes_it_for_decode_where_the_slabs_fill_the_sms(monkeypatch):
    # H100 A/B (benchmarks/results/h100_ab_swap_ab.json): see mm._takes_swap_ab
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    grid = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (8192, 8192), (57344, 8192),
            (8192, 28672))  # fmt: skip
    taken = {m: [(n, k) for n, k in grid if mm.default_config(m, n, k, F8).swap_ab] for m in (1, 8, 16, 17)}
    assert taken[1] == taken[8] == [nk for nk in grid if nk != (10240, 8192)]
    # (16 tokens: at >= 70 % with the deeper steps of mm._deep_small_m_steps, as up to 8 tokens)
    assert taken[16] == taken[8] and taken[17] == []
    assert mm.default_config(16, 4096, 4096, F8).cluster == "k"  # taken at K = 4096 only with the K-split cluster
    assert not mm.default_config(16, 4096, 4096, F8, jnp.float32).swap_ab
    # int8 the same (h100_ab_swap_int8.json); its M = 1 may run XLA's GEMV instead (mosaic_gpu.uses_xla_gemv)
    assert all(mm.default_config(m, n, k, jnp.int8) == mm.default_config(m, n, k, F8) for m in (1, 16) for n, k in grid)
    assert not mm.default_config(1, 8192, 8192, F8, jnp.float32).swap_ab  # a transposed f32 store does not lower
    assert mm.default_config(1, 4096, 4096, F8, jnp.float32).split_k == 2  # ... but split-K partials do
    # 8 token columns only with K in two (a K-split cluster, or XLA-summed split-K for f32 output)
    assert all(c.tile_n == (8 if mm.k_parts(c) == 2 else 16) for c in (mm.default_config(1, n, k, F8) for n, k in grid)
               if c.swap_ab)  # fmt: skip


@pytest.mark.parametrize("m,split_k", [(1, 1), (16, 1), (5, 2), (16, 2)])
def test_swap_ab_lowers_for_cuda(m, split_k):
    cfg = dataclasses.replace(SWAP16, tile_k=256, max_concurrent_steps=8, tile_n=8 if m <= 8 else 16,
                              epi_tile_n=8 if m <= 8 else 16, split_k=split_k)  # fmt: skip
    args = [S((m, 4096), F8), S((4096, 4096), F8), S((m, 1), jnp.float32), S((1, 4096), jnp.float32)]
    text = (
        jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y, config=cfg))
        .trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    )  # fmt: skip
    assert "mosaic_gpu" in text


# ----------------------------------------------------------------------------
# K-split clusters (cluster="k"): two CTAs sum one output tile's K halves through distributed shared memory.
# ----------------------------------------------------------------------------


def test_k_cluster_heuristic_replaces_xla_summed_split_k(monkeypatch):
    # H100 A/B (benchmarks/results/h100_ab_kcluster.json): see mm._takes_mid_cluster_k.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for m, n, k, swap in ((1, 4096, 4096, True), (1, 4096, 14336, True), (16, 4096, 14336, True),
                          (16, 4096, 4096, True), (64, 4096, 14336, False), (128, 4096, 14336, False),
                          (100, 4096, 14336, False)):  # fmt: skip
        for dt in (F8, jnp.int8):
            cfg = mm.default_config(m, n, k, dt)
            assert cfg.cluster == "k" and cfg.split_k == 1 and cfg.swap_ab == swap and mm.k_parts(cfg) == 2, cfg
            mm._validate_config(cfg, dt, jnp.bfloat16)
    assert mm.default_config(128, 4096, 14336, F8).cta_tile_n == 64  # 64 tiles: 64 clusters of two CTAs
    # f32 output: the swapped tiles' transposed store does not fit, so their K halves stay XLA-summed ...
    f32 = mm.default_config(1, 4096, 14336, F8, jnp.float32)
    assert f32.split_k == 2 and f32.cluster is None
    # ... while the unswapped small-M and mid-M tiles keep the cluster (its f32 receive buffer fits)
    assert mm.default_config(64, 4096, 14336, F8, jnp.float32).cluster == "k"
    assert mm.default_config(128, 4096, 14336, F8, jnp.float32).cluster == "k"
    # Past one wave of clusters it lost: not at 256 rows, wide N or short K.
    for m, n, k in ((256, 4096, 14336), (128, 8192, 28672), (256, 8192, 8192), (64, 4096, 4096), (128, 4096, 4096)):
        assert mm.default_config(m, n, k, F8).cluster != "k", (m, n, k)
    # The autotuner gets the cluster twin of every split-K 2 candidate, and only K it can halve.
    cands = mm.candidate_configs(64, 4096, 14336, F8)
    assert any(c.cluster == "k" for c in cands) and any(c.split_k == 2 for c in cands)
    assert all(-(-14336 // c.tile_k) % mm.k_parts(c) == 0 for c in cands)
    assert not any(c.cluster == "k" for c in mm.candidate_configs(64, 4096, 8320, F8))  # 65 K tiles of 128


def test_k_cluster_validation_and_smem():
    ck = dataclasses.replace(mm._mid_m_tile(64), cluster="k")
    assert ck.short().endswith("ck")
    # the receive buffer: two warpgroups x 64 x 64 x 4 bytes
    assert mm.smem_bytes(ck, F8, jnp.bfloat16) - mm.smem_bytes(mm._mid_m_tile(64), F8, jnp.bfloat16) == 2 * 64 * 64 * 4
    with pytest.raises(ValueError, match="cluster and config.split_k"):
        mm._validate_config(dataclasses.replace(ck, split_k=2), F8, jnp.bfloat16)
    args = [jnp.zeros((64, 1152), F8), jnp.zeros((128, 1152), F8), jnp.ones((1, 1)), jnp.ones((1, 1))]
    with pytest.raises(ValueError, match="needs an even number of them"):  # 9 K tiles of 128
        mm.scaled_mm(*args, config=ck)
    # A K-split swap config needs the transposed 16-bit store (as without any split).
    swap_ck = dataclasses.replace(SWAP16, cluster="k")
    mm._validate_config(swap_ck, F8, jnp.bfloat16)
    assert not mm.swap_ab_fits(swap_ck, 4096, jnp.float32)


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_k_cluster_config_runs_unclustered_in_interpret_mode(dtype, monkeypatch):
    # Interpret mode runs a tuned / heuristic K-split cluster config as plain CTAs over the whole K (jax 0.11.2's
    # interpreter has no distributed shared memory stores): same tiles, same result.  The cluster path itself:
    # cross-lowering below, GPU checks in gpu_check.py (*_cluster_k).
    ck = dataclasses.replace(mm._mid_m_tile(64), cluster="k", max_concurrent_steps=3)
    monkeypatch.setattr(autotune, "get_config", lambda *a, **kw: ck)
    m, n, k = 7, 80, 512
    rng = np.random.default_rng(3)
    jdt = F8 if dtype == "fp8" else jnp.int8
    a = rng.integers(-4, 5, (m, k)).astype(np.float32)
    b = rng.integers(-4, 5, (n, k)).astype(np.float32)
    a_s = rng.uniform(0.5, 2, (m, 1)).astype(np.float32)
    b_s = rng.uniform(0.5, 2, (1, n)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    out = mm.scaled_mm(jnp.asarray(a, jdt), jnp.asarray(b, jdt), jnp.asarray(a_s), jnp.asarray(b_s),
                       bias=jnp.asarray(bias), out_dtype=jnp.float32, interpret=True)  # fmt: skip
    ref = (a.astype(np.float64) @ b.T.astype(np.float64)) * a_s * b_s + bias
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-3)


def test_k_cluster_configs_cross_lower_for_cuda(monkeypatch):
    # The heuristic's K-split cluster configs (swapped decode, small M, mid M), int8 with zero points, f32 out.
    monkeypatch.setattr(mm, "num_sms", lambda: mm.H100_NUM_SMS)
    for m, n, k in ((1, 4096, 4096), (16, 4096, 14336), (64, 4096, 14336), (100, 4096, 14336)):
        cfg = mm.default_config(m, n, k, F8)
        assert cfg.cluster == "k"
        assert "mosaic_gpu" in _lower(m, n, k, F8, jnp.bfloat16, cfg).as_text()
    cfg = mm.default_config(100, 4096, 14336, jnp.int8, jnp.float32)
    _lower(100, 4096, 14336, jnp.int8, jnp.float32, cfg, azp="token")
