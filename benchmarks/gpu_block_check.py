"""GPU check + timing of the block-scaled FP8 Mosaic GPU kernel (issue 8, DeepSeek-V3 style scales).

Run on the H100 from the repo root (< 3 minutes):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_block_check.py [--phases check,accuracy,layer,time,sweep] [--xla-fp8]

The overlapped-promotion variants (``BlockTuningConfig(overlap=True)``: ping-pong wgmma
accumulators, not yet run on a GPU) alone, correctness first, then timed against the default
tiles and the per-channel kernel, plus ptxas' register / spill / wgmma-serialization report:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_block_check.py --phases overlap,ptxas,sweep

(``overlap`` checks only the overlap layouts, 5 cases each; ``check`` runs 2 of them per layout
after its other checks.
Every overlap case is guarded by a watchdog: a hang ends the process after ``--case-timeout-s``
with the JSON of the rows so far written.)

(``--cpu-dry-run`` runs the whole script on the CPU in interpret mode at tiny shapes.)

1. check: :func:`qlin.kernels.mosaic_gpu_block_scaled_mm.block_scaled_mm` (heuristic
   tiles, plus every warpgroup layout) against a float64 reference of the same fp8
   operands and block scales, fresh random inputs each case, M in {1, 100, 1000} x
   (N, K) in {(272, 384), (1040, 2080) (partial K block), (13664, 4096)}, plus M = 7 and
   100 at 1040 x 2048, bias and every out dtype on some cases, and M = 129 with each
   warpgroup layout / tile_k.  The output buffer is poisoned first (a
   NaN-filled buffer of its size is freed right before the call, so the allocator hands
   that memory to the output): a tile never written shows up as NaN.
   Tolerance: qlin.tolerances.fp8_wgmma_kernel_rtol(out_dtype, 128) (output rounding plus the
   tensor core's reduced-precision fp8 accumulation inside one 128-long K block).
   accuracy: f32 output, unit scales, K = 4096 / 14336: this kernel (promotes to f32 every
   128 K) and the per-channel kernel (no promotion) on the same operands vs float64.
2. layer: the ``mosaic_gpu_block`` MMLinearKernel end to end (fused per-group quantize,
   N = 13653 / K = 4000 padded once) against ``qlin.testing.reference_linear_np``, and
   ``choose_kernel`` on this GPU.
3. time: CUPTI medians (>= 20 warm runs; weight copies rotated, > 100 MB in all, so
   small M streams HBM, not L2) on the Llama-3 grid (N, K) in {(4096, 4096),
   (28672, 4096), (4096, 14336), (8192, 8192)} x M in {16, 128, 1024, 4096} of
   * ``qlin:mosaic_gpu_block``  - this kernel (heuristic tiles), same operands;
   * ``qlin:mosaic_gpu``        - qlin's per-channel fp8 kernel (per-token x per-channel scales);
   * ``xla:dequant_bf16``       - the xla kernel's block path (qlin/kernels/xla.py
     ``_dequantized_dot``: dequantize both operands to bf16, one bf16 dot);
   * ``xla:fp8`` (with ``--xla-fp8``) - XLA's fp8 GEMM, per-token x per-channel scales (cuBLASLt).
   M = 4096 and 1024 go first (the >= 85 % of per-channel target).  Each row has ``rel_err``
   against an on-device float32 (HIGHEST) reference.
4. sweep: the first candidate tile configs at M=4096 4096x4096, M=4096 28672x4096 (the
   overlap variants lead the large-M candidates) and M=16 4096x14336 if time is left, each
   checked for correctness too, with the per-channel kernel timed on the same shape
   (``sweep_baseline`` rows; the summary prints each config's ratio to it, target >= 0.85).
5. ptxas (opt-in): compiles the default and each overlap layout at M=4096 4096x4096 with
   ``MOSAIC_GPU_DUMP_PTXAS=1`` (output captured from the file descriptors, full text in
   ``$OUT/ptxas_<layout>.txt``) and records ptxas' register count, spills and any
   "wgmma ... serialized" warning (the overlap only pays if ptxas keeps the wgmma asynchronous).

6. tail (opt-in): stream-K over the last wave (``BlockTuningConfig(tail_split=...)``, GPU only:
   global semaphores) checked like ``check`` at TAIL_CASES: a tail of 88 / 44 / 24 tiles and every
   tile in the tail, split 2 / 3 / 4 / 8, three-warpgroup, two-block and 64 x 256 warpgroup tiles,
   M = 7, partial M and N tiles, each out dtype, and the heuristic's own cut at two shapes.
   tail_ab (opt-in): per ``--sweep-shapes`` shape, three warpgroups whole / cut in two / cut in two
   with the partial-total exchange left out (``_TAIL_ABLATION``: wrong output, a bound), same run.
   ``--sweep-tail`` makes the sweep phase time the default and the two promoted large-M tiles with
   tail_split 1 / 2 / 3 / 4 instead of the candidate list (``--sweep-splits 1,2,4,8``: other values, also
   for ``--sweep-wide``).

7. wide (opt-in): the 192-wide promoted warpgroup tiles (``WIDE_LAYOUTS``: one wgmma across a
   weight-scale block boundary, three 64-column pieces promoted) checked at the overlap layouts'
   cases (partial tiles, many tiles per SM, f32 / f16 out, M = 5).  ``--sweep-wide`` makes the sweep
   phase time the default, the two-block tile and the 192-wide tiles (whole and with the last wave cut in two).

8. autotune (opt-in): ``QLIN_AUTOTUNE=1`` into a fresh cache ($OUT/block_tuning.json) at
   ``--autotune-shapes`` (default: four DeepSeek-V3-like projections): the kernel called without a
   config tunes the shape's M bucket once (``tune_s``; at the first shape the per-channel kernel too), then the tuned and the heuristic config are
   timed side by side with the per-channel kernel and checked against the float32 reference.

A full tile sweep alone (also < 3 min): ``--phases sweep --sweep-limit 16``.

Writes ``$OUT/gpu_block_check.json`` (default benchmarks/results) and prints markdown
tables with the ratio to the per-channel kernel and to the XLA dequant path (the time phase's
table also to ``gpu_block_check.md``).  Each case catches its own exceptions (recorded in the
JSON); a time budget keeps the run < 3 min.  The whole Llama-3 grid, in calls of ~30 cases:

    python3 benchmarks/gpu_block_check.py --phases time --shapes grid --m 1024,2048,4096,8192 --budget-s 540
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from qlin import bench
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm
from qlin.tolerances import fp8_wgmma_kernel_rtol

T0 = time.time()
BUDGET_S = 170.0
F8 = jnp.float8_e4m3fn
LLAMA = [(4096, 4096), (28672, 4096), (4096, 14336), (8192, 8192)]
M_GRID = [4096, 1024, 16, 128]  # the M >= 1024 target first, in case the time budget runs out
CHECK_M = [1, 100, 1000]
CHECK_SHAPES = [(272, 384), (1040, 2080), (13664, 4096)]
XLA_FP8 = False  # --xla-fp8: also time XLA's fp8 GEMM (per-token x per-channel scales)
SWEEP = [(4096, 4096, 4096, 10), (4096, 28672, 4096, 6), (16, 4096, 14336, 6)]  # (M, N, K, candidates)
#: autotune phase: DeepSeek-V3-like projections off the Llama-3 grid (M, N, K)
AUTOTUNE_SHAPES = [(1000, 7168, 2048), (2048, 2048, 7168), (512, 24576, 1536), (1024, 7168, 16384)]
SWEEP_RESCALE = False  # --sweep-rescale: sweep only the default and the rescaled-accumulation candidates
PTXAS_SHORT = False  # --ptxas-short: the ptxas phase leaves out the overlap layouts
SWEEP_WIDE = False  # --sweep-wide: sweep the default and the 192-wide promoted tiles (tail_split 1 / 2)
SWEEP_TAIL = False  # --sweep-tail: sweep the default and the promoted large-M tiles with tail_split 1 / 2 / 3 / 4
SWEEP_SPLITS = None  # --sweep-splits: the tail_split values of --sweep-tail / --sweep-wide instead of theirs
CASE_TIMEOUT_S = 120.0  # watchdog per overlap case (compile + run): a hung kernel ends the process


def DUMP():  # main() replaces it: writes the JSON of the rows so far
    return None


def elapsed() -> float:
    return time.time() - T0


def cdiv(a, b):
    return -(-a // b)


def poisoned_call(fn, args, out_shape, out_dtype):
    poison = jnp.full(out_shape, jnp.nan, out_dtype)
    poison.block_until_ready()
    poison.delete()
    out = fn(*args)
    return np.asarray(jax.block_until_ready(out).astype(jnp.float32))


def host_operands(rng, m, n, k, bias=False):
    a = np.asarray(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32) * 2, F8))
    b = np.asarray(jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 2, F8))
    a_s = np.exp2(rng.uniform(-5, 2, (m, cdiv(k, 128)))).astype(np.float32) / np.sqrt(k)
    b_s = np.exp2(rng.uniform(-5, 2, (cdiv(n, 128), cdiv(k, 128)))).astype(np.float32)
    bias_v = (rng.standard_normal(n) * 4).astype(np.float32) if bias else None
    return a, b, a_s, b_s, bias_v


def reference64(a, b, a_s, b_s, bias=None):
    _m, k = a.shape
    n = b.shape[0]
    xa = a.astype(np.float64) * np.repeat(a_s.astype(np.float64), 128, axis=1)[:, :k]
    wb = b.astype(np.float64) * np.repeat(np.repeat(b_s.astype(np.float64), 128, axis=0), 128, axis=1)[:n, :k]
    y = xa @ wb.T
    return y if bias is None else y + bias.astype(np.float64)


INTERPRET = False  # --cpu-dry-run: Mosaic GPU interpret mode, tiny shapes, wall-clock "timings"


def tol(od):
    """Output rounding plus Hopper's reduced-precision fp8 wgmma accumulation over one
    128-long K block (the kernel promotes to f32 registers every block)."""
    from qlin.tolerances import fp8_wgmma_kernel_rtol, kernel_rtol

    return kernel_rtol(od) if INTERPRET else fp8_wgmma_kernel_rtol(od, bmm.BLOCK)


# -- 1. check ------------------------------------------------------------------------------------

LAYOUTS = {
    "w1n_tn32": bmm.BlockTuningConfig(
        tile_n=32, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="n", grid_tile_width=1, epi_tile_n=32
    ),
    "w2m_tn128": bmm.BlockTuningConfig(),
    "w2m_tn256": bmm.BlockTuningConfig(tile_n=256, max_concurrent_steps=4, epi_slots=1),
    "w1n_tn256": bmm.BlockTuningConfig(
        tile_n=256, num_compute_wgs=1, wg_dimension="n", max_concurrent_steps=4, grid_tile_width=1
    ),
    "w2n_tn128": bmm.BlockTuningConfig(wg_dimension="n", max_concurrent_steps=4, epi_slots=1),
    "w2m_tn64": bmm.BlockTuningConfig(tile_n=64, max_concurrent_steps=6),
    "w1n_tn32_k256": bmm.BlockTuningConfig(
        tile_n=32, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="n", epi_tile_n=32
    ),
    "w1n_tn16_k256": bmm.BlockTuningConfig(
        tile_n=16, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="n", epi_tile_n=16
    ),
}
# Overlapped promotion (two ping-pong accumulators, wgmma_wait(1), stages released one step late):
# the large-M candidates of bmm.candidate_configs, plus one warpgroup.
OVERLAP_LAYOUTS = {
    "ov_w2m_tn128": bmm.BlockTuningConfig(max_concurrent_steps=5, overlap=True),
    "ov_w2m_tn128_k256": bmm.BlockTuningConfig(tile_k=256, max_concurrent_steps=3, epi_slots=1, overlap=True),
    "ov_w2n_tn128": bmm.BlockTuningConfig(wg_dimension="n", max_concurrent_steps=4, overlap=True),
    "ov_w1n_tn128": bmm.BlockTuningConfig(
        num_compute_wgs=1, wg_dimension="n", max_concurrent_steps=6, grid_tile_width=1, overlap=True
    ),
}
LAYOUTS.update(OVERLAP_LAYOUTS)
# Rescaled accumulation (one accumulator carried in the current K block's units, pl.run_state with
# an initialized accumulator on the GPU): 128 x 128 warpgroup tiles along N and M, the 2 x 64 x 128
# layout, a narrow decode tile with two K blocks per step.
RESCALE_LAYOUTS = {
    "rs_w2n_m128": bmm._rescale_wide_tile("n"),
    "rs_w2m_m128": bmm._rescale_wide_tile("m", steps=3),
    "rs_w2m_tn128": bmm.BlockTuningConfig(max_concurrent_steps=5, rescale=True),
    "rs_w1n_tn32_k256": bmm.BlockTuningConfig(
        tile_n=32, tile_k=256, max_concurrent_steps=6, num_compute_wgs=1, wg_dimension="n", epi_tile_n=32,
        rescale=True,
    ),  # fmt: skip
}
LAYOUTS.update(RESCALE_LAYOUTS)
# Three consumer warpgroups (64 x 128 each, promoted; 160 registers per thread): 192 x 128 and
# 64 x 384 CTA tiles.
THREE_WG_LAYOUTS = {
    "w3m_tn128": bmm._three_wg_tile("m"),
    "w3n_tn128": bmm._three_wg_tile("n", steps=3),
}
LAYOUTS.update(THREE_WG_LAYOUTS)
# 192-wide promoted warpgroup tiles (one wgmma across the weight-scale block boundary, three 64-column
# pieces promoted; 192 registers a thread): along M (128 x 192 CTA tiles) and along N (64 x 384).
WIDE_LAYOUTS = {
    "w2m_tn192": bmm._wide_tile(),
    "w2n_tn192": dataclasses.replace(bmm._wide_tile(steps=3), wg_dimension="n"),
}
LAYOUTS.update(WIDE_LAYOUTS)
# Two-CTA clusters (config.cluster: the shared operand tile TMA-multicast; GPU only, interpret mode runs them
# unclustered): the two-block tile along M (the heuristic's where the weight is >= 200 MB) and along N (an odd
# count of column tiles at N = 1040: the last cluster's second CTA computes the last column again).
CLUSTER_LAYOUTS = {
    "w2m_k256_cm": dataclasses.replace(bmm._two_block_step_tile(), cluster="m"),
    "w2m_k256_cn": dataclasses.replace(bmm._two_block_step_tile(), cluster="n"),
}
LAYOUTS.update(CLUSTER_LAYOUTS)
# Stream-K over the last wave (config.tail_split; GPU only: global semaphores): three warpgroups,
# two-block steps, a two-block-wide (64 x 256) warpgroup tile, each cut 2 / 3 / 4 / 8 ways.
TAIL_LAYOUTS = {
    "w3m_t2": dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=2),
    "w3m_t3": dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=3),
    "w3m_t4": dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=4),
    "w3m_t8": dataclasses.replace(bmm._three_wg_tile("m", width=4), tail_split=8),
    "w2m_k256_t2": dataclasses.replace(bmm._two_block_step_tile(), tail_split=2),
    "w2m_k256_t3": dataclasses.replace(bmm._two_block_step_tile(), tail_split=3),
    "w2m_tn256_t2": dataclasses.replace(bmm.BlockTuningConfig(tile_n=256, max_concurrent_steps=4, epi_slots=1),
                                        tail_split=2),
    "w2m_tn192_t2": dataclasses.replace(bmm._wide_tile(), tail_split=2),
}  # fmt: skip
# (M, N, K, out dtype, bias, layout): with 132 SMs, a tail of 88 tiles (176 units: some CTAs run a
# contributor and then an owner), all tiles in the tail (102 tiles, partial M and N tiles, 408 units),
# a tail of 24 / 44 tiles (one unit a CTA), M < a tile, a 256-wide warpgroup tile (two N blocks), K
# ranges of unequal length (a split that does not divide the K steps), and the heuristic's own cut.
TAIL_CASES = [
    (2048, 4096, 4096, "bfloat16", True, "w3m_t2"),
    (1000, 2080, 2048, "float32", True, "w3m_t4"),
    (4096, 4096, 1536, "bfloat16", False, "w3m_t3"),
    (200, 512, 8192, "float16", True, "w3m_t8"),
    (7, 4096, 4096, "bfloat16", True, "w3m_t4"),
    (1100, 4096, 4096, "float16", False, "w2m_k256_t2"),
    (1000, 4096, 2048, "bfloat16", True, "w2m_k256_t2"),
    (300, 1040, 2048, "bfloat16", True, "w2m_tn256_t2"),
    (2048, 8192, 8192, "bfloat16", True, "w3m_t2"),
    (2048, 4096, 4096, "bfloat16", True, "w3m_t3"),  # 32 K steps in three ranges: 11, 11, 10
    (1000, 4096, 4096, "float32", True, "w2m_k256_t3"),  # 16 in three: 6, 5, 5
    (4096, 4096, 4096, "bfloat16", True, None),  # the heuristic's (three warpgroups, tail_split=2)
    (2048, 8192, 8192, "float32", False, None),
    (1024, 4096, 4096, "bfloat16", True, "w2m_tn192_t2"),  # 176 tiles of 128 x 192: a 44-tile tail
    (2000, 6104, 4096, "float32", False, "w2m_tn192_t2"),  # partial M / N tiles, 116-tile tail
]
# accuracy phase: rescaled accumulation adds each K block inside the wgmma (no f32 promotion)
RESCALE_ACCURACY_CONFIG = bmm._fit_smem(bmm._rescale_wide_tile("n"), jnp.dtype(jnp.float32))


def overlap_cases(name, full=True):
    """Per overlap layout: partial tiles with an odd step count (17 x 128 K), many output tiles per
    SM (the persistent loop reuses the stages right after a tile's last, late-released step), and
    with ``full`` (the ``overlap`` phase; ``check`` runs the first two) an even step count with f32
    out, a single K block (no overlap there), f16 out at the target shape."""
    if INTERPRET:
        return [(129, 272, 416, "bfloat16", True, name), (7, 272, 128, "float32", False, name)][: 2 if full else 1]
    return [
        (129, 1040, 2080, "bfloat16", True, name),
        (1000, 13664, 4096, "bfloat16", False, name),
        (257, 1040, 2048, "float32", True, name),
        (100, 272, 128, "bfloat16", True, name),
        (4096, 4096, 4096, "float16", False, name),
    ][: 5 if full else 2]


class Watchdog:
    """Ends the process (after writing the JSON so far) if one case runs past ``seconds``: a hung
    kernel (a pipeline barrier never arriving) cannot be interrupted from Python."""

    def __init__(self, what, seconds=None):
        self.what, self.seconds = what, seconds or CASE_TIMEOUT_S

    def __enter__(self):
        import threading

        def fire():
            print(f"WATCHDOG: {self.what} still running after {self.seconds:.0f} s: exiting", flush=True)
            try:
                RESULTS.append({"kind": "hang", "case": self.what, "after_s": self.seconds})
                DUMP()
            finally:
                os._exit(3)

        self.timer = threading.Timer(self.seconds, fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


RESULTS: list[dict] = []


def phase_accuracy(results):
    """f32 output, unit scales: the block kernel (promotes every 128 K) vs the per-channel
    kernel (accumulates all of K in the fp8 wgmma) on the same fp8 operands vs float64."""
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    for m, n, k in ((256, 1024, 4096), (256, 1024, 14336)) if not INTERPRET else ((64, 128, 512),):
        rng = np.random.default_rng(k)
        a = np.asarray(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32) * 2, F8))
        b = np.asarray(jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 2, F8))
        ref = a.astype(np.float64) @ b.astype(np.float64).T
        ja, jb = jnp.asarray(a, F8), jnp.asarray(b, F8)
        for impl, fn, args in (
            (
                "qlin:mosaic_gpu_block",
                lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, out_dtype=jnp.float32, interpret=INTERPRET),
                (ja, jb, jnp.ones((m, cdiv(k, 128)), jnp.float32), jnp.ones((cdiv(n, 128), cdiv(k, 128)), jnp.float32)),
            ),
            (
                "qlin:mosaic_gpu_block:rescale",
                lambda a, b, x, y: bmm.block_scaled_mm(
                    a, b, x, y, out_dtype=jnp.float32, config=RESCALE_ACCURACY_CONFIG, interpret=INTERPRET
                ),
                (ja, jb, jnp.ones((m, cdiv(k, 128)), jnp.float32), jnp.ones((cdiv(n, 128), cdiv(k, 128)), jnp.float32)),
            ),
            (
                "qlin:mosaic_gpu",
                lambda a, b, x, y: mm.scaled_mm(a, b, x, y, out_dtype=jnp.float32, interpret=INTERPRET),
                (ja, jb, jnp.ones((m, 1), jnp.float32), jnp.ones((1, n), jnp.float32)),
            ),
        ):
            row = {"kind": "accuracy", "impl": impl, "M": m, "N": n, "K": k, "out_dtype": "float32"}
            try:
                out = np.asarray(jax.jit(fn)(*args)).astype(np.float64)
                row["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:1500]
            results.append(row)
            print(f"accuracy (f32 out, unit scales) {impl} M={m} N={n} K={k}: rel_err={row.get('rel_err')}", flush=True)


def rescale_cases(name):
    """Per rescale layout: the overlap layouts' partial-tile, many-tiles-per-SM and f32 cases, then a
    single K block in f16 and M <= 8 unpadded."""
    if INTERPRET:
        return overlap_cases(name)
    return overlap_cases(name)[:3] + [(100, 272, 128, "float16", True, name), (5, 4096, 4096, "bfloat16", True, name)]


def phase_check(results, overlap_only=False, rescale_only=False, layouts=None, tail_only=False):
    """``rescale_only``: the layout cases of ``layouts`` (default RESCALE_LAYOUTS) alone; ``tail_only``:
    TAIL_CASES (stream-K over the last wave) alone."""
    cases = []
    seed = int(time.time()) % 100000
    if tail_only:
        cases = list(TAIL_CASES)
    elif rescale_only:
        for name in RESCALE_LAYOUTS if layouts is None else layouts:
            cases += rescale_cases(name)
    elif not overlap_only:
        for m in CHECK_M:
            for n, k in CHECK_SHAPES:
                cases.append((m, n, k, "bfloat16", m == 100, None))
        cases += [
            (7, 1040, 2048, "bfloat16", True, None),
            (100, 1040, 2048, "float32", True, None),
            (7, 272, 384, "float16", True, None),
        ]
        for name in LAYOUTS:
            if name in OVERLAP_LAYOUTS:
                continue
            cases.append(
                (129, 272, 416, "bfloat16", True, name) if INTERPRET else (129, 1040, 2080, "bfloat16", True, name)
            )
    # The overlap variants last: a fault there (sticky on CUDA) cannot lose the checks above.
    for name in OVERLAP_LAYOUTS if not (rescale_only or tail_only) else ():
        cases += overlap_cases(name, full=overlap_only)
    for i, (m, n, k, od, bias, layout) in enumerate(cases):
        row = {
            "kind": "check",
            "impl": "qlin:mosaic_gpu_block",
            "M": m,
            "N": n,
            "K": k,
            "out_dtype": od,
            "bias": bias,
            "layout": layout,
        }
        if layout in OVERLAP_LAYOUTS:
            print(f"check M={m} N={n} K={k} {od} {layout}: starting", flush=True)
        try:
            rng = np.random.default_rng(seed + i)
            a, b, a_s, b_s, bv = host_operands(rng, m, n, k, bias)
            cfg = (TAIL_LAYOUTS.get(layout) or LAYOUTS[layout]) if layout else None
            if any(layout in group for group in (OVERLAP_LAYOUTS, RESCALE_LAYOUTS, TAIL_LAYOUTS, WIDE_LAYOUTS)):
                # (f32 out: fewer stages)
                cfg = bmm._fit_smem(cfg, jnp.dtype(od))
            fn = jax.jit(
                lambda a, b, x, y, bias, cfg=cfg, od=od: bmm.block_scaled_mm(
                    a, b, x, y, bias=bias, out_dtype=jnp.dtype(od), config=cfg, interpret=INTERPRET
                )
            )
            args = (jnp.asarray(a, F8), jnp.asarray(b, F8), jnp.asarray(a_s), jnp.asarray(b_s))
            args += (None if bv is None else jnp.asarray(bv),)
            with Watchdog(f"check M={m} N={n} K={k} {layout}"):
                out = poisoned_call(fn, args, (m, n), jnp.dtype(od))
            ref = reference64(a, b, a_s, b_s, bv)
            nan = int(np.isnan(out).sum())
            err = float(np.linalg.norm(np.nan_to_num(out) - ref) / np.linalg.norm(ref))
            # Rescaled accumulation sums all of K in the fp8 wgmma (no per-block promotion): the
            # per-channel kernel's tolerance at this K.
            rescaled = cfg is not None and cfg.rescale and not INTERPRET
            limit = fp8_wgmma_kernel_rtol(jnp.dtype(od), k) if rescaled else tol(od)
            row.update(
                config=(cfg or chosen_config(m, n, k, jnp.dtype(od), has_bias=bias)).short(),
                rel_err=err,
                nan=nan,
                ok=bool(err <= limit and nan == 0),
                tol=limit,
            )
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        results.append(row)
        DUMP()
        print(
            f"check M={m} N={n} K={k} {od} bias={bias} {layout or 'default'}: "
            f"{'OK' if row['ok'] else 'FAIL'} err={row.get('rel_err')} nan={row.get('nan')} {row.get('error', '')}",
            flush=True,
        )


# -- 2. layer ------------------------------------------------------------------------------------


def phase_layer(results):
    from qlin import select
    from qlin.config import FP8ScaledMMConfig
    from qlin.kernels.mosaic_gpu_block import MosaicGPUBlockFP8Kernel
    from qlin.quantize import quantize_weight
    from qlin.testing import reference_linear_np

    cfg = FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=128)
    try:
        chosen = select.choose_kernel(cfg).name
    except Exception as e:  # noqa: BLE001
        chosen = f"error: {e}"
    results.append({"kind": "select", "config": cfg.describe(), "chosen": chosen, "ok": chosen == "mosaic_gpu_block"})
    print(f"choose_kernel({cfg.describe()}) on this GPU: {chosen}", flush=True)
    fast = dataclasses.replace(cfg, fast_accum=True)
    layer_shapes = (
        ((3, 13653, 4000, cfg), (517, 1000, 4096, cfg), (64, 4096, 4096, cfg), (1000, 13653, 4000, fast),
         (2049, 1040, 2080, fast))
        if not INTERPRET
        else ((3, 200, 300, cfg), (600, 200, 300, fast))
    )  # fmt: skip
    for m, n, k, cfg in layer_shapes:
        row = {"kind": "layer", "impl": "mosaic_gpu_block", "M": m, "N": n, "K": k, "fast_accum": cfg.fast_accum}
        try:
            rng = np.random.default_rng(m + n + k)
            w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32) * 3, jnp.bfloat16)
            bias = jnp.asarray(rng.standard_normal(n, dtype=np.float32))
            params = quantize_weight(w, cfg)
            ker = MosaicGPUBlockFP8Kernel(cfg, interpret=INTERPRET)
            pp = ker.process_weights_after_loading(params)
            y = jax.jit(ker.apply_weights)(pp, x, bias)
            y = np.asarray(y.astype(jnp.float32))
            ref = reference_linear_np(np.asarray(x.astype(jnp.float32)), params, cfg, np.asarray(bias))
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(y)) else float("inf")
            limit = fp8_wgmma_kernel_rtol(jnp.bfloat16, k) if cfg.fast_accum and not INTERPRET else tol(jnp.bfloat16)
            row.update(rel_err=err, ok=bool(err <= limit), tol=limit, padded=list(pp.weight.shape))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        results.append(row)
        print(f"layer M={m} N={n} K={k} fast_accum={cfg.fast_accum}: {'OK' if row['ok'] else 'FAIL'} "
              f"{row.get('rel_err')} {row.get('error', '')}")


# -- 3. time -------------------------------------------------------------------------------------


def device_operands(m, n, k, copies, seed=0):
    key = jax.random.key(seed)
    ka, kb, ks, _kt = jax.random.split(key, 4)
    a = (jax.random.normal(ka, (m, k), jnp.float32) * 2).astype(F8)
    a_s = jnp.exp2(jax.random.uniform(ks, (m, cdiv(k, 128)), jnp.float32, -5, 2)) / np.sqrt(k)
    bs = []
    for i in range(copies):
        kbi, kti = jax.random.split(jax.random.fold_in(kb, i))
        b = (jax.random.normal(kbi, (n, k), jnp.float32) * 2).astype(F8)
        b_s = jnp.exp2(jax.random.uniform(kti, (cdiv(n, 128), cdiv(k, 128)), jnp.float32, -5, 2))
        bs.append((b, b_s))
    jax.block_until_ready((a, a_s, bs))
    return a, a_s, bs


def _expand_a(a_s, k):
    return jnp.repeat(a_s, 128, axis=1)[:, :k]


def _expand_b(b_s, n, k):
    return jnp.repeat(jnp.repeat(b_s, 128, axis=0), 128, axis=1)[:n, :k]


@jax.jit
def ref_block_f32(a, b, a_s, b_s):
    _m, k = a.shape
    n = b.shape[0]
    xa = a.astype(jnp.float32) * _expand_a(a_s, k)
    wb = b.astype(jnp.float32) * _expand_b(b_s, n, k)
    return jax.lax.dot_general(xa, wb, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST)


@jax.jit
def ref_channel_f32(a, b, a_s, b_s):
    acc = jax.lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
    return acc * a_s * b_s


def xla_dequant_fn():
    """The xla kernel's block path from quantized operands (qlin/kernels/xla.py _dequantized_dot)."""
    from qlin.config import FP8ScaledMMConfig
    from qlin.kernels.xla import XLAKernel
    from qlin.params import FP8Params

    cfg = FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=128)
    ker = XLAKernel(cfg)

    def f(a, b, a_s, b_s):
        return ker._dequantized_dot(FP8Params(weight=b, weight_scale=b_s), a, a_s, None, None)

    return jax.jit(f)


