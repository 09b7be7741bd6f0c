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
# # 02 · Kernels and how qlin picks one
#
# qlin separates *what* a quantized linear layer computes (a config: `FP8ScaledMMConfig`,
# `Int8ScaledMMConfig`) from *how* (a kernel: a subclass of `qlin.MMLinearKernel`), as vLLM's
# `kernels/linear` does. Each platform has a list of kernels in priority order; `qlin.choose_kernel` returns
# the first one that **is supported** on this hardware and **can implement** the config.
#
# This notebook shows
#
# 1. what `qlin info` says on this machine (and what it would say on an H100);
# 2. the lifecycle of one kernel, step by step, with the params before and after
#    `process_weights_after_loading`;
# 3. how to write and register your own kernel;
# 4. why a kernel was rejected, and how to find out.

# %%
import dataclasses
import os
from types import SimpleNamespace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from IPython.display import Markdown, display

import qlin
from qlin import viz
from qlin.platform import compute_capability, describe_device, device_platform
from qlin.select import registered_kernels
from qlin.testing import reference_linear_np
from qlin.tolerances import kernel_rtol, rel_err

print(f"qlin {qlin.__version__}, jax {jax.__version__}")
print(f"device: {describe_device()}, platform: {device_platform()}, compute capability: {compute_capability()}")

# %% [markdown]
# ## 1. `qlin info`
#
# The command-line `qlin info` prints, for a few showcase configs, every kernel of this platform and its
# verdict. Here it is, run in-process:

# %%
from qlin.cli import main as qlin_cli

qlin_cli(["info"])

# %% [markdown]
# The same information for one config, as data: `qlin.explain(config)` returns one `Verdict(name, ok, reason)`
# per kernel, in priority order. `viz.explain_rows` marks the one `choose_kernel` picks.

# %%
config = qlin.FP8ScaledMMConfig(weight_granularity="per_channel", activation="dynamic_per_token")
print(config.describe())
display(Markdown(viz.format_table(viz.explain_rows(config))))
print("choose_kernel ->", qlin.choose_kernel(config).name)

# %% [markdown]
# Selection does not need the hardware: pass a platform and a compute capability to see what a GPU would
# run. On CUDA, the Pallas Mosaic GPU kernels (when registered) come before `xla` and need Hopper (sm90);
# an A100 (sm80) falls through to `xla`, which runs everywhere.

# %%
for cc in (90, 80):
    print(f"cuda, compute capability {cc}:")
    display(Markdown(viz.format_table(viz.explain_rows(config, compute_capability=cc, platform="cuda"))))
print("kernels registered for cuda, in priority order:", [k.name for k in registered_kernels("cuda")])

# %% [markdown]
# ## 2. The lifecycle of one kernel, step by step
#
# ```
# ok, why = K.is_supported(compute_capability)      # hardware check (classmethod)
# ok, why = K.can_implement(config)                 # config check (classmethod)
# kernel  = K(config)
# params  = kernel.process_weights_after_loading(params)   # once per layer; returns NEW params
# y       = kernel.apply_weights(params, x, bias)          # jittable, x is [..., K]
# ```
#
# Take an asymmetric int8 layer with a static (calibrated) activation scale and zero point, and load its
# params the way a checkpoint stores them: per-channel scale as an `(N, 1)` column, the static scale and zero
# point as 1-element vectors, no precomputed `azp_adj`.

# %%
N, K = 96, 160
config = qlin.Int8ScaledMMConfig(weight_granularity="per_channel", activation="static", symmetric=False)
w = viz.make_weight(N, K, seed=0)
x_calib = viz.make_activations(256, K, seed=1) + 0.5  # not centred: what zero points are for
s_in, zp_in = qlin.calibrate_static(x_calib, config)
ready = qlin.quantize_weight(w, config, s_in, zp_in)

checkpoint = {
    "weight": np.asarray(ready.weight),
    "weight_scale": np.asarray(ready.weight_scale).reshape(N, 1),
    "input_scale": np.asarray(ready.input_scale).reshape(1),
    "input_zero_point": np.asarray(ready.input_zero_point).reshape(1),
}
params = qlin.Int8Params.from_mapping(checkpoint)
print(config.describe())
print("Params as loaded:")
display(Markdown(viz.format_table(viz.describe_params(params))))

# %% [markdown]
# **Steps 1-2: is it supported here, can it implement the config?** Both are classmethods: no instance and no
# weights needed.

# %%
K_cls = qlin.choose_kernel(config)
print("chosen:", K_cls.name)
print("is_supported(compute_capability()) ->", K_cls.is_supported(compute_capability()))
print("can_implement(config)              ->", K_cls.can_implement(config))

# %% [markdown]
# **Step 3-4: instantiate and process the weights.** `process_weights_after_loading` validates the params
# against the config and returns *new* params in the kernel's layout: here the scales become canonical
# (`(N,)` float32, scalars), and `azp_adj[n] = Σ_k W_q[n, k]`, the asymmetric correction, is precomputed once.
# The input params are not modified.

