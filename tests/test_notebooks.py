"""The notebooks: committed stripped and in sync with their jupytext .py, and each runs top to bottom on the CPU.

Execution uses nbclient with a kernel spec written to a temporary folder that runs *this* interpreter
(``sys.executable -m ipykernel_launcher``), so it works in a fresh venv without registering a kernel and
never picks up another Python's ``python3`` kernel. Each notebook has a wall-clock limit
(``QLIN_NOTEBOOK_TIME_LIMIT`` seconds, default 150).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from qlin.testing import load_script

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
EXPECTED = ["01_quantization_error", "02_kernels_and_selection", "03_performance"]
TIME_LIMIT_S = float(os.environ.get("QLIN_NOTEBOOK_TIME_LIMIT", "150"))
KERNEL_NAME = "qlin-notebook-test"


def _sync_module():
    return load_script("notebooks/sync.py", "qlin_notebook_sync")


def test_every_notebook_is_paired():
    sync = _sync_module()
    assert [p.stem for p in sync.notebook_sources()] == EXPECTED
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_is_stripped_and_in_sync(name):
    sync = _sync_module()
    assert sync.problems(NB_DIR / f"{name}.py") == []


def test_sync_check_detects_stale_outputs(tmp_path, monkeypatch):
    sync = _sync_module()
    src = NB_DIR / "02_kernels_and_selection.py"
    py = tmp_path / src.name
    py.write_text(src.read_text())
    nb = sync.build(py)
    (tmp_path / "02_kernels_and_selection.ipynb").write_text(sync.render(nb))
    assert sync.problems(py) == []
    code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells[code].outputs = [nbformat.v4.new_output("stream", name="stdout", text="stale\n")]
    nb.cells[code].execution_count = 1
    (tmp_path / "02_kernels_and_selection.ipynb").write_text(sync.render(nb))
    assert any(f"cell {code} has outputs" in p for p in sync.problems(py))
    py.write_text(src.read_text() + "\n# %%\nprint('new cell')\n")
    assert any("cells differ" in p for p in sync.problems(py))


# -- execution ---------------------------------------------------------------------------------------

@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, found first through JUPYTER_PATH; qlin importable from the checkout."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qlin tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.delenv("QLIN_BENCH_RESULTS", raising=False)
    monkeypatch.delenv("QLIN_DISABLED_KERNELS", raising=False)
    monkeypatch.delenv("QLIN_KERNEL", raising=False)
    return tmp_path


def _execute(name: str) -> tuple[nbformat.NotebookNode, float]:
    from nbclient import NotebookClient

    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=int(TIME_LIMIT_S), kernel_name=KERNEL_NAME,
                            resources={"metadata": {"path": str(NB_DIR)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    return nb, time.perf_counter() - t0


def _text(nb) -> str:
    """All text outputs. A stream may arrive in several chunks (one ``print`` split mid-line under load:
    "choose_kernel ->" and " my_fp8_per_channel" as two outputs), so consecutive stream chunks are
    joined as written; other outputs go on lines of their own."""
    parts, prev_stream = [], False
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                if prev_stream:
                    parts[-1] += o.text
                else:
                    parts.append(o.text)
                prev_stream = True
                continue
            prev_stream = False
            if "data" in o:
                parts.append(o.data.get("text/markdown", "") or o.data.get("text/plain", ""))
        prev_stream = False
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _fixture_results(folder: Path) -> None:
    """A small results file in the benchmark's schema (test data, labelled as such)."""
    rows = []
    for n, k in ((4096, 4096), (14336, 4096)):
        for m in (1, 16, 256, 4096):
            for impl, dtype, eff in (("qlin:mosaic_gpu", "fp8", 0.7), ("xla", "fp8", 0.6), ("xla", "int8", 0.5),
                                     ("qlin:mosaic_gpu", "int8", 0.65), ("xla", "bf16", 0.6), ("torch", "fp8", 0.55)):
                bound_us = max(2 * m * n * k / 1979e12 * (2 if dtype == "bf16" else 1),
                               (m * k + n * k) * (2 if dtype == "bf16" else 1) / 3.35e12) * 1e6
                us = bound_us / eff
                rows.append({"impl": impl, "dtype": dtype, "M": m, "N": n, "K": k, "us": us,
                             "tflops": 2 * m * n * k / us / 1e6, "rel_err": 0.002})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fixture.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3 (test fixture)", "rows": rows}))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_on_cpu(name, kernel_env):
    nb, elapsed = _execute(name)
    assert elapsed < TIME_LIMIT_S, f"{name} took {elapsed:.0f} s (limit {TIME_LIMIT_S:.0f} s)"
    text = _text(nb)
    assert "Traceback" not in text
    if name == "01_quantization_error":
        assert _images(nb) >= 6
        assert "QUANT_RTOL" in text
    elif name == "02_kernels_and_selection":
        # The whole output on failure (pytest truncates long strings).
        assert "choose_kernel -> my_fp8_per_channel" in text, text
        assert "kernel used by qlin.linear: my_fp8_per_channel" in text, text
        assert "disabled by QLIN_DISABLED_KERNELS" in text
        assert "dot_general" in text
    else:
        assert _images(nb) >= 2
        assert "Shared memory" in text or "operands KiB" in text


@pytest.mark.slow
def test_performance_notebook_other_results_branch(kernel_env, monkeypatch):
    """Run 03 on the branch the committed checkout does not take: with results if none are committed
    (a small fixture file), without any if they are (an empty folder)."""
    from qlin import viz

    committed = viz.load_benchmark_results(ROOT / "benchmarks" / "results")
    folder = kernel_env / "results"
    if committed:
        folder.mkdir()
    else:
        _fixture_results(folder)
    monkeypatch.setenv("QLIN_BENCH_RESULTS", str(folder))
    nb, elapsed = _execute("03_performance")
    assert elapsed < TIME_LIMIT_S
    text = _text(nb)
    if committed:
        assert "No GPU benchmark results are committed yet" in text
        assert "qlin:xla" in text  # the live CPU fallback ran
    else:
        assert "fixture.json" in text and "H100 SXM" in text
        assert "geomean" in text
        assert _images(nb) >= 4  # fp8 and int8 grids, roofline, smem budget, tile schedule