def per_channel_fn():
    if not INTERPRET:
        return bench.qlin_fn()
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    return jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y, interpret=True))


def measure_us(fn, sets, iterations=20):
    if not INTERPRET:
        return bench.measure_us(fn, sets, iterations=iterations)
    t = time.perf_counter()
    jax.block_until_ready([fn(*s) for s in sets])
    return (time.perf_counter() - t) * 1e6 / len(sets)


def phase_autotune(results, out_dir):
    """QLIN_AUTOTUNE=1 into a fresh cache ($OUT/block_tuning.json), each kernel called under jit without a
    config (so the tuner is reached while jit traces, as in a model): per AUTOTUNE_SHAPES shape the block
    kernel tunes its M bucket once, then its tuned and heuristic configs are timed in the same run beside
    the per-channel kernel (heuristic), each checked against the float32 reference; at the first shape the
    per-channel kernel is tuned the same way (``autotune_per_channel`` row)."""
    import contextlib

    from qlin.kernels import autotune
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    cache = out_dir / "block_tuning.json"

    @contextlib.contextmanager
    def tuning():
        os.environ.update(QLIN_AUTOTUNE="1", QLIN_TUNING_CACHE=str(cache))
        try:
            yield
        finally:
            os.environ.pop("QLIN_AUTOTUNE", None)
            os.environ.pop("QLIN_TUNING_CACHE", None)

    autotune._MEMO.clear()
    for i, (m, n, k) in enumerate(AUTOTUNE_SHAPES):
        if elapsed() > BUDGET_S:
            break
        row = {"kind": "autotune", "M": m, "N": n, "K": k}
        try:
            a, a_s, bs = device_operands(m, n, k, bench.n_copies(n, k))
            sets = [(a, b, a_s, b_s) for b, b_s in bs]
            ref = ref_block_f32(a, bs[0][0], a_s, bs[0][1])
            tuned_fn = jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, interpret=INTERPRET))
            t = time.perf_counter()
            with tuning(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = tuned_fn(*sets[0])  # the first call without a config tunes (GPU)
                tuned = chosen_config(m, n, k)
            row.update(tune_s=round(time.perf_counter() - t, 1), warnings=[str(w.message)[:300] for w in caught])
            default = bmm.default_config(m, n, k)
            default_fn = jax.jit(
                lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, config=default, interpret=INTERPRET)
            )
            row.update(config=tuned.short(), default=default.short(), rel_err=rel(out, ref))
            row["rel_err_default"] = rel(default_fn(*sets[0]), ref)
            row["us"] = measure_us(tuned_fn, sets)
            row["us_default"] = measure_us(default_fn, sets)
            chan = channel_sets(a, a_s, bs, n)
            row["us_per_channel"] = measure_us(per_channel_fn(), chan)
            entries = json.loads(cache.read_text()) if cache.exists() else {}
            row["cache_us"] = entries.get(autotune.block_cache_key(m, n, k, jnp.bfloat16), {}).get("us")
            row["ok"] = bool(
                row["rel_err"] <= tol(jnp.bfloat16)
                and row["rel_err_default"] <= tol(jnp.bfloat16)
                and not caught
                and row["cache_us"] is not None
                and row["cache_us"] == row["cache_us"]  # a tuned time, not NaN
            )
            if i == 0 and not INTERPRET:
                prow = {"kind": "autotune_per_channel", "M": m, "N": n, "K": k}
                pc_fn = jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y))
                autotune._MEMO.clear()  # (the per-channel timing above memoized its heuristic config)
                t = time.perf_counter()
                with tuning(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    pc_fn(*chan[0]).block_until_ready()
                    pc_cfg = autotune.get_config(m, n, k, F8, jnp.bfloat16)
                entries = json.loads(cache.read_text())
                pc_default = mm.default_config(m, n, k, F8, jnp.bfloat16)
                prow.update(
                    tune_s=round(time.perf_counter() - t, 1),
                    warnings=[str(w.message)[:300] for w in caught],
                    config=pc_cfg.short(),
                    default=pc_default.short(),
                    cache_us=entries.get(autotune.cache_key(m, n, k, F8, jnp.bfloat16), {}).get("us"),
                    us=measure_us(pc_fn, chan),
                    us_default=measure_us(
                        jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y, config=pc_default)), chan
                    ),
                )
                prow["ok"] = bool(not caught and prow["cache_us"] is not None and prow["cache_us"] == prow["cache_us"])
                results.append(prow)
                print(f"autotune {prow}", flush=True)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500])
        results.append(row)
        DUMP()
        print(f"autotune {row}", flush=True)


