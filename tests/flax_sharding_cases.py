"""Tensor-parallel cases on 8 CPU devices; run by test_flax_sharding.py in a subprocess that sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts (its own pytest run)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import qlin  # noqa: E402
from qlin.errors import InputError  # noqa: E402
from qlin.flax.sharding import (TPMLP, column_parallel_linear, row_parallel_linear, shard_column_parallel,  # noqa: E402
                                shard_row_parallel)
from qlin.tolerances import kernel_rtol, rel_err  # noqa: E402

if len(jax.devices()) < 8:  # not a skip: the parent test must fail loudly if the flag did not take
    raise RuntimeError(f"expected 8 CPU devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}), got {jax.devices()}")

F32 = jnp.float32
MESH = Mesh(np.array(jax.devices()[:8]), ("tp",))
H, I, M = 64, 256, 12

ROW_CONFIGS = [
    qlin.FP8ScaledMMConfig(out_dtype=F32),
    qlin.FP8ScaledMMConfig(activation="dynamic_per_tensor", weight_granularity="per_tensor", out_dtype=F32),
    qlin.Int8ScaledMMConfig(out_dtype=F32),
    qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32),
    qlin.Int8ScaledMMConfig(symmetric=False, activation="dynamic_per_tensor", out_dtype=F32),
    qlin.FP8ScaledMMConfig(weight_granularity=(16, 16), activation="dynamic_per_group", group_size=16, out_dtype=F32),
    qlin.FP8ScaledMMConfig(weight_granularity=(16, 16), out_dtype=F32),
]
IDS = [c.describe() for c in ROW_CONFIGS]


def _w(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, F32)


def _x(shape, seed=7):
    # a shifted, uneven activation: shards have clearly different per-token ranges
    x = jax.random.normal(jax.random.key(seed), shape, F32) + 0.3
    return x * jnp.linspace(0.2, 3.0, shape[-1])


def _naive_row(x, params, cfg, tp):
    """Row-parallel done WRONG: each shard quantizes its K slice with its own activation scale."""
    kl = params.weight.shape[1] // tp
    cfg32 = dataclasses.replace(cfg, out_dtype=F32)
    parts = []
    for i in range(tp):
        p = qlin.quantize_weight(qlin.quantize.dequantize_weight(params, cfg)[:, i * kl:(i + 1) * kl], cfg)
        parts.append(qlin.linear(x[..., i * kl:(i + 1) * kl], p, cfg32))
    return sum(parts)


def test_column_parallel_layout_scales_follow_n():
    cfg = qlin.Int8ScaledMMConfig(symmetric=False)
    params = qlin.quantize_weight(_w((I, H), 0), cfg)
    placed, bias = shard_column_parallel(params, cfg, MESH, bias=jnp.arange(I, dtype=F32))
    assert placed.weight.sharding.spec == P("tp", None)
    assert placed.weight_scale.sharding.spec == P("tp") and placed.azp_adj.sharding.spec == P("tp")
    assert bias.sharding.spec == P("tp")
    rows = I // 8
    for shard in placed.weight_scale.addressable_shards:
        i = shard.index[0].start // rows
        np.testing.assert_array_equal(shard.data, params.weight_scale[i * rows:(i + 1) * rows])
    for shard in placed.weight.addressable_shards:
        assert shard.data.shape == (rows, H)


@pytest.mark.parametrize("cfg", ROW_CONFIGS[:4] + ROW_CONFIGS[5:], ids=IDS[:4] + IDS[5:])
def test_column_parallel_equals_unsharded(cfg):
    params = qlin.quantize_weight(_w((I, H), 0), cfg)
    b = _w((I,), 3)
    placed, pb = shard_column_parallel(params, cfg, MESH, bias=b)
    x = _x((2, M, H))
    y = jax.jit(lambda x, p, b: column_parallel_linear(x, p, cfg, MESH, bias=b))(x, placed, pb)
    assert y.shape == (2, M, I) and y.sharding.spec == P(None, None, "tp")
    assert rel_err(y, qlin.linear(x, params, cfg, b)) <= kernel_rtol(F32)


@pytest.mark.parametrize("cfg", ROW_CONFIGS, ids=IDS)
def test_row_parallel_equals_unsharded(cfg):
    params = qlin.quantize_weight(_w((H, I), 1), cfg)
    b = _w((H,), 4)
    rp, pb = shard_row_parallel(params, cfg, MESH, bias=b)
    x = _x((3, M, I))
    y = jax.jit(lambda x, r, b: row_parallel_linear(x, r, cfg, MESH, bias=b))(x, rp, pb)
    ref = qlin.linear(x, params, cfg, b)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) <= kernel_rtol(F32)
    if qlin.quantize.activation_granularity(cfg) in ("per_token", "per_tensor"):
        # the test has teeth: per-shard activation scales would be caught
        naive = _naive_row(x, params, cfg, 8) + b
        assert rel_err(naive, ref) > 10 * kernel_rtol(F32)


def test_row_parallel_bf16_static_and_scale_ub():
    x = _x((M, I))
    for cfg, kw in [
        (qlin.FP8ScaledMMConfig(), {"input_scale_ub": jnp.float32(2.0)}),
        (qlin.Int8ScaledMMConfig(symmetric=False, activation="static"),
         dict(zip(("input_scale", "input_zero_point"), qlin.calibrate_static(x, qlin.Int8ScaledMMConfig(
             symmetric=False, activation="static"))))),
    ]:
        params = qlin.quantize_weight(_w((H, I), 2), cfg, **kw)
        rp, _ = shard_row_parallel(params, cfg, MESH)
        assert rp.pad == (32 if not cfg.is_static else 0)  # K/tp = 32
        y = row_parallel_linear(x, rp, cfg, MESH)
        ref = qlin.linear(x, params, cfg)
        assert y.dtype == jnp.bfloat16 and rel_err(y, ref) <= kernel_rtol(jnp.bfloat16)


@pytest.mark.parametrize("cfg", [qlin.FP8ScaledMMConfig(), qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)],
                         ids=lambda c: c.describe())
def test_tp_mlp_equals_single_device(cfg):
    wg, wu, wd = _w((I, H), 10), _w((I, H), 11), _w((H, I), 12)
    b = _w((H,), 13)
    mlp = TPMLP.from_float(wg, wu, wd, cfg, MESH, down_bias=b)
    x = _x((2, M, H))
    y = jax.jit(lambda m, x: m(x))(mlp, x)
    pg, pu, pd = (qlin.quantize_weight(w, cfg) for w in (wg, wu, wd))
    h = jax.nn.silu(qlin.linear(x, pg, cfg)) * qlin.linear(x, pu, cfg)
    ref = qlin.linear(h.astype(cfg.out_dtype), pd, cfg, b)
    assert y.shape == (2, M, H) and y.dtype == cfg.out_dtype
    assert rel_err(y, ref) <= kernel_rtol(cfg.out_dtype)
    if isinstance(cfg, qlin.FP8ScaledMMConfig):
        # the same block on a 2-D mesh, tensor-parallel over 4 devices
        mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
        y2 = TPMLP.from_float(wg, wu, wd, cfg, mesh2, down_bias=b)(x)
        assert rel_err(y2, ref) <= kernel_rtol(cfg.out_dtype)


def test_default_pad_keeps_alignment():
    from qlin.flax.sharding import default_pad

    assert [default_pad(k) for k in (1792, 2048, 96, 32, 48, 7)] == [128, 128, 32, 32, 16, 2]
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    params = qlin.quantize_weight(_w((H, I), 1), cfg)
    x = _x((M, I))
    for pad in (2, 5):  # any pad >= 2 gives the same result (default_pad(32) = 32 is tested elsewhere)
        rp, _ = shard_row_parallel(params, cfg, MESH, pad=pad)
        assert rp.params.weight.shape == (H, 8 * (I // 8 + pad))
        assert rel_err(row_parallel_linear(x, rp, cfg, MESH), qlin.linear(x, params, cfg)) <= kernel_rtol(F32)
    with pytest.raises(InputError, match="pad >= 2"):
        shard_row_parallel(params, cfg, MESH, pad=1)


def test_sharding_bad_input():
    cfg = qlin.FP8ScaledMMConfig()
    with pytest.raises(InputError, match="N=12 must be divisible"):
        shard_column_parallel(qlin.quantize_weight(_w((12, 16), 0), cfg), cfg, MESH)
    with pytest.raises(InputError, match="K=12 must be divisible"):
        shard_row_parallel(qlin.quantize_weight(_w((16, 12), 0), cfg), cfg, MESH)
    grp = qlin.FP8ScaledMMConfig(activation="dynamic_per_group", group_size=32)
    with pytest.raises(InputError, match="group_size=32"):
        shard_row_parallel(qlin.quantize_weight(_w((16, 128), 0), grp), grp, MESH)
    with pytest.raises(InputError, match="not an axis"):
        shard_column_parallel(qlin.quantize_weight(_w((16, 16), 0), cfg), cfg, MESH, axis="model")
    rp, _ = shard_row_parallel(qlin.quantize_weight(_w((16, 64), 0), cfg), cfg, MESH)
    with pytest.raises(InputError, match="K=64"):
        row_parallel_linear(jnp.ones((2, 32)), rp, cfg, MESH)
    with pytest.raises(InputError, match="incompatible shapes"):
        TPMLP.from_float(_w((64, 16), 0), _w((64, 16), 1), _w((16, 32), 2), cfg, MESH)


def test_bench_tp_mlp_tiny_runs_and_checks():
    """benchmarks/bench_tp_mlp.py (what issue 4 runs on GPUs) works end to end at tiny sizes."""
    from qlin.testing import load_script

    bench = load_script("benchmarks/bench_tp_mlp.py")
    result = bench.main(bench._args(["--tiny", "--tokens", "16", "--iters", "1", "--config", "int8"]))
    assert result["all_ok"] and result["devices"] == 8
    impls = {(r["impl"], r["devices"]) for r in result["results"]}
    assert impls == {(i, d) for i in ("bf16", "xla-int8", "qlin") for d in (1, 8)}
    assert all(r["ms"] > 0 and r["rel_err_vs_1_device"] <= kernel_rtol(jnp.bfloat16) for r in result["results"])


def test_tp_mlp_from_qlinears_with_biases():
    from flax import nnx

    from qlin.flax import QLinear

    cfg = qlin.Int8ScaledMMConfig(out_dtype=F32)
    rngs = nnx.Rngs(0)
    init = nnx.initializers.normal(0.3)
    gate, up, down = (QLinear.from_linear(nnx.Linear(i, o, bias_init=init, rngs=rngs), cfg)
                      for i, o in ((H, I), (H, I), (I, H)))
    mlp = TPMLP.from_qlinears(gate, up, down, MESH)
    assert mlp.gate_bias.sharding.spec == P("tp")
    x = _x((M, H))
    ref = down(jax.nn.silu(gate(x)) * up(x))
    assert rel_err(mlp(x), ref) <= kernel_rtol(F32)


@pytest.mark.parametrize("cfg", [qlin.FP8ScaledMMConfig(out_dtype=F32),
                                 qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)], ids=lambda c: c.describe())
def test_shard_qlinear_for_jit_partitioner(cfg):
    from flax import nnx

    from qlin.flax import QLinear
    from qlin.flax.sharding import shard_qlinear

    rngs = nnx.Rngs(1)
    col = QLinear.from_linear(nnx.Linear(H, I, rngs=rngs), cfg, kernel="xla")
    row = QLinear.from_linear(nnx.Linear(I, H, rngs=rngs), cfg, kernel="xla")
    x = _x((2, M, H))
    ref = row(col(x))
    shard_qlinear(col, MESH, "column")
    shard_qlinear(row, MESH, "row")
    assert col.weight_scale[...].sharding.spec == P("tp") and row.weight[...].sharding.spec == P(None, "tp")
    assert row.weight_scale[...].sharding.spec == P(None)
    y = nnx.jit(lambda c, r, x: r(c(x)))(col, row, x)
    assert rel_err(y, ref) <= kernel_rtol(F32)
    with pytest.raises(InputError, match="K=12 must be divisible"):
        shard_qlinear(QLinear(12, 16, config=cfg), MESH, "row")
