"""Tensor-parallel quantized SwiGLU MLP (Megatron: gate/up column-parallel, down row-parallel) on every device.

For each token count M, times one MLP block ``down(silu(gate(x)) * up(x))``
(hidden H=4096, intermediate I=14336 by default) on all local devices
(tensor-parallel over a 1-D mesh) and on one device, for:

* ``bf16``     bfloat16 weights, jnp dots (same shard_map structure, one psum);
* ``xla-fp8``  qlin's XLA kernel (native fp8 ``dot_general`` -> cuBLASLt) forced with ``kernel="xla"``;
* ``qlin``     the kernel ``qlin.kernel_for`` selects (a Pallas Mosaic GPU kernel on H100 when registered),

fp8 e4m3 per-channel weights and dynamic per-token activations (``--config int8`` for INT8).
Checks: every sharded output equals its 1-device output within ``kernel_rtol(bf16)``
(row-parallel uses global per-token scales), and the quantized MLP stays within
``2 * quant_rtol`` of the bf16 one (two quantized layers in series). Exit status 1 if a check fails.

    PYTHONPATH=. python3 benchmarks/bench_tp_mlp.py             # GPUs: H=4096, I=14336, M in 16,256,4096
    PYTHONPATH=. python benchmarks/bench_tp_mlp.py --tiny       # CPU: 8 host devices, H=128, I=512, M in 16,64

Writes ``$OUT/bench_tp_mlp.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes; on the CPU, 8 host devices")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--tokens", type=str, default=None, help="comma-separated M values")
    ap.add_argument("--config", choices=("fp8", "int8"), default="fp8")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--devices", type=int, default=None, help="use this many devices (default: all)")
    ap.add_argument("--row-pad", type=int, default=None,
                    help="statistic columns per row-parallel shard (default: qlin.flax.sharding.default_pad)")
    return ap.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # only affects the CPU backend; must be set before jax initialises
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import qlin  # noqa: E402
from qlin.flax.sharding import TPMLP, default_pad  # noqa: E402
from qlin.platform import describe_device  # noqa: E402
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err  # noqa: E402

BF16 = jnp.bfloat16


def bf16_tp_mlp(wg, wu, wd, mesh, axis="tp"):
    """The bf16 baseline with the same Megatron structure: weights (N, K) bf16, one psum."""
    put = lambda a, s: jax.device_put(a.astype(BF16), NamedSharding(mesh, s))  # noqa: E731
    params = (put(wg, P(axis, None)), put(wu, P(axis, None)), put(wd, P(None, axis)))
    nt = (((1,), (1,)), ((), ()))

    def body(x, g, u, d):
        x2 = x.reshape(-1, x.shape[-1]).astype(BF16)
        dot = lambda a, w: jax.lax.dot_general(a, w, nt, preferred_element_type=jnp.float32)  # noqa: E731
        h = (jax.nn.silu(dot(x2, g)) * dot(x2, u)).astype(BF16)
        y = jax.lax.psum(dot(h, d), axis)
        return y.astype(BF16).reshape(*x.shape[:-1], -1)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis, None), P(axis, None), P(None, axis)),
                       out_specs=P(), check_vma=False)
    return jax.jit(fn), params


def time_fn(fn, *args, iters):
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(args):
    devices = jax.devices()
    if args.devices:
        devices = devices[: args.devices]
    n = len(devices)
    tiny = args.tiny
    H = args.hidden or (128 if tiny else 4096)
    I = args.intermediate or (512 if tiny else 14336)
    Ms = [int(m) for m in args.tokens.split(",")] if args.tokens else ([16, 64] if tiny else [16, 256, 4096])
    iters = args.iters or (3 if tiny else 20)
    cfg = (qlin.FP8ScaledMMConfig() if args.config == "fp8" else qlin.Int8ScaledMMConfig())
    if I % n:
        raise SystemExit(f"intermediate={I} must be divisible by the {n} devices")
    print(f"device: {describe_device(devices[0])} x{n}  H={H} I={I} M={Ms}  config: {cfg.describe()}")
    f32_cfg = qlin.FP8ScaledMMConfig(out_dtype=jnp.float32) if args.config == "fp8" else \
        qlin.Int8ScaledMMConfig(out_dtype=jnp.float32)
    auto_kernels = f"{qlin.kernel_for(cfg).name}/{qlin.kernel_for(f32_cfg).name}"

    k = jax.random.split(jax.random.key(0), 4)
    wg = jax.random.normal(k[0], (I, H), jnp.float32) * H ** -0.5
    wu = jax.random.normal(k[1], (I, H), jnp.float32) * H ** -0.5
    wd = jax.random.normal(k[2], (H, I), jnp.float32) * I ** -0.5
    meshes = {n: Mesh(np.array(devices), ("tp",))}
    if n > 1:
        meshes[1] = Mesh(np.array(devices[:1]), ("tp",))

    impls = {}
    for tp, mesh in meshes.items():
        impls[("bf16", tp)] = bf16_tp_mlp(wg, wu, wd, mesh)
        for name, kernel in (("xla-fp8" if args.config == "fp8" else "xla-int8", "xla"), ("qlin", None)):
            mlp = TPMLP.from_float(wg, wu, wd, cfg, mesh, kernel=kernel, row_pad=args.row_pad)
            impls[(name, tp)] = (jax.jit(lambda m, x: m(x)), mlp)

    rows, ok = [], True
    flops_per_token = 2 * 3 * H * I
    for M in Ms:
        x = jax.random.normal(jax.random.fold_in(k[3], M), (M, H), jnp.float32).astype(BF16)
        outs, times = {}, {}
        for (name, tp), (fn, params) in impls.items():
            args_ = (x, *params) if name == "bf16" else (params, x)
            outs[(name, tp)] = np.asarray(fn(*args_), np.float32)
            times[(name, tp)] = time_fn(fn, *args_, iters=iters)
        for (name, tp), t in times.items():
            ref_single = outs[(name, 1)]
            err_tp = rel_err(outs[(name, tp)], ref_single)
            err_bf16 = rel_err(outs[(name, tp)], outs[("bf16", 1)])
            good = err_tp <= kernel_rtol(BF16) and (name == "bf16" or err_bf16 <= 2 * quant_rtol(cfg))
            ok &= good
            rows.append({
                "M": M, "impl": name, "devices": tp, "ms": t, "tflops": flops_per_token * M / (t * 1e-3) / 1e12,
                "speedup_vs_bf16_same_devices": times[("bf16", tp)] / t,
                "rel_err_vs_1_device": err_tp, "rel_err_vs_bf16": err_bf16, "ok": bool(good),
                "kernel": auto_kernels if name == "qlin" else ("xla" if name != "bf16" else "jnp"),
            })
    print(f"{'M':>5} {'impl':<9} {'dev':>3} {'ms':>9} {'TFLOP/s':>8} {'vs bf16':>8} {'err vs 1dev':>11} "
          f"{'err vs bf16':>11}  ok  kernel")
    for r in rows:
        print(f"{r['M']:>5} {r['impl']:<9} {r['devices']:>3} {r['ms']:>9.3f} {r['tflops']:>8.2f} "
              f"{r['speedup_vs_bf16_same_devices']:>7.2f}x {r['rel_err_vs_1_device']:>11.2e} "
              f"{r['rel_err_vs_bf16']:>11.4f}  {'ok' if r['ok'] else 'FAIL'}  {r['kernel']}")
    result = {"device": describe_device(devices[0]), "devices": n, "jax": jax.__version__, "hidden": H,
              "row_pad": args.row_pad if args.row_pad is not None else default_pad(I // n),
              "intermediate": I, "tokens": Ms, "config": cfg.describe(), "iters": iters, "all_ok": bool(ok),
              "results": rows}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_tp_mlp.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main(ARGS)["all_ok"] else 1)
