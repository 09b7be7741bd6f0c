"""Helpers shared by qlin's notebooks: error sweeps, benchmark results, rooflines, tile analysis, plots.

Every helper that computes something returns plain data (floats, dicts, NumPy
arrays) and is tested in ``tests/test_viz.py``; the ``plot_*`` functions draw
that data on a matplotlib ``Axes`` (matplotlib is imported lazily: it comes with
the ``notebooks`` extra, not with qlin itself).

Sections:

* quantization error -- :func:`make_activations`, :func:`make_config`,
  :func:`quantization_error`, :func:`error_matrix`, :func:`roundtrip`,
  :func:`row_rel_err`;
* params and selection -- :func:`describe_params`, :func:`explain_rows`;
* benchmark results -- :func:`load_benchmark_results` (the JSON rows of
  ``benchmarks/results/``), :func:`device_spec`, :func:`roofline_tflops`,
  :func:`speedups`, :func:`live_benchmark`;
* tiles -- :func:`smem_budget`, :func:`tile_stats`, :func:`planar_snake`,
  :func:`tile_schedule`;
* plots -- :func:`plot_bars`, :func:`plot_lines`, :func:`plot_histograms`,
  :func:`plot_tflops_vs_m`, :func:`plot_roofline`, :func:`plot_tile_schedule`,
  :func:`plot_smem_budget`;
* :func:`format_table` renders a list of dicts as a markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.params import Params
from qlin.quantize import calibrate_static, dequantize_activation, quantize_activation, quantize_weight
from qlin.select import explain
from qlin.testing import reference_linear_np
from qlin.tolerances import rel_err

# =============================================================================================
# Quantization error
# =============================================================================================

#: 8-bit formats by label (the labels of :data:`qlin.tolerances.QUANT_RTOL`).
FORMATS: dict[str, dict[str, Any]] = {
    "fp8-e4m3fn": {"cls": FP8ScaledMMConfig, "fp8_format": "e4m3fn"},
    "fp8-e5m2": {"cls": FP8ScaledMMConfig, "fp8_format": "e5m2"},
    "int8": {"cls": Int8ScaledMMConfig, "symmetric": True},
    "int8-asym": {"cls": Int8ScaledMMConfig, "symmetric": False},
}

#: Scale granularities by label: weight granularity x activation scheme, coarse to fine.
GRANULARITIES: dict[str, dict[str, Any]] = {
    "tensor W / static tensor A": {"weight_granularity": "per_tensor", "activation": "static"},
    "tensor W / tensor A": {"weight_granularity": "per_tensor", "activation": "dynamic_per_tensor"},
    "channel W / tensor A": {"weight_granularity": "per_channel", "activation": "dynamic_per_tensor"},
    "channel W / token A": {"weight_granularity": "per_channel", "activation": "dynamic_per_token"},
    "block128 W / group128 A": {"weight_granularity": (128, 128), "activation": "dynamic_per_group"},
}


def make_config(fmt: str, granularity: str | Mapping[str, Any], *, out_dtype=jnp.float32) -> ScaledMMConfig:
    """The config for a format label of :data:`FORMATS` and a granularity (label of :data:`GRANULARITIES` or kwargs)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {tuple(FORMATS)}, got {fmt!r}")
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {tuple(GRANULARITIES)} or a dict, got {granularity!r}")
        granularity = GRANULARITIES[granularity]
    spec = dict(FORMATS[fmt])
    cls = spec.pop("cls")
    return cls(**spec, **dict(granularity), out_dtype=out_dtype)


def make_activations(
    m: int,
    k: int,
    *,
    dist: str = "gaussian",
    df: float = 3.0,
    outlier_channels: int = 0,
    outlier_scale: float = 20.0,
    seed: int = 0,
) -> np.ndarray:
    """A float32 activation ``(m, k)``.

    ``dist``: ``"gaussian"`` (unit normal) or ``"student_t"`` (heavy-tailed, ``df``
    degrees of freedom, rescaled to unit variance when ``df > 2``).
    ``outlier_channels`` columns (the same for every token, as in LLM activations)
    are multiplied by ``outlier_scale``.
    """
    if m <= 0 or k <= 0:
        raise ValueError(f"m, k: expected positive sizes, got ({m}, {k})")
    if not 0 <= outlier_channels <= k:
        raise ValueError(f"outlier_channels: expected 0..{k}, got {outlier_channels}")
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        x = rng.standard_normal((m, k))
    elif dist == "student_t":
        if df <= 0:
            raise ValueError(f"df: expected > 0, got {df}")
        x = rng.standard_t(df, (m, k))
        if df > 2:
            x = x / math.sqrt(df / (df - 2))
    else:
        raise ValueError(f"dist: expected 'gaussian' or 'student_t', got {dist!r}")
    if outlier_channels:
        cols = rng.choice(k, size=outlier_channels, replace=False)
        x[:, cols] *= outlier_scale
    return x.astype(np.float32)


