"""GEMM benchmark: qlin's Mosaic GPU scaled matmul against XLA-native and torch.

``qlin bench`` (and ``benchmarks/bench_gemm.py``) call :func:`main`.

For every (N, K) Llama-3 8B / 70B linear shape and every M of the grid it
times, on the same GPU in the same process:

* ``qlin:mosaic_gpu``  - :func:`qlin.kernels.mosaic_gpu_scaled_mm.scaled_mm`
  (fp8 and int8, per-token x per-channel scales, bf16 out, tuned/heuristic tiles);
* ``xla``              - ``lax.dot_general`` on the 8-bit operands (f32 / int32
  accumulation) with the same scale epilogue, and a bf16 ``dot``;
* ``torch``            - ``torch._scaled_mm`` (fp8, row-wise scales) and
  ``torch._int_mm`` + the scale epilogue (int8), when torch has CUDA.

JAX kernel time is CUPTI's (``jax.experimental.mosaic.gpu.profiler.measure``:
the sum of the kernels one call launches), torch's is CUDA events; each the
median of >= 20 warm runs.  For small M the weight fits in L2, so each run
rotates over several weight copies (> 100 MB in all) to measure HBM, not L2.
Rows carry ``impl, dtype, M, N, K, us, tflops, rel_err, device``; the output
is a JSON file, a markdown table and (matplotlib permitting) a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LLAMA3_SHAPES = [  # (N, K)
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),  # 8B
    (10240, 8192),
    (8192, 8192),
    (57344, 8192),
    (8192, 28672),  # 70B
]
M_GRID = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336)]
QUICK_M = [1, 16, 128, 1024, 4096]

ROTATE_BYTES = 128 << 20  # weight copies per timing sweep exceed the 50 MB L2


# ----------------------------------------------------------------------------
# Inputs, reference.
# ----------------------------------------------------------------------------


def make_operands(m, n, k, dtype: str, seed: int = 0, *, asym: bool = False):
    """Random 8-bit operands + scales (numpy), never zeros."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    if dtype == "int8":
        a = rng.integers(-127, 128, (m, k), dtype=np.int8)
        b = rng.integers(-127, 128, (n, k), dtype=np.int8)
    else:
        a = np.asarray(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32) * 2).astype(jnp.float8_e4m3fn))
        b = np.asarray(jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 2).astype(jnp.float8_e4m3fn))
    a_s = rng.uniform(0.5, 1.5, (m, 1)).astype(np.float32) / math.sqrt(k)
    b_s = rng.uniform(0.5, 1.5, (1, n)).astype(np.float32) / (16 if dtype == "int8" else 1)
    return a, b, a_s, b_s


def reference(a, b, a_s, b_s, bias=None, azp=None, azp_adj=None) -> np.ndarray:
    """float64 reference of the kernel contract, from the same 8-bit operands."""
    af = np.asarray(a).astype(np.float64)
    bf = np.asarray(b).astype(np.float64)
    acc = af @ bf.T
    if azp is not None:
        acc = acc - np.asarray(azp, np.float64) * np.asarray(azp_adj, np.float64)
    y = acc * np.asarray(a_s, np.float64) * np.asarray(b_s, np.float64)
    if bias is not None:
        y = y + np.asarray(bias).astype(np.float64)[None, :]
    return y


def rel_err(out, ref) -> float:
    out = np.asarray(out).astype(np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


# ----------------------------------------------------------------------------
# Implementations (jitted, JAX).
# ----------------------------------------------------------------------------


def qlin_fn(config=None, out_dtype=None):
    import jax
    import jax.numpy as jnp
    from qlin.kernels import mosaic_gpu_scaled_mm as mm

    od = out_dtype or jnp.bfloat16

    def f(a, b, a_s, b_s):
        return mm.scaled_mm(a, b, a_s, b_s, out_dtype=od, config=config)

    return jax.jit(f)


def xla_fn(dtype: str, out_dtype=None):
    """XLA-native: dot_general on the 8-bit operands + the scale epilogue."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    od = out_dtype or jnp.bfloat16
    if dtype == "bf16":

        def f(a, b):
            return lax.dot_general(a, b, (((1,), (1,)), ((), ())))

        return jax.jit(f)
    acc_t = jnp.int32 if dtype == "int8" else jnp.float32

    def f(a, b, a_s, b_s):
        acc = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc_t)
        return (acc.astype(jnp.float32) * a_s * b_s).astype(od)

    return jax.jit(f)


def measure_us(fn, arg_sets, iterations: int = 20) -> float:
    """Median CUPTI time (us) of one call of ``fn``, rotating over ``arg_sets``.

    Each timed iteration runs ``fn`` once per arg set (different weight copies)
    and the kernel time is divided by the number of sets.
    """
    import jax
    from jax.experimental.mosaic.gpu import profiler

    def many(sets):
        return [fn(*s) for s in sets]

    jax.block_until_ready(many(arg_sets))  # compile + warm
    _, times = profiler.measure(many, iterations=iterations)(arg_sets)
    if not isinstance(times, (list, tuple)):
        times = [times]
    times = [t for t in times if t is not None]
    return statistics.median(times) * 1e3 / len(arg_sets)


def n_copies(n, k, itemsize=1) -> int:
    w = n * k * itemsize
    return max(1, min(8, math.ceil(ROTATE_BYTES / w)))


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth in GB/s, counting bytes read + bytes written."""
    import jax
    import jax.numpy as jnp

    x = jnp.arange(256 << 20, dtype=jnp.uint32)  # 1 GiB
    f = jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A))
    us = measure_us(f, [(x,)], iterations=20)
    return 2 * x.nbytes / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------
