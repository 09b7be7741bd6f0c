"""The GPU check script's checks, run on the CPU so the script the GPU run relies on cannot rot."""

import json
import sys

import pytest

from qlin.testing import load_script

torch = pytest.importorskip("torch")

@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/gpu_bridge_check.py")


def test_zero_copy_check_on_cpu(script):
    res = script.zero_copy("cpu")
    assert res["all_zero_copy"], res["rows"]
    assert {r["dtype"] for r in res["rows"]} == {str(d).removeprefix("torch.") for d in script.DTYPES}
    assert "LayoutError" in res["unaligned_view"]["offset_view"]


def test_the_gpu_run_covers_the_requested_shapes(script):
    assert sorted({m for m, _, _ in script.SHAPES}) == [1, 16, 256, 1024, 4096]
    assert {(n, k) for _, n, k in script.SHAPES} == {(14336, 4096), (4096, 4096)}


def test_overhead_rows_compare_the_same_kernel(script):
    rows = script.overhead("cpu", [(8, 64, 128)], reps=2)
    assert [r["config"][:4] for r in rows] == ["fp8-", "int8"]
    for r in rows:
        assert r["max_abs_diff_vs_jax"] == 0.0  # bridge and JAX ran the same kernel on the same arrays
        assert r["bridge_us"] > 0 and r["jax_us"] > 0
        steps = r["host_steps_us"]
        assert steps["fast_paths"] is True  # the steps timed are the ones the layer's hot path takes
        for name in ("check", "import", "jit", "export", "export_ready"):
            assert steps[name] > 0, name
        assert steps["total"] == pytest.approx(steps["check"] + steps["import"] + steps["jit"] + steps["export"],
                                               abs=0.05)
    bench = script.bench_rows([(8, 64, 128)], reps=2, device="cpu")
    assert {r["impl"] for r in bench} == {"qlin:torch_bridge", "qlin:jax_same_kernel"}


def test_a_failing_case_is_recorded_and_the_rest_run(script):
    rows = script.overhead("cpu", [(4, 64, 128)], reps=2, kernel="no_such_kernel")
    assert len(rows) == 2 and all("error" in r and "no_such_kernel" in r["error"] for r in rows)
    summary = script.summarize({"zero_copy": {"all_zero_copy": True, "fp8_native_dlpack": {}}, "overhead": rows})
    assert summary["rows_failed"] == 2 and summary["overhead_target_met"] == {}


def test_host_breakdown_runs_on_cpu(script):
    res = script.breakdown("cpu", reps=3, m=4, n=64, k=128)
    assert res["shape"] == [4, 64, 128]
    for name in ("check", "t2j_import_hot", "j2t_export_hot_ready", "jit_call", "bridge_call", "apply_weights"):
        assert res[name] > 0, name


def test_main_dry_run_writes_a_complete_json(script, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(script, "CPU_SHAPES", [(2, 64, 128)])
    monkeypatch.setattr(sys, "argv", ["gpu_bridge_check.py", "--cpu", "--reps", "2"])
    monkeypatch.setenv("OUT", str(tmp_path))
    assert script.main() == 0
    res = json.loads((tmp_path / "cpu_bridge_check.json").read_text())
    assert [r["M"] for r in res["overhead"]] == [2, 2]
    s = res["summary"]
    assert set(s["extra_host_us"]) == set(s["export_waits_us"]) == {"fp8 2x64x128", "int8 2x64x128"}
    assert s["rows_failed"] == 0 and s["zero_copy_all_dtypes"] is True
    out = capsys.readouterr().out
    assert "fp8      2     64   128 |" in out