def make_weight(n: int, k: int, *, channel_spread: float = 0.0, seed: int = 1) -> np.ndarray:
    """A float32 weight ``(n, k)`` with ``N(0, 1/k)`` entries (unit-variance outputs for unit inputs).

    ``channel_spread > 0`` multiplies each output channel (row) by ``exp(N(0, channel_spread))``: rows
    of different magnitude, as in trained layers, which is where per-channel weight scales pay off.
    """
    if channel_spread < 0:
        raise ValueError(f"channel_spread: expected >= 0, got {channel_spread}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) / math.sqrt(k)
    if channel_spread:
        w = w * np.exp(channel_spread * rng.standard_normal((n, 1)))
    return w.astype(np.float32)


def quantize_for(w, config: ScaledMMConfig, calibration=None) -> Params:
    """``quantize_weight(w, config)``, calibrating static activation scales on ``calibration`` first."""
    if config.is_static:
        if calibration is None:
            raise ValueError("calibration: a static config needs sample activations to calibrate input_scale")
        s, zp = calibrate_static(calibration, config)
        return quantize_weight(w, config, s, zp)
    return quantize_weight(w, config)


def float_reference(x, w) -> np.ndarray:
    """The unquantized layer ``x @ w^T`` in float64."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


def quantized_output(x, w, config: ScaledMMConfig, *, calibration=None, kernel: str | None = None) -> np.ndarray:
    """``y = x W^T`` through quantization with ``config`` (float64).

    ``kernel=None`` computes y with the float64 oracle from the 8-bit operands
    (:func:`qlin.testing.reference_linear_np`): pure quantization error, no
    output rounding. A kernel name runs that kernel via :func:`qlin.linear`.
    Static configs calibrate on ``calibration`` (default: ``x`` itself).
    """
    params = quantize_for(w, config, x if calibration is None else calibration)
    if kernel is None:
        return reference_linear_np(x, params, config)
    from qlin.api import linear

    return np.asarray(linear(jnp.asarray(x), params, config, kernel=kernel), np.float64)


def quantization_error(x, w, config: ScaledMMConfig, *, calibration=None, kernel: str | None = None) -> float:
    """Relative Frobenius error of the quantized layer against the float64 float layer."""
    return rel_err(quantized_output(x, w, config, calibration=calibration, kernel=kernel), float_reference(x, w))


def error_matrix(
    x,
    w,
    formats: Sequence[str] = tuple(FORMATS),
    granularities: Sequence[str] = tuple(GRANULARITIES),
    *,
    skip: Iterable[tuple[str, str]] = (),
    calibration=None,
) -> dict[str, dict[str, float]]:
    """``{format: {granularity: relative error}}`` for every pair (``skip`` pairs are NaN)."""
    skip = set(skip)
    ref = float_reference(x, w)
    out: dict[str, dict[str, float]] = {}
    for fmt in formats:
        out[fmt] = {}
        for gran in granularities:
            if (fmt, gran) in skip:
                out[fmt][gran] = float("nan")
                continue
            cfg = make_config(fmt, gran)
            y = quantized_output(x, w, cfg, calibration=calibration)
            out[fmt][gran] = rel_err(y, ref)
    return out


def error_sweep(make_x: Callable[[Any], np.ndarray], values: Sequence[Any], w, configs: Mapping[str, ScaledMMConfig]
                ) -> dict[str, list[float]]:
    """``{label: [error for each value]}`` where ``make_x(value)`` builds the activation (e.g. an outlier scale)."""
    out: dict[str, list[float]] = {label: [] for label in configs}
    for v in values:
        x = make_x(v)
        ref = float_reference(x, w)
        for label, cfg in configs.items():
            out[label].append(rel_err(quantized_output(x, w, cfg), ref))
    return out


def roundtrip(x, config: ScaledMMConfig, *, calibration=None) -> np.ndarray:
    """The activation after quantize -> dequantize with ``config``'s activation scheme (float64)."""
    s = zp = None
    if config.is_static:
        s, zp = calibrate_static(x if calibration is None else calibration, config)
    consts = types.SimpleNamespace(input_scale=s, input_zero_point=zp, input_scale_ub=None)
    q, scale, zero = quantize_activation(jnp.asarray(x), consts, config)
    return np.asarray(dequantize_activation(q, scale, zero, config, jnp.float32), np.float64)


def row_rel_err(y, ref) -> np.ndarray:
    """Relative error of each row (token): ``||y_m - ref_m|| / ||ref_m||``."""
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    num = np.linalg.norm(y - ref, axis=-1)
    den = np.linalg.norm(ref, axis=-1)
    return num / np.where(den > 0, den, 1.0)


# =============================================================================================
# Params and selection
# =============================================================================================

def describe_params(params: Params) -> list[dict[str, Any]]:
    """One row per field of ``params``: field, layer attribute, shape, dtype (static fields show their value)."""
    rows = []
    names = params.attribute_names()
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.name in names:
            shape = None if value is None else tuple(np.shape(value))
            dtype = None if value is None else str(jnp.result_type(value))
            rows.append({"field": f.name, "attribute": names[f.name], "shape": shape, "dtype": dtype, "value": None})
        else:
            rows.append({"field": f.name, "attribute": "(static)", "shape": None, "dtype": None, "value": value})
    return rows


def explain_rows(config, compute_capability: int | None = None, platform: str | None = None) -> list[dict[str, Any]]:
    """:func:`qlin.explain` as table rows, the first usable kernel marked ``chosen``."""
    verdicts = explain(config, compute_capability, platform)
    chosen = next((v.name for v in verdicts if v.ok), None)
    return [{"kernel": v.name, "usable": v.ok, "chosen": v.name == chosen, "reason": v.reason or ""} for v in verdicts]


# =============================================================================================
# Benchmark results
# =============================================================================================

#: Keys every benchmark row must have (see issue 5 and benchmarks/).
REQUIRED_KEYS: tuple[str, ...] = ("impl", "dtype", "M", "N", "K", "us", "tflops", "rel_err", "device")
#: Bytes per operand element for each benchmark dtype.
DTYPE_BYTES: dict[str, int] = {"fp8": 1, "int8": 1, "bf16": 2}


def find_results_dir(start: str | os.PathLike | None = None) -> Path | None:
    """``benchmarks/results`` of this checkout: ``$QLIN_BENCH_RESULTS``, else the first one found walking up
    from ``start`` (default: the working directory), else next to the qlin package. None if there is none."""
    env = os.environ.get("QLIN_BENCH_RESULTS")
    if env:
        return Path(env)
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        cand = d / "benchmarks" / "results"
        if cand.is_dir():
            return cand
    cand = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    return cand if cand.is_dir() else None


def _scalars(d: Mapping) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, (list, dict))}


