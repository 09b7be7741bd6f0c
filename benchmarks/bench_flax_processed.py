"""Flax layers with params processed once vs processed in every call (the old behaviour), on one GPU.

For N that the selected kernel must pad (N=13653: mosaic_gpu pads to 13664) and an aligned
control (N=14336), K=4096, fp8 per-channel weights, dynamic per-token activations, bf16 out:

* ``processed``: ``QLinear.from_float`` (processed once; the call applies the stored params);
* ``per_call``: the same logical params in a ``QLinear`` that was never processed, so each call
  runs ``process_weights_after_loading`` in the traced forward (slice + pad = a weight copy);
* ``linen_processed`` / ``linen_per_call``: the same for ``quantize_linen``'s processed tree vs
  its logical tree (``qm.logical``).

Reports ms per forward (median of timed jitted calls), the pads/slices of the 8-bit weight in
the forward's jaxpr, the kernel, and whether both variants give bit-identical outputs.

    PYTHONPATH=. python3 benchmarks/bench_flax_processed.py        # writes $OUT/bench_flax_processed.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

import qlin

K = 4096
NS = (13653, 14336)
MS = (16, 256)
ITERS = 30


def _eqns(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _eqns(sub)


def weight_copies(jaxpr, dtype, min_rows: int) -> int:
    """pad / slice / concatenate eqns touching an 8-bit array with >= min_rows rows (the weight, not x)."""
    count = 0
    for eqn in _eqns(jaxpr):
        if eqn.primitive.name in ("pad", "slice", "dynamic_slice", "concatenate"):
            for v in list(eqn.invars) + list(eqn.outvars):
                a = getattr(v, "aval", None)
                if a is not None and getattr(a, "dtype", None) == dtype and a.ndim == 2 and a.shape[0] >= min_rows:
                    count += 1
                    break
    return count


def time_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(ITERS):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> dict:
    import flax.linen as nn
    from flax import nnx

    from qlin.flax import QLinear, quantize_linen

    cfg = qlin.FP8ScaledMMConfig()
    fp8 = jnp.dtype(cfg.weight_dtype)
    results = []
    out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "config": cfg.describe(),
           "K": K, "kernel": qlin.kernel_for(cfg).name, "results": results}
    fwd = nnx.jit(lambda m, x: m(x))
    for n in NS:
        try:
            w = jax.random.normal(jax.random.key(0), (K, n), jnp.float32) * K ** -0.5  # flax layout (K, N)
            q = QLinear.from_float(w, cfg)
            raw = QLinear(K, n, config=cfg, use_bias=False)  # never processed: processes in every call
            for name, a in q.logical_arrays().items():
                getattr(raw, name).set_value(a)
            dense = nn.Dense(n, use_bias=False)
            qm, qv = quantize_linen(dense, {"params": {"kernel": w}}, [(".*", cfg)])
            qv_logical = qm.logical(qv)
            lin_fwd = jax.jit(qm.apply)
            stored = tuple(q.weight[...].shape)
        except Exception as e:  # noqa: BLE001 - record and go on
            results.append({"N": n, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
            continue
        for m in MS:
            x = jax.random.normal(jax.random.key(1), (m, K), jnp.float32).astype(jnp.bfloat16)
            row = {"M": m, "N": n, "K": K, "stored_weight": list(stored), "processed_for": q.processed_for}
            try:
                gd, st = nnx.split(q)
                gd_raw, st_raw = nnx.split(raw)
                row["copies_processed"] = weight_copies(
                    jax.make_jaxpr(lambda s, x, g=gd: nnx.merge(g, s)(x))(st, x), fp8, n)
                row["copies_per_call"] = weight_copies(
                    jax.make_jaxpr(lambda s, x, g=gd_raw: nnx.merge(g, s)(x))(st_raw, x), fp8, n)
                row["copies_linen_processed"] = weight_copies(jax.make_jaxpr(qm.apply)(qv, x), fp8, n)
                row["copies_linen_per_call"] = weight_copies(jax.make_jaxpr(qm.apply)(qv_logical, x), fp8, n)
                y1, y2 = fwd(q, x), fwd(raw, x)
                row["bit_identical"] = bool(np.array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32)))
                row["ms_processed"] = time_ms(fwd, q, x)
                row["ms_per_call"] = time_ms(fwd, raw, x)
                row["ms_linen_processed"] = time_ms(lin_fwd, qv, x)
                row["ms_linen_per_call"] = time_ms(lin_fwd, qv_logical, x)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                row["trace"] = traceback.format_exc()[-2000:]
            results.append(row)
    return out


if __name__ == "__main__":
    res = main()
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_flax_processed.json").write_text(json.dumps(res, indent=1))
    print(f"{res['device']}  kernel={res['kernel']}  {res['config']}  K={K}")
    print(f"{'M':>5} {'N':>6} {'stored':>13} {'copies p/c':>10} {'ms processed':>13} {'ms per-call':>12} "
          f"{'linen p':>8} {'linen p/c':>9} {'same':>5}")
    for r in res["results"]:
        if "error" in r:
            print(f"{r.get('M', '-'):>5} {r['N']:>6}  ERROR {r['error'][:100]}")
            continue
        print(f"{r['M']:>5} {r['N']:>6} {tuple(r['stored_weight'])!s:>13} "
              f"{r['copies_processed']:>4}/{r['copies_per_call']:<5} {r['ms_processed']:>13.3f} {r['ms_per_call']:>12.3f} "
              f"{r['ms_linen_processed']:>8.3f} {r['ms_linen_per_call']:>9.3f} {r['bit_identical']!s:>5}")
