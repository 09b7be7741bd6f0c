"""Pallas Mosaic GPU (Hopper, sm90) W8A8 scaled matmul with a fused epilogue.

    out[m, n] = a_scale[m] * b_scale[n] * (sum_k a[m, k] b[n, k] - azp[m] * azp_adj[n]) + bias[n]

* ``a`` (M, K) and ``b`` (N, K) are both K-major 8-bit operands (float8_e4m3fn
  or int8).  8-bit ``wgmma`` only accepts K-major B, so B tiles are
  (tile_n, tile_k) and fed to ``wgmma`` as ``b_smem.T``.
* fp8 accumulates in float32, int8 in int32; the asymmetric zero-point
  correction ``azp[m] * azp_adj[n]`` is subtracted in int32 before the
  conversion to float.
* Operand tiles arrive by TMA into 128B-swizzled shared memory through a
  warp-specialized multi-stage pipeline (one producer warpgroup issuing TMA,
  one or two consumer warpgroups issuing ``wgmma``), over a persistent grid
  (one CTA per SM, walking the output tiles in a planar-snake order).
  ``TuningConfig(cluster="m")`` runs the grid as clusters of two CTAs whose
  tiles share the weight tile: each loads half of it and TMA-multicasts it to
  both (half the L2 traffic of the shared operand); the heuristic takes it at
  mid M with long K, and for 64-row tiles at M <= 256 where they make one
  nearly full wave (GPU only: interpret mode runs the same tiles unclustered).
* The per-row / per-column epilogue vectors (scales, bias, zero points) are
  fetched by TMA into shared memory while the main loop runs; the whole
  epilogue is applied in registers and the result is written once through
  shared memory and a TMA store.
* Partial tiles: TMA zero-fills out-of-bounds loads (M, N and K edges) and
  clips out-of-bounds stores, so any M >= 1 and any N work without padding.
  The only constraints are TMA's 16-byte row strides: K % 16 == 0 for the
  8-bit operands and N * itemsize(out_dtype) % 16 == 0 for the output (see
  :func:`required_alignment`).  Where M is at least a CTA tile and not a multiple of it, the last
  row of tiles starts at M - cta_m instead of running past M (:func:`_row_start`; H100, same run:
  1032 x 8192^2 fp8 120.6 -> 115.5 us, int8 112.6 -> 105.0, 2056 x 8192^2 and 4104 x 4096^2 2-4 %).

Small M (decode) uses the same kernel with a 64-row tile, one consumer
warpgroup, a narrow N tile chosen so that the number of output tiles is close
to the number of SMs, and a deep pipeline: at M <= 64 the problem is bound by
streaming the weight, and that layout puts every SM to work streaming a
disjoint slab of ``b`` (see :func:`default_config`).  At M <= 16 the
heuristic mostly swaps the operands (``TuningConfig(swap_ab=True)``): the weight
is the 64-row wgmma A side and the tokens an 8- or 16-wide B side, and the
epilogue stores the transposed tile (split-K: XLA's reduction transposes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = [
    "SUPPORTED_IN_DTYPES",
    "SUPPORTED_OUT_DTYPES",
    "TileConfigBase",
    "TuningConfig",
    "candidate_configs",
    "check_gemm_operands",
    "check_smem",
    "default_config",
    "fit_smem",
    "required_alignment",
    "scaled_mm",
    "smem_bytes",
    "tma_rows",
]

SUPPORTED_IN_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.int8))
SUPPORTED_OUT_DTYPES = (
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.float32),
)
_BIAS_DTYPES = SUPPORTED_OUT_DTYPES
# Hopper: 227 KiB of dynamic shared memory per block.  Keep a little headroom
# for barriers and the compiler's own scratch.
SMEM_LIMIT_BYTES = 227 * 1024
# Measured: the compiler adds ~2 KB (barriers, scratch) to smem_bytes(); an 8-stage
# split-K config 1.9 KB over this estimate was rejected by the Mosaic GPU compiler.
_SMEM_HEADROOM = 2560
H100_NUM_SMS = 132
#: Benchmark-only ablation of the epilogue (benchmarks/ab_gemm.py --ab epilogue), read at trace time:
#: None (the real kernel), "no_store" (no TMA store: the output is never written) or "direct" (the
#: registers stored straight to global memory, no bounds check: full tiles only).  Never set outside
#: that measurement: "no_store" returns garbage, "direct" writes past the edges of partial tiles.
_EPILOGUE_ABLATION: str | None = None
#: Start the last row of CTA tiles at M - cta_m (where M >= cta_m) instead of running past M; off only
#: for benchmarks/ab_gemm.py's A/B of it (see _row_start).
_CLAMP_LAST_TILE_ROW = True
#: TMA (cp.async.bulk.tensor) writes shared memory only at 128-byte aligned addresses; interpret
#: mode and the CUDA lowering do not check it, the hardware faults (CUDA_ERROR_MISALIGNED_ADDRESS).
TMA_SMEM_ALIGN = 128
#: Mosaic GPU tiles every TMA'd GMEM array by 8 rows: M > 8 must be a multiple of 8 (else "dimension 0
#: must have size smaller or a multiple of its tiling 8"); fewer rows are one partial tile, no padding.
TMA_ROW_TILE = 8


class TileConfigBase:
    """What every Mosaic GPU GEMM tuning config here shares (the per-channel and the
    block-scaled kernel): the CTA tile, the short name stem, (de)serialization for the
    tuning cache, and the pipeline / epilogue / grid checks (:meth:`check_layout`)."""

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (self.num_compute_wgs if self.wg_dimension == "m" else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (self.num_compute_wgs if self.wg_dimension == "n" else 1)

    def _short_stem(self) -> str:
        return (
            f"m{self.tile_m}n{self.tile_n}k{self.tile_k}s{self.max_concurrent_steps}"
            f"w{self.num_compute_wgs}{self.wg_dimension}"
            f"g{self.grid_minor_dim}{self.grid_tile_width}"
            f"e{self.epi_tile_m or self.tile_m}x{self.epi_tile_n or self.tile_n}"
            f"x{self.epi_slots}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_layout(self, epi_n_divides: int, max_wgs: int = 2) -> None:
        """Warpgroups (1 .. ``max_wgs``), grid order, pipeline depth and epilogue tiles; ``epi_tile_n``
        must divide ``epi_n_divides`` (the warpgroup tile's width, or a part of it)."""
        c = self
        if c.num_compute_wgs not in range(1, max_wgs + 1):
            raise ValueError(f"config.num_compute_wgs={c.num_compute_wgs} must be " + " or ".join(
                str(v) for v in range(1, max_wgs + 1)))
        if c.wg_dimension not in ("m", "n") or c.grid_minor_dim not in ("m", "n"):
            raise ValueError("config.wg_dimension and config.grid_minor_dim must be 'm' or 'n'")
        if c.grid_tile_width < 1:
            raise ValueError(f"config.grid_tile_width={c.grid_tile_width} must be >= 1")
        if c.epi_slots not in (1, 2):
            raise ValueError(f"config.epi_slots={c.epi_slots} must be 1 or 2")
        if c.max_concurrent_steps < 2:
            raise ValueError("config.max_concurrent_steps must be >= 2")
        epi_m = c.epi_tile_m or c.tile_m
        epi_n = c.epi_tile_n or c.tile_n
        if c.tile_m % epi_m or epi_m % 64:
            raise ValueError(f"config.epi_tile_m={epi_m} must divide tile_m and be a multiple of 64")
        if epi_n_divides % epi_n or epi_n % 8:
            what = "tile_n" if epi_n_divides == c.tile_n else f"min(tile_n, {epi_n_divides})"
            raise ValueError(f"config.epi_tile_n={epi_n} must divide {what} and be a multiple of 8")


def check_smem(config: TileConfigBase, need: int) -> None:
    """Raises when ``need`` bytes of shared memory do not fit one CTA (with the compiler's headroom)."""
    if need > SMEM_LIMIT_BYTES - _SMEM_HEADROOM:
        raise ValueError(
            f"config {config.short()} needs {need} bytes of shared memory, over the "
            f"{SMEM_LIMIT_BYTES - _SMEM_HEADROOM} available"
        )


def fit_smem(cfg, need: Callable[[Any], int]):
    """Drops pipeline stages (to 3), then epilogue slots, then stages (to 2) until
    ``need(cfg)`` bytes of shared memory fit."""
    limit = SMEM_LIMIT_BYTES - _SMEM_HEADROOM
    while need(cfg) > limit and cfg.max_concurrent_steps > 3:
        cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
    if need(cfg) > limit and cfg.epi_slots > 1:
        cfg = dataclasses.replace(cfg, epi_slots=1)
    while need(cfg) > limit and cfg.max_concurrent_steps > 2:
        cfg = dataclasses.replace(cfg, max_concurrent_steps=cfg.max_concurrent_steps - 1)
    return cfg


@dataclasses.dataclass(frozen=True)
class TuningConfig(TileConfigBase):
    """Tile configuration of one kernel instance.

    tile_m, tile_n: the output tile of ONE consumer warpgroup (the wgmma
      accumulator).  tile_m is a multiple of 64, tile_n a multiple of 8 (<= 256).
    tile_k: K depth of one pipeline stage (multiple of 32 for 8-bit wgmma).
    max_concurrent_steps: pipeline depth (shared-memory stages).
    num_compute_wgs: consumer warpgroups (1 or 2).  With 2, the CTA tile is
      doubled along ``wg_dimension`` ("m" or "n").
    grid_minor_dim / grid_tile_width: planar-snake traversal of the output
      tiles by the persistent grid ("m" or "n" minor).
    epi_tile_m / epi_tile_n: the shared-memory tile of the epilogue store
      (None = the whole warpgroup tile).
    split_k: K is cut into this many equal ranges, each a separate work unit
      of the persistent grid (more units than output tiles when the output
      has few tiles: small and mid M with long K).  Each unit applies the
      (linear) scale epilogue to its partial sum and stores it in float32;
      one XLA reduction sums the partials and casts.  Must divide the number
      of K tiles.
    wgmma_inflight: keep one wgmma group in flight across pipeline steps
      (``wgmma_wait(1)``; each stage is released one step late,
      ``delay_release=1``), so a warpgroup issues step k+1 while step k still
      runs on the tensor cores; the last step of a tile drains (``wait(0)``).
      One of the stages is then always held by the running wgmma.
    cluster: None, "m", "n" or "k": run the persistent grid as clusters of two
      CTAs whose output tiles are neighbours along M (they share the weight tile:
      each TMA-loads half of it and multicasts it to both shared memories) or
      along N (they share the activation tile).  Halves the L2 -> shared
      memory traffic of the shared operand; the two CTAs step through K
      together (a stage is refilled once both consumed it).  "k": both CTAs
      compute the same output tile over one half of K each; the second sends
      its partial accumulator into the first's shared memory (``st.async``
      through distributed shared memory), which adds it and runs the epilogue:
      a K split with no float32 partials in global memory and no extra pass.
      Needs an even number of K tiles.  Not with split_k.
    swap_ab: decode layout: the weight is the wgmma A side and the activation
      the B side, so tile_m counts weight rows (output columns) and tile_n
      tokens (8 or 16 cover M <= 16: an in-bounds activation box instead of a
      mostly zero-filled 64-row one).  The accumulator is the output tile
      transposed; the epilogue stores it transposed through an unswizzled
      shared-memory tile.  One consumer warpgroup; not with clusters.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 4
    num_compute_wgs: int = 2
    wg_dimension: str = "n"
    grid_minor_dim: str = "n"
    grid_tile_width: int = 1
    epi_tile_m: int | None = 64
    epi_tile_n: int | None = 64
    epi_slots: int = 2
    split_k: int = 1
    wgmma_inflight: bool = False
    cluster: str | None = None
    swap_ab: bool = False

    def short(self) -> str:
        return (
            self._short_stem()
            + (f"sk{self.split_k}" if self.split_k > 1 else "")
            + ("i" if self.wgmma_inflight else "")
            + (f"c{self.cluster}" if self.cluster else "")
            + ("t" if self.swap_ab else "")
        )


def required_alignment(dtype, out_dtype=jnp.bfloat16) -> tuple[int, int]:
    """(n_multiple, k_multiple) the kernel needs for N and K.

    Mosaic GPU's TMA descriptors tile each GMEM operand by (8 rows, swizzle
    width), so: K must be a multiple of the smallest wgmma swizzle (32 bytes =
    32 8-bit elements; multiples of 128 get the fastest 128-byte swizzle), and
    N a multiple of 8 (rows of b) and of the 32-byte output swizzle (16 for
    16-bit outputs, 8 for float32).  M is free: M > 8 with M % 8 != 0 is
    padded inside :func:`scaled_mm` (see :func:`tma_rows`).
    """
    in_size = jnp.dtype(dtype).itemsize
    out_size = jnp.dtype(out_dtype).itemsize
    return max(8, 32 // out_size), 32 // in_size


def tma_row_len(length: int, dtype) -> int:
    """Elements to allocate for one warpgroup's row of a TMA-loaded epilogue vector.

    The rows of an ``(nwg, len)`` shared-memory buffer sit ``len * itemsize`` bytes apart, so ``len``
    is rounded up to a multiple of :data:`TMA_SMEM_ALIGN` bytes: e.g. a 32-wide bf16 bias row (64
    bytes) would put the second warpgroup's TMA destination off the 128-byte grid (seen faulting on
    an H100 with 2 warpgroups and ``tile_n=32``). Copies and loads use the first ``length`` elements.
    """
    per = TMA_SMEM_ALIGN // jnp.dtype(dtype).itemsize
    return _cdiv(length, per) * per


def smem_bytes(config: TuningConfig, dtype, out_dtype, n_row_vecs: int = 2, n_col_vecs: int = 3) -> int:
    """Shared memory one CTA of ``config`` needs (pipeline + epilogue)."""
    in_size = jnp.dtype(dtype).itemsize
    out_size = 4 if config.split_k > 1 else jnp.dtype(out_dtype).itemsize
    stage = (config.cta_tile_m + config.cta_tile_n) * config.tile_k * in_size
    epi_m = config.epi_tile_m or config.tile_m
    epi_n = config.epi_tile_n or config.tile_n
    n_slots = min(config.epi_slots, (config.tile_m * config.tile_n) // (epi_m * epi_n))
    out = config.num_compute_wgs * n_slots * epi_m * epi_n * out_size
    # Epilogue vectors (at most 4-byte): a_scale, azp per row; b_scale, bias, azp_adj per column.
    row, col = tma_row_len(config.tile_m, jnp.float32), tma_row_len(config.tile_n, jnp.float32)
    vecs = config.num_compute_wgs * 4 * (n_row_vecs * row + n_col_vecs * col)
    # cluster="k": the receive buffer of the other CTA's partial accumulators (4-byte: f32 / int32).
    recv = config.num_compute_wgs * config.tile_m * config.tile_n * 4 if config.cluster == "k" else 0
    return config.max_concurrent_steps * stage + out + vecs + recv + 256


def _validate_config(config: TuningConfig, dtype, out_dtype, n_row_vecs: int = 2, n_col_vecs: int = 3) -> None:
    c = config
    if c.tile_m % 64 or not 64 <= c.tile_m <= 256:
        raise ValueError(f"config.tile_m={c.tile_m} must be a multiple of 64 in [64, 256]")
    if c.tile_n % 8 or not 8 <= c.tile_n <= 256:
        raise ValueError(f"config.tile_n={c.tile_n} must be a multiple of 8 in [8, 256]")
    if c.tile_k % 32 or c.tile_k < 32:
        raise ValueError(f"config.tile_k={c.tile_k} must be a multiple of 32")
    if c.tile_k > 128 and c.tile_k % 128:
        raise ValueError(f"config.tile_k={c.tile_k} > 128 must be a multiple of 128")
    c.check_layout(epi_n_divides=c.tile_n)
    if not isinstance(c.split_k, int) or c.split_k < 1:
        raise ValueError(f"config.split_k={c.split_k} must be an int >= 1")
    if not isinstance(c.wgmma_inflight, bool):
        raise TypeError(f"config.wgmma_inflight={c.wgmma_inflight!r} must be True or False")
    if c.wgmma_inflight and c.max_concurrent_steps < 3:
        raise ValueError(
            "config.wgmma_inflight needs max_concurrent_steps >= 3 (one stage is held by the running wgmma)"
        )
    if c.cluster not in (None, "m", "n", "k"):
        raise ValueError(f"config.cluster={c.cluster!r} must be None, 'm', 'n' or 'k'")
    if c.cluster and c.split_k > 1:
        raise ValueError("config.cluster and config.split_k > 1 cannot be combined")
    if not isinstance(c.swap_ab, bool):
        raise TypeError(f"config.swap_ab={c.swap_ab!r} must be True or False")
    if c.swap_ab and (c.cluster not in (None, "k") or c.num_compute_wgs != 1):
        # (Decode layouts: one warpgroup is what was timed; jax 0.11.2's interpreter also stalls now and
        # then in barrier waits with two warpgroups on swapped operands.)
        raise ValueError("config.swap_ab needs num_compute_wgs=1 and cluster None or 'k'")
    check_smem(c, smem_bytes(c, dtype, out_dtype, n_row_vecs, n_col_vecs))


def num_sms() -> int:
    """SM count of the default GPU (132 on H100 SXM when there is none)."""
    try:
        dev = jax.devices("gpu")[0]
        count = getattr(dev, "core_count", None)
        if count:
            return int(count)
    except RuntimeError:
        pass
    return H100_NUM_SMS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def k_parts(config: TuningConfig) -> int:
    """Into how many ranges ``config`` cuts K: its split_k, times two for a K-split cluster (``cluster="k"``)."""
    return config.split_k * (2 if config.cluster == "k" else 1)


def weight_units(config: TuningConfig, n: int) -> int:
    """Work units of a config whose CTA tiles make one row of tiles (decode): its weight slabs (tile_m
    weight rows with ``swap_ab``, where the weight is the wgmma A side, else cta_tile_n) times its K ranges."""
    slab = config.cta_tile_m if config.swap_ab else config.cta_tile_n
    return _cdiv(n, slab) * k_parts(config)


def tma_rows(m: int) -> int:
    """Rows an (M, ...) operand or output of the Mosaic GPU kernels needs: M itself up to 8 (one
    partial TMA row tile; TMA zero-fills loads past it and clips stores), else M rounded up to 8."""
    return m if m <= TMA_ROW_TILE else _cdiv(m, TMA_ROW_TILE) * TMA_ROW_TILE


def _pick_swizzle(tile_elems: int, full_elems: int, dtype) -> int | None:
    """Largest swizzle (bytes) usable for a minor dim of ``tile_elems`` in SMEM.

    Mosaic GPU's TMA descriptors tile the whole GMEM array by (8, swizzle
    elements), so the full minor dimension must be a multiple of the swizzle
    width too.
    """
    size = jnp.dtype(dtype).itemsize
    for sw in (128, 64, 32):
        e = sw // size
        if tile_elems % e == 0 and full_elems % e == 0:
            return sw
    return None


def _swizzle_transforms(swizzle: int | None, dtype):
    if swizzle is None:
        raise ValueError("no 32/64/128-byte swizzle fits this tile and GMEM shape (see required_alignment)")
    return (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


# ----------------------------------------------------------------------------
# Heuristic tile choice.
# ----------------------------------------------------------------------------


def _small_m_config(m: int, n: int, k: int, dtype, out_dtype, sms: int) -> TuningConfig:
    # Weight-bandwidth bound: choose the narrowest tile_n (multiple of 16) whose
    # tile count does not exceed the SM count, so each SM streams one slab of b.
    # 80: N = 10240 in one full wave (128 tiles, not 107 of 96): H100 A/B, same run
    # (benchmarks/results/h100_ab_decode_tn.json), fp8 M = 1 / 8 / 16 -2.3 / -2.0 / -1.7 %,
    # int8 M = 8 / 16 -2.2 / -1.8 %; 112 (92 tiles) was 3-8 % slower.  M = 17..64 was not timed with it.
    best = None
    for tn in (16, 32, 48, 64) + ((80,) if m <= 16 else ()) + (96, 128, 160, 192, 256):
        tiles = _cdiv(n, tn)
        waves = _cdiv(tiles, sms)
        eff = tiles / (waves * sms)  # SM utilisation of the last wave
        key = (waves, -eff, tn)
        if best is None or key < best[0]:
            best = (key, tn)
    tn = best[1]
    k_tiles = _cdiv(k, 128)
    if k >= 8192 and _cdiv(n, 64) <= sms // 2 and k_tiles % 2 == 0:
        # Long K, few N tiles (e.g. 4096 x 14336): two K ranges of 64-wide N tiles stream the
        # weight with less activation traffic per stage than 32-wide tiles (H100: 25.8 vs 27.0 us),
        # summed in a K-split cluster (see _takes_mid_cluster_k: 64 x 4096 x 14336 26.2 -> 24.8 us).
        cfg = TuningConfig(
            tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=8, num_compute_wgs=1,
            epi_tile_m=64, epi_tile_n=64, epi_slots=1, cluster="k",
        )
        return _fit_smem(cfg, dtype, out_dtype)
    tk = 256 if k >= 256 else 128
    steps = 8
    cfg = TuningConfig(
        tile_m=64,
        tile_n=tn,
        tile_k=tk,
        max_concurrent_steps=steps,
        num_compute_wgs=1,
        wg_dimension="n",
        grid_minor_dim="n",
        grid_tile_width=1,
        epi_tile_m=64,
        epi_tile_n=math.gcd(tn, 64),
    )
    return _fit_smem(cfg, dtype, out_dtype)


def _swap_decode_config(m: int, n: int, k: int, dtype, out_dtype, sms: int) -> TuningConfig:
    """Decode with swapped operands (``swap_ab``): 64-row weight slabs as the wgmma A side, 256 deep,
    the M <= 16 tokens as a 16-wide B side; K in two where the slabs fill under half the SMs (then 8
    token columns at M <= 8): a K-split cluster, or split-K 2 where the cluster's transposed store does not
    fit (f32 output, N not a multiple of 64).

    Only configs with K in two take 8 columns (timed there: benchmarks/results/h100_ab_swap_ab.json, M = 1).
    Checked on the H100: the 16-column store and the 8-column split-K partials (h100_swap_ab_check.json,
    43/43), the 8- and 16-column transposed stores after a K-split cluster's sum (h100_check_kcluster.json).
    """
    split = _cdiv(n, 64) <= sms // 2 and _cdiv(k, 256) % 2 == 0 and _cdiv(k, 256) >= 8
    tokens = 8 if m <= 8 and split else 16
    cfg = TuningConfig(
        tile_m=64, tile_n=tokens, tile_k=256, max_concurrent_steps=8, num_compute_wgs=1, wg_dimension="m",
        grid_minor_dim="m", epi_tile_m=64, epi_tile_n=tokens, epi_slots=1, split_k=2 if split else 1,
        swap_ab=True,
    )  # fmt: skip
    if split:
        # The two K ranges summed in a cluster where its transposed 16-bit store fits, else by XLA
        # (see _takes_mid_cluster_k: M = 1 4096 x 14336 23.8 -> 22.2 us, 4096^2 8.9 -> 8.5; M = 16 4096 x 14336
        # 24.3 -> 22.6).
        clustered = dataclasses.replace(cfg, split_k=1, cluster="k")
        if swap_ab_fits(clustered, n, out_dtype):
            cfg = clustered
    return _fit_smem(cfg, dtype, out_dtype)


def _takes_swap_ab(m: int, n: int, k: int, dtype, out_dtype, sms: int) -> TuningConfig | None:
    """The swap-AB decode config where it measured faster than the unswapped decode tiles, else None.

    H100, fp8, same run (benchmarks/results/h100_ab_swap_ab.json): M = 1 (8 token columns) 4096^2 10.07 ->
    8.87 us, 6144 x 4096 12.43 -> 11.46, 4096 x 14336 27.18 -> 23.83, 8192^2 25.14 -> 24.34, 8192 x 28672
    82.11 -> 78.74, 57344 x 8192 / 28672 x 4096 -1.5 / -0.7 %, but 10240 x 8192 +4 % (160 weight slabs: 1.2
    waves); M = 16 4096 x 14336 25.85 -> 24.20, 8192^2 26.68 -> 24.74, 8192 x 28672 83.02 -> 79.50, 57344 x
    8192 level, and +1-3 % at K = 4096 (4096^2, 6144 x 4096) and 10240 x 8192.  int8 (h100_ab_swap_int8.json;
    M = 1 with 16 token columns, 8 with split-K): the same pattern, M = 1 -2 to -12 % at all seven shapes the rule
    takes and +11 % at 10240 x 8192, M = 16 4096 x 14336 25.88 -> 23.93, 8192^2 26.46 -> 24.70, 8192 x 28672
    82.88 -> 79.65 (int8 M = 1 runs XLA's GEMV up to K = 16384, see mosaic_gpu.uses_xla_gemv).  So: the
    weight slabs (x split-K) filling >= 70 % of their last wave of SMs, and at 9..16 tokens >= 80 % and
    K >= 8192 or K in two by a K-split cluster (M = 16 4096^2, 64 slabs x 2: fp8 9.36 -> 8.82 us, int8 9.45 -> 8.78
    against the unswapped 32-wide tiles, mean of two repeats, benchmarks/results/h100_ab_kcluster.json).
    With the swapped tile's steps 512 deep (:func:`_deep_small_m_steps`) and K whole (no XLA-summed split), 9..16
    tokens take it at >= 70 % too (H100, same run, two alternated repeats, h100_ab_swap_deep.json: 16 x 6144 x 4096
    fp8 12.36 -> 11.61 us, int8 12.18 -> 11.57; 16 x 28672 x 4096 44.4 -> 43.4, 43.2 -> 42.8; still slower at 10240
    x 8192, 61 %: 32.1 -> 34.3; in that run the 256-deep swapped tile was also faster at 16 x 6144 x 4096, 11.81).
    """
    if m > 16:
        return None
    cfg = _swap_decode_config(m, n, k, dtype, out_dtype, sms)
    if not swap_ab_fits(cfg, n, out_dtype):
        return None
    units = weight_units(cfg, n)
    fill = units / (_cdiv(units, sms) * sms)
    deep = _deep_small_m_steps(cfg, k, dtype, out_dtype) != cfg and cfg.split_k == 1  # (as measured: unsplit)
    takes = fill >= 0.7 if m <= 8 or deep else (fill >= 0.8 and (k >= 8192 or cfg.cluster == "k"))
    return cfg if takes else None


def _swap_ab_misfit(config: TuningConfig, n: int, out_dtype) -> str | None:
    """Why a ``swap_ab`` config cannot write this output (None if it can): its transposed tile store (no
    split-K) needs a 16-bit ``out_dtype`` and N a multiple of the epilogue tile's weight rows."""
    if not config.swap_ab or config.split_k > 1:
        return None
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype.itemsize != 2:
        return (f"config {config.short()}: swap_ab without split_k stores its tiles transposed, which needs a "
                f"16-bit out_dtype (got {out_dtype.name})")
    epi_m = config.epi_tile_m or config.tile_m
    if n % epi_m:
        return (f"config {config.short()}: swap_ab without split_k stores (tokens x {epi_m}) tiles: N={n} must be "
                f"a multiple of {epi_m}")
    return None


def swap_ab_fits(config: TuningConfig, n: int, out_dtype) -> bool:
    """Whether a ``swap_ab`` config can write this output (see :func:`_swap_ab_misfit`)."""
    return _swap_ab_misfit(config, n, out_dtype) is None


def _fit_smem(cfg: TuningConfig, dtype, out_dtype) -> TuningConfig:
    return fit_smem(cfg, lambda c: smem_bytes(c, dtype, out_dtype))


# Rough H100 rates for the mid-M tile choice (measured: one SM streams ~70 GB/s
# of operand tiles through this pipeline; 10 TB/s of L2 fits the M = 256 / 512
# sweeps: 2x64 x 64 tiles best at M = 256, 2x64 x 128 at M = 512, on 4096^2).
_SM_STREAM_BPS = 73e9
_L2_BPS = 10e12


def _mid_m_cost(m, n, k, cta_m, cta_n, sms, itemsize=1) -> float:
    """Predicted seconds of a memory-bound mid-M tile layout.

    Each output tile streams (cta_m + cta_n) * K operand bytes (A from L2,
    B from HBM): the time is the larger of one SM's share of that and the
    whole grid's traffic over the L2 bandwidth.
    """
    tiles = _cdiv(m, cta_m) * _cdiv(n, cta_n)
    waves = _cdiv(tiles, sms)
    per_tile = (cta_m + cta_n) * k * itemsize
    return max(waves * per_tile / _SM_STREAM_BPS, tiles * per_tile / _L2_BPS)


def _mid_m_tile(tile_n: int) -> TuningConfig:
    """Mid M (64 < M <= 512): two 64-row consumer warpgroups stacked along M, a deep pipeline."""
    return TuningConfig(
        tile_m=64,
        tile_n=tile_n,
        tile_k=128,
        max_concurrent_steps=6,
        num_compute_wgs=2,
        wg_dimension="m",
        grid_minor_dim="m",
        epi_tile_m=64,
        epi_tile_n=math.gcd(tile_n, 64),
    )


def _large_m_tile(inflight: bool = False) -> TuningConfig:
    """M > 512: 128 x 256 CTA tile (two 128 x 128 consumer warpgroups along N), M-minor snake of width 8."""
    return TuningConfig(
        tile_m=128,
        tile_n=128,
        tile_k=128,
        max_concurrent_steps=4,
        num_compute_wgs=2,
        wg_dimension="n",
        grid_minor_dim="m",
        grid_tile_width=8,
        epi_slots=1,
        wgmma_inflight=inflight,
    )


def _row64_cluster_tile(tile_n: int) -> TuningConfig:
    """Mid M: a 64 x (2 * tile_n) CTA tile (two 64 x tile_n warpgroups along N) run as clusters of two CTAs
    along M, which multicast the weight tile to both row tiles.  The heuristic takes 64 x 128 where those tiles
    make one nearly full wave (:func:`_takes_row64_cluster`); both widths are autotuner candidates."""
    return TuningConfig(
        tile_m=64, tile_n=tile_n, tile_k=128, max_concurrent_steps=8 if tile_n <= 64 else 4, num_compute_wgs=2,
        wg_dimension="n", grid_minor_dim="m", epi_tile_m=64, epi_tile_n=64, cluster="m",
    )  # fmt: skip


def _takes_mid_cluster_k(m: int, n: int, k: int, sms: int) -> bool:
    """Whether mid M (one row of 128-row tiles) takes 2 x 64 x 64 tiles as K-split clusters (``cluster="k"``):
    K >= 8192 (an even number of K tiles) and 128 x 64 tiles filling at most half the SMs, so that the clusters
    make one wave.

    Where a K-split cluster replaced a split-K summed by XLA, or gave a one-row mid-M tile twice the CTAs, it won.
    H100, same run, mean of two alternated repeats, fp8 / int8 (benchmarks/results/h100_ab_kcluster.json,
    ``ab_gemm.py --ab kcluster``), XLA-summed split-K 2 -> K-split cluster: swapped decode tiles M = 1 4096 x 14336
    23.8 -> 22.2 us / 23.7 -> 22.2, M = 8 4096^2 9.17 -> 8.46 / 9.18 -> 8.47, M = 1 4096^2 8.87 -> 8.54 / 8.91 ->
    8.54, M = 16 4096 x 14336 24.3 -> 22.6 / 24.3 -> 22.7; the small-M tile 64 x 4096 x 14336 26.2 -> 24.8 / 26.3 ->
    24.8; here 128 x 4096 x 14336 (64 tiles: 128 CTAs) 30.0 -> 26.7 / 29.8 -> 26.8 against the heuristic's 2 x 64 x
    32 tiles before (XLA 30.4 / 35.6).  Wherever the clustered CTAs exceed one wave it lost (first run,
    h100_ab_kcluster_first.json, fp8: 256 x 4096 x 14336 31.7 -> 37.0 at best, 128 x 8192 x 28672 84.7 -> 91.5,
    256 x 8192 x 8192 33.7 -> 56.9; 128 x 4096^2 with 2 x 64 x 64 tiles 11.0 -> 11.5).
    """
    return m <= 128 and k >= 8192 and _cdiv(k, 128) % 2 == 0 and _cdiv(n, 64) <= sms // 2


def _takes_row64_cluster(m: int, n: int, k: int, sms: int) -> bool:
    """Whether mid M takes 64 x 128 CTA tiles as clusters of two along M (:func:`_row64_cluster_tile`): at
    M <= 256 and K >= 4096 (the measured range) with an even number of 64-row tiles, where the 64 x 128 tiles
    make one wave that fills >= 90 % of the SMs.

    The heuristic's 128-row tiles (two 64-row warpgroups) re-read each weight tile's activation rows from L2 for
    every N tile; the clustered 64-row tiles read the weight tile once for two row tiles and have the same tile
    count (128 x 64 vs 64 x 128).  H100, same run, mean of two alternated repeats, fp8 / int8
    (benchmarks/results/h100_ab_row64.json, ``ab_gemm.py --ab row64``): 256 x 4096 x 14336 33.4 -> 31.5 us / 32.6
    -> 30.6 (XLA 34.4 / 42.8), 128 x 8192 x 28672 85.9 -> 84.2 / 86.2 -> 84.7, and 1-10 % at six more shapes with
    one wave of 120-128 such tiles (128 x 8192^2, 256 x 4096^2, 256 x 4096 x 8192, 128 x 8192 x 14336, 256 x 4096 x
    28672, 128 x 7680 x 16384).  Past one wave the 64-row tiles lose: 128 x 10240 x 8192 (160 tiles) +28 %, 384 x
    4096 x 14336 (192) +53 %, 256 x 8192 x 28672 (256) +62 %; with half the SMs (128 x 4096 x 14336, 64 tiles) level
    (h100_ab_row64_all.json: the first, all-sides run).
    """
    rows = _cdiv(m, 64)
    tiles = rows * _cdiv(n, 128)
    return m <= 256 and k >= 4096 and rows % 2 == 0 and 0.9 * sms <= tiles <= sms


def _wide_n_tile() -> TuningConfig:
    """128 x 320 CTA tile (two 128 x 160 consumer warpgroups along N, 3 stages): one wave where 128 x 256
    tiles leave a nearly empty extra one (see :func:`_takes_wide_n_tile`)."""
    return TuningConfig(
        tile_m=128, tile_n=160, tile_k=128, max_concurrent_steps=3, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_tile_m=64, epi_tile_n=32, epi_slots=1,
    )  # fmt: skip


def _n192_tile() -> TuningConfig:
    """128 x 192 CTA tile (two 128 x 96 consumer warpgroups along N, 5 stages): where 128 x 256 tiles leave a
    half-empty last wave at M > 512 (see :func:`_takes_n192_tile`); also a mid-M autotuner candidate."""
    return TuningConfig(
        tile_m=128, tile_n=96, tile_k=128, max_concurrent_steps=5, num_compute_wgs=2, wg_dimension="n",
        grid_minor_dim="m", grid_tile_width=8, epi_tile_m=64, epi_tile_n=32, epi_slots=1,
    )  # fmt: skip


def _n224_tile(inflight: bool = False) -> TuningConfig:
    """128 x 224 CTA tile (two 128 x 112 consumer warpgroups along N, 4 stages, 64 x 16 epilogue tiles): the
    large-M tile at a width whose tile counts fill the waves where 256- and 320-wide ones leave a part-empty
    last one (N = 28672 = 128 x 224, 57344 = 256 x 224; see :func:`_takes_n224_tile`)."""
    return dataclasses.replace(_large_m_tile(inflight), tile_n=112, epi_tile_n=16, epi_slots=2)


#: The 128 x 224 tile's time per tile in :func:`_wave_cost` (128 x 256 = 256): it does a little less work per
#: SM-second than the 256-wide tile.  Fitted to H100 A/B runs, fp8, same run (results/h100_ab_n224.json): the
#: compute-bound controls 1024 / 2048 x 28672 x 4096 (8 / 16 waves of 224-wide tiles against 7 / 14 of 256: +2.6 /
#: +4.3 %) give 230 / 234, the wins 256 x 57344 x 8192 and 512 x 28672 x 4096 (4 waves against 3 of 320) 232 / 238.
_N224_COST = 233


def _takes_n224_tile(m: int, n: int, sms: int, other: int) -> bool:
    """Whether 128 x 224 tiles need >= 2 % less waves x tile work than the ``other``-wide ones the heuristic would
    take (128 x 256 or 128 x 320, each costed its width).

    H100 A/B, same run, two alternated repeats (results/h100_ab_n224.json, ``ab_gemm.py --ab n224``), fp8 / int8:
    256 x 28672 x 4096 (two waves of 224 tiles of 128 x 256, or of 256 of 128 x 224; model 0.91) 55.0 -> 54.4 us /
    55.4 -> 53.9; 512 x 28672 x 4096 (3 waves of 128 x 320 against 4 of 224-wide; 0.97) 91.4 -> 90.6 / 87.4 -> 82.9;
    256 x 57344 x 8192 (0.97) 200.9 -> 194.5 / 197.6 -> 188.0.  Kept off where the model says so: 1024 / 2048 x
    28672 x 4096 ran 2.6-4.4 % slower with them, and at M = 128 (the mid-M tiles, memory bound) 1-3 % slower.
    """
    return _wave_cost(m, n, 224, sms, _N224_COST) <= 0.98 * _wave_cost(m, n, other, sms, other)


def _or_n224_tile(m: int, n: int, sms: int, tile: TuningConfig) -> TuningConfig:
    """``tile`` (the 128 x 256 or 128 x 320 large-M tile), or the 128 x 224 one (same in-flight setting) where
    :func:`_takes_n224_tile` prefers it."""
    return _n224_tile(tile.wgmma_inflight) if _takes_n224_tile(m, n, sms, tile.cta_tile_n) else tile


def _wave_cost(m: int, n: int, cta_n: int, sms: int, per_tile: float) -> float:
    """Waves of 128-row CTA tiles of width ``cta_n`` times the time of one tile (in units of N columns)."""
    return _cdiv(_cdiv(m, 128) * _cdiv(n, cta_n), sms) * per_tile


def _takes_wide_n_tile(m: int, n: int, sms: int, mid_192: bool) -> bool:
    """Whether 128 x 320 tiles beat 128 x 256 (and, at mid M, 2 x 64 x 192) by >= 5 % in waves x tile work.

    A tile's time grows with its width at a fixed 128 rows and K; the 2 x 64 x 192 mid tile does ~20 %
    less work per SM-second (cost 240).  The H100 agreed within ~4 % (fp8, same run): 512 x 10240 x 8192
    82.8 -> 58.9 us (1 wave of 128 x 320 vs 2 of 2 x 64 x 192; XLA 72.3), 1024 x 10240 x 8192 132.2 -> 113.8,
    512 x 28672 x 4096 96.1 -> 91.6; and the model keeps 128 x 256 where 128 x 320 lost (1024 x 6144 x 4096
    46.3 vs 57.5, 4096^3 97.1 vs 117.4) and 2 x 64 x 192 at 256 x 10240 x 8192 (44.3 vs 53.6).
    """
    other = _wave_cost(m, n, 256, sms, 256)
    if mid_192:
        other = min(other, _wave_cost(m, n, 192, sms, 240))
    return _wave_cost(m, n, 320, sms, 320) <= 0.95 * other


def _takes_n192_tile(m: int, n: int, sms: int) -> bool:
    """Whether 128 x 192 tiles beat 128 x 256 at M > 512 by >= 3 % in waves x tile work.

    A 192-wide tile does less work per SM-second than a 256-wide one: it is costed as 206 columns, fitted to
    A/B runs (benchmarks/results/h100_ab_big_tile.json, same run each; 132 SMs): H100 1024 x 6144 x 4096 (1.94
    waves of 128 x 192 against 1.45 of 128 x 256, model 0.80) fp8 45.9 -> 38.2 us, int8 44.9 -> 35.5 (XLA 49.0 /
    55.0); 2048 x 6144 x 4096 (model 1.07) 73.2 -> 75.5, int8 67.8 -> 70.7: kept at 128 x 256.  H200
    (h200_ab_big_tile_rule.json): fp8 / int8 -15 / -19 % at 640 x 4096^2, -15 / -21 % at 1536 x 4096^2, -16 / -21
    % at 768 x 8192^2 (model 0.80 each), -7 / -9 % at 768 x 28672 x 4096 (0.94), -3 / -6 % at 3072 x 6144 x 4096
    (0.97).  In the Llama grid only 1024 x 6144 x 4096 takes it.
    """
    return _wave_cost(m, n, 192, sms, 206) <= 0.97 * _wave_cost(m, n, 256, sms, 256)


def _small_m_tiles(m, n, k, dtype, out_dtype, sms) -> TuningConfig:
    """The decode / small-M tile (:func:`_deep_small_m_steps` may deepen its K steps)."""
    return _takes_swap_ab(m, n, k, dtype, out_dtype, sms) or _small_m_config(m, n, k, dtype, out_dtype, sms)


def _deeper_steps(cfg: TuningConfig, k: int, dtype, out_dtype) -> TuningConfig | None:
    """``cfg`` with K steps twice as deep and the deepest pipeline of them that fits shared memory; None
    where that does not fit or its K steps do not divide among ``cfg``'s K ranges."""
    deep = _fit_smem(dataclasses.replace(cfg, tile_k=2 * cfg.tile_k, max_concurrent_steps=16), dtype, out_dtype)
    if _cdiv(k, deep.tile_k) % k_parts(deep) or smem_bytes(deep, dtype, out_dtype) > SMEM_LIMIT_BYTES - _SMEM_HEADROOM:
        return None
    return deep


def _deep_small_m_steps(cfg: TuningConfig, k: int, dtype, out_dtype) -> TuningConfig:
    """M <= 64, K >= 4096 (the measured range): ``cfg`` with K steps twice as deep (256 -> 512, or 128 -> 256
    for the K-split 64 x 64 tile) where the deepest pipeline of them that fits keeps >= 4 stages (as at mid M,
    :func:`_deep_k_steps`); else ``cfg``.

    The decode tiles' steps are short wgmmas (a 64 x 8..64 tile); deeper steps spread each step's barrier waits
    over more work.  H100, fp8, same run, two alternated repeats (benchmarks/results/h100_ab_depth.json,
    ``ab_gemm.py --ab depth``): 64 x 4096 x 14336 (K-split cluster, 8 stages of 128 -> 6 of 256) 24.9 -> 24.3 us;
    64 x 4096^2 (8 of 256 -> 4 of 512) 8.68 -> 8.54; swapped decode tiles (8 -> 5 or 6) 16 x 4096^2 8.86 -> 8.70,
    16 x 8192^2 24.71 -> 24.54, 16 x 57344 x 8192 158.3 -> 158.0, 1 x 4096^2 8.48 -> 8.38, 1 x 57344 x 8192 154.1
    -> 154.0.  With 3 stages left mixed: 64 x 6144 x 4096 (64 x 48) 11.85 -> 11.65, 64 x 8192^2 25.95 -> 25.84,
    64 x 8192 x 28672 81.5 -> 81.1, the 80-wide tile at 16 x 10240 x 8192 31.6 -> 31.8; in the grid re-run
    (h100_gemm_depth20d.json, against the nineteenth grid) 16 x 6144 x 4096 11.8 -> 12.2 and 1 x 10240 x 8192
    31.3 -> 31.8: not taken.
    """
    if k < 4096 or cfg.tile_k > 256:
        return cfg
    deep = _deeper_steps(cfg, k, dtype, out_dtype)
    return deep if deep is not None and deep.max_concurrent_steps >= _DEEP_K_MIN_STAGES else cfg


def _mid_m_config(m, n, k, dtype, out_dtype, sms) -> TuningConfig:
    return _deep_k_steps(_mid_m_tiles(m, n, k, dtype, out_dtype, sms), m, k, dtype, out_dtype)


#: The fewest pipeline stages deepened K steps must keep (:func:`_deep_small_m_steps`, :func:`_deep_k_steps`).
_DEEP_K_MIN_STAGES = 4


def _deep_k_steps(cfg: TuningConfig, m: int, k: int, dtype, out_dtype) -> TuningConfig:
    """Mid M, K >= 4096 (the measured range): ``cfg`` with 256-deep K steps and the deepest pipeline that
    fits, where that keeps >= 4 stages (narrow tiles, whose 128-deep steps are short; >= 3 for clusters along
    M, whose two CTAs step through K together), or at M <= 128 (one row of CTA tiles) where it holds more K
    in flight than ``cfg``; else ``cfg``.

    A narrow tile's 128-deep step is a few short wgmmas between two barrier waits; twice as deep, each
    step's fixed cost is spread over twice the work.  H100, same run, fp8 / int8, 128-deep (6 or 8 stages)
    -> 256-deep (benchmarks/results/h100_ab_depth.json, ``ab_gemm.py --ab depth``): 5 stages of 2 x 64 x 32
    tiles at 128 x 4096^2 11.0 -> 9.5 us / 10.9 -> 9.5 (10 stages of 128: 10.5); 4 stages: 128 x 6144 x 4096
    (2 x 64 x 64) 13.4 -> 12.6 / 13.3 -> 12.5, 128 x 10240 x 8192 (2 x 64 x 80) 34.2 -> 33.5 / 34.1 -> 33.4,
    the clustered 64 x 128 row tiles at 128 x 8192^2 27.8 -> 27.0 / 27.7 -> 27.0, 256 x 4096^2 11.8 -> 11.2 /
    11.7 -> 11.2, 256 x 4096 x 14336 31.5 -> 30.5 / 30.1 -> 29.9, 128 x 8192 x 28672 84.7 -> 83.8.  The 2 x 64
    x 256 tile at M = 128 (3 stages of 128 -> 2 of 256): 128 x 28672 x 4096 49.6 -> 47.5 / 50.1 -> 47.9
    (twice), 128 x 57344 x 8192 177.5 -> 169.4, 176.0 -> 167.0 / 179.3 -> 172.0; its 4 stages of 128 with one
    epilogue slot (as many bytes in flight) ran level with 3; 2 x 64 x 128 at M = 128 (5 stages -> 3) 128 x
    16384 x 4096 28.8 -> 27.9 / 28.7 -> 27.9, x 8192 52.2 -> 50.5 / 52.1 -> 50.8.  Clustered 2 x 64 x 128
    tiles (5 stages -> 3): 256 x 8192 x 28672 100.6 -> 98.8, 512 x 4096 x 14336 44.6 -> 44.1.  Elsewhere with
    3 stages left the time changed by -0.8 % to +1.2 % (2 x 64 x 96 at 256 x 6144 x 4096 +0.7 % / +1.2 %,
    2 x 64 x 128 at 256 x 8192^2 -0.8 %, 512 x 4096^2 +0.4 %, the K-split cluster at 128 x 4096 x 14336 -0.6 %),
    with 2 up to 12 % slower from M = 256 (2 x 64 x 192 at 512 x 6144 x 4096 21.5 -> 24.1; the large-M 128 x
    256 tile at 512 x 8192^2 47.0 -> 50.3).
    """
    if cfg.tile_k != 128 or k < 4096:
        return cfg
    deep = _deeper_steps(cfg, k, dtype, out_dtype)
    if deep is None:
        return cfg
    more_in_flight = deep.max_concurrent_steps * deep.tile_k > cfg.max_concurrent_steps * cfg.tile_k
    min_stages = _DEEP_K_MIN_STAGES - (cfg.cluster == "m")  # a clustered step waits for both CTAs: costlier
    if deep.max_concurrent_steps >= min_stages or (m <= 128 and more_in_flight):
        return deep
    return cfg


def _mid_m_tiles(m, n, k, dtype, out_dtype, sms) -> TuningConfig:
    """The mid-M tile (128-deep K steps; :func:`_mid_m_config` may deepen them)."""
    best = None
    for tn in (256, 128, 64, 32):
        cost = _mid_m_cost(m, n, k, 128, tn, sms)
        if best is None or cost < best[0] * 0.97:  # prefer wider tiles on near-ties
            best = (cost, tn)
    if best[1] == 256 and m > 128:
        # Wide N at M = 129..512: the 2x64 x 256 mid tile (3 stages) ran 37 us per wave of tiles at
        # 512 x 28672 x 4096 on the H100 (150 us, 0.78x XLA; 88 us, 0.82x at M = 256), where the
        # large-M 128 x 256 tile (4 stages) runs 25.5 us per wave at the same N and K (M = 512 with it:
        # 1.23x XLA); at K = 8192 the two were within 5 %.
        # Where 2x64 x 192 tiles need no more waves than 128 x 256 ones, they win on the shorter
        # wave: 512 x 10240 x 8192 (two waves either way) ran 81.3 us vs 89.3 on the H100 (the
        # mid tile does ~20 % less work per SM-second, the 192-wide wave is 25 % shorter).
        if _takes_wide_n_tile(m, n, sms, mid_192=True):
            return _fit_smem(_or_n224_tile(m, n, sms, _wide_n_tile()), dtype, out_dtype)
        if _wave_cost(m, n, 192, sms, 1) <= _wave_cost(m, n, 256, sms, 1):
            return _fit_smem(_mid_m_tile(192), dtype, out_dtype)
        return _fit_smem(_or_n224_tile(m, n, sms, _large_m_tile()), dtype, out_dtype)
    if _takes_mid_cluster_k(m, n, k, sms):
        return _fit_smem(dataclasses.replace(_mid_m_tile(64), cluster="k"), dtype, out_dtype)
    if _takes_row64_cluster(m, n, k, sms):
        return _fit_smem(_row64_cluster_tile(64), dtype, out_dtype)
    cfg = _mid_m_tile(_in_between_mid_width(m, n, k, sms, *best))
    tiles = _cdiv(m, cfg.cta_tile_m) * _cdiv(n, cfg.cta_tile_n)
    if k >= 8192 and tiles <= sms // 2 and _cdiv(k, cfg.tile_k) % 2 == 0:
        # Half the SMs idle otherwise: two K ranges (H100, M=128 4096x14336: 28.9 vs 31.4 us with an
        # XLA-summed split), summed in a K-split cluster (which measured faster wherever it replaced one).
        cfg = dataclasses.replace(cfg, cluster="k")
    elif _takes_cluster_m(m, k, cfg):
        cfg = dataclasses.replace(cfg, cluster="m")
    return _fit_smem(cfg, dtype, out_dtype)


def _in_between_mid_width(m: int, n: int, k: int, sms: int, cost: float, tile_n: int) -> int:
    """The mid-M tile width: ``tile_n`` (the power of two the traffic model picked, at ``cost``), or a
    multiple of 16 between 32 and 256 whose tiles fill the SMs' waves so much better that the model gives
    it >= 10 % less time.

    H100 A/B, same run, two calls (benchmarks/results/h100_ab_mid_tn.json, ``ab_gemm.py --ab mid_tn``): 128
    x 10240 x 8192 (80 tiles of 128 for 132 SMs; 128 of 80; model 0.81) fp8 35.1 -> 34.0 us, int8 35.0 -> 34.0;
    256 x 6144 x 4096 (96 vs 128 tiles; 0.875) fp8 16.45 -> 15.84 (mean of 4), int8 16.35 -> 15.35.  Where the
    model gives 0.92 (128 x 6144 x 4096 with 48, 128 x 28672 x 4096 and 128 x 57344 x 8192 with 224) the
    widths ran level to 2 % faster: left at the power of two.  (This memory-bound regime gains far less than
    the wave count suggests.)
    """
    fine_cost, fine = _best_mid_width(m, n, k, sms)
    return fine if fine_cost <= 0.9 * cost else tile_n


def _best_mid_width(m: int, n: int, k: int, sms: int) -> tuple[float, int]:
    """(predicted seconds, width) of the mid-M traffic model's best 128-row tile over every multiple of 16
    from 32 to 256."""
    return min((_mid_m_cost(m, n, k, 128, tn, sms), tn) for tn in range(32, 257, 16))


def _takes_cluster_m(m: int, k: int, cfg: TuningConfig) -> bool:
    """Whether a mid-M config runs as clusters of two CTAs along M sharing (multicasting) the weight tile.

    Where every weight tile is read by several row tiles over a long K, each row tile's CTA pulls the
    same weight bytes from L2 again; a cluster loads them once for two.  H100 A/B, same run
    (benchmarks/results/h100_ab_cluster.json): 2 x 64 x 128 tiles at 256 x 8192 x 28672 fp8 104.1 -> 100.7
    us (XLA 101.2), int8 100.8 -> 96.2; 512 x 4096 x 14336 fp8 45.4 -> 44.4, int8 46.5 -> 42.1; with
    64-wide tiles at 256 x 4096 x 14336 mixed (fp8 -1.2 %, int8 +2 %), at K <= 8192 and with the large-M
    tile 1-1.5 % slower to 1 % faster.  An even number of row tiles, so no cluster half-idles.
    """
    rows = _cdiv(m, cfg.cta_tile_m)
    return cfg.split_k == 1 and cfg.tile_n >= 128 and k >= 14336 and rows >= 2 and rows % 2 == 0


def default_config(m: int, n: int, k: int, dtype, out_dtype=jnp.bfloat16) -> TuningConfig:
    """Heuristic tile configuration (used when autotuning is off or missing).

    * M <= 64: one consumer warpgroup, a 64-row tile, a narrow N tile so that
      every SM streams its own slab of the weight (decode); long K with few N
      tiles: 64-wide tiles, K split between the two CTAs of a cluster (``cluster="k"``).  At M <= 16 where the weight's
      64-row slabs fill the SMs' last wave well: the operands swapped
      (``swap_ab``: 8 / 16 token columns instead of a 64-row activation tile;
      see :func:`_takes_swap_ab`).
    * 64 < M <= 512: 2 x 64 rows (two consumer warpgroups along M) by an N tile
      picked with a small traffic model (memory bound: the A tile is re-read
      from L2 by every N tile, the weight streamed once): a power of two, or a
      width in between where the model gives it >= 10 % less time (a fuller last
      wave, see :func:`_in_between_mid_width`); K split between the two CTAs of a
      cluster when K is long and the tiles fill at most half the SMs (at M <= 128
      with 2 x 64 x 64 tiles, :func:`_takes_mid_cluster_k`); above M = 128, where the
      model wants 256-wide tiles, the large-M tile instead.
    * M > 512: 2 x (128 x 128) tiles (warpgroups along N), 4 stages, grouped
      planar-snake order: compute bound, ~1400 TF/s fp8 on H100 at 4096^3; one
      wgmma group in flight from M = 2048.
    * From M = 129: 2 x (128 x 160) tiles (128 x 320) where they need >= 5 % less
      waves x tile work than the tiles above (a nearly empty last wave).
    * M > 512 otherwise: 2 x (128 x 96) tiles (128 x 192) where they need >= 3 % less
      waves x tile work than 128 x 256 (a half-empty last wave; see :func:`_takes_n192_tile`).
    * From M = 129, instead of 128 x 256 or 128 x 320 tiles: 2 x (128 x 112) tiles (128 x 224) where they
      need >= 2 % less waves x tile work (N = 28672 / 57344 at M = 256 / 512; :func:`_takes_n224_tile`).
    * Mid M with an even number (>= 2) of CTA rows, K >= 14336 and 128-wide or wider
      tiles: clusters of two CTAs along M multicast the weight tile (see
      :func:`_takes_cluster_m`).
    * M <= 256, K >= 4096, where 64 x 128 tiles (an even number of 64-row tiles) make one wave
      filling >= 90 % of the SMs: those tiles, as clusters of two CTAs along M that
      multicast the weight tile (:func:`_takes_row64_cluster`).
    * M <= 512, K >= 4096: K steps twice as deep where >= 4 pipeline stages of them fit (narrow
      tiles; see :func:`_deep_small_m_steps`, :func:`_deep_k_steps`).
    """
    sms = num_sms()
    if m <= 64:
        return _deep_small_m_steps(_small_m_tiles(m, n, k, dtype, out_dtype, sms), k, dtype, out_dtype)
    if m <= 512:
        return _mid_m_config(m, n, k, dtype, out_dtype, sms)
    if _takes_wide_n_tile(m, n, sms, mid_192=False):
        return _fit_smem(_or_n224_tile(m, n, sms, _wide_n_tile()), dtype, out_dtype)
    if _takes_n192_tile(m, n, sms):
        return _fit_smem(_n192_tile(), dtype, out_dtype)
    # One wgmma group in flight per warpgroup: 1.4-2.4 % faster from M = 2048 on the H100 (fp8 and
    # int8; 4096^3 fp8 99.9 -> 98.5 us, 8192^3 776 -> 758), neutral at M = 1024 and 1.7 % slower at
    # M = 512 x 28672 x 4096 (its last stage is held by the running wgmma: 3 stages of prefetch).
    return _fit_smem(_or_n224_tile(m, n, sms, _large_m_tile(inflight=m >= 2048)), dtype, out_dtype)


def _split_k_options(n, k, tile_n, tile_k, *, sms, m, cta_m=64) -> list[int]:
    """split_k values worth trying: divide the K tiles, leave >= 4 K tiles per unit, and
    bring the work units (output tiles x split_k) up to between 0.5x and 2x the SM count."""
    k_tiles = _cdiv(k, tile_k)
    tiles = _cdiv(m, cta_m) * _cdiv(n, tile_n)
    if tiles >= sms:
        return []
    return [
        sk
        for sk in (2, 3, 4, 6, 8, 12, 16)
        if k_tiles % sk == 0 and k_tiles // sk >= 4 and sms // 2 <= tiles * sk <= 2 * sms
    ]


def _large_split_k_tiles(m: int, n: int, k: int) -> list[TuningConfig]:
    """The large-M 128 x 256 tile with K cut into split_k ranges (the two largest splits whose work units fill
    between a quarter of the SMs and one wave, >= 4 K tiles each); 64 x 32 f32 epilogue tiles keep 4 stages."""
    tiles, k_tiles = _cdiv(m, 128) * _cdiv(n, 256), _cdiv(k, 128)
    sks = [
        sk for sk in (2, 3, 4, 6, 8)
        if k_tiles % sk == 0 and k_tiles // sk >= 4 and num_sms() // 4 <= tiles * sk <= num_sms()
    ]  # fmt: skip
    return [dataclasses.replace(_large_m_tile(), split_k=sk, epi_tile_n=32) for sk in sks[-2:]]


def candidate_configs(
    m: int, n: int, k: int, dtype, out_dtype=jnp.bfloat16, limit: int | None = None
) -> list[TuningConfig]:
    """The autotuner's search space: the heuristic default first."""
    base = default_config(m, n, k, dtype, out_dtype)
    cands = [base]
    if m <= 64:
        for tn in (32, 16, 64, 128):
            for tk, st in ((256, 8), (128, 8), (256, 6)):
                cands.append(
                    TuningConfig(
                        tile_m=64,
                        tile_n=tn,
                        tile_k=tk,
                        max_concurrent_steps=st,
                        num_compute_wgs=1,
                        epi_tile_m=64,
                        epi_tile_n=math.gcd(tn, 64),
                    )
                )
        swapped = _swap_decode_config(m, n, k, dtype, out_dtype, num_sms()) if m <= 16 else None
        if swapped and swap_ab_fits(swapped, n, out_dtype):
            cands.append(swapped)
        cands.append(_small_m_tiles(m, n, k, dtype, out_dtype, num_sms()))  # before _deep_small_m_steps
        # Split-K: wider N tiles (less A traffic per weight byte in shared memory), K cut
        # into ranges so that there are about as many work units as SMs.
        for tn in (64, 128, 256):
            for sk in _split_k_options(n, k, tn, 128, sms=num_sms(), m=m):
                cands.append(
                    TuningConfig(
                        tile_m=64,
                        tile_n=tn,
                        tile_k=128,
                        max_concurrent_steps=8,
                        num_compute_wgs=1,
                        epi_tile_m=64,
                        epi_tile_n=64,
                        epi_slots=1,
                        split_k=sk,
                    )
                )
    elif m <= 512:
        for tn in (64, 128, 32, 256):
            cands.append(_mid_m_tile(tn))
        # the traffic model's best width between the powers of two (the heuristic takes it only at >= 10 %)
        cands.append(_mid_m_tile(_best_mid_width(m, n, k, num_sms())[1]))
        cands.append(_large_m_tile())
        cands.append(_wide_n_tile())
        cands.append(_n224_tile())
        # Tile counts between the powers of two: at M = 512 a 2x64 x 256 tile left 10240 and 28672
        # wide N at 2 and 3.4 waves on the H100 (0.77x / 0.78x XLA); 160 / 192 give ~2 full waves.
        for tn in (160, 192):
            cands.append(_mid_m_tile(tn))
        # The same 128 x 192 CTA tile as two 128 x 96 warpgroups along N (A shared between them). H100
        # sweeps: never the best, within 1-9 % of 2 x 64 x 192 (512 x 6144 x 4096: 21.3 vs 21.1 us;
        # 512 x 10240 x 8192: 88.3 vs 83.7); kept for the tuner at shapes not swept.
        cands.append(dataclasses.replace(_n192_tile(), grid_tile_width=1))
        for tn in (64, 128, 256):
            for sk in _split_k_options(n, k, tn, 128, sms=num_sms(), m=m, cta_m=128):
                cands.append(dataclasses.replace(_mid_m_tile(tn), split_k=sk, epi_slots=1))
        # The large-M 128 x 256 tile with K ranges where its tiles fill under a wave (64 x 32 f32
        # epilogue tiles keep its 4 stages).  A/B against the heuristic (benchmarks/results/
        # h{100,200}_ab_splitk_large.json): H200 3-5 % faster at 256 x 8192 x 28672 (split 2) and 128 x
        # 4096 x 14336 (split 4), slower at the 11 other mid-M cases; H100 within 1 % at 256 x 8192 x
        # 28672 and 1.9 % faster for int8 there, 5-36 % slower elsewhere: the tuner's to pick, not the
        # heuristic's.
        cands += _large_split_k_tiles(m, n, k)
        if _cdiv(m, 64) % 2 == 0:  # an even number of 64-row tiles: no cluster half-idles
            cands += [_row64_cluster_tile(64), _row64_cluster_tile(128)]
        # K-step depth both ways (see _deep_k_steps): the heuristic's tile before it deepened the steps, and
        # 256-deep steps (the deepest pipeline that fits) for the next unsplit candidates.
        cands.append(_mid_m_tiles(m, n, k, dtype, out_dtype, num_sms()))
        deeper = [_deeper_steps(c, k, dtype, out_dtype) for c in cands[1:5] if c.tile_k == 128 and c.split_k == 1]
        cands += [c for c in deeper if c is not None]
    else:
        # the large tile on both sides of the M = 2048 in-flight switch, and the 320-, 192- and 224-wide tiles
        cands += [
            _large_m_tile(inflight=False), _large_m_tile(inflight=True), _wide_n_tile(), _n192_tile(), _n224_tile()
        ]  # fmt: skip
        for tm, tn, wgd, st, slots in (
            (128, 128, "n", 4, 1),
            (64, 256, "m", 3, 2),
            (128, 128, "m", 4, 1),
            (128, 128, "n", 3, 2),
            # (No 128 x 256 warpgroup tiles, two along M (256 x 256) or N (128 x 512): fewer bytes loaded per
            # flop, but 256 f32 accumulator registers a thread spill: 256 x 256 ran 5.3-6x slower on the H100,
            # benchmarks/results/h100_ab_big_tile.json.)
        ):
            for gmd, gw in (("m", 8), ("n", 8), ("m", 1), ("m", 16)):
                cands.append(
                    TuningConfig(
                        tile_m=tm,
                        tile_n=tn,
                        tile_k=128,
                        max_concurrent_steps=st,
                        num_compute_wgs=2,
                        wg_dimension=wgd,
                        grid_minor_dim=gmd,
                        grid_tile_width=gw,
                        epi_slots=slots,
                    )
                )
    # The same tiles as clusters of two CTAs along M (the weight tile multicast), where there are two
    # rows of CTA tiles or more.
    cands += [
        dataclasses.replace(c, cluster="m")
        for c in cands[:6]
        if c.split_k == 1 and not c.cluster and _cdiv(m, c.cta_tile_m) >= 2
    ]
    # K split between the two CTAs of a cluster instead of two XLA-summed ranges.
    cands += [dataclasses.replace(c, split_k=1, cluster="k") for c in cands if c.split_k == 2]
    if m <= 128 and k >= 8192:
        cands.append(dataclasses.replace(_mid_m_tile(64), cluster="k"))
    out, seen = [], set()
    for c in cands:
        if _cdiv(k, c.tile_k) % k_parts(c) or _swap_ab_misfit(c, n, out_dtype):
            continue  # (scaled_mm would refuse it)
        c = _fit_smem(c, dtype, out_dtype)
        if c in seen:
            continue
        seen.add(c)
        try:
            _validate_config(c, dtype, out_dtype)
        except ValueError:
            continue
        out.append(c)
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------
# The kernel.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Epilogue:
    """Static description of the epilogue operands."""

    a_scale_vec: bool  # per-token (True) or per-tensor (False)
    b_scale_vec: bool  # per-channel (True) or per-tensor (False)
    has_bias: bool
    has_azp: bool
    azp_vec: bool  # per-token zero points (True) or per-tensor


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, *rest, config: TuningConfig, epi: _Epilogue, m: int, n: int, k: int):
    rest = list(rest)
    bias_gmem = rest.pop(0) if epi.has_bias else None
    azp_gmem = rest.pop(0) if epi.has_azp else None
    adj_gmem = rest.pop(0) if epi.has_azp else None
    (out_gmem,) = rest

    dtype = a_gmem.dtype
    out_dtype = out_gmem.dtype
    is_int = jnp.issubdtype(dtype, jnp.integer)
    acc_dtype = jnp.int32 if is_int else jnp.float32
    c = config
    tile_m, tile_n, tile_k = c.tile_m, c.tile_n, c.tile_k
    cta_m, cta_n = c.cta_tile_m, c.cta_tile_n
    m_iters, n_iters = _cdiv(m, cta_m), _cdiv(n, cta_n)
    split_k = c.split_k
    # cluster="k": the cluster's two CTAs take one half of K each (see TuningConfig.cluster).
    ksplit = c.cluster == "k"
    k_iters = _cdiv(k, tile_k) // k_parts(c)  # K tiles of one work unit
    # swap_ab stores each result tile transposed, except with split-K: its float32 partial sums stay
    # (weight rows, tokens) and the XLA reduction that sums them transposes them too.
    swap = c.swap_ab and split_k == 1
    nwg = c.num_compute_wgs
    epi_m = c.epi_tile_m or tile_m
    epi_n = c.epi_tile_n or tile_n
    n_epi = (tile_m // epi_m) * (tile_n // epi_n)
    n_slots = min(c.epi_slots, n_epi)

    in_swizzle = _pick_swizzle(tile_k, k, dtype)
    assert in_swizzle is not None, (tile_k, k)
    in_transforms = _swizzle_transforms(in_swizzle, dtype)
    # (The split-K partials of swap_ab have their token columns padded to a whole tile: out_gmem's width.)
    out_cols = out_gmem.shape[-1]
    out_transforms = None if swap else _swizzle_transforms(_pick_swizzle(epi_n, out_cols, out_dtype), out_dtype)

    # Row (length tile_m) and column (length tile_n) epilogue vectors that are
    # TMA'd into SMEM per output tile: (name, gmem ref, along, dtype).  Per-token
    # vectors run along the activation's axis: the rows ("m"), or the columns when
    # swap_ab makes the weight the wgmma A side; per-channel ones along the other.
    tok, ch = ("n", "m") if c.swap_ab else ("m", "n")
    vecs = []
    if epi.a_scale_vec:
        vecs.append(("a_scale", as_gmem, tok, jnp.float32))
    if epi.b_scale_vec:
        vecs.append(("b_scale", bs_gmem, ch, jnp.float32))
    if epi.has_bias:
        vecs.append(("bias", bias_gmem, ch, bias_gmem.dtype))
    if epi.has_azp:
        if epi.azp_vec:
            vecs.append(("azp", azp_gmem, tok, jnp.int32))
        vecs.append(("azp_adj", adj_gmem, ch, jnp.int32))
    along = {name: al for name, _, al, _ in vecs}

    # In-flight wgmma: a step's stage is released by the next step's body (delay_release=1), after
    # its wait(1) has retired this step's group.  The pipeline never releases the last step's stage
    # (its quiesce waits for steps 0..N-2 only) and a persistent CTA's memory warpgroup starts the
    # next tile's prologue right after that quiesce, so the last step drains with wait(0) before it
    # returns.  One K step releases nothing at all: no in-flight wgmma there.
    inflight = c.wgmma_inflight and k_iters >= 2
    delay = 1 if inflight else 0

    def pipeline(body, compute_context):
        def spec(rows, shared):
            # A cluster's two CTAs each TMA half of the operand tile they share and multicast it.
            return plgpu.BlockSpec(
                (rows, tile_k), lambda kk: (0, kk), transforms=in_transforms, memory_space=plgpu.SMEM,
                delay_release=delay, collective_axes=("cluster",) if shared else (),
            )  # fmt: skip

        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40 if nwg == 2 else 56,
            in_specs=[spec(cta_m, c.cluster == "n"), spec(cta_n, c.cluster == "m")],
            wg_axis="wg",
            num_compute_wgs=nwg,
            # More stages than K steps would leave slots that are never filled.
            max_concurrent_steps=max(1, min(c.max_concurrent_steps, k_iters)),
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None
    vec_len = {name: tile_m if al == "m" else tile_n for name, _, al, _ in vecs}
    # One row per warpgroup, each starting on TMA's 128-byte grid.
    vec_smem = {name: plgpu.SMEM((nwg, tma_row_len(vec_len[name], vdt)), vdt) for name, _, _, vdt in vecs}

    # cluster="k": CTA 1's partial accumulators land in CTA 0's recv_smem (recv_bar counts the bytes; one
    # warpgroup's arrival, i.e. each of its threads with its share); free_bar (one arrival from each CTA's
    # warpgroup a phase) says CTA 0 has read them, so CTA 1 may send the next tile's.
    ksplit_allocs = {}
    if ksplit:
        recv_transforms = _swizzle_transforms(_pick_swizzle(tile_n, tile_n, acc_dtype), acc_dtype)
        ksplit_allocs = dict(
            recv_smem=plgpu.SMEM((nwg, tile_m, tile_n), acc_dtype, transforms=recv_transforms),
            recv_bar=plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
            free_bar=plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=nwg),
        )

    @functools.partial(
        pl.run_scoped,
        **ksplit_allocs,
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        # swap_ab: the (tile_m weight rows, tile_n tokens) result is stored transposed into an
        # unswizzled (tokens, weight rows) tile, which the TMA store writes into the (M, N) output
        # (Mosaic GPU lowers that transposed store for 16-bit outputs only).
        out_smem=(
            plgpu.SMEM((nwg, n_slots, epi_n, epi_m), out_dtype)
            if swap
            else plgpu.SMEM((nwg, n_slots, epi_m, epi_n), out_dtype, transforms=out_transforms)
        ),
        vec_bars=plgpu.Barrier(num_barriers=max(1, nwg * len(vecs))),
        vec_smem=vec_smem,
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, vec_bars, vec_smem, recv_smem=None, recv_bar=None, free_bar=None):
        # Clusters walk pairs of CTA tiles (along M or N); the cluster's CTA 0 / 1 takes the first / second.
        # An odd tile count leaves the second CTA of the last cluster past the edge: it still takes part
        # in the shared (multicast) loads; its loads are zero-filled and its stores clipped (along M, where
        # M is not a multiple of the tile, _row_start clamps it onto the last row of tiles instead).
        grid_m, grid_n = _cluster_tiles(m_iters, n_iters, c.cluster)

        @plgpu.nd_loop((grid_m * grid_n * split_k,), collective_axes="cluster_grid" if c.cluster else "sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            # Split-K: the K range is the slowest index, so CTAs running at the
            # same time share K ranges of A (L2 reuse).
            split = lin // (m_iters * n_iters) if split_k > 1 else 0
            lin = lin % (m_iters * n_iters) if split_k > 1 else lin
            m_idx, n_idx = plgpu.planar_snake(
                lin, (grid_m, grid_n), 0 if c.grid_minor_dim == "m" else 1, c.grid_tile_width
            )
            if c.cluster == "m":
                m_idx = m_idx * 2 + lax.axis_index("cluster")
            elif c.cluster == "n":
                n_idx = n_idx * 2 + lax.axis_index("cluster")
            m_start = _row_start(m_idx, cta_m, m)
            cta_m_slice = pl.ds(m_start, cta_m)
            cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
            # This unit's K range: its split-K index, or its CTA's half of K in a K-split cluster.
            kpart = lax.axis_index("cluster") if ksplit else split
            k_slice = pl.ds(kpart * (k_iters * tile_k), k_iters * tile_k) if k_parts(c) > 1 else slice(None)
            # Only the first K range adds the bias and subtracts the zero-point term.
            first = (split == 0) if split_k > 1 else None
            out_tile = out_gmem.at[split] if split_k > 1 else out_gmem

            def compute_context(eval_pipeline):
                wg = lax.axis_index("wg")
                if c.wg_dimension == "m":
                    row0 = m_start + wg * tile_m
                    col0 = n_idx * cta_n
                    wg_m_slice, wg_n_slice = pl.ds(wg * tile_m, tile_m), slice(None)
                else:
                    row0 = m_start
                    col0 = n_idx * cta_n + wg * tile_n
                    wg_m_slice, wg_n_slice = slice(None), pl.ds(wg * tile_n, tile_n)

                # Fetch this tile's epilogue vectors while the main loop runs (cluster="k": CTA 0 only).
                def fetch_vecs():
                    for j, (name, ref, al, _) in enumerate(vecs):
                        sl = pl.ds(row0, tile_m) if al == "m" else pl.ds(col0, tile_n)
                        dst = vec_smem[name].at[wg, pl.ds(0, vec_len[name])]
                        plgpu.copy_gmem_to_smem(ref.at[sl], dst, vec_bars.at[wg * len(vecs) + j])

                if ksplit:
                    pl.when(kpart == 0)(fetch_vecs)
                else:
                    fetch_vecs()

                def epilogue(acc):
                    for j in range(len(vecs)):
                        plgpu.barrier_wait(vec_bars.at[wg * len(vecs) + j])

                    def vec(name):  # in the layout of one row / column of the wgmma accumulator
                        if along[name] == "m":
                            ref, layout = vec_smem[name].at[wg, pl.ds(0, tile_m)], plgpu.Layout.WGMMA.reduce(1)
                        else:
                            ref, layout = vec_smem[name].at[wg, pl.ds(0, tile_n)], plgpu.Layout.WGMMA.reduce(0)
                        return plgpu.load(ref, layout=layout)

                    def bcast(v, name):  # a vector of `name`'s axis over the whole tile
                        return lax.broadcast_in_dim(v, (tile_m, tile_n), [0 if along[name] == "m" else 1])

                    if epi.has_azp:
                        adj = vec("azp_adj")
                        if first is not None:
                            adj = adj * first.astype(jnp.int32)
                        if epi.azp_vec:
                            acc = acc - bcast(vec("azp"), "azp") * bcast(adj, "azp_adj")
                        else:
                            acc = acc - bcast(adj * azp_gmem[0], "azp_adj")
                    y = acc.astype(jnp.float32) if is_int else acc
                    # Scales: fold a per-tensor factor into the other vector.
                    if epi.a_scale_vec and epi.b_scale_vec:
                        y = y * bcast(vec("a_scale"), "a_scale") * bcast(vec("b_scale"), "b_scale")
                    elif epi.a_scale_vec:
                        y = y * bcast(vec("a_scale") * bs_gmem[0], "a_scale")
                    elif epi.b_scale_vec:
                        y = y * bcast(vec("b_scale") * as_gmem[0], "b_scale")
                    else:
                        y = y * (as_gmem[0] * bs_gmem[0])
                    if epi.has_bias:
                        bias_v = vec("bias").astype(jnp.float32)
                        if first is not None:
                            bias_v = bias_v * first.astype(jnp.float32)
                        y = y + bcast(bias_v, "bias")
                    y = y.astype(out_dtype)
                    if _EPILOGUE_ABLATION == "direct":  # full tiles only: no bounds check
                        out_tile.at[cta_m_slice, cta_n_slice].at[wg_m_slice, wg_n_slice][...] = y
                        return

                    # Write through SMEM + TMA, double-buffered epilogue tiles.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for ei in range(tile_m // epi_m):
                        for ej in range(tile_n // epi_n):
                            e_m = slice(ei * epi_m, (ei + 1) * epi_m)
                            e_n = slice(ej * epi_n, (ej + 1) * epi_n)
                            slot = (ei * (tile_n // epi_n) + ej) % n_slots
                            plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)
                            if swap:
                                out_smem.at[wg, slot].T[...] = y[e_m, e_n]
                                dst = out_tile.at[cta_n_slice, cta_m_slice].at[wg_n_slice, wg_m_slice].at[e_n, e_m]
                            else:
                                out_smem[wg, slot] = y[e_m, e_n]
                                dst = out_tile.at[cta_m_slice, cta_n_slice].at[wg_m_slice, wg_n_slice].at[e_m, e_n]
                            plgpu.commit_smem()
                            if _EPILOGUE_ABLATION == "no_store":
                                continue
                            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], dst)

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), acc_dtype))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if not ksplit:
                        epilogue(acc)
                        return
                    free = free_bar.at[wg]

                    @pl.when(kpart == 1)
                    def _send():
                        # The previous tile's partial must have been read before this one overwrites it.
                        pl.when(info.local_index > 0)(lambda: plgpu.barrier_wait(free))
                        plgpu.async_store_smem(
                            acc, recv_smem.at[wg], recv_bar.at[wg], cluster_idx=0, cluster_dim="cluster"
                        )
                        plgpu.barrier_arrive(free)
                        # The last tile: CTA 0's arrival has landed before this CTA may exit.
                        pl.when(info.local_index == info.num_local_steps - 1)(lambda: plgpu.barrier_wait(free))

                    @pl.when(kpart == 0)
                    def _receive():
                        plgpu.barrier_wait(recv_bar.at[wg])
                        total = acc + plgpu.load(recv_smem.at[wg], layout=plgpu.Layout.WGMMA)
                        plgpu.commit_smem()  # (a warpgroup barrier: every thread has read its share)
                        plgpu.barrier_arrive(free)
                        epilogue(total)
                        # CTA 1's arrival for this tile (so this CTA's phase of free_bar stays in step and
                        # nothing lands here after it exits).
                        plgpu.barrier_wait(free)

            def mma_body(idx, a_smem, b_smem, acc_ref):
                wg = lax.axis_index("wg")
                if c.wg_dimension == "m":
                    a_t, b_t = a_smem.at[pl.ds(wg * tile_m, tile_m)], b_smem
                else:
                    a_t, b_t = a_smem, b_smem.at[pl.ds(wg * tile_n, tile_n)]
                plgpu.wgmma(acc_ref, a_t, b_t.T)
                if inflight:
                    (kk,) = idx
                    # Retire the previous step's group (its stage is released after this body);
                    # the last step of the tile retires all (see `inflight` above).
                    lax.cond(kk == k_iters - 1, lambda: plgpu.wgmma_wait(0), lambda: plgpu.wgmma_wait(1))
                else:
                    plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma_body, compute_context)(
                a_gmem.at[cta_m_slice, k_slice], b_gmem.at[cta_n_slice, k_slice], allocations=pipeline_allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------


def _check_vec(name, x, shapes, dtypes):
    if x.shape not in shapes:
        raise ValueError(f"{name} has shape {x.shape}; expected one of {sorted(set(shapes))}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {[str(jnp.dtype(d)) for d in dtypes]}")


def check_gemm_operands(a, b, out_dtype, n_mult: int, k_mult: int) -> tuple[int, int, int]:
    """Shape, out-dtype and TMA-alignment checks shared by the Mosaic GPU GEMMs; returns ``(m, n, k)``.

    ``a`` is (M, K), ``b`` the K-major (N, K) weight; N and K must be multiples of ``n_mult`` /
    ``k_mult`` (:func:`required_alignment`). Operand dtypes are each kernel's own business.
    """
    if a.ndim != 2:
        raise ValueError(f"a must be 2-D (M, K); got shape {a.shape}")
    if b.ndim != 2:
        raise ValueError(f"b must be 2-D (N, K), K-major; got shape {b.shape}")
    m, k = a.shape
    n, k2 = b.shape
    if k2 != k:
        raise ValueError(
            f"b has shape {b.shape}: expected (N, K) with K={k} matching a {a.shape} "
            "(b must be the K-major (N, K) weight, not (K, N))"
        )
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"empty operands: a {a.shape}, b {b.shape}")
    if jnp.dtype(out_dtype) not in SUPPORTED_OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} must be bfloat16, float16 or float32")
    if k % k_mult:
        raise ValueError(
            f"K={k} (a.shape[1], b.shape[1]) must be a multiple of {k_mult} for "
            f"{jnp.dtype(a.dtype).name} (TMA tiling by the 32-byte wgmma swizzle); pad K once in "
            "process_weights_after_loading"
        )
    if n % n_mult:
        raise ValueError(
            f"N={n} (b.shape[0]) must be a multiple of {n_mult} for out_dtype "
            f"{jnp.dtype(out_dtype).name} (TMA tiling of b rows and of the 32-byte output swizzle); "
            "pad N once in process_weights_after_loading"
        )
    return m, n, k