def chosen_config(m, n, k, out_dtype=jnp.bfloat16, fast_accum=False, has_bias=False):
    """The config ``block_scaled_mm`` runs without one: the heuristic in interpret mode, else the tuning
    cache's entry if any (on a fresh device machine: none, so the heuristic too)."""
    if INTERPRET:
        return bmm.default_config(m, n, k, out_dtype, fast_accum)
    from qlin.kernels import autotune

    return autotune.get_block_config(m, n, k, out_dtype, fast_accum=fast_accum, has_bias=has_bias)


def rel(out, ref):
    out = out.astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(out))):
        return float("inf")
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def channel_sets(a, a_s, bs, n):
    """Per-channel argument sets (a, b, per-token scale, per-channel scale) on the same fp8 data as the
    block sets: the per-token / per-channel scale is the max of its block scales."""
    a_tok = jnp.max(a_s, axis=1, keepdims=True)
    return [(a, b, a_tok, jnp.max(b_s, axis=1).repeat(128)[:n].reshape(1, n)) for b, b_s in bs]


def time_case(results, m, n, k, iterations=20):
    copies = bench.n_copies(n, k)
    a, a_s, bs = device_operands(m, n, k, copies)
    flops = 2.0 * m * n * k
    # per-channel operands for qlin's per-channel kernel and XLA fp8: same fp8 data.
    chan = channel_sets(a, a_s, bs, n)
    impls = {
        "qlin:mosaic_gpu_block": (
            jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, interpret=INTERPRET)),
            "block",
        ),
        "qlin:mosaic_gpu_block:fast_accum": (
            jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, fast_accum=True, interpret=INTERPRET)),
            "block",
        ),
        "qlin:mosaic_gpu": (per_channel_fn(), "channel"),
        "xla:dequant_bf16": (xla_dequant_fn(), "block"),
    }
    if XLA_FP8:
        impls["xla:fp8"] = (bench.xla_fn("fp8"), "channel")
    refs = {
        "block": ref_block_f32(a, bs[0][0], a_s, bs[0][1]),
        "channel": ref_channel_f32(*chan[0]),
    }
    out_rows = {}
    for impl, (fn, kind) in impls.items():
        row = {"kind": "time", "impl": impl, "dtype": "fp8", "M": m, "N": n, "K": k, "copies": copies, "scales": kind}
        try:
            sets = [(a, b, a_s, b_s) for b, b_s in bs] if kind == "block" else chan
            err = rel(fn(*sets[0]), refs[kind])
            us = measure_us(fn, sets, iterations=iterations)
            row.update(us=us, tflops=flops / (us * 1e-6) / 1e12, rel_err=err)
            if impl.startswith("qlin:mosaic_gpu_block"):
                row["config"] = chosen_config(m, n, k, fast_accum=impl.endswith("fast_accum")).short()
        except Exception as e:  # noqa: BLE001
            row.update(us=None, tflops=None, rel_err=None, error=f"{type(e).__name__}: {e}"[:1500])
        results.append(row)
        out_rows[impl] = row
    del a, a_s, bs, chan, refs
    return out_rows


