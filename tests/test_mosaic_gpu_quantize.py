"""Fused activation quantization (Pallas Mosaic GPU) vs qlin.quantize, bit for bit.

The kernel runs in Mosaic GPU interpret mode on CPU. Interpret mode does not
enforce GPU rules (layouts, TMA box limits, shared-memory budgets), so the real
kernel is also cross-lowered for CUDA on the CPU (the whole Pallas -> Mosaic
GPU lowering runs; only the PTX compile of the serialized module is left to the
GPU runtime).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.errors import InputError
from qlin.kernels import mosaic_gpu_quantize as mq
from qlin.quantize import quantize_activation, quantize_fp8, quantize_int8, quantize_weight


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def _make_x(m, k, dtype, seed=0):
    """Rows of very different magnitudes, an all-zero row, a negative-only row, an outlier row and ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * np.exp2(rng.integers(-6, 7, size=(m, 1)))
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2] = -np.abs(x[2]) - 0.25
    if m > 3:
        x[3, rng.integers(k)] = 3000.0  # saturates fp8 under scale_ub
    if m > 4:
        x[4] = np.round(x[4] * 4) / 4  # quarter steps: round-half-even ties after scaling
    return jnp.asarray(x, dtype)


def _jnp_ref(x, kind, granularity, group_size=None, scale_ub=None, symmetric=True):
    if kind == "fp8":
        q, s = quantize_fp8(x, granularity=granularity, group_size=group_size, scale_ub=scale_ub)
        return q, s, None
    return quantize_int8(x, granularity=granularity, group_size=group_size, symmetric=symmetric)


def _assert_same(got, want):
    for g, w, name in zip(got, want, ("q", "scale", "zero_point")):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=name)


CASES = [
    # kind, granularity, group_size, symmetric, scale_ub, dtype, m, k
    ("fp8", "per_token", None, True, None, jnp.bfloat16, 9, 1024),
    ("fp8", "per_token", None, True, 2.0, jnp.bfloat16, 6, 512),
    ("fp8", "per_token", None, True, None, jnp.float32, 5, 2048),  # f32 rows of 256: two 16-byte vectors per lane
    ("fp8", "per_group", 128, True, None, jnp.bfloat16, 7, 1024),
    ("fp8", "per_group", 64, True, None, jnp.float32, 5, 512),
    ("int8", "per_token", None, True, None, jnp.float16, 8, 768),
    ("int8", "per_token", None, False, None, jnp.bfloat16, 9, 1024),
    ("int8", "per_group", 32, True, None, jnp.bfloat16, 5, 256),
    ("int8", "per_group", 128, False, None, jnp.float32, 6, 512),
    ("int8", "per_group", 256, False, None, jnp.bfloat16, 5, 1024),
]


@pytest.mark.parametrize("kind,gran,group,sym,ub,dtype,m,k", CASES)
@pytest.mark.parametrize("store", ["direct", "tma"])
def test_bit_exact_vs_jnp(kind, gran, group, sym, ub, dtype, m, k, store):
    x = _make_x(m, k, dtype, seed=m * k)
    # max_ctas=2: every CTA walks several rows, wrapping around the shared-memory ring.
    got = mq.quantize_rows(x, kind=kind, granularity=gran, group_size=group, symmetric=sym, scale_ub=ub,
                           interpret=True, max_ctas=2, store=store)
    _assert_same(got, _jnp_ref(x, kind, gran, group, ub, sym))


@pytest.mark.parametrize("m,max_ctas,stages", [(1, None, None), (3, 8, 2), (7, 3, 3), (13, 2, 4)])
def test_any_row_count_and_pipeline_depth(m, max_ctas, stages):
    """Rows per CTA from 0 extra to 7, ring sizes 2..4: no row is skipped, duplicated or mixed up."""
    x = _make_x(m, 512, jnp.bfloat16, seed=m)
    got = mq.quantize_rows(x, kind="int8", granularity="per_token", symmetric=False, interpret=True,
                           max_ctas=max_ctas, stages=stages, store="tma" if m == 7 else "direct")
    _assert_same(got, _jnp_ref(x, "int8", "per_token", symmetric=False))


@pytest.mark.parametrize("m,kw", [(1, dict(kind="fp8", granularity="per_token")),
                                  (3, dict(kind="int8", granularity="per_token", symmetric=False)),
                                  (5, dict(kind="fp8", granularity="per_group", group_size=128))])