def _is_benchmark_file(data: Any) -> bool:
    """A list of GEMM rows (an ``impl`` on an ``M x N x K`` problem), bare or under "rows"/"results"/"data"."""
    if isinstance(data, Mapping):
        data = next((data[k] for k in ("rows", "results", "data") if isinstance(data.get(k), list)), None)
    gemm_keys = ("impl", "M", "N", "K")
    return isinstance(data, list) and any(isinstance(r, Mapping) and all(k in r for k in gemm_keys) for r in data)


def _rows_of(data: Any, source: str) -> list[dict]:
    meta: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key in ("rows", "results", "data"):
            if isinstance(data.get(key), list):
                meta = _scalars(data.get("meta", {})) if isinstance(data.get("meta"), Mapping) else {}
                meta.update(_scalars({k: v for k, v in data.items() if k != key}))
                data = data[key]
                break
        else:
            raise ValueError(f"{source}: expected a list of rows or an object with a 'rows'/'results' list")
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a list of rows, got {type(data).__name__}")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, Mapping):
            raise ValueError(f"{source}: row {i} is a {type(row).__name__}, expected an object")
        if row.get("kind", "time") != "time":
            continue  # GPU-check files mix correctness ("check") and tile-sweep rows with timings
        row = {**meta, **row}
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"{source}: row {i} lacks key(s) {missing}; rows need {list(REQUIRED_KEYS)}")
        row = dict(row)
        for k in ("M", "N", "K"):
            row[k] = int(row[k])
        for k in ("us", "tflops", "rel_err"):
            row[k] = None if row[k] is None else float(row[k])
        # a case that did not run (the benchmark records it with us=None and an "error")
        row["failed"] = row["us"] is None or row["tflops"] is None or not row["us"] > 0
        row["source"] = source
        rows.append(row)
    return rows


def load_benchmark_results(path: str | os.PathLike | None = None, *, include_failed: bool = False) -> list[dict]:
    """Timing rows of every benchmark ``*.json`` under ``path`` (a file or folder; default :func:`find_results_dir`).

    In a folder, JSON files that hold no row list (other GPU results) are skipped, and
    rows with a ``kind`` other than ``"time"`` (correctness checks, tile sweeps) are left out.

    A file holds a list of rows or an object with a ``"rows"`` (or ``"results"``)
    list; the scalar fields of the object and of its ``"meta"`` object (e.g.
    ``"device"``, ``"copy_gbs"``) fill in keys its rows lack. Each row must have
    :data:`REQUIRED_KEYS`; a malformed file raises ``ValueError`` naming it.
    A merged grid (``meta.sources``, written by ``benchmarks/merge_gemm.py``) stands in for the
    files it lists: their rows are dropped when both are in the folder.
    Rows of cases that did not run (``us`` None) are left out unless
    ``include_failed``; each row gets ``failed`` and ``source`` (the file name).
    Returns ``[]`` when there are no results.
    """
    if path is None:
        path = find_results_dir()
        if path is None:
            return []
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.json")) if path.is_dir() else []
    rows: list[dict] = []
    superseded: set[str] = set()
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f.name}: not valid JSON ({e})") from None
        if path.is_dir() and not _is_benchmark_file(data):
            continue  # other GPU results in the folder (bridge / quantize checks, qlin info)
        rows.extend(_rows_of(data, f.name))
        superseded |= _merged_sources(data)
    # A merged grid (benchmarks/merge_gemm.py) replaces the runs it was merged from.
    rows = [r for r in rows if r["source"] not in superseded]
    return rows if include_failed else [r for r in rows if not r["failed"]]