def phase_time(results, summary):
    for m in M_GRID:
        for n, k in LLAMA:
            if elapsed() > BUDGET_S - 10:
                results.append({"kind": "skipped", "phase": "time", "M": m, "N": n, "K": k, "why": "time budget"})
                print(f"time M={m} N={n} K={k}: skipped (budget)", flush=True)
                continue
            rows = time_case(results, m, n, k)
            summary.append(rows)
            print(_summary_line(rows), flush=True)


def _fmt(v, p=1):
    return "-" if v is None else f"{v:.{p}f}"


def _summary_line(rows):
    blk, fast = rows["qlin:mosaic_gpu_block"], rows.get("qlin:mosaic_gpu_block:fast_accum", {})
    chan, deq, x8 = rows["qlin:mosaic_gpu"], rows["xla:dequant_bf16"], rows.get("xla:fp8", {})

    def ratio(o, b=blk):
        return None if not (b.get("us") and o.get("us")) else o["us"] / b["us"]

    return (
        f"| {blk['M']} | {blk['N']}x{blk['K']} | {_fmt(blk.get('us'))} | {_fmt(blk.get('tflops'), 0)} | "
        f"{_fmt(fast.get('us'))} | {_fmt(chan.get('us'))} | {_fmt(deq.get('us'))} | {_fmt(x8.get('us'))} | "
        f"{_fmt(ratio(chan), 2)} | {_fmt(ratio(chan, fast), 2)} | {_fmt(ratio(deq), 2)} | "
        f"{blk.get('rel_err') or blk.get('error', '')} | {fast.get('rel_err') or fast.get('error', '')} |"
    )


