"""GPU check of the notebooks' live path (run on the GPU machine; the CPU tests cover the rest).

    PYTHONPATH=. python3 notebooks/gpu_live_check.py [--quick] [--no-notebooks]

1. Times a small grid with :func:`qlin.viz.live_benchmark` (what notebook 03's "live run" does on a GPU):
   qlin's chosen kernel and XLA-native for fp8 and int8 (per-token x per-channel, bf16 out) and bf16 XLA;
   writes the rows (benchmark schema) to ``$OUT/notebook_live.json`` and prints a table. Exit code 1 if
   a row's error exceeds the scheme's ``QUANT_RTOL`` or no GPU is visible.
2. If nbclient, ipykernel and matplotlib are installed there, executes the three notebooks on the GPU and
   writes the executed copies (with outputs) and their run times to ``$OUT``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

from qlin import viz
from qlin.platform import describe_device
from qlin.tolerances import KERNEL_RTOL, QUANT_RTOL

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "."))
LIMITS = {"fp8": QUANT_RTOL["fp8-e4m3fn"], "int8": QUANT_RTOL["int8"], "bf16": KERNEL_RTOL["bfloat16"]}


def live(quick: bool) -> int:
    ms = [1, 16, 128, 1024] if quick else [1, 16, 128, 1024, 4096]
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (14336, 4096)]
    t0 = time.perf_counter()
    rows = viz.live_benchmark(ms, shapes, iters=20)
    took = time.perf_counter() - t0
    (OUT / "notebook_live.json").write_text(json.dumps({"device": describe_device(), "rows": rows}, indent=1))
    print(viz.format_table(rows, ["impl", "dtype", "M", "N", "K", "us", "tflops", "rel_err"]))
    print(f"live grid: {len(rows)} rows in {took:.1f} s on {describe_device()}")
    bad = [r for r in rows if not r["rel_err"] < LIMITS[r["dtype"]]]
    for r in bad:
        print(f"FAIL rel_err {r['rel_err']:.3g} > {LIMITS[r['dtype']]} for {r['impl']} {r['dtype']} "
              f"M={r['M']} N={r['N']} K={r['K']}")
    for s in ("qlin:",):
        sp = viz.speedups(rows, s, "xla")
        if sp:
            print(f"qlin vs xla (wall clock): geomean {viz.geomean(d['speedup'] for d in sp):.3f}, "
                  f"min {min(d['speedup'] for d in sp):.3f}")
    return 1 if bad else 0


def notebooks() -> int:
    try:
        import ipykernel  # noqa: F401
        import matplotlib  # noqa: F401
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        print(f"notebooks: skipped ({e.name} is not installed here)")
        return 0
    failures = 0
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / "qlin-gpu-check"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "qlin", "language": "python"}))
        os.environ["JUPYTER_PATH"] = tmp
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        for ipynb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            nb = nbformat.read(ipynb, as_version=4)
            t0 = time.perf_counter()
            try:
                NotebookClient(nb, timeout=300, kernel_name="qlin-gpu-check",
                               resources={"metadata": {"path": str(ipynb.parent)}}).execute()
                status = "ok"
            except Exception as e:  # noqa: BLE001 - reported, and the exit code says so
                status = f"FAIL {type(e).__name__}: {str(e)[-2000:]}"
                failures += 1
            times[ipynb.stem] = {"seconds": round(time.perf_counter() - t0, 1), "status": status}
            nbformat.write(nb, OUT / f"{ipynb.stem}.executed.ipynb")
            print(f"notebook {ipynb.stem}: {times[ipynb.stem]['seconds']} s, {status}")
    (OUT / "notebook_times.json").write_text(json.dumps(times, indent=1))
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if jax.default_backend() != "gpu":
        print(f"no GPU visible (backend {jax.default_backend()}): this check is for the GPU machine")
        return 1
    rc = live("--quick" in argv)
    if "--no-notebooks" not in argv:
        rc |= notebooks()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
