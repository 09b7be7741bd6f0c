"""A/B: decode GEMM with the activation padded to the 64-row wgmma tile (TMA loads then stay in
bounds: the decode_floor ablation measured the zero fill of a mostly out-of-bounds activation box
costing up to +10 us) against the unpadded default; the pad is inside the timed program.

    PYTHONPATH=. python3 benchmarks/ab_decode_pad64.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from qlin import bench  # noqa: E402
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402

F8 = jnp.dtype(jnp.float8_e4m3fn)


def main():
    rows = []
    for n, k in ((4096, 14336), (8192, 8192), (10240, 8192), (6144, 4096), (4096, 4096), (8192, 28672)):
        copies = bench.n_copies(n, k)
        for m in (1, 16):
            a, bs, a_s, b_s = bench.device_operands(m, n, k, "fp8", copies, 1)
            sets = [(a, b, a_s, b_s) for b in bs]
            base = mm.default_config(m, n, k, F8)
            r = dict(M=m, N=n, K=k, default=base.short(), xla=bench.measure_us(bench.xla_fn("fp8"), sets, 30))
            r["default_us"] = bench.measure_us(bench.qlin_fn(base), sets, 30)
            cands = {base}
            for tn in (32, 64, 128):
                for tk, st in ((256, 8), (128, 8), (256, 6)):
                    c = dataclasses.replace(
                        base, tile_n=tn, tile_k=tk, max_concurrent_steps=st, epi_tile_n=min(64, tn), split_k=1
                    )
                    c = mm._fit_smem(c, F8, jnp.bfloat16)
                    if mm._cdiv(n, tn) <= 2 * mm.num_sms():
                        cands.add(c)

            def padded(cfg):
                def f(a, b, a_s, b_s):
                    ap = jnp.pad(a, ((0, 64 - m), (0, 0)))
                    sp = jnp.pad(a_s, ((0, 64 - m), (0, 0)), constant_values=1.0)
                    return mm.scaled_mm(ap, b, sp, b_s, out_dtype=jnp.bfloat16, config=cfg)[:m]

                return f

            for c in sorted(cands, key=lambda c: c.short()):
                try:
                    r[f"pad64_{c.short()}"] = bench.measure_us(padded(c), sets, 30)
                except Exception as e:  # noqa: BLE001
                    r[f"pad64_{c.short()}"] = str(e)[:100]
            best = min((v, kk) for kk, v in r.items() if kk.startswith("pad64") and isinstance(v, float))
            print(f"{m}x{n}x{k}: xla {r['xla']:.2f} default {r['default_us']:.2f} ({base.short()}) "
                  f"best pad64 {best[0]:.2f} ({best[1]})", flush=True)  # fmt: skip
            rows.append(r)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    (out / "ab_decode_pad64.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
