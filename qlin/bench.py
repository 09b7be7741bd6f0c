"""GEMM benchmark: qlin's Mosaic GPU scaled matmul against XLA-native and torch.

``qlin bench`` (and ``benchmarks/bench_gemm.py``) call :func:`main`.

For every (N, K) Llama-3 8B / 70B linear shape and every M of the grid it
times, on the same GPU in the same process:

* ``qlin:mosaic_gpu``  - :func:`qlin.kernels.mosaic_gpu_scaled_mm.scaled_mm`
  (fp8 and int8, per-token x per-channel scales, bf16 out, the tile config of
  :func:`qlin.kernels.autotune.get_config`);
* ``xla``              - ``lax.dot_general`` on the 8-bit operands (f32 / int32
  accumulation) with the same scale epilogue, and a bf16 ``dot``;
* ``torch``            - ``torch._scaled_mm`` (fp8, row-wise scales) and
  ``torch._int_mm`` + the scale epilogue (int8, M > 16 only), when torch has CUDA;
* with ``--dynamic``: the whole dynamic linear, bf16 x -> per-token quantize ->
  matmul, as one jitted function: ``qlin:<kernel>+quant`` (``qlin.kernel_for``'s
  kernel, on an H100 ``mosaic_gpu`` with its fused quantize kernel) and
  ``xla+quant`` (the ``xla`` kernel: jnp quantize + ``dot_general``).

Kernel time is CUPTI's (the sum of the kernels one call launches; JAX through
``jax.experimental.mosaic.gpu.profiler.measure``, torch through the same CUPTI
hooks), the median of ``--iterations`` (>= 20) warm runs.  For small M the
weight fits in L2, so each run rotates over several weight copies (> 100 MB
in all) to measure HBM, not L2.

How the grid fits in a few minutes (the measurement itself is unchanged):

* every program is compiled ahead of time (``jax.jit(f).lower(specs).compile()``)
  on a pool of worker threads, a few cases ahead of the main thread, which only
  runs compiled executables;
* the GPU is used by one thread at a time (:class:`DeviceLock`): the main thread
  while it generates data, times (CUPTI records every kernel of the process) or
  checks, a worker while XLA compiles a program with a dot (XLA's autotuner runs
  candidate kernels on the GPU).  Programs without dots (the Mosaic GPU kernels,
  data generators, the rel_err checkers) and the f32 reference (compiled without
  autotuning: its speed does not matter) compile without the lock, in parallel
  with the timing;
* cases run shape by shape (weights generated once per shape visit, jitted
  generators compiled once per shape), M inside;
* ``rel_err`` is checked on ~500 sampled output rows (every row for small M, and
  rows spread over every power-of-two band of M) against an f32 (HIGHEST)
  reference of those rows computed once per (shape, dtype), plus a NaN/inf
  check of the whole output.

Rows carry ``impl, dtype, M, N, K, us, tflops, rel_err, device`` (+ ``config``,
``ratio_vs_xla``, ``frac_of_peak``, ``weight_floor_us`` / ``x_floor`` for qlin
at M <= 16); the output is a JSON file, a markdown table and (matplotlib
permitting) a PNG plot.  The log prints per-case phase timings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LLAMA3_SHAPES = [  # (N, K)
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),  # 8B
    (10240, 8192),
    (8192, 8192),
    (57344, 8192),
    (8192, 28672),  # 70B
]
M_GRID = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336)]
QUICK_M = [1, 16, 128, 1024, 4096]
# Priority of M, so that a deadline cuts the least informative cases.
M_PRIORITY = [16, 128, 4096, 1, 512, 8192, 64, 256, 1024, 2048]
FIRST_TIER = 5  # the first FIRST_TIER Ms (by priority) run for every shape before the rest

ROTATE_BYTES = 128 << 20  # weight copies per timing sweep exceed the 50 MB L2
ROWS_PER_BAND = 64  # rel_err: sampled output rows per power-of-two band of M

TORCH_INT8_SKIP = "torch._int_mm needs M > 16"
PEAK_NOTE = "peak = the best TF/s measured for that dtype by any impl in this run"


# ----------------------------------------------------------------------------
# Inputs, reference (also used by benchmarks/gpu_check.py).
# ----------------------------------------------------------------------------


def make_operands(m, n, k, dtype: str, seed: int = 0, *, asym: bool = False):
    """Random 8-bit operands + scales (numpy), never zeros."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    if dtype == "int8":
        a = rng.integers(-127, 128, (m, k), dtype=np.int8)
        b = rng.integers(-127, 128, (n, k), dtype=np.int8)
    else:
        a = np.asarray(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32) * 2).astype(jnp.float8_e4m3fn))
        b = np.asarray(jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 2).astype(jnp.float8_e4m3fn))
    a_s = rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32) / math.sqrt(k)
    b_s = rng.uniform(0.5, 1.5, (1, n)).astype(np.float32) / (16 if dtype == "int8" else 1)
    return a, b, a_s, b_s


def reference(a, b, a_s, b_s, bias=None, azp=None, azp_adj=None) -> np.ndarray:
    """float64 reference of the kernel contract, from the same 8-bit operands."""
    af = np.asarray(a).astype(np.float64)
    bf = np.asarray(b).astype(np.float64)
    acc = af @ bf.T
    if azp is not None:
        acc = acc - np.asarray(azp, np.float64) * np.asarray(azp_adj, np.float64)
    y = acc * np.asarray(a_s, np.float64) * np.asarray(b_s, np.float64)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)[None, :]
    return y


def rel_err(out, ref) -> float:
    out = np.asarray(out).astype(np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


# ----------------------------------------------------------------------------
# Implementations (jitted, JAX).
# ----------------------------------------------------------------------------

_DOT_NT = (((1,), (1,)), ((), ()))


@functools.cache
def _qlin_one(config, interpret: bool = False):
    """One jitted scaled_mm call: nested in a multi-copy program it is lowered once, not once per copy."""
    import jax
    import jax.numpy as jnp

    from qlin.kernels import mosaic_gpu_scaled_mm as mm
    from qlin.kernels.mosaic_gpu import uses_xla_gemv

    if interpret and config is not None and config.cluster:
        config = dataclasses.replace(config, cluster=None)  # clusters do not run in interpret mode

    def f(a, b, a_s, b_s):
        if uses_xla_gemv(a.dtype, *a.shape, b.shape[0]):  # what the mosaic_gpu kernel's apply_weights runs
            return _xla_one("int8")(a, b, a_s, b_s)
        return mm.scaled_mm(a, b, a_s, b_s, out_dtype=jnp.bfloat16, config=config, interpret=interpret)

    return jax.jit(f)


@functools.cache
def _xla_one(dtype: str):
    """XLA-native: dot_general on the 8-bit operands + the scale epilogue (bf16: a plain dot)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if dtype == "bf16":

        def f(a, b):
            return lax.dot_general(a, b, _DOT_NT)

        return jax.jit(f)
    acc_t = jnp.int32 if dtype == "int8" else jnp.float32

    def f(a, b, a_s, b_s):
        acc = lax.dot_general(a, b, _DOT_NT, preferred_element_type=acc_t)
        return (acc.astype(jnp.float32) * a_s * b_s).astype(jnp.bfloat16)

    return jax.jit(f)


def qlin_label(config, dtype, m: int, k: int, n: int) -> str:
    """The ``config`` a qlin row reports: the tile config, or ``xla_gemv`` where int8 decode runs XLA's GEMV."""
    from qlin.kernels.mosaic_gpu import uses_xla_gemv

    return "xla_gemv" if uses_xla_gemv(dtype, m, k, n) else config.short()


def qlin_fn(config=None, out_dtype=None):
    import jax
    import jax.numpy as jnp

    if out_dtype is None or jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16):
        return _qlin_one(config)
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    return jax.jit(lambda a, b, a_s, b_s: mm.scaled_mm(a, b, a_s, b_s, out_dtype=out_dtype, config=config))


def xla_fn(dtype: str, out_dtype=None):
    import jax
    import jax.numpy as jnp
    from jax import lax

    if out_dtype is None or jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16) or dtype == "bf16":
        return _xla_one(dtype)
    acc_t = jnp.int32 if dtype == "int8" else jnp.float32

    def f(a, b, a_s, b_s):
        acc = lax.dot_general(a, b, _DOT_NT, preferred_element_type=acc_t)
        return (acc.astype(jnp.float32) * a_s * b_s).astype(out_dtype)

    return jax.jit(f)


