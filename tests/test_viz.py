"""qlin.viz: the notebooks' shared helpers (error sweeps, benchmark results, rooflines, tiles, plots)."""

from __future__ import annotations

import json
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin import viz
from qlin.params import FP8Params, Int8Params
from qlin.tolerances import QUANT_RTOL, kernel_rtol, quant_rtol, rel_err


# -- data ------------------------------------------------------------------------------------------

def test_make_activations_outlier_channels_and_heavy_tails():
    x = viz.make_activations(512, 64, outlier_channels=3, outlier_scale=30.0, seed=3)
    assert x.shape == (512, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x, viz.make_activations(512, 64, outlier_channels=3, outlier_scale=30.0, seed=3))
    std = x.std(axis=0)
    assert int(np.sum(std > 10)) == 3  # exactly the outlier columns are ~30x wider
    assert np.all(std[std <= 10] < 1.5)
    g = viz.make_activations(4096, 16, seed=0).ravel()
    t = viz.make_activations(4096, 16, dist="student_t", df=3.0, seed=0).ravel()
    kurt = lambda v: float(np.mean((v - v.mean()) ** 4) / np.var(v) ** 2)  # noqa: E731
    assert kurt(g) < 3.5 < 6 < kurt(t)
    with pytest.raises(ValueError, match="dist"):
        viz.make_activations(2, 2, dist="cauchy")
    with pytest.raises(ValueError, match="outlier_channels"):
        viz.make_activations(2, 2, outlier_channels=3)


def test_make_weight_channel_spread():
    w0 = viz.make_weight(256, 512)
    w1 = viz.make_weight(256, 512, channel_spread=1.0)
    norms0, norms1 = np.linalg.norm(w0, axis=1), np.linalg.norm(w1, axis=1)
    assert abs(float(np.median(norms0)) - 1.0) < 0.1
    assert norms1.max() / norms1.min() > 5 * norms0.max() / norms0.min()
    with pytest.raises(ValueError, match="channel_spread"):
        viz.make_weight(2, 2, channel_spread=-1)


def test_make_config_labels():
    cfg = viz.make_config("int8-asym", "channel W / token A")
    assert isinstance(cfg, qlin.Int8ScaledMMConfig) and not cfg.symmetric
    assert cfg.weight_granularity == "per_channel" and cfg.activation == "dynamic_per_token"
    cfg = viz.make_config("fp8-e5m2", "block128 W / group128 A")
    assert cfg.fp8_format == "e5m2" and cfg.weight_block == (128, 128) and cfg.group_size == 128
    assert viz.make_config("fp8-e4m3fn", {"weight_granularity": "per_tensor", "activation": "static"}).is_static
    # every format label is one the tolerances know
    assert set(viz.FORMATS) == set(QUANT_RTOL)
    with pytest.raises(ValueError, match="fmt"):
        viz.make_config("fp4", "channel W / token A")
    with pytest.raises(ValueError, match="granularity"):
        viz.make_config("int8", "per-row")


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(viz.FORMATS))
def test_quantization_error_within_scheme_tolerance(fmt):
    x = viz.make_activations(32, 256, seed=1)
    w = viz.make_weight(64, 256, seed=2)
    for gran in ("tensor W / static tensor A", "channel W / token A"):
        cfg = viz.make_config(fmt, gran)
        err = viz.quantization_error(x, w, cfg)
        assert 0 < err < quant_rtol(cfg)


def test_quantization_error_through_a_kernel_matches_the_oracle():
    x = viz.make_activations(16, 128, seed=4)
    w = viz.make_weight(48, 128, seed=5)
    cfg = viz.make_config("fp8-e4m3fn", "channel W / token A")
    oracle = viz.quantized_output(x, w, cfg)
    via_xla = viz.quantized_output(x, w, cfg, kernel="xla")
    assert rel_err(via_xla, oracle) < kernel_rtol(cfg.out_dtype)


def test_static_needs_calibration_data():
    cfg = viz.make_config("int8", "tensor W / static tensor A")
    with pytest.raises(ValueError, match="calibration"):
        viz.quantize_for(viz.make_weight(4, 16), cfg)
    x = viz.make_activations(8, 16)
    # calibrating on a batch with 10x the range makes the same batch's error larger
    small = viz.quantization_error(x, viz.make_weight(4, 16), cfg)
    big = viz.quantization_error(x, viz.make_weight(4, 16), cfg, calibration=10 * x)
    assert big > 2 * small


