"""One-call GPU check + timing of the Mosaic GPU scaled-matmul kernels.

Run on the device machine from the repo root:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py [--phases check,time,sweep]

1. check: every kernel variant (small-M, mid-M, large-M tiles; 1 and 2
   consumer warpgroups split along M or N) against a float64 reference of the
   same 8-bit operands, with fresh random inputs each time, M in
   {1, 7, 64, 100, 129, 1000}, N / K odd multiples of 16, every scale mode,
   bias, fp8 / int8 / asymmetric int8 (per-token and per-tensor zero points)
   and every out dtype.  The output buffer is poisoned first (a NaN-filled
   buffer of the same size is freed right before the call, so the allocator
   hands its memory to the kernel's output): a tile that is never written
   shows up as NaN.
2. time: qlin (heuristic config) vs XLA-native fp8 / int8 / bf16 and torch
   at a few shapes, CUPTI medians.
3. sweep: tile configs at a few shapes (what the autotuner would do).

Prints a short table last; writes JSON under $OUT (or benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qlin import bench  # noqa: E402
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402
from qlin.tolerances import fp8_wgmma_kernel_rtol, kernel_rtol  # noqa: E402

T0 = time.time()


def elapsed():
    return time.time() - T0


def poisoned_call(fn, args, out_shape, out_dtype):
    """Runs fn after freeing a NaN-filled buffer of the output's size."""
    poison = jnp.full(out_shape, jnp.nan, out_dtype)
    poison.block_until_ready()
    poison.delete()
    out = fn(*args)
    return np.asarray(jax.block_until_ready(out).astype(jnp.float32))


def make_case(m, n, k, dtype, a_mode, b_mode, bias, azp_mode, seed):
    rng = np.random.default_rng(seed)
    a, b, a_s, b_s = bench.make_operands(m, n, k, dtype, seed)
    if a_mode == "tensor":
        a_s = a_s[:1, :1].copy()
    if b_mode == "tensor":
        b_s = b_s[:1, :1].copy()
    bias_v = rng.standard_normal(n).astype(np.float32) if bias else None
    if isinstance(bias, str):  # a 16-bit bias: the reference sees the rounded values
        bias_v = np.asarray(jnp.asarray(bias_v, bias).astype(jnp.float32))
    azp = adj = None
    if azp_mode != "none":
        azp = rng.integers(-100, 100, (m, 1) if azp_mode == "token" else (1, 1)).astype(np.int32)
        adj = b.astype(np.int32).sum(axis=1)[None, :].astype(np.int32)
    return a, b, a_s, b_s, bias_v, azp, adj