def many(one):
    """``sets -> [one(*s) for s in sets]``: one program that runs ``one`` on every weight copy."""

    def f(sets):
        return [one(*s) for s in sets]

    return f


# ----------------------------------------------------------------------------
# Timers: (executable, args, iterations) -> per-iteration milliseconds.
# ----------------------------------------------------------------------------


CUPTI_ATTEMPTS = 3


def cupti_timer(fn, args, iterations: int) -> list[float]:
    """CUPTI kernel time (ms) of each of ``iterations`` warm calls (a warm-up call comes first)."""
    from jax.experimental.mosaic.gpu import profiler

    for attempt in range(CUPTI_ATTEMPTS):
        try:
            _, times = profiler.measure(fn, iterations=iterations)(*args)
            break
        except RuntimeError as e:
            # CUPTI counts every kernel in the window; a stray launch from another thread (seen once
            # in 15 dynamic cases on the H100) makes the count uneven.  Such a window is retaken.
            if "not divisible" not in str(e) or attempt == CUPTI_ATTEMPTS - 1:
                raise
    if times is None:
        raise RuntimeError("CUPTI saw no kernel")
    if not isinstance(times, (list, tuple)):
        times = [times]
    return [float(t) for t in times if t is not None]


def wall_timer(fn, args, iterations: int) -> list[float]:
    """Wall-clock ms per call (after a warm-up): for CPU tests of the pipeline, never for GPU numbers."""
    import jax

    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - t) * 1e3)
    return out


def measure_us(fn, arg_sets, iterations: int = 20, timer=cupti_timer) -> float:
    """Median kernel time (us) of one call of ``fn``, rotating over ``arg_sets``.

    Each timed iteration runs ``fn`` once per arg set (different weight copies)
    and the kernel time is divided by the number of sets.
    """
    import jax

    prog = jax.jit(many(fn))
    jax.block_until_ready(prog(arg_sets))  # compile + warm
    return statistics.median(timer(prog, (arg_sets,), iterations)) * 1e3 / len(arg_sets)


def n_copies(n, k, itemsize=1) -> int:
    w = n * k * itemsize
    return max(1, min(8, math.ceil(ROTATE_BYTES / w)))


def copy_bandwidth_gbs(timer=cupti_timer, mib: int = 1024) -> float:
    """Device copy bandwidth in GB/s, counting bytes read + bytes written (``mib`` MiB each way)."""
    import jax
    import jax.numpy as jnp

    x = jnp.arange(mib << 18, dtype=jnp.uint32)
    f = jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A))
    us = measure_us(f, [(x,)], iterations=20, timer=timer)
    return 2 * x.nbytes / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------
# torch.
# ----------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def torch_skip_reason(dtype: str, m: int) -> str | None:
    """Why torch has no row for this case, or None."""
    return TORCH_INT8_SKIP if dtype == "int8" and m <= 16 else None


def torch_time_us(fn, arg_sets, iterations: int = 30) -> tuple[float, object]:
    """CUDA-event time per call (us), median of ``iterations`` rotations over ``arg_sets``."""
    import torch

    out = None
    for s in arg_sets:
        out = fn(*s)
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        st = torch.cuda.Event(enable_timing=True)
        en = torch.cuda.Event(enable_timing=True)
        st.record()
        for s in arg_sets:
            fn(*s)
        en.record()
        torch.cuda.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / len(arg_sets))
    return statistics.median(times), out


def cupti_callable_us(fn, arg_sets, iterations: int, sync) -> float:
    """CUPTI kernel time per call (us) of a non-JAX callable (torch): the sum of the kernels it
    launches, median over ``iterations`` rotations over ``arg_sets``, after one warm rotation."""
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

    ext = mosaic_gpu_lib._mosaic_gpu_ext
    for s in arg_sets:
        fn(*s)
    sync()
    ext._cupti_init()
    try:
        for _ in range(iterations):
            for s in arg_sets:
                fn(*s)
        sync()
    finally:
        timings = ext._cupti_get_timings(True)
    if not timings or len(timings) % iterations:
        raise RuntimeError(f"CUPTI saw {len(timings or [])} kernels for {iterations} iterations")
    per = len(timings) // iterations
    its = [timings[i * per : (i + 1) * per] for i in range(iterations)]
    names = [name for name, _ in its[0]]
    if any([name for name, _ in it] != names for it in its[1:]):
        raise RuntimeError("kernel names differ between iterations")
    return statistics.median(sum(t for _, t in it) for it in its) * 1e3 / len(arg_sets)


def _torch_operands(dtype, shape, g, dev="cuda"):
    import torch

    if dtype == "fp8":
        return (2 * torch.randn(*shape, device=dev, generator=g)).to(torch.float8_e4m3fn)
    return torch.randint(-127, 128, shape, device=dev, generator=g, dtype=torch.int8)


def _torch_fn(dtype, ta, tas, tbsc):
    import torch

    if dtype == "fp8":

        def fn(tb):
            return torch._scaled_mm(ta, tb.t(), scale_a=tas, scale_b=tbsc, out_dtype=torch.bfloat16)
    else:

        def fn(tb):
            return (torch._int_mm(ta, tb.t()).float() * tas * tbsc).to(torch.bfloat16)

    return fn


def _torch_rel_err(out, ta, tb, tas, tbsc, rows=None) -> float:
    import torch

    out, ta = out.float(), ta.float()  # (8-bit tensors are upcast before any indexing)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    if rows is not None:
        idx = torch.as_tensor(np.asarray(rows), device=out.device)
        out, ta, tas = out[idx], ta[idx], tas[idx]
    ref = (ta @ tb.float().t()) * tas * tbsc
    return float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))


def torch_case(dtype, m, n, k, copies, seed=0, *, iterations=30, timer="cupti", rows=None):
    """(us, rel_err) of torch's 8-bit matmul + the same scale epilogue, or raises.

    fp8: ``torch._scaled_mm`` with row-wise scales (M, 1) x (1, N) and bf16 out;
    int8: ``torch._int_mm`` (int32) followed by the scale epilogue.
    """
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    ta = _torch_operands(dtype, (m, k), g)
    tbs = [_torch_operands(dtype, (n, k), g) for _ in range(copies)]
    tas = torch.rand(m, 1, device="cuda", generator=g) + 0.5
    tbsc = torch.rand(1, n, device="cuda", generator=g) + 0.5
    fn = _torch_fn(dtype, ta, tas, tbsc)
    sets = [(tb,) for tb in tbs]
    if timer == "cupti":
        us = cupti_callable_us(fn, sets, iterations, torch.cuda.synchronize)
    else:
        us, _ = torch_time_us(fn, sets, iterations)
    return us, _torch_rel_err(fn(tbs[0]), ta, tbs[0], tas, tbsc, rows)


# ----------------------------------------------------------------------------
# One benchmark case, compiled on the spot (benchmarks/gpu_check.py uses it).
# ----------------------------------------------------------------------------


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def _gen(key, shape, dtype: str):
    """Random operand on the device: fp8 ~ 2 N(0,1), int8 uniform in [-127, 127], bf16 ~ N(0,1).
    One jitted generator: compiled once per (shape, dtype), reused across cases."""
    return _gen_jit()(key, shape=tuple(shape), dtype=dtype)


@functools.cache
def _gen_jit():
    import jax

    return jax.jit(_gen_impl, static_argnames=("shape", "dtype"))


def _gen_impl(key, shape, dtype: str):
    import jax
    import jax.numpy as jnp

    if dtype == "int8":
        return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)
    if dtype == "fp8":
        return (2 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.float8_e4m3fn)
    if dtype == "bf16":
        return jax.random.normal(key, shape, jnp.bfloat16)
    raise ValueError(f"dtype={dtype!r}")


def _gen_seeded(seed, shape, dtype: str):
    """:func:`_gen` from an int32 seed (an argument, so one compiled program serves every copy)."""
    import jax

    return _gen_impl(jax.random.key(seed), shape, dtype)


