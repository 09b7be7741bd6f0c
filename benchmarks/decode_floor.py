"""What a decode GEMM (M <= 16) can reach: the time to just READ the weight, by size, on this GPU.

The issue's decode target is "within 1.15x of weight bytes / measured copy bandwidth", with the copy
bandwidth measured on a 1 GiB copy.  Small weights (16-60 MB) never reach that rate: a kernel pays a
launch, a first-byte latency and a ramp before the memory system is full.  This script measures, in
one run and for every Llama-3 weight shape of the grid:

* ``xla_read``: XLA reducing the weight's bytes to one word (a read-only kernel, XLA's best);
* ``tma_stream``: a Mosaic GPU kernel with qlin's decode pipeline (TMA into 128B-swizzled shared
  memory, a memory warpgroup, several stages, one work unit per SM) and NO math: per box shape and
  stage count, on the (N, K) weight and on the same bytes laid out so that each box is contiguous
  (``blocked``); the best of these is the floor for a kernel built like qlin's;
* qlin's fp8 GEMM at M = 1 and 16 (heuristic config) and XLA-native fp8 in the same run;
* the fixed costs: an almost empty Mosaic GPU kernel, XLA's split-K partial-sum fusion.

    PYTHONPATH=. python3 benchmarks/decode_floor.py [--shapes 4096:4096,...] [--out DIR]

Writes ``decode_floor.json`` (rows: kind, N, K, variant, us, gbs) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from qlin import bench  # noqa: E402
from qlin.kernels.mosaic_gpu_scaled_mm import _swizzle_transforms, num_sms  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (8192, 8192), (10240, 8192), (28672, 4096),
          (8192, 28672), (57344, 8192)]  # fmt: skip
F8 = jnp.float8_e4m3fn


def stream_kernel(n, k, rows, tk, stages, split, blocked, a_rows=None):
    """Reads an (n, k) fp8 weight through a TMA pipeline of (rows, tk) boxes; no math.

    ``blocked``: the argument is (n * k / tk, tk), box (i, j) of the weight stored contiguously.
    ``a_rows``: also load, every step, the GEMM's activation box (64 x tk) of an (a_rows, k) array,
    as the decode GEMM does (rows past a_rows are zero-filled by TMA)."""
    k_steps = k // tk // split
    n_units = n // rows * split
    grid = min(num_sms(), n_units)
    transforms = _swizzle_transforms(128, jnp.dtype(F8))

    def kernel(*refs):
        w_gmem, o_gmem = refs[0], refs[-1]
        a_gmem = refs[1] if a_rows else None

        def body(idx, *smem):
            pass

        pipe = plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=56,
            in_specs=[
                plgpu.BlockSpec(
                    (rows, tk), (lambda kk: (kk, 0)) if blocked else (lambda kk: (0, kk)), transforms=transforms
                )
            ]
            + ([plgpu.BlockSpec((64, tk), lambda kk: (0, kk), transforms=transforms)] if a_rows else []),
            wg_axis="wg",
            num_compute_wgs=1,
            max_concurrent_steps=min(stages, k_steps),
        )

        @plgpu.nd_loop((n_units,), collective_axes="sm")
        def _unit(info):
            (u,) = info.index
            s = u // (n // rows)
            nt = u % (n // rows)
            if blocked:
                kt0 = s * k_steps
                view = w_gmem.at[pl.ds((nt * (k // tk) + kt0) * rows, k_steps * rows), :]
            else:
                view = w_gmem.at[pl.ds(nt * rows, rows), pl.ds(s * k_steps * tk, k_steps * tk)]
            if a_rows:
                pipe(view, a_gmem.at[:, pl.ds(s * k_steps * tk, k_steps * tk)])
            else:
                pipe(view)

        @pl.when(lax.axis_index("wg") == 0)
        def _():
            o_gmem[...] = jnp.zeros((128,), jnp.float32)  # something to write

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
        grid=(grid,),
        grid_names=("sm",),
        num_threads=2,
        thread_name="wg",
    )


def to_blocked(w, rows, tk):
    n, k = w.shape
    return w.reshape(n // rows, rows, k // tk, tk).transpose(0, 2, 1, 3).reshape(n * k // tk, tk)


def xla_read(w):
    n, k = w.shape
    u = lax.bitcast_convert_type(lax.bitcast_convert_type(w, jnp.uint8).reshape(n, k // 4, 4), jnp.uint32)
    return jnp.max(u)


def stream_variants(n, k):
    """(rows, tk, stages, split): the decode kernel's box shapes, the two smallest splits that give
    between 0.5 and 2 work units per SM (256-row boxes unsplit where even they give more), and
    8 stages or as many as ~192 KB of shared memory hold."""
    out = []
    sms = num_sms()
    for rows, tk in ((64, 128), (32, 256), (64, 256), (16, 256), (256, 128)):
        if n % rows or k % tk:
            continue
        box = rows * tk
        splits = [
            s for s in (1, 2, 4, 8)
            if (k // tk) % s == 0 and k // tk // s >= 4 and sms // 2 <= n // rows * s <= 2 * sms
        ][:2]
        if not splits and rows == 256:
            splits = [1]
        for split in splits:
            for stages in sorted({min(12, 196608 // box), 8}):
                if stages * box <= 200 * 1024:
                    out.append((rows, tk, stages, split))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(f"{n}:{k}" for n, k in SHAPES))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--no-gemm", action="store_true")
    p.add_argument("--ablate", action="store_true", help="only the activation-box ablation (stream + A loads)")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    t0 = time.time()
    res = dict(device=bench.device_name(), jax=jax.__version__, rows=[])
    copy = bench.copy_bandwidth_gbs()
    res["copy_gbs"] = copy
    print(f"{res['device']} copy {copy:.0f} GB/s (read+write)", flush=True)

    def add(kind, n, k, variant, us, nbytes):
        r = dict(kind=kind, N=n, K=k, variant=variant, us=us, gbs=nbytes / (us * 1e-6) / 1e9 if us else None,
                 floor_us=nbytes / (copy * 1e9) * 1e6)  # fmt: skip
        res["rows"].append(r)
        print(f"{kind:12s} {n:6d}x{k:<6d} {variant:28s} {us:8.2f} us {r['gbs'] or 0:7.0f} GB/s "
              f"({us / r['floor_us'] if nbytes else 0:.2f}x floor)", flush=True)  # fmt: skip

    def timed(kind, n, k, variant, fn, sets, nbytes):
        try:
            us = bench.measure_us(fn, sets, iterations=args.iterations)
            add(kind, n, k, variant, us, nbytes)
        except Exception as e:  # noqa: BLE001
            res["rows"].append(dict(kind=kind, N=n, K=k, variant=variant, error=f"{type(e).__name__}: {e}"[:400]))
            print(kind, n, k, variant, "ERROR", f"{type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=2)

    # Fixed costs.
    tiny = jnp.ones((128, 128), F8)
    timed("fixed", 128, 128, "mgpu_one_box_132cta", stream_kernel(128, 128, 16, 128, 1, 1, False),
          [(tiny,)], 0)  # fmt: skip
    part = jnp.ones((2, 16, 4096), jnp.float32)
    timed("fixed", 4096, 0, "xla_splitk_sum_2x16x4096", lambda p: p.sum(0).astype(jnp.bfloat16), [(part,)], 0)

    for n, k in shapes:
        if time.time() - t0 > args.budget_s:
            print("budget spent", flush=True)
            break
        nbytes = n * k
        copies = bench.n_copies(n, k)
        key = jax.random.key(n * 7 + k)
        ws = [
            jax.random.randint(kk, (n, k), -100, 100, jnp.int8).astype(jnp.float32).astype(F8)
            for kk in jax.random.split(key, copies)
        ]
        if args.ablate:
            for rows, tk, stages, split in ((64, 128, 8, 2), (32, 256, 8, 1), (64, 256, 6, 1)):
                if n // rows * split > 2 * num_sms() or (k // tk) % split:
                    continue
                for a_rows in (None, 1, 16, 64):
                    sets = [(w,) if a_rows is None else (w, jnp.ones((a_rows, k), F8)) for w in ws]
                    name = f"nk_r{rows}k{tk}s{stages}sk{split}" + (f"+A{a_rows}" if a_rows else "")
                    fn = stream_kernel(n, k, rows, tk, stages, split, False, a_rows)
                    timed("ablate", n, k, name, fn, sets, nbytes)
            from qlin.kernels import mosaic_gpu_scaled_mm as mm

            cfg = mm.default_config(16, n, k, jnp.dtype(F8))  # one config for every M: only the A side varies
            import dataclasses

            variants = [cfg, dataclasses.replace(cfg, wgmma_inflight=True)]
            deeper = mm._fit_smem(dataclasses.replace(cfg, max_concurrent_steps=12), jnp.dtype(F8), jnp.bfloat16)
            if deeper.max_concurrent_steps > cfg.max_concurrent_steps:
                variants.append(deeper)
            for m in (1, 16, 64):
                a, _, a_s, b_s = bench.device_operands(m, n, k, "fp8", 1)
                for c in variants if m == 16 else variants[:1]:
                    fn = bench.qlin_fn(c)
                    timed("ablate", n, k, f"gemm_M{m}:{c.short()}", fn, [(a, w, a_s, b_s) for w in ws], nbytes)
            del ws
            continue
        timed("xla_read", n, k, "max_u32", jax.jit(xla_read), [(w,) for w in ws], nbytes)
        for rows, tk, stages, split in stream_variants(n, k):
            for blocked in (False, True):
                if blocked and (rows, tk) not in ((64, 128), (32, 256)):
                    continue
                sets = [(to_blocked(w, rows, tk) if blocked else w,) for w in ws]
                name = f"{'blk' if blocked else 'nk'}_r{rows}k{tk}s{stages}sk{split}"
                timed("tma_stream", n, k, name, stream_kernel(n, k, rows, tk, stages, split, blocked), sets, nbytes)
                del sets
        if not args.no_gemm:
            for m in (1, 16):
                try:
                    rows_ = bench.bench_case(m, n, k, dtypes=("fp8",), with_bf16=False, with_torch=False,
                                             iterations=args.iterations)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    print("gemm", m, n, k, "ERROR", e, flush=True)
                    continue
                for r in rows_:
                    if r.get("us"):
                        add("gemm", n, k, f"{r['impl']}:M{m}:{r.get('config', '')}", r["us"], nbytes)
        del ws
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_floor.json").write_text(json.dumps(res, indent=1))
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
