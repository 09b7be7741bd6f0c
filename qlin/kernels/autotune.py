"""Tile-config autotuner for the Mosaic GPU matmuls, with an on-disk cache.

* ``QLIN_AUTOTUNE``: "1" tunes missing (M-bucket, N, K, dtype, out_dtype)
  entries on the GPU the first time they are seen (this takes seconds per
  shape); "0" (default) only reads the cache and otherwise uses the kernel's
  heuristic: :func:`mosaic_gpu_scaled_mm.default_config` for the per-channel
  kernel (:func:`get_config`), :func:`mosaic_gpu_block_scaled_mm.default_config`
  for the block-scaled fp8 kernel (:func:`get_block_config`, its own cache keys;
  a promoted-accumulation request never gets a rescaled ``fast_accum`` config).
* ``QLIN_TUNING_CACHE``: path of the JSON cache (default
  ``~/.cache/qlin/tuning.json``).  Entries are keyed by the device kind, so one
  file can hold H100 and H200 results.

Tuning never runs without a GPU (interpret mode and CPU tests always get the
heuristic or cached config).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import statistics
import tempfile
import threading
import warnings
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


def store_entry(key: str, config: mm.TileConfigBase, us: float, path: Path | None = None) -> None:
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


def _lookup(key: str, memo_key, parse, tune_fn, default_fn):
    """The memo, else a valid cache entry (``parse`` returns the config or raises ValueError / KeyError /
    TypeError; an entry without a finite time is no tuning result: ignored), else a tuned config if
    QLIN_AUTOTUNE=1 on a GPU (stored when a candidate ran), else ``default_fn()``."""
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    entry = load_cache().get(key)
    cfg = None
    if entry is not None:
        try:
            us = float(entry["us"])
            # (NaN: written by earlier versions when no candidate ran, e.g. all of them under a jit trace)
            cfg = parse(entry["config"]) if math.isfinite(us) else None
        except (KeyError, TypeError, ValueError):
            cfg = None
    if cfg is None and autotune_enabled() and _device_kind() is not None:
        cfg, us = _outside_traces(tune_fn)
        if math.isfinite(us):
            store_entry(key, cfg, us)
    if cfg is None:
        cfg = default_fn()
    _MEMO[memo_key] = cfg
    return cfg


def _outside_traces(fn):
    """``fn()`` in a fresh thread.  The kernels ask for their config while the caller's ``jax.jit`` traces
    them, and under a trace every jnp operation is staged: the tuner's operands would be tracers and every
    candidate would fail to run (before this, each stored the heuristic with a NaN time).  JAX's trace
    state is per thread, so in a new thread the candidates compile and run on the GPU as they should."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qlin-autotune") as pool:
        return pool.submit(fn).result()


def _describe(cfg, e: Exception) -> str:
    return f"{cfg.short()}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _none_ran(what: str, first_error: str | None):
    warnings.warn(
        f"qlin autotune: no candidate config ran for {what} ({first_error or 'no candidates'}); "
        "using the heuristic config (nothing stored: the next process tries again)",
        RuntimeWarning,
        stacklevel=3,
    )


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

    def parse(d):
        cfg = mm.TuningConfig.from_dict(d)
        mm._validate_config(cfg, dtype, out_dtype)
        return cfg

    # Memoized per exact M, not per bucket: the heuristic's choice changes inside a bucket (M <= 8 vs
    # 9..16 token columns, in-flight wgmma from M = 2048, ...), so a bucket-keyed memo handed whichever M
    # came first its config (decode at M = 16 ran M = 1's split-K tile: 10.9 vs 9.1 us at 4096^2 fp8).
    return _lookup(
        key,
        (key, m),
        parse,
        lambda: tune(m_bucket(m), n, k, dtype, out_dtype),
        lambda: mm.default_config(m, n, k, dtype, out_dtype),
    )


def block_cache_key(m, n, k, out_dtype, fast_accum: bool = False, device_kind=None) -> str:
    """The block-scaled fp8 kernel's entries: their own keys (``block|...``; ``|fast_accum`` where the
    request allows rescaled accumulation), beside the per-channel kernel's in the same file."""
    dk = device_kind or _device_kind() or "cpu"
    tail = "|fast_accum" if fast_accum else ""
    return f"block|{dk}|{jnp.dtype(out_dtype).name}|M{m_bucket(m)}|N{n}|K{k}{tail}"


def get_block_config(m, n, k, out_dtype, *, fast_accum: bool = False, has_bias: bool = False):
    """The block-scaled fp8 kernel's tile config: cached if any (valid for this K and bias, and not
    rescaled unless ``fast_accum``), tuned if QLIN_AUTOTUNE=1 on a GPU, else its heuristic."""
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    key = block_cache_key(m, n, k, out_dtype, fast_accum)

    def parse(d):
        cfg = bmm.BlockTuningConfig.from_dict(d)
        if cfg.rescale and not fast_accum:
            raise ValueError("a rescaled (fast_accum) config for a promoted-accumulation request")
        bmm._validate_config(cfg, out_dtype, has_bias)
        if err := bmm.tail_split_error(cfg, k):
            raise ValueError(err)
        return cfg

    return _lookup(
        key,
        (key, m, has_bias),
        parse,
        lambda: tune_block(m_bucket(m), n, k, out_dtype, fast_accum=fast_accum),
        lambda: bmm.default_config(m, n, k, out_dtype, fast_accum),
    )