def _validate(a, b, a_scale, b_scale, bias, azp, azp_adj, out_dtype):
    if jnp.dtype(a.dtype) not in SUPPORTED_IN_DTYPES:
        raise ValueError(f"a has dtype {a.dtype}; expected float8_e4m3fn or int8")
    if jnp.dtype(b.dtype) != jnp.dtype(a.dtype):
        raise ValueError(f"b has dtype {b.dtype}; expected the dtype of a ({a.dtype})")
    m, n, _ = check_gemm_operands(a, b, out_dtype, *required_alignment(a.dtype, out_dtype))
    _check_vec("a_scale", a_scale, [(m, 1), (1, 1)], [jnp.float32])
    _check_vec("b_scale", b_scale, [(1, n), (1, 1)], [jnp.float32])
    if bias is not None:
        _check_vec("bias", bias, [(n,)], _BIAS_DTYPES)
    if (azp is None) != (azp_adj is None):
        raise ValueError("azp and azp_adj must be given together (asymmetric int8)")
    if azp is not None:
        if jnp.dtype(a.dtype) != jnp.dtype(jnp.int8):
            raise ValueError("azp (activation zero points) is only supported for int8")
        _check_vec("azp", azp, [(m, 1), (1, 1)], [jnp.int32])
        _check_vec("azp_adj", azp_adj, [(1, n)], [jnp.int32])


