# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Performance: benchmark results, rooflines and tile configurations
#
# 1. **The committed GPU benchmark** (`benchmarks/results/*.json`, written by the GEMM benchmark on an
#    H100/H200): TFLOP/s vs M for each Llama-3 linear shape, qlin's kernel vs XLA-native (cuBLASLt) vs
#    torch, against the roofline of the device (memory-bound slope and compute ceiling).
# 2. **A live re-run** of a small grid on this machine's GPU, when there is one (on a CPU-only machine
#    without committed results, a small CPU timing stands in, so the plots have something real to show).
# 3. **Tile configurations of the Mosaic GPU kernel**, explored on the CPU: what each tile shape does to the
#    grid of output tiles and the SMs, its shared-memory budget against Hopper's 227 KiB, and a run of the
#    real kernel in Mosaic GPU *interpret mode* (correctness only: interpret mode says nothing about speed).

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import qlin
from qlin import viz
from qlin.platform import describe_device
from qlin.tolerances import kernel_rtol, rel_err

ON_GPU = jax.default_backend() == "gpu"
print(f"qlin {qlin.__version__}, jax {jax.__version__}, device: {describe_device()}")

# %% [markdown]
# ## 1. Committed GPU benchmark results
#
# Each row: `impl` (`"qlin:<kernel>"`, `"xla"`, `"torch"`), `dtype` (`"fp8"`, `"int8"`, `"bf16"`), the GEMM
# shape `M, N, K` (`y (M, N) = x (M, K) · W (N, K)ᵀ`), kernel time `us`, `tflops`, `rel_err` and `device`.
# `QLIN_BENCH_RESULTS=<folder>` points the notebook at other results.

# %%
results_dir = viz.find_results_dir()
rows = viz.load_benchmark_results(results_dir)
failed = [r for r in viz.load_benchmark_results(results_dir, include_failed=True) if r["failed"]]
if rows:
    devices = sorted({r["device"] for r in rows})
    device = max(devices, key=lambda d: sum(r["device"] == d for r in rows))
    rows = [r for r in rows if r["device"] == device]
    spec = viz.device_spec(device)
    print(f"{len(rows)} rows from {sorted({r['source'] for r in rows})} in {results_dir}")
    print(f"device: {device}" + (f" (also in the results: {[d for d in devices if d != device]})"
                                  if len(devices) > 1 else ""))
    print("roofline:", f"{spec.name}: {dict(spec.peak_tflops)} TFLOP/s, {spec.mem_tbs} TB/s" if spec
          else "no datasheet numbers for this device, plots without roofline")
    print("implementations:", sorted({f"{r['impl']} {r['dtype']}" for r in rows}))
    copy_gbs = sorted({r["copy_gbs"] for r in rows if r.get("copy_gbs")})
    if copy_gbs and spec:
        print(f"measured copy bandwidth: {copy_gbs[-1]:.0f} GB/s "
              f"({copy_gbs[-1] / (1000 * spec.mem_tbs):.0%} of the datasheet's {spec.mem_tbs} TB/s)")
    if failed:
        print(f"{len(failed)} benchmark case(s) did not run:")
        display(Markdown(viz.format_table([{k: r.get(k) for k in ("impl", "dtype", "M", "N", "K", "error")}
                                           for r in failed])))
else:
    device, spec = None, None
    print(f"No GPU benchmark results are committed yet (looked in {results_dir or 'benchmarks/results/'}).\n"
          "They come from the GEMM benchmark on an H100/H200 (`qlin bench`, benchmarks/); once committed,\n"
          "this notebook plots them. Section 2 times a small grid on this machine instead.")

# %% [markdown]
# ### TFLOP/s vs M, per shape
#
# One panel per weight shape `(N, K)`, M (tokens) on the x axis. The dashed line is the roofline: at small M
# a GEMM is bound by reading the weight (`N·K` bytes for 8-bit, twice that for bf16), so its best possible
# TFLOP/s grows linearly with M; at large M it hits the tensor-core peak. bf16 XLA is drawn in both figures
# for reference.

