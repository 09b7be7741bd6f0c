"""The ``qlin`` command: ``info`` (what runs here), ``demo`` (the main job), ``bench`` (GEMM benchmark)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import qlin
from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.platform import compute_capability, describe_device, device_platform
from qlin.select import explain, registered_kernels
from qlin.tolerances import rel_err

#: The configs ``qlin info`` and ``qlin demo`` show, by name.
SHOWCASE_CONFIGS: dict[str, ScaledMMConfig] = {
    "fp8 per-tensor, static": FP8ScaledMMConfig(weight_granularity="per_tensor", activation="static"),
    "fp8 per-channel, per-token": FP8ScaledMMConfig(),
    "fp8 block 128x128, per-group": FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group"),
    "int8 per-channel, per-token": Int8ScaledMMConfig(),
    "int8 asym per-channel, per-token": Int8ScaledMMConfig(symmetric=False),
    "int8 asym per-tensor, static": Int8ScaledMMConfig(weight_granularity="per_tensor", activation="static", symmetric=False),
}


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    platform = device_platform()
    cc = compute_capability()
    if not args.json:
        console.print(f"[bold]qlin {qlin.__version__}[/]  jax {jax.__version__}  backend {jax.default_backend()}")
        console.print(f"device: {describe_device()}  platform: {platform}  "
                      f"compute capability: {cc if cc is not None else '-'}")
        console.print(f"kernels for {platform} (priority order): "
                      f"{', '.join(k.name for k in registered_kernels(platform))}")
    configs = SHOWCASE_CONFIGS
    table = Table(title="Kernel selection per config (first usable kernel wins)")
    table.add_column("config")
    table.add_column("chosen", style="bold green")
    for k in registered_kernels(platform):
        table.add_column(k.name)
    rows = []
    for label, cfg in configs.items():
        verdicts = explain(cfg)
        chosen = next((v.name for v in verdicts if v.ok), "NONE")
        cells = ["yes" if v.ok else f"no: {v.reason}" for v in verdicts]
        table.add_row(f"{label}\n[dim]{cfg.describe()}[/]", chosen, *cells)
        rows.append({"config": label, "describe": cfg.describe(), "chosen": chosen,
                     "verdicts": [{"kernel": v.name, "ok": v.ok, "reason": v.reason} for v in verdicts]})
    if args.json:
        print(json.dumps({"platform": platform, "compute_capability": cc, "device": describe_device(),
                          "jax": jax.__version__, "configs": rows}, indent=2))
    else:
        console.print(table)
    return 0


# -- demo ----------------------------------------------------------------------------------

def _median_time(fn: Callable[[], jax.Array], repeats: int, inner: int = 10) -> float:
    """Median seconds per call over ``repeats`` samples of ``inner`` back-to-back calls.

    Back-to-back calls keep the GPU queue full (one host sync per sample, not per call);
    single synchronized calls on an H100 varied by up to 2x between runs.
    """
    for _ in range(3):  # compile + warm
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn() for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def run_demo(hidden: int, intermediate: int, tokens: int, repeats: int, seed: int = 0) -> list[dict]:
    """Quantize a random SwiGLU MLP block (gate/up: hidden -> intermediate, down: back) and compare to float."""
    keys = jax.random.split(jax.random.key(seed), 5)
    scale_in, scale_mid = hidden**-0.5, intermediate**-0.5
    w_gate = jax.random.normal(keys[0], (intermediate, hidden)) * scale_in
    w_up = jax.random.normal(keys[1], (intermediate, hidden)) * scale_in
    w_down = jax.random.normal(keys[2], (hidden, intermediate)) * scale_mid
    # Activations with a few outlier channels, as real transformers have.
    x = jax.random.normal(keys[3], (tokens, hidden))
    x = x.at[:, :4].multiply(8.0).astype(jnp.bfloat16)

    def mlp_float(x):
        xf = x.astype(jnp.bfloat16)
        g = xf @ w_gate.T.astype(jnp.bfloat16)
        u = xf @ w_up.T.astype(jnp.bfloat16)
        return (jax.nn.silu(g) * u) @ w_down.T.astype(jnp.bfloat16)

    x64 = np.asarray(x, np.float64)
    g64 = x64 @ np.asarray(w_gate, np.float64).T
    u64 = x64 @ np.asarray(w_up, np.float64).T
    h64 = g64 / (1 + np.exp(-g64)) * u64
    ref = h64 @ np.asarray(w_down, np.float64).T

    float_fn = jax.jit(mlp_float)
    results = [{
        "config": "bf16 (unquantized)", "kernel": "xla", "rel_err": rel_err(float_fn(x), ref),
        "ms": 1e3 * _median_time(lambda: float_fn(x), repeats),
    }]
    for label, cfg in SHOWCASE_CONFIGS.items():
        calib = {}
        if cfg.is_static:
            s_in, zp_in = qlin.calibrate_static(x, cfg)
            # the down projection sees the hidden activation: calibrate it on the float model
            h = jax.nn.silu(x.astype(jnp.float32) @ w_gate.T) * (x.astype(jnp.float32) @ w_up.T)
            s_mid, zp_mid = qlin.calibrate_static(h, cfg)
            calib = {"in": (s_in, zp_in), "mid": (s_mid, zp_mid)}
        gate = qlin.QuantizedLinear.from_float(w_gate, cfg, **_static(calib, "in"))
        up = qlin.QuantizedLinear.from_float(w_up, cfg, **_static(calib, "in"))
        down = qlin.QuantizedLinear.from_float(w_down, cfg, **_static(calib, "mid"))

        @jax.jit
        def mlp_q(x, pg, pu, pd, k=gate.kernel, kd=down.kernel):
            h = jax.nn.silu(k.apply_weights(pg, x).astype(jnp.float32)) * k.apply_weights(pu, x).astype(jnp.float32)
            return kd.apply_weights(pd, h.astype(x.dtype))

        run = lambda: mlp_q(x, gate.params, up.params, down.params)  # noqa: E731
        results.append({
            "config": label, "describe": cfg.describe(), "kernel": gate.kernel.name,
            "rel_err": rel_err(run(), ref), "ms": 1e3 * _median_time(run, repeats),
        })
    return results


def _static(calib: dict, which: str) -> dict:
    if not calib:
        return {}
    s, zp = calib[which]
    return {"input_scale": s, "input_zero_point": zp}


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    on_gpu = device_platform() != "cpu"
    hidden = args.hidden or (4096 if on_gpu else 512)
    inter = args.intermediate or (14336 if on_gpu else 1536)
    tokens = args.tokens or (2048 if on_gpu else 64)
    results = run_demo(hidden, inter, tokens, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    console.print(f"[bold]qlin demo[/]: SwiGLU MLP block hidden={hidden} intermediate={inter} tokens={tokens} "
                  f"on {describe_device()}")
    table = Table(title="Quantized MLP vs float64 reference of the float model")
    for col in ("config", "kernel", "rel. error", "ms / call", "speed-up vs bf16"):
        table.add_column(col)
    base = results[0]["ms"]
    for r in results:
        table.add_row(r["config"], r["kernel"], f"{r['rel_err']:.4f}", f"{r['ms']:.3f}", f"{base / r['ms']:.2f}x")
    console.print(table)
    return 0


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        from qlin import bench
    except ImportError as e:  # pragma: no cover - only before the benchmark module exists
        print(f"qlin bench: the benchmark module is not available ({e})", file=sys.stderr)
        return 2
    return int(bench.main(list(rest)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlin", description="FP8/INT8 quantized linear layers for JAX.")
    p.add_argument("--version", action="version", version=f"qlin {qlin.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="platform, device and which kernel runs each config here (with reasons)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo = sub.add_parser("demo", help="quantize a random transformer MLP block to fp8/int8; error and time vs float")
    demo.add_argument("--hidden", type=int, default=None, help="model width (default: 512 on CPU, 4096 on GPU)")
    demo.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 1536 CPU, 14336 GPU)")
    demo.add_argument("--tokens", type=int, default=None, help="tokens per call (default: 64 CPU, 2048 GPU)")
    demo.add_argument("--repeats", type=int, default=10, help="timed samples per config (median; each sample is 10 back-to-back calls)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("bench", help="GEMM benchmark vs XLA-native and torch (see `qlin bench --help`)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    console = Console()
    if args.command == "info":
        return cmd_info(args, console)
    if args.command == "demo":
        for name in ("hidden", "intermediate", "tokens", "repeats"):
            v = getattr(args, name)
            if v is not None and v <= 0:
                parser.error(f"--{name}: must be a positive integer, got {v}")
        return cmd_demo(args, console)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
