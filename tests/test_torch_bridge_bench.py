"""qlin_torch_bridge.bench: GEMM-benchmark rows for the bridge, in qlin bench's row format (CPU here)."""

import pytest

torch = pytest.importorskip("torch")

from qlin_torch_bridge.bench import bridge_rows  # noqa: E402

FORMAT = {"impl", "dtype", "M", "N", "K", "us", "tflops", "rel_err", "device"}


def test_rows_pair_the_bridge_with_the_same_kernel_from_jax():
    rows = bridge_rows([(4, 64, 128)], reps=2, trials=1, device="cpu")
    assert [(r["impl"], r["dtype"]) for r in rows] == [
        ("qlin:torch_bridge", "fp8"), ("qlin:jax_same_kernel", "fp8"),
        ("qlin:torch_bridge", "int8"), ("qlin:jax_same_kernel", "int8")]
    for r in rows:
        assert FORMAT <= set(r) and "error" not in r
        assert (r["M"], r["N"], r["K"]) == (4, 64, 128)
        assert r["us"] > 0 and r["tflops"] == pytest.approx(2 * 4 * 64 * 128 / r["us"] / 1e6, abs=0.006)
        assert r["rel_err"] == 0.0  # the same kernel on the same arrays
    bridge = [r for r in rows if r["impl"] == "qlin:torch_bridge"]
    for r in bridge:
        us_jax = next(j["us"] for j in rows if j["impl"] == "qlin:jax_same_kernel" and j["dtype"] == r["dtype"])
        # The row's us are rounded to 0.01: the ratio of the rounded values is off by up to this much.
        slack = r["us"] / us_jax * (0.005 / r["us"] + 0.005 / us_jax) + 1e-4
        assert r["overhead_vs_jax"] == pytest.approx(r["us"] / us_jax - 1, abs=slack)


def test_a_failing_case_gives_error_rows():
    rows = bridge_rows([(4, 64, 128)], dtypes=("fp8",), reps=1, trials=1, device="cpu", kernel="no_such_kernel")
    assert len(rows) == 2 and all(r["us"] is None and "no_such_kernel" in r["error"] for r in rows)
