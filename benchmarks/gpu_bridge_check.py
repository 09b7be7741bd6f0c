"""GPU check of qlin_torch_bridge: zero copy on the GPU, CUDA stream ordering both ways, bridge overhead.

    PYTHONPATH=. python3 benchmarks/gpu_bridge_check.py            # writes $OUT/gpu_bridge_check.json
    PYTHONPATH=. python3 benchmarks/gpu_bridge_check.py --cpu      # dry run of the same checks on the CPU

1. Zero copy: torch CUDA tensors of every bridged dtype -> JAX -> torch; data pointers compared
   (and which fp8 path is used: native DLPack or the re-tagged uint8 capsule).
1b. Direct route (``--only direct``): layers whose Mosaic GPU kernels the bridge launches from torch
   (qlin_torch_bridge/direct.py) against the JAX route of the same layer, bit for bit, on the default
   stream and on a busy side stream (fp8 / int8 / asymmetric int8, padded N / K, split-K, M = 1..4096).
   The overhead rows below also time the JAX route of such layers in the same trials
   (``bridge_jax_route_us``).
2. Stream ordering, on a non-default torch stream:
   torch -> JAX: torch spins the GPU (``torch.cuda._sleep``) then fills x; JAX reads x right away,
   no host sync. Correct iff JAX sees the fill. A control read that opts out of the stream
   protocol (``stream=-1``) shows whether the race is observable at all.
   JAX -> torch: JAX runs a long computation producing y; torch reduces y on its stream right away.
   Host time of each hand-over is recorded apart from the producer's dispatch: a hand-over that
   takes ~the producer's GPU time is a host sync. End to end: ``QuantLinear`` on a busy torch stream.
3. Host breakdown (``host_breakdown_us``): host us per call of each piece of the hot path and of
   alternatives, fp8 at one shape.
4. Overhead, per (config, M, N, K): layers N x K = 14336 x 4096 and 4096 x 4096, M in 1, 16, 256, 1024,
   4096, fp8 and int8 (per-channel weights, dynamic per-token activations, bf16 out):
   ``QuantLinear(x)`` (torch in, torch out) vs the SAME jitted callable the layer uses
   (``state.call(state.leaves, x, bias)``) called from JAX on the same arrays.
   * wall clock: ``reps`` back-to-back calls then one sync, median of ``TRIALS`` interleaved trials
     (``bridge_us`` / ``jax_us`` / ``overhead``); the host time to enqueue them (``*_host_us``);
   * CUDA events on torch's stream around the same back-to-back loops (``*_event_us`` /
     ``event_overhead``; for JAX: x handed over once, the last result handed back once);
   * ``host_steps_us``: host us per call of each step inside the bridge's back-to-back calls
     (check / import / jit / export, and ``export_waits`` = export minus the export of a finished result);
   * device time per call with the host out of the picture (``gpu_us_*_gated``), latency of one call,
     ``torch._scaled_mm`` (fp8) for context. Target: bridge <= 1.05 x JAX.
   A failing case is recorded with its error; past the time budget (env ``BRIDGE_CHECK_BUDGET_S``,
   default 140 s) the remaining rows are marked skipped; the JSON is written after every section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

T_START = time.perf_counter()
#: stop starting new overhead rows after this many seconds (the GPU call is time-limited); the JSON is
#: written after every section, so a run cut short still reports what it measured
BUDGET_S = float(os.environ.get("BRIDGE_CHECK_BUDGET_S", "140"))
TRIALS = 5

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch's allocator

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import qlin  # noqa: E402
from qlin_torch_bridge import QuantLinear, apply_weights, to_jax, to_torch  # noqa: E402
from qlin_torch_bridge import dlpack as bridge_dlpack  # noqa: E402
from qlin_torch_bridge import lifecycle  # noqa: E402
from qlin_torch_bridge.bench import time_calls  # noqa: E402
from qlin_torch_bridge.dlpack import to_jax_hot, to_torch_hot  # noqa: E402

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.int32, torch.bfloat16, torch.float16, torch.float32]
MS = (1, 16, 256, 1024, 4096)
LAYERS = ((14336, 4096), (4096, 4096))  # (N, K): an MLP up/gate projection and a square projection
SHAPES = [(m, n, k) for n, k in LAYERS for m in MS]
CPU_SHAPES = [(m, n, k) for n, k in ((512, 256),) for m in (1, 16, 256)]


def zero_copy(device: str) -> dict:
    rows = []
    for dt in DTYPES:
        t = (torch.randn(256, 512, device=device) * 3).to(dt) if dt not in (torch.int8, torch.int32) else \
            torch.randint(-100, 100, (256, 512), device=device, dtype=dt)
        row = {"dtype": str(dt).removeprefix("torch.")}
        try:
            a = to_jax(t)
            row["to_jax_same_ptr"] = a.unsafe_buffer_pointer() == t.data_ptr()
            row["jax_device"] = str(next(iter(a.devices())))
            row["round_trip_same_ptr"] = to_torch(a).data_ptr() == t.data_ptr()
            owned = a.copy()  # a JAX-allocated buffer
            b = to_torch(owned)
            row["to_torch_same_ptr"] = b.data_ptr() == owned.unsafe_buffer_pointer()
            bytes_of = lambda v: v.view(torch.uint8) if v.element_size() == 1 else v  # noqa: E731
            row["values_equal"] = bool(torch.equal(bytes_of(b), bytes_of(t)))
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    fp8 = {d: bridge_dlpack._native_fp8(d) for d in ("to_jax", "to_torch")}
    align = {}
    try:
        base = torch.zeros(1024, device=device)
        to_jax(base[1:])
        align["offset_view"] = "accepted zero-copy"
    except Exception as e:  # noqa: BLE001
        align["offset_view"] = f"{type(e).__name__}: {str(e)[:200]}"
    return {"rows": rows, "fp8_native_dlpack": fp8, "unaligned_view": align,
            "all_zero_copy": all(r.get("to_jax_same_ptr") and r.get("to_torch_same_ptr")
                                 and r.get("round_trip_same_ptr") and r.get("values_equal") for r in rows)}


class _NoSync:
    """A DLPack producer that opts out of stream synchronisation (stream=-1): the negative control."""

    def __init__(self, t):
        self.t = t

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()

    def __dlpack__(self, *, stream=None, **_):
        return self.t.__dlpack__(stream=-1)


STREAM_PARTS = ("t2j", "control", "j2t", "layer")
SECTIONS = ("zero_copy", "direct", *STREAM_PARTS, "breakdown", "overhead", "probe")
# "probe" (jaxlib import with torch's stream as definition stream) is opt-in: on the H100 it ended the
# process with "free(): double free detected" (jaxlib 0.11.2, torch 2.11) after every other section passed.
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "probe")


def stream_ordering(trials: int = 5, spin_cycles: int = 200_000_000, parts=STREAM_PARTS) -> dict:
    """``parts`` picks sub-checks (torch->JAX, its no-sync control, JAX->torch, the layer), so a fault
    can be pinned to one of them by running each in its own process."""
    out = {"parts": list(parts)}
    s = torch.cuda.Stream()
    n = 1 << 22
    jax.block_until_ready(jnp.all(jnp.zeros(n) == 1.0))  # compile the check before the timing-sensitive part
    ok_t2j, ok_t2j_hot, stale_control, host_t2j, host_t2j_hot = [], [], [], [], []
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(s):
        ev0.record(); torch.cuda._sleep(spin_cycles); ev1.record()
    ev1.synchronize()
    out["gpu_spin_ms"] = round(ev0.elapsed_time(ev1), 2)
    for i in range(trials if "t2j" in parts or "control" in parts else 0):
        for hot in ((False, True) if "t2j" in parts else ()):
            x = torch.zeros(n, device="cuda")
            torch.cuda.synchronize()
            with torch.cuda.stream(s):
                torch.cuda._sleep(spin_cycles)  # keep torch's stream busy ~0.1 s
                x.fill_(float(i + 1))
                t0 = time.perf_counter()
                # no host sync: ordering comes from the DLPack stream protocol
                a = to_jax_hot(x) if hot else to_jax(x, verify=False)
                (host_t2j_hot if hot else host_t2j).append((time.perf_counter() - t0) * 1e3)
                r = jnp.all(a == float(i + 1))
                (ok_t2j_hot if hot else ok_t2j).append(bool(r))
        if "control" not in parts:
            continue
        x2 = torch.zeros(n, device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            torch.cuda._sleep(spin_cycles)
            x2.fill_(float(i + 1))
            try:
                c = jax.dlpack.from_dlpack(_NoSync(x2), copy=False)
                stale_control.append(not bool(jnp.all(c == float(i + 1))))
            except Exception as e:  # noqa: BLE001
                stale_control.append(f"{type(e).__name__}: {str(e)[:120]}")
        torch.cuda.synchronize()
    out["torch_to_jax_correct"] = ok_t2j
    out["torch_to_jax_hot_correct"] = ok_t2j_hot
    out["torch_to_jax_control_saw_stale_data"] = stale_control

    # JAX -> torch: a long JAX computation, then torch reads the result on its own stream at once.
    @jax.jit
    def slow_ones(seed):
        m = jnp.full((2048, 2048), seed, jnp.float32) / 2048.0
        def body(_, acc):
            return jnp.tanh(acc @ m)
        acc = jax.lax.fori_loop(0, 200, body, m)
        return jnp.maximum(acc, seed)  # tanh < = 1 <= seed: all `seed`, but only after the whole chain

    if "j2t" in parts:
        slow_ones(jnp.float32(1)).block_until_ready()
    seeds = [jnp.float32(i + 1) for i in range(trials)]  # on the device before the timed part
    jax.block_until_ready(seeds)
    ok_j2t, ok_j2t_hot, dispatch, host_j2t, host_j2t_hot, consumer = [], [], [], [], [], []
    like = torch.empty(0, device="cuda")
    for i in range(trials if "j2t" in parts else 0):
        for hot in (False, True):
            with torch.cuda.stream(s):
                t0 = time.perf_counter()
                y = slow_ones(seeds[i])
                t1 = time.perf_counter()
                # torch's current stream (s) waits for JAX's computation; no host sync
                t = to_torch_hot(y, like) if hot else to_torch(y, verify=False)
                t2 = time.perf_counter()
                good = torch.all(t == float(i + 1))
                t3 = time.perf_counter()
                s.synchronize()
            (ok_j2t_hot if hot else ok_j2t).append(bool(good))
            (host_j2t_hot if hot else host_j2t).append((t2 - t1) * 1e3)
            dispatch.append((t1 - t0) * 1e3)
            consumer.append((t3 - t2) * 1e3)
    out["jax_to_torch_correct"] = ok_j2t
    out["jax_to_torch_hot_correct"] = ok_j2t_hot
    # host time of the hand-over alone: << the producer's GPU time means no host sync happened
    out["host_ms_torch_to_jax"] = [round(v, 3) for v in host_t2j]
    out["host_ms_torch_to_jax_hot"] = [round(v, 3) for v in host_t2j_hot]
    out["host_ms_jax_to_torch"] = [round(v, 3) for v in host_j2t]
    out["host_ms_jax_to_torch_hot"] = [round(v, 3) for v in host_j2t_hot]
    out["host_ms_jax_producer_dispatch"] = [round(v, 3) for v in dispatch]
    out["host_ms_torch_consumer_enqueue"] = [round(v, 3) for v in consumer]
    if "j2t" in parts:
        t0 = time.perf_counter()
        slow_ones(jnp.float32(1)).block_until_ready()
        out["jax_producer_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    skipped = {"correct": True, "trials": [], "host_ms_layer_call": []}  # not run: nothing to fail
    out["layer"] = _layer_on_busy_stream(s, spin_cycles, trials) if "layer" in parts else skipped
    out["ok"] = (all(ok_t2j) and all(ok_j2t) and all(ok_t2j_hot) and all(ok_j2t_hot)
                 and out["layer"]["correct"])
    return out


def _layer_on_busy_stream(s, spin_cycles: int, trials: int) -> dict:
    """QuantLinear end to end while torch's stream is busy: x is written after a GPU spin, the layer
    runs at once, torch reduces its output at once. Correct iff JAX waited for x and torch for y."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    q = QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig())
    src = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = q(src).float().sum(dim=1)
        torch.cuda.synchronize()
        correct, host = [], []
        for _ in range(trials):
            x = torch.zeros_like(src)
            torch.cuda.synchronize()
            with torch.cuda.stream(s):
                torch.cuda._sleep(spin_cycles)
                x.copy_(src)
                t0 = time.perf_counter()
                y = q(x)
                host.append((time.perf_counter() - t0) * 1e3)
                got = y.float().sum(dim=1)
            s.synchronize()
            correct.append(bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-2)))
    return {"correct": all(correct), "trials": correct, "host_ms_layer_call": [round(v, 3) for v in host]}