@pytest.mark.parametrize("store", ["direct", "tma"])
def test_rows_out_allocates_tile_rows_and_writes_only_m(m, kw, store):
    """rows_out=8: outputs of 8 rows (the GEMM's TMA tile), the first m bit-identical to rows_out=None."""
    x = _make_x(m, 512, jnp.bfloat16, seed=50 + m)
    got = mq.quantize_rows(x, interpret=True, rows_out=8, store=store, **kw)
    want = mq.quantize_rows(x, interpret=True, store=store, **kw)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.shape == (8, *w.shape[1:]) and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g[:m]).view(np.uint8), np.asarray(w).view(np.uint8))
    with pytest.raises(InputError, match="rows_out: expected an int >= M=5"):
        mq.quantize_rows(_make_x(5, 512, jnp.bfloat16), kind="fp8", granularity="per_token", rows_out=4)


@pytest.mark.parametrize("k,gran,group", [(16, "per_token", None), (336, "per_token", None), (200 * 16, "per_token", None),
                                          (96, "per_group", 64), (1000 + 8, "per_group", 128)])
def test_k_padding(k, gran, group):
    """K not a multiple of the chunk layout is zero-padded (exact); ragged last group as in the jnp path."""
    if k % 16:
        k += 16 - k % 16
    x = _make_x(5, k, jnp.bfloat16, seed=k)
    got = mq.quantize_rows(x, kind="fp8", granularity=gran, group_size=group, interpret=True)
    _assert_same(got, _jnp_ref(x, "fp8", gran, group))


def test_scale_ub_caps_and_saturates():
    x = _make_x(5, 256, jnp.float32, seed=3)
    q, s, _ = mq.quantize_rows(x, kind="fp8", granularity="per_token", scale_ub=1.0, interpret=True)
    assert float(jnp.max(s)) <= 1.0 / 448.0 * (1 + 1e-6)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0  # saturated, not NaN
    assert not bool(jnp.any(jnp.isnan(q.astype(jnp.float32))))


def test_no_races_in_pipeline():
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    x = _make_x(7, 512, jnp.bfloat16, seed=11)
    params = plgpu.InterpretGPUParams(detect_races=True)
    for store in ("direct", "tma"):
        got = mq.quantize_rows(x, kind="int8", granularity="per_group", group_size=128, symmetric=False,
                               interpret=params, max_ctas=2, stages=2, store=store)
        jax.block_until_ready(got[0])
        assert not gpu_callbacks.get_races().races_found, store
    _assert_same(got, _jnp_ref(x, "int8", "per_group", 128, symmetric=False))


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 11),
    k16=st.integers(1, 40),
    variant=st.sampled_from([("fp8", "per_token", None, True), ("int8", "per_group", 64, False),
                             ("int8", "per_token", None, True), ("fp8", "per_group", 128, True)]),
    max_ctas=st.integers(1, 4),
)
def test_hypothesis_shapes(m, k16, variant, max_ctas):
    kind, gran, group, sym = variant
    x = _make_x(m, 16 * k16, jnp.bfloat16, seed=m + k16)
    got = mq.quantize_rows(x, kind=kind, granularity=gran, group_size=group, symmetric=sym, interpret=True,
                           max_ctas=max_ctas)
    _assert_same(got, _jnp_ref(x, kind, gran, group, None, sym))


