"""Block-scaled FP8 on the whole Llama-3 grid: tables from ``gpu_block_check.py --phases time`` runs.

The time phase of one call covers ~30 cases, so the 80-case grid takes several calls
(``--shapes grid --m ...``); this merges their ``time`` rows (a later file wins for a case timed
twice; a file's case whose block kernel ran another config than today's heuristic is left out of
that file, ``--keep-stale`` keeps it) and writes one markdown file with, per (N, K) row and M column:

* block / per-channel: qlin's per-channel fp8 kernel time / the block kernel's (issue 8's target:
  >= 0.85 at M >= 1024), the same for ``fast_accum=True``;
* block vs the XLA dequantize path: its time / the block kernel's (target: > 1 at every shape).

    python3 benchmarks/block_grid_table.py benchmarks/results/h100_block_grid_{a,b,c,d}.json \\
        --out benchmarks/results/h100_block_grid.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlin.bench import LLAMA3_SHAPES  # noqa: E402
from qlin.viz import geomean  # noqa: E402

BLOCK, FAST = "qlin:mosaic_gpu_block", "qlin:mosaic_gpu_block:fast_accum"
CHANNEL, DEQUANT = "qlin:mosaic_gpu", "xla:dequant_bf16"


def current_default(m: int, n: int, k: int) -> str:
    """The short name of the block kernel's heuristic config today (132 SMs when no GPU is present)."""
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    return bmm.default_config(m, n, k).short()


def load(paths: list[Path], keep_stale: bool = False) -> tuple[dict[tuple, dict], set[str], list[str]]:
    """{(M, N, K): {impl: us}} over the ``time`` rows of ``paths`` (later files win), the devices, and
    notes on the cases left out: unless ``keep_stale``, a file's case whose block row ran a config
    other than today's heuristic (an older or interim heuristic) is left out of that file, so a table
    merged across sessions shows what the code does now."""
    cases: dict[tuple, dict] = {}
    devices = set()
    dropped = []
    for p in paths:
        data = json.loads(p.read_text())
        devices.add(data.get("device", "?"))
        rows = [r for r in data.get("rows", []) if r.get("kind") == "time" and r.get("us")]
        stale = set()
        for r in rows:
            if keep_stale or r["impl"] != BLOCK or not r.get("config"):
                continue
            key = (r["M"], r["N"], r["K"])
            today = current_default(*key)
            if r["config"] != today:
                stale.add(key)
                dropped.append(f"{p.name}: {key[0]} x {key[1]} x {key[2]} ran {r['config']} (today: {today})")
        for r in rows:
            if (r["M"], r["N"], r["K"]) not in stale:
                cases.setdefault((r["M"], r["N"], r["K"]), {})[r["impl"]] = r["us"]
    return cases, devices, dropped


def ratio(case: dict, num: str, den: str) -> float | None:
    return case[num] / case[den] if num in case and den in case else None


def table(cases: dict, num: str, den: str, title: str) -> list[str]:
    ms = sorted({m for m, _, _ in cases})
    shapes = [s for s in LLAMA3_SHAPES if any((m, *s) in cases for m in ms)]  # the grid order first
    shapes += sorted({(n, k) for _, n, k in cases} - set(shapes))
    out = [f"**{title}**", "", "| N x K | " + " | ".join(f"M={m}" for m in ms) + " |", "|---" * (len(ms) + 1) + "|"]
    for n, k in shapes:
        cells = []
        for m in ms:
            v = ratio(cases.get((m, n, k), {}), num, den)
            cells.append("-" if v is None else f"{v:.2f}")
        out.append(f"| {n} x {k} | " + " | ".join(cells) + " |")
    return out + [""]


def summary(cases: dict) -> list[str]:
    big = [ratio(c, CHANNEL, BLOCK) for (m, _, _), c in cases.items() if m >= 1024]
    big = [v for v in big if v is not None]
    # the whole grid's time at M >= 1024 (large shapes weigh more than in the per-cell geomean)
    both = [c for (m, _, _), c in cases.items() if m >= 1024 and BLOCK in c and CHANNEL in c]
    fast = [ratio(c, CHANNEL, FAST) for (m, _, _), c in cases.items() if m >= 1024]
    fast = [v for v in fast if v is not None]
    deq = [v for v in (ratio(c, DEQUANT, BLOCK) for c in cases.values()) if v is not None]
    lines = [f"- cases timed: {len(cases)}"]
    if big:
        lines.append(
            f"- M >= 1024, block / per-channel: min {min(big):.2f}, geomean {geomean(big):.3f}, >= 0.85 at "
            f"{sum(v >= 0.85 for v in big)}/{len(big)} (target >= 0.85)"
        )
        lines.append(
            f"- M >= 1024, the cells' total per-channel time / total block time: "
            f"{sum(c[CHANNEL] for c in both) / sum(c[BLOCK] for c in both):.3f}"
        )
    if fast:
        lines.append(
            f"- M >= 1024, fast_accum / per-channel: min {min(fast):.2f}, geomean {geomean(fast):.3f}, >= 0.85 at "
            f"{sum(v >= 0.85 for v in fast)}/{len(fast)}"
        )
    if deq:
        lines.append(
            f"- block faster than the XLA dequantize path at {sum(v > 1 for v in deq)}/{len(deq)} cases "
            f"({min(deq):.2f}x to {max(deq):.2f}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="gpu_block_check.py JSON files, oldest first")
    p.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    p.add_argument(
        "--keep-stale", action="store_true", help="keep cases whose block row ran a config other than today's default"
    )
    args = p.parse_args(argv)
    cases, devices, dropped = load(args.inputs, args.keep_stale)
    if not cases:
        p.error("no time rows in the inputs (run gpu_block_check.py with --phases time)")
    if len(devices) > 1:
        p.error(f"rows from several devices {sorted(devices)}: ratios only compare within one machine's runs")
    lines = [
        f"# Block-scaled FP8 on the Llama-3 grid: {devices.pop()}",
        "",
        "From " + ", ".join(f"`{p.name}`" for p in args.inputs) + " (`gpu_block_check.py --phases time`: CUPTI "
        "medians of 20 warm runs, weight copies rotated; per-channel = qlin's per-channel fp8 kernel on the same "
        "fp8 data; ratios are time ratios, > 1: the block kernel is faster).",
        "",
        *summary(cases),
        "",
        *(
            ["Left out (the block kernel ran a config other than today's heuristic; an earlier file's row stands):", ""]
            + [f"- {d}" for d in dropped]
            + [""]
            if dropped
            else []
        ),
        *table(cases, CHANNEL, BLOCK, "block (default tiles) speed / per-channel speed (target >= 0.85 at M >= 1024)"),
        *table(cases, CHANNEL, FAST, "block with fast_accum=True speed / per-channel speed"),
        *table(cases, DEQUANT, BLOCK, "block speed / XLA dequantize-to-bf16 path speed (target > 1)"),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