CHECK_CONFIGS = {
    "smallM_n16": mm.TuningConfig(
        tile_m=64, tile_n=16, tile_k=256, max_concurrent_steps=8, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
    ),
    "smallM_n48": mm.TuningConfig(
        tile_m=64, tile_n=48, tile_k=128, max_concurrent_steps=6, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
    ),
    # The 80-wide decode tile (the heuristic's at M <= 16 where N / 80 tiles fill one wave best, e.g. 8448 < N
    # <= 10560); N = 272 and 1008 end in a partial tile.
    "smallM_n80": mm.TuningConfig(
        tile_m=64, tile_n=80, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=16
    ),
    "mid_m64x128_wgM": mm.TuningConfig(
        tile_m=64,
        tile_n=128,
        tile_k=128,
        max_concurrent_steps=5,
        num_compute_wgs=2,
        wg_dimension="m",
        grid_minor_dim="m",
    ),
    # Split-K (K = 2080 is 33 tiles of 64: 3 ranges of 11, the last one partial).
    "splitK3_smallM": mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=6, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=64,
        epi_slots=1, split_k=3,
    ),
    "splitK3_mid": mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=5, num_compute_wgs=2, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=64, epi_slots=1, split_k=3,
    ),
    # The large-M tile (two 128 x 128 warpgroups along N) with split-K, as the mid-M heuristic uses it.
    "splitK3_large": mm.TuningConfig(
        tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_tile_m=64, epi_tile_n=32, epi_slots=1, split_k=3,
    ),
    # Swapped operands (decode): the weight as the wgmma A side, tokens as an 8 / 16-wide B side, the
    # result stored transposed; with split-K 3 (partial K range): 8 token columns of float32 partials.
    # (h100_swap_ab_check.json ran this one with two warpgroups, before swap_ab was limited to one.)
    "swap_n16": mm.TuningConfig(
        tile_m=64, tile_n=16, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=16, epi_slots=1, swap_ab=True,
    ),
    "swap_n8_sk3": mm.TuningConfig(
        tile_m=64, tile_n=8, tile_k=64, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=8, epi_slots=1, split_k=3, swap_ab=True,
    ),
    # Clusters of two CTAs sharing (multicasting) the weight tile / the activation tile; partial tiles
    # leave the second CTA of the last cluster past the edge at some shapes.
    "large_cluster_m": mm.TuningConfig(
        tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=4, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_slots=1, cluster="m",
    ),
    "mid_cluster_n": mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=6, num_compute_wgs=2, wg_dimension="m",
        grid_minor_dim="m", cluster="n",
    ),
    # 64-row CTA tiles (two warpgroups along N) as clusters along M: the mid-M autotuner candidates
    # (mm._row64_cluster_tile); M = 129 leaves the second CTA of the last cluster past the edge.
    **{f"mid_r64x{2 * tn}_wgN_cluster_m": mm._row64_cluster_tile(tn) for tn in (64, 128)},
    # ... and what the heuristic runs for f32 output (the 8 stages of the 64 x 128 tile do not fit with it: 7).
    "mid_r64x128_wgN_cluster_m_f32out": mm._fit_smem(mm._row64_cluster_tile(64), jnp.float8_e4m3fn, jnp.float32),
    # K split between the two CTAs of a cluster, the second CTA's partial accumulators sent to the first through
    # distributed shared memory (cluster="k"): the mid tile 2 x 64 x 64 / 2 x 64 x 128, the 64 x 128 row tile,
    # the small-M tile and the swapped decode tiles (16 and 8 token columns, stored transposed).
    **{f"mid_m64x{tn}_wgM_cluster_k": mm._fit_smem(
        dataclasses.replace(mm._mid_m_tile(tn), cluster="k"), jnp.int8, jnp.float32) for tn in (64, 128)},
    "mid_r64x128_wgN_cluster_k": mm._fit_smem(
        dataclasses.replace(mm._row64_cluster_tile(64), cluster="k"), jnp.int8, jnp.float32),
    "smallM_n64_cluster_k": mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=8, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=64,
        epi_slots=1, cluster="k",
    ),
    **{f"swap_n{t}_cluster_k": mm.TuningConfig(
        tile_m=64, tile_n=t, tile_k=256, max_concurrent_steps=8, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=t, epi_slots=1, swap_ab=True, cluster="k") for t in (8, 16)},
    "small_cluster_m_inflight": mm.TuningConfig(
        tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=4, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=32,
        epi_slots=1, wgmma_inflight=True, cluster="m",
    ),
    # Two warpgroups, column vectors narrower than TMA's 128-byte shared-memory grid (a 16-bit bias
    # at tile_n=32, every f32 vector at tile_n=16): the rows are padded (an nn.Linear's bf16 bias at
    # M=256 faulted with CUDA_ERROR_MISALIGNED_ADDRESS before).
    "mid_m64x32_wgM": mm.TuningConfig(
        tile_m=64, tile_n=32, tile_k=128, max_concurrent_steps=6, num_compute_wgs=2, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=32,
    ),
    "mid_m64x16_wgN": mm.TuningConfig(
        tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=6, num_compute_wgs=2, wg_dimension="n",
        epi_tile_m=64, epi_tile_n=16,
    ),
    # Mid M, wide N (the heuristic's 2 x 64 x 192 where it needs no more waves than 128 x 256) and
    # the same CTA tile as 2 x 128 x 96 warpgroups along N (an autotuner candidate).
    "mid_m64x192_wgM": mm.TuningConfig(
        tile_m=64, tile_n=192, tile_k=128, max_concurrent_steps=4, num_compute_wgs=2, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=64,
    ),
    # Mid-M widths between the powers of two (wave fill at wide N: 10240 / 80 or 160, 6144 / 96, 28672 / 224 tiles).
    # (the library's mid tile at each width, with the stages that fit every dtype here)
    **{
        f"mid_m64x{tn}_wgM": dataclasses.replace(mm._mid_m_tile(tn), max_concurrent_steps=steps)
        for tn, steps in ((80, 6), (96, 6), (160, 5), (224, 4))
    },
    # Mid M with 256-deep K steps (mm._deep_k_steps: the heuristic's where they keep >= 4 stages, K >= 4096): the
    # 2 x 64 x 32 / 80 tiles (5 / 4 stages), 2 x 64 x 128 / 256 (3 / 2 stages: taken at M <= 128; 2 x 64 x 128 also
    # clustered along M) and the clustered 64 x 128 row tile (K = 224 / 1152 / 2080: a partial last step).
    **{f"mid_m64x{tn}_wgM_k256": mm._fit_smem(
        dataclasses.replace(mm._mid_m_tile(tn), tile_k=256, max_concurrent_steps=16), jnp.int8, jnp.bfloat16)
        for tn in (32, 80, 128, 256)},
    "mid_m64x128_wgM_cluster_m_k256": mm._fit_smem(dataclasses.replace(
        mm._mid_m_tile(128), tile_k=256, max_concurrent_steps=16, cluster="m"), jnp.int8, jnp.bfloat16),
    "mid_r64x128_wgN_cluster_m_k256": mm._fit_smem(
        dataclasses.replace(mm._row64_cluster_tile(64), tile_k=256, max_concurrent_steps=16), jnp.int8, jnp.bfloat16),
    # Decode / small M with K steps twice as deep (mm._deep_small_m_steps): 512-deep steps of the 64 x 32 tile, the
    # swapped 16- and 8-column tiles (K split by XLA or in a cluster), and 256-deep steps of the K-split 64 x 64 tile;
    # K = 224 / 1152 / 2080 are 1 / 3 / 5 steps of 512, the last one partial, fewer steps than stages.
    "smallM_n32_k512": mm.TuningConfig(
        tile_m=64, tile_n=32, tile_k=512, max_concurrent_steps=4, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=32
    ),
    "swap_n16_k512": mm.TuningConfig(
        tile_m=64, tile_n=16, tile_k=512, max_concurrent_steps=5, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=16, epi_slots=1, swap_ab=True,
    ),
    "swap_n8_sk2_k512": mm.TuningConfig(
        tile_m=64, tile_n=8, tile_k=512, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=8, epi_slots=1, split_k=2, swap_ab=True,
    ),
    "swap_n8_cluster_k_k512": mm.TuningConfig(
        tile_m=64, tile_n=8, tile_k=512, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=8, epi_slots=1, swap_ab=True, cluster="k",
    ),
    "smallM_n64_cluster_k_k256": mm.TuningConfig(
        tile_m=64, tile_n=64, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, epi_tile_m=64, epi_tile_n=64,
        epi_slots=1, cluster="k",
    ),
    "mid_m128x96_wgN": mm.TuningConfig(
        tile_m=128, tile_n=96, tile_k=128, max_concurrent_steps=5, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=32, epi_slots=1,
    ),
    "big_m128x128_wgN": mm.TuningConfig(
        tile_m=128,
        tile_n=128,
        tile_k=128,
        max_concurrent_steps=4,
        num_compute_wgs=2,
        wg_dimension="n",
        grid_minor_dim="m",
        grid_tile_width=8,
        epi_slots=1,
    ),
    # The large-M default from M = 2048: one wgmma group in flight (delay_release=1, wait(1)).
    "big_m128x128_wgN_inflight": mm.TuningConfig(
        tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=4, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_slots=1, wgmma_inflight=True,
    ),
    # 128 x 320 CTA tiles (two 128 x 160 warpgroups along N): where 128 x 256 tiles leave a nearly empty wave.
    "wide_m128x160_wgN": mm.TuningConfig(
        tile_m=128, tile_n=160, tile_k=128, max_concurrent_steps=3, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_tile_m=64, epi_tile_n=32, epi_slots=1,
    ),
    # 128 x 224 CTA tiles (two 128 x 112 warpgroups along N, 16-wide epilogue tiles): where their tile counts fill
    # the waves (mm._takes_n224_tile); with one wgmma group in flight as the heuristic would take it from M = 2048.
    "wide_m128x112_wgN": mm._n224_tile(),
    "wide_m128x112_wgN_inflight": mm._n224_tile(inflight=True),
    "big_m128x256_wgM": mm.TuningConfig(
        tile_m=128,
        tile_n=256,
        tile_k=64,
        max_concurrent_steps=4,
        num_compute_wgs=2,
        wg_dimension="m",
        epi_tile_m=64,
        epi_tile_n=64,
    ),
}


