"""Fused dynamic activation quantization in Pallas Mosaic GPU (Hopper, sm90).

One kernel reads ``x`` (M, K) (bfloat16 / float16 / float32) from HBM exactly
once and writes the 8-bit ``x_q`` (M, K) plus its float32 scales (and int32
zero points for asymmetric int8):

* ``granularity="per_token"``: scales (M, 1); fp8 optionally capped by
  ``scale_ub`` (vLLM's ``input_scale_ub``).
* ``granularity="per_group"``: scales (M, ceil(K / group_size)), 1 x group_size
  groups along K (DeepSeek-V3 style activations use 128).
* int8 ``symmetric=False``: asymmetric per-token / per-group quantization with
  int32 zero points; the range always includes 0.

The math is *exactly* :func:`qlin.quantize.quantize_fp8` /
:func:`qlin.quantize.quantize_int8` as XLA compiles them (same eps,
round-half-to-even, saturation before the fp8 cast), so ``x_q`` and the scales
are bit-identical to the jnp path. Note on division (_MATH_NOTE): XLA's algebraic
simplifier rewrites ``a / constant`` into ``a * (1 / constant)`` and
``x / broadcast(s)`` into ``x * broadcast(1 / s)``; neither is exact (1/448,
1/127, 1/255 are not powers of two), so the jnp path really computes
``s = max(amax, eps) * fl(1/qmax)`` and, per token, ``q = x * fl(1/s)``. Per
group the jnp path divides by ``repeat(s)``, which XLA keeps as an IEEE
division. The kernel spells out exactly those operations (ties of
round-half-even would otherwise differ).

Design (memory-bound pass; the target is HBM copy bandwidth):

* x is viewed as (M, NC, W): each row is NC chunks of W (<= 256) columns, so one
  TMA copy moves a whole row (TMA boxes are at most 256 per dimension).
* A persistent grid (a few CTAs per SM, one warpgroup each) walks the rows
  ``pid, pid + G, ...``; every row is prefetched by TMA ``stages - 1`` rows
  ahead into a ring of shared-memory slots, so HBM reads stream while the
  warpgroup computes.
* Per row the warpgroup reads the slot twice from shared memory (absmax /
  min-max, then quantize); per-group rows need only one pass (each group is a
  chunk row held by one warp). The register layout puts one chunk row per
  warp and 32 lanes x W/32 contiguous elements along it, so shared-memory
  accesses are 16-byte vectors and the row reduction is a warp shuffle (plus
  one cross-warp step for per-token).
* ``store="direct"`` (default on jax 0.11): ``x_q`` and per-group scales / zero points go
  from registers straight to global memory (each warp writes 32 contiguous
  vectors: coalesced), which leaves all shared memory to the input ring.
  ``store="tma"``: they are staged in double-buffered shared-memory tiles and
  written by TMA (the default from jax 0.12, and for asymmetric per-token int8 at
  K >= 8192, where it measured faster; :func:`default_store`). Per-token
  scales / zero points are always one scalar store per row.
* The ``division`` switch and ``is_supported`` (sm90+) are described at their
  definitions; :func:`fused_quantize_activation` is the drop-in for
  :func:`qlin.quantize.quantize_activation`.
* Any M works (one row per pipeline step; there are no partial row blocks).
  K must be a multiple of 16 (TMA's 16-byte row strides for the 8-bit output);
  K that is not a multiple of 4 * W (or of 4 * group_size) is zero-padded by
  XLA first, which is exact (zeros change neither absmax nor the min/max range,
  which includes 0 anyway) but costs an extra copy; those padded shapes are
  correct but not at copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa

from qlin.errors import InputError
from qlin.kernels.mosaic_gpu_scaled_mm import tma_row_len
from qlin.quantize import INT8_QMAX, INT8_QMIN, SCALE_EPS, fp8_dtype, fp8_max

__all__ = [
    "quantize_rows",
    "fused_quantize_activation",
    "can_fuse",
    "is_supported",
    "plan",
    "QuantizePlan",
    "SUPPORTED_IN_DTYPES",
    "SUPPORTED_GROUP_SIZES",
]

SUPPORTED_IN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
#: group sizes the per-group kernel handles (one group = one warp-row of W = group_size columns).
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
_CHUNK_WIDTHS = (256, 128, 64, 32)
_WARPS = 4
#: Hopper shared memory: 227 KiB per CTA at most, 228 KiB per SM (1 KiB of each CTA's is reserved by
#: the system). Keep headroom for Pallas' barriers and its reduction scratch (2 KiB by default).
_SMEM_PER_CTA_MAX = 227 * 1024
_SMEM_PER_SM_USABLE = 220 * 1024
_SMEM_RESERVED = 3 * 1024
_MAX_CTAS_PER_SM = 8
#: Elements of one register sub-chunk (per warpgroup): 16 f32 values per thread.
_SUBCHUNK_ELEMS = 2048
H100_NUM_SMS = 132


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


#: "direct" stores were measured on an H100 with jax 0.11.2 (0.90-0.97 of copy bandwidth, like "tma").
#: jax 0.12's Mosaic GPU lowering rejects some direct-store shapes (transfers narrower than 4 bytes or
#: not whole 32-byte sectors), so from 0.12 on the default is the TMA store, which lowers there.
DEFAULT_STORE = "direct" if jax.__version_info__ < (0, 12) else "tma"
#: Asymmetric per-token int8 from this K on takes the TMA store even where DEFAULT_STORE is "direct":
#: H100 (jax 0.11.2, same run, fraction of copy bandwidth): 1000 x 14336 0.87 vs 0.79 direct, 4096 x 14336
#: 0.93 vs 0.88; at K = 4096 direct stays ahead (1000 x 4096: 0.92 vs 0.87).  Both stores are checked bit
#: for bit against the jnp path on the GPU (benchmarks/results/h100_quantize_int8_tma.json).
TMA_STORE_MIN_K_INT8_ASYM = 8192


def default_store(k: int, granularity: str, symmetric: bool = True) -> str:
    """The store a plan gets when none is asked for (see DEFAULT_STORE, TMA_STORE_MIN_K_INT8_ASYM)."""
    if DEFAULT_STORE == "direct" and granularity == "per_token" and not symmetric and k >= TMA_STORE_MIN_K_INT8_ASYM:
        return "tma"
    return DEFAULT_STORE


@dataclasses.dataclass(frozen=True)
class QuantizePlan:
    """Static shape plan of one kernel instance (see :func:`plan`)."""

    m: int
    k: int
    k_padded: int  # K after zero padding (multiple of 4 * width)
    width: int  # W: columns per chunk row (= group_size for per-group)
    chunks: int  # NC = k_padded // width
    subchunk: int  # chunk rows per register sub-chunk (multiple of 4, divides NC)
    stages: int  # input shared-memory slots (TMA prefetch depth + 1)
    grid: int  # persistent CTAs
    store: str = "direct"  # "direct": q / scales from registers to HBM; "tma": via shared memory + TMA

    def smem_bytes(self, in_itemsize: int, per_group: bool, asym: bool) -> int:
        x = self.stages * self.k_padded * in_itemsize
        if self.store == "direct":
            return x + 1024
        q = 2 * self.k_padded
        s = 2 * tma_row_len(self.chunks, jnp.float32) * 4 * (2 if asym else 1) if per_group else 0
        return x + q + s + 1024


def _num_sms() -> int:
    try:
        dev = jax.devices("gpu")[0]
        n = getattr(dev, "core_count", None)
        if n:
            return int(n)
    except RuntimeError:
        pass
    return H100_NUM_SMS


def plan(
    m: int,
    k: int,
    in_dtype,
    *,
    granularity: str,
    group_size: int | None = None,
    symmetric: bool = True,
    max_ctas: int | None = None,
    stages: int | None = None,
    store: str | None = None,
) -> QuantizePlan:
    """Choose chunk width, padding, pipeline depth and grid for an (m, k) input.

    Raises :class:`InputError` (naming the argument) for shapes the kernel cannot take.
    """
    in_size = jnp.dtype(in_dtype).itemsize
    per_group = granularity == "per_group"
    if per_group:
        width = group_size
        k_padded = _round_up(k, _WARPS * width)
    else:
        k_padded = _round_up(k, _WARPS * _CHUNK_WIDTHS[-1])
        width = next(w for w in _CHUNK_WIDTHS if k_padded % (_WARPS * w) == 0)
    chunks = k_padded // width
    if chunks > 256:
        raise InputError(
            f"x: K={k} is too large for one TMA row copy ({chunks} chunks of {width} > 256); "
            f"the fused quantization kernel supports K <= {256 * width}"
        )
    sub = _WARPS
    for cand in range(_WARPS, chunks + 1, _WARPS):
        if chunks % cand == 0 and cand * width <= _SUBCHUNK_ELEMS:
            sub = cand
    if store is None:
        store = default_store(k, granularity, symmetric)
    if store not in ("direct", "tma"):
        raise InputError(f"store: expected 'direct' or 'tma', got {store!r}")
    probe = QuantizePlan(m, k, k_padded, width, chunks, sub, 2, 1, store)
    asym = not symmetric

    def footprint(n_stages: int) -> int:
        return dataclasses.replace(probe, stages=n_stages).smem_bytes(in_size, per_group, asym) + _SMEM_RESERVED

    if stages is None:
        # Most CTAs per SM first, then the deepest prefetch that keeps that many: each CTA is one
        # warpgroup whose per-row reductions stall it, and other CTAs fill those stalls better than
        # deeper prefetch does. H100, fp8 per-token, M = K = 4096: 2-4 stages (8-6 CTAs per SM)
        # 18.8-19.1 us, 8 stages (3 CTAs, the old rows-in-flight rule's choice) 20.1 us; K = 14336:
        # 2 stages (3 CTAs) 63.0 us, 3 (2 CTAs) 63.5.
        best = None
        for cand in range(2, 9):
            per_sm = min(_MAX_CTAS_PER_SM, _SMEM_PER_SM_USABLE // footprint(cand))
            if per_sm < 1:
                break
            if best is None or (per_sm, cand) > best[0]:
                best = ((per_sm, cand), cand)
        stages = best[1] if best else 2
    if stages < 2:
        raise InputError(f"stages: expected >= 2, got {stages}")
    probe = dataclasses.replace(probe, stages=stages)
    smem = footprint(stages)
    if smem > _SMEM_PER_CTA_MAX:
        raise InputError(
            f"x: K={k} with dtype {jnp.dtype(in_dtype).name} needs {smem} bytes of shared memory per CTA "
            f"(> {_SMEM_PER_CTA_MAX}); the fused quantization kernel supports smaller K"
        )
    per_sm = max(1, min(_MAX_CTAS_PER_SM, _SMEM_PER_SM_USABLE // smem))
    grid = min(m, _num_sms() * per_sm)
    if max_ctas is not None:
        grid = max(1, min(grid, int(max_ctas)))
    return dataclasses.replace(probe, grid=grid)


def _row_layout(width: int, in_itemsize: int):
    """One chunk row (W columns) per warp; lanes hold contiguous vectors of at most 16 bytes.

    W/32 <= 16 bytes: 32 lanes x W/32 elements. Wider (f32 rows of 256): each lane
    holds several 16-byte vectors, 32 * vec columns apart.
    """
    vec = min(width // 32, 16 // in_itemsize)
    if vec == width // 32:
        tiling = mgpu_fa.Tiling(((_WARPS, width), (vec,)))
        return plgpu.Layout.TILED(tiling, warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)
    tiling = mgpu_fa.Tiling(((_WARPS, width), (32 * vec,), (vec,)))
    return plgpu.Layout.TILED(tiling, warp_dims=(-4,), lane_dims=(-2,), vector_dim=-1)


def _check_args(x, kind, granularity, group_size, scale_ub, symmetric, fp8_format, division="xla"):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in SUPPORTED_IN_DTYPES:
        raise InputError(f"x: expected a bfloat16/float16/float32 array, got dtype {jnp.dtype(x.dtype).name}")
    if x.ndim != 2:
        raise InputError(f"x: expected shape (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    if m < 1 or k < 1:
        raise InputError(f"x: expected a non-empty (M, K) array, got shape {tuple(x.shape)}")
    if k % 16:
        raise InputError(f"x: K={k} must be a multiple of 16 (16-byte rows of the 8-bit output for TMA)")
    if kind not in ("fp8", "int8"):
        raise InputError(f"kind: expected 'fp8' or 'int8', got {kind!r}")
    if granularity not in ("per_token", "per_group"):
        raise InputError(
            f"granularity: expected 'per_token' or 'per_group' (per-tensor and static scales are not fused), "
            f"got {granularity!r}"
        )
    if granularity == "per_group":
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
            raise InputError(f"group_size: per_group quantization needs an int group_size, got {group_size!r}")
        if int(group_size) not in SUPPORTED_GROUP_SIZES:
            raise InputError(f"group_size: the fused kernel supports {SUPPORTED_GROUP_SIZES}, got {group_size}")
    elif group_size is not None:
        raise InputError(f"group_size: only used with granularity='per_group', got {group_size!r}")
    if scale_ub is not None:
        if kind != "fp8" or granularity != "per_token":
            raise InputError(
                f"scale_ub: only applies to fp8 dynamic per-token quantization (kind={kind!r}, "
                f"granularity={granularity!r})"
            )
        ub = jnp.asarray(scale_ub, jnp.float32)
        if ub.size != 1:
            raise InputError(f"scale_ub: expected a scalar, got shape {ub.shape}")
        if not isinstance(ub, jax.core.Tracer):
            v = float(ub.reshape(()))
            if not np.isfinite(v) or v <= 0:
                raise InputError(f"scale_ub: must be finite and > 0, got {v}")
    if not isinstance(symmetric, (bool, np.bool_)):
        raise InputError(f"symmetric: expected a bool, got {symmetric!r}")
    if division not in ("xla", "ieee"):
        raise InputError(f"division: expected 'xla' or 'ieee', got {division!r}")
    if not symmetric and kind != "int8":
        raise InputError("symmetric: asymmetric (symmetric=False) quantization is int8-only; fp8 is symmetric")
    if kind == "fp8":
        fp8_dtype(fp8_format)  # raises InputError naming fp8_format
    return x


def _build(p: QuantizePlan, in_dtype, *, kind, per_group, has_ub, symmetric, fp8_format, interpret,
           division="xla", rows_out=None):
    """Build the plgpu.kernel for a plan; returns ``f(x3, [ub]) -> (q3, s, [zp])``."""
    m, nc, w, sub, stages, grid = p.m, p.chunks, p.width, p.subchunk, p.stages, p.grid
    layout = _row_layout(w, jnp.dtype(in_dtype).itemsize)
    if kind == "fp8":
        q_dtype = fp8_dtype(fp8_format)
        qmax = fp8_max(fp8_format)
    else:
        q_dtype = jnp.dtype(jnp.int8)
        qmax = float(INT8_QMAX)
    asym = not symmetric
    n_sub = nc // sub
    # XLA folds ``a / c`` for a constant c into ``a * (1 / c)`` (not exact for 448, 127, 255).
    xla_div = division == "xla"
    inv_qmax = float(np.float32(1.0) / np.float32(qmax))
    inv_range = float(np.float32(1.0) / np.float32(INT8_QMAX - INT8_QMIN))

    def scale_of(a, n_levels_inv, n_levels):
        # a / constant, as XLA compiles it ("xla") or as written ("ieee").
        return a * n_levels_inv if xla_div else a / n_levels
    q_slots = 2

    def quantize(v, s, zpf):
        """v f32 (sub, W) -> 8-bit, exactly as XLA compiles qlin.quantize (see _MATH_NOTE).

        Per-token ``s`` is a scalar: XLA turns ``x / broadcast(s)`` into
        ``x * broadcast(1 / s)``, so do that. Per-group ``s`` is (sub,): the jnp path
        divides by ``repeat(s)``, which XLA keeps as an IEEE division; the
        optimization barrier keeps interpret mode (which runs through XLA) from
        applying that rewrite to our explicit broadcast.
        """
        if per_group:
            y = v / lax.optimization_barrier(jnp.broadcast_to(s[:, None], v.shape))
        else:
            y = v * (1.0 / s) if xla_div else v / s
        if kind == "fp8":
            return jnp.clip(y, -qmax, qmax).astype(q_dtype)
        y = jnp.round(y)
        if asym:
            y = y + zpf
        return jnp.clip(y, float(INT8_QMIN), float(INT8_QMAX)).astype(jnp.int8)

    def asym_params(xmin, xmax):
        xmax = jnp.maximum(xmax, 0.0)
        xmin = jnp.minimum(xmin, 0.0)
        s = scale_of(jnp.maximum(xmax - xmin, SCALE_EPS), inv_range, float(INT8_QMAX - INT8_QMIN))
        zpf = jnp.clip(jnp.round(float(INT8_QMIN) - xmin / s), float(INT8_QMIN), float(INT8_QMAX))
        return s, zpf

    # rows_out > m: outputs with extra rows the kernel never writes (see quantize_rows).
    mo = m if rows_out is None else rows_out
    out_types = [jax.ShapeDtypeStruct((mo, nc, w), q_dtype)]
    if per_group:
        out_types.append(jax.ShapeDtypeStruct((mo, nc), jnp.float32))
        if asym:
            out_types.append(jax.ShapeDtypeStruct((mo, nc), jnp.int32))
    else:
        out_types.append(jax.ShapeDtypeStruct((mo,), jnp.float32))
        if asym:
            out_types.append(jax.ShapeDtypeStruct((mo,), jnp.int32))
    n_out = len(out_types)

    tma_store = p.store == "tma"
    scratch = [plgpu.SMEM((stages, nc, w), in_dtype)]
    if tma_store:
        scratch.append(plgpu.SMEM((q_slots, nc, w), q_dtype))
        if per_group:
            # Slots padded to TMA's 128-byte grid (nc f32 scales are 64 bytes at K = 2048, group 128).
            scratch.append(plgpu.SMEM((q_slots, tma_row_len(nc, jnp.float32)), jnp.float32))
            if asym:
                scratch.append(plgpu.SMEM((q_slots, tma_row_len(nc, jnp.int32)), jnp.int32))
    scratch.append(plgpu.Barrier(num_barriers=stages))
    copies_per_row = 1 + (1 + asym if per_group else 0)

    def body(*refs):
        n_in = 1 + has_ub
        x_gmem = refs[0]
        ub_gmem = refs[1] if has_ub else None
        outs = refs[n_in:n_in + n_out]
        q_gmem, s_gmem = outs[0], outs[1]
        zp_gmem = outs[2] if asym else None
        sc = list(refs[n_in + n_out:])
        x_smem = sc[0]
        if tma_store:
            q_smem = sc[1]
            s_smem = sc[2] if per_group else None
            zp_smem = sc[3] if (per_group and asym) else None
        bars = sc[-1]

        pid = lax.axis_index("rows")
        n_rows = (m - pid + grid - 1) // grid  # rows pid, pid + grid, ... < m

        def fetch(i):
            slot = i % stages
            plgpu.copy_gmem_to_smem(x_gmem.at[pid + i * grid], x_smem.at[slot], bars.at[slot])

        for j in range(stages - 1):
            @pl.when(j < n_rows)
            def _prologue():
                fetch(j)

        def step(i, carry):
            row = pid + i * grid
            slot = i % stages
            qs = i % q_slots

            @pl.when(i + stages - 1 < n_rows)
            def _prefetch():
                fetch(i + stages - 1)

            plgpu.barrier_wait(bars.at[slot])
            xs = x_smem.at[slot]
            # Destinations: shared-memory tiles stored by TMA, or this row of global memory directly.
            qd = q_smem.at[qs] if tma_store else q_gmem.at[row]
            sd = (s_smem.at[qs, pl.ds(0, nc)] if tma_store else s_gmem.at[row]) if per_group else None
            zd = (zp_smem.at[qs, pl.ds(0, nc)] if tma_store else zp_gmem.at[row]) if (per_group and asym) else None

            def load(c):
                return plgpu.load(xs.at[pl.ds(c * sub, sub)], layout=layout).astype(jnp.float32)

            def store_q(c, q):
                qd[pl.ds(c * sub, sub), :] = q

            if per_group:
                for c in range(n_sub):
                    v = load(c)
                    if asym:
                        s, zpf = asym_params(jnp.min(v, axis=1), jnp.max(v, axis=1))
                        store_q(c, quantize(v, s, zpf[:, None]))
                        zd[pl.ds(c * sub, sub)] = zpf.astype(jnp.int32)
                    else:
                        s = scale_of(jnp.maximum(jnp.max(jnp.abs(v), axis=1), SCALE_EPS), inv_qmax, qmax)
                        store_q(c, quantize(v, s, None))
                    sd[pl.ds(c * sub, sub)] = s
            else:
                hi = lo = None
                for c in range(n_sub):
                    v = load(c)
                    if asym:
                        hi = v if hi is None else jnp.maximum(hi, v)
                        lo = v if lo is None else jnp.minimum(lo, v)
                    else:
                        a = jnp.abs(v)
                        hi = a if hi is None else jnp.maximum(hi, a)
                if asym:
                    xmax = jnp.max(jnp.max(hi, axis=1), axis=0)
                    xmin = jnp.min(jnp.min(lo, axis=1), axis=0)
                    s, zpf = asym_params(xmin, xmax)
                else:
                    amax = jnp.max(jnp.max(hi, axis=1), axis=0)
                    if has_ub:
                        amax = jnp.minimum(amax, ub_gmem[0])
                    s = scale_of(jnp.maximum(amax, SCALE_EPS), inv_qmax, qmax)
                    zpf = None
                for c in range(n_sub):
                    store_q(c, quantize(load(c), s, zpf))
                s_gmem[row] = s
                if asym:
                    zp_gmem[row] = zpf.astype(jnp.int32)

            # Fence + warpgroup barrier: every thread's reads of this x slot (generic proxy) are
            # done before the TMA (async proxy) refills it, and q tiles are visible to TMA.
            plgpu.commit_smem()
            if tma_store:
                plgpu.copy_smem_to_gmem(qd, q_gmem.at[row])
                if per_group:
                    plgpu.copy_smem_to_gmem(sd, s_gmem.at[row])
                    if asym:
                        plgpu.copy_smem_to_gmem(zd, zp_gmem.at[row])
                # The other q slot (used by the next row) must be read out by TMA.
                plgpu.wait_smem_to_gmem(copies_per_row, wait_read_only=True)
            return carry

        lax.fori_loop(0, n_rows, step, None)
        if tma_store:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kwargs = {}
    if interpret:
        kwargs["interpret"] = interpret if isinstance(interpret, plgpu.InterpretGPUParams) else plgpu.InterpretGPUParams()
    # Pallas brackets every ref store with warpgroup barriers by default. The direct-store
    # kernel needs none of them: its only shared-memory hazards are the TMA refill of an x slot
    # (ordered by commit_smem's fence + barrier) and the cross-warp reductions (which carry
    # their own barriers); its stores go to global memory. The TMA-store kernel keeps them
    # (q tiles are rewritten after a single thread waited for the previous TMA store).
    params = plgpu.CompilerParams(unsafe_no_auto_barriers=not tma_store)
    return plgpu.kernel(
        body,
        out_type=tuple(out_types),
        scratch_types=tuple(scratch),
        grid=(grid,),
        grid_names=("rows",),
        compiler_params=params,
        **kwargs,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "kind", "granularity", "group_size", "symmetric", "fp8_format", "interpret", "max_ctas", "stages",
        "has_ub", "store", "division", "rows_out",
    ),
)
def _quantize_rows_jit(x, ub, *, kind, granularity, group_size, symmetric, fp8_format, interpret, max_ctas, stages,
                       has_ub, store, division, rows_out=None):
    m, k = x.shape
    per_group = granularity == "per_group"
    p = plan(m, k, x.dtype, granularity=granularity, group_size=group_size, symmetric=symmetric,
             max_ctas=max_ctas, stages=stages, store=store)
    if p.k_padded != k:
        x = jnp.pad(x, ((0, 0), (0, p.k_padded - k)))
    x3 = x.reshape(m, p.chunks, p.width)
    fn = _build(p, x.dtype, kind=kind, per_group=per_group, has_ub=has_ub, symmetric=symmetric,
                fp8_format=fp8_format, interpret=interpret, division=division, rows_out=rows_out)
    args = (x3, ub.reshape(1)) if has_ub else (x3,)
    outs = fn(*args)
    mo = m if rows_out is None else rows_out
    q = outs[0].reshape(mo, p.k_padded)
    if p.k_padded != k:
        q = q[:, :k]
    if per_group:
        groups = _cdiv(k, group_size)
        s = outs[1][:, :groups]
        zp = outs[2][:, :groups] if not symmetric else None
    else:
        s = outs[1].reshape(mo, 1)
        zp = outs[2].reshape(mo, 1) if not symmetric else None
    return q, s, zp


def quantize_rows(
    x,
    *,
    kind: str,
    granularity: str = "per_token",
    group_size: int | None = None,
    scale_ub=None,
    symmetric: bool = True,
    fp8_format: str = "e4m3fn",
    interpret=False,
    max_ctas: int | None = None,
    stages: int | None = None,
    store: str | None = None,
    division: str = "xla",
    rows_out: int | None = None,
):
    """Quantize the rows of ``x`` (M, K) in one fused Mosaic GPU pass.

    Args:
      x: (M, K) bfloat16 / float16 / float32; K a multiple of 16.
      kind: "fp8" (``fp8_format``, saturating at +-max) or "int8".
      granularity: "per_token" (scales (M, 1)) or "per_group" (scales (M, ceil(K / group_size))).
      group_size: per-group width, one of :data:`SUPPORTED_GROUP_SIZES`.
      scale_ub: fp8 per-token only: caps each row's absmax before the scale (float32 scalar).
      symmetric: int8 only; False adds int32 zero points (same shape as the scales).
      interpret: run in Mosaic GPU interpret mode (CPU): True, or a ``plgpu.InterpretGPUParams``
        (e.g. ``detect_races=True``).
      max_ctas, stages: tuning / testing overrides of the persistent grid size and pipeline depth.
      store: "direct" (q and per-group scales go from registers straight to global memory) or
        "tma" (staged in shared memory and written by TMA; uses more shared memory); None picks
        :func:`default_store` (TMA for asymmetric per-token int8 at long K).
      division: "xla" (default) reproduces the divisions of the jnp path as XLA compiles them
        (``a / const -> a * fl(1/const)``, per token ``x / s -> x * fl(1/s)``; see the module
        docstring); "ieee" divides as written. Only the GPU check uses "ieee", to tell which
        one a GPU's XLA build matches.
      rows_out: give the outputs this many rows (>= M). Rows M.. are allocated but NEVER
        written (arbitrary bits, possibly NaN): for a consumer that needs whole 8-row TMA tiles
        anyway and discards those rows (the scaled matmul at M % 8 != 0), so that no separate
        XLA pad of ``q`` and the scales runs before it.

    Returns:
      ``(q, scale, zero_point)``: exactly what :func:`qlin.quantize.quantize_fp8` /
      :func:`qlin.quantize.quantize_int8` return for the same arguments (``zero_point`` is
      None when symmetric; fp8 returns None there too).
    """
    x = _check_args(x, kind, granularity, group_size, scale_ub, symmetric, fp8_format, division)
    if rows_out is not None:
        if isinstance(rows_out, bool) or not isinstance(rows_out, (int, np.integer)) or rows_out < x.shape[0]:
            raise InputError(f"rows_out: expected an int >= M={x.shape[0]}, got {rows_out!r}")
        rows_out = None if int(rows_out) == x.shape[0] else int(rows_out)
    has_ub = scale_ub is not None
    ub = jnp.asarray(scale_ub, jnp.float32).reshape(()) if has_ub else jnp.zeros((), jnp.float32)
    if store is None:
        store = default_store(x.shape[1], granularity, bool(symmetric))
    plan(x.shape[0], x.shape[1], x.dtype, granularity=granularity,
         group_size=None if group_size is None else int(group_size), symmetric=bool(symmetric),
         max_ctas=max_ctas, stages=stages, store=store)  # shape errors before tracing
    return _quantize_rows_jit(
        x, ub, kind=kind, granularity=granularity, group_size=None if group_size is None else int(group_size),
        symmetric=bool(symmetric), fp8_format=fp8_format,
        interpret=interpret if isinstance(interpret, plgpu.InterpretGPUParams) else bool(interpret), max_ctas=max_ctas,
        stages=stages, has_ub=has_ub, store=store, division=division, rows_out=rows_out,
    )


def is_supported(compute_capability: int | None = None) -> tuple[bool, str | None]:
    """Whether the fused kernel can run on a GPU of this compute capability (90 = H100)."""
    if compute_capability is None:
        from qlin.platform import compute_capability as _cc

        compute_capability = _cc()
    if compute_capability is None:
        return False, "not a CUDA GPU (Mosaic GPU kernels need an NVIDIA Hopper GPU; interpret mode runs on CPU)"
    if compute_capability < 90:
        return False, (
            f"sm{compute_capability}: the kernel uses TMA copies and mbarrier pipelines (sm90+); "
            "before Hopper activation quantization runs as XLA fusions"
        )
    return True, None


def _config_args(config) -> dict | None:
    """quantize_rows keyword arguments for a config, or None when the config is not a fused scheme."""
    from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig

    if config.activation == "dynamic_per_token":
        gran, group = "per_token", None
    elif config.activation == "dynamic_per_group":
        gran, group = "per_group", config.group_size
    else:
        return None
    if isinstance(config, FP8ScaledMMConfig):
        return dict(kind="fp8", granularity=gran, group_size=group, fp8_format=config.fp8_format)
    if isinstance(config, Int8ScaledMMConfig):
        return dict(kind="int8", granularity=gran, group_size=group, symmetric=config.symmetric)
    return None


def can_fuse(x_shape, x_dtype, config) -> tuple[bool, str]:
    """Whether :func:`fused_quantize_activation` runs the kernel for this input (else it uses the jnp path)."""
    args = _config_args(config)
    if args is None:
        return False, (
            f"activation={getattr(config, 'activation', None)!r}: only dynamic per-token / per-group "
            "quantization is fused (static is elementwise and fused by XLA; per-tensor needs a global max first)"
        )
    if jnp.dtype(x_dtype) not in SUPPORTED_IN_DTYPES:
        return False, f"x dtype {jnp.dtype(x_dtype).name} is not bfloat16/float16/float32"
    if len(x_shape) < 1:
        return False, "x is a scalar"
    k = int(x_shape[-1])
    m = math.prod(int(d) for d in x_shape[:-1])
    if m < 1 or k < 1:
        return False, f"x shape {tuple(x_shape)} is empty"
    if k % 16:
        return False, f"K={k} is not a multiple of 16"
    if args["granularity"] == "per_group" and args["group_size"] not in SUPPORTED_GROUP_SIZES:
        return False, f"group_size={args['group_size']} is not one of {SUPPORTED_GROUP_SIZES}"
    if args["granularity"] == "per_group" and not args.get("symmetric", True):
        # Seen on an H100 (jax 0.11.2, benchmarks/gpu_quantize_check.py): XLA's GPU division rounds
        # -xmin/s differently on ~0.4% of groups, so zero points (and q) differ by 1 from the jnp path.
        return False, "asymmetric per-group int8 is not bit-identical to XLA's GPU rounding; using the jnp path"
    try:
        plan(m, k, x_dtype, granularity=args["granularity"], group_size=args["group_size"],
             symmetric=args.get("symmetric", True))
    except InputError as e:
        return False, str(e)
    return True, "ok"


def fused_quantize_activation(x, params, config, *, interpret=False, rows_out=None):
    """Drop-in for :func:`qlin.quantize.quantize_activation` using the fused kernel.

    Returns the same ``(q, scale, zero_point or None)`` with the same shapes
    (``x`` may be ``[..., K]``). Configs or shapes the kernel does not take
    (static or dynamic per-tensor activations, K % 16 != 0, unsupported group
    sizes; see :func:`can_fuse`) go through the jnp path unchanged.

    ``rows_out`` (2-D ``x`` only): when the kernel runs, its outputs get that many rows, the
    ones past M never written (see :func:`quantize_rows`); the jnp path ignores it, so check
    ``q.shape[0]``.
    """
    from qlin.quantize import quantize_activation

    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    ok, _ = can_fuse(x.shape, x.dtype, config)
    if not ok:
        return quantize_activation(x, params, config)
    args = _config_args(config)
    if args["kind"] == "fp8" and args["granularity"] == "per_token":
        ub = getattr(params, "input_scale_ub", None)
        if ub is not None:
            args["scale_ub"] = ub
    if rows_out is not None:
        if x.ndim != 2:
            raise InputError(f"rows_out: only for 2-D x (M, K), got shape {tuple(x.shape)}")
        return quantize_rows(x, interpret=interpret, rows_out=rows_out, **args)
    lead, k = x.shape[:-1], x.shape[-1]
    q, s, zp = quantize_rows(x.reshape(-1, k), interpret=interpret, **args)
    q = q.reshape(*lead, k)
    s = s.reshape(*lead, s.shape[-1]) if lead else s.reshape(s.shape[-1])
    if zp is not None:
        zp = zp.reshape(*lead, zp.shape[-1]) if lead else zp.reshape(zp.shape[-1])
    return q, s, zp
