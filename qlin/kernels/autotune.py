"""Tile-config autotuner for the Mosaic GPU scaled matmul, with an on-disk cache.

* ``QLIN_AUTOTUNE``: "1" tunes missing (M-bucket, N, K, dtype, out_dtype)
  entries on the GPU the first time they are seen (this takes seconds per
  shape); "0" (default) only reads the cache and otherwise uses
  :func:`mosaic_gpu_scaled_mm.default_config`.
* ``QLIN_TUNING_CACHE``: path of the JSON cache (default
  ``~/.cache/qlin/tuning.json``).  Entries are keyed by the device kind, so one
  file can hold H100 and H200 results.

Tuning never runs without a GPU (interpret mode and CPU tests always get the
heuristic or cached config).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qlin.kernels import mosaic_gpu_scaled_mm as mm

_LOCK = threading.Lock()
_MEMO: dict[str, mm.TuningConfig] = {}


def cache_path() -> Path:
    p = os.environ.get("QLIN_TUNING_CACHE")
    if p:
        return Path(p).expanduser()
    return Path("~/.cache/qlin/tuning.json").expanduser()


def autotune_enabled() -> bool:
    return os.environ.get("QLIN_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at least 16): tuning granularity in M."""
    b = 16
    while b < m:
        b *= 2
    return b


def _device_kind() -> str | None:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0].device_kind if gpus else None


def cache_key(m, n, k, dtype, out_dtype, device_kind=None) -> str:
    dk = device_kind or _device_kind() or "cpu"
    return f"{dk}|{jnp.dtype(dtype).name}|{jnp.dtype(out_dtype).name}|M{m_bucket(m)}|N{n}|K{k}"


def load_cache(path: Path | None = None) -> dict:
    path = path or cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def store_entry(key: str, config: mm.TuningConfig, us: float, path: Path | None = None) -> None:
    """Atomically merges one entry into the JSON cache."""
    path = path or cache_path()
    with _LOCK:
        data = load_cache(path)
        data[key] = {"config": config.to_dict(), "us": us}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def get_config(
    m,
    n,
    k,
    dtype,
    out_dtype,
    *,
    has_bias=False,
    has_azp=False,
) -> mm.TuningConfig:
    """Cached config if any, tuned one if QLIN_AUTOTUNE=1 on a GPU, else default."""
    del has_bias, has_azp  # The epilogue barely moves the optimum.
    key = cache_key(m, n, k, dtype, out_dtype)
    # Memoized per exact M, not per bucket: the heuristic's choice changes inside a bucket (M <= 8 vs
    # 9..16 token columns, in-flight wgmma from M = 2048, ...), so a bucket-keyed memo handed whichever M
    # came first its config (decode at M = 16 ran M = 1's split-K tile: 10.9 vs 9.1 us at 4096^2 fp8).
    memo_key = (key, m)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    entry = load_cache().get(key)
    cfg = None
    if entry is not None:
        try:
            cfg = mm.TuningConfig.from_dict(entry["config"])
            mm._validate_config(cfg, dtype, out_dtype)
        except (KeyError, TypeError, ValueError):
            cfg = None
    if cfg is None and autotune_enabled() and _device_kind() is not None:
        cfg, us = tune(m_bucket(m), n, k, dtype, out_dtype)
        store_entry(key, cfg, us)
    if cfg is None:
        cfg = mm.default_config(m, n, k, dtype, out_dtype)
    _MEMO[memo_key] = cfg
    return cfg


def time_fn(fn, args, iterations: int = 20) -> float:
    """Median kernel time in microseconds (CUPTI via Mosaic GPU's profiler)."""
    from jax.experimental.mosaic.gpu import profiler

    _, times = profiler.measure(fn, iterations=iterations)(*args)
    if isinstance(times, (list, tuple)):
        return statistics.median(times) * 1e3
    return float(times) * 1e3


def tune(
    m, n, k, dtype, out_dtype, *, configs=None, iterations: int = 20, verbose: bool = False
) -> tuple[mm.TuningConfig, float]:
    """Times the candidate configs on random data; returns (best, us)."""
    if _device_kind() is None:
        raise RuntimeError("autotuning needs a GPU")
    rng = np.random.default_rng(0)
    # A weight that fits in the 50 MB L2 would be timed from L2 (decode shapes look
    # 2x faster than they run in a model): rotate over copies of >= 128 MB in all.
    copies = max(1, min(8, -(-(128 << 20) // (n * k))))
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        a = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        bs = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)]
    else:
        a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)).astype(dtype)
        bs = [jnp.asarray(rng.standard_normal((n, k), dtype=np.float32)).astype(dtype) for _ in range(copies)]
    a_s = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)), jnp.float32)
    b_s = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)), jnp.float32)
    best = None
    for cfg in configs or mm.candidate_configs(m, n, k, dtype, out_dtype):
        one = jax.jit(lambda a, b, x, y, cfg=cfg: mm.scaled_mm(a, b, x, y, out_dtype=out_dtype, config=cfg))

        def fn(a, bs, x, y, one=one):
            return [one(a, b, x, y) for b in bs]

        try:
            us = time_fn(fn, (a, bs, a_s, b_s), iterations) / copies
        except Exception as e:  # noqa: BLE001 - a config that fails to build is skipped
            if verbose:
                print(f"  {cfg.short()}: failed: {str(e).splitlines()[0][:120]}")
            continue
        if verbose:
            print(f"  {cfg.short()}: {us:.1f} us")
        if best is None or us < best[1]:
            best = (cfg, us)
    if best is None:
        cfg = mm.default_config(m, n, k, dtype, out_dtype)
        return cfg, float("nan")
    return best