def device_operands(m, n, k, dtype: str, copies: int, seed: int = 0):
    """Random operands generated on the device (fast for 470 MB weights)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    ka, ks, kt, *kb = jax.random.split(key, 3 + copies)
    a = _gen(ka, (m, k), dtype)
    bs = [_gen(kk, (n, k), dtype) for kk in kb]
    b_s = jax.random.uniform(kt, (1, n), jnp.float32, 0.5, 1.5) / (16 if dtype == "int8" else 1)
    a_s = jax.random.uniform(ks, (m, 1), jnp.float32, 0.5, 1.5) / math.sqrt(k)
    return a, bs, a_s, b_s


def _ref_rows(x_rows, w, row_s, col_s):
    """f32 (HIGHEST) ``x_rows @ w^T * row_s * col_s``: fp8 x fp8 products are exact in f32 and int8
    sums stay far below f32's relative precision of the bf16 outputs, so this is a sound reference."""
    import jax
    import jax.numpy as jnp

    acc = jax.lax.dot_general(
        x_rows.astype(jnp.float32), w.astype(jnp.float32), _DOT_NT, precision=jax.lax.Precision.HIGHEST
    )
    return acc * row_s * col_s


def device_rel_err(out, a, b, a_s, b_s) -> float:
    """||out - ref|| / ||ref|| with ref = f32 (HIGHEST) dot of the upcast operands, on device."""
    import jax
    import jax.numpy as jnp

    ref = jax.jit(_ref_rows)(a, b, a_s, b_s)
    o = out.astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(o))):
        return float("inf")
    return float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))


def bench_case(
    m,
    n,
    k,
    *,
    dtypes=("fp8", "int8"),
    with_xla=True,
    with_bf16=True,
    with_torch=True,
    config=None,
    iterations=20,
    seed=0,
):
    """Rows for one (M, N, K), compiled and timed on the spot (the grid uses :func:`run`)."""
    import jax
    import jax.numpy as jnp

    from qlin.kernels import autotune

    dev = device_name()
    rows = []

    def row(impl, dtype, us, err, **extra):
        rows.append(make_row(impl, dtype, m, n, k, us, err, dev, **extra))

    ncp = n_copies(n, k)
    for dtype in dtypes:
        a, bs, a_s, b_s = device_operands(m, n, k, dtype, ncp, seed)
        sets = [(a, b, a_s, b_s) for b in bs]
        cfg = config or autotune.get_config(m, n, k, a.dtype, jnp.bfloat16)
        try:
            fn = qlin_fn(cfg)
            us = measure_us(fn, sets, iterations)
            err = device_rel_err(fn(*sets[0]), *sets[0])
            row("qlin:mosaic_gpu", dtype, us, err, config=qlin_label(cfg, a.dtype, m, k, n))
        except Exception as e:  # noqa: BLE001
            row("qlin:mosaic_gpu", dtype, None, None, error=_err(e))
        if with_xla:
            try:
                fx = xla_fn(dtype)
                us = measure_us(fx, sets, iterations)
                row("xla", dtype, us, device_rel_err(fx(*sets[0]), *sets[0]))
            except Exception as e:  # noqa: BLE001
                row("xla", dtype, None, None, error=_err(e))
        if with_torch and torch_available():
            if torch_skip_reason(dtype, m):
                row("torch", dtype, None, None, skipped=torch_skip_reason(dtype, m))
            else:
                try:
                    us, err = torch_case(dtype, m, n, k, ncp, seed)
                    row("torch", dtype, us, err, timer="cupti")
                except Exception as e:  # noqa: BLE001
                    row("torch", dtype, None, None, error=_err(e))
        del sets, bs, a
    if with_bf16:
        key = jax.random.key(seed + 1)
        ka, *kb = jax.random.split(key, 1 + n_copies(n, k, 2))
        a16 = _gen(ka, (m, k), "bf16")
        b16 = [_gen(kk, (n, k), "bf16") for kk in kb]
        try:
            us = measure_us(xla_fn("bf16"), [(a16, bb) for bb in b16], iterations)
            row("xla", "bf16", us, None)
        except Exception as e:  # noqa: BLE001
            row("xla", "bf16", None, None, error=_err(e))
        del b16
    return rows


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return f"{type(e).__name__}: {lines[0]}"[:240]


def make_row(impl, dtype, m, n, k, us, err, device, **extra) -> dict:
    """One result row in the benchmark schema."""
    flops = 2.0 * m * n * k
    r = dict(
        impl=impl,
        dtype=dtype,
        M=m,
        N=n,
        K=k,
        us=us,
        tflops=(flops / (us * 1e-6) / 1e12) if us and us > 0 else None,
        rel_err=err,
        device=device,
    )
    r.update(extra)
    return r


# ----------------------------------------------------------------------------
# The grid: plan, device lock, ahead-of-time compiler.
# ----------------------------------------------------------------------------


def order_ms(ms) -> list[int]:
    """Distinct Ms, most informative first (:data:`M_PRIORITY`, then the others ascending)."""
    rank = {v: i for i, v in enumerate(M_PRIORITY)}
    return sorted(dict.fromkeys(int(v) for v in ms), key=lambda v: (rank.get(v, len(rank)), v))


def plan_cases(shapes, ms, first_tier: int = FIRST_TIER) -> list[tuple[int, int, int]]:
    """``(N, K, M)`` in run order.

    Two tiers of M (the first ``first_tier`` by priority, then the rest); within a tier the
    cases go shape by shape (one weight set per shape visit) with M inside, most informative
    M first.  A deadline therefore cuts second-tier Ms, not whole shapes.
    """
    ms = order_ms(ms)
    shapes = list(dict.fromkeys((int(n), int(k)) for n, k in shapes))
    tiers = [t for t in (ms[:first_tier], ms[first_tier:]) if t]
    return [(n, k, m) for tier in tiers for (n, k) in shapes for m in tier]


def sample_rows(ms, per_band: int = ROWS_PER_BAND) -> np.ndarray:
    """Sorted output rows checked for ``rel_err``: every row below the smallest M, then per band
    ``[M_prev, M)`` of the planned Ms all rows if few, else ``per_band`` evenly spread (first and
    last included).  Case M checks ``rows[rows < M]``: all its rows when M <= per_band."""
    rows: set[int] = set()
    lo = 0
    for m in sorted(set(int(v) for v in ms)):
        if m - lo <= per_band:
            rows.update(range(lo, m))
        else:
            rows.update(int(v) for v in np.linspace(lo, m - 1, per_band).round())
        lo = m
    return np.array(sorted(rows), dtype=np.int64)


class DeviceLock:
    """One user of the GPU at a time.

    CUPTI records every kernel of the process, and XLA's autotuner times candidate kernels on
    the GPU while it compiles a dot: the two must not overlap, nor must the autotuner compete
    with the benchmark's own kernels.  The main thread holds the lock while it runs anything
    on the device; a compile worker holds it while XLA compiles a program with a dot.  Waiters
    go in priority order: the main thread first, then workers by the order their jobs were
    submitted (the next case's compiles before later ones).
    """

    MAIN = -1

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._busy = False
        self._waiting: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self.held_s = {"main": 0.0, "worker": 0.0}

    @contextlib.contextmanager
    def hold(self, priority: int = MAIN):
        token = (priority, next(self._seq))
        with self._cv:
            heapq.heappush(self._waiting, token)
            while self._busy or self._waiting[0] != token:
                self._cv.wait()
            heapq.heappop(self._waiting)
            self._busy = True
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._cv:
                self.held_s["main" if priority == self.MAIN else "worker"] += time.perf_counter() - t
                self._busy = False
                self._cv.notify_all()


def needs_device(lowered) -> bool:
    """Whether XLA may autotune (run kernels on the GPU) while compiling ``lowered``: it has a dot
    or a convolution.  Mosaic GPU kernels are custom calls; their compile runs no kernel."""
    text = lowered.as_text()
    return "stablehlo.dot" in text or "stablehlo.convolution" in text


@dataclasses.dataclass
class Program:
    exe: object
    info: dict
    lower_s: float
    compile_s: float
    lock_wait_s: float
    locked: bool