def test_per_channel_weight_scales_help_int8_on_uneven_channels():
    x = viz.make_activations(64, 256, seed=0)
    w = viz.make_weight(128, 256, channel_spread=1.0, seed=1)
    errs = viz.error_matrix(x, w, ["int8"], ["tensor W / tensor A", "channel W / tensor A"])
    assert errs["int8"]["channel W / tensor A"] < 0.5 * errs["int8"]["tensor W / tensor A"]


def test_per_token_scales_help_int8_on_token_outliers():
    x = viz.make_activations(64, 256, seed=0)
    x[::8] *= 50.0  # a few loud tokens
    w = viz.make_weight(64, 256, seed=1)
    ref = viz.float_reference(x, w)
    # the overall error is dominated by the loud tokens; the quiet ones are what a per-tensor scale hurts
    y_tensor = viz.quantized_output(x, w, viz.make_config("int8", "channel W / tensor A"))
    y_token = viz.quantized_output(x, w, viz.make_config("int8", "channel W / token A"))
    quiet_tensor = np.median(viz.row_rel_err(y_tensor, ref))
    quiet_token = np.median(viz.row_rel_err(y_token, ref))
    assert quiet_token < 0.1 * quiet_tensor


def test_error_matrix_cells_and_skip():
    x = viz.make_activations(8, 128, seed=7)
    w = viz.make_weight(16, 128, seed=8)
    grans = ["tensor W / tensor A", "block128 W / group128 A"]
    m = viz.error_matrix(x, w, ["fp8-e4m3fn", "int8"], grans, skip=[("int8", "block128 W / group128 A")])
    assert list(m) == ["fp8-e4m3fn", "int8"] and list(m["fp8-e4m3fn"]) == grans
    assert math.isnan(m["int8"]["block128 W / group128 A"])
    expect = viz.quantization_error(x, w, viz.make_config("fp8-e4m3fn", "block128 W / group128 A"))
    assert m["fp8-e4m3fn"]["block128 W / group128 A"] == pytest.approx(expect, rel=1e-12)


def test_error_sweep_grows_with_outliers_for_per_tensor_int8():
    w = viz.make_weight(32, 128, seed=1)
    cfgs = {"int8 tensor": viz.make_config("int8", "channel W / tensor A")}
    out = viz.error_sweep(lambda s: viz.make_activations(32, 128, outlier_channels=2, outlier_scale=s), [1, 10, 100],
                          w, cfgs)
    e = out["int8 tensor"]
    assert len(e) == 3 and e[0] < e[1] < e[2]


def test_roundtrip_error_bounds():
    x = viz.make_activations(16, 64, seed=2)
    cfg = viz.make_config("int8", "channel W / token A")
    xh = viz.roundtrip(x, cfg)
    step = np.abs(x).max(axis=1, keepdims=True) / 127.0
    assert np.all(np.abs(xh - x) <= step / 2 + 1e-6)
    cfg8 = viz.make_config("fp8-e4m3fn", "channel W / token A")
    xh8 = viz.roundtrip(x, cfg8)
    scale = np.abs(x).max(axis=1, keepdims=True) / 448.0
    normal = np.abs(x) / scale >= 2.0**-6  # e4m3fn normal range: 3 mantissa bits, rel. error <= 2^-4
    assert np.all(np.abs(xh8 - x)[normal] <= 2.0**-4 * np.abs(x)[normal] * (1 + 1e-6))
    static = viz.make_config("int8-asym", "tensor W / static tensor A")
    xs = viz.roundtrip(x, static)
    assert np.abs(xs - x).max() <= (x.max() - x.min()) / 255.0 + 1e-6