def check_cases(only_configs=None) -> tuple[list[tuple], int]:
    """The check phase's cases (config name or None for the heuristic, M, N, K, dtype, a_mode, b_mode, bias,
    azp_mode, out dtype) in priority order, and how many lead the list as tier 1 (run twice, fresh inputs)."""
    ms = [1, 7, 64, 100, 129, 1000]
    # N, K: multiples of 16 / 32 that are not multiples of the tiles (K=2080
    # gets the 32-byte swizzle, 1152 the 128-byte one).
    shapes = [(272, 224), (1040, 2080), (1008, 1152)]
    cases = []
    # Priority order (a deadline cuts the tail): 1. every config (and the
    # heuristic default at small / mid / large M) with the most general
    # epilogue; 2. the scale-mode x zero-point x out-dtype matrix on the
    # default configs; 3. every config x M x shape.
    names = list(CHECK_CONFIGS) + [None]
    if only_configs:
        unknown = set(only_configs) - set(CHECK_CONFIGS) - {"default"}
        if unknown:
            raise SystemExit(f"--only-configs: unknown {sorted(unknown)} (known: {sorted(CHECK_CONFIGS)}, default)")
        names = [c for c in names if (c or "default") in only_configs]
    for cname in names:
        for m in (7, 129) if cname else (1, 129, 1000):
            for dtype, azp in (("fp8", "none"), ("int8", "token")):
                cases.append((cname, m, 1040, 2080, dtype, "token", "channel", True, azp, "bfloat16"))
    # cluster="k" with f32 / f16 output, per-tensor scales, M = 1 and a cluster-grid smaller than the tiles.
    for cname in [c for c in names if c and c.endswith("_cluster_k")]:
        out = "float16" if CHECK_CONFIGS[cname].swap_ab else "float32"  # (swap_ab stores 16-bit tiles transposed)
        cases.append((cname, 100, 1008, 1152, "int8", "tensor", "channel", True, "token", out))
        cases.append((cname, 1, 1040, 2080, "fp8", "tensor", "tensor", False, "none", "float16"))
        cases.append((cname, 129, 16384, 1024, "fp8", "token", "channel", True, "none", "bfloat16"))
    # A bf16 / f16 bias (what an nn.Linear hands over), the layer shape that faulted first.
    for cname in [c for c in ("mid_m64x32_wgM", "mid_m64x16_wgN", None) if c in names]:
        for bias_dt in ("bfloat16", "float16"):
            cases.append((cname, 256, 1024, 1024, "fp8", "token", "channel", bias_dt, "none", "bfloat16"))
    # The clustered 64-row mid-M tiles with f16 output, and the heuristic's f32-output variant with f32.
    for cname in [c for c in names if c and c.startswith("mid_r64x")]:
        if cname.endswith("_f32out"):
            cases.append((cname, 100, 1040, 2080, "fp8", "token", "channel", True, "none", "float32"))
            cases.append((cname, 129, 1008, 1152, "int8", "tensor", "channel", True, "token", "float32"))
        else:
            cases.append((cname, 129, 1008, 1152, "int8", "tensor", "channel", True, "token", "float16"))
            cases.append((cname, 100, 1040, 2080, "fp8", "tensor", "tensor", False, "none", "float16"))
    # The heuristic's own decode tile at a model width it gives 80-wide tiles (9728 = 121.6 tiles: the last
    # one partial).
    if None in names:
        for m in (1, 16):
            for dtype, azp in (("fp8", "none"), ("int8", "token")):
                cases.append((None, m, 9728, 1024, dtype, "token", "channel", True, azp, "bfloat16"))
        # M > 512 where the heuristic takes 128 x 192 tiles (two 128 x 96 warpgroups along N): partial M, N and K
        # tiles (K = 1056: 8.25 tiles of 128, the 32-byte swizzle).
        for m, n in ((700, 4000), (1000, 6000), (1500, 4000)):
            for dtype, azp in (("fp8", "none"), ("int8", "token")):
                cases.append((None, m, n, 1056, dtype, "token", "channel", True, azp, "bfloat16"))
        # The heuristic's K-split clusters where it takes them (the swapped decode tiles, the small-M and the mid-M
        # tile at 4096 x 14336), bf16 and f32 output (other stage counts; swapped tiles fall back to split-K 2).
        for m, dtype, azp, od in ((1, "fp8", "none", "bfloat16"), (16, "int8", "token", "bfloat16"),
                                  (64, "fp8", "none", "float32"), (100, "int8", "token", "bfloat16"),
                                  (128, "fp8", "none", "float32"), (7, "fp8", "none", "float16")):  # fmt: skip
            cases.append((None, m, 4096, 14336, dtype, "token", "channel", True, azp, od))
        cases.append((None, 16, 4096, 4096, "fp8", "token", "channel", True, "none", "bfloat16"))  # swapped at K=4096
        # swapped at 9..16 tokens with 512-deep steps where the slabs fill >= 70 % of a wave (6144 / 28672 x 4096)
        cases.append((None, 13, 6144, 4096, "int8", "token", "channel", True, "token", "bfloat16"))
        cases.append((None, 16, 28672, 4096, "fp8", "token", "channel", True, "none", "bfloat16"))
        # The heuristic's 256-deep mid-M steps (K >= 4096; K = 4160: 16.25 steps of 256, the last partial).
        for m, n, dtype, azp in ((100, 4112, "fp8", "none"), (129, 4112, "int8", "token"), (250, 4112, "fp8", "none"),
                                 (128, 6160, "int8", "token")):  # fmt: skip
            cases.append((None, m, n, 4160, dtype, "token", "channel", True, azp, "bfloat16"))
    n_tier1 = len(cases)
    matrix = []
    for dtype, azp in (("fp8", "none"), ("int8", "none"), ("int8", "token"), ("int8", "tensor")):
        for a_mode in ("token", "tensor"):
            for b_mode in ("channel", "tensor"):
                for od in ("bfloat16", "float16", "float32"):
                    m = 7 if (a_mode == "token") == (od != "float32") else 129
                    matrix.append((None, m, 1040, 1152, dtype, a_mode, b_mode, od != "float16", azp, od))
    random.Random(0).shuffle(matrix)  # a deadline then cuts a spread sample
    cases += matrix if None in names else []
    for cname in [c for c in names if c]:
        for n, k in shapes:
            for m in ms:
                for dtype, azp in (("fp8", "none"), ("int8", "token")):
                    c = (cname, m, n, k, dtype, "token", "channel", True, azp, "bfloat16")
                    if c not in cases:
                        cases.append(c)
    # cluster="k" (and split-K in the first cases) cut the K tiles into ranges: a count they do not divide gets K
    # tiles more (2080 -> 2208: 18 tiles of 128, the last one partial in the second CTA's half).
    def k_for(cname, k):
        cfg = CHECK_CONFIGS[cname] if cname else None
        if cfg is None:
            return k
        while -(-k // cfg.tile_k) % mm.k_parts(cfg):
            k += cfg.tile_k
        return k

    cases = [(c[0], c[1], c[2], k_for(c[0], c[3]), *c[4:]) for c in cases]
    # swap_ab configs without split-K store (tokens x 64) tiles: N rounded up to a multiple of 64 for them.
    cases = [
        (c[0], c[1], c[2] if mm.swap_ab_fits(CHECK_CONFIGS[c[0]], c[2], c[9]) else -(-c[2] // 64) * 64, *c[3:])
        if c[0] else c for c in cases
    ]  # fmt: skip
    return cases, n_tier1


def run_checks(results, deadline, only_configs=None):
    dev = bench.device_name()
    cases, n_tier1 = check_cases(only_configs)
    seed = 0
    fails = 0
    for ci, (cname, m, n, k, dtype, a_mode, b_mode, bias, azp_mode, od) in enumerate(cases):
        if elapsed() > deadline:
            results.append(dict(kind="check", skipped=True))
            continue
        seed += 1
        cfg = CHECK_CONFIGS[cname] if cname else None
        jdt = jnp.int8 if dtype == "int8" else jnp.float8_e4m3fn
        odt = jnp.dtype(od)
        case = dict(kind="check", config=cname or "default", M=m, N=n, K=k, dtype=dtype, a_mode=a_mode,
                    b_mode=b_mode, bias=bias, azp=azp_mode, out=od)
        errs = []
        try:
            for rep in range(2 if ci < n_tier1 else 1):  # fresh inputs: stale outputs would not match
                a, b, a_s, b_s, bias_v, azp, adj = make_case(
                    m, n, k, dtype, a_mode, b_mode, bias, azp_mode, seed * 10 + rep
                )
                ref = bench.reference(a, b, a_s, b_s, bias_v, azp, adj)

                def fn(a_, b_, as_, bs_, bias_, azp_, adj_, cfg=cfg, odt=odt):
                    return mm.scaled_mm(a_, b_, as_, bs_, bias=bias_, azp=azp_, azp_adj=adj_, out_dtype=odt, config=cfg)

                args = (
                    jnp.asarray(a, jdt),
                    jnp.asarray(b, jdt),
                    jnp.asarray(a_s),
                    jnp.asarray(b_s),
                    None if bias_v is None else jnp.asarray(bias_v, bias if isinstance(bias, str) else None),
                    None if azp is None else jnp.asarray(azp),
                    None if adj is None else jnp.asarray(adj),
                )
                out = poisoned_call(jax.jit(fn), args, (m, n), odt)
                nan = int(np.isnan(out).sum())
                err = bench.rel_err(out, ref)
                errs.append((err, nan))
            tol = fp8_wgmma_kernel_rtol(od, k) if dtype == "fp8" else kernel_rtol(od)
            ok = all(e <= tol and nan == 0 for e, nan in errs)
            used = (cfg or mm.default_config(m, n, k, jdt, odt)).short()
            r = dict(
                case,
                cfg=used,
                rel_err=max(e for e, _ in errs),
                nan=max(n_ for _, n_ in errs),
                ok=ok,
                device=dev,
            )
        except Exception as e:  # noqa: BLE001
            ok = False
            r = dict(case, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=3)
        results.append(r)
        if not ok:
            fails += 1
            print("FAIL", json.dumps(r), flush=True)
    n_ok = sum(1 for r in results if r.get("kind") == "check" and r.get("ok"))
    print(f"checks: {n_ok} ok, {fails} failed, t={elapsed():.0f}s", flush=True)
    return fails


def run_wrapper(results):
    """The MMLinearKernel wrapper on the GPU: selection, padding of odd N / K, M not a multiple of 8, every
    scheme."""
    from qlin import select
    from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
    from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel, uses_xla_gemv
    from qlin.quantize import quantize_weight
    from qlin.testing import reference_linear_np

    fails = 0
    cfgs = [
        FP8ScaledMMConfig(),
        FP8ScaledMMConfig(weight_granularity="per_tensor", activation="static"),
        FP8ScaledMMConfig(activation="dynamic_per_tensor", out_dtype=jnp.float16),
        Int8ScaledMMConfig(),
        Int8ScaledMMConfig(symmetric=False),
        Int8ScaledMMConfig(symmetric=False, activation="static", out_dtype=jnp.float32),
    ]
    rng = np.random.default_rng(123)
    cases = []
    for i, cfg in enumerate(cfgs):
        # odd N / K (padded once), and M = 1, 5, 33: not multiples of the 8-row TMA tile, which the
        # quantize kernel allocates itself for the dynamic configs (rows past M never written)
        n, k = ((13653, 4096), (1000, 4000))[i % 2]
        cases += [(cfg, n, k, lead) for lead in ((1,), (5,) if i % 2 == 0 else (3, 11))]
    # int8 decode where apply_weights runs the kernel's swapped one-wave slabs, not XLA's GEMV
    # (mosaic_gpu.uses_xla_gemv): 96 / 128 slabs of 64 weight rows.
    int8_cfgs = [cfg for cfg in cfgs if isinstance(cfg, Int8ScaledMMConfig)]
    cases += [(cfg, n, k, (1,)) for cfg in int8_cfgs for n, k in ((6144, 4096), (8192, 8192))]
    for cfg, n, k, lead in cases:
        row = dict(kind="wrapper", cfg=cfg.describe(), lead=lead, N=n, K=k)
        try:
            chosen = select.choose_kernel(cfg).name
            w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
            x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32)
            bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
            kw = dict(input_scale=0.05, input_zero_point=2) if cfg.is_static else {}
            if isinstance(cfg, FP8ScaledMMConfig) and cfg.is_static:
                kw.pop("input_zero_point")
            params = quantize_weight(w, cfg, **kw)
            ker = MosaicGPUScaledMMKernel(cfg)
            pp = ker.process_weights_after_loading(params)
            y = np.asarray(jax.jit(ker.apply_weights)(pp, x, bias).astype(jnp.float32))
            ref = reference_linear_np(np.asarray(x), params, cfg, np.asarray(bias))
            err = bench.rel_err(y.reshape(ref.shape), ref)
            tol = kernel_rtol(cfg.out_dtype)
            if isinstance(cfg, FP8ScaledMMConfig):
                tol = fp8_wgmma_kernel_rtol(cfg.out_dtype, k)
            ok = err <= tol and chosen == "mosaic_gpu" and y.shape == ref.shape
            m = int(np.prod(lead))
            gemv = uses_xla_gemv(pp.weight.dtype, m, pp.weight.shape[1], pp.weight.shape[0], cfg.out_dtype)
            r = dict(
                row,
                padded=list(pp.weight.shape),
                chosen=chosen,
                route="xla_gemv" if gemv else "kernel",
                rel_err=err,
                ok=ok,
            )
        except Exception as e:  # noqa: BLE001
            r = dict(row, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=3)
        results.append(r)
        fails += not r["ok"]
        if not r["ok"]:
            print("WRAPPER FAIL", json.dumps(r, default=str), flush=True)
    print(
        f"wrapper: {sum(1 for r in results if r.get('kind') == 'wrapper' and r['ok'])} ok, "
        f"{fails} failed, t={elapsed():.0f}s",
        flush=True,
    )
    return fails


def run_time(results, deadline, cases, with_torch=True):
    for m, n, k in cases:
        if elapsed() > deadline:
            break
        rows = bench.bench_case(m, n, k, with_torch=with_torch, with_bf16=True)
        for r in rows:
            r["kind"] = "time"
        results.extend(rows)
        print(
            " ".join(
                f"{r['impl']}/{r['dtype']}:{r['us']:.1f}"
                if r.get("us")
                else f"{r['impl']}/{r['dtype']}:ERR({r.get('error', '')[:80]})"
                for r in rows
            ),
            f"M={m} N={n} K={k}",
            flush=True,
        )


def run_sweep(results, deadline, cases, dtypes=("fp8",)):
    for m, n, k in cases:
        for dtype in dtypes:
            jdt = jnp.int8 if dtype == "int8" else jnp.float8_e4m3fn
            a, bs, a_s, b_s = bench.device_operands(m, n, k, dtype, bench.n_copies(n, k), 1)
            sets = [(a, b, a_s, b_s) for b in bs]
            best = None
            for cfg in mm.candidate_configs(m, n, k, jdt, jnp.bfloat16):
                if elapsed() > deadline:
                    break
                try:
                    us = bench.measure_us(bench.qlin_fn(cfg), sets, 20)
                    err = bench.device_rel_err(bench.qlin_fn(cfg)(*sets[0]), *sets[0])
                except Exception as e:  # noqa: BLE001
                    results.append(
                        dict(
                            kind="sweep",
                            M=m,
                            N=n,
                            K=k,
                            dtype=dtype,
                            cfg=cfg.short(),
                            error=str(e).splitlines()[0][:200],
                        )
                    )
                    print(
                        f"sweep M={m} N={n} K={k} {dtype} {cfg.short()}: ERR {str(e).splitlines()[0][:150]}", flush=True
                    )
                    continue
                tf = 2 * m * n * k / (us * 1e-6) / 1e12
                results.append(
                    dict(
                        kind="sweep",
                        M=m,
                        N=n,
                        K=k,
                        dtype=dtype,
                        cfg=cfg.short(),
                        config=cfg.to_dict(),
                        us=us,
                        tflops=tf,
                        rel_err=err,
                    )
                )
                if best is None or us < best[0]:
                    best = (us, cfg.short())
            if best:
                print(
                    f"sweep best M={m} N={n} K={k} {dtype}: {best[1]} {best[0]:.1f} us "
                    f"({2 * m * n * k / (best[0] * 1e-6) / 1e12:.0f} TF/s)",
                    flush=True,
                )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="check,time,sweep")
    p.add_argument("--deadline-s", type=float, default=520)
    p.add_argument("--check-s", type=float, default=None, help="time budget of the check phase")
    p.add_argument(
        "--time-cases",
        default="16:4096:4096,128:4096:4096,512:4096:4096,"
        "4096:4096:4096,16:28672:4096,4096:28672:4096,4096:4096:14336,1:8192:8192",
    )
    p.add_argument(
        "--only-configs", default=None, help="check phase: only these CHECK_CONFIGS names (and 'default')"
    )
    p.add_argument("--sweep-cases", default="4096:4096:4096,16:4096:4096,128:4096:4096")
    p.add_argument("--sweep-dtypes", default="fp8")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    print(f"jax {jax.__version__} devices {jax.devices()} ({bench.device_name()})", flush=True)
    try:
        import torch

        print(f"torch {torch.__version__} cuda {torch.cuda.is_available()}", flush=True)
    except Exception as e:  # noqa: BLE001
        print("torch unavailable", e)
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    phases = args.phases.split(",")
    parse = lambda s: [tuple(int(v) for v in c.split(":")) for c in s.split(",") if c]
    copy_gbs = None
    try:
        if "check" in phases:
            run_checks(
                results,
                args.check_s or (args.deadline_s * 0.45 if len(phases) > 1 else args.deadline_s),
                args.only_configs.split(",") if args.only_configs else None,
            )
        if "wrapper" in phases:
            run_wrapper(results)
        if "time" in phases or "sweep" in phases:
            copy_gbs = bench.copy_bandwidth_gbs()
            print(f"copy bandwidth {copy_gbs:.0f} GB/s (read+write)", flush=True)
        if "time" in phases:
            run_time(
                results,
                args.deadline_s * (0.8 if "sweep" in phases else 1.0),
                parse(args.time_cases),
                with_torch=not args.no_torch,
            )
        if "sweep" in phases:
            run_sweep(results, args.deadline_s, parse(args.sweep_cases), tuple(args.sweep_dtypes.split(",")))
    finally:
        (out_dir / "gpu_check.json").write_text(
            json.dumps(
                dict(device=bench.device_name(), jax=jax.__version__, copy_gbs=copy_gbs, results=results),
                indent=1,
                default=str,
            )
        )
    trows = [r for r in results if r.get("kind") == "time"]
    if trows:
        bench.summarize(trows)
        print(bench.markdown_table(trows, copy_gbs=copy_gbs))
        if copy_gbs:
            for r in trows:
                if r["impl"].startswith("qlin") and r["M"] <= 16 and r.get("us"):
                    floor = r["N"] * r["K"] / (copy_gbs * 1e9) * 1e6
                    print(
                        f"  M={r['M']} N={r['N']} K={r['K']} {r['dtype']}: {r['us']:.1f} us = "
                        f"{r['us'] / floor:.2f}x weight-bytes floor ({floor:.1f} us)"
                    )
    nfail = sum(
        1 for r in results if r.get("kind") in ("check", "wrapper") and not r.get("ok") and not r.get("skipped")
    )
    print(f"total {elapsed():.0f}s, check failures: {nfail}")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
