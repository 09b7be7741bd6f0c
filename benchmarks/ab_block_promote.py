"""A/B of the block fp8 kernel's promotion schedule with two K blocks a step (``tile_k=256``), on the GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_block_promote.py [--phases ptxas,check,time] [--out DIR]

``mosaic_gpu_block_scaled_mm._EARLY_PROMOTE`` off (the kernel's schedule: issue both blocks' wgmmas,
wait for both, promote both) against on (promote block 0 as soon as its own wgmma group completes,
``wgmma_accumulator_load(wait_n=1)``, while block 1's wgmma still runs).  The two-warpgroup tiles run
their tensor cores ~65 % of the time (results/h100_ncu_block.md): a warpgroup's wait-and-promote is
what the other must cover.  The knob is read while a kernel is traced, so each side gets a fresh
``jax.jit`` closure.

1. ptxas: registers, spills and "wgmma ... serialized" warnings of both sides (ptxas serialized every
   wgmma of the earlier ``overlap=True`` layouts, which read one accumulator while the other's wgmma
   ran across steps; here both groups complete inside the step).
2. check: the on-side against a float64 reference (fresh random fp8 operands and block scales,
   NaN-poisoned outputs, partial M / N / K tiles, bias, f32 / bf16 out), every tile_k=256 layout.
3. time: at M = 1024 / 2048 on the Llama-3 grid, the heuristic's config (off), the two-warpgroup
   two-block-step tile off and on, and qlin's per-channel kernel on the same fp8 data, alternated twice
   (CUPTI medians of 20 warm runs, weight copies rotated).
Writes ``ab_block_promote.json`` under --out.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpu_block_check as g  # noqa: E402
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm  # noqa: E402

TWO_BLOCK = {
    "w2m_k256": bmm._two_block_step_tile(),
    "w1n_tn32_k256": g.LAYOUTS["w1n_tn32_k256"],
    "w1n_tn16_k256": g.LAYOUTS["w1n_tn16_k256"],
    "w2n_k256": dataclasses.replace(bmm._two_block_step_tile(), wg_dimension="n"),
}
CHECK_CASES = [  # (M, N, K, out dtype, bias)
    (129, 1040, 2080, "bfloat16", True),
    (1000, 13664, 4096, "bfloat16", False),
    (257, 1040, 2048, "float32", True),
    (7, 4096, 4096, "float16", True),
    (1024, 4096, 4096, "bfloat16", False),
]
GRID = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (8192, 8192), (57344, 8192),
        (8192, 28672)]  # fmt: skip
TIME_CASES = [(m, n, k) for m in (1024, 2048) for n, k in GRID]


def block_fn(cfg, early: bool, out_dtype=jnp.bfloat16):
    """A fresh jitted closure traced with the knob set to ``early`` (traced here, on first use, so
    the knob is set again around that call by :func:`run`)."""
    return jax.jit(
        lambda a, b, x, y, bias=None: bmm.block_scaled_mm(a, b, x, y, bias=bias, out_dtype=out_dtype, config=cfg)
    )


def run(fn, early, *args, **kw):
    bmm._EARLY_PROMOTE = early
    try:
        return fn(*args, **kw)
    finally:
        bmm._EARLY_PROMOTE = False


def phase_ptxas(rows, out_dir):
    import re

    m, n, k = 1024, 4096, 4096
    a, a_s, bs = g.device_operands(m, n, k, 1)
    pat = re.compile(r"(serializ|spill|registers|Potential Performance Loss|warning)", re.IGNORECASE)
    for name, cfg in (("w2m_k256", TWO_BLOCK["w2m_k256"]), ("w1n_tn32_k256", TWO_BLOCK["w1n_tn32_k256"])):
        for early in (False, True):
            row = {"kind": "ptxas", "layout": name, "config": cfg.short(), "early": early}
            os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
            try:
                f = block_fn(cfg, early)
                def once(f=f, early=early):
                    return np.asarray(run(f, early, a, bs[0][0], a_s, bs[0][1])[:1, :1])

                _, text = g._capture_fds(once)
                (out_dir / f"ptxas_promote_{name}_{int(early)}.txt").write_text(text)
                lines = [ln.strip() for ln in text.splitlines() if pat.search(ln)]
                row.update(report=lines[:20], serialized=any("serializ" in ln.lower() for ln in lines))
            except Exception as e:  # noqa: BLE001
                row.update(error=f"{type(e).__name__}: {e}"[:1500])
            finally:
                os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
            rows.append(row)
            print(json.dumps(row)[:900], flush=True)


def phase_check(rows):
    rng = np.random.default_rng(7)
    for name, cfg in TWO_BLOCK.items():
        for m, n, k, od, has_bias in CHECK_CASES:
            row = {"kind": "check", "layout": name, "config": cfg.short(), "M": m, "N": n, "K": k, "out": od}
            try:
                a, b, a_s, b_s, bias = g.host_operands(rng, m, n, k, bias=has_bias)
                ref = g.reference64(a, b, a_s, b_s, bias)
                out_dtype = jnp.dtype(od)
                f = block_fn(cfg, True, out_dtype)
                args = (jnp.asarray(a), jnp.asarray(b), jnp.asarray(a_s), jnp.asarray(b_s))
                kw = {"bias": jnp.asarray(bias)} if has_bias else {}
                out = g.poisoned_call(lambda *x: run(f, True, *x, **kw), args, (m, n), out_dtype)
                err = float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))
                ok = bool(np.isfinite(out).all() and err <= g.tol(out_dtype))
                row.update(rel_err=err, tol=g.tol(out_dtype), ok=ok)
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:1500])
            rows.append(row)
            print(json.dumps(row)[:600], flush=True)


def phase_time(rows, budget_s, t0):
    for m, n, k in TIME_CASES:
        if time.time() - t0 > budget_s:
            rows.append({"kind": "skipped", "M": m, "N": n, "K": k})
            continue
        copies = g.bench.n_copies(n, k)
        a, a_s, bs = g.device_operands(m, n, k, copies)
        sets = [(a, b, a_s, b_s) for b, b_s in bs]
        chan = g.channel_sets(a, a_s, bs, n)
        default = bmm.default_config(m, n, k)
        two = bmm._fit_smem(TWO_BLOCK["w2m_k256"], jnp.dtype(jnp.bfloat16))
        sides = {"default": (default, False), "k256_off": (two, False), "k256_early": (two, True)}
        if default.tile_k == 2 * bmm.BLOCK and default != two:
            sides["default_early"] = (default, True)
        fns = {s: block_fn(c, e) for s, (c, e) in sides.items()}
        ref = g.ref_block_f32(a, bs[0][0], a_s, bs[0][1])
        row = {"kind": "time", "M": m, "N": n, "K": k, "copies": copies}
        row.update({f"{s}_cfg": c.short() for s, (c, _) in sides.items()})
        pc = g.per_channel_fn()
        try:
            for s, (_c, e) in sides.items():
                row[f"{s}_rel_err"] = g.rel(run(fns[s], e, *sets[0]), ref)
            for _rep in range(2):
                for s, (_c, e) in sides.items():
                    bmm._EARLY_PROMOTE = e
                    try:
                        row.setdefault(f"{s}_us", []).append(g.measure_us(fns[s], sets))
                    finally:
                        bmm._EARLY_PROMOTE = False
                row.setdefault("per_channel_us", []).append(g.measure_us(pc, chan))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:1500]
        rows.append(row)
        print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="ptxas,check,time")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting time cases after this many seconds")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[dict] = []
    res = {"device": str(jax.devices()[0].device_kind), "command": " ".join(sys.argv), "rows": rows}
    phases = args.phases.split(",")
    for name, fn in (
        ("ptxas", lambda: phase_ptxas(rows, out_dir)),
        ("check", lambda: phase_check(rows)),
        ("time", lambda: phase_time(rows, args.budget_s, t0)),
    ):
        if name in phases:
            fn()
            (out_dir / "ab_block_promote.json").write_text(json.dumps(res, indent=1))
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