def test_row_rel_err():
    ref = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    y = np.array([[3.0, 4.5], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(viz.row_rel_err(y, ref), [0.1, 0.0, 1.0])


# -- params and selection --------------------------------------------------------------------------

def test_describe_params():
    cfg = qlin.Int8ScaledMMConfig(symmetric=False)
    p = qlin.quantize_weight(jnp.asarray(viz.make_weight(24, 32)), cfg)
    rows = {r["field"]: r for r in viz.describe_params(p)}
    assert rows["weight"]["shape"] == (24, 32) and rows["weight"]["dtype"] == "int8"
    assert rows["weight_scale"]["shape"] == (24,) and rows["weight_scale"]["dtype"] == "float32"
    assert rows["azp_adj"]["shape"] == (24,) and rows["azp_adj"]["dtype"] == "int32"
    assert rows["input_scale"]["shape"] is None and rows["input_zero_point"]["shape"] is None
    assert rows["out_features"]["attribute"] == "(static)" and rows["out_features"]["value"] is None
    assert isinstance(p, Int8Params)
    fp = FP8Params(weight=jnp.zeros((2, 16), jnp.float8_e4m3fn), weight_scale=jnp.ones(()), out_features=1)
    rows = {r["field"]: r for r in viz.describe_params(fp)}
    assert rows["out_features"]["value"] == 1 and rows["weight_scale"]["shape"] == ()


def test_explain_rows_marks_the_chosen_kernel():
    cfg = qlin.FP8ScaledMMConfig()
    rows = viz.explain_rows(cfg, platform="cpu")
    names = [r["kernel"] for r in rows]
    assert names == [k.name for k in qlin.registered_kernels("cpu")]
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kernel"] == qlin.choose_kernel(cfg, platform="cpu").name
    assert all(r["usable"] == (r["reason"] == "") for r in rows)


# -- benchmark results -----------------------------------------------------------------------------

def _row(impl="xla", dtype="fp8", m=16, n=4096, k=4096, us=10.0, **kw):
    return {"impl": impl, "dtype": dtype, "M": m, "N": n, "K": k, "us": us,
            "tflops": 2 * m * n * k / us / 1e6, "rel_err": 0.01, "device": "NVIDIA H100 80GB HBM3", **kw}


def test_load_benchmark_results_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([_row(), _row(impl="qlin:mosaic_gpu", us=8.0)]))
    meta_rows = [{k: v for k, v in _row(m=64).items() if k != "device"}]
    (tmp_path / "b.json").write_text(json.dumps({"device": "NVIDIA H200", "jax": "0.11.2", "rows": meta_rows}))
    (tmp_path / "notes.md").write_text("not json")
    rows = viz.load_benchmark_results(tmp_path)
    assert len(rows) == 3
    assert [r["source"] for r in rows] == ["a.json", "a.json", "b.json"]
    assert rows[2]["device"] == "NVIDIA H200" and rows[2]["jax"] == "0.11.2"
    assert all(isinstance(r["M"], int) and isinstance(r["us"], float) for r in rows)
    assert viz.load_benchmark_results(tmp_path / "a.json")[1]["impl"] == "qlin:mosaic_gpu"
    assert not any(r["failed"] for r in rows)


def test_load_benchmark_results_bench_format_with_meta_and_failed_cases(tmp_path):
    # the GEMM benchmark writes {"meta": {...}, "rows": [...]} and records cases that did not run with us=None
    failed = {**_row(impl="torch", m=1), "us": None, "tflops": None, "rel_err": None, "error": "no fp8 on sm80"}
    ok = {**_row(m=16), "config": "m64n32k256s8"}
    del ok["device"]
    data = {"meta": {"device": "gpu:NVIDIA H100 80GB HBM3", "copy_gbs": 3010.5, "argv": ["--quick"]},
            "rows": [ok, failed]}
    (tmp_path / "h100.json").write_text(json.dumps(data))
    rows = viz.load_benchmark_results(tmp_path)
    assert len(rows) == 1 and rows[0]["config"] == "m64n32k256s8"
    assert rows[0]["device"] == "gpu:NVIDIA H100 80GB HBM3" and rows[0]["copy_gbs"] == 3010.5
    assert "argv" not in rows[0] and viz.device_spec(rows[0]["device"]).name == "H100 SXM"
    both = viz.load_benchmark_results(tmp_path, include_failed=True)
    assert [r["failed"] for r in both] == [False, True] and both[1]["error"] == "no fp8 on sm80"
    assert both[1]["us"] is None and both[1]["device"] == "NVIDIA H100 80GB HBM3"  # its own key wins


def test_load_benchmark_results_merged_grid_replaces_its_sources(tmp_path):
    (tmp_path / "run1.json").write_text(json.dumps({"meta": {}, "rows": [_row(us=20.0), _row(m=64)]}))
    (tmp_path / "run2.json").write_text(json.dumps({"meta": {}, "rows": [_row(us=12.0)]}))
    merged = {"meta": {"sources": [{"file": "run1.json", "rows": 2}, {"file": "run2.json", "rows": 1}]},
              "rows": [_row(us=12.0), _row(m=64)]}
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    rows = viz.load_benchmark_results(tmp_path)
    assert [r["source"] for r in rows] == ["merged.json", "merged.json"] and rows[0]["us"] == 12.0
    assert len(viz.load_benchmark_results(tmp_path / "run1.json")) == 2  # a single file loads as is


def test_load_benchmark_results_errors(tmp_path):
    assert viz.load_benchmark_results(tmp_path) == []
    bad = _row()
    del bad["tflops"]
    (tmp_path / "bad.json").write_text(json.dumps([_row(), bad]))
    with pytest.raises(ValueError, match=r"bad.json: row 1 lacks key\(s\) \['tflops'\]"):
        viz.load_benchmark_results(tmp_path)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        viz.load_benchmark_results(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"meta": 1}))
    with pytest.raises(ValueError, match="bad.json: expected a list of rows"):
        viz.load_benchmark_results(tmp_path / "bad.json")  # named explicitly: must be a benchmark file
    # in a folder, other GPU results (no row list) are skipped, and non-timing rows are left out
    assert viz.load_benchmark_results(tmp_path) == []
    check = dict(_row(), kind="check")
    del check["tflops"]
    (tmp_path / "bad.json").write_text(json.dumps({"results": [check, dict(_row(), kind="time")]}))
    assert len(viz.load_benchmark_results(tmp_path)) == 1
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"model": "fp8", "cosine": 0.99},
                                                               {"impl": "qlin", "M": 16, "ms": 0.3}]}))
    assert len(viz.load_benchmark_results(tmp_path)) == 1  # rows of another kind of result: skipped