class Compiler:
    """Ahead-of-time compiles on worker threads: ``submit(key, make)`` with ``make() -> (fn, specs, info)``;
    ``get(key)`` waits for the :class:`Program` (or raises the compile error)."""

    def __init__(self, lock: DeviceLock, workers: int) -> None:
        import jax

        self._jax = jax
        self.lock = lock
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="qlin-bench-compile")
        self.jobs: dict = {}
        self._seq = itertools.count()
        self.totals = {"lower_s": 0.0, "compile_s": 0.0, "locked_compile_s": 0.0, "lock_wait_s": 0.0, "programs": 0}
        self._tl = threading.Lock()

    def submit(self, key, make) -> None:
        if key not in self.jobs:
            self.jobs[key] = self.pool.submit(self._build, next(self._seq), make)

    def _build(self, seq, make) -> Program:
        t0 = time.perf_counter()
        fn, specs, info = make(functools.partial(self.lock.hold, seq))
        info = dict(info)
        # A program whose speed does not matter (the f32 reference) compiles without autotuning, so
        # it runs nothing on the GPU and needs no lock.
        options = {"xla_gpu_autotune_level": 0} if info.pop("_no_autotune", False) else None
        lowered = self._jax.jit(fn).lower(*specs)
        t1 = time.perf_counter()
        locked = options is None and needs_device(lowered)
        wait = 0.0
        if locked:
            with self.lock.hold(seq):
                t2 = time.perf_counter()
                wait = t2 - t1
                exe = lowered.compile()
        else:
            t2 = t1
            exe = lowered.compile(options)
        t3 = time.perf_counter()
        p = Program(exe, info, t1 - t0, t3 - t2, wait, locked)
        with self._tl:
            self.totals["lower_s"] += p.lower_s
            self.totals["compile_s"] += p.compile_s
            self.totals["locked_compile_s"] += p.compile_s if locked else 0.0
            self.totals["lock_wait_s"] += wait
            self.totals["programs"] += 1
        return p

    def get(self, key) -> Program:
        return self.jobs[key].result()

    def drop(self, key) -> None:
        self.jobs.pop(key, None)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _no_lock():
    return contextlib.nullcontext()


def _specs_gemm(m, n, k, dtype, copies):
    import jax
    import jax.numpy as jnp

    S = jax.ShapeDtypeStruct
    dt = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8, "bf16": jnp.bfloat16}[dtype]
    if dtype == "bf16":
        return ([(S((m, k), dt), S((n, k), dt))] * copies,)
    return ([(S((m, k), dt), S((n, k), dt), S((m, 1), jnp.float32), S((1, n), jnp.float32))] * copies,)


def dynamic_config(dtype: str):
    """The dynamic linear of issue 8: per-channel weight scales, dynamic per-token activations, bf16 out."""
    import jax.numpy as jnp

    import qlin

    if dtype == "fp8":
        return qlin.FP8ScaledMMConfig(
            weight_granularity="per_channel", activation="dynamic_per_token", out_dtype=jnp.bfloat16
        )
    return qlin.Int8ScaledMMConfig(
        weight_granularity="per_channel", activation="dynamic_per_token", symmetric=True, out_dtype=jnp.bfloat16
    )


def dynamic_kernel(dtype: str, which: str, *, interpret: bool = False):
    """``which="qlin"``: the kernel ``qlin.kernel_for`` chooses here; ``"xla"``: the xla kernel."""
    import qlin
    from qlin.kernels.xla import XLAKernel

    config = dynamic_config(dtype)
    if which == "xla":
        return XLAKernel(config)
    if interpret:
        from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel

        return MosaicGPUScaledMMKernel(config, interpret=True)
    return qlin.kernel_for(config)


def _raw_params(dtype, w, w_scale):
    from qlin.params import FP8Params, Int8Params

    cls = FP8Params if dtype == "fp8" else Int8Params
    return cls(weight=w, weight_scale=w_scale)