# torch.
# ----------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def torch_time_us(fn, arg_sets, iterations: int = 30) -> tuple[float, object]:
    import torch

    out = None
    for s in arg_sets:
        out = fn(*s)
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        st = torch.cuda.Event(enable_timing=True)
        en = torch.cuda.Event(enable_timing=True)
        st.record()
        for s in arg_sets:
            fn(*s)
        en.record()
        torch.cuda.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / len(arg_sets))
    return statistics.median(times), out


def torch_case(dtype, m, n, k, copies, seed=0):
    """(us, rel_err) of torch's 8-bit matmul + the same scale epilogue, or raises.

    fp8: ``torch._scaled_mm`` with row-wise scales (M, 1) x (1, N) and bf16 out;
    int8: ``torch._int_mm`` (int32) followed by the scale epilogue.
    """
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    if dtype == "fp8":
        ta = (2 * torch.randn(m, k, device=dev, generator=g)).to(torch.float8_e4m3fn)
        tbs = [(2 * torch.randn(n, k, device=dev, generator=g)).to(torch.float8_e4m3fn) for _ in range(copies)]
    else:
        ta = torch.randint(-127, 128, (m, k), device=dev, generator=g, dtype=torch.int8)
        tbs = [torch.randint(-127, 128, (n, k), device=dev, generator=g, dtype=torch.int8) for _ in range(copies)]
    tas = torch.rand(m, 1, device=dev, generator=g) + 0.5
    tbsc = torch.rand(1, n, device=dev, generator=g) + 0.5

    if dtype == "fp8":

        def fn(tb):
            return torch._scaled_mm(ta, tb.t(), scale_a=tas, scale_b=tbsc, out_dtype=torch.bfloat16)
    else:

        def fn(tb):
            return (torch._int_mm(ta, tb.t()).float() * tas * tbsc).to(torch.bfloat16)

    us, _ = torch_time_us(fn, [(tb,) for tb in tbs])
    out = fn(tbs[0]).float()
    ref = (ta.float() @ tbs[0].float().t()) * tas * tbsc
    err = float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
    return us, err


# ----------------------------------------------------------------------------
# One benchmark case.
# ----------------------------------------------------------------------------


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def device_operands(m, n, k, dtype: str, copies: int, seed: int = 0):
    """Random operands generated on the device (fast for 470 MB weights)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    ka, ks, kt, *kb = jax.random.split(key, 3 + copies)
    if dtype == "int8":
        gen = lambda kk, shape: jax.random.randint(kk, shape, -127, 128, jnp.int32).astype(jnp.int8)
        b_s = jax.random.uniform(kt, (1, n), jnp.float32, 0.5, 1.5) / 16
    else:
        gen = lambda kk, shape: (2 * jax.random.normal(kk, shape, jnp.float32)).astype(jnp.float8_e4m3fn)
        b_s = jax.random.uniform(kt, (1, n), jnp.float32, 0.5, 1.5)
    gen = jax.jit(gen, static_argnums=1)
    a = gen(ka, (m, k))
    bs = [gen(kk, (n, k)) for kk in kb]
    a_s = jax.random.uniform(ks, (m, 1), jnp.float32, 0.5, 1.5) / math.sqrt(k)
    return a, bs, a_s, b_s


def device_rel_err(out, a, b, a_s, b_s) -> float:
    """||out - ref|| / ||ref|| with ref = f32 (HIGHEST) dot of the upcast operands, on device.

    fp8 x fp8 products are exact in f32 and int8 sums stay far below f32's
    relative precision of the bf16 outputs, so this is a sound reference.
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def err(out, a, b, a_s, b_s):
        ref = (
            jax.lax.dot_general(
                a.astype(jnp.float32),
                b.astype(jnp.float32),
                (((1,), (1,)), ((), ())),
                precision=jax.lax.Precision.HIGHEST,
            )
            * a_s
            * b_s
        )
        o = out.astype(jnp.float32)
        bad = jnp.any(~jnp.isfinite(o))
        e = jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref)
        return jnp.where(bad, jnp.inf, e)

    return float(err(out, a, b, a_s, b_s))