def _merged_sources(data: Any) -> set[str]:
    """File names a merged benchmark file (``meta.sources``) was built from."""
    meta = data.get("meta") if isinstance(data, Mapping) else None
    sources = meta.get("sources") if isinstance(meta, Mapping) else None
    if not isinstance(sources, list):
        return set()
    return {s["file"] for s in sources if isinstance(s, Mapping) and isinstance(s.get("file"), str)}


def shapes_of(rows: Iterable[Mapping]) -> list[tuple[int, int]]:
    """The distinct ``(N, K)`` of ``rows``, sorted."""
    return sorted({(r["N"], r["K"]) for r in rows})


def series(rows: Iterable[Mapping], n: int, k: int, value: str = "tflops", dtypes: Sequence[str] | None = None
           ) -> dict[str, tuple[list[int], list[float]]]:
    """``{"<impl> <dtype>": (Ms, values)}`` for shape ``(n, k)`` (and ``dtypes`` if given), sorted by M
    (the median of repeated rows)."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["N"] == n and r["K"] == k and (dtypes is None or r["dtype"] in dtypes):
            acc.setdefault(f"{r['impl']} {r['dtype']}", {}).setdefault(r["M"], []).append(float(r[value]))
    return {label: (sorted(d), [float(np.median(d[m])) for m in sorted(d)]) for label, d in sorted(acc.items())}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet peaks of a GPU: dense tensor-core TFLOP/s per dtype and memory bandwidth in TB/s."""

    name: str
    peak_tflops: Mapping[str, float]
    mem_tbs: float


#: Dense (no sparsity) datasheet numbers; checked in order, first substring match wins.
DEVICE_SPECS: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("h200",), DeviceSpec("H200 SXM", {"fp8": 1979.0, "int8": 1979.0, "bf16": 989.0}, 4.8)),
    (("h100", "pcie"), DeviceSpec("H100 PCIe", {"fp8": 1513.0, "int8": 1513.0, "bf16": 756.0}, 2.0)),
    (("h100", "nvl"), DeviceSpec("H100 NVL", {"fp8": 1671.0, "int8": 1671.0, "bf16": 835.0}, 3.9)),
    (("h100",), DeviceSpec("H100 SXM", {"fp8": 1979.0, "int8": 1979.0, "bf16": 989.0}, 3.35)),
)


def device_spec(device: str | None) -> DeviceSpec | None:
    """The :class:`DeviceSpec` whose name matches ``device`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or None."""
    if not device:
        return None
    d = device.lower()
    for keys, spec in DEVICE_SPECS:
        if all(k in d for k in keys):
            return spec
    return None


def gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gemm_bytes(m: int, n: int, k: int, in_bytes: int = 1, out_bytes: int = 2) -> float:
    """Minimum DRAM traffic of ``(M, K) x (N, K)^T -> (M, N)``: each operand read once, output written once."""
    return float(m * k * in_bytes + n * k * in_bytes + m * n * out_bytes)


def arithmetic_intensity(m: int, n: int, k: int, in_bytes: int = 1, out_bytes: int = 2) -> float:
    """FLOP per byte of DRAM traffic."""
    return gemm_flops(m, n, k) / gemm_bytes(m, n, k, in_bytes, out_bytes)


def roofline_tflops(m: int, n: int, k: int, dtype: str, spec: DeviceSpec, out_bytes: int = 2) -> float:
    """Attainable TFLOP/s: ``min(compute peak, intensity x bandwidth)``."""
    ai = arithmetic_intensity(m, n, k, DTYPE_BYTES[dtype], out_bytes)
    return min(spec.peak_tflops[dtype], ai * spec.mem_tbs)


def speedups(rows: Iterable[Mapping], impl: str, baseline: str = "xla") -> list[dict[str, Any]]:
    """Rows ``(dtype, N, K, M, us, baseline_us, speedup)`` wherever ``impl`` and ``baseline`` share
    dtype and shape; ``impl`` may be a prefix (``"qlin:"`` matches any qlin kernel)."""
    def key(r):
        return (r["dtype"], r["N"], r["K"], r["M"])

    def match(r, name):
        return r["impl"] == name or (name.endswith(":") and str(r["impl"]).startswith(name))

    rows = list(rows)
    base = {}
    for r in rows:
        if match(r, baseline):
            base.setdefault(key(r), []).append(r["us"])
    out = []
    for r in rows:
        if match(r, impl) and key(r) in base:
            b = float(np.median(base[key(r)]))
            out.append({"impl": r["impl"], "dtype": r["dtype"], "N": r["N"], "K": r["K"], "M": r["M"],
                        "us": r["us"], "baseline_us": b, "speedup": b / r["us"]})
    return sorted(out, key=lambda d: (d["dtype"], d["N"], d["K"], d["M"]))