def scaled_mm(
    a,
    b,
    a_scale,
    b_scale,
    *,
    bias=None,
    azp=None,
    azp_adj=None,
    out_dtype=jnp.bfloat16,
    config: TuningConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """out[m, n] = a_scale[m] * b_scale[n] * (sum_k a[m,k] b[n,k] - azp[m] * azp_adj[n]) + bias[n].

    Args:
      a: (M, K) float8_e4m3fn or int8 activations.
      b: (N, K) weight of the same dtype, K-major.
      a_scale: float32 (M, 1) per-token or (1, 1) per-tensor.
      b_scale: float32 (1, N) per-channel or (1, 1) per-tensor.
      bias: optional (N,) float32 / bfloat16 / float16.
      azp: optional int32 (M, 1) or (1, 1) activation zero points (int8 only).
      azp_adj: int32 (1, N) column sums of b over K (with azp).
      out_dtype: bfloat16, float16 or float32.
      config: tile configuration; None = tuned (cache) or heuristic.
      interpret: run in Mosaic GPU interpret mode (CPU).  There a tuned or heuristic config's
        cluster is dropped (the same tiles, each CTA loading its own operands and, for
        cluster="k", running the whole K: the same result) and an explicit cluster config is
        rejected: jax 0.11.2's interpreter stalls in barrier waits with clusters under CPU load
        and has no distributed-shared-memory store.  CI cross-lowers cluster configs for CUDA.
    """
    out_dtype = jnp.dtype(out_dtype)
    _validate(a, b, a_scale, b_scale, bias, azp, azp_adj, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    if config is None:
        from qlin.kernels import autotune  # local import: avoids a cycle

        config = autotune.get_config(m, n, k, a.dtype, out_dtype, has_bias=bias is not None, has_azp=azp is not None)
    elif interpret and config.cluster:  # (a tuned / heuristic one is run unclustered by _call)
        raise ValueError(
            f"config {config.short()}: clusters (config.cluster={config.cluster!r}) do not run in interpret mode "
            "(jax 0.11.2's Mosaic GPU interpreter stalls in barrier waits with them and has no distributed-shared-"
            "memory store); use cluster=None there"
        )
    # M == 1 per-token and N == 1 per-channel scales are indistinguishable from
    # per-tensor ones: both (1, 1) and the same math.
    epi = _Epilogue(
        a_scale_vec=a_scale.shape[0] != 1,
        b_scale_vec=b_scale.shape[1] != 1,
        has_bias=bias is not None,
        has_azp=azp is not None,
        azp_vec=azp is not None and azp.shape[0] != 1,
    )
    n_row = int(epi.a_scale_vec) + int(epi.azp_vec)
    n_col = int(epi.b_scale_vec) + int(epi.has_bias) + int(epi.has_azp)
    _validate_config(config, a.dtype, out_dtype, n_row, n_col)
    misfit = _swap_ab_misfit(config, n, out_dtype)
    if misfit:
        raise ValueError(misfit)
    if _cdiv(k, config.tile_k) % config.split_k:
        raise ValueError(
            f"config.split_k={config.split_k} must divide the {_cdiv(k, config.tile_k)} K tiles "
            f"(K={k}, tile_k={config.tile_k})"
        )
    if config.cluster == "k" and _cdiv(k, config.tile_k) % 2:
        raise ValueError(
            f"config.cluster='k' splits the {_cdiv(k, config.tile_k)} K tiles (K={k}, tile_k={config.tile_k}) "
            "between two CTAs: it needs an even number of them"
        )
    # M > 8 that is not a multiple of 8: pad the (small) activation side and slice the output (the
    # padded rows are zero and never read back).  Decode (M <= 8) runs unpadded: the two pads and
    # the slice cost more than the partial TMA tile (H100 fp8, 4096^2: M = 1 10.9 -> 10.2 us,
    # M = 5 12.0 -> 9.7 us; 8192 x 28672 M = 1 86.2 -> 83.1 us).
    m_pad = tma_rows(m) - m
    a_scale = a_scale.reshape(-1)
    if m_pad:
        a = jnp.pad(a, ((0, m_pad), (0, 0)))
        if epi.a_scale_vec:
            a_scale = jnp.pad(a_scale, (0, m_pad))
        if epi.azp_vec:
            azp = jnp.pad(azp, ((0, m_pad), (0, 0)))
    # swap_ab: the weight is the kernel's A side (its rows are the output's columns).
    args = [b, a, a_scale, b_scale.reshape(-1)] if config.swap_ab else [a, b, a_scale, b_scale.reshape(-1)]
    if bias is not None:
        args.append(bias)
    if azp is not None:
        args += [azp.reshape(-1), azp_adj.reshape(-1)]
    out = _call(tuple(args), config=config, epi=epi, out_dtype=out_dtype, interpret=interpret)
    if config.split_k > 1:
        out = out.sum(axis=0)  # one XLA fusion over the partial sums (and the transpose of swap_ab's)
        out = (out[:, : a.shape[0]].T if config.swap_ab else out).astype(out_dtype)
    return out[:m] if m_pad else out


def _row_start(m_idx, cta_m: int, m: int):
    """First row of CTA tile row ``m_idx`` (rows of the wgmma A operand: tokens, or weight rows with
    swap_ab).  Where M is at least a tile and not a multiple of it, the last row of tiles starts at
    M - cta_m: it overlaps the row before (and writes the rows they share again, with the same values)
    instead of running past M, where its loads would be mostly TMA zero fill, which is slow (the block
    kernel's 1024 x 8192 x 28672 with 192-row tiles: 479 -> 419 us on an H100).  A cluster's CTA past
    the last tile row computes that last row again."""
    if not _CLAMP_LAST_TILE_ROW or m <= cta_m or m % cta_m == 0:
        return m_idx * cta_m
    return jnp.minimum(m_idx * cta_m, m - cta_m)


def _cluster_tiles(m_iters: int, n_iters: int, cluster: str | None) -> tuple[int, int]:
    """The (M, N) extent of the grid a persistent loop walks: CTA tiles, or pairs of them along ``cluster``."""
    return (_cdiv(m_iters, 2) if cluster == "m" else m_iters, _cdiv(n_iters, 2) if cluster == "n" else n_iters)


def _call(args, *, config, epi, out_dtype, interpret):
    if interpret and config.cluster:  # see scaled_mm: the same tiles without the cluster
        config = dataclasses.replace(config, cluster=None)
    a, b = args[0], args[1]  # the wgmma A and B sides (the weight first with swap_ab)
    m, k = a.shape
    n = b.shape[0]
    tiles = _cdiv(m, config.cta_tile_m) * _cdiv(n, config.cta_tile_n) * config.split_k
    # Split-K: float32 partial sums, one (M, N) slab per K range; with swap_ab (N, tokens) slabs, the
    # token columns padded to the tile (16-byte TMA rows; the padding sums zero-filled tokens).
    if config.split_k > 1:
        cols = _cdiv(n, config.tile_n) * config.tile_n if config.swap_ab else n
        out_type = jax.ShapeDtypeStruct((config.split_k, m, cols), jnp.float32)
    else:
        out_type = jax.ShapeDtypeStruct((n, m) if config.swap_ab else (m, n), out_dtype)
    kwargs = {}
    if interpret:
        kwargs["interpret"] = plgpu.InterpretGPUParams(num_tma_threads_per_device=64)
    if config.cluster:
        # A persistent grid of clusters of two CTAs (one cluster per two SMs).
        gm, gn = _cluster_tiles(_cdiv(m, config.cta_tile_m), _cdiv(n, config.cta_tile_n), config.cluster)
        kwargs.update(cluster=(2,), cluster_names=("cluster",))
        grid, grid_names = max(1, min(num_sms() // 2, gm * gn)), ("cluster_grid",)
    else:
        grid, grid_names = max(1, min(num_sms(), tiles)), ("sm",)
    f = plgpu.kernel(
        functools.partial(_kernel, config=config, epi=epi, m=m, n=n, k=k),
        out_type=out_type,
        grid=(grid,),
        grid_names=grid_names,
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        **kwargs,
    )
    return f(*args)