DIRECT_CASES = [  # (config, M, N, K): decode, unaligned M / N / K (padded), split-K, clusters, swap-AB, mid and large M
    # (the first two: swapped decode tiles with K split between the two CTAs of a cluster)
    (qlin.FP8ScaledMMConfig(), 1, 4096, 4096),
    (qlin.FP8ScaledMMConfig(), 16, 4096, 14336),
    (qlin.FP8ScaledMMConfig(), 100, 13653, 4000),
    (qlin.FP8ScaledMMConfig(weight_granularity="per_tensor", out_dtype=jnp.float16), 256, 1024, 4096),
    (qlin.FP8ScaledMMConfig(out_dtype=jnp.float32), 4096, 4096, 4096),
    (qlin.Int8ScaledMMConfig(), 1, 4096, 4096),  # (the JAX route runs the K-split cluster kernel here, not the GEMV)
    (qlin.Int8ScaledMMConfig(), 1, 6144, 4096),  # the JAX route runs XLA's int8 GEMV here
    (qlin.Int8ScaledMMConfig(), 5, 14336, 4096),
    (qlin.Int8ScaledMMConfig(), 1000, 1000, 4096),
    (qlin.Int8ScaledMMConfig(symmetric=False), 7, 4096, 4000),
    (qlin.Int8ScaledMMConfig(symmetric=False), 333, 4096, 14336),
    # clusters of two CTAs multicasting the weight tile (mid M, long K), the last row tile partial
    (qlin.FP8ScaledMMConfig(), 500, 4096, 14336),
    (qlin.Int8ScaledMMConfig(symmetric=False), 512, 4096, 14336),
    # K split between the two CTAs of a cluster: the small-M tile (asymmetric int8) and the mid-M tile, f32 output
    (qlin.Int8ScaledMMConfig(symmetric=False), 64, 4096, 14336),
    (qlin.FP8ScaledMMConfig(out_dtype=jnp.float32), 100, 4096, 14336),
    # XLA-summed split-K: swapped decode tiles with f32 output
    (qlin.FP8ScaledMMConfig(out_dtype=jnp.float32), 1, 4096, 14336),
    # swap-AB decode without any K split (the transposed store)
    (qlin.FP8ScaledMMConfig(), 3, 8192, 8192),
    (qlin.FP8ScaledMMConfig(weight_granularity="per_tensor", out_dtype=jnp.float16), 12, 8192, 28672),
]