# %%
def plot_grid(rows, dtypes, spec, title):
    shapes = viz.shapes_of(rows)
    cols = min(4, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (n, k) in zip(axes.ravel(), shapes):
        viz.plot_tflops_vs_m(rows, n, k, ax, spec=spec, dtypes=dtypes, legend=False)
    for ax in axes.ravel()[len(shapes):]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    plt.show()


if rows:
    for dt in ("fp8", "int8"):
        if any(r["dtype"] == dt for r in rows):
            plot_grid(rows, (dt, "bf16"), spec, f"{dt.upper()} GEMM on {device}")

# %% [markdown]
# ### qlin vs XLA-native and torch
#
# Speed-up of qlin's chosen kernel over each baseline at the same dtype and shape (`> 1` = qlin faster),
# with the geometric mean and the worst case.

# %%
if rows:
    summary = []
    for baseline in ("xla", "torch"):
        for dt in ("fp8", "int8"):
            s = [d for d in viz.speedups(rows, "qlin:", baseline) if d["dtype"] == dt]
            if s:
                worst = min(s, key=lambda d: d["speedup"])
                summary.append({"vs": baseline, "dtype": dt, "points": len(s),
                                "geomean": viz.geomean(d["speedup"] for d in s),
                                "min": worst["speedup"], "worst at (M, N, K)": (worst["M"], worst["N"], worst["K"]),
                                "max": max(d["speedup"] for d in s)})
    display(Markdown(viz.format_table(summary, floatfmt=".3f") if summary else
                     "No qlin rows with a matching baseline in the results."))

# %% [markdown]
# Large-M throughput (M ≥ 4096) and the largest error each implementation reported:

# %%
if rows:
    big = {}
    for r in rows:
        if r["M"] >= 4096:
            big.setdefault((r["impl"], r["dtype"]), []).append(r["tflops"])
    errs = {}
    for r in rows:
        if r["rel_err"] is not None:
            errs.setdefault((r["impl"], r["dtype"]), []).append(r["rel_err"])
    keys = sorted(set(big) | set(errs))
    display(Markdown(viz.format_table([
        {"impl": i, "dtype": d, "min TFLOP/s (M>=4096)": min(big[(i, d)]) if (i, d) in big else None,
         "max TFLOP/s": max(big[(i, d)]) if (i, d) in big else None,
         "max rel_err": max(errs[(i, d)]) if (i, d) in errs else None} for i, d in keys], floatfmt=".4g")))

# %% [markdown]
# ### Roofline
#
# Every measured point against its arithmetic intensity (FLOP per byte of the minimum DRAM traffic). Points
# near the slope are bandwidth-bound (decode-sized M), points near the ceilings compute-bound.

# %%
if rows and spec is not None:
    fig, ax = plt.subplots(figsize=(8, 5))
    viz.plot_roofline(rows, spec, ax, title=f"Roofline, {device}")
    plt.show()
elif rows:
    print(f"No datasheet numbers for {device!r} in viz.DEVICE_SPECS: roofline skipped.")

# %% [markdown]
# ## 2. Live run on this machine
#
# With a GPU: a small grid of qlin's chosen kernel vs XLA-native (and bf16), wall-clock medians of warm calls
# (so at small M they include dispatch overhead; the committed benchmark uses CUPTI kernel time). Without a
# GPU and without committed results: the same on the CPU, at small sizes, to show the pipeline end to end
# (CPU numbers say nothing about GPU kernels).

# %%
live = []
if ON_GPU:
    live = viz.live_benchmark([1, 16, 128, 1024, 4096], [(4096, 4096), (14336, 4096)], iters=20)
elif not rows:
    live = viz.live_benchmark([1, 16, 64, 256], [(512, 512), (1024, 512)], iters=5)
else:
    print("No GPU here: skipping the live re-run (the committed results above are the GPU numbers).")
if live:
    live_spec = viz.device_spec(describe_device())
    display(Markdown(viz.format_table(live, ["impl", "dtype", "M", "N", "K", "us", "tflops", "rel_err"])))
    plot_grid(live, None, live_spec, f"Live run on {describe_device()}")

# %% [markdown]
# ## 3. Tile configurations of the Mosaic GPU kernel
#
# The kernel computes the output in **CTA tiles**: each consumer warpgroup owns a `tile_m x tile_n` wgmma
# accumulator, two warpgroups double the CTA tile along M or N, and a producer warpgroup streams
# `tile_k`-deep slices of `x` and `W` into a ring of `stages` shared-memory buffers by TMA. A persistent grid
# of one CTA per SM walks the output tiles in a planar-snake order.
#
# ### Shared-memory budget
#
# Per CTA: `stages x (cta_m x tile_k + cta_n x tile_k)` bytes of 8-bit operands plus the epilogue tile(s)
# the output is written through (bf16), against Hopper's 227 KiB per block. Deeper pipelines hide more
# memory latency, wider tiles reuse each loaded byte more (`2·cta_m·cta_n / (cta_m + cta_n)` FLOP per byte
# of shared memory filled), and both compete for the same 227 KiB.

# %%
from qlin.kernels import mosaic_gpu_scaled_mm as mg

TC = mg.TuningConfig

tile_configs = {
    "decode 64x16, 8 stages": TC(tile_m=64, tile_n=16, tile_k=256, max_concurrent_steps=8, num_compute_wgs=1,
                                 epi_tile_m=64, epi_tile_n=16),
    "64x128 x2(m), 6 st.": TC(tile_m=64, tile_n=128, max_concurrent_steps=6, wg_dimension="m", grid_minor_dim="m"),
    "128x128 x2(n), 3 st.": TC(tile_m=128, tile_n=128, max_concurrent_steps=3),
    "128x128 x2(n), 4 st.": TC(tile_m=128, tile_n=128, max_concurrent_steps=4),
    "128x256 x2(n), 3 st.": TC(tile_m=128, tile_n=256, max_concurrent_steps=3),
    "64x256 x2(m), 4 st.": TC(tile_m=64, tile_n=256, max_concurrent_steps=4, wg_dimension="m"),
}
budget_rows, budgets = [], {}
for label, cfg in tile_configs.items():
    b = viz.smem_budget_for(cfg)
    budgets[label] = b
    row = {"config": label, "CTA tile": f"{cfg.cta_tile_m}x{cfg.cta_tile_n}x{cfg.tile_k}",
           "stages": cfg.max_concurrent_steps, "operands KiB": b["operands"] / 1024,
           "epilogue KiB": b["epilogue"] / 1024, "total KiB": b["total"] / 1024, "fits 227 KiB": b["fits"],
           "max stages": b["max_stages"]}
    need = mg.smem_bytes(cfg, jnp.float8_e4m3fn, jnp.bfloat16)
    row["kernel's count KiB"] = need / 1024
    row["fits by kernel's count"] = need <= viz.SMEM_LIMIT_BYTES
    budget_rows.append(row)
display(Markdown(viz.format_table(budget_rows, floatfmt=".1f")))
fig, ax = plt.subplots(figsize=(8, 4))
viz.plot_smem_budget(budgets, ax, title="Shared memory per CTA (fp8 operands, bf16 epilogue)")
plt.show()

# %% [markdown]
# The kernel's own count adds the epilogue's scale/bias/zero-point vectors and
# barriers to the two big terms, and the kernel keeps some headroom below the limit, so a configuration that
# only just fits by the simple count can still be rejected. The operand ring dominates: a 128x256 CTA tile
# costs 48 KiB per stage, so four stages plus the epilogue already fill the 227 KiB.
#
# ### What each tile shape does to the grid
#
# Output tiles, waves of the persistent grid over 132 SMs, SM utilisation of the last wave, and the fraction
# of MMA work spent on padding of partial tiles, for decode, prefill and a wide MLP shape (with the kernel's
# heuristic choice for each, when the kernel is present):

# %%
problems = {"decode M=16, 4096x4096": (16, 4096, 4096), "M=1000, 4096x4096": (1000, 4096, 4096),
            "M=4096, 4096x4096": (4096, 4096, 4096), "M=4096, 28672x4096": (4096, 28672, 4096)}
stat_rows = []
for pname, (m, n, k) in problems.items():
    for label, cfg in tile_configs.items():
        if (m <= 64) != label.startswith("decode"):
            continue
        s = viz.tile_stats(m, n, k, cfg.cta_tile_m, cfg.cta_tile_n, cfg.tile_k)
        stat_rows.append({"problem": pname, "config": label, "tiles": s["tiles"], "waves": s["waves"],
                          "last wave util": s["last_wave_util"], "padding": s["padding"],
                          "FLOP/smem byte": s["smem_intensity"], "fits": budgets[label]["fits"]})
    # what the kernel's heuristic picks (autotuning off)
    cfg = mg.default_config(m, n, k, jnp.float8_e4m3fn, jnp.bfloat16)
    s = viz.tile_stats(m, n, k, cfg.cta_tile_m, cfg.cta_tile_n, cfg.tile_k)
    stat_rows.append({"problem": pname, "config": "heuristic: " + getattr(cfg, "short", cfg.__repr__)(),
                      "tiles": s["tiles"], "waves": s["waves"], "last wave util": s["last_wave_util"],
                      "padding": s["padding"], "FLOP/smem byte": s["smem_intensity"],
                      "fits": viz.smem_budget_for(cfg)["fits"]})
display(Markdown(viz.format_table(stat_rows, floatfmt=".3g")))

# %% [markdown]
# The schedule itself: each rectangle is one CTA tile of the output, numbered in the order the persistent
# grid visits it and coloured by wave; hatched is padding outside the matrix. With M = 1000 a 128-row CTA
# tile wastes a partial row of tiles, and the tile count decides how evenly the 132 SMs are loaded.

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for ax, (label, cfg) in zip(axes, [(k, tile_configs[k]) for k in
                                   ("64x128 x2(m), 6 st.", "128x128 x2(n), 4 st.", "128x256 x2(n), 3 st.")]):
    viz.plot_tile_schedule(1000, 4096, cfg.cta_tile_m, cfg.cta_tile_n, ax, grid_minor_dim=cfg.grid_minor_dim,
                           grid_tile_width=cfg.grid_tile_width)
    ax.set_title(f"{label}\n" + ax.get_title(), fontsize="small")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The real kernel in Mosaic GPU interpret mode
#
# `scaled_mm(..., interpret=True)` runs the Pallas kernel on the CPU: the same tiling, pipeline and fused
# epilogue (per-token x per-channel scales, bias, the int8 zero-point correction), checked here against the
# float64 product of the same 8-bit operands, for several tile configurations and a shape with partial tiles
# in M and N. Interpret mode checks the index arithmetic, not the hardware (wgmma layouts, shared-memory
# limits and speed are checked on the GPU).

# %%
# M and N not multiples of the tiles (N rounded up to the kernel's TMA alignment), K = 2 x 128
n_mult, k_mult = mg.required_alignment(jnp.int8, jnp.bfloat16)
m, n, k = 200, -(-260 // n_mult) * n_mult, 256
rng = np.random.default_rng(0)
a_f, b_f = rng.standard_normal((m, k)), rng.standard_normal((n, k))
a_scale = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)), jnp.float32)
b_scale = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)), jnp.float32)
bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
interp_cfgs = {
    "64x128 x2(m)": TC(tile_m=64, tile_n=128, max_concurrent_steps=3, wg_dimension="m", grid_minor_dim="m"),
    "64x64 x1, k64": TC(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, num_compute_wgs=1,
                        epi_tile_m=64, epi_tile_n=32),
    "decode-style 64x16": TC(tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=4, num_compute_wgs=1,
                             epi_tile_m=64, epi_tile_n=16),
}
quantized = {
    "fp8": (jnp.asarray(a_f, jnp.float32).astype(jnp.float8_e4m3fn),
            jnp.asarray(b_f, jnp.float32).astype(jnp.float8_e4m3fn)),
    "int8": (jnp.asarray(np.clip(np.round(a_f * 30), -128, 127), jnp.int8),
             jnp.asarray(np.clip(np.round(b_f * 30), -127, 127), jnp.int8)),
}
# (dtype, tile config, asymmetric int8 with per-token zero points)
runs = [("fp8", "64x128 x2(m)", False), ("fp8", "decode-style 64x16", False),
        ("int8", "64x128 x2(m)", False), ("int8", "64x64 x1, k64", True)]