HEADER = (
    "| M | NxK | block us | block TF/s | fast_accum us | per-channel us | xla dequant us | xla fp8 us | "
    "block/per-channel (speed) | fast_accum/per-channel | block/xla-dequant (speed) | block rel_err | "
    "fast_accum rel_err |\n|" + "---|" * 13
)


# -- 4. sweep ------------------------------------------------------------------------------------


# -- helpers of the A/B scripts (ab_block_release.py, ab_block_cluster.py) -------------------------------


def ab_run(out):
    """An A/B script's run: (output folder, created; start time; its rows; the result dict written as JSON)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "command": " ".join(sys.argv),
           "rows": rows}  # fmt: skip
    return out_dir, time.time(), rows, res


def block_fn(cfg, out_dtype=jnp.bfloat16):
    """The block kernel with ``cfg``, jitted (bias optional)."""
    return jax.jit(
        lambda a, b, x, y, bias=None: bmm.block_scaled_mm(a, b, x, y, bias=bias, out_dtype=out_dtype, config=cfg)
    )


def check_config(rows, rng, name, cfg, m, n, k, od, has_bias):
    """One GPU check of ``cfg`` (final: fitted to the out dtype by the caller) against the float64 reference:
    fresh random operands and block scales, NaN-poisoned output; appends a ``check`` row."""
    out_dtype = jnp.dtype(od)
    row = {"kind": "check", "layout": name, "config": cfg.short(), "M": m, "N": n, "K": k, "out": od}
    try:
        a, b, a_s, b_s, bias = host_operands(rng, m, n, k, bias=has_bias)
        ref = reference64(a, b, a_s, b_s, bias)
        f = block_fn(cfg, out_dtype)
        args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(a_s), jnp.asarray(b_s))
        kw = {"bias": jnp.asarray(bias)} if has_bias else {}
        out = poisoned_call(lambda *x: f(*x, **kw), args, (m, n), out_dtype)
        err = float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))
        ok = bool(np.isfinite(out).all() and err <= tol(out_dtype))
        row.update(rel_err=err, tol=tol(out_dtype), ok=ok)
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500])
    rows.append(row)
    print(json.dumps(row)[:600], flush=True)


def time_sides(rows, m, n, k, side_configs):
    """Same-run A/B at one shape: each side's config (name -> config, the first equal config kept) and qlin's
    per-channel kernel on the same fp8 data, alternated twice (CUPTI medians of 20 warm runs over rotated
    weight copies); appends a ``time`` row with each side's times, rel_err and per-channel time / best time."""
    copies = bench.n_copies(n, k)
    a, a_s, bs = device_operands(m, n, k, copies)
    sets = [(a, b, a_s, b_s) for b, b_s in bs]
    chan = channel_sets(a, a_s, bs, n)
    sides = {}
    for s, cfg in side_configs.items():
        if cfg not in sides.values():
            sides[s] = cfg
    fns = {s: block_fn(c) for s, c in sides.items()}
    ref = ref_block_f32(a, bs[0][0], a_s, bs[0][1])
    row = {"kind": "time", "M": m, "N": n, "K": k, "copies": copies, "config": bmm.default_config(m, n, k).short()}
    row.update({f"{s}_cfg": c.short() for s, c in sides.items()})
    pc = per_channel_fn()
    try:
        for s in sides:
            row[f"{s}_rel_err"] = rel(fns[s](*sets[0]), ref)
        for _rep in range(2):
            for s in sides:
                row.setdefault(f"{s}_us", []).append(measure_us(fns[s], sets))
            row.setdefault("per_channel_us", []).append(measure_us(pc, chan))
        best = {s: min(row[f"{s}_us"]) for s in (*sides, "per_channel")}
        row.update({f"ratio_{s}": best["per_channel"] / best[s] for s in sides})
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
    rows.append(row)
    print(json.dumps(row)[:400], flush=True)


