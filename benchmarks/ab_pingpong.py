"""Rejected design, kept at this commit to reproduce its measurement (h100_ab_pingpong_rejected.json): ping-pong schedule for the large-M scaled matmul (each consumer warpgroup owns a whole
output tile; while one runs its epilogue the other's main loop keeps the tensor cores busy).

Per-token x per-channel scales, bf16 out.  Two stage rings (one per consumer warpgroup), filled by one
producer warpgroup in tile order; tile j of a CTA goes to consumer j % 2.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402


def pingpong_mm(a, b, a_scale, b_scale, *, tm=128, tn=128, tk=128, stages=3, epi_n=64, minor="n", width=1,
                consumer_regs=232, producer_regs=40, inflight=True, interpret=False, sms=None):
    m, k = a.shape
    n = b.shape[0]
    dtype = a.dtype
    is_int = jnp.issubdtype(dtype, jnp.integer)
    acc_dtype = jnp.int32 if is_int else jnp.float32
    m_iters, n_iters, k_iters = mm._cdiv(m, tm), mm._cdiv(n, tn), mm._cdiv(k, tk)
    ntiles = m_iters * n_iters
    nsm = sms or mm.num_sms()
    grid = max(1, min(nsm, ntiles))
    S = stages
    in_t = mm._swizzle_transforms(mm._pick_swizzle(tk, k, dtype), dtype)
    out_t = mm._swizzle_transforms(mm._pick_swizzle(epi_n, n, jnp.bfloat16), jnp.bfloat16)
    epi_m = 64

    def body(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem):
        def scoped(a_smem, b_smem, full, empty, out_smem, as_smem, bs_smem, vec_bars):
            wg = lax.axis_index("wg")
            sm = lax.axis_index("sm")
            my_tiles = (ntiles - sm + grid - 1) // grid

            def coords(j):
                lin = sm + j * grid
                return plgpu.planar_snake(lin, (m_iters, n_iters), 0 if minor == "m" else 1, width)

            @pl.when(wg == 2)
            def _producer():
                plgpu.set_max_registers(producer_regs, action="decrease")

                @pl.loop(0, my_tiles)
                def _tile(j):
                    r = j % 2
                    m_idx, n_idx = coords(j)
                    base = (j // 2) * k_iters

                    @pl.loop(0, k_iters)
                    def _k(kk):
                        c = base + kk
                        bi = r * S + c % S

                        @pl.when(c >= S)
                        def _():
                            plgpu.barrier_wait(empty.at[bi])

                        plgpu.copy_gmem_to_smem(
                            a_gmem.at[pl.ds(m_idx * tm, tm), pl.ds(kk * tk, tk)], a_smem.at[bi], full.at[bi])
                        plgpu.copy_gmem_to_smem(
                            b_gmem.at[pl.ds(n_idx * tn, tn), pl.ds(kk * tk, tk)], b_smem.at[bi], full.at[bi])

                # Observe the consumers' last releases (barriers must not be left mid-phase).
                for r in range(2):
                    uses = ((my_tiles - r + 1) // 2) * k_iters

                    @pl.loop(lax.max(uses - S, 0), uses)
                    def _drain(c):
                        plgpu.barrier_wait(empty.at[r * S + c % S])

            @pl.when(wg < 2)
            def _consumer():
                plgpu.set_max_registers(consumer_regs, action="increase")
                n_mine = (my_tiles - wg + 1) // 2

                @pl.loop(0, n_mine)
                def _tile(i):
                    j = wg + 2 * i
                    m_idx, n_idx = coords(j)
                    base = i * k_iters
                    plgpu.copy_gmem_to_smem(as_gmem.at[pl.ds(m_idx * tm, tm)], as_smem.at[wg], vec_bars.at[2 * wg])
                    plgpu.copy_gmem_to_smem(bs_gmem.at[pl.ds(n_idx * tn, tn)], bs_smem.at[wg],
                                            vec_bars.at[2 * wg + 1])

                    def acc_scope(acc_ref):
                        @pl.loop(0, k_iters)
                        def _k(kk):
                            c = base + kk
                            bi = wg * S + c % S
                            plgpu.barrier_wait(full.at[bi])
                            plgpu.wgmma(acc_ref, a_smem.at[bi], b_smem.at[bi].T)
                            if inflight:
                                plgpu.wgmma_wait(1)

                                @pl.when(kk > 0)
                                def _():
                                    plgpu.barrier_arrive(empty.at[wg * S + (c - 1) % S])
                            else:
                                plgpu.wgmma_wait(0)
                                plgpu.barrier_arrive(empty.at[bi])

                        if inflight:
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(empty.at[wg * S + (base + k_iters - 1) % S])
                        acc = acc_ref[...]
                        plgpu.barrier_wait(vec_bars.at[2 * wg])
                        plgpu.barrier_wait(vec_bars.at[2 * wg + 1])
                        sa = plgpu.load(as_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                        sb = plgpu.load(bs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
                        y = acc.astype(jnp.float32) if is_int else acc
                        y = y * lax.broadcast_in_dim(sa, (tm, tn), [0]) * lax.broadcast_in_dim(sb, (tm, tn), [1])
                        y = y.astype(jnp.bfloat16)
                        for ei in range(tm // epi_m):
                            for ej in range(tn // epi_n):
                                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                                out_smem[wg] = y[ei * epi_m:(ei + 1) * epi_m, ej * epi_n:(ej + 1) * epi_n]
                                plgpu.commit_smem()
                                dst = out_gmem.at[pl.ds(m_idx * tm + ei * epi_m, epi_m),
                                                  pl.ds(n_idx * tn + ej * epi_n, epi_n)]
                                plgpu.copy_smem_to_gmem(out_smem.at[wg], dst)

                    pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), acc_dtype))

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((2 * S, tm, tk), dtype, transforms=in_t),
            plgpu.SMEM((2 * S, tn, tk), dtype, transforms=in_t),
            plgpu.Barrier(num_arrivals=2, num_barriers=2 * S),
            plgpu.Barrier(num_arrivals=1, num_barriers=2 * S),
            plgpu.SMEM((2, epi_m, epi_n), jnp.bfloat16, transforms=out_t),
            plgpu.SMEM((2, tm), jnp.float32),
            plgpu.SMEM((2, tn), jnp.float32),
            plgpu.Barrier(num_barriers=4),
            collective_axes="wg",
        )

    kwargs = {}
    if interpret:
        kwargs["interpret"] = plgpu.InterpretGPUParams(num_tma_threads_per_device=64)
    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16), grid=(grid,), grid_names=("sm",),
                     num_threads=3, thread_name="wg", **kwargs)
    return f(a, b, a_scale.reshape(m), b_scale.reshape(n))


def reference(a, b, a_scale, b_scale):
    import numpy as np
    acc = np.asarray(a.astype(jnp.float32), np.float64) @ np.asarray(b.astype(jnp.float32), np.float64).T
    return acc * np.asarray(a_scale, np.float64).reshape(-1, 1) * np.asarray(b_scale, np.float64).reshape(1, -1)


def make(m, n, k, dtype, seed=0):
    ka, kb, ks, kt = jax.random.split(jax.random.key(seed), 4)
    if dtype == "int8":
        a = jax.random.randint(ka, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
        b = jax.random.randint(kb, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
    else:
        a = jnp.clip(jax.random.normal(ka, (m, k)) * 2, -448, 448).astype(jnp.float8_e4m3fn)
        b = jnp.clip(jax.random.normal(kb, (n, k)) * 2, -448, 448).astype(jnp.float8_e4m3fn)
    sa = jax.random.uniform(ks, (m, 1), minval=0.5, maxval=1.5) / 64
    sb = jax.random.uniform(kt, (1, n), minval=0.5, maxval=1.5) / 64
    return a, b, sa, sb


if __name__ == "__main__" and "--gpu" not in sys.argv:
    import numpy as np
    interpret = "--interpret" in sys.argv
    cases = [(200, 384, 512, "fp8"), (130, 256, 384, "int8")] if interpret else []
    for m, n, k, dt in cases:
        a, b, sa, sb = make(m, n, k, dt)
        y = pingpong_mm(a, b, sa, sb, interpret=True, stages=2, sms=3)
        ref = reference(a, b, sa, sb)
        err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
        print(m, n, k, dt, "rel_err", err)


def gpu_main():
    """On the GPU: float64 check at partial shapes, then A/B against the cooperative kernel and XLA."""
    import json
    import time

    import numpy as np

    from qlin import bench

    out_dir = os.environ.get("OUT", "/tmp")
    res = {"check": [], "time": []}
    variants = {
        "pp": dict(),
        "pp_s2": dict(stages=2),
        "pp_k64": dict(tk=64, stages=6),
        "pp_64x256": dict(tm=64, tn=256, tk=64, stages=5),
        "pp_nminor": dict(minor="n", width=8),
        "pp_mminor8": dict(minor="m", width=8),
        "pp_noinfl": dict(inflight=False),
    }
    for m, n, k, dt in [(1000, 1040, 4096, "fp8"), (300, 384, 1152, "int8"), (777, 4096, 2048, "fp8")]:
        a, b, sa, sb = make(m, n, k, dt, seed=m)
        ref = reference(a, b, sa, sb)
        for name, kw in variants.items():
            try:
                y = jax.jit(functools.partial(pingpong_mm, **kw))(a, b, sa, sb)
                yy = np.asarray(y.astype(jnp.float32), np.float64)
                err = float(np.linalg.norm(yy - ref) / np.linalg.norm(ref))
                row = dict(M=m, N=n, K=k, dtype=dt, variant=name, rel_err=err, finite=bool(np.isfinite(yy).all()))
            except Exception as e:  # noqa: BLE001
                row = dict(M=m, N=n, K=k, dtype=dt, variant=name, error=str(e)[:300])
            res["check"].append(row)
            print(json.dumps(row), flush=True)
    t0 = time.time()
    cases = os.environ.get("PP_CASES", "4096:4096:4096,8192:4096:4096,4096:28672:4096,2048:6144:4096,"
                           "1024:4096:4096,4096:4096:14336,4096:8192:8192,8192:8192:8192")
    for cs in cases.split(","):
        m, n, k = (int(v) for v in cs.split(":"))
        for dt in os.environ.get("PP_DTYPES", "fp8").split(","):
            if time.time() - t0 > float(os.environ.get("PP_BUDGET", "300")):
                break
            jdt = jnp.int8 if dt == "int8" else jnp.float8_e4m3fn
            a, bs, a_s, b_s = bench.device_operands(m, n, k, dt, bench.n_copies(n, k), 1)
            sets = [(a, b, a_s, b_s) for b in bs]
            row = dict(M=m, N=n, K=k, dtype=dt, xla_us=bench.measure_us(bench.xla_fn(dt), sets, 20))
            cfg = mm.default_config(m, n, k, jdt, jnp.bfloat16)
            row["default_cfg"] = cfg.short()
            f = jax.jit(lambda a, b, x, y, cfg=cfg: mm.scaled_mm(a, b, x, y, out_dtype=jnp.bfloat16, config=cfg))
            row["default_us"] = bench.measure_us(f, sets, 20)
            for name, kw in variants.items():
                try:
                    g = jax.jit(functools.partial(pingpong_mm, **kw))
                    row[f"{name}_us"] = bench.measure_us(g, sets, 20)
                    row[f"{name}_err"] = bench.device_rel_err(g(*sets[0]), *sets[0])
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = str(e)[:200]
            row["default_us2"] = bench.measure_us(f, sets, 20)
            res["time"].append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(out_dir, "pp_ab.json"), "w") as fh:
                json.dump(res, fh, indent=1)


if __name__ == "__main__" and "--gpu" in sys.argv:
    gpu_main()