@functools.cache
def _apply_one(kernel):
    import jax

    return jax.jit(kernel.apply_weights)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One timed implementation of a case: ``kind`` is "qlin", "xla", "bf16", "dyn-qlin" or "dyn-xla"."""

    impl: str
    dtype: str
    kind: str


def case_impls(
    dtypes, *, with_gemm=True, with_xla=True, with_bf16=True, dynamic=False, qlin_dyn_name="qlin:mosaic_gpu+quant"
):
    out = []
    for d in dtypes if with_gemm else ():
        out.append(Impl("qlin:mosaic_gpu", d, "qlin"))
        if with_xla:
            out.append(Impl("xla", d, "xla"))
    if with_bf16:
        out.append(Impl("xla", "bf16", "bf16"))
    if dynamic:
        for d in dtypes:
            out += [Impl(qlin_dyn_name, d, "dyn-qlin"), Impl("xla+quant", d, "dyn-xla")]
    return out


class GridBench:
    """Runs planned cases: compiles ahead on workers, times on the main thread (see the module doc)."""

    def __init__(
        self,
        *,
        dtypes=("fp8", "int8"),
        with_gemm=True,
        with_xla=True,
        with_bf16=True,
        with_torch=True,
        dynamic=False,
        iterations=20,
        timer=cupti_timer,
        workers=4,
        lookahead=3,
        max_copies=8,
        rows_per_band=ROWS_PER_BAND,
        interpret=False,
        seed=0,
        log=print,
    ) -> None:
        self.dtypes = tuple(dtypes)
        self.with_torch = with_torch and with_gemm and torch_available()
        self.dynamic = dynamic
        self.iterations = iterations
        self.timer = timer
        self.lookahead = lookahead
        self.max_copies = max_copies
        self.rows_per_band = rows_per_band
        self.interpret = interpret
        self.seed = seed
        self.log = log
        self.lock = DeviceLock()
        self.compiler = Compiler(self.lock, workers)
        self.dyn_kernels = {}
        qname = "qlin:mosaic_gpu+quant"
        if dynamic:
            for d in self.dtypes:
                self.dyn_kernels[("qlin", d)] = dynamic_kernel(d, "qlin", interpret=interpret)
                self.dyn_kernels[("xla", d)] = dynamic_kernel(d, "xla")
            qname = f"qlin:{self.dyn_kernels[('qlin', self.dtypes[0])].name}+quant"
        self.impls = case_impls(
            self.dtypes,
            with_gemm=with_gemm,
            with_xla=with_xla,
            with_bf16=with_bf16,
            dynamic=dynamic,
            qlin_dyn_name=qname,
        )
        self.device = device_name()
        self.rows: list[dict] = []
        self.phases: list[dict] = []
        self.skipped: list[tuple[int, int, int]] = []
        self._pools: dict = {}
        self._cases: list = []
        self.rows_idx = np.zeros(0, np.int64)
        self._group = None
        self._group_key = None

    # -- planning ---------------------------------------------------------------------------------
    def copies(self, n, k, itemsize=1):
        return min(self.max_copies, n_copies(n, k, itemsize))

    def _cnt(self, m):
        return int(np.searchsorted(self.rows_idx, m))

    def _submit(self, n, k, m):
        c = self.compiler
        for imp in self.impls:
            c.submit(("prog", imp, n, k, m), functools.partial(self._make, imp, n, k, m))
        cnt = self._cnt(m)
        c.submit(("check", m, n, cnt), functools.partial(self._make_check, m, n, cnt))
        for key, make in self._group_jobs(n, k):
            c.submit(key, make)

    def _weight_dtypes(self):
        """Weights generated per shape: the 8-bit ones, bf16 for the bf16 GEMM."""
        return list(self.dtypes) + (["bf16"] if any(i.kind == "bf16" for i in self.impls) else [])

    def _act_dtypes(self):
        """Activation pools: 8-bit for the GEMMs, bf16 for the bf16 GEMM and the dynamic linears."""
        gemm = any(i.kind in ("qlin", "xla") for i in self.impls)
        bf16 = any(i.kind in ("bf16", "dyn-qlin", "dyn-xla") for i in self.impls)
        return (list(self.dtypes) if gemm else []) + (["bf16"] if bf16 else [])

    def _ref_inputs(self, d):
        """Reference rows per 8-bit dtype ``d``: from the 8-bit activations (GEMMs), from bf16 (dynamic)."""
        gemm = any(i.kind in ("qlin", "xla") for i in self.impls)
        return ([d] if gemm else []) + (["bf16"] if self.dynamic else [])

    def _group_jobs(self, n, k):
        """The programs a shape visit needs before it starts: generators and f32 references."""
        jobs = []
        for shape, dts in (((n, k), self._weight_dtypes()), ((self.max_m, k), self._act_dtypes())):
            for d in dts:
                jobs.append((("gen", shape, d), functools.partial(self._make_gen, shape, d)))
        return jobs + self._ref_jobs(n, k)

    @staticmethod
    def _make_gen(shape, dtype, lock_factory=None):
        import jax
        import jax.numpy as jnp

        return (lambda seed: _gen_seeded(seed, shape, dtype)), (jax.ShapeDtypeStruct((), jnp.int32),), {}

    def _gen(self, shape, dtype, seed):
        import jax.numpy as jnp

        return self.compiler.get(("gen", tuple(shape), dtype)).exe(jnp.int32(seed % (1 << 31)))

    def _ref_jobs(self, n, k):
        import jax
        import jax.numpy as jnp

        S = jax.ShapeDtypeStruct
        r = len(self.rows_idx)
        dts = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
        jobs = []
        for d in self.dtypes:
            for xin in self._ref_inputs(d):
                xdt = jnp.bfloat16 if xin == "bf16" else dts[d]
                specs = (S((r, k), xdt), S((n, k), dts[d]), S((r, 1), jnp.float32), S((1, n), jnp.float32))
                jobs.append(
                    (("ref", n, k, d, xin, r), lambda _lock, specs=specs: (_ref_rows, specs, {"_no_autotune": True}))
                )
        return jobs

    def _make(self, imp: Impl, n, k, m, lock_factory):
        import jax
        import jax.numpy as jnp

        from qlin.kernels import autotune

        if imp.kind == "qlin":
            dt = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}[imp.dtype]
            with lock_factory() if autotune.autotune_enabled() else _no_lock():
                cfg = autotune.get_config(m, n, k, dt, jnp.bfloat16)
            specs = _specs_gemm(m, n, k, imp.dtype, self.copies(n, k))
            return many(_qlin_one(cfg, self.interpret)), specs, {"config": qlin_label(cfg, dt, m, k, n)}
        if imp.kind == "xla":
            return many(_xla_one(imp.dtype)), _specs_gemm(m, n, k, imp.dtype, self.copies(n, k)), {}
        if imp.kind == "bf16":
            return many(_xla_one("bf16")), _specs_gemm(m, n, k, "bf16", self.copies(n, k, 2)), {}
        # dynamic linear: bf16 x -> quantize -> matmul, through the kernel's apply_weights
        kern = self.dyn_kernels[("qlin" if imp.kind == "dyn-qlin" else "xla", imp.dtype)]
        S = jax.ShapeDtypeStruct
        wdt = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}[imp.dtype]
        raw = _raw_params(imp.dtype, S((n, k), wdt), S((n,), jnp.float32))
        pspec = jax.eval_shape(kern.process_weights_after_loading, raw)
        one = _apply_one(kern)

        def f(sets):
            return [one(p, x) for x, p in sets]

        return f, ([(S((m, k), jnp.bfloat16), pspec)] * self.copies(n, k),), {"kernel": kern.name}

    def _make_check(self, m, n, cnt, lock_factory=None):
        import jax
        import jax.numpy as jnp

        idx = self.rows_idx[:cnt]
        S = jax.ShapeDtypeStruct

        def check(out, ref):
            o = out[idx].astype(jnp.float32)
            r = ref[:cnt]
            err = jnp.linalg.norm(o - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30)
            return jnp.where(jnp.all(jnp.isfinite(out)), err, jnp.inf)

        return check, (S((m, n), jnp.bfloat16), S((len(self.rows_idx), n), jnp.float32)), {}

    # -- data ---------------------------------------------------------------------------------------
    def _pool(self, k, dtype):
        """Host activations (max M, K) per (K, dtype): case M uses the first M rows, so the sampled
        reference rows are the same for every M."""

        key = (k, dtype)
        if key not in self._pools:
            if dtype == "a_s":
                rng = np.random.default_rng(self.seed + k)
                self._pools[key] = (rng.uniform(0.5, 1.5, (self.max_m, 1)) / math.sqrt(k)).astype(np.float32)
            else:
                sub = {"fp8": 1, "int8": 2, "bf16": 3}[dtype]
                self._pools[key] = np.asarray(self._gen((self.max_m, k), dtype, self.seed * 7919 + k * 8 + sub))
        return self._pools[key]

    def _setup_group(self, n, k):
        """Weights (copies), weight scales, reference rows and dynamic params of shape (N, K) (main thread,
        device lock held)."""
        import jax

        self._group = None  # free the previous shape's buffers first
        g = {"w": {}, "ws": {}, "ref": {}, "dyn": {}, "torch": {}}
        base = (self.seed + 1) * 1_000_003 + n * 31 + k
        for j, d in enumerate(self.dtypes):
            cp = self.copies(n, k)
            g["w"][d] = [self._gen((n, k), d, base + 97 * j + i) for i in range(cp)]
            ws = np.random.default_rng(base + 7 + j).uniform(0.5, 1.5, (1, n)).astype(np.float32)
            g["ws"][d] = jax.device_put(ws / 16 if d == "int8" else ws)
            rows = self.rows_idx
            for xin in self._ref_inputs(d):
                p = self.compiler.get(("ref", n, k, d, xin, len(rows)))
                x_rows = jax.device_put(self._pool(k, xin)[rows])
                rs = self._pool(k, "a_s")[rows] if xin != "bf16" else np.ones((len(rows), 1), np.float32)
                g["ref"][(d, xin)] = jax.block_until_ready(p.exe(x_rows, g["w"][d][0], jax.device_put(rs), g["ws"][d]))
            if self.dynamic:
                for which in ("qlin", "xla"):
                    kern = self.dyn_kernels[(which, d)]
                    g["dyn"][(which, d)] = [
                        kern.process_weights_after_loading(_raw_params(d, w, g["ws"][d].reshape(-1))) for w in g["w"][d]
                    ]
        if any(i.kind == "bf16" for i in self.impls):
            g["w"]["bf16"] = [self._gen((n, k), "bf16", base + 500 + i) for i in range(self.copies(n, k, 2))]
        jax.block_until_ready(g["w"])
        if self.with_torch:
            import torch

            tg = torch.Generator(device="cuda").manual_seed(base % (1 << 62))
            for d in self.dtypes:
                g["torch"][d] = (
                    [_torch_operands(d, (n, k), tg) for _ in range(self.copies(n, k))],
                    torch.rand(1, n, device="cuda", generator=tg) + 0.5,
                )
        self._group = g
        self._group_key = (n, k)

    # -- running ------------------------------------------------------------------------------------
    def _time(self, prog, sets):
        t = time.perf_counter()
        times = self.timer(prog.exe, (sets,), self.iterations)
        return statistics.median(times) * 1e3 / len(sets), time.perf_counter() - t

    def _run_case(self, n, k, m, ph):
        import jax

        progs = {}
        t = time.perf_counter()
        for imp in self.impls:
            try:
                progs[imp] = self.compiler.get(("prog", imp, n, k, m))
            except Exception as e:  # noqa: BLE001
                progs[imp] = e
        cnt = self._cnt(m)
        check = self.compiler.get(("check", m, n, cnt))
        if self._group_key != (n, k):
            for key, _ in self._group_jobs(n, k):
                self.compiler.get(key)
        ph["wait_compile_s"] = time.perf_counter() - t
        rows = []
        with self.lock.hold():
            t = time.perf_counter()
            if self._group_key != (n, k):
                self._setup_group(n, k)
                ph["setup_s"] = time.perf_counter() - t
            g = self._group
            acts = {}
            for d in self._act_dtypes():
                acts[d] = jax.device_put(self._pool(k, d)[:m])
            a_s = jax.device_put(self._pool(k, "a_s")[:m])
            for imp in self.impls:
                p = progs[imp]
                if isinstance(p, Exception):
                    rows.append(make_row(imp.impl, imp.dtype, m, n, k, None, None, self.device, error=_err(p)))
                    continue
                try:
                    if imp.kind in ("qlin", "xla"):
                        sets = [(acts[imp.dtype], w, a_s, g["ws"][imp.dtype]) for w in g["w"][imp.dtype]]
                        ref = g["ref"][(imp.dtype, imp.dtype)]
                    elif imp.kind == "bf16":
                        sets = [(acts["bf16"], w) for w in g["w"]["bf16"]]
                        ref = None
                    else:
                        which = "qlin" if imp.kind == "dyn-qlin" else "xla"
                        sets = [(acts["bf16"], pp) for pp in g["dyn"][(which, imp.dtype)]]
                        ref = g["ref"][(imp.dtype, "bf16")]
                    t0 = time.perf_counter()
                    outs = jax.block_until_ready(p.exe(sets))
                    err = float(check.exe(outs[0], ref)) if ref is not None else None
                    del outs
                    t1 = time.perf_counter()
                    us, ts = self._time(p, sets)
                    ph.setdefault("impl_s", {})[f"{imp.impl}/{imp.dtype}"] = dict(
                        lower=round(p.lower_s, 3),
                        compile=round(p.compile_s, 3),
                        locked=p.locked,
                        lock_wait=round(p.lock_wait_s, 3),
                        warm_check=round(t1 - t0, 3),
                        time=round(ts, 3),
                    )
                    rows.append(
                        make_row(imp.impl, imp.dtype, m, n, k, us, err, self.device, copies=len(sets), **p.info)
                    )
                except Exception as e:  # noqa: BLE001
                    rows.append(make_row(imp.impl, imp.dtype, m, n, k, None, None, self.device, error=_err(e)))
            del acts
            if self.with_torch:
                t0 = time.perf_counter()
                rows += self._torch_rows(n, k, m)
                ph["torch_s"] = time.perf_counter() - t0
            ph["run_s"] = time.perf_counter() - t
        return rows

    def _torch_rows(self, n, k, m):
        import torch

        rows = []
        g = torch.Generator(device="cuda").manual_seed(self.seed * 65537 + m)
        for d in self.dtypes:
            why = torch_skip_reason(d, m)
            if why:
                rows.append(make_row("torch", d, m, n, k, None, None, self.device, skipped=why))
                continue
            try:
                tbs, tbsc = self._group["torch"][d]
                ta = _torch_operands(d, (m, k), g)
                tas = torch.rand(m, 1, device="cuda", generator=g) + 0.5
                fn = _torch_fn(d, ta, tas, tbsc)
                sets = [(tb,) for tb in tbs]
                try:
                    us, timer = cupti_callable_us(fn, sets, self.iterations, torch.cuda.synchronize), "cupti"
                except Exception:  # noqa: BLE001 - CUPTI unusable from here: CUDA events
                    us, timer = torch_time_us(fn, sets, max(self.iterations, 30))[0], "cuda_events"
                rows_idx = self.rows_idx[: self._cnt(m)]
                err = _torch_rel_err(fn(tbs[0]), ta, tbs[0], tas, tbsc, rows_idx)
                rows.append(make_row("torch", d, m, n, k, us, err, self.device, copies=len(sets), timer=timer))
            except Exception as e:  # noqa: BLE001
                rows.append(make_row("torch", d, m, n, k, None, None, self.device, error=_err(e)))
        return rows

    def prepare(self, cases) -> None:
        """Plans the sampled rows and starts compiling the first cases (call before other device work)."""
        self._cases = list(cases)
        self.max_m = max(m for _, _, m in cases)
        self.rows_idx = sample_rows([m for _, _, m in cases], self.rows_per_band)
        self._submitted = 0
        self._pump(0)

    def _pump(self, i) -> None:
        while self._submitted < len(self._cases) and self._submitted <= i + self.lookahead:
            self._submit(*self._cases[self._submitted])
            self._submitted += 1

    def run(self, cases, *, deadline_s=None, t0=None, on_case=None) -> list[dict]:
        """Runs ``cases`` ((N, K, M) in order) until ``deadline_s`` after ``t0``; returns the rows."""
        t0 = time.time() if t0 is None else t0
        try:
            for i, (n, k, m) in enumerate(cases):
                if deadline_s is not None and time.time() - t0 > deadline_s:
                    self.skipped += [tuple(c) for c in cases[i:]]
                    break
                if self._cases != list(cases):
                    self.prepare(cases)
                self._pump(i)
                ph = {"N": n, "K": k, "M": m}
                t = time.perf_counter()
                try:
                    rows = self._run_case(n, k, m, ph)
                except Exception as e:  # noqa: BLE001 - one case failing must not lose the rest
                    rows = [
                        make_row(imp.impl, imp.dtype, m, n, k, None, None, self.device, error=_err(e))
                        for imp in self.impls
                    ]
                ph["case_s"] = time.perf_counter() - t
                for imp in self.impls:
                    self.compiler.drop(("prog", imp, n, k, m))
                self.rows += rows
                self.phases.append(ph)
                if on_case:
                    on_case(i, rows, ph)
        finally:
            self.compiler.shutdown()
            self._group = None
        return self.rows


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


def baseline_impl(impl: str) -> str | None:
    """The XLA-native row a row is compared with: ``xla`` for GEMMs, ``xla+quant`` for dynamic linears."""
    if impl.startswith("xla"):
        return None
    return "xla+quant" if impl.endswith("+quant") else "xla"


def _geomean(v):
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def annotate(rows, copy_gbs=None) -> dict:
    """Adds ``ratio_vs_xla`` (XLA time / this time: > 1 is faster than XLA), ``frac_of_peak`` and,
    for qlin rows with M <= 16, ``weight_floor_us`` / ``x_floor`` (weight bytes / measured copy
    bandwidth).  Returns the peak per dtype: ``{dtype: {"tflops", "impl", "M", "N", "K"}}``."""
    ok = [r for r in rows if r.get("us") and r.get("tflops")]
    base = {(r["impl"], r["dtype"], r["M"], r["N"], r["K"]): r["us"] for r in ok if r["impl"].startswith("xla")}
    peak: dict[str, dict] = {}
    for r in ok:
        p = peak.get(r["dtype"])
        if p is None or r["tflops"] > p["tflops"]:
            peak[r["dtype"]] = {key: r[key] for key in ("tflops", "impl", "M", "N", "K")}
    for r in ok:
        b = baseline_impl(r["impl"])
        x = base.get((b, r["dtype"], r["M"], r["N"], r["K"])) if b else None
        if x:
            r["ratio_vs_xla"] = x / r["us"]
        r["frac_of_peak"] = r["tflops"] / peak[r["dtype"]]["tflops"]
        if copy_gbs and r["impl"].startswith("qlin") and r["M"] <= 16:
            itemsize = 2 if r["dtype"] == "bf16" else 1
            r["weight_floor_us"] = r["N"] * r["K"] * itemsize / (copy_gbs * 1e9) * 1e6
            r["x_floor"] = r["us"] / r["weight_floor_us"]
    return peak


def summarize(rows, copy_gbs=None) -> dict:
    """Annotates the rows (:func:`annotate`) and returns, per ``"impl dtype"`` with a timed row,
    ``cases``, ``failed``, ``geomean_vs_xla``, ``worst_vs_xla`` (+ ``worst_case`` "MxNxK"),
    ``wins`` / ``compared`` (cases at least as fast as XLA), ``geomean_frac_of_peak``, ``max_rel_err``."""
    annotate(rows, copy_gbs)
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(
            f"{r['impl']} {r['dtype']}", dict(cases=0, failed=0, _ratios=[], _fracs=[], _errs=[], _worst=None)
        )
        if r.get("skipped"):
            continue
        s["cases"] += 1
        if not r.get("us"):
            s["failed"] += 1
            continue
        if r.get("ratio_vs_xla"):
            s["_ratios"].append(r["ratio_vs_xla"])
            if s["_worst"] is None or r["ratio_vs_xla"] < s["_worst"][0]:
                s["_worst"] = (r["ratio_vs_xla"], f"{r['M']}x{r['N']}x{r['K']}")
        if r.get("frac_of_peak"):
            s["_fracs"].append(r["frac_of_peak"])
        if r.get("rel_err") is not None:
            s["_errs"].append(r["rel_err"])
    for key in list(out):
        s = out[key]
        ratios, fracs, errs, worst = s.pop("_ratios"), s.pop("_fracs"), s.pop("_errs"), s.pop("_worst")
        if not s["cases"]:
            del out[key]
            continue
        s.update(
            geomean_vs_xla=_geomean(ratios),
            worst_vs_xla=worst[0] if worst else None,
            worst_case=worst[1] if worst else None,
            wins=sum(v >= 1.0 for v in ratios),
            compared=len(ratios),
            geomean_frac_of_peak=_geomean(fracs),
            max_rel_err=max(errs) if errs else None,
        )
    return out


COLUMNS = [  # (impl, dtype) in table / plot order
    ("qlin:mosaic_gpu", "fp8"),
    ("xla", "fp8"),
    ("torch", "fp8"),
    ("qlin:mosaic_gpu", "int8"),
    ("xla", "int8"),
    ("torch", "int8"),
    ("xla", "bf16"),
    ("qlin:mosaic_gpu+quant", "fp8"),
    ("xla+quant", "fp8"),
    ("qlin:mosaic_gpu+quant", "int8"),
    ("xla+quant", "int8"),
]


def _columns(rows):
    present = {(r["impl"], r["dtype"]) for r in rows}
    cols = [c for c in COLUMNS if c in present]
    return cols + sorted(present - set(cols))


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"


def _tf(v) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.3g}"


def markdown_table(rows, peak_tflops=None, copy_gbs=None) -> str:
    """Per case: the time (us) of every impl, qlin's speed-up vs XLA, its TF/s and fraction of the
    dtype's peak; then the per-(impl, dtype) summary."""
    summ = summarize(rows, copy_gbs)  # also annotates the rows
    peak = annotate(rows, copy_gbs)
    cols = _columns(rows)
    qcols = [c for c in cols if c[0].startswith("qlin")]
    by = {(r["impl"], r["dtype"], r["N"], r["K"], r["M"]): r for r in rows}
    head = ["N", "K", "M"] + [f"{i} {d} us" for i, d in cols]
    head += [f"{i} {d} x XLA" for i, d in qcols] + [f"{i} {d} TF/s (peak frac)" for i, d in qcols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, k, m in sorted({(r["N"], r["K"], r["M"]) for r in rows}):
        cells = [str(n), str(k), str(m)]
        for i, d in cols:
            r = by.get((i, d, n, k, m))
            if r and r.get("us"):
                cells.append(f"{r['us']:.1f}")
            else:
                cells.append("skip" if r and r.get("skipped") else ("ERR" if r and r.get("error") else "-"))
        for i, d in qcols:
            cells.append(_fmt(by.get((i, d, n, k, m), {}).get("ratio_vs_xla"), ".2f"))
        for i, d in qcols:
            r = by.get((i, d, n, k, m), {})
            cells.append(f"{_tf(r['tflops'])} ({r['frac_of_peak']:.2f})" if r.get("tflops") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "| impl | dtype | cases | failed | geomean x XLA | worst x XLA (MxNxK) | >= XLA | geomean peak frac | max rel_err |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for key, s in summ.items():
        impl, dtype = key.rsplit(" ", 1)
        worst = f"{s['worst_vs_xla']:.2f} ({s['worst_case']})" if s["worst_vs_xla"] else "-"
        wins = f"{s['wins']}/{s['compared']}" if s["compared"] else "-"
        lines.append(
            f"| {impl} | {dtype} | {s['cases']} | {s['failed']} | {_fmt(s['geomean_vs_xla'], '.2f')} | {worst} | "
            f"{wins} | {_fmt(s['geomean_frac_of_peak'], '.2f')} | {_fmt(s['max_rel_err'], '.2e')} |"
        )
    lines.append("")
    for d, p in sorted(peak.items()):
        lines.append(f"- {d} peak {_tf(p['tflops'])} TF/s ({p['impl']}, {p['M']}x{p['N']}x{p['K']}); {PEAK_NOTE}")
    if copy_gbs:
        lines.append(f"- measured copy bandwidth (read+write): {copy_gbs:.0f} GB/s")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    if not shapes:
        return False
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    color = {"fp8": "r", "int8": "b", "bf16": "k"}
    for ax, (n, k) in zip(axes.flat, shapes):
        for impl, dtype in _columns(rows):
            if impl.endswith("+quant"):
                style = "-s" if impl.startswith("qlin") else "-."
            else:
                style = {"xla": "--", "torch": ":"}.get(impl, "-o")
            pts = sorted(
                (r["M"], r["tflops"])
                for r in rows
                if r["impl"] == impl and r["dtype"] == dtype and r["N"] == n and r["K"] == k and r.get("tflops")
            )
            if pts:
                ax.plot(*zip(*pts), color.get(dtype, "g") + style, label=f"{impl} {dtype}", ms=3)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={n} K={k}")
        ax.set_xlabel("M")
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(out, tag, rows, meta) -> Path:
    """``<out>/<tag>.json``: ``{"meta": {...}, "rows": [...]}`` (rows annotated, summary in meta)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["summary"] = summarize(rows, meta.get("copy_gbs"))
    meta["peak_tflops"] = annotate(rows, meta.get("copy_gbs"))
    meta["peak_note"] = PEAK_NOTE
    path = out / f"{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    os.replace(tmp, path)
    return path


def phase_line(i, total, rows, ph) -> str:
    """One log line per case: times and the phases (compile wait, setup, run, per-program compile)."""
    brief = " ".join(
        f"{r['impl']}/{r['dtype']}=" + (f"{r['us']:.1f}" if r.get("us") else ("skip" if r.get("skipped") else "ERR"))
        for r in rows
    )
    imps = ph.get("impl_s", {})
    lower = sum(v["lower"] for v in imps.values())
    comp = sum(v["compile"] for v in imps.values())
    locked = sum(v["compile"] for v in imps.values() if v["locked"])
    timing = sum(v["time"] for v in imps.values())
    warm = sum(v["warm_check"] for v in imps.values())
    return (
        f"[{i + 1}/{total}] M={ph['M']} N={ph['N']} K={ph['K']}: {brief}\n"
        f"    phases: case {ph.get('case_s', 0):.1f}s = wait-compile {ph.get('wait_compile_s', 0):.1f}s"
        f" + setup {ph.get('setup_s', 0):.1f}s + run {ph.get('run_s', 0) - ph.get('setup_s', 0):.1f}s"
        f" (warm+check {warm:.1f}s, timing {timing:.1f}s, torch {ph.get('torch_s', 0):.1f}s);"
        f" its programs (workers): lower {lower:.1f}s, XLA compile {comp:.1f}s ({locked:.1f}s under the device lock)"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qlin bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid")
    p.add_argument("--shapes", default=None, help="N:K,N:K,... (default: Llama-3 8B+70B)")
    p.add_argument("--m", default=None, help="comma-separated M values")
    p.add_argument(
        "--cases",
        default=None,
        help="M:N:K,... explicit cases, run in the given order (instead of the --shapes x --m grid; "
        "e.g. the holes of a merged grid)",
    )
    p.add_argument(
        "--skip-done",
        nargs="+",
        default=None,
        metavar="JSON",
        help="leave out the cases that have qlin rows in these result files (missing files are ignored): one "
        "command continues a grid that a time limit cut, e.g. --skip-done build/grid_*.json",
    )
    p.add_argument("--dtypes", default="fp8,int8")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA-native 8-bit GEMM rows")
    p.add_argument("--dynamic", action="store_true", help="add the dynamic linear rows (quantize + matmul)")
    p.add_argument("--dynamic-only", action="store_true", help="only the dynamic linear rows (qlin+quant vs xla+quant)")
    p.add_argument(
        "--bridge",
        action="store_true",
        help="also time the torch bridge (QuantLinear called on torch tensors) against the same layer called "
        "from JAX, per case: wall-clock per call, host included (needs qlin[torch]); a separate table",
    )
    p.add_argument("--bridge-reps", type=int, default=50, help="back-to-back calls per bridge timing trial")
    p.add_argument("--iterations", type=int, default=20, help="timed runs per case (>= 20 for reported numbers)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 4), help="compile threads")
    p.add_argument("--lookahead", type=int, default=3, help="cases compiled ahead of the one being timed")
    p.add_argument("--max-copies", type=int, default=8, help="cap on the weight copies rotated per timed run")
    p.add_argument("--rows-per-band", type=int, default=ROWS_PER_BAND, help="rel_err: sampled rows per M band")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy-bandwidth measurement")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="gemm")
    p.add_argument("--deadline-s", type=float, default=540.0, help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)
    args.dynamic = args.dynamic or args.dynamic_only
    if args.iterations < 1:
        p.error("--iterations must be >= 1")
    bad = set(args.dtypes.split(",")) - {"fp8", "int8"}
    if bad:
        p.error(f"--dtypes: unknown {sorted(bad)} (fp8, int8)")
    args.shape_list = QUICK_SHAPES if args.quick else LLAMA3_SHAPES
    if args.shapes:
        try:
            args.shape_list = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
            assert all(len(s) == 2 for s in args.shape_list)
        except (ValueError, AssertionError):
            p.error(f"--shapes: expected N:K,N:K,... got {args.shapes!r}")
    args.m_list = QUICK_M if args.quick else M_GRID
    if args.m:
        try:
            args.m_list = [int(v) for v in args.m.split(",")]
        except ValueError:
            p.error(f"--m: expected comma-separated integers, got {args.m!r}")
    args.case_list = None
    if args.cases:
        if args.shapes or args.m or args.quick:
            p.error("--cases replaces the grid: drop --shapes / --m / --quick")
        try:
            cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
            assert cases and all(len(c) == 3 and min(c) >= 1 for c in cases)
        except (ValueError, AssertionError):
            p.error(f"--cases: expected M:N:K,M:N:K,... of positive integers, got {args.cases!r}")
        args.case_list = [(n, k, m) for m, n, k in dict.fromkeys(cases)]
        args.shape_list = list(dict.fromkeys((n, k) for n, k, _ in args.case_list))
        args.m_list = sorted({m for _, _, m in args.case_list})
    if args.skip_done:
        try:
            done = done_cases(args.skip_done)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            p.error(f"--skip-done: cannot read the cases of {args.skip_done}: {type(e).__name__}: {e}")
        planned = args.case_list or plan_cases(args.shape_list, args.m_list)
        args.case_list = [c for c in planned if c not in done]
        if not args.case_list:
            p.error(f"--skip-done: every planned case is already in {args.skip_done}")
        args.shape_list = list(dict.fromkeys((n, k) for n, k, _ in args.case_list))
        args.m_list = sorted({m for _, _, m in args.case_list})
    return args


def done_cases(paths) -> set[tuple[int, int, int]]:
    """(N, K, M) of the cases with a measured qlin row (``us`` set) in the result JSONs ``paths``; missing
    files are skipped (a glob that matched nothing), a failed case is not done (it runs again)."""
    done = set()
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = json.load(f).get("rows", [])
        done.update(
            (r["N"], r["K"], r["M"]) for r in rows if str(r.get("impl", "")).startswith("qlin:") and r.get("us")
        )
    return done


def run(args, *, timer=cupti_timer, interpret=False, log=print) -> tuple[list[dict], dict]:
    """The grid of ``args`` (:func:`parse_args`): writes JSON (after every case), markdown, plot."""
    import jax

    t0 = time.time()
    cases = getattr(args, "case_list", None) or plan_cases(args.shape_list, args.m_list)
    bench = GridBench(
        dtypes=tuple(args.dtypes.split(",")),
        with_gemm=not args.dynamic_only,
        with_xla=not args.no_xla,
        with_bf16=not (args.no_bf16 or args.dynamic_only),
        with_torch=not args.no_torch,
        dynamic=args.dynamic,
        iterations=args.iterations,
        timer=timer,
        workers=args.workers,
        lookahead=args.lookahead,
        max_copies=args.max_copies,
        rows_per_band=args.rows_per_band,
        interpret=interpret,
        log=log,
    )
    if time.time() - t0 <= args.deadline_s:
        bench.prepare(cases)  # the first cases compile while the copy bandwidth is measured
    with bench.lock.hold():
        copy_gbs = copy_bandwidth_gbs(timer, args.copy_mib)
    log(
        f"device {bench.device} jax {jax.__version__} copy bandwidth {copy_gbs:.0f} GB/s; {len(cases)} cases, "
        f"{len(bench.impls)} JAX programs each (+ torch: {bench.with_torch}), {args.workers} compile workers"
    )

    def meta():
        return dict(
            device=bench.device,
            jax=jax.__version__,
            copy_gbs=copy_gbs,
            iterations=args.iterations,
            timer=getattr(timer, "__name__", str(timer)),
            rel_err_rows=f"{len(bench.rows_idx)} sampled rows (all rows for M <= {args.rows_per_band})",
            skipped=bench.skipped,
            wall_s=time.time() - t0,
            compile_totals=bench.compiler.totals,
            device_lock_held_s=bench.lock.held_s,
            phases=bench.phases,
            argv=list(sys.argv[1:]),
        )

    def on_case(i, rows, ph):
        write_results(args.out, args.tag, bench.rows, meta())
        el = time.time() - t0
        left = len(cases) - i - 1
        log(
            phase_line(i, len(cases), rows, ph)
            + f"\n    elapsed {el:.0f}s; at this pace the {left} left need ~{el / (i + 1) * left:.0f}s more"
        )

    # Workers lower Mosaic GPU kernels in Python: a short GIL switch interval keeps the main thread's
    # dispatch of the timed calls from waiting 5 ms for the GIL each time.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        bench.run(cases, deadline_s=args.deadline_s, t0=t0, on_case=on_case)
    finally:
        sys.setswitchinterval(interval)
    m = meta()
    path = write_results(args.out, args.tag, bench.rows, m)
    md = markdown_table(bench.rows, copy_gbs=copy_gbs)
    if bench.skipped:
        md += f"\n- skipped (deadline): {len(bench.skipped)} cases"
    tot = bench.compiler.totals
    done = len(bench.phases)
    md += (
        f"\n- wall {m['wall_s']:.0f}s for {done} cases ({m['wall_s'] / max(done, 1):.1f}s per case); "
        f"compile workers: {tot['programs']} programs, lower {tot['lower_s']:.0f}s, XLA compile {tot['compile_s']:.0f}s "
        f"({tot['locked_compile_s']:.0f}s under the device lock); main thread waited for compiles "
        f"{sum(p.get('wait_compile_s', 0) for p in bench.phases):.0f}s, ran on the device "
        f"{sum(p.get('run_s', 0) for p in bench.phases):.0f}s"
    )
    if getattr(args, "bridge", False):
        bridge = bridge_section(cases, args, interpret=interpret, log=log)
        m["bridge"] = bridge
        path = write_results(args.out, args.tag, bench.rows, m)
        md += "\n\n" + bridge_markdown(bridge)
    (path.parent / f"{args.tag}.md").write_text(md + "\n")
    plot(bench.rows, path.parent / f"{args.tag}.png")
    log(md)
    return bench.rows, m


def bridge_section(cases, args, *, interpret: bool = False, log=print) -> dict:
    """The torch-bridge rows (:func:`qlin_torch_bridge.bench.bridge_rows`) for the grid's cases: the bridge
    (``qlin:torch_bridge``) beside the same layer's jitted call from JAX (``qlin:jax_same_kernel``),
    wall-clock per call with the host included (as a model calls a layer), not CUPTI kernel time: kept
    apart from the GEMM rows.  ``{"rows": [...], "skipped": reason}``."""
    try:
        import torch

        from qlin_torch_bridge.bench import bridge_rows
    except ImportError as e:
        log(f"bridge rows skipped: {e} (pip install 'qlin[torch]')")
        return {"rows": [], "skipped": f"torch bridge unavailable: {e}"}
    device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    shapes = [(m, n, k) for n, k, m in cases]
    rows = bridge_rows(shapes, tuple(args.dtypes.split(",")), reps=args.bridge_reps, device=device)
    for r in rows:
        if r["impl"] == "qlin:torch_bridge" and r.get("us"):
            log(f"bridge {r['dtype']} M={r['M']} N={r['N']} K={r['K']}: {r['us']:.1f} us "
                f"({r['overhead_vs_jax']:+.1%} vs the same layer from JAX)")
    return {"rows": rows, "skipped": None, "device": device}


def bridge_markdown(bridge: dict) -> str:
    """The bridge table: per case and dtype, bridge vs JAX us per call and the bridge's overhead."""
    if bridge.get("skipped"):
        return f"torch bridge: skipped ({bridge['skipped']})"
    by = {(r["impl"], r["dtype"], r["M"], r["N"], r["K"]): r for r in bridge["rows"]}
    lines = [
        "torch bridge: `QuantLinear` on torch tensors vs the same layer's jitted call from JAX "
        "(wall-clock us per call, host included; target overhead <= +5 %)",
        "",
        "| dtype | M | N | K | bridge us | JAX us | overhead | route |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst = None
    for (impl, dt, m, n, k), r in by.items():
        if impl != "qlin:torch_bridge":
            continue
        j = by.get(("qlin:jax_same_kernel", dt, m, n, k), {})
        if not r.get("us") or not j.get("us"):
            lines.append(f"| {dt} | {m} | {n} | {k} | ERR | ERR | - | {r.get('error', '')[:60]} |")
            continue
        ovh = r["overhead_vs_jax"]
        worst = ovh if worst is None else max(worst, ovh)
        lines.append(f"| {dt} | {m} | {n} | {k} | {r['us']:.1f} | {j['us']:.1f} | {ovh:+.1%} | {r.get('route', '-')} |")
    if worst is not None:
        lines += ["", f"worst bridge overhead {worst:+.1%} ({'met' if worst <= 0.05 else 'NOT met'}: <= +5 %)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        print("qlin bench needs a CUDA GPU (Hopper); none found", file=sys.stderr)
        return 2
    if args.iterations < 20:
        print(f"note: --iterations {args.iterations} < 20: not for reported numbers", file=sys.stderr)
    run(args, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
