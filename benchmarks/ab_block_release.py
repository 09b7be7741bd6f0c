"""A/B of the block fp8 kernel's stage release (``BlockTuningConfig.early_release``), on the GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_block_release.py [--phases ptxas,time,check]
        [--m 1024,2048] [--sides off,on] [--out DIR] [--budget-s 420]

The promoted block kernel's consumer warpgroups wait for a step's wgmma, promote its f32 partial product
(64 FFMAs a thread per 64 x 128 block) and only then, when the pipeline body returns, hand the step's
shared-memory stage back to the producer.  With ``early_release=True`` they arrive on the pipeline's
consumed barriers themselves right after the wgmma completes, so the producer may refill the stage while
the promotion runs (the tensor cores idle when every warpgroup waits for data or promotes at once:
results/h100_ncu_block.md).

1. ptxas: registers, spills and "wgmma ... serialized" warnings of the default tiles, both sides.
2. time: the Llama-3 grid at ``--m``: the ``--sides`` (default ``off,on``: the heuristic's config with the
   flag off and on; ``k256`` / ``k256_on``: the two-block tile without / with it), and qlin's per-channel
   kernel on the same fp8 data, alternated twice (CUPTI medians of 20 warm runs, weight copies rotated);
   no case starts after ``--budget-s``.
3. check: ``early_release=True`` against a float64 reference (fresh random fp8 operands and block scales,
   NaN-poisoned outputs, partial M / N / K tiles, bias, f32 / f16 / bf16 out): every promoted warpgroup
   layout of gpu_block_check (one / two / three warpgroups, 256- and 192-wide tiles, two K blocks a step)
   and stream-K cut last waves.
Writes ``ab_block_release.json`` under --out.

H100 result (benchmarks/results/h100_ab_block_release.md): the two-block tile (three 256-deep stages) level or
faster at 30 of 32 same-run pairs from M = 256 to 2048, up to 11 %: its default since; the three-warpgroup (four
stages) and 128 x 192 (five) tiles 1-3 % slower with it.  Check 32/32 (h100_block_release_check.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
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
#: (M, N, K, out dtype, bias): partial M / N / K tiles, M below one tile, a partial K block
CHECK_CASES = [
    (1000, 13664, 4096, "bfloat16", True),
    (129, 1040, 2080, "float32", False),
    (7, 4096, 4096, "float16", True),
    (2048, 4096, 4096, "bfloat16", False),
]
PROMOTED = {name: cfg for name, cfg in g.LAYOUTS.items() if not (cfg.overlap or cfg.rescale)}
PROMOTED["w2m_k256"] = bmm._two_block_step_tile()
#: stream-K cut last waves (GPU only): the contributors' and owners' K ranges run the same body
TAIL_CASES = [c for c in g.TAIL_CASES if c[5] in ("w3m_t2", "w2m_k256_t2", "w2m_tn192_t2")]


def early(cfg, on: bool = True):
    return dataclasses.replace(cfg, early_release=on)


def phase_ptxas(rows, out_dir):
    m, n, k = 4096, 4096, 4096
    a, a_s, bs = g.device_operands(m, n, k, 1)
    pat = re.compile(r"(serializ|spill|registers|Potential Performance Loss|warning)", re.IGNORECASE)
    for on in (False, True):
        cfg = early(bmm.default_config(m, n, k), on)
        row = {"kind": "ptxas", "config": cfg.short(), "early_release": on}
        os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
        try:
            f = g.block_fn(cfg)
            _, text = g._capture_fds(lambda f=f: np.asarray(f(a, bs[0][0], a_s, bs[0][1])[:1, :1]))
            (out_dir / f"ptxas_release_{int(on)}.txt").write_text(text)
            lines = [ln.strip() for ln in text.splitlines() if pat.search(ln)]
            row.update(report=lines[:20], serialized=any("serializ" in ln.lower() for ln in lines))
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}"[:1500])
        finally:
            os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
        rows.append(row)
        print(json.dumps(row)[:900], flush=True)


def _check_one(rows, rng, name, cfg, m, n, k, od, has_bias):
    out_dtype = jnp.dtype(od)
    cfg = cfg if cfg is not None else bmm.default_config(m, n, k, out_dtype)
    g.check_config(rows, rng, name, early(bmm._fit_smem(cfg, out_dtype)), m, n, k, od, has_bias)


def phase_check(rows):
    rng = np.random.default_rng(11)
    for m, n, k, od, has_bias in CHECK_CASES:
        _check_one(rows, rng, "default", None, m, n, k, od, has_bias)
    for name, cfg in PROMOTED.items():
        for m, n, k, od, has_bias in CHECK_CASES if cfg.tile_k == 2 * bmm.BLOCK else CHECK_CASES[:1]:
            _check_one(rows, rng, name, cfg, m, n, k, od, has_bias)
    for m, n, k, od, has_bias, name in TAIL_CASES:
        _check_one(rows, rng, name or "default", g.TAIL_LAYOUTS.get(name), m, n, k, od, has_bias)


#: time-phase sides: name -> (config, early_release) from the heuristic's config (a side equal to an
#: earlier one is left out)
SIDES = {
    "off": lambda d: (d, False),
    "on": lambda d: (d, True),
    "k256": lambda d: (bmm._fit_smem(bmm._two_block_step_tile(), jnp.dtype(jnp.bfloat16)), False),
    "k256_on": lambda d: (bmm._fit_smem(bmm._two_block_step_tile(), jnp.dtype(jnp.bfloat16)), True),
}


def phase_time(rows, ms, budget_s, t0, side_names=("off", "on")):
    for m in ms:
        for n, k in GRID:
            if time.time() - t0 > budget_s:
                rows.append({"kind": "skipped", "M": m, "N": n, "K": k})
                continue
            default = bmm.default_config(m, n, k)
            g.time_sides(rows, m, n, k, {s: early(*SIDES[s](default)) for s in side_names})


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="ptxas,time,check")
    p.add_argument("--m", default="1024,2048", help="comma-separated M values of the time phase")
    p.add_argument("--sides", default="off,on", help="time-phase sides, of: " + ",".join(SIDES))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting time cases after this many seconds")
    args = p.parse_args(argv)
    out_dir, t0, rows, res = g.ab_run(args.out)
    phases = args.phases.split(",")
    sides = args.sides.split(",")
    for name, fn in (
        ("ptxas", lambda: phase_ptxas(rows, out_dir)),
        ("time", lambda: phase_time(rows, [int(x) for x in args.m.split(",")], args.budget_s, t0, sides)),
        ("check", lambda: phase_check(rows)),
    ):
        if name in phases:
            fn()
            (out_dir / "ab_block_release.json").write_text(json.dumps(res, indent=1))
    checks = [r for r in rows if r["kind"] == "check"]
    print(f"check {sum(r['ok'] for r in checks)}/{len(checks)}", flush=True)
    g.print_sides(rows)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