def bench_case(
    m,
    n,
    k,
    *,
    dtypes=("fp8", "int8"),
    with_xla=True,
    with_bf16=True,
    with_torch=True,
    config=None,
    iterations=20,
    seed=0,
):
    """Rows for one (M, N, K)."""
    import jax
    import jax.numpy as jnp
    from qlin.kernels import autotune

    dev = device_name()
    rows = []
    flops = 2.0 * m * n * k

    def row(impl, dtype, us, err, **extra):
        r = dict(
            impl=impl,
            dtype=dtype,
            M=m,
            N=n,
            K=k,
            us=us,
            tflops=(flops / (us * 1e-6) / 1e12) if us and us > 0 else None,
            rel_err=err,
            device=dev,
        )
        r.update(extra)
        rows.append(r)
        return r

    ncp = n_copies(n, k)
    for dtype in dtypes:
        a, bs, a_s, b_s = device_operands(m, n, k, dtype, ncp, seed)
        jdt = a.dtype
        sets = [(a, b, a_s, b_s) for b in bs]
        cfg = config or autotune.get_config(m, n, k, jdt, jnp.bfloat16)
        try:
            fn = qlin_fn(cfg)
            us = measure_us(fn, sets, iterations)
            row("qlin:mosaic_gpu", dtype, us, device_rel_err(fn(*sets[0]), *sets[0]), config=cfg.short())
        except Exception as e:  # noqa: BLE001
            row("qlin:mosaic_gpu", dtype, None, None, error=str(e).splitlines()[0][:200])
        if with_xla:
            try:
                fx = xla_fn(dtype)
                us = measure_us(fx, sets, iterations)
                row("xla", dtype, us, device_rel_err(fx(*sets[0]), *sets[0]))
            except Exception as e:  # noqa: BLE001
                row("xla", dtype, None, None, error=str(e).splitlines()[0][:200])
        if with_torch and torch_available():
            try:
                us, err = torch_case(dtype, m, n, k, ncp, seed)
                row("torch", dtype, us, err)
            except Exception as e:  # noqa: BLE001
                row("torch", dtype, None, None, error=str(e).splitlines()[0][:200])
        del sets, bs, a
    if with_bf16:
        key = jax.random.key(seed + 1)
        ka, *kb = jax.random.split(key, 1 + n_copies(n, k, 2))
        a16 = jax.random.normal(ka, (m, k), jnp.bfloat16)
        b16 = [jax.random.normal(kk, (n, k), jnp.bfloat16) for kk in kb]
        try:
            us = measure_us(xla_fn("bf16"), [(a16, bb) for bb in b16], iterations)
            row("xla", "bf16", us, None)
        except Exception as e:  # noqa: BLE001
            row("xla", "bf16", None, None, error=str(e).splitlines()[0][:200])
        del b16
    return rows


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


def summarize(rows):
    """Adds ratio_vs_xla to qlin/torch rows; returns (per-dtype geomeans, min ratios)."""
    xla = {(r["dtype"], r["M"], r["N"], r["K"]): r["us"] for r in rows if r["impl"] == "xla" and r.get("us")}
    ratios: dict[str, list[float]] = {}
    for r in rows:
        x = xla.get((r["dtype"], r["M"], r["N"], r["K"]))
        if r["impl"] != "xla" and r.get("us") and x:
            r["ratio_vs_xla"] = x / r["us"]
            if r["impl"].startswith("qlin"):
                ratios.setdefault(r["dtype"], []).append(r["ratio_vs_xla"])
    geo = {d: math.exp(sum(map(math.log, v)) / len(v)) for d, v in ratios.items() if v}
    mins = {d: min(v) for d, v in ratios.items() if v}
    return geo, mins


