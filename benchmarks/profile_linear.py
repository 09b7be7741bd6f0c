"""Where does the time of one quantized linear go?  (GPU; CUPTI kernel times.)

For each config (fp8 / int8 symmetric / int8 asymmetric, dynamic per-token) and
shape, times separately: the fused activation-quantize kernel, the scaled-matmul
kernel on already-quantized operands (with the tile config the wrapper picks),
and the whole ``apply_weights``; also prints the kernels each one launches.

    PYTHONPATH=. python3 benchmarks/profile_linear.py [--m 2048] [--shapes 14336:4096,4096:14336]

Written to settle why symmetric int8 ran slower than asymmetric int8 in
``qlin demo`` (1.54 vs 0.88 ms on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.mosaic.gpu import profiler  # noqa: E402

import qlin  # noqa: E402
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig  # noqa: E402
from qlin.kernels import autotune  # noqa: E402
from qlin.kernels import mosaic_gpu_scaled_mm as mm  # noqa: E402
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel  # noqa: E402
from qlin.kernels.mosaic_gpu_quantize import fused_quantize_activation  # noqa: E402

CONFIGS = {
    "fp8": FP8ScaledMMConfig(),
    "int8_sym": Int8ScaledMMConfig(),
    "int8_asym": Int8ScaledMMConfig(symmetric=False),
}


def cupti(fn, *args, iterations=30):
    jax.block_until_ready(fn(*args))
    _, t = profiler.measure(fn, iterations=iterations)(*args)
    t = t if isinstance(t, (list, tuple)) else [t]
    return statistics.median([v for v in t if v is not None]) * 1e3


def kernels_of(fn, *args):
    txt = jax.jit(fn).lower(*args).compile().as_text()
    return sorted({ln.split("custom_call_target=")[1].split(",")[0] for ln in txt.splitlines()
                   if "custom_call_target=" in ln}) + [f"fusions={txt.count(' fusion(')}"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--shapes", default="14336:4096,4096:14336")
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split(":"))
        x = (jax.random.normal(jax.random.key(1), (args.m, k), jnp.float32)).astype(jnp.bfloat16)
        w = jax.random.normal(jax.random.key(2), (n, k), jnp.float32) * k**-0.5
        for name, cfg in CONFIGS.items():
            kern = MosaicGPUScaledMMKernel(cfg)
            params = kern.process_weights_after_loading(qlin.quantize_weight(w, cfg))
            quant = jax.jit(lambda x, p, cfg=cfg: fused_quantize_activation(x, p, cfg))
            q, s, zp = quant(x, params)
            tcfg = autotune.get_config(args.m, n, k, q.dtype, cfg.out_dtype, has_azp=zp is not None)
            a_s = jnp.asarray(s, jnp.float32).reshape(args.m, 1)
            b_s = jnp.asarray(params.weight_scale, jnp.float32).reshape(1, -1)
            extra = {}
            if zp is not None:
                extra = dict(azp=jnp.asarray(zp, jnp.int32).reshape(args.m, 1),
                             azp_adj=jnp.asarray(params.azp_adj, jnp.int32).reshape(1, -1))
            mmf = jax.jit(lambda q, wq, a_s, b_s, extra: mm.scaled_mm(q, wq, a_s, b_s, out_dtype=cfg.out_dtype,
                                                                      **extra))
            full = jax.jit(lambda x, p, kern=kern: kern.apply_weights(p, x))
            r = dict(config=name, M=args.m, N=n, K=k, tile=tcfg.short(),
                     quant_us=cupti(quant, x, params),
                     mm_us=cupti(mmf, q, params.weight, a_s, b_s, extra),
                     apply_us=cupti(full, x, params),
                     apply_kernels=kernels_of(lambda x, p, kern=kern: kern.apply_weights(p, x), x, params))
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_linear.json").write_text(json.dumps(dict(device=str(jax.devices()[0].device_kind), rows=rows),
                                                       indent=1))
    print("| config | N | K | tile | quantize us | matmul us | apply us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['N']} | {r['K']} | {r['tile']} | {r['quant_us']:.1f} | {r['mm_us']:.1f} | "
              f"{r['apply_us']:.1f} |")


if __name__ == "__main__":
    main()