# %%
kernel = K_cls(config)
processed = kernel.process_weights_after_loading(params)
print("Params after process_weights_after_loading:")
display(Markdown(viz.format_table(viz.describe_params(processed))))
np.testing.assert_array_equal(np.asarray(processed.azp_adj), np.asarray(ready.weight, np.int32).sum(axis=1))
assert params.azp_adj is None  # functional: the loaded params are untouched
print("get_output_padding() ->", kernel.get_output_padding())

# %% [markdown]
# Kernels with hardware layout constraints do more here. The Mosaic GPU kernels need 16-byte aligned rows
# (`K % 16 == 0` for 8-bit operands, `N % 8 == 0` for a bf16 output), so they pad the weight once and record
# the logical size in the static fields `out_features` / `in_features`. If such a kernel is registered for
# CUDA, run its processing here on an awkward shape (it is plain jnp, so it runs on the CPU too):

# %%
fp8_cfg = qlin.FP8ScaledMMConfig()
odd = qlin.quantize_weight(viz.make_weight(1000, 200, seed=2), fp8_cfg)  # N = 1000, K = 200: not multiples of 16
gpu_kernels = [k for k in registered_kernels("cuda") if k.name not in ("xla", "reference")]
if not gpu_kernels:
    print("No GPU-specific kernel is registered in this qlin build; only xla and reference run on CUDA.")
for cls in gpu_kernels:
    ok, why = cls.can_implement(fp8_cfg)
    if not ok:
        print(f"{cls.name}: cannot implement {fp8_cfg.describe()}: {why}")
        continue
    try:
        padded = cls(fp8_cfg).process_weights_after_loading(odd)
    except Exception as e:  # noqa: BLE001 - shown to the reader, not hidden
        print(f"{cls.name}: its weight processing needs the GPU here ({type(e).__name__}: {e})")
        continue
    print(f"{cls.name}: weight {tuple(odd.weight.shape)} -> {tuple(padded.weight.shape)}, "
          f"logical (n, k) = ({padded.n}, {padded.k})")
    display(Markdown(viz.format_table(viz.describe_params(padded))))

# %% [markdown]
# **Step 5: apply.** `apply_weights` is jittable and takes any leading dimensions. Compare with the float64
# oracle computed from the same 8-bit operands: only accumulation order and the bf16 output rounding differ.

# %%
x = jnp.asarray(viz.make_activations(2 * 24, K, seed=3) + 0.5).reshape(2, 24, K)
apply = jax.jit(kernel.apply_weights)
y = apply(processed, x)
oracle = reference_linear_np(np.asarray(x), processed, config)
print(f"y: {y.shape} {y.dtype}; rel. error vs float64 oracle {rel_err(y, oracle):.2e} "
      f"(kernel tolerance for {config.out_dtype.name}: {kernel_rtol(config.out_dtype)})")
print(f"rel. error vs the float layer x @ W^T: {rel_err(y, np.asarray(x, np.float64) @ w.astype(np.float64).T):.2e}")

# %% [markdown]
# The xla kernel multiplies the **8-bit operands** in one `dot_general` with an int32 (int8) or float32
# (fp8) accumulator, and applies scales and the zero-point correction afterwards; it never dequantizes the
# weight to bf16 first (that would be a bf16 GEMM moving twice the bytes). The lowered program shows it:

# %%
hlo = apply.lower(processed, x).as_text()
print("\n".join(line.strip() for line in hlo.splitlines() if "dot_general" in line))

# %% [markdown]
# Params are pytrees (arrays are leaves, `out_features`/`in_features` are static metadata), so they pass
# through `jit`, `tree.map` and sharding; and `apply_weights` also accepts any *layer-like* object, reading
# the params off it by the class-level attribute names (`Int8Params.WEIGHT == "weight"`, ...):

# %%
leaves, treedef = jax.tree.flatten(processed)
print(f"{len(leaves)} leaves:", [f"{a.dtype}{tuple(a.shape)}" for a in leaves])
layer = SimpleNamespace(**{attr: getattr(processed, f) for f, attr in qlin.Int8Params.attribute_names().items()})
np.testing.assert_array_equal(np.asarray(kernel.apply_weights(layer, x)), np.asarray(y))
print("apply_weights(layer-like object) == apply_weights(params)")

# %% [markdown]
# ## 3. Writing and registering your own kernel
#
# The vLLM-style example: a kernel whose params carry one more tensor, `custom_scale` (a per-output-channel
# multiplier, e.g. a folded smoothing factor). Subclass the Params to add the field (its class attribute
# `CUSTOM_SCALE` names the layer attribute), subclass `MMLinearKernel`, implement the four methods, register.
#
# This kernel only handles fp8 with per-channel weight scales and per-token activations, and folds
# `custom_scale` into the weight scale once, in `process_weights_after_loading`.

