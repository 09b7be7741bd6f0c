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
# # 01 · How much error does 8-bit quantization put into `y = x Wᵀ`?
#
# A W8A8 linear layer stores the weight `W (N, K)` in 8 bits with float32 scales, quantizes the activation
# `x (M, K)` on the fly (or with a calibrated static scale) and multiplies the 8-bit operands. The error it
# makes depends on
#
# 1. the **8-bit format**: fp8 e4m3 (3 mantissa bits, max 448), fp8 e5m2 (2 mantissa bits, max 57344),
#    int8 symmetric (127 levels per scale) or int8 asymmetric (256 levels over `[min, max]`, with a zero point);
# 2. the **scale granularity**: one scale per tensor, per output channel of `W`, per token of `x`, or per
#    128 x 128 block of `W` with per-token 1 x 128 groups of `x` (DeepSeek-style);
# 3. the **data**: outlier channels and heavy tails in the activations.
#
# Every error below is the relative Frobenius error `‖y − y_float‖ / ‖y_float‖` of the quantized layer against
# the float64 product of the *unquantized* inputs, where `y` is computed in float64 from the 8-bit operands by
# `qlin.testing.reference_linear_np`: pure quantization error, no kernel rounding. The quantization math is
# qlin's own (`qlin.quantize`), the same code every kernel uses.
#
# Runs on a laptop CPU in well under a minute.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import qlin
from qlin import viz
from qlin.tolerances import QUANT_RTOL

