"""Time the K-split cluster's partial-accumulator exchange between the two CTAs of a cluster (H100).

In a K-split cluster (``cluster="k"`` of the per-channel kernel) CTA 1 hands its f32 partial accumulator to
CTA 0.  This kernel repeats only that hand-over, ``--reps`` times, for two consumer warpgroups with a
(64, N) float32 wgmma-layout tile each (N = 64 / 128: 16 / 32 KB a warpgroup), three ways:

* ``store``: what the kernel does: st.async from CTA 1's registers into CTA 0's shared memory
  (``plgpu.async_store_smem``), a byte-counting barrier on CTA 0's side, a cluster barrier back;
* ``load``: CTA 1 stores the tile into its own shared memory (a local store), a cluster-barrier handshake
  with ``fence.acq_rel.cluster``, CTA 0 loads it through distributed shared memory (``plgpu.cluster_ref``);
* ``local``: no exchange: each CTA stores and loads its own tile (the local part of ``load``).

CTA 0 writes the received tile to shared memory every repeat and out at the end (checked: 2 x the input).
Time per exchange = (time at --reps - time at 1 repeat) / (reps - 1), CUPTI medians.  Each (mode, N) runs
in its own process (a fault is sticky).  GPU only:

    PYTHONPATH=. python3 benchmarks/dsmem_exchange.py [--reps 256]
    PYTHONPATH=. python3 benchmarks/dsmem_exchange.py --lower    # CPU: cross-lower every mode for CUDA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("store", "load", "local")
WIDTHS = (64, 128)


def build(mode: str, n: int, reps: int):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from dsmem_probe import fence_cluster

    nwg = 2
    swz = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    wgmma = plgpu.Layout.WGMMA

    def kernel(x_gmem, out_gmem):
        def scope(io, bufs, recv, tma_bar, recv_bar, ready, free):
            cid = lax.axis_index("cluster")
            wg = lax.axis_index("wg")
            plgpu.copy_gmem_to_smem(x_gmem.at[wg], io.at[wg], tma_bar.at[wg])
            plgpu.barrier_wait(tma_bar.at[wg])
            v = plgpu.load(io.at[wg], layout=wgmma) * 2.0
            plgpu.commit_smem()  # (every thread has read its share of io: it is the output tile from here on)
            last = reps - 1

            @pl.loop(0, reps)
            def _rep(i):
                if mode == "store":

                    @pl.when(cid == 1)
                    def _send():
                        pl.when(i > 0)(lambda: plgpu.barrier_wait(free.at[wg]))
                        plgpu.async_store_smem(v, recv.at[wg], recv_bar.at[wg], cluster_idx=0, cluster_dim="cluster")
                        plgpu.barrier_arrive(free.at[wg])
                        pl.when(i == last)(lambda: plgpu.barrier_wait(free.at[wg]))

                    @pl.when(cid == 0)
                    def _receive():
                        plgpu.barrier_wait(recv_bar.at[wg])
                        got = plgpu.load(recv.at[wg], layout=wgmma)
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(free.at[wg])
                        io.at[wg][...] = got
                        plgpu.barrier_wait(free.at[wg])

                elif mode == "load":

                    @pl.when(cid == 1)
                    def _publish():
                        pl.when(i > 0)(lambda: plgpu.barrier_wait(free.at[wg]))
                        for w in range(nwg):
                            pl.when(wg == w)(lambda w=w: bufs[w].__setitem__(Ellipsis, v))
                        fence_cluster()
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(ready.at[wg])
                        plgpu.barrier_arrive(free.at[wg])
                        pl.when(i == last)(lambda: plgpu.barrier_wait(free.at[wg]))

                    @pl.when(cid == 0)
                    def _fetch():
                        plgpu.barrier_arrive(ready.at[wg])
                        plgpu.barrier_wait(ready.at[wg])
                        fence_cluster()
                        for w in range(nwg):

                            @pl.when(wg == w)
                            def _get(w=w):
                                got = plgpu.load(plgpu.cluster_ref(bufs[w], {"cluster": 1}), layout=wgmma)
                                plgpu.commit_smem()
                                plgpu.barrier_arrive(free.at[wg])
                                io.at[wg][...] = got

                        plgpu.barrier_wait(free.at[wg])

                else:  # local
                    for w in range(nwg):

                        @pl.when(wg == w)
                        def _own(w=w):
                            bufs[w][...] = v
                            plgpu.commit_smem()
                            got = plgpu.load(bufs[w], layout=wgmma)
                            plgpu.commit_smem()
                            io.at[wg][...] = got

            @pl.when(cid == 0)
            def _out():
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(io.at[wg], out_gmem.at[wg])
                plgpu.wait_smem_to_gmem(0)

        one = (64, n)
        pl.run_scoped(
            scope,
            plgpu.SMEM((nwg, *one), jnp.float32, transforms=swz),
            tuple(plgpu.SMEM(one, jnp.float32, transforms=swz) for _ in range(nwg if mode != "store" else 0)),
            plgpu.SMEM((nwg if mode == "store" else 1, *one), jnp.float32, transforms=swz),
            plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
            plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=nwg),
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=nwg),
            collective_axes="wg",
        )

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((nwg, 64, n), jnp.float32), grid=(1,), grid_names=("g",),
        cluster=(2,), cluster_names=("cluster",), num_threads=nwg, thread_name="wg",
    )  # fmt: skip
    return f, jax.random.normal(jax.random.key(0), (nwg, 64, n), jnp.float32)


def run(mode: str, n: int, reps: int) -> dict:
    import jax
    import numpy as np

    from qlin import bench

    row: dict = {"mode": mode, "N": n, "kb_per_wg": 64 * n * 4 // 1024, "reps": reps}
    times = {}
    for r in (1, reps):
        f, x = build(mode, n, r)
        fn = jax.jit(f)
        y = np.asarray(jax.block_until_ready(fn(x)))
        row[f"max_err_reps{r}"] = float(np.abs(y - 2 * np.asarray(x)).max())
        times[r] = bench.measure_us(fn, [(x,)], 20)
    row.update(us_1=times[1], us_reps=times[reps], us_per_exchange=(times[reps] - times[1]) / (reps - 1))
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--n", type=int, choices=WIDTHS)
    p.add_argument("--reps", type=int, default=256)
    p.add_argument("--lower", action="store_true", help="cross-lower every mode and width for CUDA (CPU) and stop")
    p.add_argument("--out", default=None, help="JSON file for the rows (default: $OUT/dsmem_exchange.json if set)")
    a = p.parse_args(argv)
    if a.lower:
        import jax

        for mode in MODES:
            for n in WIDTHS:
                f, x = build(mode, n, 3)
                jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))
                print(f"{mode} N={n}: lowered", flush=True)
        return
    if a.mode:
        print(json.dumps(run(a.mode, a.n or WIDTHS[0], a.reps)), flush=True)
        return
    rows = []
    for mode in MODES:
        for n in WIDTHS:
            cmd = [sys.executable, __file__, "--mode", mode, "--n", str(n), "--reps", str(a.reps)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            out = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            err = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
            row = json.loads(out[-1]) if out else {"mode": mode, "N": n, "error": err}
            rows.append(row)
            print(json.dumps(row), flush=True)
    import os

    dest = a.out or (os.path.join(os.environ["OUT"], "dsmem_exchange.json") if os.environ.get("OUT") else None)
    if dest:
        Path(dest).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
