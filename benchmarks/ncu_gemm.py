"""Hardware counters (Nsight Compute) of qlin's fp8 GEMM kernels: where the block kernel's time goes.

The block-scaled kernel runs at ~0.85 of the per-channel kernel's rate at full waves on an H100
(benchmarks/results/h100_gemm.md).  Timing variants only bounds the causes; this script runs each
variant ONCE inside a CUDA profiler range, so that ``ncu --profile-from-start off`` reads the hardware
counters of exactly those kernels (tensor-pipe activity, shared-memory wavefronts, issue-stall reasons):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats \\
        python3 benchmarks/ncu_gemm.py --shape 8192:8192:8192 --variants per_channel,block,wide,two_block

Each variant is compiled and warmed up outside the range (``cuProfilerStart`` / ``cuProfilerStop``
from libcuda bracket one call).  Variants (fp8 e4m3, bf16 out):

* ``per_channel``: :func:`qlin.kernels.mosaic_gpu_scaled_mm.scaled_mm`, per-token x per-channel scales,
  the heuristic tile;
* ``block``: :func:`qlin.kernels.mosaic_gpu_block_scaled_mm.block_scaled_mm`, the heuristic tile;
* ``three_wg`` / ``wide`` / ``two_block`` / ``one_block``: the block kernel with 3 x 64 x 128,
  2 x 64 x 192, 2 x 64 x 128 two K blocks a step, 2 x 64 x 128 one K block a step;
* ``fast_accum``: the block kernel with rescaled accumulation (the ``fast_accum`` default tile);
* ``xla``: XLA-native fp8 (``dot_general`` on the fp8 operands, cuBLASLt on a GPU, then the per-token x
  per-channel scale pass), the per-channel kernel's baseline.

Without ncu it only prints each variant's wall time (a smoke test: ``--cpu-dry-run`` uses interpret
mode and a small shape).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qlin import bench  # noqa: E402
from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm  # noqa: E402
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402

F8 = jnp.float8_e4m3fn
BLOCK_TILES = {
    "three_wg": lambda: bmm._three_wg_tile("m", width=4),
    "wide": bmm._wide_tile,
    "two_block": bmm._two_block_step_tile,
    "one_block": lambda: bmm._two_wg_tile("m", bmm.BLOCK, steps=5),
}


def _profiler():
    """(start, stop) of the CUDA profiler range, or no-ops without a GPU driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        return cuda.cuProfilerStart, cuda.cuProfilerStop
    except OSError:
        return (lambda: 0), (lambda: 0)


def variant_fn(name: str, m: int, n: int, k: int, interpret: bool):
    """(jitted function, its arguments, config short name) of one variant."""
    key = jax.random.key(0)
    ka, kb, ks, kt = jax.random.split(key, 4)
    a = (jax.random.normal(ka, (m, k), jnp.float32) * 2).astype(F8)
    b = (jax.random.normal(kb, (n, k), jnp.float32) * 2).astype(F8)
    if name in ("per_channel", "xla"):
        args = (a, b, jax.random.uniform(ks, (m, 1), jnp.float32, 0.5, 1), jax.random.uniform(kt, (1, n)))
        if name == "xla":
            return bench.xla_fn("fp8"), args, "dot_general"
        cfg = mm.default_config(m, n, k, jnp.dtype(F8))
        return jax.jit(lambda *x: mm.scaled_mm(*x, interpret=interpret)), args, cfg.short()
    kb_, nb_ = -(-k // bmm.BLOCK), -(-n // bmm.BLOCK)
    args = (a, b, jax.random.uniform(ks, (m, kb_), jnp.float32, 0.5, 1), jax.random.uniform(kt, (nb_, kb_)))
    if name in ("block", "fast_accum"):
        cfg = bmm.default_config(m, n, k, fast_accum=name == "fast_accum")
    elif name in BLOCK_TILES:
        cfg = BLOCK_TILES[name]()
    else:
        raise SystemExit(
            f"unknown variant {name!r}; expected per_channel, xla, block, fast_accum or {sorted(BLOCK_TILES)}"
        )
    cfg = bmm._fit_smem(cfg, jnp.bfloat16)
    if interpret and cfg.num_compute_wgs == 3:
        cfg = bmm._fit_smem(dataclasses.replace(cfg, num_compute_wgs=2, tail_split=1), jnp.bfloat16)
    return jax.jit(lambda *x, c=cfg: bmm.block_scaled_mm(*x, config=c, interpret=interpret)), args, cfg.short()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8192:8192:8192", help="M:N:K")
    p.add_argument("--variants", default="per_channel,block,wide,two_block")
    p.add_argument("--cpu-dry-run", action="store_true", help="interpret mode, a small shape (no counters)")
    args = p.parse_args(argv)
    m, n, k = (int(v) for v in args.shape.split(":"))
    interpret = args.cpu_dry_run
    if interpret:
        m, n, k = 130, 400, 512
    start, stop = _profiler()
    for name in args.variants.split(","):
        fn, xs, short = variant_fn(name, m, n, k, interpret)
        jax.block_until_ready(fn(*xs))  # compile + warm up outside the profiled range
        jax.block_until_ready(fn(*xs))
        t = time.perf_counter()
        start()
        jax.block_until_ready(fn(*xs))
        stop()
        print(f"{name} ({short}) M={m} N={n} K={k}: {1e6 * (time.perf_counter() - t):.0f} us wall", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