def direct_check(device: str) -> dict:
    """The direct route (qlin_torch_bridge/direct.py: the Mosaic GPU kernels launched from torch) vs the
    JAX route of the same layer: bit-identical outputs (fresh random inputs and bias, NaN-poisoned
    allocator), on the default stream and on a side stream (events fence the launches)."""
    if device != "cuda":
        return {"skipped": "no CUDA device"}
    rows = []
    side = torch.cuda.Stream()
    for i, (cfg, m, n, k) in enumerate(DIRECT_CASES):
        row = {"config": cfg.describe(), "M": m, "N": n, "K": k}
        try:
            torch.manual_seed(100 + i)
            lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
            q = QuantLinear.from_linear(lin, cfg)
            state = q._qlin_state
            row["direct"] = state.direct is not None
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
            with torch.no_grad():
                poison = torch.full((max(m, 8) * n * 4 + 4096,), float("nan"), device="cuda")
                del poison  # the allocator hands this NaN-filled block out next
                y_direct = state.direct(x, q.bias) if state.direct is not None else None
                y_jax = to_torch(state.call(state.leaves, to_jax(x), to_jax(q.bias)))
                torch.cuda.synchronize()
                row["direct_ran"] = y_direct is not None
                if y_direct is not None:
                    row["bit_exact"] = bool(torch.equal(y_direct, y_jax))
                    row["max_abs_diff"] = float((y_direct.float() - y_jax.float()).abs().max())
                    row["nan"] = int(torch.isnan(y_direct.float()).sum())
                    with torch.cuda.stream(side):  # a side stream: the event fences
                        torch.cuda._sleep(50_000_000)
                        x2 = x * 1  # written on the side stream after the spin
                        y_side = q(x2)
                        same = torch.equal(y_side, y_jax)
                    side.synchronize()
                    row["side_stream_bit_exact"] = bool(same)
            row["ok"] = bool(row.get("bit_exact") and row.get("side_stream_bit_exact") and not row.get("nan"))
        except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}", trace=traceback.format_exc()[-1500:])
        rows.append(row)
        print(f"direct {row['config']} M={m} N={n} K={k}: {'OK' if row['ok'] else 'FAIL'} "
              f"{ {k_: v for k_, v in row.items() if k_ not in ('config', 'trace')} }", flush=True)
    shared = _shared_kernels_check()
    print(f"direct: layers sharing compiled kernels: {'OK' if shared['ok'] else 'FAIL'} {shared}", flush=True)
    return {"rows": rows, "shared_kernels": shared, "ok": all(r["ok"] for r in rows) and shared["ok"]}