def test_find_results_dir(tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.delenv("QLIN_BENCH_RESULTS", raising=False)
    assert viz.find_results_dir(tmp_path / "notebooks") == tmp_path / "benchmarks" / "results"
    monkeypatch.setenv("QLIN_BENCH_RESULTS", str(tmp_path / "elsewhere"))
    assert viz.find_results_dir(tmp_path / "notebooks") == tmp_path / "elsewhere"


def test_series_and_shapes():
    rows = [_row(m=64, us=4.0), _row(m=16, us=2.0), _row(m=16, us=6.0), _row(impl="qlin:k", m=16, us=1.0),
            _row(n=8192, m=1)]
    assert viz.shapes_of(rows) == [(4096, 4096), (8192, 4096)]
    s = viz.series(rows, 4096, 4096, value="us")
    assert s["xla fp8"] == ([16, 64], [4.0, 4.0])  # median of the two M=16 rows
    assert s["qlin:k fp8"] == ([16], [1.0])
    assert list(viz.series(rows + [_row(dtype="bf16")], 4096, 4096, dtypes=["bf16"])) == ["xla bf16"]


def test_device_spec_and_roofline():
    assert viz.device_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert viz.device_spec("NVIDIA H100 PCIe (cuda)").name == "H100 PCIe"
    assert viz.device_spec("NVIDIA H200").mem_tbs == 4.8
    assert viz.device_spec("cpu") is None and viz.device_spec(None) is None
    spec = viz.device_spec("H100")
    # M=1: bytes ~ N*K (the weight); intensity ~ 2 flop/byte -> ~6.7 TFLOP/s at 3.35 TB/s
    n = k = 4096
    ai = viz.arithmetic_intensity(1, n, k, 1, 2)
    assert ai == pytest.approx(2 * n * k / (k + n * k + 2 * n))
    assert viz.roofline_tflops(1, n, k, "fp8", spec) == pytest.approx(ai * 3.35)
    assert viz.roofline_tflops(8192, n, k, "fp8", spec) == spec.peak_tflops["fp8"]
    # bf16 moves twice the bytes: half the memory-bound rate
    assert viz.roofline_tflops(1, n, k, "bf16", spec) == pytest.approx(
        viz.arithmetic_intensity(1, n, k, 2, 2) * 3.35)
    assert viz.gemm_bytes(2, 3, 4, 1, 2) == 2 * 4 + 3 * 4 + 2 * 3 * 2


def test_speedups_and_geomean():
    rows = [_row(m=16, us=10.0), _row(impl="qlin:mosaic_gpu", m=16, us=8.0), _row(m=64, us=20.0),
            _row(impl="qlin:mosaic_gpu", m=64, us=25.0), _row(impl="qlin:mosaic_gpu", m=128, us=1.0),
            _row(impl="qlin:mosaic_gpu", dtype="int8", m=16, us=1.0)]
    s = viz.speedups(rows, "qlin:")
    assert [(d["M"], d["speedup"]) for d in s] == [(16, 1.25), (64, 0.8)]
    assert viz.speedups(rows, "qlin:mosaic_gpu") == s
    assert viz.geomean([d["speedup"] for d in s]) == pytest.approx(1.0)
    assert math.isnan(viz.geomean([]))


def test_time_call_and_live_benchmark():
    calls = []
    us = viz.time_call(lambda: calls.append(1) or jnp.zeros(()), warmup=1, iters=3)
    assert us > 0 and len(calls) == 4
    rows = viz.live_benchmark([1, 8], [(64, 128)], iters=1)
    assert {(r["impl"].split(":")[0], r["dtype"]) for r in rows} >= {("qlin", "fp8"), ("qlin", "int8"), ("xla", "bf16")}
    assert len({(r["impl"], r["dtype"], r["M"]) for r in rows}) == len(rows)
    for r in rows:
        assert set(viz.REQUIRED_KEYS) <= set(r)
        assert r["tflops"] == pytest.approx(2 * r["M"] * r["N"] * r["K"] / r["us"] / 1e6)
        assert r["rel_err"] < (QUANT_RTOL["fp8-e4m3fn"] if r["dtype"] == "fp8" else 2e-2)
    with pytest.raises(ValueError, match="dtypes"):
        viz.live_benchmark([1], [(8, 16)], dtypes=("fp4",))


# -- tiles -----------------------------------------------------------------------------------------

def test_smem_budget_by_hand():
    b = viz.smem_budget(128, 128, 128, 4)
    assert b["operands"] == 4 * (128 * 128 + 128 * 128) and b["epilogue"] == 128 * 128 * 2
    assert b["total"] == 163840 and b["fits"] and b["limit"] == 227 * 1024
    assert b["max_stages"] == (227 * 1024 - 32768) // 32768 == 6
    assert not viz.smem_budget(128, 256, 128, 6)["fits"]
    b = viz.smem_budget(64, 128, 128, 4, epi_tile_m=64, epi_tile_n=64, epi_buffers=2, out_bytes=4)
    assert b["epilogue"] == 2 * 64 * 64 * 4
    with pytest.raises(ValueError, match="stages"):
        viz.smem_budget(64, 64, 64, 0)


def test_smem_budget_for_tuning_config():
    cfg = types.SimpleNamespace(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=4, num_compute_wgs=2,
                                cta_tile_m=128, cta_tile_n=256, epi_tile_m=64, epi_tile_n=64)
    b = viz.smem_budget_for(cfg)
    assert b["operands"] == 4 * (128 + 256) * 128
    assert b["epilogue"] == 2 * 2 * 64 * 64 * 2  # two warpgroups, double-buffered 64x64 bf16 tiles
    cfg.epi_slots = 1
    assert viz.smem_budget_for(cfg)["epilogue"] == 2 * 64 * 64 * 2


def test_smem_budget_for_agrees_with_mosaic_kernel():
    mg = pytest.importorskip("qlin.kernels.mosaic_gpu_scaled_mm")
    if not hasattr(mg, "smem_bytes"):
        pytest.skip("the Mosaic GPU kernel has no smem_bytes")
    for cfg in mg.candidate_configs(4096, 4096, 4096, jnp.float8_e4m3fn):
        ours = viz.smem_budget_for(cfg)["total"]
        theirs = mg.smem_bytes(cfg, jnp.float8_e4m3fn, jnp.bfloat16)
        # the kernel also counts its epilogue vectors and barriers (a few KiB)
        assert abs(theirs - ours) <= 16 * 1024, cfg


def test_tile_stats_by_hand():
    s = viz.tile_stats(200, 300, 1000, 64, 128, 128, num_sms=4)
    assert (s["m_tiles"], s["n_tiles"], s["tiles"], s["waves"]) == (4, 3, 12, 3)
    assert s["last_wave_util"] == 1.0 and s["sm_util"] == 1.0
    assert s["padding"] == pytest.approx(1 - 200 * 300 / (256 * 384))
    assert s["k_steps"] == 8 and s["smem_intensity"] == pytest.approx(2 * 64 * 128 / 192)
    s = viz.tile_stats(128, 128 * 133, 128, 128, 128, 128)
    assert s["waves"] == 2 and s["last_wave_util"] == pytest.approx(1 / 132)


def test_planar_snake_docstring_example():
    lin = np.arange(64)
    i, j = viz.planar_snake(lin, (8, 8), 0, 2)
    grid = np.full((8, 8), -1)
    grid[i, j] = lin
    assert grid[0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert grid[2].tolist() == [30, 28, 26, 24, 22, 20, 18, 16]
    assert grid[7].tolist() == [63, 61, 59, 57, 55, 53, 51, 49]
    with pytest.raises(ValueError, match="minor_dim"):
        viz.planar_snake(lin, (8, 8), 2, 1)


@pytest.mark.parametrize("shape,minor,width", [((8, 8), 0, 2), ((5, 3), 1, 2), ((5, 7), 0, 2), ((7, 9), 1, 4),
                                               ((6, 6), 0, 3), ((3, 5), 1, 1)])
def test_planar_snake_matches_mosaic_gpu(shape, minor, width):
    import jax

    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    lin = np.arange(shape[0] * shape[1])
    a, b = jax.vmap(lambda l: plgpu.planar_snake(l, shape, minor, width))(jnp.asarray(lin, jnp.int32))
    i, j = viz.planar_snake(lin, shape, minor, width)
    np.testing.assert_array_equal(i, np.asarray(a))
    np.testing.assert_array_equal(j, np.asarray(b))


def test_tile_schedule_covers_every_tile_once():
    s = viz.tile_schedule(200, 300, 64, 128, num_sms=5, grid_minor_dim="m", grid_tile_width=2)
    assert s["order"].shape == (4, 3)
    assert sorted(s["order"].ravel().tolist()) == list(range(12))
    assert np.bincount(s["sm"].ravel()).tolist() == [3, 3, 2, 2, 2]
    assert s["wave"].max() == 2
    one = viz.tile_schedule(64, 64, 128, 128)
    assert one["order"].tolist() == [[0]] and one["wave"].tolist() == [[0]]


def test_format_table():
    t = viz.format_table([{"a": 1, "b": 0.123456, "c": True}, {"a": 22, "b": None, "c": False}])
    lines = t.splitlines()
    assert lines[0].split("|")[1:4] == [" a  ", " b      ", " c   "]
    assert "0.1235" in lines[2] and "yes" in lines[2] and "no" in lines[3]
    assert viz.format_table([]) == "(no rows)"


# -- plots -----------------------------------------------------------------------------------------

@pytest.fixture
def plt():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_plots_draw_the_data(plt):
    ax = viz.plot_bars({"fp8": {"a": 0.1, "b": 0.2}, "int8": {"a": 0.01, "b": float("nan")}})
    assert len(ax.patches) == 4 and ax.get_yscale() == "log"
    ax = viz.plot_lines([1, 2, 3], {"x": [1, 2, 3], "y": [3, 2, 1]}, xlabel="s")
    assert len(ax.lines) == 2 and ax.get_xlabel() == "s"
    ax = viz.plot_histograms({"a": np.arange(1, 100.0), "b": np.ones(5)}, logx=True)
    assert len(ax.patches) == 2 and ax.get_xscale() == "log"

    rows = [_row(m=m, us=m / 10 + 5) for m in (1, 16, 256)] + [_row(impl="qlin:k", m=m, us=m / 12 + 4)
                                                               for m in (1, 16, 256)]
    rows += [_row(dtype="bf16", m=m, us=m / 5 + 9) for m in (1, 16, 256)]
    spec = viz.device_spec(rows[0]["device"])
    ax = viz.plot_tflops_vs_m(rows, 4096, 4096, spec=spec)
    labels = [line.get_label() for line in ax.lines]
    assert labels[:3] == ["qlin:k fp8", "xla bf16", "xla fp8"]
    assert sum(lab.startswith("roofline") for lab in labels) == 2  # fp8 and bf16 ceilings
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [r["tflops"] for r in rows[3:6]])
    ax = viz.plot_roofline(rows, spec)
    assert len(ax.collections) == 3 and len(ax.lines) == 2  # fp8/int8 and bf16 ceilings

    ax = viz.plot_tile_schedule(200, 300, 64, 128, num_sms=5)
    assert len(ax.patches) == 12 + 2  # 12 tiles + hatched padding in M and N
    assert sorted(int(t.get_text()) for t in ax.texts) == list(range(12))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["wave 0", "wave 1", "wave 2"]
    budgets = {"a": viz.smem_budget(128, 128, 128, 4), "b": viz.smem_budget(64, 64, 128, 8)}
    ax = viz.plot_smem_budget(budgets)
    assert len(ax.patches) == 4 and ax.lines[0].get_ydata()[0] == pytest.approx(227)