cases = []
for dname, label, asym in runs:
    cfg = interp_cfgs[label]
    a_q, b_q = quantized[dname]
    acc = np.asarray(a_q, np.float64) @ np.asarray(b_q, np.float64).T
    kw = {}
    if asym:  # the zero-point correction: per-token zero points and the column sums of the weight
        azp = jnp.asarray(rng.integers(-8, 8, (m, 1)), jnp.int32)
        azp_adj = jnp.asarray(np.asarray(b_q, np.int32).sum(axis=1)[None, :], jnp.int32)
        kw = {"azp": azp, "azp_adj": azp_adj}
        acc = acc - np.asarray(azp, np.float64) * np.asarray(azp_adj, np.float64)
    ref = acc * np.asarray(a_scale, np.float64) * np.asarray(b_scale, np.float64) + np.asarray(bias, np.float64)
    t0 = time.perf_counter()
    y = mg.scaled_mm(a_q, b_q, a_scale, b_scale, bias=bias, out_dtype=jnp.bfloat16, config=cfg,
                     interpret=True, **kw)
    y = np.asarray(jax.block_until_ready(y), np.float64)
    err = rel_err(y, ref)
    cases.append({"dtype": dname + ("-asym" if asym else ""), "config": label,
                  "CTA tile": f"{cfg.cta_tile_m}x{cfg.cta_tile_n}x{cfg.tile_k}", "shape (M, N, K)": (m, n, k),
                  "rel_err": err, "ok": err < kernel_rtol(jnp.bfloat16), "interpret s": time.perf_counter() - t0})
display(Markdown(viz.format_table(cases, floatfmt=".3g")))
assert all(c["ok"] for c in cases), "an interpret-mode run disagrees with the float64 reference"