def geomean(values: Iterable[float]) -> float:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return float("nan")
    return float(np.exp(np.mean(np.log(v))))


def time_call(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in microseconds (``jax.block_until_ready`` on the result)."""
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def live_benchmark(
    ms: Sequence[int],
    shapes: Sequence[tuple[int, int]],
    dtypes: Sequence[str] = ("fp8", "int8"),
    *,
    iters: int = 10,
    with_bf16: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time qlin's chosen kernel (and XLA-native when that is not the chosen one) on this machine.

    Returns rows in the benchmark schema (:data:`REQUIRED_KEYS`): ``impl``
    ``"qlin:<kernel>"``, ``"xla"``; ``dtype`` ``"fp8"``/``"int8"``/``"bf16"``;
    fp8 and int8 are per-token x per-channel with bf16 output. Wall-clock
    medians (including dispatch), so small shapes are dispatch-bound.
    ``rel_err`` is against the float64 product of the (bf16) activation and the float32 weight.
    """
    from qlin.api import QuantizedLinear
    from qlin.platform import describe_device

    device = describe_device()
    configs = {"fp8": FP8ScaledMMConfig(), "int8": Int8ScaledMMConfig()}
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        w = make_weight(n, k, seed=seed + 1)
        layers = {}
        for dt in dtypes:
            if dt not in configs:
                raise ValueError(f"dtypes: expected 'fp8' or 'int8', got {dt!r}")
            chosen = QuantizedLinear.from_float(jnp.asarray(w), configs[dt])
            layers[dt] = [("qlin:" + chosen.kernel.name, chosen)]
            if chosen.kernel.name != "xla":
                layers[dt].append(("xla", QuantizedLinear.from_float(jnp.asarray(w), configs[dt], kernel="xla")))
        wb = jnp.asarray(w, jnp.bfloat16)
        dense = jax.jit(lambda x, wb: jax.lax.dot_general(x, wb, (((1,), (1,)), ((), ())),
                                                          preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        for m in ms:
            x = make_activations(m, k, seed=seed + m)
            xb = jnp.asarray(x, jnp.bfloat16)
            ref = float_reference(np.asarray(xb, np.float32), w)
            todo = [(name, dt, layer) for dt in dtypes for name, layer in layers[dt]]
            if with_bf16:
                todo.append(("xla", "bf16", None))
            for name, dt, layer in todo:
                fn = (lambda: dense(xb, wb)) if layer is None else (lambda layer=layer: layer(xb))
                us = time_call(fn, iters=iters)
                rows.append({"impl": name, "dtype": dt, "M": m, "N": n, "K": k, "us": us,
                             "tflops": gemm_flops(m, n, k) / us / 1e6, "rel_err": rel_err(fn(), ref),
                             "device": device, "source": "live"})
    return rows


# =============================================================================================
# Tiles (Mosaic GPU kernel)
# =============================================================================================

#: Hopper's dynamic shared memory per block and SM count (H100 SXM).
SMEM_LIMIT_BYTES = 227 * 1024
NUM_SMS = 132


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_budget(
    tile_m: int,
    tile_n: int,
    tile_k: int,
    stages: int,
    *,
    epi_tile_m: int | None = None,
    epi_tile_n: int | None = None,
    epi_buffers: int = 1,
    in_bytes: int = 1,
    out_bytes: int = 2,
    limit: int = SMEM_LIMIT_BYTES,
) -> dict[str, Any]:
    """Shared memory of a pipelined GEMM tile: ``stages x (tile_m x tile_k + tile_n x tile_k) x in_bytes``
    for the operand ring plus ``epi_buffers`` epilogue tiles (default the whole output tile) of ``out_bytes``.

    Returns ``{"operands", "epilogue", "total", "limit", "fits", "max_stages"}`` (bytes; ``max_stages``:
    the deepest pipeline that fits next to the epilogue).
    """
    for name, v in (("tile_m", tile_m), ("tile_n", tile_n), ("tile_k", tile_k), ("stages", stages)):
        if v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v}")
    stage = (tile_m + tile_n) * tile_k * in_bytes
    epilogue = (epi_tile_m or tile_m) * (epi_tile_n or tile_n) * out_bytes * epi_buffers
    total = stages * stage + epilogue
    return {"operands": stages * stage, "epilogue": epilogue, "total": total, "limit": limit,
            "fits": total <= limit, "max_stages": max(0, (limit - epilogue) // stage)}


def smem_budget_for(cfg: Any, in_bytes: int = 1, out_bytes: int = 2, limit: int = SMEM_LIMIT_BYTES) -> dict[str, Any]:
    """:func:`smem_budget` of a Mosaic GPU ``TuningConfig`` (CTA tile for the operands; per consumer
    warpgroup ``epi_slots`` epilogue tiles (default 2), at most as many as its tile holds)."""
    tile_m, tile_n = cfg.tile_m, cfg.tile_n
    wgs = getattr(cfg, "num_compute_wgs", 1)
    cta_m = getattr(cfg, "cta_tile_m", tile_m)
    cta_n = getattr(cfg, "cta_tile_n", tile_n)
    epi_m = getattr(cfg, "epi_tile_m", None) or tile_m
    epi_n = getattr(cfg, "epi_tile_n", None) or tile_n
    slots = min(getattr(cfg, "epi_slots", 2), (tile_m * tile_n) // (epi_m * epi_n))
    return smem_budget(cta_m, cta_n, cfg.tile_k, cfg.max_concurrent_steps, epi_tile_m=epi_m, epi_tile_n=epi_n,
                       epi_buffers=wgs * slots, in_bytes=in_bytes, out_bytes=out_bytes, limit=limit)


def tile_stats(m: int, n: int, k: int, cta_m: int, cta_n: int, tile_k: int, num_sms: int = NUM_SMS) -> dict[str, Any]:
    """What a CTA tile does to an ``(m, n, k)`` GEMM on ``num_sms`` SMs (persistent grid).

    ``tiles`` output tiles in ``waves`` waves; ``last_wave_util``: fraction of SMs
    busy in the last wave; ``padding``: fraction of the computed tile area that
    is outside the matrix (wasted MMA work on partial tiles); ``k_steps``: main
    loop iterations per tile; ``smem_intensity``: FLOP per byte loaded into shared
    memory per K step (``2 cta_m cta_n / (cta_m + cta_n)`` for 8-bit operands).
    """
    mt, nt = _cdiv(m, cta_m), _cdiv(n, cta_n)
    tiles = mt * nt
    waves = _cdiv(tiles, num_sms)
    last = tiles - (waves - 1) * num_sms
    computed = mt * cta_m * nt * cta_n
    return {"m_tiles": mt, "n_tiles": nt, "tiles": tiles, "waves": waves, "last_wave_util": last / num_sms,
            "sm_util": tiles / (waves * num_sms), "padding": 1.0 - (m * n) / computed,
            "k_steps": _cdiv(k, tile_k), "smem_intensity": 2.0 * cta_m * cta_n / (cta_m + cta_n)}


def planar_snake(lin: np.ndarray, shape: tuple[int, int], minor_dim: int, tile_width: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy version of Mosaic GPU's ``planar_snake``: linear tile index -> ``(i, j)`` in ``shape``.

    The ``minor_dim`` axis is cut into strips of ``tile_width``; within a strip the
    index walks the minor axis fastest, and every other strip walks the major axis
    backwards ("snakes"), so consecutive tiles share operand rows/columns in L2.
    """
    if minor_dim not in (0, 1):
        raise ValueError(f"minor_dim: expected 0 or 1, got {minor_dim}")
    if tile_width <= 0:
        raise ValueError(f"tile_width: expected a positive int, got {tile_width}")
    lin = np.asarray(lin, np.int64)
    minor_size, major_size = shape[minor_dim], shape[1 - minor_dim]
    tile_size = tile_width * major_size
    full_tiles, last_width = divmod(minor_size, tile_width)
    in_full = lin < full_tiles * tile_size
    tile_idx = np.where(in_full, lin // tile_size, full_tiles)
    within = np.where(in_full, lin % tile_size, lin - full_tiles * tile_size)
    width = np.where(in_full, tile_width, max(last_width, 1))
    major, minor_in = within // width, within % width
    major = np.where(tile_idx % 2 == 0, major, major_size - 1 - major)
    minor = tile_idx * tile_width + minor_in
    return (minor, major) if minor_dim == 0 else (major, minor)


def tile_schedule(m: int, n: int, cta_m: int, cta_n: int, *, num_sms: int = NUM_SMS, grid_minor_dim: str = "n",
                  grid_tile_width: int = 1) -> dict[str, np.ndarray]:
    """Which SM computes each output tile, in which wave (persistent grid, planar-snake order).

    Returns ``order`` (visit index), ``sm`` and ``wave`` arrays of shape ``(m_tiles, n_tiles)``:
    tile number ``i`` in snake order runs on SM ``i % grid`` in wave ``i // grid`` with
    ``grid = min(num_sms, tiles)``, as the kernel's ``nd_loop`` over the ``"sm"`` axis does.
    """
    mt, nt = _cdiv(m, cta_m), _cdiv(n, cta_n)
    tiles = mt * nt
    grid = max(1, min(num_sms, tiles))
    lin = np.arange(tiles)
    i, j = planar_snake(lin, (mt, nt), 0 if grid_minor_dim == "m" else 1, grid_tile_width)
    order = np.full((mt, nt), -1)
    order[i, j] = lin
    return {"order": order, "sm": order % grid, "wave": order // grid}


# =============================================================================================
# Tables
# =============================================================================================

def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "no")
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt)
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A markdown table of ``rows`` (columns: the keys of the first row unless given)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c), floatfmt) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


# =============================================================================================
# Plots (matplotlib, imported lazily)
# =============================================================================================

def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the notebooks extra
        raise ImportError("qlin.viz plots need matplotlib: pip install 'qlin[notebooks]'") from e
    return plt


def _axes(ax):
    if ax is None:
        _, ax = _plt().subplots(figsize=(7, 4))
    return ax


def plot_bars(values: Mapping[str, Mapping[str, float]], ax=None, *, ylabel: str = "relative error",
              title: str | None = None, log: bool = True):
    """Grouped bars: ``{series: {category: value}}`` (e.g. the output of :func:`error_matrix`)."""
    ax = _axes(ax)
    series_names = list(values)
    cats = list(dict.fromkeys(c for s in values.values() for c in s))
    width = 0.8 / max(1, len(series_names))
    xs = np.arange(len(cats))
    for i, s in enumerate(series_names):
        ax.bar(xs + (i - (len(series_names) - 1) / 2) * width, [values[s].get(c, np.nan) for c in cats],
               width, label=s)
    ax.set_xticks(xs, cats, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    return ax


def plot_lines(xs: Sequence[float], ys: Mapping[str, Sequence[float]], ax=None, *, xlabel: str = "",
               ylabel: str = "relative error", title: str | None = None, logx: bool = False, logy: bool = True):
    """One line per series of ``ys`` over ``xs`` (e.g. the output of :func:`error_sweep`)."""
    ax = _axes(ax)
    for label, y in ys.items():
        ax.plot(xs, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def plot_histograms(samples: Mapping[str, np.ndarray], ax=None, *, bins: int = 80, xlabel: str = "",
                    title: str | None = None, logy: bool = True, logx: bool = False):
    """Overlaid step histograms of each sample (shared bins; log-spaced with ``logx``)."""
    ax = _axes(ax)
    data = {k: np.asarray(v, np.float64).ravel() for k, v in samples.items()}
    allv = np.concatenate([v[np.isfinite(v)] for v in data.values()])
    if logx:
        pos = allv[allv > 0]
        edges = np.geomspace(pos.min(), pos.max(), bins + 1)
        ax.set_xscale("log")
    else:
        edges = np.linspace(allv.min(), allv.max(), bins + 1)
    for label, v in data.items():
        ax.hist(v, bins=edges, histtype="step", linewidth=1.5, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_tflops_vs_m(rows: Sequence[Mapping], n: int, k: int, ax=None, *, spec: DeviceSpec | None = None,
                     dtypes: Sequence[str] | None = None, title: str | None = None, legend: bool = True):
    """TFLOP/s vs M for shape ``(n, k)``: one line per ``impl dtype`` (only ``dtypes`` if given), and with
    ``spec`` the roofline (``min(peak, intensity x bandwidth)``) of each dtype shown, dashed."""
    ax = _axes(ax)
    data = series(rows, n, k, dtypes=dtypes)
    dtypes = []
    for label, (ms, tf) in data.items():
        ax.plot(ms, tf, marker="o", label=label)
        dt = label.rsplit(" ", 1)[1]
        if dt not in dtypes:
            dtypes.append(dt)
    if spec is not None and data:
        all_ms = sorted({m for ms, _ in data.values() for m in ms})
        grid = np.geomspace(min(all_ms), max(all_ms), 64)
        drawn = set()
        for dt in dtypes:
            if dt not in spec.peak_tflops or DTYPE_BYTES.get(dt) is None:
                continue
            key = (spec.peak_tflops[dt], DTYPE_BYTES[dt])
            if key in drawn:
                continue
            drawn.add(key)
            same = "/".join(d for d in dtypes if (spec.peak_tflops.get(d), DTYPE_BYTES.get(d)) == key)
            style = ("--", ":", "-.")[(len(drawn) - 1) % 3]
            ax.plot(grid, [roofline_tflops(int(m), n, k, dt, spec) for m in grid], style, color="gray",
                    alpha=0.8, label=f"roofline {same} ({spec.name})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title or f"N={n}, K={k}")
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize="x-small")
    return ax


def plot_roofline(rows: Sequence[Mapping], spec: DeviceSpec, ax=None, *, title: str | None = None):
    """Classic roofline: achieved TFLOP/s vs arithmetic intensity (FLOP/byte) of every row, with the
    memory slope (``spec.mem_tbs``) and each dtype's compute ceiling."""
    ax = _axes(ax)
    by_label: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        ai = arithmetic_intensity(r["M"], r["N"], r["K"], DTYPE_BYTES[r["dtype"]])
        xs, ys = by_label.setdefault(f"{r['impl']} {r['dtype']}", ([], []))
        xs.append(ai)
        ys.append(r["tflops"])
    for label, (xs, ys) in sorted(by_label.items()):
        ax.scatter(xs, ys, s=14, label=label, alpha=0.8)
    all_x = [x for xs, _ in by_label.values() for x in xs] or [1.0, 1e4]
    grid = np.geomspace(min(all_x) / 2, max(all_x) * 2, 128)
    for peak in sorted(set(spec.peak_tflops.values())):
        names = "/".join(d for d, p in spec.peak_tflops.items() if p == peak)
        ax.plot(grid, np.minimum(peak, grid * spec.mem_tbs), "--", color="gray", alpha=0.8)
        ax.annotate(f"{names} peak {peak:.0f}", (grid[-1], peak), ha="right", va="bottom", fontsize="x-small")
    ax.annotate(f"HBM {spec.mem_tbs} TB/s", (grid[0], grid[0] * spec.mem_tbs), fontsize="x-small", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / DRAM byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title or f"Roofline ({spec.name})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
    return ax


def plot_tile_schedule(m: int, n: int, cta_m: int, cta_n: int, ax=None, *, num_sms: int = NUM_SMS,
                       grid_minor_dim: str = "n", grid_tile_width: int = 1, title: str | None = None):
    """The ``(m, n)`` output cut into CTA tiles, coloured by wave, numbered in visit order; the part of
    partial tiles outside the matrix is hatched."""
    plt = _plt()
    ax = _axes(ax)
    sched = tile_schedule(m, n, cta_m, cta_n, num_sms=num_sms, grid_minor_dim=grid_minor_dim,
                          grid_tile_width=grid_tile_width)
    mt, nt = sched["order"].shape
    waves = int(sched["wave"].max()) + 1
    cmap = plt.get_cmap("tab20")
    color = lambda w: cmap((2 * w + 1) % 20 if waves <= 10 else w % 20)  # noqa: E731 - light shades first
    for i in range(mt):
        for j in range(nt):
            ax.add_patch(plt.Rectangle((j * cta_n, i * cta_m), cta_n, cta_m, facecolor=color(sched["wave"][i, j]),
                                       edgecolor="white", linewidth=0.5))
            if mt * nt <= 160:
                ax.text(j * cta_n + cta_n / 2, i * cta_m + cta_m / 2, str(sched["order"][i, j]), ha="center",
                        va="center", fontsize=6, color="black")
    if waves <= 8:
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, facecolor=color(w)) for w in range(waves)],
                  labels=[f"wave {w}" for w in range(waves)], fontsize="x-small", loc="lower right",
                  framealpha=0.9)
    if nt * cta_n > n:
        ax.add_patch(plt.Rectangle((n, 0), nt * cta_n - n, mt * cta_m, fill=False, hatch="//", edgecolor="red"))
    if mt * cta_m > m:
        ax.add_patch(plt.Rectangle((0, m), nt * cta_n, mt * cta_m - m, fill=False, hatch="//", edgecolor="red"))
    ax.set_xlim(0, nt * cta_n)
    ax.set_ylim(mt * cta_m, 0)
    ax.set_xlabel("N")
    ax.set_ylabel("M")
    ax.set_aspect("auto")
    ax.set_title(title or f"CTA {cta_m}x{cta_n}: {mt * nt} tiles, {waves} wave(s) on {num_sms} SMs")
    return ax


def plot_smem_budget(budgets: Mapping[str, Mapping[str, Any]], ax=None, *, title: str | None = None):
    """Stacked bars (operand ring + epilogue, KiB) per config label, with the shared-memory limit."""
    ax = _axes(ax)
    labels = list(budgets)
    ops = np.array([budgets[k]["operands"] for k in labels]) / 1024
    epi = np.array([budgets[k]["epilogue"] for k in labels]) / 1024
    xs = np.arange(len(labels))
    ax.bar(xs, ops, label="operand stages")
    ax.bar(xs, epi, bottom=ops, label="epilogue tile(s)")
    limit = next(iter(budgets.values()))["limit"] / 1024 if budgets else SMEM_LIMIT_BYTES / 1024
    ax.axhline(limit, color="red", linestyle="--", label=f"limit {limit:.0f} KiB")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("shared memory (KiB)")
    ax.set_title(title or "Shared memory per CTA")
    ax.legend(fontsize="small")
    return ax


__all__ = [
    "FORMATS", "GRANULARITIES", "make_config", "make_activations", "make_weight", "quantize_for", "float_reference",
    "quantized_output", "quantization_error", "error_matrix", "error_sweep", "roundtrip", "row_rel_err",
    "describe_params", "explain_rows",
    "REQUIRED_KEYS", "DTYPE_BYTES", "find_results_dir", "load_benchmark_results", "shapes_of", "series",
    "DeviceSpec", "DEVICE_SPECS", "device_spec", "gemm_flops", "gemm_bytes", "arithmetic_intensity",
    "roofline_tflops", "speedups", "geomean", "time_call", "live_benchmark",
    "SMEM_LIMIT_BYTES", "NUM_SMS", "smem_budget", "smem_budget_for", "tile_stats", "planar_snake", "tile_schedule",
    "format_table",
    "plot_bars", "plot_lines", "plot_histograms", "plot_tflops_vs_m", "plot_roofline", "plot_tile_schedule",
    "plot_smem_budget",
]