@pytest.mark.parametrize(
    "config,kw",
    [
        (FP8ScaledMMConfig(), dict(input_scale_ub=0.05)),
        (FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group"), {}),
        (Int8ScaledMMConfig(symmetric=False), {}),
        (Int8ScaledMMConfig(activation="dynamic_per_group", group_size=64), {}),
        (Int8ScaledMMConfig(activation="static"), dict(input_scale=0.02)),  # not fused: jnp path
        (FP8ScaledMMConfig(activation="dynamic_per_tensor"), {}),  # not fused: jnp path
    ],
    ids=lambda v: v.describe() if hasattr(v, "describe") else "",
)
def test_fused_quantize_activation_matches_quantize_activation(config, kw):
    w = jax.random.normal(jax.random.key(0), (32, 512), jnp.float32)
    params = quantize_weight(w, config, **kw)
    x = _make_x(6, 512, jnp.bfloat16, seed=5).reshape(2, 3, 512)
    _assert_same(mq.fused_quantize_activation(x, params, config, interpret=True),
                 quantize_activation(x, params, config))


def test_can_fuse_reasons():
    assert mq.can_fuse((4, 4096), jnp.bfloat16, FP8ScaledMMConfig())[0]
    ok, why = mq.can_fuse((4, 4096), jnp.bfloat16, FP8ScaledMMConfig(activation="static"))
    assert not ok and "static" in why
    ok, why = mq.can_fuse((4, 4104), jnp.bfloat16, FP8ScaledMMConfig())
    assert not ok and "16" in why
    ok, why = mq.can_fuse((4, 4096), jnp.bfloat16, Int8ScaledMMConfig(activation="dynamic_per_group", group_size=48))
    assert not ok and "group_size" in why
    ok, why = mq.can_fuse((4, 4096), jnp.bfloat16,
                          Int8ScaledMMConfig(activation="dynamic_per_group", group_size=128, symmetric=False))
    assert not ok and "bit-identical" in why


def test_tma_store_scale_slots_sit_on_the_128_byte_grid():
    """store="tma", per-group: the scale (and zero-point) slots are TMA sources; 8 f32 scales (32 bytes,
    K = 1024 with groups of 128) per slot would put the second slot off TMA's 128-byte shared-memory grid
    (the per-channel GEMM's epilogue vectors faulted exactly so on an H100), so slots are padded."""
    p = mq.plan(7, 1024, jnp.bfloat16, granularity="per_group", group_size=128, store="tma")
    direct = dataclasses.replace(p, store="direct")
    assert p.chunks * 4 < 128
    extra = p.smem_bytes(2, True, False) - direct.smem_bytes(2, True, False)
    assert extra == 2 * p.k_padded + 2 * 128  # q slots + two 128-byte scale slots
    assert p.smem_bytes(2, True, True) - p.smem_bytes(2, True, False) == 2 * 128


# -- the real kernel, cross-lowered for CUDA on the CPU ------------------------------------------

@pytest.mark.parametrize(
    "kw,dtype,m,k",
    [
        (dict(kind="fp8", granularity="per_token"), jnp.bfloat16, 4096, 14336),
        (dict(kind="fp8", granularity="per_token", scale_ub=0.5), jnp.bfloat16, 1000, 4096),
        (dict(kind="fp8", granularity="per_group", group_size=128), jnp.bfloat16, 7, 7168),
        (dict(kind="int8", granularity="per_token", symmetric=False), jnp.float32, 128, 14336),
        (dict(kind="int8", granularity="per_group", group_size=64, symmetric=False), jnp.float16, 1, 4096),
        (dict(kind="int8", granularity="per_token"), jnp.bfloat16, 3, 336),
        (dict(kind="int8", granularity="per_token", symmetric=False, division="ieee"), jnp.bfloat16, 64, 4096),
    ],
)
@pytest.mark.parametrize("store", ["direct", "tma"])
def test_lowers_for_cuda(kw, dtype, m, k, store):
    """The Mosaic GPU lowering enforces what interpret mode does not (layouts, TMA boxes, barriers)."""
    x = jax.ShapeDtypeStruct((m, k), dtype)
    lowered = jax.jit(lambda x: mq.quantize_rows(x, store=store, **kw)).trace(x).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text  # the kernel is a Mosaic GPU custom call, not an XLA fallback


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x,kw,match",
    [
        (jnp.ones((4, 256), jnp.int8), dict(kind="fp8"), "x: expected a bfloat16"),
        (jnp.ones((2, 4, 256), jnp.bfloat16), dict(kind="fp8"), r"x: expected shape \(M, K\)"),
        (jnp.ones((4, 72), jnp.bfloat16), dict(kind="fp8"), "x: K=72 must be a multiple of 16"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="int4"), "kind:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", granularity="per_tensor"), "granularity:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", granularity="per_group"), "group_size:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", granularity="per_group", group_size=48), "group_size:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", group_size=128), "group_size:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="int8", scale_ub=1.0), "scale_ub:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", scale_ub=-1.0), "scale_ub:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", scale_ub=jnp.ones(2)), "scale_ub:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", symmetric=False), "symmetric:"),
        (jnp.ones((4, 256), jnp.bfloat16), dict(kind="fp8", fp8_format="e3m4"), "fp8_format:"),
        (jnp.ones((2, 256 * 256 + 1024), jnp.bfloat16), dict(kind="int8"), "x: K=.* too large"),
        (jnp.ones((2, 256), jnp.bfloat16), dict(kind="int8", stages=1), "stages:"),
        (jnp.ones((2, 256), jnp.bfloat16), dict(kind="int8", store="smem"), "store:"),
        (jnp.ones((2, 256), jnp.bfloat16), dict(kind="int8", division="fast"), "division:"),
    ],
)
def test_bad_input_names_the_argument(x, kw, match):
    with pytest.raises(InputError, match=match):
        mq.quantize_rows(x, interpret=True, **kw)


