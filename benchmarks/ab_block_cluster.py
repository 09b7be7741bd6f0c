"""A/B of two-CTA clusters in the block fp8 kernel (``BlockTuningConfig.cluster``), on the GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_block_cluster.py [--phases time,check]
        [--m 1024,2048 | --shapes M:N:K,...] [--sides cur,cm,cn,k256_cm] [--out DIR] [--budget-s 400]

Under Nsight Compute the block kernel's 128 x 128 two-block tile ran its L2 at 84 % of throughput (three
warpgroups 70 %, per-channel 57 %: results/h100_ncu_block.md): per output it loads a third more bytes than
the per-channel kernel's 128 x 256 tile.  A cluster of two CTAs whose tiles are neighbours along M (N)
shares the weight (activation) tile: each CTA TMA-loads half of it and multicasts it to both.

1. time: the Llama-3 grid at ``--m`` (or the ``--shapes``): the ``--sides`` (``cur``: the heuristic's
   config; ``cm`` / ``cn``: the same tile as clusters along M / N; ``k256_cm`` / ``k256_cn``: the two-block
   tile (early release on) as clusters; ``k256``: unclustered; ``wide`` / ``three``: the 128 x 192 /
   three-warpgroup tile), and qlin's per-channel kernel on the same fp8 data, alternated twice (CUPTI
   medians of 20 warm runs, weight copies rotated); a side equal to an earlier one is left out; no case
   starts after ``--budget-s``.
2. check: clustered configs against a float64 reference (fresh random fp8 operands and block scales,
   NaN-poisoned outputs, partial M / N / K tiles, odd tile counts (a cluster's second CTA past the edge),
   bias, f32 / f16 / bf16 out) for the promoted layouts the heuristic takes at M > 512 and two others.
Writes ``ab_block_cluster.json`` under --out.

H100 result (benchmarks/results/h100_ab_block_cluster.md): slower clustered for three warpgroups, the 128 x 192
tile, and the two-block tile at weights under 200 MB or M <= 512; the two-block tile along M 7-9 % faster at
8192 x 28672 and 57344 x 8192 (M >= 1024): the heuristic's where N x K >= 200 MB.  Check 24/24.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpu_block_check as g  # noqa: E402
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm  # noqa: E402

GRID = list(g.bench.LLAMA3_SHAPES)  # the Llama-3 (N, K) grid
#: (M, N, K, out dtype, bias): partial M / N / K tiles; odd tile counts along M and N (384 = 3 x 128 rows,
#: 1040 = 9 x 128 columns: the last cluster's second CTA is past the edge)
CHECK_CASES = [
    (1000, 13664, 4096, "bfloat16", True),
    (384, 1040, 2080, "float32", False),
    (300, 1040, 640, "float16", True),
    (2048, 4096, 4096, "bfloat16", False),
]
#: the clustered layouts the check phase runs (each along M and N)
LAYOUTS = {
    "w2m_k256": bmm._two_block_step_tile(),
    "w3m_tn128": bmm._three_wg_tile("m", width=4),
    "w2m_tn192": bmm._wide_tile(),
    "w2m_tn128": g.LAYOUTS["w2m_tn128"],
    "w2n_tn128": g.LAYOUTS["w2n_tn128"],
}


def clustered(cfg, axis):
    return dataclasses.replace(cfg, cluster=axis)


def _two_block():
    return bmm._fit_smem(bmm._two_block_step_tile(), jnp.dtype(jnp.bfloat16))


#: time-phase sides: name -> the config timed, from the heuristic's
SIDES = {
    "cur": lambda d: d,
    "cm": lambda d: clustered(dataclasses.replace(d, tail_split=1), "m"),
    "cn": lambda d: clustered(dataclasses.replace(d, tail_split=1), "n"),
    "k256": lambda d: _two_block(),
    "k256_cm": lambda d: clustered(_two_block(), "m"),
    "k256_cn": lambda d: clustered(_two_block(), "n"),
    "wide": lambda d: bmm._wide_tile(),
    "three": lambda d: bmm._three_wg_tile("m", width=4),
}


def phase_check(rows, deadline):
    rng = np.random.default_rng(13)
    for name, base in LAYOUTS.items():
        for axis in ("m", "n"):
            for m, n, k, od, has_bias in CHECK_CASES if name == "w2m_k256" else CHECK_CASES[:2]:
                if time.time() > deadline:
                    rows.append({"kind": "skipped_check", "layout": name, "M": m, "N": n, "K": k})
                    continue
                cfg = bmm._fit_smem(clustered(base, axis), jnp.dtype(od))
                g.check_config(rows, rng, f"{name}_c{axis}", cfg, m, n, k, od, has_bias)


def phase_time(rows, cases, budget_s, t0, side_names):
    for m, n, k in cases:
        if time.time() - t0 > budget_s:
            rows.append({"kind": "skipped", "M": m, "N": n, "K": k})
            continue
        default = bmm.default_config(m, n, k)
        sides = {s: bmm._fit_smem(SIDES[s](default), jnp.dtype(jnp.bfloat16)) for s in side_names}
        g.time_sides(rows, m, n, k, sides)


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in s.split(":")) for s in text.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(t) != 3 or min(t) < 1 for t in shapes):
        raise argparse.ArgumentTypeError(f"--shapes wants M:N:K,... with positive integers, got {text!r}")
    return shapes


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="time,check")
    p.add_argument("--m", default="1024,2048", help="comma-separated M values of the time phase")
    p.add_argument("--shapes", type=_shapes, default=None, help="M:N:K,... to time instead of the grid at --m")
    p.add_argument("--sides", default="cur,cm,cn,k256_cm", help="time-phase sides, of: " + ",".join(SIDES))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting time cases after this many seconds")
    p.add_argument("--deadline-s", type=float, default=540.0, help="stop starting check cases after this many seconds")
    args = p.parse_args(argv)
    out_dir, t0, rows, res = g.ab_run(args.out)
    phases = args.phases.split(",")
    if args.shapes:
        cases = args.shapes
    else:
        cases = [(int(m), n, k) for m in args.m.split(",") for n, k in GRID]
    for name, fn in (
        ("time", lambda: phase_time(rows, cases, args.budget_s, t0, args.sides.split(","))),
        ("check", lambda: phase_check(rows, t0 + args.deadline_s)),
    ):
        if name in phases:
            fn()
            (out_dir / "ab_block_cluster.json").write_text(json.dumps(res, indent=1))
    checks = [r for r in rows if r["kind"] == "check"]
    print(f"check {sum(r['ok'] for r in checks)}/{len(checks)}", flush=True)
    for r in checks:
        if not r["ok"]:
            print("FAILED", json.dumps(r)[:500], flush=True)
    g.print_sides(rows)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
