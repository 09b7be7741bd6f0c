"""A/B timing of one Mosaic GPU GEMM design choice, both sides in the same run (H100 / H200).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_gemm.py --ab inflight [--check-s 140]
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_gemm.py --ab decode_pad

``--ab inflight``: the heuristic tile config with ``wgmma_inflight`` off and on (one wgmma group
  in flight across pipeline steps; where a config has fewer than 3 stages, ``tile_k`` is halved
  and the stages doubled), plus the on-variant with one more stage where shared memory allows.
  ``--check-s`` first runs ``gpu_check``'s correctness checks (float64 reference, NaN-poisoned
  outputs, partial tiles) with every check config switched to in-flight.
``--ab decode_pad``: ``scaled_mm`` at decode M with the activation padded to 8 rows (what it did
  before :func:`qlin.kernels.mosaic_gpu_scaled_mm.tma_rows`) and unpadded.
``--ab wide_n``: the 128 x 320 CTA tile (two 128 x 160 warpgroups) against what the heuristic picks
  without it (128 x 256, or 2 x 64 x 192 at mid M).
``--ab cluster``: the heuristic's config as clusters of two CTAs sharing (multicasting) the weight tile
  (``cluster="m"``) or the activation tile (``"n"``) against the plain config.
``--ab splitk_large``: at mid M, the large-M 128 x 256 tile with K cut into ``split_k`` ranges (f32
  partial sums, 64 x 32 epilogue tiles so the 4 stages fit) against the heuristic's config.
``--ab epilogue``: what the epilogue's TMA store costs per output tile (the heuristic's config with the
  store left out, or with the registers stored straight to global memory: ``mm._EPILOGUE_ABLATION``,
  full tiles only; the output is garbage without the store) and layouts that shorten it: two epilogue
  slots of 64 x 32 or 64 x 16 in the shared memory of one 64 x 64 slot.  (The same session's first run:
  the whole warpgroup tile stored at once needs 3 stages and ran 5-6 % slower; tile_k 64 with 7-8
  stages 11-13 % slower.)
``--ab swap_ab``: the swap-AB decode config (``TuningConfig(swap_ab=True)``: the weight as the wgmma A
  side, the tokens as B, the result stored transposed into the (M, N) output) against the heuristic's
  unswapped decode config, M = 16 and 1; also the swapped config with the heuristic's deeper K steps
  (``swap_ab_deep``) and the heuristic's own pick where it is neither.  (Before the kernel stored the transposed
  tile, a ``--ab swap_decode`` mode at commit 5629cf8 sized the same swap with the output left (N, 16):
  results/h100_ab_swap_decode.json.)
``--ab decode_tn``: decode tile widths 96 / 80 / 112 (weight rows a CTA) at N = 10240: 107, 128 and 92 tiles for
  132 SMs.  (results/h100_ab_decode_tn.json ran it when the heuristic took 96: its "default" side is "tn96".)
``--ab big_tile``: CTA tiles the heuristic does not take, against its default: 256 x 256 (two 128 x 256
  warpgroups along M: a third fewer bytes loaded per flop than 128 x 256, but 256 f32 accumulator registers a
  thread) at M >= 4096; below, 128 x 256, 128 x 320 and 128 x 192 (2 x 128 x 96 along N) tiles beside the
  heuristic's pick among them (1024 x 6144 x 4096: 192 tiles of 128 x 256 = 1.45 waves of 132 SMs; 256 of
  128 x 192 = 1.94).  (The first run, results/h100_ab_big_tile.json, also timed 2 x 64 x 192 along M there.)
``--ab mid_tn``: at mid M, the 2 x 64-row tile at the N widths (multiples of 16, 32-256) the mid-M traffic model
  ranks first and second (wave fill: e.g. 10240 / 80 x 1 row = 128 tiles for 132 SMs where 128-wide tiles give 80)
  against the heuristic's config.
``--ab row_clamp``: the last row of CTA tiles starting at M - cta_m (the kernel's default where M is not a multiple
  of the tile: no tile mostly past M) against running past M (``mm._CLAMP_LAST_TILE_ROW = False``), with the
  relative error of both sides.
``--ab row64``: at mid M, CTA tiles of 64 rows (one row of warpgroups: 64 x 128 as two 64 x 64 warpgroups along
  N or one 64 x 128, and 64 x 256 as two 64 x 128), unsplit, with K cut so that the work units come closest to
  one wave, and as clusters of two CTAs along M (the weight tile multicast to both row tiles), against the
  heuristic's 128-row tiles.  (cuBLASLt's choice at 128 x 4096 x 14336 is 64 x 128 tiles with a K split.)
``--ab kcluster``: K split between the two CTAs of a cluster, the partial accumulators summed through distributed
  shared memory (``cluster="k"``): the heuristic's config with its split-K (or none) turned into it, and the mid-M
  2 x 64 x 64 / 2 x 64 x 128 tiles and the 64 x 128 row tile with it, against the heuristic (XLA-summed split-K,
  or unsplit).
``--ab wg_m``: at M > 512, the heuristic's 128 x 256 CTA tile (two 128 x 128 warpgroups along N) as two 64 x 256
  warpgroups along M (one m64n256 wgmma per K step reads each operand once from shared memory), with wgmma_inflight
  as the heuristic has it and flipped, and as clusters of two CTAs along M.
``--ab depth``: the heuristic's config with a deeper pipeline (the most stages that fit shared memory, the depth
  halfway there, the most that fit with one epilogue slot) and with K steps twice as deep (256, or 512 where the
  config has 256) with the most stages that fit; at M <= 512 also the tile before the heuristic deepened its K steps
  (``shallow``; ``k128_tile`` in the first runs of results/h100_ab_depth.json).
``--ab w1_inflight``: at mid M, where the two-warpgroup tiles' 64-wide wgmmas read as many shared-memory bytes a
  cycle as the tensor cores consume, ONE consumer warpgroup with a 64 x 128 (or 64 x 256) tile, its wgmma group kept
  in flight across K steps (``wgmma_inflight``) so that the tensor cores do not idle at each step's wait, clustered
  along M (the weight tile multicast) where the 64-row tiles pair up; also without in-flight wgmma and 128-deep.
  (H100: level where the 64 x 128 tiles make one wave, slower elsewhere: results/h100_ab_w1_inflight_rejected.json.)
``--ab n224``: the large-M tile 224 wide (``mm._n224_tile``: two 128 x 112 warpgroups along N), whose tile counts fill
  the waves where 128 x 256 / 128 x 320 ones leave a part-empty last wave (N = 28672 = 128 x 224, 57344 = 256 x 224: at
  M = 256 two waves of 128 x 256 tiles for 224 tiles, 1.94 of 128 x 224), against what the heuristic takes without
  its 224 rule (``previous``).  (H100: 1-5 % faster at M = 256 / 512, results/h100_ab_n224.json, whose sides were
  named "default" (then the heuristic's 256 / 320 tile) and "n224e16"; a 64 x 56 epilogue side did not build: no
  swizzle fits a 112-byte row.  The heuristic takes the tile there now: mm._takes_n224_tile.)
(``--ab wg3`` at commit ff496bd: three consumer warpgroups, rejected: results/h100_ab_wg3_int8_rejected.json.)

Each case: XLA-native (same operands), then the two sides alternated twice; CUPTI medians of
``--iterations`` warm runs over rotated weight copies.  Writes $OUT/ab_gemm.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qlin import bench  # noqa: E402
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402

INFLIGHT_CASES = (
    "4096:4096:4096,8192:8192:8192,4096:28672:4096,4096:4096:14336,2048:8192:28672,8192:57344:8192,"
    "256:4096:4096,512:10240:8192,128:4096:14336,256:8192:28672,512:28672:4096,1024:4096:4096,"
    "16:4096:4096,16:28672:4096,1:8192:8192,64:57344:8192"
)
DECODE_CASES = "1:4096:4096,1:8192:8192,1:28672:4096,1:4096:14336,5:4096:4096,1:8192:28672,8:4096:4096"
CLUSTER_CASES = (
    "4096:4096:4096,8192:8192:8192,4096:28672:4096,4096:4096:14336,2048:8192:28672,1024:8192:8192,"
    "256:8192:28672,512:4096:14336,256:4096:14336,512:8192:8192,256:28672:4096,128:8192:8192,"
    "16:8192:8192,16:28672:4096,512:10240:8192"
)
SPLITK_LARGE_CASES = (
    "128:4096:14336,256:4096:14336,256:8192:28672,512:4096:14336,128:8192:28672,128:8192:8192,256:8192:8192,"
    "128:10240:8192,128:4096:4096,256:6144:4096,256:4096:4096,128:6144:4096,512:4096:4096"
)
EPILOGUE_CASES = (
    "4096:4096:4096,8192:4096:4096,4096:28672:4096,2048:6144:4096,4096:4096:14336,4096:8192:8192,"
    "1024:4096:4096,512:28672:4096,256:8192:8192"
)
DECODE_SHAPES = ("4096:4096", "6144:4096", "28672:4096", "4096:14336", "10240:8192", "8192:8192", "57344:8192",
                 "8192:28672")  # fmt: skip
SWAP_AB_CASES = ",".join(f"{m}:{nk}" for m in (16, 1) for nk in DECODE_SHAPES)
DECODE_TN_CASES = "16:10240:8192,1:10240:8192,8:10240:8192"
BIG_TILE_CASES = (
    "4096:4096:4096,8192:8192:8192,4096:28672:4096,4096:4096:14336,8192:57344:8192,"
    "1024:6144:4096,640:4096:4096,1536:4096:4096,768:8192:8192,3072:6144:4096,768:28672:4096"
)
MID_TN_CASES = (
    "128:10240:8192,256:10240:8192,256:6144:4096,128:6144:4096,128:28672:4096,256:28672:4096,128:57344:8192"
)
ROW_CLAMP_CASES = (
    "1032:8192:8192,1032:28672:4096,1100:4096:4096,2056:8192:8192,4104:4096:4096,136:8192:8192,300:28672:4096,"
    "640:8192:8192"
)
ROW64_CASES = (
    "128:4096:14336,256:4096:14336,128:8192:28672,256:8192:28672,128:57344:8192,256:57344:8192,"
    "128:28672:4096,512:4096:14336"
)
KCLUSTER_CASES = (
    "1:4096:4096,16:4096:4096,1:4096:14336,16:4096:14336,64:4096:14336,128:4096:14336,256:4096:14336,"
    "512:4096:14336,128:8192:28672,256:8192:28672,128:8192:8192,256:8192:8192,256:10240:8192,64:8192:28672"
)
WG_M_CASES = (
    "1024:4096:4096,4096:4096:4096,8192:4096:4096,4096:6144:4096,4096:28672:4096,2048:8192:8192,4096:8192:8192,"
    "1024:8192:28672,4096:4096:14336,2048:57344:8192,4096:10240:8192,8192:8192:8192"
)
W1_INFLIGHT_CASES = (
    "256:4096:14336,256:4096:4096,256:8192:8192,256:8192:28672,256:6144:4096,256:10240:8192,512:4096:4096,"
    "512:4096:14336,128:4096:4096,256:28672:4096"
)
N224_CASES = (
    "256:28672:4096,512:28672:4096,256:57344:8192,128:28672:4096,128:57344:8192,1024:28672:4096,2048:28672:4096"
)
WIDE_N_CASES = (
    "512:10240:8192,1024:10240:8192,512:28672:4096,256:57344:8192,1024:6144:4096,4096:4096:4096,256:10240:8192"
)


#: The kernel-module switches a side may set (``sides``' optional third element), restored after it.
_MODULE_DEFAULTS = {"_EPILOGUE_ABLATION": mm._EPILOGUE_ABLATION, "_CLAMP_LAST_TILE_ROW": mm._CLAMP_LAST_TILE_ROW}


def inflight(c: mm.TuningConfig, **kw) -> mm.TuningConfig:
    c = dataclasses.replace(c, wgmma_inflight=True, **kw)
    if c.max_concurrent_steps < 3 and c.tile_k >= 256:
        c = dataclasses.replace(c, tile_k=c.tile_k // 2, max_concurrent_steps=2 * c.max_concurrent_steps)
    return dataclasses.replace(c, max_concurrent_steps=max(3, c.max_concurrent_steps))


_TMA_ROWS = mm.tma_rows  # the library's row rule; the decode_pad A side swaps in _pad8


def _pad8(m: int) -> int:
    return -(-m // 8) * 8


def _default_without(rule: str, m: int, n: int, k: int, jdt):
    """The heuristic's config with one of its tile rules (the ``mm`` predicate named ``rule``) switched off."""
    takes = getattr(mm, rule)
    setattr(mm, rule, lambda *a, **kw: False)
    try:
        return mm.default_config(m, n, k, jdt, jnp.bfloat16)
    finally:
        setattr(mm, rule, takes)