def print_sides(rows):
    """One line per ``time`` row of :func:`time_sides`: each side's config, best time and ratio."""
    for r in rows:
        if r["kind"] == "time" and "per_channel_us" in r:
            sides = [k[:-4] for k in r if k.endswith("_cfg")]
            print(
                f"{r['M']}x{r['N']}x{r['K']} per-channel {min(r['per_channel_us']):.1f} us; "
                + "; ".join(f"{s} {r[s + '_cfg']} {min(r[s + '_us']):.1f} ({r['ratio_' + s]:.3f})" for s in sides),
                flush=True,
            )


def tail_variants(head, tiles, splits, k):
    """``head`` then each of ``tiles`` with each ``tail_split`` of ``splits`` (fitted to shared memory), without
    repeats and without the cuts that K does not allow (bmm.tail_split_error)."""
    cands = list(head) + [
        bmm._fit_smem(dataclasses.replace(t, tail_split=s), jnp.bfloat16) for t in tiles for s in splits
    ]
    return [c for i, c in enumerate(cands) if c not in cands[:i] and bmm.tail_split_error(c, k) is None]


def phase_sweep(results):
    for m, n, k, limit in SWEEP:
        copies = bench.n_copies(n, k)
        a, a_s, bs = device_operands(m, n, k, copies, seed=1)
        ref = ref_block_f32(a, bs[0][0], a_s, bs[0][1])
        sets = [(a, b, a_s, b_s) for b, b_s in bs]
        if elapsed() > BUDGET_S:
            results.append({"kind": "skipped", "phase": "sweep", "M": m, "N": n, "K": k, "why": "time budget"})
            continue
        base = {"kind": "sweep_baseline", "impl": "qlin:mosaic_gpu", "dtype": "fp8", "M": m, "N": n, "K": k}
        try:  # the per-channel kernel on the same fp8 data (per-token x per-channel scales)
            us = measure_us(per_channel_fn(), channel_sets(a, a_s, bs, n), iterations=20)
            base.update(us=us, tflops=2.0 * m * n * k / (us * 1e-6) / 1e12)
        except Exception as e:  # noqa: BLE001
            base.update(us=None, error=f"{type(e).__name__}: {e}"[:1500])
        results.append(base)
        print(f"sweep M={m} {n}x{k} per-channel baseline: {_fmt(base.get('us'))} us", flush=True)
        cands = bmm.candidate_configs(m, n, k)
        if SWEEP_TAIL:  # the two promoted large-M tiles, each whole and cut 2 / 3 / 4 ways over the last wave
            cands = tail_variants(
                cands[:1],
                (bmm._three_wg_tile("m", width=4), bmm._two_block_step_tile()),
                SWEEP_SPLITS or (1, 2, 3, 4),
                k,
            )
        if SWEEP_WIDE:  # the default, the two-block tile and the 192-wide tiles (whole and with the last wave cut)
            wide = (bmm._wide_tile(), bmm._wide_tile(width=4), bmm._wide_tile(steps=4, grid_minor="n"))
            cands = tail_variants([cands[0], bmm._two_block_step_tile()], wide, SWEEP_SPLITS or (1, 2), k)
        if SWEEP_RESCALE:  # the promoted default and the rescaled-accumulation candidates only
            cands = cands[:1] + [c for c in bmm.candidate_configs(m, n, k, fast_accum=True) if c.rescale]
        for cfg in cands[:limit]:
            if elapsed() > BUDGET_S:
                results.append({"kind": "skipped", "phase": "sweep", "M": m, "N": n, "K": k, "config": cfg.short()})
                continue
            row = {
                "kind": "sweep",
                "impl": "qlin:mosaic_gpu_block",
                "dtype": "fp8",
                "M": m,
                "N": n,
                "K": k,
                "config": cfg.short(),
            }
            try:
                fn = jax.jit(
                    lambda a, b, x, y, cfg=cfg: bmm.block_scaled_mm(a, b, x, y, config=cfg, interpret=INTERPRET)
                )
                with Watchdog(f"sweep M={m} {n}x{k} {cfg.short()}"):
                    err = rel(fn(*sets[0]), ref)
                    us = measure_us(fn, sets, iterations=20)
                row.update(
                    us=us, tflops=2.0 * m * n * k / (us * 1e-6) / 1e12, rel_err=err, ok=err <= 1e-2, overlap=cfg.overlap, rescale=cfg.rescale
                )
                if base.get("us"):
                    row["vs_per_channel"] = base["us"] / us
            except Exception as e:  # noqa: BLE001
                row.update(us=None, ok=False, error=f"{type(e).__name__}: {e}"[:1500])
            results.append(row)
            DUMP()
            print(
                f"sweep M={m} {n}x{k} {cfg.short()}: {_fmt(row.get('us'))} us "
                f"{_fmt(row.get('tflops'), 0)} TF/s vs per-channel {_fmt(row.get('vs_per_channel'), 2)} "
                f"err={row.get('rel_err')} {row.get('error', '')}",
                flush=True,
            )