def test_is_supported_reasons():
    assert mq.is_supported(90) == (True, None)
    ok, why = mq.is_supported(89)
    assert not ok and "sm89" in why and "TMA" in why
    ok, why = mq.is_supported(80)
    assert not ok and "sm80" in why
    if jax.default_backend() == "cpu":
        ok, why = mq.is_supported()
        assert not ok and "CUDA" in why


def test_plan_prefers_more_ctas_per_sm_over_deeper_prefetch(monkeypatch):
    # H100, fp8 per-token, 4096 x 4096: 2-4 stages (8-6 CTAs per SM) 18.8-19.1 us, 8 stages (3 CTAs) 20.1.
    monkeypatch.setattr(mq, "_num_sms", lambda: 132)
    for k in (1024, 2048, 4096, 14336):
        p = mq.plan(4096, k, jnp.bfloat16, granularity="per_token")
        per_sm = lambda st: min(mq._MAX_CTAS_PER_SM, mq._SMEM_PER_SM_USABLE // (  # noqa: E731
            dataclasses.replace(p, stages=st).smem_bytes(2, False, False) + mq._SMEM_RESERVED))
        assert all(per_sm(p.stages) >= per_sm(st) for st in range(2, 9))  # most CTAs per SM
        assert all(per_sm(st) < per_sm(p.stages) for st in range(p.stages + 1, 9))  # then the deepest
    assert mq.plan(4096, 4096, jnp.bfloat16, granularity="per_token").stages == 2  # 8 CTAs per SM
    assert mq.plan(4096, 1024, jnp.bfloat16, granularity="per_token").stages == 8  # 8 CTAs fit anyway


def test_gpu_quantize_check_script_sweep_runs_on_the_cpu(tmp_path, monkeypatch):
    """The GPU script's sweep phase (per scheme, stage / grid / store variants) in its CPU dry run."""
    from qlin.testing import load_script

    script = load_script("benchmarks/gpu_quantize_check.py", "gpu_quantize_check")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert script.main(["--phases", "sweep", "--sweep-schemes", "int8_tok_asym"]) == 0
    import json

    out = json.loads((tmp_path / "quantize_check.json").read_text())
    rows = out["sweep"]
    assert rows and all(r["scheme"] == "int8_tok_asym" and "error" not in r for r in rows)
    assert {r["stages"] for r in rows} >= {2, 3, 4} and out["checks"] == []
    with pytest.raises(SystemExit):
        script.parse_args(["--sweep-schemes", "fp4"])


def test_default_store_takes_tma_for_asymmetric_per_token_int8_at_long_k():
    # Measured on the H100 (h100_quantize_int8_tma.json): the TMA store wins for asymmetric per-token
    # int8 at K = 14336, direct at K = 4096; everything else keeps the version default.
    long_k = mq.TMA_STORE_MIN_K_INT8_ASYM
    assert mq.default_store(long_k, "per_token", symmetric=False) == "tma"
    assert mq.default_store(long_k - 16, "per_token", symmetric=False) == mq.DEFAULT_STORE
    assert mq.default_store(14336, "per_token", symmetric=True) == mq.DEFAULT_STORE
    assert mq.default_store(14336, "per_group", symmetric=False) == mq.DEFAULT_STORE
    p = mq.plan(1000, 14336, jnp.bfloat16, granularity="per_token", symmetric=False)
    assert p.store == "tma"
    assert mq.plan(1000, 14336, jnp.bfloat16, granularity="per_token", symmetric=False, store="direct").store == "direct"
    # and the default quantize_rows at long K (TMA store in interpret mode) is bit-exact too
    x = (jax.random.normal(jax.random.key(3), (5, long_k), jnp.float32) * 3).astype(jnp.bfloat16)
    got = mq.quantize_rows(x, kind="int8", symmetric=False, interpret=True, max_ctas=2)
    want = quantize_int8(x, symmetric=False)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # the plan it now takes at the measured shape lowers for the GPU
    xs = jax.ShapeDtypeStruct((1000, 14336), jnp.bfloat16)
    fn = jax.jit(lambda x: mq.quantize_rows(x, kind="int8", symmetric=False))
    assert "mosaic_gpu" in fn.trace(xs).lower(lowering_platforms=("cuda",)).as_text()[:20000]