# %%
from qlin.kernels.xla import scaled_dot_epilogue
from qlin.quantize import quantize_activation
from qlin.validate import normalize_params


@dataclasses.dataclass(kw_only=True)
class MyKernelParams(qlin.FP8Params):
    custom_scale: jax.Array

    CUSTOM_SCALE: ClassVar[str] = "custom_scale"


class MyKernel(qlin.MMLinearKernel[qlin.FP8ScaledMMConfig, MyKernelParams]):
    name = "my_fp8_per_channel"
    params_cls = MyKernelParams

    @classmethod
    def is_supported(cls, compute_capability=None):
        return True, None  # plain jnp: runs anywhere

    @classmethod
    def can_implement(cls, config):
        if not isinstance(config, qlin.FP8ScaledMMConfig):
            return False, f"fp8 only, got {type(config).__name__}"
        if config.weight_granularity != "per_channel" or config.activation != "dynamic_per_token":
            return False, f"needs per-channel weights and per-token activations, got {config.describe()}"
        return True, None

    def process_weights_after_loading(self, params):
        params = self._get_layer_params(params)  # a layer-like object works too
        custom = jnp.asarray(params.custom_scale, jnp.float32).reshape(-1)
        base = normalize_params(params, self.config)  # validation + canonical scale shapes
        return base.replace(weight_scale=base.weight_scale * custom, custom_scale=jnp.ones_like(custom))

    def apply_weights(self, params, x, bias=None):
        params = self._get_layer_params(params)
        lead = x.shape[:-1]
        q, s, _ = quantize_activation(x.reshape(-1, x.shape[-1]), params, self.config)
        acc = jax.lax.dot_general(q, params.weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = scaled_dot_epilogue(acc, s, params.weight_scale, bias, self.config.out_dtype)
        return y.reshape(*lead, -1)


qlin.register_kernel(MyKernel, first=True)  # ahead of every built-in kernel, on every platform
cfg = qlin.FP8ScaledMMConfig()
print("choose_kernel ->", qlin.choose_kernel(cfg).name)
display(Markdown(viz.format_table(viz.explain_rows(cfg))))

# %% [markdown]
# Load a layer that has the extra attribute, run it through the one-call API (which now selects `MyKernel`),
# and check it against the float layer with the custom scale applied:

# %%
w2 = viz.make_weight(64, 128, seed=4)
base = qlin.quantize_weight(w2, cfg)
custom = np.linspace(0.5, 2.0, 64).astype(np.float32)
my_layer = SimpleNamespace(weight=base.weight, weight_scale=base.weight_scale, custom_scale=jnp.asarray(custom))
my_params = MyKernelParams.from_layer(my_layer)
x2 = jnp.asarray(viz.make_activations(8, 128, seed=5))
y2 = qlin.linear(x2, my_params, cfg)
print("kernel used by qlin.linear:", qlin.kernel_for(cfg).name)
want = (np.asarray(x2, np.float64) @ w2.astype(np.float64).T) * custom
print(f"rel. error vs float layer x @ W^T * custom_scale: {rel_err(y2, want):.3e}")

# %% [markdown]
# ## 4. Why was a kernel rejected?
#
# Every rejection comes with a reason. Configs that `MyKernel` cannot implement fall through to the next
# kernel, and `explain` says why:

# %%
block_cfg = qlin.FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group")
display(Markdown(viz.format_table(viz.explain_rows(block_cfg))))

# %% [markdown]
# Forcing a kernel (the `kernel=` argument, `QLIN_KERNEL=name`) that cannot run the config is an error, not a
# silent fallback; `NoKernelError.reasons` lists `(kernel, reason)`:

# %%
try:
    qlin.choose_kernel(block_cfg, override="my_fp8_per_channel")
except qlin.NoKernelError as e:
    print(e)
    print("reasons:", e.reasons)

# %% [markdown]
# `QLIN_DISABLED_KERNELS=name1,name2` takes kernels out of selection (to rule one out when debugging); with
# every kernel disabled, the error lists each one and why:

# %%
saved = os.environ.get("QLIN_DISABLED_KERNELS")
try:
    os.environ["QLIN_DISABLED_KERNELS"] = "my_fp8_per_channel,xla"
    print("with my_fp8_per_channel and xla disabled ->", qlin.choose_kernel(cfg).name)
    os.environ["QLIN_DISABLED_KERNELS"] = ",".join(k.name for k in registered_kernels(device_platform()))
    try:
        qlin.choose_kernel(cfg)
    except qlin.NoKernelError as e:
        print(e)
finally:
    if saved is None:
        os.environ.pop("QLIN_DISABLED_KERNELS", None)
    else:
        os.environ["QLIN_DISABLED_KERNELS"] = saved

# %% [markdown]
# Clean up: unregister the example kernel; selection is back to the built-in order.

# %%
qlin.unregister_kernel("my_fp8_per_channel")
print("choose_kernel ->", qlin.choose_kernel(cfg).name)