def phase_tail_ab(results):
    """Where the stream-K tail's time goes, per SWEEP shape: three warpgroups whole, cut 2 ways, and cut 2
    ways with the partial-total exchange left out (``bmm._TAIL_ABLATION = "no_exchange"``: wrong output,
    a bound), each timed in the same run beside the per-channel kernel."""
    base_cfg = bmm._three_wg_tile("m", width=4)
    variants = [("whole", base_cfg, None), ("t2", dataclasses.replace(base_cfg, tail_split=2), None),
                ("t2_no_exchange", dataclasses.replace(base_cfg, tail_split=2), "no_exchange")]  # fmt: skip
    for m, n, k, _ in SWEEP:
        if elapsed() > BUDGET_S:
            results.append({"kind": "skipped", "phase": "tail_ab", "M": m, "N": n, "K": k})
            continue
        copies = bench.n_copies(n, k)
        a, a_s, bs = device_operands(m, n, k, copies, seed=2)
        sets = [(a, b, a_s, b_s) for b, b_s in bs]
        chan_us = measure_us(per_channel_fn(), channel_sets(a, a_s, bs, n))
        line = [f"tail_ab M={m} {n}x{k}: per-channel {chan_us:.1f} us"]
        for name, cfg, abl in variants:
            row = {"kind": "tail_ab", "variant": name, "M": m, "N": n, "K": k, "config": cfg.short()}
            bmm._TAIL_ABLATION = abl
            try:
                fn = jax.jit(lambda a, b, x, y, cfg=cfg: bmm.block_scaled_mm(a, b, x, y, config=cfg))
                row["us"] = measure_us(fn, sets)
                line.append(f"{name} {row['us']:.1f}")
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:1500]
                line.append(f"{name} ERROR {row['error'][:200]}")
            finally:
                bmm._TAIL_ABLATION = None
            results.append(row)
            DUMP()
        print(", ".join(line), flush=True)


# -- 5. ptxas ------------------------------------------------------------------------------------