def markdown_table(rows, peak_tflops=None, copy_gbs=None) -> str:
    geo, mins = summarize(rows)  # also sets ratio_vs_xla on the rows
    keys = sorted({(r["N"], r["K"], r["M"]) for r in rows})
    impls = [
        ("qlin:mosaic_gpu", "fp8"),
        ("xla", "fp8"),
        ("torch", "fp8"),
        ("qlin:mosaic_gpu", "int8"),
        ("xla", "int8"),
        ("torch", "int8"),
        ("xla", "bf16"),
    ]
    by = {(r["impl"], r["dtype"], r["N"], r["K"], r["M"]): r for r in rows}
    head = ["N", "K", "M"] + [f"{i} {d} us" for i, d in impls] + ["fp8 x XLA", "int8 x XLA", "fp8 TF/s", "int8 TOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, k, m in keys:
        cells = [str(n), str(k), str(m)]
        for i, d in impls:
            r = by.get((i, d, n, k, m))
            cells.append(f"{r['us']:.1f}" if r and r.get("us") else "-")
        for d in ("fp8", "int8"):
            r = by.get(("qlin:mosaic_gpu", d, n, k, m))
            cells.append(f"{r['ratio_vs_xla']:.2f}" if r and r.get("ratio_vs_xla") else "-")
        for d in ("fp8", "int8"):
            r = by.get(("qlin:mosaic_gpu", d, n, k, m))
            cells.append(f"{r['tflops']:.0f}" if r and r.get("tflops") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for d in sorted(geo):
        lines.append(f"- {d}: geomean speed-up vs XLA {geo[d]:.2f}x, worst {mins[d]:.2f}x")
    if copy_gbs:
        lines.append(f"- measured copy bandwidth (read+write): {copy_gbs:.0f} GB/s")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    cols = min(4, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        for impl, dtype, style in [
            ("qlin:mosaic_gpu", "fp8", "r-o"),
            ("xla", "fp8", "r--"),
            ("torch", "fp8", "r:"),
            ("qlin:mosaic_gpu", "int8", "b-o"),
            ("xla", "int8", "b--"),
            ("torch", "int8", "b:"),
            ("xla", "bf16", "k--"),
        ]:
            pts = sorted(
                (r["M"], r["tflops"])
                for r in rows
                if r["impl"] == impl and r["dtype"] == dtype and r["N"] == n and r["K"] == k and r.get("tflops")
            )
            if pts:
                ax.plot(*zip(*pts), style, label=f"{impl} {dtype}", ms=3)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={n} K={k}")
        ax.set_xlabel("M")
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _dump(args, rows, copy_gbs, skipped, t0) -> Path:
    import jax

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device_name(),
        jax=jax.__version__,
        copy_gbs=copy_gbs,
        skipped=skipped,
        wall_s=time.time() - t0,
        argv=sys.argv[1:],
    )
    (out / f"{args.tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qlin bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid")
    p.add_argument("--shapes", default=None, help="N:K,N:K,... (default: Llama-3 8B+70B)")
    p.add_argument("--m", default=None, help="comma-separated M values")
    p.add_argument("--dtypes", default="fp8,int8")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--tag", default="gemm")
    p.add_argument("--deadline-s", type=float, default=540.0, help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)

    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        print("qlin bench needs a CUDA GPU (Hopper); none found", file=sys.stderr)
        return 2
    t0 = time.time()
    shapes = QUICK_SHAPES if args.quick else LLAMA3_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    ms = QUICK_M if args.quick else M_GRID
    if args.m:
        ms = [int(v) for v in args.m.split(",")]
    dtypes = tuple(args.dtypes.split(","))
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {device_name()} jax {jax.__version__} copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows, skipped = [], []
    # Priority order, so that a deadline cuts the least informative cases.
    prio = [16, 128, 4096, 1, 512, 8192, 64, 256, 1024, 2048]
    ms = sorted(ms, key=lambda v: prio.index(v) if v in prio else len(prio))
    cases = [(n, k, m) for m in ms for (n, k) in shapes]
    for n, k, m in cases:
        if True:
            if time.time() - t0 > args.deadline_s:
                skipped.append((m, n, k))
                continue
            rs = bench_case(
                m,
                n,
                k,
                dtypes=dtypes,
                with_torch=not args.no_torch,
                with_bf16=not args.no_bf16,
                iterations=args.iterations,
            )
            for r in rs:
                if r["impl"].startswith("qlin") and r["M"] <= 16 and r.get("us"):
                    floor = n * k / (copy_gbs * 1e9) * 1e6
                    r["weight_floor_us"] = floor
                    r["x_floor"] = r["us"] / floor
            rows += rs
            _dump(args, rows, copy_gbs, skipped, t0)
            brief = " ".join(
                f"{r['impl']}/{r['dtype']}={r['us']:.1f}" if r.get("us") else f"{r['impl']}/{r['dtype']}=ERR"
                for r in rs
            )
            print(f"M={m} N={n} K={k}: {brief}", flush=True)
    out = _dump(args, rows, copy_gbs, skipped, t0)
    md = markdown_table(rows, copy_gbs=copy_gbs)
    if skipped:
        md += f"\n- skipped (deadline): {len(skipped)} cases"
    (out / f"{args.tag}.md").write_text(md + "\n")
    plot(rows, out / f"{args.tag}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