print(f"qlin {qlin.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
M, N, K = 128, 256, 512  # tokens, out features, in features: small enough for the CPU, K spans 4 blocks of 128

# %% [markdown]
# ## 1. The formats
#
# fp8 is a floating-point format: its *relative* spacing is constant (2⁻³ for e4m3, 2⁻² for e5m2) over many
# binades, so small values keep their relative precision. int8 is fixed-point: the *absolute* spacing is the
# scale `absmax / 127`, so values much smaller than the largest one in their scale group lose relative precision.

# %%
rows = []
for label, dtype in [("fp8 e4m3fn", jnp.float8_e4m3fn), ("fp8 e5m2", jnp.float8_e5m2)]:
    fi = jnp.finfo(dtype)
    rows.append({"format": label, "max": float(fi.max), "smallest normal": float(fi.smallest_normal),
                 "mantissa bits": int(fi.nmant), "relative step": 2.0 ** -int(fi.nmant)})
rows.append({"format": "int8 symmetric", "max": 127.0, "smallest normal": 1.0, "mantissa bits": None,
             "relative step": "1/127 of the group's absmax"})
display(Markdown(viz.format_table(rows)))

# %% [markdown]
# Round-trip a Gaussian activation (per-token scales) through each format and look at the **element-wise
# relative error** `|x̂ − x| / |x|`: fp8's is bounded by half its relative step for every element in the normal
# range, int8's grows without bound as `|x|` shrinks below the row's maximum.

# %%
x = viz.make_activations(M, K, seed=0)
fig, ax = plt.subplots(figsize=(8, 4))
samples = {}
for fmt in ("fp8-e4m3fn", "fp8-e5m2", "int8"):
    xh = viz.roundtrip(x, viz.make_config(fmt, "channel W / token A"))
    rel = np.abs(xh - x) / np.abs(x)
    samples[fmt] = rel[rel > 0]
viz.plot_histograms(samples, ax, logx=True, xlabel="|x̂ − x| / |x| (per element, per-token scales)",
                    title="Element-wise relative error of the activation round trip")
plt.show()
for fmt, v in samples.items():
    print(f"{fmt:11s} median {np.median(v):.2e}   99th percentile {np.percentile(v, 99):.2e}")

# %% [markdown]
# ## 2. Scale granularity x format
#
# Five granularities, coarse to fine (`viz.GRANULARITIES`): one static per-tensor activation scale calibrated
# on the same batch; dynamic per-tensor; per-channel weight scales with a per-tensor activation scale; per-channel
# x per-token (the vLLM default); 128 x 128 weight blocks with 1 x 128 activation groups.
#
# The weight has output channels of uneven magnitude (`channel_spread=0.5`, as trained layers do), which is
# what per-channel weight scales fix. Asymmetric int8 with per-group zero points is left out: qlin's
# dequantization does not support per-group zero points yet.

# %%
w = viz.make_weight(N, K, channel_spread=0.5, seed=1)
skip = [("int8-asym", "block128 W / group128 A")]
errors = viz.error_matrix(x, w, skip=skip)

fig, ax = plt.subplots(figsize=(10, 4.5))
viz.plot_bars(errors, ax, title="Gaussian activations: relative error of y by format and granularity")
plt.show()
display(Markdown(viz.format_table([{"format": f, **cells} for f, cells in errors.items()], floatfmt=".4f")))

# %% [markdown]
# What to read off:
#
# * **fp8 barely cares about granularity** on well-behaved data: a floating-point format only needs the
#   scale to keep values out of overflow and deep underflow. e5m2 costs about 2x e4m3 (one mantissa bit less).
# * **int8 does care**: per-channel weight scales remove the error of the small-magnitude channels and
#   per-token activation scales tighten it further. With fine scales int8 beats fp8 e4m3 on Gaussian data
#   (7 bits of fixed-point resolution vs 3 mantissa bits).
# * **Block scales are a trade**: a 128 x 128 weight block shares one scale across 128 output channels, so on
#   this weight (uneven channels) it loses to per-channel scales; what it buys is resolution along K, which
#   pays off when the *activations* have outliers (section 3), and a layout the block-FP8 kernels use.
# * Asymmetric int8 adds a zero point, which only helps for activations that are not centred (e.g. after a
#   ReLU/GELU); on symmetric data it matches symmetric int8.

# %% [markdown]
# ## 3. Outlier channels
#
# LLM activations have a handful of *channels* (columns of `x`) that are 10-100x larger than the rest, in every
# token. Per-token scales cannot isolate them (every token contains them); only per-group scales confine
# the damage to the groups that hold an outlier channel. Sweep the outlier magnitude with 4 outlier channels
# (and a weight with even channels, so that only the activation side differs):

# %%
outlier_scales = [1, 3, 10, 30, 100]
sweep_cfgs = {
    "fp8-e4m3fn channel/token": viz.make_config("fp8-e4m3fn", "channel W / token A"),
    "int8 channel/tensor": viz.make_config("int8", "channel W / tensor A"),
    "int8 channel/token": viz.make_config("int8", "channel W / token A"),
    "int8 block128/group128": viz.make_config("int8", "block128 W / group128 A"),
    "fp8-e4m3fn block128/group128": viz.make_config("fp8-e4m3fn", "block128 W / group128 A"),
}
w_even = viz.make_weight(N, K, seed=1)
outlier_errors = viz.error_sweep(
    lambda s: viz.make_activations(M, K, outlier_channels=4, outlier_scale=s, seed=2), outlier_scales, w_even,
    sweep_cfgs)

fig, ax = plt.subplots(figsize=(8, 4.5))
viz.plot_lines(outlier_scales, outlier_errors, ax, logx=True, xlabel="outlier channel magnitude (x normal)",
               title="Error vs activation outliers (4 outlier channels of 512)")
plt.show()

# %% [markdown]
# int8's error grows with the outlier magnitude for per-tensor and per-token scales (it levels off once the
# outlier channels dominate `y` itself); with 128-wide groups only the (at most 4) groups that contain an
# outlier lose resolution, so it grows least. fp8 stays flat: the outliers push the scale up, but the other
# values still land in e4m3's normal range until the ratio exceeds roughly `448 / 2⁻⁶ ≈ 3·10⁴`.

# %% [markdown]
# ## 4. Heavy tails
#
# Student-t activations (unit variance) with fewer degrees of freedom have rarer, larger extremes in *random*
# places, which stretch each token's absmax:

# %%
dfs = [30.0, 10.0, 5.0, 3.0, 2.5]
tail_cfgs = {k: sweep_cfgs[k] for k in ("fp8-e4m3fn channel/token", "int8 channel/tensor", "int8 channel/token",
                                    "int8 block128/group128")}
tail_cfgs["fp8-e5m2 channel/token"] = viz.make_config("fp8-e5m2", "channel W / token A")
tail_errors = viz.error_sweep(lambda df: viz.make_activations(M, K, dist="student_t", df=df, seed=3), dfs, w_even,
                              tail_cfgs)
fig, ax = plt.subplots(figsize=(8, 4.5))
viz.plot_lines(dfs, tail_errors, ax, logx=True, xlabel="Student-t degrees of freedom (smaller = heavier tails)",
               title="Error vs heavy-tailed activations")
ax.invert_xaxis()
plt.show()

# %% [markdown]
# The heavier the tails, the larger each token's absmax relative to its typical value, and the fewer int8
# levels the typical values get; smaller scale groups see smaller extremes, so per-group int8 degrades least.
# fp8's relative precision does not depend on where a value sits in its group's range.

# %% [markdown]
# ## 5. Loud tokens: per-token error histograms
#
# The overall error is dominated by the loudest rows, which hides what happens to the quiet ones. Make every
# 8th token 30x louder and look at the error *per token*: a per-tensor activation scale is set by the loud
# tokens, so the quiet tokens are quantized with a scale 30x too coarse. Per-token scales fix exactly this.

# %%
x_loud = viz.make_activations(M, K, seed=4)
x_loud[::8] *= 30.0
ref = viz.float_reference(x_loud, w)
token_errs = {}
for label, cfg in {
    "int8 channel/tensor": viz.make_config("int8", "channel W / tensor A"),
    "int8 channel/token": viz.make_config("int8", "channel W / token A"),
    "fp8-e4m3fn channel/tensor": viz.make_config("fp8-e4m3fn", "channel W / tensor A"),
    "fp8-e4m3fn channel/token": viz.make_config("fp8-e4m3fn", "channel W / token A"),
}.items():
    token_errs[label] = viz.row_rel_err(viz.quantized_output(x_loud, w, cfg), ref)
fig, ax = plt.subplots(figsize=(8, 4))
viz.plot_histograms(token_errs, ax, bins=40, logx=True, logy=False, xlabel="relative error of one token's output",
                    title="Per-token error with every 8th token 30x louder")
plt.show()
display(Markdown(viz.format_table(
    [{"config": k, "median token error": float(np.median(v)), "worst token": float(v.max())}
     for k, v in token_errs.items()], floatfmt=".2e")))

# %% [markdown]
# ## 6. Static scales: calibration that does not match the data
#
# A static activation scale is calibrated once on sample data. When serving data has a larger range, fp8
# e4m3fn saturates at 448 (it has no infinity; qlin clips before casting) and int8 clips at 127; when it has a
# smaller range, int8 wastes levels while fp8 hardly notices. Calibrate on `x`, run on `gain * x`:

# %%
gains = [0.1, 0.3, 1.0, 3.0, 10.0]
static_cfgs = {fmt: viz.make_config(fmt, "tensor W / static tensor A")
               for fmt in ("fp8-e4m3fn", "int8", "int8-asym")}
static_errors = {label: [viz.quantization_error(g * x, w, cfg, calibration=x) for g in gains]
                 for label, cfg in static_cfgs.items()}
fig, ax = plt.subplots(figsize=(8, 4.5))
viz.plot_lines(gains, static_errors, ax, logx=True, xlabel="serving range / calibration range",
               title="Static per-tensor scales under a range mismatch")
plt.show()

# %% [markdown]
# ## 7. How this relates to the test tolerances
#
# qlin's tests bound the quantization error of each scheme on Gaussian data with `qlin.tolerances.QUANT_RTOL`;
# the finest granularity measured above sits well inside them:

# %%
display(Markdown(viz.format_table([
    {"format": fmt, "measured (channel W / token A)": errors[fmt]["channel W / token A"],
     "QUANT_RTOL": QUANT_RTOL[fmt]} for fmt in errors], floatfmt=".4f")))
