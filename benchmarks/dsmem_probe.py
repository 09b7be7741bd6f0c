"""Probe: can a Mosaic GPU kernel (jax 0.11.2) load another CTA's shared memory in its cluster?

CTA 1 of a two-CTA cluster writes a (64, N) float32 tile (2 x the input) into its own shared memory in the wgmma
register layout; CTA 0 loads it through ``plgpu.cluster_ref`` after a cluster-barrier handshake and writes it out.
Each variant runs in its own process (a fault is sticky).  GPU only:

    PYTHONPATH=. python3 benchmarks/dsmem_probe.py            # all variants
    PYTHONPATH=. python3 benchmarks/dsmem_probe.py --variant swz128_fence
    PYTHONPATH=. python3 benchmarks/dsmem_probe.py --lower     # CPU: cross-lower them for CUDA
"""

from __future__ import annotations

import argparse
import subprocess
import sys

VARIANTS = ("swz128_fence", "swz128_nofence", "plain_fence", "swz128_local")


def fence_cluster() -> None:
    """``fence.acq_rel.cluster`` (inline PTX): orders this thread's shared-memory accesses with the other CTAs
    of its cluster around a cluster-barrier arrival / wait.  Call inside a Mosaic GPU kernel."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def _f(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.acq_rel.cluster;", "", has_side_effects=True)

    _f()


def run(variant: str, lower: bool = False) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n = 64
    swz = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    buf_t = () if variant.startswith("plain") else swz
    fence = "nofence" not in variant
    local = variant.endswith("local")  # CTA 0 loads its own copy (control)

    def kernel(x_gmem, out_gmem):
        def scope(src, buf, out_smem, tma_bar, ready, done):
            cid = lax.axis_index("cluster")
            plgpu.copy_gmem_to_smem(x_gmem, src, tma_bar)
            plgpu.barrier_wait(tma_bar)
            v = plgpu.load(src, layout=plgpu.Layout.WGMMA) * 2.0

            @pl.when((cid == 1) | local)
            def _publish():
                buf[...] = v
                if fence:
                    fence_cluster()
                plgpu.commit_smem()

            plgpu.barrier_arrive(ready)
            plgpu.barrier_wait(ready)

            @pl.when(cid == 0)
            def _fetch():
                if fence:
                    fence_cluster()
                ref = buf if local else plgpu.cluster_ref(buf, {"cluster": 1})
                w = plgpu.load(ref, layout=plgpu.Layout.WGMMA)
                out_smem[...] = w
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem)
                plgpu.wait_smem_to_gmem(0)

            plgpu.barrier_arrive(done)  # CTA 1 stays until CTA 0 has read its buffer
            plgpu.barrier_wait(done)

        pl.run_scoped(
            scope,
            plgpu.SMEM((64, n), jnp.float32, transforms=swz),
            plgpu.SMEM((64, n), jnp.float32, transforms=buf_t),
            plgpu.SMEM((64, n), jnp.float32, transforms=swz),
            plgpu.Barrier(num_arrivals=1),
            plgpu.ClusterBarrier(collective_axes=("cluster",)),
            plgpu.ClusterBarrier(collective_axes=("cluster",)),
            collective_axes="wg",
        )

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((64, n), jnp.float32), grid=(1,), grid_names=("g",),
        cluster=(2,), cluster_names=("cluster",), num_threads=1, thread_name="wg",
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (64, n), jnp.float32)
    if lower:  # CPU: cross-lower for CUDA only
        jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))
        print(f"{variant}: lowered", flush=True)
        return
    y = np.asarray(jax.block_until_ready(f(x)))
    ok = np.allclose(y, 2 * np.asarray(x))
    print(f"{variant}: {'OK' if ok else 'WRONG'} max|err|={np.abs(y - 2 * np.asarray(x)).max():.3g}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--lower", action="store_true", help="cross-lower every variant for CUDA (CPU) and stop")
    a = p.parse_args(argv)
    if a.lower:
        for v in VARIANTS:
            run(v, lower=True)
        return
    if a.variant:
        run(a.variant)
        return
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--variant", v], capture_output=True, text=True, timeout=240)
        tail = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(v) or "Error" in ln][:3]
        print(f"{v}: rc={r.returncode}", *tail, sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