def time_fn(fn, args, iterations: int = 20) -> float:
    """Median kernel time in microseconds (CUPTI via Mosaic GPU's profiler)."""
    from jax.experimental.mosaic.gpu import profiler

    _, times = profiler.measure(fn, iterations=iterations)(*args)
    if isinstance(times, (list, tuple)):
        return statistics.median(times) * 1e3
    return float(times) * 1e3


def _weight_copies(n: int, k: int) -> int:
    """Weight copies the tuners rotate over: a weight that fits in the 50 MB L2 would be timed from L2
    (decode shapes look 2x faster than they run in a model), so >= 128 MB in all (as ``bench.n_copies``)."""
    return max(1, min(8, -(-(128 << 20) // (n * k))))


def _fastest(cands, build, run_copies, args, copies: int, iterations: int, verbose: bool):
    """Times each candidate (``build(cfg)``: the jitted kernel; ``run_copies(one, *args)``: one call per
    weight copy) and returns ((best config, us per call) or None, the first failure's description)."""
    best, first_error = None, None
    for cfg in cands:
        one = build(cfg)

        def fn(*a, one=one):
            return run_copies(one, *a)

        try:
            us = time_fn(fn, args, iterations) / copies
        except Exception as e:  # noqa: BLE001 - a config that fails to build is skipped
            error = _describe(cfg, e)
            first_error = first_error or error
            if verbose:
                print(f"  failed: {error}")
            continue
        if verbose:
            print(f"  {cfg.short()}: {us:.1f} us")
        if best is None or us < best[1]:
            best = (cfg, us)
    return best, first_error


def tune(
    m, n, k, dtype, out_dtype, *, configs=None, iterations: int = 20, verbose: bool = False
) -> tuple[mm.TuningConfig, float]:
    """Times the candidate configs on random data; returns (best, us)."""
    if _device_kind() is None:
        raise RuntimeError("autotuning needs a GPU")
    rng = np.random.default_rng(0)
    copies = _weight_copies(n, k)
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        a = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        bs = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)]
    else:
        a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)).astype(dtype)
        bs = [jnp.asarray(rng.standard_normal((n, k), dtype=np.float32)).astype(dtype) for _ in range(copies)]
    a_s = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)), jnp.float32)
    b_s = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)), jnp.float32)
    best, first_error = _fastest(
        configs or mm.candidate_configs(m, n, k, dtype, out_dtype),
        lambda cfg: jax.jit(lambda a, b, x, y: mm.scaled_mm(a, b, x, y, out_dtype=out_dtype, config=cfg)),
        lambda one, a, bs, x, y: [one(a, b, x, y) for b in bs],
        (a, bs, a_s, b_s),
        copies,
        iterations,
        verbose,
    )
    if best is None:
        _none_ran(f"{m} x {n} x {k} {jnp.dtype(dtype).name}", first_error)
        return mm.default_config(m, n, k, dtype, out_dtype), float("nan")
    return best


#: Candidates the block kernel's tuner times (the head of ``candidate_configs``, most informative first;
#: the tail holds the overlapped-promotion variants, measured at 0.17-0.34 of the per-channel kernel).
BLOCK_TUNE_CANDIDATES = 10


def tune_block(
    m, n, k, out_dtype, *, fast_accum: bool = False, configs=None, iterations: int = 20, verbose: bool = False
):
    """Times the block kernel's candidate configs on random block-scaled fp8 data; returns (best, us)
    (the heuristic and nan if none ran)."""
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    if _device_kind() is None:
        raise RuntimeError("autotuning needs a GPU")
    rng = np.random.default_rng(0)
    copies = _weight_copies(n, k)
    kb, nb = -(-k // bmm.BLOCK), -(-n // bmm.BLOCK)
    f8 = jnp.float8_e4m3fn
    a = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)).astype(f8)
    a_s = jnp.asarray(rng.uniform(0.5, 1.5, (m, kb)), jnp.float32)
    sets = [
        (jnp.asarray(rng.standard_normal((n, k), dtype=np.float32)).astype(f8),
         jnp.asarray(rng.uniform(0.5, 1.5, (nb, kb)), jnp.float32))
        for _ in range(copies)
    ]  # fmt: skip
    cands = configs or bmm.candidate_configs(m, n, k, out_dtype, limit=BLOCK_TUNE_CANDIDATES, fast_accum=fast_accum)
    best, first_error = _fastest(
        cands,
        lambda cfg: jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, out_dtype=out_dtype, config=cfg)),
        lambda one, a, sets, x: [one(a, b, x, y) for b, y in sets],
        (a, sets, a_s),
        copies,
        iterations,
        verbose,
    )
    if best is None:
        _none_ran(f"the block kernel at {m} x {n} x {k}", first_error)
        return bmm.default_config(m, n, k, out_dtype, fast_accum), float("nan")
    return best
