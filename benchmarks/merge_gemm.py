"""Merge GEMM benchmark runs (``qlin bench`` JSON files) into one grid table.

A full grid does not fit one device call (XLA's compile-time autotuning of its own GEMMs dominates),
so the grid is measured in several runs. Later files win for a case measured twice (a re-run after a
heuristic change replaces the old rows); skipped rows never replace measured ones; the dynamic
linear's ``+quant`` rows are left out (GEMM rows only; ``--dynamic`` merges only those). Writes
``<out>/<tag>.{json,md,png}`` and prints the issue-5 targets:

    python3 benchmarks/merge_gemm.py benchmarks/results/h100_gemm_grid.json \\
        benchmarks/results/h100_gemm_mid.json ... --tag h100_gemm_merged

Rows from different devices are refused (ratios are only meaningful within one machine's runs).
``--current-heuristic`` leaves out every case (all its rows, baselines included) of a file whose qlin row ran
another tile config than today's heuristic picks, so the merged grid times today's configs: after a heuristic
change, the re-run cases replace the old rows and a re-run of a variant the heuristic then dropped again is not
taken either.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlin import bench  # noqa: E402

KEY = ("impl", "dtype", "M", "N", "K")
#: Rows ``annotate`` recomputes over the merged set (peak and ratios depend on every row).
DERIVED = ("ratio_vs_xla", "frac_of_peak", "weight_floor_us", "x_floor")


def stale_cases(rows: list[dict]) -> set[tuple[int, int, int]]:
    """(M, N, K) of the cases whose qlin GEMM row ran another config than today's heuristic (bf16 out)."""
    import jax.numpy as jnp

    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    stale = set()
    for r in rows:
        if r.get("impl") != "qlin:mosaic_gpu" or not r.get("config"):
            continue
        dt = jnp.float8_e4m3fn if r["dtype"] == "fp8" else jnp.int8
        m, n, k = r["M"], r["N"], r["K"]
        if bench.qlin_label(mm.default_config(m, n, k, dt), dt, m, k, n) != r["config"]:
            stale.add((m, n, k))
    return stale


def merge(paths: list[Path], dynamic: bool = False, current_heuristic: bool = False) -> tuple[list[dict], dict]:
    rows: dict[tuple, dict] = {}
    devices, copy_gbs, sources = set(), [], []
    for p in paths:
        data = json.loads(p.read_text())
        meta = data.get("meta", {})
        if meta.get("copy_gbs"):
            copy_gbs.append(meta["copy_gbs"])
        stale = stale_cases(data["rows"]) if current_heuristic else set()
        n_new = 0
        for r in data["rows"]:
            if str(r.get("impl", "")).endswith("+quant") != dynamic:
                continue  # GEMM rows, or with --dynamic the dynamic linear's (quantize + matmul) only
            if (r.get("M"), r.get("N"), r.get("K")) in stale:
                continue
            r = {k: v for k, v in r.items() if k not in DERIVED}
            if r.get("device"):
                devices.add(r["device"])
            key = tuple(r.get(k) for k in KEY)
            old = rows.get(key)
            if r.get("skipped") and old is not None and not old.get("skipped"):
                continue
            r["source"] = p.name
            rows[key] = r
            n_new += 1
        source = {"file": p.name, "rows": n_new, "argv": meta.get("argv")}
        if stale:
            source["left_out_stale"] = [f"{m}x{n}x{k}" for m, n, k in sorted(stale)]
        sources.append(source)
    if len(devices) > 1:
        raise SystemExit(f"rows from several devices: {sorted(devices)}; merge one machine's runs only")
    merged = sorted(rows.values(), key=lambda r: (r["N"], r["K"], r["M"], r["impl"], r["dtype"]))
    meta = {
        "sources": sources,
        "device": next(iter(devices), None),
        # the copy bandwidth of the decode floor: the median over the runs
        "copy_gbs": sorted(copy_gbs)[len(copy_gbs) // 2] if copy_gbs else None,
    }
    return merged, meta


def targets(rows: list[dict], impl: str = "qlin:mosaic_gpu") -> dict:
    """Issue 5's targets per dtype over the measured cases (rows must be annotated)."""
    out = {}
    for dtype in ("fp8", "int8"):
        mine = [r for r in rows if r["impl"] == impl and r["dtype"] == dtype and r.get("us")]
        ratios = [r["ratio_vs_xla"] for r in mine if r.get("ratio_vs_xla")]
        big = [r["tflops"] for r in mine if r["M"] >= 4096]
        floor = [r["x_floor"] for r in mine if r.get("x_floor")]
        losses = sorted((r["ratio_vs_xla"], f"{r['M']}x{r['N']}x{r['K']}") for r in mine
                        if r.get("ratio_vs_xla") and r["ratio_vs_xla"] < 1.0)
        out[dtype] = {
            "cases": len(mine),
            "geomean_vs_xla": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
            "at_least_xla": f"{sum(v >= 1.0 for v in ratios)}/{len(ratios)}",
            "losses": [f"{c} {v:.2f}x" for v, c in losses],
            "min_tflops_m_ge_4096": min(big) if big else None,
            "decode_x_floor": [round(v, 2) for v in sorted(floor)],
            "decode_within_1_15": f"{sum(v <= 1.15 for v in floor)}/{len(floor)}",
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path, help="qlin bench JSON files, oldest first")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="gemm_merged")
    p.add_argument(
        "--dynamic", action="store_true",
        help="merge the dynamic linear's rows (qlin:mosaic_gpu+quant vs xla+quant) instead of the GEMM rows",
    )  # fmt: skip
    p.add_argument(
        "--current-heuristic", action="store_true",
        help="leave out a file's cases whose qlin row ran another config than today's heuristic picks",
    )  # fmt: skip
    args = p.parse_args(argv)
    rows, meta = merge(args.inputs, dynamic=args.dynamic, current_heuristic=args.current_heuristic)
    table = bench.markdown_table(rows, copy_gbs=meta["copy_gbs"])  # annotates the merged rows
    meta["targets"] = targets(rows, impl="qlin:mosaic_gpu+quant" if args.dynamic else "qlin:mosaic_gpu")
    path = bench.write_results(args.out, args.tag, rows, meta)
    (args.out / f"{args.tag}.md").write_text(table + "\n")
    bench.plot(rows, args.out / f"{args.tag}.png")
    print(table)
    print(json.dumps(meta["targets"], indent=1))
    print(f"wrote {path} (+ .md, .png): {len(rows)} rows from {len(args.inputs)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