def _shared_kernels_check(m: int = 64, n: int = 4096, k: int = 4096, calls: int = 3) -> dict:
    """Two layers of one shape (different weights, one with a bias): the second compiles nothing (it
    shares the first's kernels and quantize buffers) and both stay bit-identical to their own JAX
    route over interleaved calls with fresh inputs."""
    from qlin_torch_bridge import direct as bridge_direct

    try:
        qs = []
        for i in range(2):
            torch.manual_seed(200 + i)
            lin = torch.nn.Linear(k, n, bias=bool(i), device="cuda", dtype=torch.bfloat16).requires_grad_(False)
            qs.append(QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig()))
        compiled, exact = [], []
        with torch.no_grad():
            for c in range(calls):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * (1 + c)
                for q in qs:
                    before = len(bridge_direct._KERNELS)
                    st = q._qlin_state
                    y = q(x)
                    compiled.append(len(bridge_direct._KERNELS) - before)
                    bj = None if q.bias is None else to_jax(q.bias)
                    exact.append(bool(torch.equal(y, to_torch(st.call(st.leaves, to_jax(x), bj)))))
        torch.cuda.synchronize()
        # the first layer's first call compiles the quantize and its GEMM; the second (bias) its GEMM only
        return {"kernels_compiled_per_call": compiled, "bit_exact": exact,
                "ok": all(exact) and compiled[0] == 2 and compiled[1] == 1 and not any(compiled[2:])}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def _interleaved(fns: dict, syncs: dict, reps: int, trials: int = TRIALS) -> dict:
    """Median (wall, host) per name over ``trials`` rounds, the candidates interleaved in each round."""
    for name, fn in fns.items():  # warm: compile, allocator, caches
        fn(); fn(); syncs[name]()
    samples = {name: [] for name in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            samples[name].append(time_calls(fn, syncs[name], reps))
    return {name: (statistics.median(w for w, _ in v), statistics.median(h for _, h in v))
            for name, v in samples.items()}


def _event_us(loops: dict, reps: int, trials: int = TRIALS) -> dict:
    """CUDA-event time per call: events on torch's current stream around ``loops[name]()`` (``reps``
    back-to-back calls ending in a torch tensor torch's stream waits for), median of ``trials``, interleaved.
    Host gaps count (a host-bound loop keeps the GPU idle between calls) -- as in a real model."""
    samples = {name: [] for name in loops}
    for _ in range(trials):
        for name, loop in loops.items():
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            ev0.record()
            out = loop()
            ev1.record()
            ev1.synchronize()
            samples[name].append(ev0.elapsed_time(ev1) * 1e3 / reps)
            del out
    return {name: statistics.median(v) for name, v in samples.items()}


def _latency(fn, sync, reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(); sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def _gated_device_us(q, x, leaves, call, bj, n: int = 20, spin_cycles: int = 100_000_000) -> tuple[float, float]:
    """Device time per call with the host out of the picture: torch's stream spins while ``n`` calls are
    queued behind it, CUDA events time the queued work. Bridge: ``n`` ``q(x)`` calls (each: torch -> JAX
    stream hand-over, kernel, JAX -> torch hand-over). JAX: ``x`` handed over once, ``n`` kernel calls,
    the last result handed back once. The difference is what the per-call stream hand-overs cost the GPU."""
    out = []
    for bridged in (True, False):
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(spin_cycles)
        ev0.record()
        if bridged:
            for _ in range(n):
                y = q(x)
        else:
            xj = to_jax_hot(x)
            for _ in range(n):
                yj = call(leaves, xj, bj)
            y = to_torch_hot(yj, x)
        ev1.record()
        torch.cuda.synchronize()
        out.append(ev0.elapsed_time(ev1) * 1e3 / n)
        del y
    return out[0], out[1]


def hot_path_steps(q, x, reps: int, sync) -> dict:
    """Host us per call of each step of ``apply_weights``'s steady state, timed inside back-to-back calls
    (the same functions in the same order as ``lifecycle.apply_weights``):

    * ``check``: are the layer's parameters the ones read (identity, address, ``_version``)?
    * ``import``: ``x`` to JAX (torch -> JAX stream hand-over + jaxlib's DLPack import)
    * ``jit``: the jitted kernel call (JAX's dispatch; what the JAX baseline pays per call)
    * ``export``: the result to torch (jaxlib's DLPack export onto torch's stream + torch's import)
    * ``export_ready``: the same export of a result that is already computed: ``export - export_ready``
      is how long the export waits for JAX to launch the computation it just dispatched
    ``fast_paths``: whether import/export took the cached-route fast paths (else the public DLPack APIs).
    """
    st = q._qlin_state
    pc = time.perf_counter
    if st.direct is not None:  # the direct route (Mosaic GPU kernels launched from torch): no JAX steps
        sync()
        t0 = pc()
        for _ in range(reps):
            keep = st.direct(x, q.bias)
        total = (pc() - t0) / reps * 1e6
        sync()
        del keep
        nan = float("nan")
        return {"route": "direct", "direct_call": round(total, 2), "total": round(total, 2),
                "check": nan, "import": nan, "jit": nan, "export": nan, "export_waits": nan}
    route, bj, checks = st.route, st.bias_jax, st.checks
    tot = [0.0, 0.0, 0.0, 0.0]
    fast = route is not None
    keep = None
    sync()
    for _ in range(reps):
        t0 = pc()
        lifecycle._unchanged_fast(q, checks)
        t1 = pc()
        xj = bridge_dlpack.import_hot(x, route) if route is not None else None
        if xj is None:
            fast, xj = False, to_jax_hot(x)
        t2 = pc()
        y = st.call(st.leaves, xj, bj)
        t3 = pc()
        t = bridge_dlpack.export_hot(y, route) if route is not None and st.export_ok else None
        if t is None:
            fast, t = False, to_torch_hot(y, x)
        t4 = pc()
        keep = t  # dropped one call later, as in a model (the previous activation is freed)
        tot[0] += t1 - t0; tot[1] += t2 - t1; tot[2] += t3 - t2; tot[3] += t4 - t3
    sync()
    y_ready = st.call(st.leaves, bridge_dlpack.to_jax(x), bj)
    jax.block_until_ready(y_ready)
    t0 = pc()
    for _ in range(reps):
        keep = to_torch_hot(y_ready, x)
    ready = (pc() - t0) / reps * 1e6
    sync()
    del keep
    res = {name: round(v / reps * 1e6, 2) for name, v in zip(("check", "import", "jit", "export"), tot)}
    res["total"] = round(sum(tot) / reps * 1e6, 2)
    res["export_ready"] = round(ready, 2)
    res["export_waits"] = round(res["export"] - ready, 2)
    res["fast_paths"] = fast
    return res


def breakdown(device: str = "cuda", reps: int = 50, m: int = 16, n: int = 4096, k: int = 4096) -> dict:
    """Host microseconds per call of pieces of the bridge's hot path and of alternatives (fp8, M x N x K)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
    q = QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig())
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    st = q._qlin_state
    xj, bj = to_jax(x), to_jax(q.bias)
    route = bridge_dlpack._route(x)
    y_ready = st.call(st.leaves, xj, bj)
    y_ready.block_until_ready()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    keep = []

    def per_call(fn):
        fn(); sync(); jax.block_until_ready(y_ready)
        t0 = time.perf_counter()
        for _ in range(reps):
            keep.append(fn())
        t1 = time.perf_counter()
        sync()
        for v in keep:
            if isinstance(v, jax.Array):
                v.block_until_ready()
        keep.clear()
        sync()
        return round((t1 - t0) / reps * 1e6, 2)

    with torch.no_grad():
        q(x)
        res = {
            "check": per_call(lambda: lifecycle._unchanged_fast(q, st.checks)),
            "t2j_event_hop": per_call(route.order_after_torch),
            "t2j_torch_capsule": per_call(lambda: torch.utils.dlpack.to_dlpack(x)),
            "t2j_import_hot": per_call(lambda: bridge_dlpack.import_hot(x, st.route)),
            "t2j_public_jax_from_dlpack": per_call(lambda: jax.dlpack.from_dlpack(x)),
            "j2t_export_hot_ready": per_call(lambda: to_torch_hot(y_ready, x)),
            "j2t_public_torch_from_dlpack_ready": per_call(lambda: torch.from_dlpack(y_ready)),
            "jit_call": per_call(lambda: st.call(st.leaves, xj, bj)),
            "jit_call_pytree": per_call(lambda: st.apply(st.params, xj, bj)),
            "jit_call_then_export_hot": per_call(lambda: to_torch_hot(st.call(st.leaves, xj, bj), x)),
            "jit_call_then_unsafe_buffer_pointer": per_call(lambda: st.call(st.leaves, xj, bj).unsafe_buffer_pointer()),
            "import_hot_then_jit_call": per_call(lambda: st.call(st.leaves, bridge_dlpack.import_hot(x, st.route), bj)),
            "apply_weights": per_call(lambda: apply_weights(q, x, q.bias)),
            "bridge_call": per_call(lambda: q(x)),
        }
    res["export_waits_for_launch_us"] = round(res["jit_call_then_export_hot"] - res["jit_call"]
                                              - res["j2t_export_hot_ready"], 2)
    res["shape"] = [m, n, k]
    return res


def probe_import_on_torch_stream() -> str:
    """Does jaxlib accept torch's own stream as an import's definition stream (one stream hop fewer)?
    Run last: a refusal deep in the runtime must not cost the other results."""
    x = torch.ones(1024, device="cuda")
    route = bridge_dlpack._route(x)
    try:
        a = bridge_dlpack._RAW_IMPORT(torch.utils.dlpack.to_dlpack(x), route.jax_device, route.torch_stream(),
                                      False, route.dl_type)
        return f"accepted ({a.shape})"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:160]}"


def _row(device: str, cfg, m: int, n: int, k: int, reps: int, kernel: str | None) -> dict:
    cuda = device == "cuda"
    sync_t = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    lin.requires_grad_(False)
    q = QuantLinear.from_linear(lin, cfg, kernel=kernel)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    state = q._qlin_state
    # the bridge's own jitted callable and leaves: "the same qlin kernel, called from JAX"
    xj, bj, leaves, call = to_jax(x), to_jax(q.bias), state.leaves, state.call
    last = {}

    def bridge():
        last["y"] = q(x)

    def pure():
        last["yj"] = call(leaves, xj, bj)

    direct_route = state.direct

    def bridge_jax_route():  # the same layer with the direct route switched off: DLPack + jitted call
        state.direct = None
        try:
            last["y2"] = q(x)
        finally:
            state.direct = direct_route

    syncs = {"bridge": sync_t, "jax": lambda: last["yj"].block_until_ready(), "bridge_jax_route": sync_t}
    row = {"config": cfg.describe(), "kernel": q.kernel.name, "M": m, "N": n, "K": k,
           "route": "direct" if direct_route is not None else "jax"}
    with torch.no_grad():
        fns = {"bridge": bridge, "jax": pure}
        if direct_route is not None:
            fns["bridge_jax_route"] = bridge_jax_route
        t = _interleaved(fns, syncs, reps)
        (t_bridge, h_bridge), (t_jax, h_jax) = t["bridge"], t["jax"]
        if "bridge_jax_route" in t:
            row["bridge_jax_route_us"] = round(t["bridge_jax_route"][0], 2)
            row["jax_route_overhead"] = round(t["bridge_jax_route"][0] / t_jax - 1, 4)
        row.update({
            "bridge_us": round(t_bridge, 2), "jax_us": round(t_jax, 2), "overhead": round(t_bridge / t_jax - 1, 4),
            "bridge_host_us": round(h_bridge, 2), "jax_host_us": round(h_jax, 2),
            "bridge_extra_host_us": round(h_bridge - h_jax, 2),
            # the GPU idles between calls when enqueueing takes ~ as long as the call
            "jax_host_bound": h_jax >= 0.9 * t_jax,
        })
        if cuda:
            def bridge_loop():
                for _ in range(reps):
                    y = q(x)
                return y

            def jax_loop():
                xj_ = to_jax_hot(x)  # ordered after the start event, like the bridge's first call
                for _ in range(reps):
                    yj = call(leaves, xj_, bj)
                return to_torch_hot(yj, x)  # torch's stream (and the end event) waits for the last call

            try:
                ev = _event_us({"bridge": bridge_loop, "jax": jax_loop}, reps)
                row.update({"bridge_event_us": round(ev["bridge"], 2), "jax_event_us": round(ev["jax"], 2),
                            "event_overhead": round(ev["bridge"] / ev["jax"] - 1, 4)})
            except Exception as e:  # noqa: BLE001 - keep the wall-clock numbers
                row["event_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        try:
            row["host_steps_us"] = hot_path_steps(q, x, reps, sync_t)
        except Exception as e:  # noqa: BLE001
            row["host_steps_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        l_bridge = _latency(bridge, sync_t, max(reps // 2, 5))
        l_jax = _latency(pure, syncs["jax"], max(reps // 2, 5))
    row.update({"bridge_latency_us": round(l_bridge, 2), "jax_latency_us": round(l_jax, 2),
                "latency_overhead": round(l_bridge / l_jax - 1, 4),
                "tflops_bridge": round(2 * m * n * k / t_bridge / 1e6, 2)})
    if cuda:
        try:
            with torch.no_grad():
                g_bridge, g_jax = _gated_device_us(q, x, leaves, call, bj)
            row["gpu_us_bridge_gated"], row["gpu_us_jax_gated"] = round(g_bridge, 2), round(g_jax, 2)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            row["gpu_gated_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    with torch.no_grad():
        row["max_abs_diff_vs_jax"] = (q(x).float() - to_torch(call(leaves, xj, bj)).float()).abs().max().item()
    if cuda and isinstance(cfg, qlin.FP8ScaledMMConfig) and hasattr(torch, "_scaled_mm"):
        try:
            w8 = q.weight  # (N, K) K-major; _scaled_mm wants B (K, N) column-major = w8.t()
            sw = q.weight_scale.reshape(1, -1).float()
            amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            sx = amax / 448.0

            def tsm():
                xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn)
                last["ts"] = torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
            tsm(); sync_t()
            row["torch_scaled_mm_us"] = round(time_calls(tsm, sync_t, reps)[0], 2)
        except Exception as e:  # noqa: BLE001
            row["torch_scaled_mm_us"] = f"{type(e).__name__}: {str(e)[:120]}"
    return row


def overhead(device: str, shapes, reps: int, kernel: str | None = None, configs=None) -> list[dict]:
    """One row per (config, (M, N, K)): bridge vs the same jitted kernel called from JAX. A case that
    fails is recorded (``error``) and the rest go on; past the time budget the rest are ``skipped``."""
    rows = []
    configs = configs or [qlin.FP8ScaledMMConfig(), qlin.Int8ScaledMMConfig()]
    for m, n, k in shapes:
        for cfg in configs:
            if time.perf_counter() - T_START > BUDGET_S:
                rows.append({"config": cfg.describe(), "M": m, "N": n, "K": k, "skipped": "time budget"})
                continue
            try:
                rows.append(_row(device, cfg, m, n, k, reps, kernel))
            except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
                rows.append({"config": cfg.describe(), "M": m, "N": n, "K": k,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def bench_rows(shapes, reps: int = 50, device: str = "cuda") -> list[dict]:
    """Rows for the GEMM benchmark (``impl, dtype, M, N, K, us, tflops, device``): ``qlin:torch_bridge``
    (QuantLinear on torch tensors) and ``qlin:jax_same_kernel`` -- wall-clock per call, back to back."""
    rows = []
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for r in overhead(device, shapes, reps):
        if "skipped" in r or "error" in r:
            continue
        dtype = "fp8" if r["config"].startswith("fp8") else "int8"
        for impl, us in (("qlin:torch_bridge", r["bridge_us"]), ("qlin:jax_same_kernel", r["jax_us"])):
            rows.append({"impl": impl, "dtype": dtype, "M": r["M"], "N": r["N"], "K": r["K"], "us": us,
                         "tflops": round(2 * r["M"] * r["N"] * r["K"] / us / 1e6, 2), "kernel": r["kernel"],
                         "device": dev})
    return rows


def _write(result: dict, device: str) -> str:
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = result.get("sections_tag", "")
    path = os.path.join(out_dir, f"{'gpu' if device == 'cuda' else 'cpu'}_bridge_check{tag}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    return path


def summarize(result: dict) -> dict:
    rows = result.get("overhead", [])
    measured = [r for r in rows if "skipped" not in r and "error" not in r]
    key = lambda r: f"{r['config'][:4].strip('-')} {r['M']}x{r['N']}x{r['K']}"  # noqa: E731
    return {
        "zero_copy_all_dtypes": result.get("zero_copy", {}).get("all_zero_copy"),
        "fp8_native_dlpack": result.get("zero_copy", {}).get("fp8_native_dlpack"),
        "stream_ordering_ok": result.get("stream_ordering", {}).get("ok"),
        "worst_throughput_overhead": max((r["overhead"] for r in measured), default=None),
        "overhead_target_met": {key(r): r["overhead"] <= 0.05 for r in measured},
        "event_overhead_target_met": {key(r): r["event_overhead"] <= 0.05 for r in measured if "event_overhead" in r},
        # the bridge's extra host time per call, and the part of it that is the export waiting for the launch
        "extra_host_us": {key(r): r["bridge_extra_host_us"] for r in measured},
        "export_waits_us": {key(r): r["host_steps_us"]["export_waits"] for r in measured if "host_steps_us" in r},
        "overhead_target_met_large_shapes": all(r["overhead"] <= 0.05 for r in measured
                                                if r["M"] * r["N"] * r["K"] >= 1024 * 4096 * 4096),
        "rows_skipped": sum("skipped" in r for r in rows),
        "rows_failed": sum("error" in r for r in rows),
        "elapsed_s": round(time.perf_counter() - T_START, 1),
    }


def print_rows(rows) -> None:
    print(f"{'cfg':4} {'M':>5} {'N':>6} {'K':>5} | {'wall br':>8} {'jax':>8} {'ovh':>7} | {'event br':>8} {'jax':>8} "
          f"{'ovh':>7} | {'host br':>7} {'jax':>6} | {'check':>5} {'import':>6} {'jit':>6} {'export':>6} {'(wait)':>6} | "
          f"{'gpu br':>7} {'jax':>7} | {'kernel'}")
    for r in rows:
        head = f"{r['config'][:4].strip('-'):4} {r['M']:5d} {r['N']:6d} {r['K']:5d}"
        if "skipped" in r or "error" in r:
            print(f"{head}  {r.get('skipped') or r.get('error')}")
            continue
        st = r.get("host_steps_us") or dict.fromkeys(("check", "import", "jit", "export", "export_waits"), float("nan"))
        if st.get("route") == "direct":
            st = {**st, "jit": st["direct_call"]}  # shown in the jit column: the whole direct call
        print(f"{head} | {r['bridge_us']:8.1f} {r['jax_us']:8.1f} {r['overhead']:+7.1%} | "
              f"{r.get('bridge_event_us', 0):8.1f} {r.get('jax_event_us', 0):8.1f} {r.get('event_overhead', 0):+7.1%} | "
              f"{r['bridge_host_us']:7.1f} {r['jax_host_us']:6.1f} | {st['check']:5.1f} {st['import']:6.1f} "
              f"{st['jit']:6.1f} {st['export']:6.1f} {st['export_waits']:6.1f} | "
              f"{r.get('gpu_us_bridge_gated', 0):7.1f} {r.get('gpu_us_jax_gated', 0):7.1f} | {r['kernel']}"
              + (f" | direct; JAX route {r['bridge_jax_route_us']:.1f} ({r['jax_route_overhead']:+.1%})"
                 if "bridge_jax_route_us" in r else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (no stream checks)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--kernel", default=None, help="force a qlin kernel by name (default: qlin's choice)")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,16,256,1024,4096)")
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated sections of {','.join(SECTIONS)} (default: all but probe); run one per "
                         "process to pin a CUDA fault (they are sticky) to a section")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; use --cpu for a dry run", file=sys.stderr)
        return 2
    shapes = CPU_SHAPES if args.cpu else SHAPES
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
        shapes = [(m, n, k) for n, k in dict.fromkeys((n, k) for _, n, k in shapes) for m in ms]
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"torch": torch.__version__, "jax": jax.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_platform_version": getattr(jax.devices()[0].client, "platform_version", None),
        # which PJRT client runs the GPU (its buffers decide what jaxlib's DLPack export waits for)
        "jax_client": {a: str(getattr(jax.devices()[0].client, a, None)) for a in ("runtime_type", "platform")},
        "bridge_fast_paths": dict(bridge_dlpack._FAST),
        "sections_tag": "" if only == set(DEFAULT_SECTIONS) else "_" + "_".join(sorted(only)),
        "timing": f"wall = {args.reps} back-to-back calls then one sync, median of {TRIALS} interleaved trials; "
                  "host = time to enqueue them; event = CUDA events on torch's stream around the same loops",
    }
    if "zero_copy" in only:
        result["zero_copy"] = zero_copy(device)
    if "direct" in only:
        result["direct_check"] = direct_check(device)
        _write(result, device)
    result["bridge_routes"] = {str(k): None if v is None else {"jax_device": str(v.jax_device), "jax_stream": v.jax_stream}
                               for k, v in bridge_dlpack._ROUTES.items()}
    _write(result, device)
    parts = [p for p in STREAM_PARTS if p in only]
    if device == "cuda" and parts:
        try:
            result["stream_ordering"] = stream_ordering(parts=parts)
        except Exception as e:  # noqa: BLE001 - recorded; the overhead rows still run
            traceback.print_exc()
            result["stream_ordering"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        _write(result, device)
    if "breakdown" in only:
        try:
            result["host_breakdown_us"] = breakdown(device) if device == "cuda" else breakdown(device, m=16, n=512, k=256)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            result["host_breakdown_us"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        _write(result, device)
        print(f"host us per call (fp8 {result['host_breakdown_us'].get('shape')}): {result['host_breakdown_us']}",
              flush=True)
    so = result.get("stream_ordering")
    if so and "error" not in so:
        print(f"stream ordering ok: {so['ok']}  (torch->jax {so['torch_to_jax_correct']} hot {so['torch_to_jax_hot_correct']}, "
              f"jax->torch {so['jax_to_torch_correct']} hot {so['jax_to_torch_hot_correct']}, layer {so['layer']['trials']}, "
              f"no-sync control stale: {so['torch_to_jax_control_saw_stale_data']})")
        print(f"  host ms to hand over: torch->jax {so['host_ms_torch_to_jax']} hot {so['host_ms_torch_to_jax_hot']} "
              f"(torch spin {so['gpu_spin_ms']} ms); jax->torch {so['host_ms_jax_to_torch']} hot "
              f"{so['host_ms_jax_to_torch_hot']} (jax producer {so.get('jax_producer_ms')} ms, its dispatch "
              f"{so['host_ms_jax_producer_dispatch']}); layer call {so['layer']['host_ms_layer_call']}", flush=True)
    elif so:
        print(f"stream ordering FAILED to run: {so['error']}")
    result["overhead"] = []
    # one shape at a time, so the JSON on disk always has every finished row
    for shape in shapes if "overhead" in only else ():
        result["overhead"] += overhead(device, [shape], args.reps, kernel=args.kernel)
        result["summary"] = summarize(result)
        _write(result, device)
    print(f"device: {result['device']}  torch {torch.__version__}  jax {jax.__version__}")
    if "zero_copy" in result:
        zc = result["zero_copy"]
        print(f"zero copy (all dtypes): {zc['all_zero_copy']}  fp8 native: {zc['fp8_native_dlpack']}  "
              f"unaligned view: {zc['unaligned_view']}")
        for r in zc["rows"]:
            if "error" in r:
                print(f"  {r['dtype']}: {r['error']}")
    print("us per call; host steps = bridge host us per call: check / import / jit / export (of which waiting "
          "for the launch); with the direct route the jit column is the whole direct call")
    print_rows(result["overhead"])
    result["summary"] = summarize(result)
    print(f"wrote {_write(result, device)}  ({result['summary']['elapsed_s']} s)")
    if device == "cuda" and "probe" in only:
        result["import_on_torch_stream"] = probe_import_on_torch_stream()
        print(f"jaxlib import with torch's stream as definition stream: {result['import_on_torch_stream']}")
        _write(result, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