def sides(ab: str, m: int, n: int, k: int, jdt):
    """{name: (tuning config, tma_rows function)} of one case."""
    if ab == "wide_n":
        previous = _default_without("_takes_wide_n_tile", m, n, k, jdt)
        return {"previous": (previous, _TMA_ROWS), "wide_n": (mm._wide_n_tile(), _TMA_ROWS)}
    base = mm.default_config(m, n, k, jdt, jnp.bfloat16)
    if ab == "epilogue":
        fit = lambda **kw: mm._fit_smem(dataclasses.replace(base, **kw), jdt, jnp.bfloat16)  # noqa: E731
        return {
            "default": (base, _TMA_ROWS),
            "abl_no_store": (base, _TMA_ROWS, {"_EPILOGUE_ABLATION": "no_store"}),
            "abl_direct": (base, _TMA_ROWS, {"_EPILOGUE_ABLATION": "direct"}),
            "e64x32x2": (fit(epi_tile_n=32, epi_slots=2), _TMA_ROWS),
            "e64x16x2": (fit(epi_tile_n=16, epi_slots=2), _TMA_ROWS),
        }
    if ab == "decode_tn":
        fit = lambda **kw: mm._fit_smem(dataclasses.replace(base, **kw), jdt, jnp.bfloat16)  # noqa: E731
        return {
            "tn96": (fit(tile_n=96, epi_tile_n=32, max_concurrent_steps=8), _TMA_ROWS),
            "tn80": (fit(tile_n=80, epi_tile_n=16, max_concurrent_steps=8), _TMA_ROWS),
            "tn112": (fit(tile_n=112, epi_tile_n=16, max_concurrent_steps=8), _TMA_ROWS),
        }
    if ab == "big_tile":
        fit = lambda c: mm._fit_smem(c, jdt, jnp.bfloat16)  # noqa: E731
        big = dict(tile_m=128, tile_n=256, num_compute_wgs=2, wg_dimension="m", grid_minor_dim="m",
                   grid_tile_width=8, epi_slots=1)  # fmt: skip
        out = {}
        if m >= 4096:
            out["default"] = (base, _TMA_ROWS)
            out["t256_k128s3"] = (fit(mm.TuningConfig(tile_k=128, max_concurrent_steps=3, **big)), _TMA_ROWS)
            out["t256_k64s6"] = (fit(mm.TuningConfig(tile_k=64, max_concurrent_steps=6, **big)), _TMA_ROWS)
        else:  # the heuristic picks one of these (the row's "heuristic_cfg")
            out["t256"] = (fit(mm._large_m_tile(inflight=m >= 2048)), _TMA_ROWS)
            out["t320"] = (fit(mm._wide_n_tile()), _TMA_ROWS)
            out["t192_wgN"] = (fit(mm._n192_tile()), _TMA_ROWS)
        return out
    if ab == "mid_tn":
        ranked = sorted((mm._mid_m_cost(m, n, k, 128, tn, mm.num_sms()), tn) for tn in range(32, 257, 16))
        out = {"default": (base, _TMA_ROWS)}
        for _, tn in ranked[:2]:
            out[f"tn{tn}"] = (mm._fit_smem(mm._mid_m_tile(tn), jdt, jnp.bfloat16), _TMA_ROWS)
        return out
    if ab == "swap_ab":  # the heuristic's decode tiles without the swap (it now takes the swap at most shapes)
        swapped = mm._swap_decode_config(m, n, k, jdt, jnp.bfloat16, mm.num_sms())
        out = {
            "default": (mm._small_m_config(m, n, k, jdt, jnp.bfloat16, mm.num_sms()), _TMA_ROWS),
            "swap_ab": (swapped, _TMA_ROWS),
            # with the heuristic's deeper K steps (mm._deep_small_m_steps), and the unswapped tile with them
            "swap_ab_deep": (mm._deep_small_m_steps(swapped, k, jdt, jnp.bfloat16), _TMA_ROWS),
            "heuristic": (base, _TMA_ROWS),
        }
        return {name: side for i, (name, side) in enumerate(out.items())
                if side[0] not in [s[0] for s in list(out.values())[:i]]}  # fmt: skip
    if ab == "cluster":
        out = {"default": (base, _TMA_ROWS)}
        if base.split_k == 1:
            for cl in ("m", "n") if -(-m // base.cta_tile_m) >= 2 else ("n",):  # one row of tiles: "n" only
                out[f"cluster_{cl}"] = (dataclasses.replace(base, cluster=cl), _TMA_ROWS)
        return out
    if ab == "splitk_large":
        out = {"default": (base, _TMA_ROWS)}
        for large in mm._large_split_k_tiles(m, n, k):  # the autotuner's candidates of that kind
            out[f"large_sk{large.split_k}"] = (mm._fit_smem(large, jdt, jnp.bfloat16), _TMA_ROWS)
        return out
    if ab == "row64":
        out = {"default": (base, _TMA_ROWS)}
        k_tiles, sms = -(-k // 128), mm.num_sms()
        for cta_n, tn, wgs in ((128, 64, 2), (128, 128, 1), (256, 128, 2)):
            tiles = -(-m // 64) * -(-n // cta_n)
            # the K split whose units come closest to one wave (>= 4 K tiles a range), and no split
            splits = [s for s in (2, 3, 4, 6, 8) if k_tiles % s == 0 and k_tiles // s >= 4 and tiles * s <= 1.1 * sms]
            for sk in [1] + splits[-1:]:
                c = mm.TuningConfig(
                    tile_m=64, tile_n=tn, tile_k=128, max_concurrent_steps=8, num_compute_wgs=wgs, wg_dimension="n",
                    grid_minor_dim="m", epi_tile_m=64, epi_tile_n=64, epi_slots=1 if sk > 1 else 2, split_k=sk,
                )  # fmt: skip
                name = f"r64n{cta_n}w{wgs}" + (f"sk{sk}" if sk > 1 else "")
                out[name] = (mm._fit_smem(c, jdt, jnp.bfloat16), _TMA_ROWS)
                if sk == 1 and -(-m // 64) % 2 == 0:
                    out[name + "cm"] = (mm._fit_smem(dataclasses.replace(c, cluster="m"), jdt, jnp.bfloat16), _TMA_ROWS)
        return out
    if ab == "n224":
        previous = _default_without("_takes_n224_tile", m, n, k, jdt)
        n224 = mm._fit_smem(mm._n224_tile(inflight=m >= 2048), jdt, jnp.bfloat16)
        return {"previous": (previous, _TMA_ROWS), "n224": (n224, _TMA_ROWS)}
    if ab == "w1_inflight":
        out = {"default": (base, _TMA_ROWS)}
        fit = lambda c: mm._fit_smem(c, jdt, jnp.bfloat16)  # noqa: E731
        pair = -(-m // 64) % 2 == 0
        for tn, tk, steps in ((128, 256, 4), (128, 128, 8), (256, 128, 4)):
            c = mm.TuningConfig(
                tile_m=64, tile_n=tn, tile_k=tk, max_concurrent_steps=steps, num_compute_wgs=1, wg_dimension="n",
                grid_minor_dim="m", epi_tile_m=64, epi_tile_n=64, epi_slots=2, cluster="m" if pair else None,
            )  # fmt: skip
            name = f"w1n{tn}k{tk}" + ("cm" if pair else "")
            if tk == 256 and tn == 128:
                out[name] = (fit(c), _TMA_ROWS)
            out[name + "_i"] = (fit(dataclasses.replace(c, wgmma_inflight=True)), _TMA_ROWS)
        return {name: side for name, side in out.items() if name == "default" or side[0] != base}
    if ab == "kcluster":
        out = {"default": (base, _TMA_ROWS)}
        fit = lambda c: mm._fit_smem(c, jdt, jnp.bfloat16)  # noqa: E731
        if base.cluster == "k":  # the same tiles with the two K ranges summed by XLA (split-K 2)
            out["split2"] = (fit(dataclasses.replace(base, cluster=None, split_k=2, epi_slots=1)), _TMA_ROWS)
        elif base.cluster is None and base.split_k <= 2:
            out["default_ck"] = (fit(dataclasses.replace(base, split_k=1, cluster="k")), _TMA_ROWS)
        if m <= 16 and not (base.swap_ab and base.cluster == "k"):  # swapped decode tiles, K in two
            sw = dataclasses.replace(mm._swap_decode_config(m, n, k, jdt, jnp.bfloat16, mm.num_sms()), split_k=1)
            out["swapck"] = (fit(dataclasses.replace(sw, cluster="k")), _TMA_ROWS)
        if m <= 64 and base.cta_tile_n != 64:  # the small-M 64 x 64 tile, K in two
            n64 = mm.TuningConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=8, num_compute_wgs=1,
                                  epi_tile_m=64, epi_tile_n=64, epi_slots=1, cluster="k")  # fmt: skip
            out["n64ck"] = (fit(n64), _TMA_ROWS)
        if m > 64:
            out["mid32"] = (fit(mm._mid_m_tile(32)), _TMA_ROWS)  # (the heuristic's before at 128 x 4096 x 14336)
            for tn in (64, 128):
                out[f"mid{tn}ck"] = (fit(dataclasses.replace(mm._mid_m_tile(tn), cluster="k")), _TMA_ROWS)
                # 64-deep stages: more of them beside the receive buffer (slower: h100_ab_kcluster_k64_rejected.json)
                k64 = dataclasses.replace(mm._mid_m_tile(tn), cluster="k", tile_k=64, max_concurrent_steps=8)
                out[f"mid{tn}ck_k64"] = (fit(k64), _TMA_ROWS)
            out["r64n128ck"] = (fit(dataclasses.replace(mm._row64_cluster_tile(64), cluster="k")), _TMA_ROWS)
        # (a K that these tiles cannot halve: scaled_mm's error is the row's entry)
        return {name: side for name, side in out.items() if name == "default" or side[0] != base}
    if ab == "wg_m":
        # The large-M 128 x 256 CTA tile as two 64 x 256 warpgroups along M (one m64n256 wgmma a K step: A 64
        # rows, B 256 columns read from shared memory once) instead of two 128 x 128 warpgroups along N (two
        # m64n128 wgmmas: B read twice): ~17 % less shared-memory operand traffic per flop.
        out = {"default": (base, _TMA_ROWS)}
        if base.num_compute_wgs == 2 and base.wg_dimension == "n" and base.tile_m == 128 and base.cta_tile_n <= 256:
            fit = lambda c: mm._fit_smem(c, jdt, jnp.bfloat16)  # noqa: E731
            wgm = dataclasses.replace(base, tile_m=64, tile_n=base.cta_tile_n, wg_dimension="m", epi_tile_m=64,
                                      epi_tile_n=math.gcd(base.cta_tile_n, 64))  # fmt: skip
            out["wgm"] = (fit(wgm), _TMA_ROWS)
            out["wgm_flip"] = (fit(dataclasses.replace(wgm, wgmma_inflight=not wgm.wgmma_inflight)), _TMA_ROWS)
            out["wgm_cm"] = (fit(dataclasses.replace(wgm, cluster="m")), _TMA_ROWS)
        return out
    if ab == "depth":
        out = {"default": (base, _TMA_ROWS)}
        fit = lambda c: mm._fit_smem(c, jdt, jnp.bfloat16)  # noqa: E731
        deep = fit(dataclasses.replace(base, max_concurrent_steps=16))
        half_steps = (base.max_concurrent_steps + deep.max_concurrent_steps) // 2
        half = fit(dataclasses.replace(base, max_concurrent_steps=half_steps))
        e1 = fit(dataclasses.replace(base, max_concurrent_steps=16, epi_slots=1))
        # K steps twice as deep (256, or 512 where the config has 256), as the heuristic deepens them
        deeper = mm._deeper_steps(base, k, jdt, jnp.bfloat16) if base.tile_k <= 256 else None
        if m <= 512:  # the tile before the heuristic deepened its K steps (mm._deep_small_m_steps / _deep_k_steps)
            tiles = mm._small_m_tiles if m <= 64 else mm._mid_m_tiles
            shallow = fit(tiles(m, n, k, jdt, jnp.bfloat16, mm.num_sms()))
            if shallow != base:
                out["shallow"] = (shallow, _TMA_ROWS)
        for c in (half, deep, e1, deeper):
            if c is not None and c != base:
                out[f"k{c.tile_k}s{c.max_concurrent_steps}e{c.epi_slots}"] = (c, _TMA_ROWS)
        return out
    if ab == "row_clamp":  # the last row of CTA tiles clamped to end at M (the kernel's default) or past M
        return {"clamped": (base, _TMA_ROWS), "unclamped": (base, _TMA_ROWS, {"_CLAMP_LAST_TILE_ROW": False})}
    if ab == "decode_pad":
        return {"pad8": (base, _pad8), "unpadded": (base, _TMA_ROWS)}
    off = dataclasses.replace(base, wgmma_inflight=False)
    on = mm._fit_smem(inflight(off), jdt, jnp.bfloat16)
    out = {"off": (off, _TMA_ROWS), "on": (on, _TMA_ROWS)}
    more = mm._fit_smem(inflight(off, max_concurrent_steps=off.max_concurrent_steps + 1), jdt, jnp.bfloat16)
    if more != on and more.max_concurrent_steps >= 3:
        out["on_plus1"] = (more, _TMA_ROWS)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ab",
        choices=("inflight", "decode_pad", "wide_n", "splitk_large", "cluster", "epilogue", "swap_ab", "decode_tn",
                 "big_tile", "mid_tn", "row_clamp", "row64", "kcluster", "wg_m", "depth", "w1_inflight", "n224"),
        required=True,
    )
    p.add_argument("--cases", default=None, help="M:N:K,... (default: a grid per --ab)")
    p.add_argument("--dtypes", default="fp8,int8")
    p.add_argument("--sides", default=None, help="only these sides (comma-separated names; default: all of --ab's)")
    p.add_argument("--check-s", type=float, default=0.0, help="--ab inflight: gpu_check budget first (0 = none)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--reps", type=int, default=2, help="alternated repeats of the sides (1 or 2)")
    p.add_argument("--budget-s", type=float, default=520.0)
    args = p.parse_args(argv)
    t0 = time.time()
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"ab": args.ab, "device": bench.device_name(), "check": [], "time": []}

    def dump():
        (out_dir / "ab_gemm.json").write_text(json.dumps(res, indent=1, default=str))

    if args.check_s > 0 and args.ab == "inflight":
        import gpu_check

        gpu_check.T0 = t0
        gpu_check.CHECK_CONFIGS = {f"{k}_inflight": inflight(v) for k, v in gpu_check.CHECK_CONFIGS.items()}
        default = mm.default_config
        mm.default_config = lambda *a, **kw: inflight(default(*a, **kw))  # the "default" rows too
        try:
            gpu_check.run_checks(res["check"], args.check_s)
        finally:
            mm.default_config = default
        dump()
    cases = args.cases or {
        "inflight": INFLIGHT_CASES, "decode_pad": DECODE_CASES, "wide_n": WIDE_N_CASES,
        "splitk_large": SPLITK_LARGE_CASES, "cluster": CLUSTER_CASES, "epilogue": EPILOGUE_CASES,
        "swap_ab": SWAP_AB_CASES, "decode_tn": DECODE_TN_CASES,
        "big_tile": BIG_TILE_CASES, "mid_tn": MID_TN_CASES, "row_clamp": ROW_CLAMP_CASES,
        "row64": ROW64_CASES, "kcluster": KCLUSTER_CASES, "wg_m": WG_M_CASES, "w1_inflight": W1_INFLIGHT_CASES,
        "n224": N224_CASES,
    }[args.ab]  # fmt: skip
    for cs in cases.split(","):
        m, n, k = (int(v) for v in cs.split(":"))
        for dt in args.dtypes.split(","):
            if time.time() - t0 > args.budget_s:
                print(f"budget: skipped {m}x{n}x{k} {dt}", flush=True)
                continue
            jdt = jnp.int8 if dt == "int8" else jnp.float8_e4m3fn
            a, bs, a_s, b_s = bench.device_operands(m, n, k, dt, bench.n_copies(n, k), 1)
            sets = [(a, b, a_s, b_s) for b in bs]
            row: dict = dict(M=m, N=n, K=k, dtype=dt, xla_us=bench.measure_us(bench.xla_fn(dt), sets, args.iterations))
            row["heuristic_cfg"] = mm.default_config(m, n, k, jdt, jnp.bfloat16).short()
            for rep in range(2):
                if rep and args.reps < 2:
                    break
                for name, (cfg, rows, *over) in sides(args.ab, m, n, k, jdt).items():
                    if args.sides and name not in args.sides.split(","):
                        continue
                    overrides = over[0] if over else {}  # kernel-module switches of this side
                    if rep and name == "on_plus1":
                        continue
                    row[f"{name}_cfg"] = cfg.short()
                    try:
                        mm._validate_config(cfg, jdt, jnp.bfloat16)
                        mm.tma_rows = rows
                        for attr, value in overrides.items():
                            setattr(mm, attr, value)
                        # A fresh jitted function: traced (once for all weight copies) under each timing
                        # program, which is when tma_rows and the module switches are read.
                        f = jax.jit(
                            lambda a, b, x, y, cfg=cfg: mm.scaled_mm(a, b, x, y, out_dtype=jnp.bfloat16, config=cfg)
                        )
                        us = bench.measure_us(f, sets, args.iterations)
                        row.setdefault(f"{name}_us", []).append(us)
                        checked = args.ab in ("epilogue", "decode_tn", "big_tile", "mid_tn", "row_clamp", "row64",
                                              "kcluster", "wg_m", "w1_inflight", "n224")
                        garbage = overrides.get("_EPILOGUE_ABLATION") == "no_store"  # the output is never written
                        if rep == 0 and checked and not garbage:
                            row[f"{name}_rel_err"] = bench.device_rel_err(f(*sets[0]), *sets[0])
                    except Exception as e:  # noqa: BLE001
                        row[f"{name}_error"] = str(e).splitlines()[0][:200]
                    finally:
                        mm.tma_rows = _TMA_ROWS
                        for attr in overrides:
                            setattr(mm, attr, _MODULE_DEFAULTS[attr])
            res["time"].append(row)
            dump()
            print(json.dumps(row), flush=True)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
