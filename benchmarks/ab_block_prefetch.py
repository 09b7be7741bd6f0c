"""A/B of prefetched weight scales in the block fp8 kernel (``BlockTuningConfig.prefetch_scales``), on the GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_block_prefetch.py [--phases check,time]
        [--m 1024,2048 | --shapes M:N:K,...] [--sides cur,pf] [--out DIR] [--budget-s 400]

Under Nsight Compute 3 % of the three-warpgroup kernel's warp stall samples sat on the weight-scale load
(a global load of one f32 per step, an L1 hit; results/h100_ncu_block.md), issued after the step's wgmma and
used by the promotion right after the wgmma completes.  With ``prefetch_scales`` each step loads the NEXT
step's weight scales while its wgmma runs and carries them (the rescaled path already does this).

1. check: prefetched configs against a float64 reference (fresh random fp8 operands and block scales,
   NaN-poisoned outputs, partial M / N / K tiles, bias, f32 / f16 / bf16 out) for every promoted layout the
   heuristic takes at M > 64, the 64 x 256 warpgroup tile (two N blocks a step) and stream-K over the last
   wave (K ranges starting mid-K: the prefetch's first step).
2. time: the Llama-3 grid at ``--m`` (or ``--shapes``): the ``--sides`` (``cur``: the heuristic's config,
   ``pf``: the same with prefetch_scales) and qlin's per-channel kernel on the same fp8 data, alternated
   twice (CUPTI medians of 20 warm runs, weight copies rotated); no case starts after ``--budget-s``.
Writes ``ab_block_prefetch.json`` under --out.
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
from ab_block_cluster import _shapes  # noqa: E402
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm  # noqa: E402

GRID = list(g.bench.LLAMA3_SHAPES)
#: (layout, M, N, K, out dtype, bias): partial M / N / K tiles, each out dtype
CHECK_CASES = [
    ("w3m_tn128", 1000, 13664, 4096, "bfloat16", True),
    ("w3m_tn128", 300, 1040, 2080, "float32", False),
    ("w2m_k256", 1000, 13664, 4096, "bfloat16", True),
    ("w2m_k256", 300, 1040, 2080, "float16", False),
    ("w2m_k256_cm", 1000, 13664, 4096, "bfloat16", True),
    ("w2m_tn192", 1000, 13664, 4096, "float32", True),
    ("w2m_tn192", 130, 400, 2080, "bfloat16", False),
    ("w2m_tn128", 300, 1040, 2080, "float16", True),
    ("w2n_tn128", 300, 1040, 2080, "bfloat16", True),
    ("w2m_tn256", 300, 1040, 2080, "bfloat16", True),
    ("w3m_t2", 2048, 4096, 4096, "bfloat16", True),
    ("w3m_t3", 4096, 4096, 1536, "bfloat16", False),
    ("w2m_k256_t3", 1000, 4096, 2048, "float32", True),
    ("w2m_tn192_t2", 1000, 4096, 2048, "bfloat16", True),
]
LAYOUTS = {
    **{k: g.LAYOUTS[k] for k in ("w3m_tn128", "w2m_tn192", "w2m_tn128", "w2n_tn128", "w2m_tn256", "w2m_k256_cm")},
    "w2m_k256": bmm._two_block_step_tile(),
    **{k: g.TAIL_LAYOUTS[k] for k in ("w3m_t2", "w3m_t3", "w2m_k256_t3", "w2m_tn192_t2")},
}


def prefetched(cfg):
    return dataclasses.replace(cfg, prefetch_scales=True)


SIDES = {"cur": lambda d: d, "pf": prefetched}


def phase_check(rows, deadline):
    rng = np.random.default_rng(17)
    for name, m, n, k, od, has_bias in CHECK_CASES:
        if time.time() > deadline:
            rows.append({"kind": "skipped_check", "layout": name, "M": m, "N": n, "K": k})
            continue
        cfg = bmm._fit_smem(prefetched(LAYOUTS[name]), jnp.dtype(od))
        g.check_config(rows, rng, f"{name}_pf", cfg, m, n, k, od, has_bias)


def phase_time(rows, cases, budget_s, t0, side_names):
    for m, n, k in cases:
        if time.time() - t0 > budget_s:
            rows.append({"kind": "skipped", "M": m, "N": n, "K": k})
            continue
        default = bmm.default_config(m, n, k)
        sides = {s: bmm._fit_smem(SIDES[s](default), jnp.dtype(jnp.bfloat16)) for s in side_names}
        g.time_sides(rows, m, n, k, sides)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="check,time")
    p.add_argument("--m", default="2048,1024", help="comma-separated M values of the time phase")
    p.add_argument("--shapes", type=_shapes, default=None, help="M:N:K,... to time instead of the grid at --m")
    p.add_argument("--sides", default="cur,pf", help="time-phase sides, of: " + ",".join(SIDES))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting time cases after this many seconds")
    p.add_argument("--deadline-s", type=float, default=200.0, help="stop starting check cases after this many seconds")
    args = p.parse_args(argv)
    out_dir, t0, rows, res = g.ab_run(args.out)
    phases = args.phases.split(",")
    cases = args.shapes or [(int(m), n, k) for m in args.m.split(",") for n, k in GRID]
    for name, fn in (
        ("check", lambda: phase_check(rows, t0 + args.deadline_s)),
        ("time", lambda: phase_time(rows, cases, args.budget_s, t0, args.sides.split(","))),
    ):
        if name in phases:
            fn()
            (out_dir / "ab_block_prefetch.json").write_text(json.dumps(res, indent=1))
    checks = [r for r in rows if r["kind"] == "check"]
    print(f"check {sum(r['ok'] for r in checks)}/{len(checks)}", flush=True)
    for r in checks:
        if not r["ok"]:
            print("FAILED", json.dumps(r)[:500], flush=True)
    g.print_sides(rows)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
