"""The GPU check script's checks, run on the CPU so the script the GPU run relies on cannot rot."""

import importlib.util
import pathlib

import pytest

torch = pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bridge_check.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_bridge_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zero_copy_check_on_cpu(script):
    res = script.zero_copy("cpu")
    assert res["all_zero_copy"], res["rows"]
    assert {r["dtype"] for r in res["rows"]} == {str(d).removeprefix("torch.") for d in script.DTYPES}
    assert "LayoutError" in res["unaligned_view"]["offset_view"]


def test_overhead_rows_compare_the_same_kernel(script):
    rows = script.overhead("cpu", [(8, 64, 128)], reps=2)
    assert len(rows) == 2
    for r in rows:
        assert r["max_abs_diff_vs_jax"] == 0.0  # bridge and JAX ran the same kernel on the same arrays
        assert r["bridge_us"] > 0 and r["jax_us"] > 0
    bench = script.bench_rows([(8, 64, 128)], reps=2, device="cpu")
    assert {r["impl"] for r in bench} == {"qlin:torch_bridge", "qlin:jax_same_kernel"}