def _capture_fds(fn):
    """Runs ``fn`` with the process's stdout and stderr (file descriptors 1 and 2, where jaxlib's
    C++ code and the ptxas it spawns write) redirected to a file; returns (fn(), captured text)."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as tf:
        os.dup2(tf.fileno(), 1)
        os.dup2(tf.fileno(), 2)
        try:
            out = fn()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        tf.seek(0)
        return out, tf.read().decode(errors="replace")


def phase_ptxas(results, out_dir):
    """ptxas' view of the default tiles and each overlap layout at M=4096 4096x4096: registers,
    spills, "wgmma ... serialized" warnings (the overlap only pays if ptxas keeps the wgmma
    asynchronous).  MOSAIC_GPU_DUMP_PTXAS=1 (read by jaxlib at every Mosaic GPU compilation)
    makes jaxlib print ptxas' verbose output; it is captured from the file descriptors around
    one compile + run of a fresh kernel per config and the full text written to
    $OUT/ptxas_<layout>.txt.  (MOSAIC_GPU_DUMP_TO is left unset: it would switch on the MLIR
    pass dumps instead.)"""
    import re

    m, n, k = (4096, 4096, 4096) if not INTERPRET else (128, 256, 256)
    cfgs = {
        "default": bmm.default_config(m, n, k), **THREE_WG_LAYOUTS, "w3m_t2": TAIL_LAYOUTS["w3m_t2"], **WIDE_LAYOUTS
    }
    cfgs.update({} if PTXAS_SHORT else OVERLAP_LAYOUTS)
    kb, nb = cdiv(k, 128), cdiv(n, 128)
    args = (
        jnp.zeros((m, k), F8),
        jnp.zeros((n, k), F8),
        jnp.ones((m, kb), jnp.float32),
        jnp.ones((nb, kb), jnp.float32),
    )
    pat = re.compile(r"(serializ|spill|registers|Potential Performance Loss|warning)", re.IGNORECASE)
    for name, cfg in cfgs.items():
        row = {"kind": "ptxas", "layout": name, "config": cfg.short(), "M": m, "N": n, "K": k}
        os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
        try:
            # A distinct bias-free closure per config: a fresh compilation (no cache hit).
            f = jax.jit(lambda a, b, x, y, cfg=cfg: bmm.block_scaled_mm(a, b, x, y, config=cfg, interpret=INTERPRET))
            with Watchdog(f"ptxas compile {name}"):
                _, text = _capture_fds(lambda f=f: np.asarray(f(*args)[:1, :1]))
            (out_dir / f"ptxas_{name}.txt").write_text(text)
            lines = [ln.strip() for ln in text.splitlines() if pat.search(ln)]
            row.update(captured_chars=len(text), report=lines[:40])
            row["serialized"] = any("serializ" in ln.lower() for ln in lines)
            row["spills"] = [ln for ln in lines if "spill" in ln.lower()][:6]
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}"[:1500])
        finally:
            os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
        results.append(row)
        DUMP()
        print(
            f"ptxas {name} {cfg.short()}: captured {row.get('captured_chars')} chars, "
            f"serialized={row.get('serialized')} {row.get('error', '')}",
            flush=True,
        )
        for ln in row.get("report", [])[:8]:
            print(f"    {ln[:200]}", flush=True)


def main():
    global XLA_FP8, BUDGET_S, SWEEP, SWEEP_RESCALE, INTERPRET, LLAMA, M_GRID, CHECK_SHAPES, CHECK_M
    global CASE_TIMEOUT_S, DUMP, SWEEP_TAIL, SWEEP_WIDE, SWEEP_SPLITS, PTXAS_SHORT
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="check,accuracy,layer,time,sweep")
    p.add_argument("--cpu-dry-run", action="store_true", help="exercise the script on the CPU (interpret mode)")
    p.add_argument("--xla-fp8", action="store_true", help="also time XLA's fp8 GEMM (per-channel scales)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting new cases after this many seconds")
    p.add_argument(
        "--sweep-limit", type=int, default=None, help="candidate configs per sweep shape (default 10 / 6 / 6)"
    )
    p.add_argument("--sweep-shapes", default=None, help="M:N:K,... of the sweep phase (default: %s)" % SWEEP)
    p.add_argument("--sweep-wide", action="store_true", help="sweep the default + the 192-wide promoted tiles")
    p.add_argument("--sweep-rescale", action="store_true", help="sweep only the default + rescale candidates")
    p.add_argument("--ptxas-short", action="store_true", help="ptxas phase: leave out the overlap layouts")
    p.add_argument(
        "--sweep-tail", action="store_true", help="sweep the default + the promoted large-M tiles, tail_split 1/2/3/4"
    )
    p.add_argument(
        "--sweep-splits", default=None, help="comma-separated tail_split values of --sweep-tail / --sweep-wide"
    )
    p.add_argument("--m", default=None, help="comma-separated M values of the time phase (default: %s)" % M_GRID)
    p.add_argument(
        "--shapes",
        default=None,
        help="N:K,... of the time phase, or 'grid' for the issue's eight Llama-3 shapes (default: %s)" % LLAMA,
    )
    p.add_argument(
        "--check-m", default=None, help="comma-separated M values of the check phase (default: %s)" % (CHECK_M,)
    )
    p.add_argument("--autotune-shapes", default=None, help="M:N:K,... of the autotune phase")
    p.add_argument("--case-timeout-s", type=float, default=CASE_TIMEOUT_S, help="watchdog per overlap / sweep case")
    args = p.parse_args()
    phases = args.phases.split(",")
    XLA_FP8 = args.xla_fp8
    BUDGET_S = args.budget_s
    CASE_TIMEOUT_S = args.case_timeout_s
    if args.cpu_dry_run:
        INTERPRET = True
        LLAMA, M_GRID = [(256, 256)], [16, 100]
        CHECK_SHAPES, CHECK_M = [(272, 384)], [7]
        SWEEP = [(640, 256, 384, 3)]
    if args.m:
        M_GRID = [int(v) for v in args.m.split(",")]
    if args.check_m:
        CHECK_M = [int(v) for v in args.check_m.split(",")]
    if args.shapes == "grid":
        LLAMA = list(bench.LLAMA3_SHAPES)
    elif args.shapes:
        try:
            LLAMA = [tuple(int(v) for v in c.split(":")) for c in args.shapes.split(",")]
            assert all(len(s) == 2 and min(s) >= 1 for s in LLAMA)
        except (ValueError, AssertionError):
            p.error(f"--shapes: expected 'grid' or N:K,N:K,... of positive integers, got {args.shapes!r}")
    SWEEP_RESCALE = args.sweep_rescale
    SWEEP_TAIL = args.sweep_tail
    SWEEP_WIDE = args.sweep_wide
    if args.sweep_splits:
        SWEEP_SPLITS = tuple(int(v) for v in args.sweep_splits.split(","))
    PTXAS_SHORT = args.ptxas_short
    if args.autotune_shapes:
        global AUTOTUNE_SHAPES
        AUTOTUNE_SHAPES = [tuple(int(v) for v in c.split(":")) for c in args.autotune_shapes.split(",")]
    if args.sweep_shapes:
        SWEEP = [(*(int(v) for v in c.split(":")), 10) for c in args.sweep_shapes.split(",")]
    if args.sweep_limit is not None:
        SWEEP = [(m, n, k, args.sweep_limit) for m, n, k, _ in SWEEP]
    out_dir = Path(os.environ.get("OUT") or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    results = RESULTS
    summary: list[dict] = []
    meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__, "phases": phases}
    path = out_dir / "gpu_block_check.json"

    def dump():
        path.write_text(json.dumps({**meta, "elapsed_s": round(elapsed(), 1), "rows": results}, indent=1))

    DUMP = dump

    for name, fn in (
        ("check", lambda: phase_check(results)),
        ("overlap", lambda: phase_check(results, overlap_only=True)),
        ("rescale", lambda: phase_check(results, rescale_only=True)),
        ("wg3", lambda: phase_check(results, rescale_only=True, layouts=THREE_WG_LAYOUTS)),
        ("wide", lambda: phase_check(results, rescale_only=True, layouts=WIDE_LAYOUTS)),
        ("tail", lambda: phase_check(results, tail_only=True)),
        ("tail_ab", lambda: phase_tail_ab(results)),
        ("ptxas", lambda: phase_ptxas(results, out_dir)),
        ("accuracy", lambda: phase_accuracy(results)),
        ("layer", lambda: phase_layer(results)),
        ("time", lambda: phase_time(results, summary)),
        ("sweep", lambda: phase_sweep(results)),
        ("autotune", lambda: phase_autotune(results, out_dir)),
    ):
        if name not in phases:
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            results.append(
                {"kind": "error", "phase": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            )
            print(f"phase {name} failed: {e}", flush=True)
        dump()
    checks = [r for r in results if r.get("kind") in ("check", "layer", "select", "hang")]
    print(f"\n{meta['device']}, jax {meta['jax']}, {elapsed():.0f} s")
    print(f"checks: {sum(bool(r.get('ok')) for r in checks)}/{len(checks)} ok")
    for r in checks:
        if not r.get("ok"):
            print("  FAIL", {k: v for k, v in r.items() if k != "trace"})
    if summary:
        md = [HEADER] + [
            _summary_line(rows)
            for rows in sorted(summary, key=lambda r: tuple(r["qlin:mosaic_gpu_block"][x] for x in ("N", "K", "M")))
        ]
        print("\n" + "\n".join(md))
        big = [r for r in summary if r["qlin:mosaic_gpu_block"]["M"] >= 1024]
        ratios = [
            r["qlin:mosaic_gpu"]["us"] / r["qlin:mosaic_gpu_block"]["us"]
            for r in big
            if r["qlin:mosaic_gpu"].get("us") and r["qlin:mosaic_gpu_block"].get("us")
        ]
        beats = [
            r["xla:dequant_bf16"]["us"] > r["qlin:mosaic_gpu_block"]["us"]
            for r in summary
            if r["xla:dequant_bf16"].get("us") and r["qlin:mosaic_gpu_block"].get("us")
        ]
        if ratios:
            md.append(
                f"\nM >= 1024: block / per-channel throughput min {min(ratios):.2f}, mean {np.mean(ratios):.2f}, "
                f">= 0.85 at {sum(x >= 0.85 for x in ratios)}/{len(ratios)} (target >= 0.85)"
            )
        md.append(f"faster than xla dequant at {sum(beats)}/{len(beats)} shapes")
        print("\n".join(md[-2:] if ratios else md[-1:]))
        cmd = f"`gpu_block_check.py {' '.join(sys.argv[1:])}`"
        head = f"{meta['device']}, jax {meta['jax']}: {cmd}\n\n"
        (out_dir / "gpu_block_check.md").write_text(head + "\n".join(md) + "\n")
    for r in results:
        if r.get("kind") == "accuracy":
            print(f"accuracy f32 out, unit scales, K={r['K']}: {r['impl']} rel_err={r.get('rel_err', r.get('error'))}")
    sweep = [r for r in results if r.get("kind") in ("sweep", "sweep_baseline") and r.get("us")]
    if sweep:
        print("\nsweep (best first; o = overlapped promotion; ratio = per-channel us / this us, target >= 0.85):")
        for r in sorted(sweep, key=lambda r: (r["M"], r["N"], r["us"])):
            name = r.get("config") or "per-channel qlin:mosaic_gpu"
            ratio = f" ratio {r['vs_per_channel']:.2f}" if r.get("vs_per_channel") else ""
            bad = "" if r.get("ok", True) else f" WRONG rel_err={r.get('rel_err')}"
            print(f"  M={r['M']} {r['N']}x{r['K']} {name}: {r['us']:.1f} us {r['tflops']:.0f} TF/s{ratio}{bad}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
