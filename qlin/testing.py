"""Test oracles shared by qlin's tests, notebooks and GPU checks.

:func:`reference_linear_np` recomputes a quantized linear layer in float64
NumPy from the 8-bit operands, independently of every jnp kernel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from qlin.config import ScaledMMConfig
from qlin.params import Params
from qlin.quantize import activation_granularity, quantize_activation


def _expand_weight_scale_np(s: np.ndarray, config: ScaledMMConfig, n: int, k: int) -> np.ndarray:
    g = config.weight_granularity
    if g == "per_tensor":
        return np.full((n, k), float(s.reshape(())))
    if g == "per_channel":
        return np.broadcast_to(s.reshape(n, 1), (n, k))
    bn, bk = g
    return np.repeat(np.repeat(s, bn, axis=0), bk, axis=1)[:n, :k]


def reference_linear_np(x, params: Params, config: ScaledMMConfig, bias=None) -> np.ndarray:
    """float64 ``x @ W^T + bias`` from the quantized operands (activation quantized with qlin's math)."""
    x = np.asarray(x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    q, s, zp = quantize_activation(x2, params, config)
    q = np.asarray(q).astype(np.float64)
    s = np.asarray(s, np.float64)
    per_group = activation_granularity(config) == "per_group"
    if zp is not None:
        zp = np.asarray(zp, np.float64)
        q = q - (np.repeat(zp, config.group_size, axis=-1)[:, :k] if per_group else zp)
    if per_group:
        s = np.repeat(s, config.group_size, axis=-1)[:, :k]
    xd = q * s
    w = np.asarray(params.weight).astype(np.float64)
    n_, k_ = w.shape
    wd = w * _expand_weight_scale_np(np.asarray(params.weight_scale, np.float64), config, n_, k_)
    y = xd @ wd[:, :k].T
    y = y[:, : params.n]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.reshape(*lead, params.n)


#: The repository root (benchmarks/, examples/ and notebooks/ hold scripts the tests import).
REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str | None = None) -> ModuleType:
    """Import a script that is not part of a package (e.g. ``"benchmarks/gpu_check.py"``) by its path."""
    path = REPO_ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
