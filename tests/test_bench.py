"""qlin.bench (the GEMM benchmark behind `qlin bench` / benchmarks/bench_gemm.py), on the CPU.

The GPU timing (CUPTI) cannot run here: the pipeline runs with a fake timer that checks what it is
handed, and the Mosaic GPU kernels in interpret mode.  Everything else is real: the plan, the
ahead-of-time compiles on worker threads, the device lock, the sampled-row rel_err against the
f32 reference, the dynamic-linear rows, the JSON / markdown / plot outputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlin import bench, viz
from qlin.testing import load_script
from qlin.tolerances import kernel_rtol, quant_rtol

FAKE_MS = [0.010, 0.030, 0.020]  # median 0.020 ms = 20 us per iteration


def fake_timer(calls):
    def timer(fn, args, iterations):
        assert isinstance(fn, (jax.stages.Compiled, jax.stages.Wrapped))
        calls.append((fn, args, iterations))
        return (FAKE_MS * iterations)[:iterations] if iterations >= 3 else FAKE_MS

    return timer


# -- plan ------------------------------------------------------------------------------------------


def test_plan_cases_order_tiers_and_coverage():
    cases = bench.plan_cases(bench.LLAMA3_SHAPES, bench.M_GRID)
    assert len(cases) == len(set(cases)) == 80
    assert {(n, k) for n, k, _ in cases} == set(bench.LLAMA3_SHAPES)
    first = bench.M_PRIORITY[: bench.FIRST_TIER]
    # tier 1: every shape with the first-priority Ms, shape by shape, M inside in priority order
    assert cases[:40] == [(n, k, m) for n, k in bench.LLAMA3_SHAPES for m in first]
    assert {m for _, _, m in cases[40:]} == set(bench.M_GRID) - set(first)
    # within each shape visit the Ms follow the priority list
    assert [m for n, k, m in cases[40:50] if (n, k) == bench.LLAMA3_SHAPES[0]] == bench.M_PRIORITY[5:]
    # Ms off the priority list go last, ascending; duplicates are dropped
    assert bench.order_ms([3000, 16, 5, 16, 1]) == [16, 1, 5, 3000]
    assert bench.plan_cases([(8, 8), (8, 8)], [2, 1], first_tier=1) == [(8, 8, 1), (8, 8, 2)]


def test_sample_rows_bands_and_prefix():
    rows = bench.sample_rows(bench.M_GRID, per_band=64)
    assert np.all(np.diff(rows) > 0) and rows[0] == 0 and rows[-1] == 8191
    assert len(rows) == 64 + 7 * 64  # [0, 64) in full, then 64 per band [64,128) ... [4096, 8192)
    for lo, hi in zip(bench.M_GRID[:-1], bench.M_GRID[1:]):
        band = rows[(rows >= lo) & (rows < hi)]
        assert len(band) == min(hi - lo, 64) and band[-1] == hi - 1
    # case M checks rows[rows < M]: every row up to M = 64
    for m in (1, 16, 64):
        assert list(rows[: np.searchsorted(rows, m)]) == list(range(m))
    assert list(bench.sample_rows([8, 3])) == list(range(8))


def test_torch_int8_small_m_is_a_skip_not_an_error():
    assert bench.torch_skip_reason("int8", 16) == bench.TORCH_INT8_SKIP == "torch._int_mm needs M > 16"
    assert bench.torch_skip_reason("int8", 17) is None and bench.torch_skip_reason("fp8", 1) is None


# -- device lock -----------------------------------------------------------------------------------


def test_device_lock_is_exclusive_and_serves_main_then_workers_in_job_order():
    lock = bench.DeviceLock()
    order, inside = [], []

    def worker(prio):
        with lock.hold(prio):
            inside.append(1)
            assert len(inside) == 1  # nobody else holds it
            order.append(prio)
            time.sleep(0.01)
            inside.pop()

    with lock.hold():  # the main thread holds it: workers queue up
        threads = [threading.Thread(target=worker, args=(p,)) for p in (5, 3, 4)]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(lock._waiting) < 3 and time.time() < deadline:
            time.sleep(0.005)
        assert len(lock._waiting) == 3 and order == []
    for t in threads:
        t.join(10)
    assert order == [3, 4, 5]
    assert lock.held_s["main"] > 0 and lock.held_s["worker"] >= 0.03


def test_needs_device_only_for_programs_with_dots():
    S = jax.ShapeDtypeStruct
    dot = jax.jit(bench._xla_one("int8")).lower(*bench._specs_gemm(16, 128, 256, "int8", 1)[0][0])
    ew = jax.jit(lambda x: x * 2).lower(S((4, 4), jnp.float32))
    assert bench.needs_device(dot) and not bench.needs_device(ew)
    # the Mosaic GPU kernel (cross-lowered for CUDA) is a custom call: it compiles without the lock
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    cfg = mm.default_config(16, 4096, 4096, jnp.float8_e4m3fn, jnp.bfloat16)
    specs = bench._specs_gemm(16, 4096, 4096, "fp8", 2)
    low = jax.jit(bench.many(bench._qlin_one(cfg))).trace(*specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in low.as_text() and not bench.needs_device(low)


def test_compiler_locks_only_autotuned_dots_and_waits_for_the_main_thread():
    S = jax.ShapeDtypeStruct
    lock = bench.DeviceLock()
    c = bench.Compiler(lock, 2)
    bf = jnp.bfloat16
    try:
        with lock.hold():  # the main thread is "timing": a dot program cannot compile meanwhile
            c.submit("dot", lambda _: (bench._xla_one("bf16"), (S((8, 16), bf), S((4, 16), bf)), {}))
            ref_specs = (S((8, 16), jnp.float32), S((4, 16), jnp.int8), S((8, 1), jnp.float32), S((1, 4), jnp.float32))
            c.submit("ref", lambda _: (bench._ref_rows, ref_specs, {"_no_autotune": True}))
            ref = c.get("ref")  # the reference compiles without autotuning: no lock needed
            time.sleep(0.2)
            assert not c.jobs["dot"].done()
        dot = c.get("dot")
        assert dot.locked and not ref.locked and ref.info == {}
        x = jnp.ones((8, 16), bf)
        np.testing.assert_array_equal(np.asarray(dot.exe(x, jnp.ones((4, 16), bf)), np.float32), 16.0)
    finally:
        c.shutdown()


# -- rows, summary, reports ------------------------------------------------------------------------


def _row(impl, dtype, m, us, n=4096, k=4096, **kw):
    return bench.make_row(impl, dtype, m, n, k, us, 1e-3 if us else None, "gpu:NVIDIA H100 80GB HBM3", **kw)


def synthetic_rows():
    rows = []
    for m, (q, x, t) in {16: (9.0, 10.0, 40.0), 4096: (100.0, 130.0, 115.0), 128: (12.0, 11.0, 41.0)}.items():
        rows += [_row("qlin:mosaic_gpu", "fp8", m, q, config="m64n32k256s8w1"), _row("xla", "fp8", m, x)]
        rows += [_row("torch", "fp8", m, t), _row("xla", "bf16", m, 2 * x)]
        rows += [_row("qlin:mosaic_gpu", "int8", m, q * 0.9), _row("xla", "int8", m, x)]
        rows += [_row("qlin:mosaic_gpu+quant", "fp8", m, q + 2), _row("xla+quant", "fp8", m, x + 5)]
    rows.append(_row("torch", "int8", 16, None, skipped=bench.TORCH_INT8_SKIP))
    rows.append(_row("torch", "int8", 128, None, error="RuntimeError: boom"))
    rows.append(_row("torch", "int8", 4096, 300.0))
    return rows


def test_annotate_ratio_peak_and_floor():
    rows = synthetic_rows()
    peak = bench.annotate(rows, copy_gbs=3000.0)
    by = {(r["impl"], r["dtype"], r["M"]): r for r in rows}
    assert by[("qlin:mosaic_gpu", "fp8", 16)]["ratio_vs_xla"] == pytest.approx(10.0 / 9.0)
    assert by[("torch", "fp8", 4096)]["ratio_vs_xla"] == pytest.approx(130.0 / 115.0)
    # the dynamic linear is compared with XLA's dynamic linear, not with the bare GEMM
    assert by[("qlin:mosaic_gpu+quant", "fp8", 128)]["ratio_vs_xla"] == pytest.approx(16.0 / 14.0)
    assert "ratio_vs_xla" not in by[("xla", "fp8", 16)] and "ratio_vs_xla" not in by[("xla+quant", "fp8", 16)]
    # peak: the best measured TF/s of the dtype over every impl
    fl = 2.0 * 4096 * 4096 * 4096
    assert peak["fp8"]["tflops"] == pytest.approx(fl / 100e-6 / 1e12) and peak["fp8"]["impl"] == "qlin:mosaic_gpu"
    assert peak["int8"]["tflops"] == pytest.approx(fl / 90e-6 / 1e12)
    assert by[("xla", "fp8", 4096)]["frac_of_peak"] == pytest.approx(100.0 / 130.0)
    assert by[("xla", "bf16", 4096)]["frac_of_peak"] == 1.0
    # weight-bandwidth floor for qlin rows with M <= 16 only
    r = by[("qlin:mosaic_gpu", "fp8", 16)]
    assert r["weight_floor_us"] == pytest.approx(4096 * 4096 / 3000e9 * 1e6) and r["x_floor"] == pytest.approx(
        9.0 / r["weight_floor_us"]
    )
    assert "weight_floor_us" not in by[("qlin:mosaic_gpu", "fp8", 128)] and "x_floor" not in by[("xla", "fp8", 16)]


def test_summarize_geomean_worst_wins():
    s = bench.summarize(synthetic_rows())
    q = s["qlin:mosaic_gpu fp8"]
    ratios = [10 / 9, 130 / 100, 11 / 12]
    assert q["geomean_vs_xla"] == pytest.approx(statistics.geometric_mean(ratios))
    assert q["worst_vs_xla"] == pytest.approx(11 / 12) and q["worst_case"] == "128x4096x4096"
    assert (q["wins"], q["compared"], q["cases"], q["failed"]) == (2, 3, 3, 0)
    assert q["max_rel_err"] == 1e-3 and 0 < q["geomean_frac_of_peak"] <= 1
    dyn = s["qlin:mosaic_gpu+quant fp8"]
    assert dyn["wins"] == 3 and dyn["worst_vs_xla"] == pytest.approx(16 / 14)
    t8 = s["torch int8"]  # the skipped case does not count, the error does
    assert (t8["cases"], t8["failed"], t8["compared"]) == (2, 1, 1)
    assert s["xla fp8"]["geomean_vs_xla"] is None and s["xla fp8"]["wins"] == 0


def test_markdown_table_cells_and_summary():
    md = bench.markdown_table(synthetic_rows(), copy_gbs=3000.0)
    lines = md.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:5] == ["N", "K", "M", "qlin:mosaic_gpu fp8 us", "xla fp8 us"]
    assert "qlin:mosaic_gpu+quant fp8 x XLA" in head and "xla+quant fp8 us" in head
    row16 = next(line for line in lines if line.startswith("| 4096 | 4096 | 16 |"))
    cells = dict(zip(head, [c.strip() for c in row16.strip("|").split("|")]))
    assert cells["qlin:mosaic_gpu fp8 us"] == "9.0" and cells["torch int8 us"] == "skip"
    assert cells["qlin:mosaic_gpu fp8 x XLA"] == "1.11"
    row128 = next(line for line in lines if line.startswith("| 4096 | 4096 | 128 |"))
    assert "ERR" in row128
    assert "| qlin:mosaic_gpu | fp8 | 3 | 0 | 1.10 | 0.92 (128x4096x4096) | 2/3 |" in md
    assert "| 4096 | 4096 | 4096 |" in md and "1374 (1.00)" in md  # 2 * 4096^3 / 100 us
    assert bench.PEAK_NOTE in md and "copy bandwidth (read+write): 3000 GB/s" in md


def test_write_results_schema_viz_loads_and_plot(tmp_path):
    rows = synthetic_rows()
    path = bench.write_results(tmp_path, "g", rows, {"device": "gpu:NVIDIA H100 80GB HBM3", "copy_gbs": 3000.0})
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows"}
    assert {"summary", "peak_tflops", "peak_note"} <= set(data["meta"])
    for r in data["rows"]:
        assert set(viz.REQUIRED_KEYS) <= set(r)
        if r["us"]:
            assert r["tflops"] == pytest.approx(2 * r["M"] * r["N"] * r["K"] / r["us"] / 1e6)
            assert 0 < r["frac_of_peak"] <= 1
    loaded = viz.load_benchmark_results(tmp_path)
    assert len(loaded) == sum(1 for r in rows if r["us"])
    assert bench.plot(rows, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_args_defaults_and_errors():
    a = bench.parse_args([])
    assert a.shape_list == bench.LLAMA3_SHAPES and a.m_list == bench.M_GRID and a.iterations == 20
    assert not a.dynamic and a.deadline_s == 540.0 and a.dtypes == "fp8,int8"
    q = bench.parse_args(["--quick", "--dynamic", "--deadline-s", "470", "--m", "1,8", "--workers", "2"])
    assert q.shape_list == bench.QUICK_SHAPES and q.m_list == [1, 8] and q.dynamic and q.deadline_s == 470
    assert bench.parse_args(["--shapes", "256:512,128:64"]).shape_list == [(256, 512), (128, 64)]
    assert bench.parse_args(["--dynamic-only"]).dynamic
    only = bench.case_impls(("fp8",), with_gemm=False, dynamic=True, with_bf16=False)
    assert [(i.impl, i.kind) for i in only] == [("qlin:mosaic_gpu+quant", "dyn-qlin"), ("xla+quant", "dyn-xla")]
    full = bench.case_impls(("fp8", "int8"))
    assert [(i.impl, i.dtype) for i in full] == [
        ("qlin:mosaic_gpu", "fp8"), ("xla", "fp8"), ("qlin:mosaic_gpu", "int8"), ("xla", "int8"), ("xla", "bf16")
    ]  # fmt: skip
    c = bench.parse_args(["--cases", "256:4096:14336,1:8192:28672,256:4096:14336"])
    assert c.case_list == [(4096, 14336, 256), (8192, 28672, 1)]  # (N, K, M), given order, deduplicated
    assert c.shape_list == [(4096, 14336), (8192, 28672)] and c.m_list == [1, 256]
    for bad in (
        ["--shapes", "256x512"], ["--m", "a"], ["--dtypes", "fp4"], ["--iterations", "0"],
        ["--cases", "1:2"], ["--cases", "0:16:16"], ["--cases", "1:16:16", "--m", "4"],
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_skip_done_continues_a_cut_grid(tmp_path):
    rows = [
        {"impl": "qlin:mosaic_gpu", "dtype": "fp8", "M": 1, "N": 6144, "K": 4096},
        {"impl": "xla", "dtype": "fp8", "M": 16, "N": 6144, "K": 4096},  # a baseline alone does not count
        {"impl": "qlin:mosaic_gpu", "dtype": "int8", "M": 8192, "N": 8192, "K": 28672, "us": 2500.0},
        {"impl": "qlin:mosaic_gpu", "dtype": "fp8", "M": 16, "N": 4096, "K": 4096, "us": None},  # failed: runs again
    ]
    rows[0]["us"] = 11.6
    (tmp_path / "a.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    paths = [str(tmp_path / "a.json"), str(tmp_path / "missing.json")]
    assert bench.done_cases(paths) == {(6144, 4096, 1), (8192, 28672, 8192)}
    a = bench.parse_args(["--skip-done", *paths])
    full = bench.plan_cases(bench.LLAMA3_SHAPES, bench.M_GRID)
    assert a.case_list == [c for c in full if c not in {(6144, 4096, 1), (8192, 28672, 8192)}]
    assert len(a.case_list) == 78 and set(a.m_list) == set(bench.M_GRID)
    c = bench.parse_args(["--cases", "1:6144:4096,16:6144:4096", "--skip-done", *paths])
    assert c.case_list == [(6144, 4096, 16)] and c.m_list == [16] and c.shape_list == [(6144, 4096)]
    with pytest.raises(SystemExit):  # nothing left to run
        bench.parse_args(["--cases", "1:6144:4096", "--skip-done", *paths])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit):  # an unreadable file is an error, not an empty one
        bench.parse_args(["--skip-done", str(tmp_path / "bad.json")])


# -- the pipeline, end to end on the CPU -----------------------------------------------------------


def test_checker_catches_wrong_rows_and_nan():
    g = bench.GridBench(dtypes=("int8",), with_torch=False, with_bf16=False)
    g.rows_idx = bench.sample_rows([4, 64], per_band=8)  # [0..3] + 8 rows spread over [4, 64)
    m, n = 64, 16
    cnt = g._cnt(m)
    fn, specs, _ = g._make_check(m, n, cnt)
    check = jax.jit(fn)
    ref = np.random.default_rng(0).standard_normal((len(g.rows_idx), n)).astype(np.float32)
    out = np.zeros((m, n), np.float32)
    out[g.rows_idx] = ref
    assert float(check(jnp.asarray(out, jnp.bfloat16), ref)) < kernel_rtol(jnp.bfloat16)
    bad = out.copy()
    bad[g.rows_idx[-1]] *= -1  # one sampled row wrong (the last row of M)
    assert float(check(jnp.asarray(bad, jnp.bfloat16), ref)) > 0.1
    unsampled = sorted(set(range(m)) - set(g.rows_idx.tolist()))[0]
    nan = out.copy()
    nan[unsampled, 3] = np.nan  # NaN outside the sampled rows: still caught
    assert math.isinf(float(check(jnp.asarray(nan, jnp.bfloat16), ref)))


def test_grid_end_to_end_interpret(tmp_path):
    """One int8 case with the Mosaic GPU kernels in interpret mode: GEMM and dynamic-linear rows, all checked."""
    calls = []
    args = bench.parse_args(
        ["--shapes", "32:256", "--m", "8", "--dtypes", "int8", "--no-torch", "--no-bf16", "--dynamic",
         "--iterations", "3", "--max-copies", "1", "--copy-mib", "1", "--workers", "2",
         "--out", str(tmp_path), "--tag", "e2e"]
    )  # fmt: skip
    rows, meta = bench.run(args, timer=fake_timer(calls), interpret=True, log=lambda s: None)
    by = {(r["impl"], r["dtype"]): r for r in rows}
    assert set(by) == {("qlin:mosaic_gpu", "int8"), ("xla", "int8"), ("qlin:mosaic_gpu+quant", "int8"),
                       ("xla+quant", "int8")}  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        assert r["us"] == pytest.approx(20.0) and r["copies"] == 1  # median of the timer's ms, per copy
        assert r["tflops"] == pytest.approx(2 * 8 * 32 * 256 / 20e-6 / 1e12)
    assert by[("qlin:mosaic_gpu", "int8")]["rel_err"] < kernel_rtol(jnp.bfloat16)
    assert by[("xla", "int8")]["rel_err"] < kernel_rtol(jnp.bfloat16)
    dyn_tol = quant_rtol(bench.dynamic_config("int8"))
    assert 0 < by[("qlin:mosaic_gpu+quant", "int8")]["rel_err"] < dyn_tol
    assert 0 < by[("xla+quant", "int8")]["rel_err"] < dyn_tol
    assert by[("qlin:mosaic_gpu+quant", "int8")]["kernel"] == "mosaic_gpu"
    assert by[("qlin:mosaic_gpu", "int8")]["ratio_vs_xla"] == pytest.approx(1.0)
    # the timer got the compiled many-copy program, its argument list, and the iteration count
    assert all(isinstance(fn, jax.stages.Compiled) for fn, _, _ in calls[1:])  # compiled ahead of time
    assert all(it == 3 for _, _, it in calls[1:]) and all(len(a[0]) == 1 for _, a, _ in calls[1:])
    assert len(calls) == 1 + 4  # copy bandwidth + 4 programs
    ph = meta["phases"][0]
    assert set(ph["impl_s"]) == {"qlin:mosaic_gpu/int8", "xla/int8", "qlin:mosaic_gpu+quant/int8", "xla+quant/int8"}
    assert ph["impl_s"]["xla/int8"]["locked"] and ph["impl_s"]["xla+quant/int8"]["locked"]
    assert meta["compile_totals"]["programs"] >= 6  # 4 timed + checker + reference(s)


def test_grid_end_to_end_failures_are_rows_and_outputs_are_written(tmp_path):
    """Without interpret mode the Mosaic GPU kernel cannot run on the CPU: its rows carry the error, the rest
    of the grid runs, in plan order, and the JSON / markdown / plot are written; a deadline skips cases."""
    args = bench.parse_args(
        ["--shapes", "256:128", "--m", "16,8", "--dtypes", "fp8", "--no-torch", "--no-bf16", "--iterations", "3",
         "--max-copies", "2", "--copy-mib", "1", "--workers", "3", "--out", str(tmp_path), "--tag", "cpu"]
    )  # fmt: skip
    rows, meta = bench.run(args, timer=fake_timer([]), log=lambda s: None)
    assert [(p["N"], p["K"], p["M"]) for p in meta["phases"]] == [(256, 128, 16), (256, 128, 8)]
    q = [r for r in rows if r["impl"] == "qlin:mosaic_gpu"]
    assert len(q) == 2 and all(r["us"] is None and "interpret" in r["error"] for r in q)
    ok = [r for r in rows if r["impl"] != "qlin:mosaic_gpu"]
    assert {(r["impl"], r["dtype"]) for r in ok} == {("xla", "fp8")} and len(ok) == 2
    assert all(r["us"] == pytest.approx(10.0) and r["copies"] == 2 for r in ok)  # 20 us / 2 weight copies
    assert all(r["rel_err"] < kernel_rtol(jnp.bfloat16) for r in ok)
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert data["meta"]["summary"]["qlin:mosaic_gpu fp8"]["failed"] == 2 and len(data["rows"]) == 4
    md = (tmp_path / "cpu.md").read_text()
    assert "| 256 | 128 | 8 | ERR | 10.0 |" in md and "per case" in md
    assert (tmp_path / "cpu.png").exists()
    # a deadline already passed: nothing runs, every case is listed as skipped
    args.deadline_s, args.tag = -1.0, "late"
    rows, meta = bench.run(args, timer=fake_timer([]), log=lambda s: None)
    assert rows == [] and len(meta["skipped"]) == 2


def test_merge_gemm_later_runs_win_skips_never_replace_and_targets(tmp_path):
    merge_gemm = load_script("benchmarks/merge_gemm.py")
    dev = "gpu:H100"
    run1 = [
        bench.make_row("qlin:mosaic_gpu", "fp8", 256, 4096, 4096, 20.0, 1e-3, dev),
        bench.make_row("xla", "fp8", 256, 4096, 4096, 16.0, 1e-3, dev),
        bench.make_row("qlin:mosaic_gpu", "fp8", 4096, 4096, 4096, 100.0, 1e-3, dev),
        bench.make_row("xla", "fp8", 4096, 4096, 4096, 130.0, 1e-3, dev),
        bench.make_row("qlin:mosaic_gpu", "fp8", 1, 4096, 4096, 10.0, 1e-3, dev),
        bench.make_row("xla", "fp8", 1, 4096, 4096, 11.0, 1e-3, dev),
    ]
    run2 = [  # the M=256 case re-measured after a heuristic change; a skipped M=4096 row
        bench.make_row("qlin:mosaic_gpu", "fp8", 256, 4096, 4096, 12.0, 1e-3, dev),
        bench.make_row("xla", "fp8", 256, 4096, 4096, 16.0, 1e-3, dev),
        dict(impl="qlin:mosaic_gpu", dtype="fp8", M=4096, N=4096, K=4096, skipped="deadline"),
        bench.make_row("qlin:mosaic_gpu+quant", "fp8", 256, 4096, 4096, 14.0, 1e-3, dev),  # dynamic: left out
    ]
    for name, rows in (("a.json", run1), ("b.json", run2)):
        (tmp_path / name).write_text(json.dumps({"meta": {"copy_gbs": 3000.0}, "rows": rows}))
    assert merge_gemm.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path),
                            "--tag", "m"]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    by = {(r["impl"], r["M"]): r for r in out["rows"]}
    assert not any(r["impl"].endswith("+quant") for r in out["rows"])
    assert by[("qlin:mosaic_gpu", 256)]["us"] == 12.0 and by[("qlin:mosaic_gpu", 256)]["source"] == "b.json"
    assert by[("qlin:mosaic_gpu", 4096)]["us"] == 100.0  # the skip did not replace the measurement
    assert by[("qlin:mosaic_gpu", 256)]["ratio_vs_xla"] == pytest.approx(16.0 / 12.0)
    t = out["meta"]["targets"]["fp8"]
    assert t["cases"] == 3 and t["at_least_xla"] == "3/3" and t["losses"] == []
    assert t["min_tflops_m_ge_4096"] == pytest.approx(2 * 4096**3 / 100e-6 / 1e12)
    floor_us = 4096 * 4096 / 3000e9 * 1e6
    assert t["decode_x_floor"] == [round(10.0 / floor_us, 2)]
    assert (tmp_path / "m.md").read_text().count("| 4096 | 4096 |") == 3
    (tmp_path / "c.json").write_text(json.dumps({"meta": {}, "rows": [
        bench.make_row("xla", "fp8", 1, 4096, 4096, 11.0, 1e-3, "gpu:H200")]}))
    with pytest.raises(SystemExit, match="several devices"):
        merge_gemm.main([str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path)])


def test_merge_gemm_current_heuristic_leaves_out_cases_of_other_configs(tmp_path):
    # A later run of a variant the heuristic no longer picks must not replace the row of today's config; the case's
    # baselines go with it (ratios pair one run's numbers).
    import jax.numpy as jnp

    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    merge_gemm = load_script("benchmarks/merge_gemm.py")
    dev = "gpu:H100"
    today = mm.default_config(16, 6144, 4096, jnp.float8_e4m3fn).short()

    def case(us, config, xla_us):
        q = dict(bench.make_row("qlin:mosaic_gpu", "fp8", 16, 6144, 4096, us, 1e-3, dev), config=config)
        return [q, bench.make_row("xla", "fp8", 16, 6144, 4096, xla_us, 1e-3, dev)]

    (tmp_path / "old.json").write_text(json.dumps({"meta": {}, "rows": case(11.0, today, 13.0)}))
    (tmp_path / "new.json").write_text(json.dumps({"meta": {}, "rows": case(12.0, "m64n48k512s3w1ngn1e64x16x2", 13.5)}))
    paths = [str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--out", str(tmp_path)]
    assert merge_gemm.main(paths + ["--tag", "all"]) == 0
    assert {r["source"] for r in json.loads((tmp_path / "all.json").read_text())["rows"]} == {"new.json"}
    assert merge_gemm.main(paths + ["--tag", "cur", "--current-heuristic"]) == 0
    out = json.loads((tmp_path / "cur.json").read_text())
    assert {(r["impl"], r["us"], r["source"]) for r in out["rows"]} == {
        ("qlin:mosaic_gpu", 11.0, "old.json"), ("xla", 13.0, "old.json")}  # fmt: skip
    assert out["meta"]["sources"][1]["left_out_stale"] == ["16x6144x4096"]


def test_merge_gemm_dynamic_merges_only_the_quantize_plus_matmul_rows(tmp_path):
    merge_gemm = load_script("benchmarks/merge_gemm.py")
    dev = "gpu:H100"
    rows = [
        bench.make_row("qlin:mosaic_gpu+quant", "fp8", 256, 4096, 4096, 14.0, 1e-3, dev),
        bench.make_row("xla+quant", "fp8", 256, 4096, 4096, 21.0, 1e-3, dev),
        bench.make_row("qlin:mosaic_gpu+quant", "int8", 1, 4096, 4096, 11.6, 1e-3, dev),
        bench.make_row("xla+quant", "int8", 1, 4096, 4096, 11.5, 1e-3, dev),
        bench.make_row("qlin:mosaic_gpu", "fp8", 256, 4096, 4096, 12.0, 1e-3, dev),  # GEMM row: left out
        bench.make_row("xla", "fp8", 256, 4096, 4096, 16.0, 1e-3, dev),
    ]
    (tmp_path / "d.json").write_text(json.dumps({"meta": {"copy_gbs": 3000.0}, "rows": rows}))
    assert merge_gemm.main([str(tmp_path / "d.json"), "--dynamic", "--out", str(tmp_path), "--tag", "dyn"]) == 0
    out = json.loads((tmp_path / "dyn.json").read_text())
    assert {r["impl"] for r in out["rows"]} == {"qlin:mosaic_gpu+quant", "xla+quant"}
    t = out["meta"]["targets"]
    assert t["fp8"]["cases"] == 1 and t["fp8"]["geomean_vs_xla"] == pytest.approx(1.5)
    assert t["int8"]["at_least_xla"] == "0/1" and t["int8"]["losses"] == ["1x4096x4096 0.99x"]


def test_block_grid_table_merges_time_rows_and_states_the_targets(tmp_path):
    table = load_script("benchmarks/block_grid_table.py")

    def rows(m, n, k, blk, chan, deq, fast=None):
        out = [{"kind": "time", "impl": i, "M": m, "N": n, "K": k, "us": us}
               for i, us in ((table.BLOCK, blk), (table.CHANNEL, chan), (table.DEQUANT, deq), (table.FAST, fast))]
        return [r for r in out if r["us"]]  # fmt: skip

    a = rows(1024, 4096, 4096, 40.0, 30.0, 80.0, 34.0) + rows(16, 4096, 4096, 10.0, 9.0, 30.0)
    a.append({"kind": "check", "impl": table.BLOCK, "M": 1, "N": 272, "K": 384, "ok": True})  # not a time row
    b = rows(1024, 4096, 4096, 32.0, 28.0, 70.0, 32.0) + rows(2048, 8192, 28672, 50.0, 45.0, 40.0)  # later file wins
    (tmp_path / "a.json").write_text(json.dumps({"device": "H100", "rows": a}))
    (tmp_path / "b.json").write_text(json.dumps({"device": "H100", "rows": b}))
    out = tmp_path / "grid.md"
    assert table.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "- cases timed: 3" in text
    assert "block / per-channel: min 0.88, geomean 0.887, >= 0.85 at 2/2" in text  # 28/32, 45/50: 0.875, 0.9
    assert "total per-channel time / total block time: 0.890" in text  # 73 / 82
    assert "faster than the XLA dequantize path at 2/3 cases (0.80x to 3.00x)" in text
    assert "| 4096 x 4096 | 0.90 | 0.88 | - |" in text and "| 8192 x 28672 | - | - | 0.90 |" in text
    (tmp_path / "c.json").write_text(json.dumps({"device": "H200", "rows": b}))
    with pytest.raises(SystemExit):  # ratios only within one machine's runs
        table.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    (tmp_path / "e.json").write_text(json.dumps({"device": "H100", "rows": a[-1:]}))
    with pytest.raises(SystemExit):  # no time rows at all
        table.main([str(tmp_path / "e.json")])
    # A later file's case whose block kernel ran another config than today's heuristic is left out
    # (the earlier row stands), unless --keep-stale; rows without a config are kept.
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    today = bmm.default_config(1024, 4096, 4096).short()
    f = rows(1024, 4096, 4096, 20.0, 28.0, 70.0)
    f[0]["config"] = today + "t4"
    g = rows(1024, 4096, 4096, 35.0, 28.0, 70.0)
    g[0]["config"] = today
    (tmp_path / "f.json").write_text(json.dumps({"device": "H100", "rows": f}))
    (tmp_path / "g.json").write_text(json.dumps({"device": "H100", "rows": g}))
    assert table.main([str(tmp_path / "b.json"), str(tmp_path / "f.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 4096 x 4096 | 0.88 | - |" in text  # b's 28 / 32 stands
    assert f"f.json: 1024 x 4096 x 4096 ran {today}t4 (today: {today})" in text
    assert table.main([str(tmp_path / "b.json"), str(tmp_path / "f.json"), "--keep-stale", "--out", str(out)]) == 0
    assert "| 4096 x 4096 | 1.40 | - |" in out.read_text() and "Left out" not in out.read_text()
    assert table.main([str(tmp_path / "b.json"), str(tmp_path / "g.json"), "--out", str(out)]) == 0
    assert "| 4096 x 4096 | 0.80 | - |" in out.read_text()  # today's config: the later file wins


def test_cupti_timer_retakes_a_window_with_an_uneven_kernel_count(monkeypatch):
    from jax.experimental.mosaic.gpu import profiler

    calls = []

    def measure(fn, iterations):
        def run(*args):
            calls.append(iterations)
            if len(calls) == 1:
                raise RuntimeError("The number of kernel launches is not divisible by the number of iterations")
            return None, [0.5] * iterations

        return run

    monkeypatch.setattr(profiler, "measure", measure)
    assert bench.cupti_timer(lambda: None, (), 4) == [0.5] * 4 and len(calls) == 2

    def broken(fn, iterations):
        def run(*args):
            raise RuntimeError("The number of kernel launches is not divisible by the number of iterations")

        return run

    monkeypatch.setattr(profiler, "measure", broken)
    with pytest.raises(RuntimeError, match="not divisible"):
        bench.cupti_timer(lambda: None, (), 4)

    def other(fn, iterations):
        def run(*args):
            raise RuntimeError("CUPTI init failed")

        return run

    calls.clear()
    monkeypatch.setattr(profiler, "measure", other)
    with pytest.raises(RuntimeError, match="init failed"):
        bench.cupti_timer(lambda: None, (), 4)


def test_qlin_rows_name_the_int8_gemv_route():
    import jax.numpy as jnp

    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    cfg = mm.default_config(1, 28672, 4096, jnp.int8)
    assert bench.qlin_label(cfg, jnp.int8, 1, 4096, 28672) == "xla_gemv"  # what apply_weights runs at int8 decode
    assert bench.qlin_label(cfg, jnp.int8, 1, 28672, 28672) == cfg.short()  # long K: the wgmma kernel
    assert bench.qlin_label(cfg, jnp.float8_e4m3fn, 1, 4096, 28672) == cfg.short()
    one_wave = mm.default_config(1, 6144, 4096, jnp.int8)  # 96 swapped slabs: the kernel (uses_xla_gemv)
    assert bench.qlin_label(one_wave, jnp.int8, 1, 4096, 6144) == one_wave.short()


def test_ab_gemm_sides_are_valid_and_differ_only_in_what_they_compare():
    # benchmarks/ab_gemm.py (GPU A/B runs): the two sides of each comparison, checked without a GPU.
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    ab = load_script("benchmarks/ab_gemm.py")
    f8 = jnp.float8_e4m3fn
    for m, n, k in ((4096, 4096, 4096), (256, 4096, 4096), (16, 28672, 4096), (1, 8192, 8192)):
        sides = ab.sides("inflight", m, n, k, f8)
        off, on = sides["off"][0], sides["on"][0]
        assert not off.wgmma_inflight and on.wgmma_inflight
        assert off == dataclasses.replace(mm.default_config(m, n, k, f8), wgmma_inflight=False)
        for cfg, _ in sides.values():
            mm._validate_config(cfg, f8, jnp.bfloat16)
        # 2-stage configs get tile_k halved and the stages doubled (in-flight needs 3 stages)
        if off.max_concurrent_steps < 3:
            assert (on.tile_k, on.max_concurrent_steps) == (off.tile_k // 2, 2 * off.max_concurrent_steps)
    wide = ab.sides("wide_n", 512, 10240, 8192, f8)
    assert wide["wide_n"][0] == mm._wide_n_tile() and wide["previous"][0].cta_tile_n == 192
    assert mm.default_config(512, 10240, 8192, f8) == mm._wide_n_tile()  # the patch did not leak
    sk = ab.sides("splitk_large", 256, 8192, 28672, f8)
    assert sk["default"][0] == mm.default_config(256, 8192, 28672, f8)
    large = sk["large_sk2"][0]
    assert (large.cta_tile_m, large.cta_tile_n, large.split_k, large.max_concurrent_steps) == (128, 256, 2, 4)
    mm._validate_config(large, f8, jnp.bfloat16)
    pad = ab.sides("decode_pad", 5, 4096, 4096, f8)
    assert pad["pad8"][0] == pad["unpadded"][0]
    assert (pad["pad8"][1](5), pad["unpadded"][1](5), pad["unpadded"][1](13)) == (8, 5, 16)


def test_ab_gemm_depth_sides_change_only_the_pipeline_and_k_step():
    # --ab depth: every side is the heuristic's tile with other stages / K-step depth / epilogue slots (all valid), and
    # where the heuristic deepened the K steps the "shallow" side is the tile it started from.
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    ab = load_script("benchmarks/ab_gemm.py")
    f8 = jnp.float8_e4m3fn
    for m, n, k in ((128, 4096, 4096), (16, 4096, 4096), (512, 8192, 8192), (64, 4096, 14336)):
        sides = ab.sides("depth", m, n, k, f8)
        base = sides["default"][0]
        assert base == mm.default_config(m, n, k, f8) and len(sides) >= 2
        for name, (cfg, _) in sides.items():
            mm._validate_config(cfg, f8, jnp.bfloat16)
            same = dataclasses.replace(cfg, tile_k=base.tile_k, max_concurrent_steps=base.max_concurrent_steps,
                                       epi_slots=base.epi_slots)  # fmt: skip
            assert same == base, name
        if m <= 128:
            shallow = sides["shallow"][0]
            assert shallow.tile_k * 2 == base.tile_k and mm.k_parts(shallow) == mm.k_parts(base)


def test_ab_gemm_w1_inflight_sides_are_one_warpgroup_tiles():
    # --ab w1_inflight: besides the heuristic, valid one-consumer-warpgroup tiles, in-flight wgmma on the "_i" sides,
    # clustered along M exactly where the 64-row tiles pair up.
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    ab = load_script("benchmarks/ab_gemm.py")
    f8 = jnp.float8_e4m3fn
    for m, n, k in ((256, 4096, 14336), (128, 4096, 4096), (192, 8192, 8192)):
        sides = ab.sides("w1_inflight", m, n, k, f8)
        assert sides["default"][0] == mm.default_config(m, n, k, f8) and len(sides) == 5
        for name, (cfg, _) in sides.items():
            mm._validate_config(cfg, f8, jnp.bfloat16)
            if name == "default":
                continue
            assert cfg.num_compute_wgs == 1 and cfg.cta_tile_m == 64, name
            assert cfg.wgmma_inflight == name.endswith("_i"), name
            assert cfg.cluster == ("m" if m // 64 % 2 == 0 else None), name
    assert len(ab.W1_INFLIGHT_CASES.split(",")) == 10


def test_ab_gemm_n224_sides_are_the_tile_and_what_the_heuristic_took_before():
    # --ab n224: the library's 128 x 224 tile against the heuristic with its 224 rule off (the patch does not leak).
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    ab = load_script("benchmarks/ab_gemm.py")
    f8 = jnp.float8_e4m3fn
    for m, n, k, before in ((256, 28672, 4096, 256), (512, 28672, 4096, 320), (256, 57344, 8192, 320)):
        sides = ab.sides("n224", m, n, k, f8)
        assert sides["n224"][0] == mm._n224_tile() == mm.default_config(m, n, k, f8)
        assert sides["previous"][0].cta_tile_n == before and sides["previous"][0].tile_m == 128
    assert ab.sides("n224", 2048, 28672, 4096, f8)["n224"][0] == mm._n224_tile(inflight=True)


def test_ab_gemm_epilogue_and_swap_ab_sides():
    # --ab epilogue: the ablations run the heuristic's own config; the layouts change only the epilogue
    # tile / slots and fit the same shared memory; the knob is off unless the A/B loop sets it.
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    ab = load_script("benchmarks/ab_gemm.py")
    f8 = jnp.float8_e4m3fn
    assert mm._EPILOGUE_ABLATION is None
    for m, n, k in ((4096, 4096, 4096), (1024, 4096, 4096), (512, 8192, 8192), (256, 8192, 8192)):
        base = mm.default_config(m, n, k, f8)
        sides = ab.sides("epilogue", m, n, k, f8)
        assert sides["default"][0] == base
        assert sides["abl_no_store"][0] == base and sides["abl_no_store"][2] == {"_EPILOGUE_ABLATION": "no_store"}
        assert sides["abl_direct"][0] == base and sides["abl_direct"][2] == {"_EPILOGUE_ABLATION": "direct"}
        for name, epi_n in (("e64x32x2", 32), ("e64x16x2", 16)):
            cfg = sides[name][0]
            assert (cfg.epi_tile_n, cfg.epi_slots) == (epi_n, 2), name
            assert dataclasses.replace(cfg, epi_tile_n=base.epi_tile_n, epi_slots=base.epi_slots) == base, name
            mm._validate_config(cfg, f8, jnp.bfloat16)
    # --ab row_clamp: the heuristic's config on both sides, the clamp switched off on one; every switch a side
    # sets is one the A/B loop restores (and it is on in the library)
    assert mm._CLAMP_LAST_TILE_ROW is True
    rc = ab.sides("row_clamp", 1032, 8192, 8192, f8)
    assert rc["clamped"][0] == rc["unclamped"][0] == mm.default_config(1032, 8192, 8192, f8)
    assert rc["unclamped"][2] == {"_CLAMP_LAST_TILE_ROW": False} and len(rc["clamped"]) == 2
    for what in ("epilogue", "row_clamp"):
        for side in ab.sides(what, 1032, 8192, 8192, f8).values():
            assert set(side[2] if len(side) > 2 else {}) <= set(ab._MODULE_DEFAULTS)
    # --ab swap_ab: the heuristic's unswapped decode config against the library's swap-AB one
    sides = ab.sides("swap_ab", 1, 8192, 28672, f8)
    assert mm.default_config(1, 8192, 28672, f8).swap_ab  # the heuristic takes it: "default" must not
    assert sides["swap_ab"][0].swap_ab and not sides["default"][0].swap_ab
    assert sides["swap_ab"][0] == mm._swap_decode_config(1, 8192, 28672, f8, jnp.bfloat16, mm.num_sms())
    assert len(ab.SWAP_AB_CASES.split(",")) == 16
    # --ab decode_tn: 96 / 80 / 112-wide decode tiles, nothing else changed; the heuristic now takes 80 there
    tn = {name: cfg for name, (cfg, _) in ab.sides("decode_tn", 16, 10240, 8192, f8).items()}
    assert {name: c.tile_n for name, c in tn.items()} == {"tn96": 96, "tn80": 80, "tn112": 112}
    assert tn["tn80"] == mm.default_config(16, 10240, 8192, f8)
    for cfg in tn.values():
        mm._validate_config(cfg, f8, jnp.bfloat16)


def test_bridge_rows_join_the_benchmark_as_their_own_table(tmp_path):
    pytest.importorskip("torch")
    args = bench.parse_args(
        ["--shapes", "32:256", "--m", "8", "--dtypes", "fp8", "--no-torch", "--no-bf16", "--no-xla", "--bridge",
         "--bridge-reps", "2", "--iterations", "2", "--max-copies", "1", "--copy-mib", "1", "--workers", "1",
         "--out", str(tmp_path), "--tag", "br"]
    )  # fmt: skip
    rows, meta = bench.run(args, timer=fake_timer([]), interpret=True, log=lambda s: None)
    assert all(not r["impl"].endswith(("torch_bridge", "jax_same_kernel")) for r in rows)  # not GEMM rows
    br = meta["bridge"]
    assert br["skipped"] is None and br["device"] == "cpu"
    assert [(r["impl"], r["M"], r["N"], r["K"]) for r in br["rows"]] == [
        ("qlin:torch_bridge", 8, 32, 256), ("qlin:jax_same_kernel", 8, 32, 256)]
    assert all(r["us"] > 0 and r["rel_err"] == 0.0 and r["route"] == "jax" for r in br["rows"])
    saved = json.loads((tmp_path / "br.json").read_text())
    assert saved["meta"]["bridge"]["rows"] == br["rows"]
    md = (tmp_path / "br.md").read_text()
    assert "torch bridge" in md and "| fp8 | 8 | 32 | 256 |" in md and "worst bridge overhead" in md


def test_decode_floor_script_layouts_and_stream_kernels_lower_for_cuda():
    # benchmarks/decode_floor.py (GPU only): the box-contiguous layout holds the same boxes, every stream
    # variant of a grid weight is a valid tiling, and the no-math stream kernels cross-lower for CUDA.
    df = load_script("benchmarks/decode_floor.py")
    w = np.arange(256 * 512, dtype=np.int32).reshape(256, 512) % 251
    blk = np.asarray(df.to_blocked(jnp.asarray(w), 64, 128))
    kt = 512 // 128
    for nt, k in ((0, 0), (1, 2), (3, 3)):
        row0 = (nt * kt + k) * 64
        np.testing.assert_array_equal(blk[row0 : row0 + 64], w[nt * 64 : nt * 64 + 64, k * 128 : k * 128 + 128])
    for n, k in df.SHAPES:
        for rows, tk, stages, split in df.stream_variants(n, k):
            assert n % rows == 0 and (k // tk) % split == 0 and stages * rows * tk <= 200 * 1024
    f8 = jnp.float8_e4m3fn
    spec = jax.ShapeDtypeStruct
    for blocked, a_rows in ((False, None), (True, None), (False, 16)):
        fn = df.stream_kernel(1024, 2048, 64, 128, 4, 2, blocked, a_rows)
        wshape = (1024 * 2048 // 128, 128) if blocked else (1024, 2048)
        args = [spec(wshape, f8)] + ([spec((a_rows, 2048), f8)] if a_rows else [])
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    assert callable(load_script("benchmarks/ab_decode_pad64.py").main)  # the rejected-variant A/B still imports


def test_ncu_script_runs_each_variant_once_in_interpret_mode(capsys):
    # benchmarks/ncu_gemm.py brackets one call per variant with the CUDA profiler range (no-ops here); the
    # dry run checks that each variant builds and runs its config
    mod = load_script("benchmarks/ncu_gemm.py")
    assert mod.main(["--cpu-dry-run", "--variants", "wide,per_channel"]) == 0
    out = capsys.readouterr().out
    assert "wide (m64n192k128" in out and "per_channel (m64n" in out
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        mod.main(["--cpu-dry-run", "--variants", "nope"])


def test_ab_fresh_acc_patch_rewrites_only_fresh_wgmmas_and_only_inside_its_context():
    # benchmarks/ab_fresh_acc.py (GPU A/B): inside fresh_accumulators() a block kernel's per-K-block wgmmas
    # into fresh accumulators lose their zero barrier and get scale-d = 0 (one rewritten instruction each:
    # one accumulator a step for three warpgroups, two for the two-blocks-a-step tile; none for fast_accum's
    # rescaled tile, whose one accumulator runs through K); outside it, nothing.
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    mod = load_script("benchmarks/ab_fresh_acc.py")
    spec, f8 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn
    m, n, k = 1024, 1024, 1024
    f32 = jnp.float32
    args = [spec((m, k), f8), spec((n, k), f8), spec((m, k // 128), f32), spec((n // 128, k // 128), f32)]

    def lower(cfg):
        fn = jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, config=cfg))
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    tiles = [(bmm._three_wg_tile(), 1), (bmm._two_block_step_tile(), 2), (bmm._wide_tile(), 1)]
    for cfg, fresh in tiles + [(bmm._rescale_wide_tile(), 0)]:
        mod.STATS.update(fresh_ops=0, fresh_instrs=0, dropped_barriers=0)
        with mod.fresh_accumulators():
            lower(cfg)
        assert mod.STATS == {"fresh_ops": fresh, "fresh_instrs": fresh, "dropped_barriers": fresh}
        lower(cfg)  # (two lowerings' texts differ anyway: kernel names; the counters tell)
        assert mod.STATS == {"fresh_ops": fresh, "fresh_instrs": fresh, "dropped_barriers": fresh}


def test_dsmem_probe_variants_cross_lower_for_cuda(capsys):
    # benchmarks/dsmem_probe.py (GPU only: distributed-shared-memory loads across a two-CTA cluster): every
    # variant still builds and lowers for CUDA here; the GPU run is in results/h100_dsmem_probe.log.
    mod = load_script("benchmarks/dsmem_probe.py")
    mod.main(["--lower"])
    out = capsys.readouterr().out
    assert all(f"{v}: lowered" in out for v in mod.VARIANTS)


def test_dsmem_exchange_modes_cross_lower_for_cuda(capsys):
    # benchmarks/dsmem_exchange.py (GPU only: times the K-split cluster's partial exchange, st.async against
    # distributed-shared-memory loads): every mode and width builds and lowers for CUDA here.
    mod = load_script("benchmarks/dsmem_exchange.py")
    mod.main(["--lower"])
    out = capsys.readouterr().out
    assert all(f"{m} N={n}: lowered" in out for m in mod.MODES for n in mod.WIDTHS)
