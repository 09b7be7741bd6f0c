"""GEMM-benchmark rows for the torch bridge: ``QuantLinear(x)`` vs the same qlin kernel called from JAX.

    from qlin_torch_bridge.bench import bridge_rows
    rows = bridge_rows([(16, 4096, 4096), (4096, 14336, 4096)])     # cuda if torch sees a GPU, else cpu

Two rows per (dtype, M, N, K), in ``qlin bench``'s row format (``impl, dtype, M, N, K, us, tflops,
rel_err, device``):

* ``qlin:torch_bridge`` -- a :class:`~qlin_torch_bridge.QuantLinear` (per-channel weights, dynamic
  per-token activations, bf16 in and out) called on a torch tensor; torch tensor out.
* ``qlin:jax_same_kernel`` -- the layer's own jitted callable (``state.call(state.leaves, x, bias)``,
  same kernel, same processed params) called from JAX on the same arrays.

``us``: wall-clock per call of ``reps`` back-to-back calls then one sync, median of ``trials``
interleaved trials (host overhead counts, as in a model). ``rel_err``: relative L2 error of the bridge's
output against the JAX call's (the same kernel: 0 expected). The bridge row also carries
``overhead_vs_jax`` (``us / jax_us - 1``; target <= 0.05), ``host_us`` (host time per call to enqueue),
``kernel`` and ``route`` (``direct`` where the layer launches its Mosaic GPU kernels from torch, see
:mod:`qlin_torch_bridge.direct`; else ``jax``). ``qlin bench --bridge`` adds these rows to the GEMM
benchmark for its cases. A case that fails gives a row with ``error`` instead of ``us``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import torch

import qlin
from qlin_torch_bridge.dlpack import to_jax, to_torch
from qlin_torch_bridge.linear import QuantLinear

__all__ = ["bridge_rows", "CONFIGS", "time_calls"]

#: dtype name -> the layer config the rows use
CONFIGS = {"fp8": qlin.FP8ScaledMMConfig(), "int8": qlin.Int8ScaledMMConfig()}


def time_calls(fn, sync, reps: int) -> tuple[float, float]:
    """(wall us per call, host us per call): ``reps`` back-to-back calls then one ``sync``."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t2 - t0) / reps * 1e6, (t1 - t0) / reps * 1e6


def _case(dtype: str, m: int, n: int, k: int, device: str, reps: int, trials: int, kernel: str | None) -> list[dict]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
    q = QuantLinear.from_linear(lin, CONFIGS[dtype], kernel=kernel)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    st = q._qlin_state
    xj, bj = to_jax(x), to_jax(q.bias)
    last: dict = {}

    def bridge():
        last["b"] = q(x)

    def same_kernel():
        last["j"] = st.call(st.leaves, xj, bj)

    sync_b = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync_j = lambda: last["j"].block_until_ready()  # noqa: E731
    with torch.no_grad():
        for fn, sync in ((bridge, sync_b), (same_kernel, sync_j)):
            fn(); fn(); sync()  # compile, caches
        samples: dict[str, list] = {"b": [], "j": []}
        for _ in range(trials):
            samples["b"].append(time_calls(bridge, sync_b, reps))
            samples["j"].append(time_calls(same_kernel, sync_j, reps))
        yb, yj = q(x).float(), to_torch(st.call(st.leaves, xj, bj)).float()
    err = float(torch.linalg.norm(yb - yj) / torch.linalg.norm(yj).clamp_min(1e-30))
    us_b, host_b = statistics.median(w for w, _ in samples["b"]), statistics.median(h for _, h in samples["b"])
    us_j, host_j = statistics.median(w for w, _ in samples["j"]), statistics.median(h for _, h in samples["j"])
    dev = torch.cuda.get_device_name() if device == "cuda" else jax.devices("cpu")[0].device_kind
    common = {"dtype": dtype, "M": m, "N": n, "K": k, "rel_err": err, "device": dev, "kernel": q.kernel.name,
              "timer": "wall", "route": "direct" if st.direct is not None else "jax"}
    flop = 2 * m * n * k
    return [
        {"impl": "qlin:torch_bridge", **common, "us": round(us_b, 2), "tflops": round(flop / us_b / 1e6, 2),
         "overhead_vs_jax": round(us_b / us_j - 1, 4), "host_us": round(host_b, 2)},
        {"impl": "qlin:jax_same_kernel", **common, "us": round(us_j, 2), "tflops": round(flop / us_j / 1e6, 2),
         "host_us": round(host_j, 2)},
    ]


def bridge_rows(shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[str] = ("fp8", "int8"), *,
                reps: int = 30, trials: int = 5, device: str | None = None, kernel: str | None = None) -> list[dict]:
    """Bridge and same-kernel JAX rows for every ``(M, N, K)`` in ``shapes`` and dtype in ``dtypes``.

    ``device``: ``"cuda"`` or ``"cpu"`` (default: cuda when torch sees a GPU). ``kernel`` forces a qlin
    kernel by name. A failing case yields ``error`` rows and the others still run.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    for m, n, k in shapes:
        for dtype in dtypes:
            try:
                rows += _case(dtype, m, n, k, device, reps, trials, kernel)
            except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
                for impl in ("qlin:torch_bridge", "qlin:jax_same_kernel"):
                    rows.append({"impl": impl, "dtype": dtype, "M": m, "N": n, "K": k, "us": None, "tflops": None,
                                 "rel_err": None, "device": device, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows
