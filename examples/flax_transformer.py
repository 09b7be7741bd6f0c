"""End-to-end: a small Flax (nnx) transformer served in FP8 and INT8 with qlin.

Builds a decoder-only transformer (RMSNorm, causal attention, SwiGLU MLP) with
random weights, takes its bf16 version as the baseline and converts every
Linear except the LM head with a qlin rule list:

* ``fp8``        FP8 e4m3 weights per channel, activations dynamic per token;
* ``int8``       INT8 weights per channel, activations dynamic per token;
* ``fp8-static`` FP8 per-channel weights, static per-tensor activation scales
                 calibrated (absmax) on two sample batches.

For each it reports the logits' relative error (``||y - y_bf16|| / ||y_bf16||``)
and cosine similarity vs the bf16 model, the top-1 token agreement, and the time
per jitted forward pass (median), next to the bf16 model's.

    PYTHONPATH=. python examples/flax_transformer.py --small    # CPU, a few seconds
    PYTHONPATH=. python3 examples/flax_transformer.py           # GPU sizes (d=2048, 4 layers, 8x512 tokens)

With ``$OUT`` set, writes ``$OUT/flax_transformer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import qlin  # noqa: E402
from qlin.flax import QuantRule, quantize_nnx  # noqa: E402
from qlin.platform import describe_device  # noqa: E402
from qlin.tolerances import rel_err  # noqa: E402

BF16 = jnp.bfloat16


class RMSNorm(nnx.Module):
    def __init__(self, d, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((d,), param_dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, d, heads, ff, *, rngs, dtype, param_dtype):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                                      kernel_init=nnx.initializers.normal(i ** -0.5), rngs=rngs)
        self.heads = heads
        self.norm1 = RMSNorm(d, param_dtype=param_dtype)
        self.qkv = lin(d, 3 * d)
        self.out = lin(d, d)
        self.norm2 = RMSNorm(d, param_dtype=param_dtype)
        self.gate = lin(d, ff)
        self.up = lin(d, ff)
        self.down = lin(ff, d)

    def __call__(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = jnp.split(self.qkv(h).astype(x.dtype), 3, axis=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads) for t in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d // self.heads) ** -0.5
        att = jnp.where(jnp.tril(jnp.ones((s, s), bool)), att, -1e30)
        p = jax.nn.softmax(att, axis=-1).astype(x.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, d)
        x = x + self.out(o).astype(x.dtype)
        h = self.norm2(x)
        g = jax.nn.silu(self.gate(h).astype(jnp.float32)) * self.up(h).astype(jnp.float32)
        return x + self.down(g.astype(x.dtype)).astype(x.dtype)


class Transformer(nnx.Module):
    def __init__(self, vocab, d, heads, ff, layers, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embed = nnx.Embed(vocab, d, param_dtype=param_dtype, embedding_init=nnx.initializers.normal(1.0),
                               rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(layers)])
        self.norm = RMSNorm(d, param_dtype=param_dtype)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens).astype(self.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x)).astype(jnp.float32)


SIZES = {
    "small": dict(vocab=256, d=64, heads=4, ff=128, layers=2, batch=2, seq=16, iters=3),
    "gpu": dict(vocab=32000, d=2048, heads=16, ff=5632, layers=4, batch=8, seq=512, iters=20),
}


def timed(model, tokens, iters):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    out = jax.block_until_ready(fwd(state, tokens))  # compile
    jax.block_until_ready(fwd(state, tokens))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, tokens))
        times.append(time.perf_counter() - t0)
    return out, 1e3 * statistics.median(times)


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes for a quick CPU run")
    for k in SIZES["gpu"]:
        ap.add_argument(f"--{k}", type=int, default=None)
    args = ap.parse_args(argv)
    size = dict(SIZES["small" if args.small else "gpu"])
    size.update({k: v for k, v in vars(args).items() if k in size and v is not None})
    print(f"device: {describe_device()}  sizes: {size}")

    rngs = nnx.Rngs(0)
    kw = dict(vocab=size["vocab"], d=size["d"], heads=size["heads"], ff=size["ff"], layers=size["layers"])
    master = Transformer(**kw, rngs=rngs)  # float32 "trained" weights
    bf16 = nnx.eval_shape(lambda: Transformer(**kw, rngs=nnx.Rngs(0), dtype=BF16, param_dtype=BF16))
    nnx.update(bf16, jax.tree.map(lambda a: a.astype(BF16), nnx.state(master)))
    tokens = jax.random.randint(jax.random.key(1), (size["batch"], size["seq"]), 0, size["vocab"])
    calib = [jax.random.randint(jax.random.key(s), (size["batch"], size["seq"]), 0, size["vocab"]) for s in (2, 3)]

    variants = {
        "fp8": qlin.FP8ScaledMMConfig(weight_granularity="per_channel", activation="dynamic_per_token"),
        "int8": qlin.Int8ScaledMMConfig(weight_granularity="per_channel", activation="dynamic_per_token"),
        "fp8-static": qlin.FP8ScaledMMConfig(weight_granularity="per_channel", activation="static"),
    }
    y32 = master(tokens)
    y_bf16, t_bf16 = timed(bf16, tokens, size["iters"])
    rows = [{"model": "bf16", "config": "bfloat16 weights and activations", "kernel": "xla (jnp.dot)",
             "rel_err": 0.0, "cosine": 1.0, "top1_agree": 1.0, "ms": t_bf16,
             "rel_err_vs_f32": rel_err(y_bf16, y32)}]
    for name, cfg in variants.items():
        model = nnx.clone(bf16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a rule matching nothing would be a bug in this example
            quantize_nnx(model, [QuantRule("lm_head", None), QuantRule(r"blocks/\d+/.*", cfg)],
                         calibration_data=calib if cfg.is_static else None, forward=nnx.jit(lambda m, t: m(t)))
        y, t = timed(model, tokens, size["iters"])
        rows.append({
            "model": name, "config": cfg.describe(), "kernel": qlin.kernel_for(cfg).name,
            "rel_err": rel_err(y, y_bf16), "cosine": cosine(y, y_bf16),
            "top1_agree": float(np.mean(np.argmax(y, -1) == np.argmax(y_bf16, -1))), "ms": t,
            "rel_err_vs_f32": rel_err(y, y32),
        })

    tokens_per_pass = size["batch"] * size["seq"]
    print(f"{'model':<11} {'kernel':<14} {'rel.err vs bf16':>15} {'cosine':>9} {'top-1':>7} {'ms/fwd':>9} "
          f"{'speedup':>8}  config")
    for r in rows:
        r["speedup_vs_bf16"] = t_bf16 / r["ms"]
        r["tokens_per_s"] = tokens_per_pass / (r["ms"] / 1e3)
        print(f"{r['model']:<11} {r['kernel']:<14} {r['rel_err']:>15.4f} {r['cosine']:>9.5f} "
              f"{100 * r['top1_agree']:>6.1f}% {r['ms']:>9.3f} {r['speedup_vs_bf16']:>7.2f}x  {r['config']}")
    print(f"(bf16 itself vs float32: rel.err {rows[0]['rel_err_vs_f32']:.4f})")
    result = {"device": describe_device(), "jax": jax.__version__, "sizes": size, "results": rows}
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "flax_transformer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
