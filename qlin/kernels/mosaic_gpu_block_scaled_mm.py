"""Pallas Mosaic GPU (Hopper, sm90) block-scaled FP8 matmul (DeepSeek-V3 style).

    out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // 128, kb] * (sum_{k in block kb} a[m, k] b[n, k]) + bias[n]

* ``a`` (M, K) and ``b`` (N, K) are K-major float8_e4m3fn operands (8-bit
  ``wgmma`` only accepts K-major B, fed as ``b_smem.T``).
* ``a_scale`` (M, ceil(K / 128)): one float32 scale per token per 128-wide K
  group (dynamic per-group activations); ``b_scale`` (ceil(N / 128),
  ceil(K / 128)): one float32 scale per 128 x 128 weight block.
* One pipeline step is one 128-wide K block (two with ``tile_k=256``).  Each
  consumer warpgroup issues the block's ``wgmma`` into a fresh (zeroed) f32
  accumulator, waits, and
  promotes it into a second f32 register array carried through the pipeline:
  ``total += acc * (a_scale[rows, kb] * b_scale[nb, kb])``.  Warpgroup N
  tiles are aligned to the 128-wide weight-scale blocks, so the weight scale is
  one scalar per (warpgroup, N block, step); the activation scales of the CTA's rows for
  the step are a third pipelined TMA input (``a_scale`` transposed to
  (ceil(K / 128), M) so one step's scales are one contiguous box).  The weight
  scale is a scalar load issued right after the ``wgmma`` (its latency hides
  behind the tensor cores).  (The fresh accumulator is a zero fill: jax 0.11.2
  issues every wgmma with scale-d = 1.  Emitting the first one with scale-d = 0
  and no zeros instead was bit-identical and no faster on an H100, 0.93x at
  8192^3: benchmarks/ab_fresh_acc.py, results/h100_block_fresh_acc_rejected.json.)
* The promoted total and the wgmma accumulator are both f32 registers.  A
  64 x 256 warpgroup tile spans two weight-scale blocks: its two 128-wide
  halves go through one temporary accumulator one after the other (64 + 128
  registers per thread), so two warpgroups along M can give the per-channel
  kernel's 128 x 256 CTA tile; at large M the heuristic takes 128 x 128
  (one block per warpgroup), measured faster on an H100.  Narrow decode tiles and the
  128 x 128 tiles from mid M (up to the three-warpgroup tiles) take two K blocks per step (``tile_k=256``: two
  accumulators issued together, one wait), which halves the serialized per-step latency per
  weight byte (decode) and doubles the other warpgroup's tensor-core work that covers one
  warpgroup's wait-and-promote (M = 1024: 0.80-0.83 of the per-channel kernel vs 0.73-0.77).
* ``BlockTuningConfig(overlap=True)`` (opt-in; measured 0.17-0.34 of the per-channel
  kernel on an H100, where ptxas still serializes the wgmmas and spills: kept as a
  correct, tested tuning option, last among the candidates): two accumulators used alternately, so block k's ``wgmma``
  runs on the tensor cores while block k-1 is promoted (``wgmma_wait(1)``; the
  pipeline releases a stage one step late, ``delay_release=1``, and the last
  step of a tile drains every ``wgmma`` before the next tile's prologue may
  refill the stages).  See "overlapped promotion" in ``_kernel``.
* ``BlockTuningConfig(rescale=True)`` (what ``fast_accum=True`` picks at M > 512 unless the
  promoted tile fills the waves better): ONE
  accumulator carried through K in the units of the current block's scales,
  ``acc = acc * s_prev / s_cur`` (one ratio per row) and then the block's ``wgmma`` into
  it; ``out = acc * s_last``.  Half the registers of promotion, so 128 x 128 warpgroup
  tiles fit: H100 0.84-0.90 of the per-channel kernel (>= 0.85 at 29) at the 30 Llama-3 grid cases
  with M >= 1024 where ``fast_accum`` takes them (h100_block_grid13.md).  The blocks are then
  summed in the tensor core's fp8 accumulator (fewer bits than f32; DeepSeek-V3 reports
  about 14), i.e. the per-channel kernel's accuracy (H100, f32 out: 1.3e-3 at K = 4096,
  2.9e-3 at K = 14336) instead of promotion's 1.3e-4: opt-in.  See "rescaled
  accumulation" in ``_kernel``.
* Early stage release (``BlockTuningConfig(early_release=True)``; the two-block tile's default): a
  consumer warpgroup arrives on the pipeline's consumed barriers itself as soon as the step's wgmma has
  completed, so the producer refills the stage while the promotion runs (otherwise the stage is held
  until the pipeline body returns).  H100: the two-block tile (three stages) level or 0-11 % faster at
  30 of 32 same-run pairs from M = 256 to 2048; tiles with four or five stages 1-3 % slower
  (results/h100_ab_block_release.md).
* Three consumer warpgroups (the default from M = 2048, and from 513 where M is close to a multiple
  of 192): 3 x 64 x 128 promoted tiles, 160
  registers per thread each (the total and the accumulator take 128): while one warpgroup waits
  for its block's wgmma and promotes it, two others' wgmmas are queued on the tensor cores.
  GPU only: jax 0.11.2's Mosaic GPU interpreter can deadlock with four warpgroups per CTA, so
  interpret mode runs the default as two and rejects explicit three-warpgroup configs.
* 192-wide warpgroup tiles (``tile_n=192``, two along M: 128 x 192 CTA tiles, :func:`_wide_tile`):
  ONE 64 x 192 wgmma accumulator per K block, although the tile spans two weight-scale blocks (it
  starts at column 0 or 64 of one); the promotion runs per 64-column piece with that piece's block
  scale (96 + 96 registers a thread; ptxas: 168, no spills).  At full waves level with three
  warpgroups at 4096 x 28672 x 4096 (H100: 0.85-0.86 of the per-channel kernel), 5 % behind at
  8192^3 (0.83 vs 0.88: two warpgroups cover each other's wait-and-promote less); the default at M > 512
  where its tile count fills the waves clearly better than the others' (:func:`_promoted_tile_cost`):
  H100 1024 x 57344 x 8192 0.76 -> 0.84 of the per-channel kernel, 600 x 4096 x 14336 72.4 vs 95.9 us.
* Stream-K over the last wave (``BlockTuningConfig(tail_split=s)``; the default where the
  three-warpgroup tiles leave a last wave at most half full after few whole waves): the tiles past the
  last whole wave are each cut into ``s`` K ranges run by different CTAs after every CTA's whole
  tiles.  The CTAs of the first s - 1 ranges write their f32 partial totals to a global workspace
  and signal a global semaphore (one per tile and warpgroup, release at GPU scope); the CTA of the
  last range waits for s - 1 signals (acquire), adds the partials in a fixed order (deterministic)
  and runs the epilogue.  Every unit an owner waits for precedes every owner in the persistent
  grid's round-robin order and waits for nothing itself, so with the grid's CTAs resident no wait
  can deadlock.  H100 (h100_block_grid14.md): 2-7 % faster at the six grid shapes where the
  heuristic cuts (a 44- or 56-tile tail), e.g. 2048 x 8192 x 28672 0.78 -> 0.84 of the per-channel
  kernel (same-run sweep: 812 -> 766 us); the exchange costs 0-3 us (h100_block_tail_ab.json).
  GPU only: jax 0.11.2's interpreter has no global semaphores, so interpret mode runs the same
  units (planned for the device's SM count) in ONE CTA, every contributor before any owner, with no
  synchronization: CI checks the K ranges, the workspace and the owner's sum there, and cross-lowers
  the cut configs for CUDA (the semaphores).
* Two-CTA clusters (``BlockTuningConfig(cluster="m")``; the two-block tile's default at M > 512 where the
  weight is >= 200 MB, :data:`_CLUSTER_WEIGHT_BYTES`): the persistent grid walks pairs of CTA tiles that
  are neighbours along M (or N with ``"n"``); each CTA TMA-loads half of the tile they share and
  multicasts it to both, half the L2 reads of that operand.  H100 (results/h100_ab_block_cluster.md): the
  two-block tile (the most L2 traffic per output of the promoted tiles) 7-9 % faster along M at the two
  grid weights that large (1024 x 8192 x 28672 419.6 -> 388.2 us against the 128 x 192 tile's 407.6),
  1-4 % slower at the smaller ones; three warpgroups and the 128 x 192 tile slower clustered everywhere
  timed.  Past an odd tile count the last cluster's second CTA computes the last row (column) of tiles
  again.  GPU only: interpret mode runs the same tiles unclustered.
* Everything else is the per-channel kernel's design
  (:mod:`qlin.kernels.mosaic_gpu_scaled_mm`): TMA into 128B-swizzled shared
  memory, warp-specialized multi-stage pipeline, persistent grid walking the
  output tiles in a planar-snake order, epilogue (bias, cast) in registers
  and one store through shared memory + TMA.
* Partial tiles: TMA zero-fills out-of-bounds loads and clips stores, so any
  M >= 1 (M > 8 padded to 8 rows here, see tma_rows), N a multiple of 16 and
  K a multiple of 32 work; a K that is not a multiple of 128 ends with a partial K block (the
  zero-filled columns add nothing), at a narrower swizzle.  Where M is at least a CTA tile, the
  last row of CTA tiles starts at M - cta_m (it overlaps the row before it, whose rows it writes
  again with the same values) instead of running past M: a tile mostly past M loads mostly zero
  fill, which is slow (H100: 1024 x 8192 x 28672 with 192-row tiles 479 -> 419 us).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qlin.kernels.mosaic_gpu_scaled_mm import (
    SMEM_LIMIT_BYTES,
    TileConfigBase,
    _cdiv,
    _cluster_tiles,
    _mid_m_cost,
    _pick_swizzle,
    _row_start,
    _swizzle_transforms,
    check_gemm_operands,
    check_smem,
    fit_smem,
    num_sms,
    tma_row_len,
    tma_rows,
)

__all__ = [
    "BLOCK",
    "SMEM_LIMIT_BYTES",
    "SUPPORTED_OUT_DTYPES",
    "BlockTuningConfig",
    "block_scaled_mm",
    "candidate_configs",
    "default_config",
    "required_alignment",
    "smem_bytes",
    "tail_plan",
]

#: The (weight N block, K block) = activation group size the kernel implements.
BLOCK = 128
IN_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
SUPPORTED_OUT_DTYPES = (
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.float32),
)
_BIAS_DTYPES = SUPPORTED_OUT_DTYPES
#: f32 registers per thread a warpgroup may spend on the promoted total plus the
#: wgmma accumulator(s) (two consumer warpgroups get 232 registers per thread).
MAX_ACC_REGISTERS = 192
#: the same with three consumer warpgroups: the pipeline gives each 160 registers per thread (the
#: producer keeps 24), room for a 64 x 128 tile's total and accumulator (128) and little else.
MAX_ACC_REGISTERS_3WG = 128
#: the most K ranges a tile of the last wave is cut into (config.tail_split)
MAX_TAIL_SPLIT = 8
#: Measurement switch for the stream-K tail (benchmarks/gpu_block_check.py ``tail_ab``): None (the real
#: kernel) or "no_exchange" (contributors neither store nor signal, owners neither wait nor add: the
#: output is WRONG; it bounds what the partial-total exchange costs).
_TAIL_ABLATION: str | None = None
#: registers per thread the producer (TMA) warpgroup keeps, by consumer warpgroup count
_MEMORY_REGISTERS = {1: 56, 2: 40, 3: 24}


def _max_acc_registers(num_compute_wgs: int) -> int:
    return MAX_ACC_REGISTERS_3WG if num_compute_wgs == 3 else MAX_ACC_REGISTERS


#: The warpgroup tile width whose wgmma runs across a weight-scale block boundary: ONE 64 x 192
#: accumulator, promoted as three 64-column pieces (see "192-wide tiles" in ``_kernel``).
WIDE_TILE_N = 192


def _piece_cols(c) -> int:
    """Columns of one promoted register tile (piece) of a warpgroup tile: a whole 128-wide weight-scale
    block (or the tile, when narrower), 64 for the 192-wide tiles (a piece never straddles two blocks:
    their column offsets are multiples of 64)."""
    return 64 if c.tile_n == WIDE_TILE_N else min(c.tile_n, BLOCK)


def _acc_registers(c) -> int:
    """f32 registers per thread: the total (tile_m x tile_n) plus one accumulator per K
    block of a step (two with ``overlap``: the ping-pong pair), each covering one
    128-wide weight-scale block of the tile (the whole 192-wide tile for
    :data:`WIDE_TILE_N`); with ``rescale``, the accumulator alone."""
    if c.rescale:
        return c.tile_m * c.tile_n // 128  # the rescaled accumulator is the only register tile
    n_accs = 2 if c.overlap else c.tile_k // BLOCK
    acc_cols = c.tile_n if c.tile_n == WIDE_TILE_N else min(c.tile_n, BLOCK)
    return (c.tile_m * c.tile_n + n_accs * c.tile_m * acc_cols) // 128


@dataclasses.dataclass(frozen=True)
class BlockTuningConfig(TileConfigBase):
    """Tile configuration of one block-scaled kernel instance.

    tile_m, tile_n: the output tile of ONE consumer warpgroup.  tile_m is 64;
      tile_n divides 128 (16, 32, 64 or 128: the tile lies inside one weight-scale
      block), is 192 (one accumulator across two blocks, promoted in 64-column pieces;
      tile_k=128, promoted accumulation only) or 256 (two blocks, multiplied one after
      the other through one temporary accumulator).
    tile_k: K depth of one pipeline step: 128 (one scale block) or 256 (two blocks,
      each into its own fresh accumulator; issued together, promoted together).
      The promoted total plus the accumulators must fit MAX_ACC_REGISTERS
      (64x256 with tile_k=128, or 64x128 with tile_k=256, at most).
    max_concurrent_steps: pipeline depth (shared-memory stages).
    num_compute_wgs: consumer warpgroups (1, 2 or 3), stacked along ``wg_dimension``; with 3 each gets
      160 registers per thread, so the total and accumulator must fit 128 (64 x 128, tile_k=128).
    grid_minor_dim / grid_tile_width: planar-snake traversal of the output tiles.
    epi_tile_m / epi_tile_n: shared-memory tile of the epilogue store (None = whole tile).
    overlap: overlapped promotion (opt-in; slower on an H100, see the module docstring): two wgmma
      accumulators used alternately, so K block k's wgmma runs on the tensor cores
      while block k-1's result is promoted on the CUDA cores (``wgmma_wait(1)``, the
      pipeline stages released one step late).  Needs tile_n <= 128 (total + two
      accumulators = 192 registers at 64 x 128).  With tile_k=128 the accumulator of
      a step is picked by the step's parity (``lax.cond``); with tile_k=256 the two K
      blocks of a step alternate statically.
    rescale: rescaled accumulation: ONE wgmma accumulator carried through K, kept in the units of
      the current K block's scales (``acc * s_prev / s_cur`` before each block's wgmma, ``acc *
      s_last`` after the last), instead of a fresh accumulator per block promoted into a separate
      total.  Half the registers, so 128 x 128 warpgroup tiles (tile_m=128, two 64-row wgmma
      halves) and the per-channel kernel's 128 x 256 CTA tile fit; needs tile_n <= 128 (one
      weight-scale block per warpgroup tile).  See "rescaled accumulation" in ``_kernel``.
    tail_split: stream-K over the last, part-full wave of the persistent grid (1 = off).  The
      tiles past the last whole wave (:func:`tail_plan`) are each cut into ``tail_split`` K ranges
      run by different CTAs; the CTA of the last range adds the others' f32 partial totals (a
      global workspace, a global semaphore per tile and warpgroup) before the epilogue.  K must be
      a multiple of tile_k; the ranges split its steps as evenly as they go (the first ones a step
      longer where tail_split does not divide them), each at least max_concurrent_steps long.
      Promoted accumulation only (not with ``overlap`` or ``rescale``).  Interpret mode runs the
      units in one CTA (no semaphores there).
    early_release: promoted accumulation only (not ``overlap`` / ``rescale``): each consumer
      warpgroup hands a step's shared-memory stage back to the producer (the pipeline's consumed
      barriers, arrived by hand) as soon as the step's wgmma has completed, before the promotion,
      instead of after the step's whole body: the producer may refill the stage while the promotion
      runs.
    cluster: None, "m" or "n": run the persistent grid as clusters of two CTAs whose output tiles are
      neighbours along M (sharing the weight tile) or N (sharing the activation tile); each CTA
      TMA-loads half of the shared tile and multicasts it to both (half the L2 reads of that operand).
      Promoted accumulation without ``tail_split``; GPU only (interpret mode runs the same tiles
      unclustered).
    """

    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = BLOCK
    max_concurrent_steps: int = 5
    num_compute_wgs: int = 2
    wg_dimension: str = "m"
    grid_minor_dim: str = "m"
    grid_tile_width: int = 8
    epi_tile_m: int | None = 64
    epi_tile_n: int | None = 64
    epi_slots: int = 2
    overlap: bool = False
    rescale: bool = False
    tail_split: int = 1
    early_release: bool = False
    cluster: str | None = None

    def short(self) -> str:
        return (
            self._short_stem()
            + ("o" if self.overlap else "")
            + ("r" if self.rescale else "")
            + (f"t{self.tail_split}" if self.tail_split > 1 else "")
            + ("q" if self.early_release else "")
            + (f"c{self.cluster}" if self.cluster else "")
        )


def required_alignment(out_dtype=jnp.bfloat16) -> tuple[int, int]:
    """(n_multiple, k_multiple) the kernel needs for N and K (M is free).

    K: a multiple of the narrowest 8-bit wgmma swizzle (32 elements; multiples
    of 128 get the 128-byte swizzle).  N: 8 rows of b and the 32-byte output
    swizzle (16 for 16-bit outputs, 8 for float32).
    """
    out_size = jnp.dtype(out_dtype).itemsize
    return max(8, 32 // out_size), 32


def smem_bytes(config: BlockTuningConfig, out_dtype=jnp.bfloat16, has_bias: bool = True) -> int:
    """Shared memory one CTA of ``config`` needs (pipeline + epilogue)."""
    c = config
    out_size = jnp.dtype(out_dtype).itemsize
    # a tile + b tile (1 byte each) + the step's activation scales (f32).
    stage = (c.cta_tile_m + c.cta_tile_n) * c.tile_k + 4 * c.cta_tile_m * (c.tile_k // BLOCK)
    epi_m = c.epi_tile_m or c.tile_m
    epi_n = c.epi_tile_n or c.tile_n
    n_slots = min(c.epi_slots, (c.tile_m * c.tile_n) // (epi_m * epi_n))
    out = c.num_compute_wgs * n_slots * epi_m * epi_n * out_size
    vecs = c.num_compute_wgs * 4 * tma_row_len(c.tile_n, jnp.float32) if has_bias else 0
    return c.max_concurrent_steps * stage + out + vecs + 256


def _validate_config(config: BlockTuningConfig, out_dtype, has_bias: bool = True) -> None:
    c = config
    if not isinstance(c, BlockTuningConfig):
        raise TypeError(f"config must be a BlockTuningConfig, got {type(c).__name__}")
    if not isinstance(c.rescale, bool):
        raise TypeError(f"config.rescale={c.rescale!r} must be True or False")
    if c.rescale and c.overlap:
        raise ValueError("config.rescale and config.overlap are two promotion schemes: pick one")
    if c.tile_m not in ((64, 128) if c.rescale else (64,)):
        raise ValueError(
            f"config.tile_m={c.tile_m} must be 64"
            + (" or 128" if c.rescale else " (128 only with rescale=True: one accumulator per warpgroup)")
        )
    if c.rescale and c.tile_n > BLOCK:
        raise ValueError(
            f"config.tile_n={c.tile_n} must be <= {BLOCK} with rescale=True (one weight-scale block per warpgroup tile)"
        )
    if c.tile_n not in (16, 32, 64, 128, WIDE_TILE_N, 256):
        raise ValueError(
            f"config.tile_n={c.tile_n} must be 16, 32, 64 or 128 (inside one 128-wide weight-scale block), "
            f"{WIDE_TILE_N} (one wgmma across a block boundary) or 256 (two blocks)"
        )
    if c.tile_n == WIDE_TILE_N and (c.overlap or c.rescale or c.tile_k != BLOCK):
        raise ValueError(
            f"config.tile_n={WIDE_TILE_N} needs promoted accumulation with one K block a step: "
            f"tile_k={BLOCK}, overlap=False, rescale=False (got {c.short()})"
        )
    if c.tile_k not in (BLOCK, 2 * BLOCK):
        raise ValueError(
            f"config.tile_k={c.tile_k} must be {BLOCK} or {2 * BLOCK} (one or two K scale blocks per step)"
        )
    if not isinstance(c.overlap, bool):
        raise TypeError(f"config.overlap={c.overlap!r} must be True or False")
    if not isinstance(c.tail_split, int) or isinstance(c.tail_split, bool) or not 1 <= c.tail_split <= MAX_TAIL_SPLIT:
        raise ValueError(f"config.tail_split={c.tail_split!r} must be an int from 1 to {MAX_TAIL_SPLIT}")
    if not isinstance(c.early_release, bool):
        raise TypeError(f"config.early_release={c.early_release!r} must be True or False")
    if c.early_release and (c.overlap or c.rescale):
        raise ValueError(
            "config.early_release hands a stage back between a step's wgmma and its promotion: promoted "
            "accumulation only, not with overlap=True or rescale=True"
        )
    if c.cluster not in (None, "m", "n"):
        raise ValueError(f"config.cluster={c.cluster!r} must be None, 'm' or 'n'")
    if c.cluster and (c.overlap or c.rescale or c.tail_split > 1):
        raise ValueError(
            f"config.cluster={c.cluster!r} (two-CTA clusters) needs promoted accumulation without stream-K: "
            f"not with overlap, rescale or tail_split > 1 (got {c.short()})"
        )
    if c.tail_split > 1 and (c.overlap or c.rescale):
        raise ValueError(
            f"config.tail_split={c.tail_split} (stream-K over the last wave) needs promoted accumulation: "
            "not with overlap=True or rescale=True"
        )
    regs, cap = _acc_registers(c), _max_acc_registers(c.num_compute_wgs)
    if regs > cap:
        raise ValueError(
            f"config {c.short()} (tile {c.tile_m}x{c.tile_n}, tile_k={c.tile_k}"
            f"{', overlap=True: two ping-pong accumulators' if c.overlap else ''}) needs {regs} f32 registers per "
            f"thread for the promoted total and the wgmma accumulator(s): over {cap} "
            f"with {c.num_compute_wgs} consumer warpgroups"
        )
    c.check_layout(epi_n_divides=_piece_cols(c), max_wgs=3)
    check_smem(c, smem_bytes(c, out_dtype, has_bias))


def _fit_smem(cfg: BlockTuningConfig, out_dtype) -> BlockTuningConfig:
    return fit_smem(cfg, lambda c: smem_bytes(c, out_dtype))


# ----------------------------------------------------------------------------
# Heuristic tile choice.
# ----------------------------------------------------------------------------


def _small_m_tile(
    tile_n: int, steps: int | None = None, num_compute_wgs: int = 1, tile_k: int | None = None
) -> BlockTuningConfig:
    """M <= 64 (decode): 64 rows, a narrow N tile (one warpgroup, or two side by side along N).

    One warpgroup's K steps are serialized (wgmma, wait, promote), so narrow
    tiles take two K blocks per step (tile_k=256: two accumulators issued
    together) to halve the per-byte step latency; the pipeline is deep enough
    to keep ~64 KB of weight tiles in flight per SM (the problem streams the
    weight from HBM).
    """
    if tile_k is None:
        tile_k = 2 * BLOCK if tile_n <= 64 else BLOCK
    if steps is None:
        steps = max(6, min(16, (64 << 10) // (num_compute_wgs * tile_n * tile_k)))
    return BlockTuningConfig(
        tile_m=64,
        tile_n=tile_n,
        tile_k=tile_k,
        max_concurrent_steps=steps,
        num_compute_wgs=num_compute_wgs,
        wg_dimension="n",
        grid_minor_dim="n",
        grid_tile_width=1,
        epi_tile_m=64,
        epi_tile_n=min(64, tile_n),
    )


def _two_wg_tile(
    wg_dimension: str,
    tile_n: int = 128,
    steps: int = 5,
    grid_minor: str = "m",
    width: int = 8,
    epi_slots: int | None = None,
):
    return BlockTuningConfig(
        tile_m=64,
        tile_n=tile_n,
        max_concurrent_steps=steps,
        num_compute_wgs=2,
        wg_dimension=wg_dimension,
        grid_minor_dim=grid_minor,
        grid_tile_width=width,
        epi_tile_m=64,
        epi_tile_n=min(64, tile_n),
        # 128 x 256 CTA tiles: one epilogue slot leaves room for 4 pipeline stages.
        epi_slots=epi_slots or (1 if tile_n > BLOCK else 2),
    )


def _two_block_step_tile() -> BlockTuningConfig:
    """Two 64 x 128 warpgroups along M (128 x 128 CTA tiles), TWO K blocks a pipeline step (3 stages of 256):
    each warpgroup issues both blocks' wgmmas into two fresh accumulators, waits once and promotes both, so
    a step's wait-and-promote is covered by twice as much of the other warpgroup's tensor-core work and there
    are half as many pipeline steps (192 accumulator registers a thread: the two-warpgroup cap).  The
    default from M = 129 where the traffic model wants >= 128-wide tiles, and above M = 512 where the wave
    model prefers it to three warpgroups (:func:`_promoted_tile_cost`).

    Its stages are released early (``early_release``): with only three stages (66.5 KB each), holding one
    through the promotion of two K blocks left the producer short.  H100, same run each
    (results/h100_ab_block_release.md): level or faster at 30 of 32 pairs over 28 Llama-3 shapes from M =
    256 to 2048, up to 11 % (512 x 4096^2 20.2 -> 18.1 us, 1024 x 8192^2 118.9 -> 113.6), 0.97 / 0.995 at
    1024 x 4096^2 (two runs).  The three-warpgroup (four stages) and 128 x 192 (five) tiles ran 1-3 % slower
    with it: their producer was not short of stages, and every step then arrives on three barriers (one per
    input) instead of one (in jax 0.11.2's lane semantics a warpgroup's arrival is 128 per-thread
    ``mbarrier.arrive`` on the same barrier)."""
    return dataclasses.replace(_two_wg_tile("m", BLOCK, steps=3, epi_slots=1), tile_k=2 * BLOCK, early_release=True)


def _large_m_tile(tile_n: int = 2 * BLOCK, steps: int = 4, grid_minor: str = "m", width: int = 8):
    """Two 64-row warpgroups along M, each 64 x 256 (two weight-scale blocks): a large-M candidate."""
    return _two_wg_tile("m", tile_n, steps=steps, grid_minor=grid_minor, width=width)


def _three_wg_tile(wg_dimension: str = "m", steps: int = 4, grid_minor: str = "m", width: int = 8):
    """Three 64 x 128 warpgroups (192 x 128 CTA tiles along M, 64 x 384 along N): while one
    warpgroup waits for its block's wgmma and promotes it, two others have wgmmas queued on the
    tensor cores (with two, the promotion of one is covered by only one other's wgmma)."""
    return BlockTuningConfig(
        tile_m=64, tile_n=BLOCK, max_concurrent_steps=steps, num_compute_wgs=3, wg_dimension=wg_dimension,
        grid_minor_dim=grid_minor, grid_tile_width=width, epi_tile_m=64, epi_tile_n=64, epi_slots=1,
    )  # fmt: skip


def _wide_tile(steps: int = 5, grid_minor: str = "m", width: int = 8) -> BlockTuningConfig:
    """Two 64 x 192 warpgroups along M (128 x 192 CTA tiles): one wgmma accumulator across the
    tile's weight-scale block boundary, promoted in three 64-column pieces (the total and the
    accumulator take 192 registers a thread, the two-warpgroup cap); the least shared-memory
    traffic per output of the promoted tiles."""
    return _two_wg_tile("m", WIDE_TILE_N, steps=steps, grid_minor=grid_minor, width=width, epi_slots=1)


def _overlap(cfg: BlockTuningConfig, **changes) -> BlockTuningConfig:
    return dataclasses.replace(cfg, overlap=True, **changes)


def _rescale(cfg: BlockTuningConfig, **changes) -> BlockTuningConfig:
    return dataclasses.replace(cfg, rescale=True, **changes)


def _rescale_wide_tile(wg_dimension: str = "n", steps: int = 4, grid_minor: str = "m", width: int = 8):
    """Rescaled accumulation in 128 x 128 warpgroup tiles (one weight-scale block each): two along N
    is the per-channel kernel's large-M 128 x 256 CTA tile."""
    return BlockTuningConfig(
        tile_m=128, tile_n=BLOCK, max_concurrent_steps=steps, num_compute_wgs=2, wg_dimension=wg_dimension,
        grid_minor_dim=grid_minor, grid_tile_width=width, epi_tile_m=64, epi_tile_n=64, epi_slots=1, rescale=True,
    )  # fmt: skip


def _waves_key(m, n, cta_m, cta_n, sms):
    tiles = _cdiv(m, cta_m) * _cdiv(n, cta_n)
    waves = _cdiv(tiles, sms)
    return waves, -tiles / (waves * sms)


def default_config(m: int, n: int, k: int, out_dtype=jnp.bfloat16, fast_accum: bool = False) -> BlockTuningConfig:
    """Heuristic tile configuration.

    * ``fast_accum`` and M > 512: rescaled accumulation (``rescale=True``) in 128 x 128
      warpgroup tiles, two along M (256 x 128 CTA tiles) from M = 2048, along N (128 x 256) below:
      on an H100 0.84-0.90 of the per-channel kernel at the 30 Llama-3 grid cases with M >= 1024
      where it takes them (h100_block_grid13.md).  Below M = 2048 it keeps the promoted tile where the 128 x 256
      tiles would leave a part-empty last wave (:func:`_fast_accum_falls_back`: 1024 x 6144 x 4096
      and 1024 x 10240 x 8192 in the grid, 0.82 / 0.77 instead of 0.70 / 0.73).  At M <= 512 the
      rescaled tiles measured slower than the promoted ones (M = 256: 0.73 vs 0.78 of per-channel,
      M = 16: 0.77 vs 0.82), so ``fast_accum`` keeps the tiles below.

    * M <= 64 (decode, weight-bandwidth bound): 64 rows by the narrowest N
      tile (16..128 with one warpgroup, 256 with two side by side) whose tile
      count fits the SMs best, so every SM streams its own slab of the weight;
      a pipeline deep enough for ~64 KB of weight in flight per SM.
    * 64 < M <= 512: two 64-row warpgroups along M (128-row CTA tile) by the N
      tile (32..256) that the per-channel kernel's traffic model
      (:func:`qlin.kernels.mosaic_gpu_scaled_mm._mid_m_cost`) predicts fastest; from M = 129 where it
      wants 128 or 256, 128 x 128 tiles with two K blocks a step (:func:`_two_block_step_tile`).  H100
      (benchmarks/results/h100_block_k256_sweep3.json), ratio to the per-channel kernel, M = 512:
      two blocks a step 0.81 / 0.79 / 0.87 / 0.86 at 8192^2, 4096^2, 28672 x 4096, 4096 x 14336, one
      block 0.74 / 0.80 / 0.80 / 0.80, the 64 x 256 warpgroup tile the model picked at three of them
      0.34-0.58; M = 256 x 8192^2 0.90 vs 0.89.
    * M > 512: the two-blocks-a-step 128 x 128 tiles, three 64 x 128 warpgroups along M (192 x 128 CTA tiles, 4
      stages, one epilogue slot, planar snake of width 4: one warpgroup's wait-and-promote is covered by two others'
      queued wgmmas) or two 64 x 192 warpgroups (128 x 192, one accumulator across a weight-scale block boundary),
      whichever a wave cost model gives less time (:func:`_promoted_tile_cost`; 128 x 192 at 1024 x 6144 x 4096,
      1024 x 28672 x 4096 and 1024 x 57344 x 8192 (K-aware cost, :func:`_wide_rel_time`) in the grid, and at M =
      600 where its 5 x 22 tiles make one wave: 600 x 4096^2 24.5 vs 31.5 us,
      h100_block_wide_*.json); the last row of CTA tiles is clamped to end at M (no tile mostly past M). In the
      Llama-3 grid that is two-block or 128 x 192 tiles at M = 1024 (0.79-0.85 of the per-channel kernel on an H100,
      h100_block_grid20.md; M = 1024 is 5.3 rows of 192) and three warpgroups from M = 2048 (0.79-0.95; two-block
      tiles at 2048 x 4096^2, 0.81); between them it is three warpgroups where M is close to a multiple of 192 (768
      / 1100 / 1152 / 1536: 0.75-0.96 against 0.63-0.83 with two-block tiles, h100_block_m_tail.json).
      Where the weight is >= 200 MB the two-block tile runs as clusters of two CTAs along M (the weight tile
      multicast; costed 1.14 instead of 1.2: 1000 / 1024 x 8192 x 28672 0.79 / 0.80 instead of the 128 x 192
      tile's 0.72 / 0.76, h100_block_grid20.md).
      Three-warpgroup tiles whose last wave is at most half full after few whole waves cut it into two K ranges
      (``tail_split=2``, :func:`_tail_split`; the model counts that wave as :data:`_TAIL_WAVE` of one;
      h100_block_grid14.md). Earlier measurements behind the tiles: two K blocks a step 0.80-0.83 at M = 1024
      against 0.73-0.77 for one (h100_block_k256_sweep{,2}.json); three warpgroups 4-10 % faster than two at M =
      4096 (h100_block_3wg_*); width 4 vs 8: 1-2.5 % faster at 28672 x 4096 and 8192^2, 1 % slower at 4096^3.
    """
    sms = num_sms()
    if fast_accum and m > 512 and not _fast_accum_falls_back(m, n, sms, k):
        return _fit_smem(_rescale_wide_tile("m" if m >= 2048 else "n"), out_dtype)
    if m <= 64:
        best = None
        for nwg, tn in ((1, 16), (1, 32), (1, 64), (1, 128), (2, 128)):
            key = (*_waves_key(m, n, 64, nwg * tn, sms), nwg * tn)
            if best is None or key < best[0]:
                best = (key, nwg, tn)
        _, nwg, tn = best
        return _fit_smem(_small_m_tile(tn, num_compute_wgs=nwg), out_dtype)
    if m <= 512:
        best = None
        for tn in (256, 128, 64, 32):
            cost = _mid_m_cost(m, n, k, 128, tn, sms)
            if best is None or cost < best[0] * 0.97:  # wider tiles on near-ties
                best = (cost, tn)
        tn = best[1]
        if tn >= BLOCK and m > 128:  # (one row of tiles, M <= 128: not timed with it; e.g. 128 x 28672 x 4096
            return _fit_smem(_two_block_step_tile(), out_dtype)  # ran 0.76 of per-channel with 64 x 256 tiles)
        return _fit_smem(_two_wg_tile("m", tn, steps=4 if tn > BLOCK else 6), out_dtype)
    return _fit_smem(_promoted_tile_cost(m, n, sms, k)[1], out_dtype)


#: Time per output element at full waves relative to the three-warpgroup 192 x 128 tile (H100 tile sweeps
#: and grid timings, h100_block_m_tail.json / h100_block_grid13_*.json).  With the rows-past rule of
#: _promoted_tile_cost the heuristic takes the faster promoted tile at 23 of 27 measured (M, N, K) from
#: M = 768 to 4096 (misses: 1024 x 8192 x 28672 by 6 % (since: the 128 x 192 tile), 1024 x 57344 x 8192
#: 4 %, 2048 x 4096^2 1.5 %, 768 x 10240 x 8192 a tie) and keeps or drops fast_accum's rescaled 128 x 256 tile
#: right at 20 of 20.
#: "wide" (2 x 64 x 192, :func:`_wide_tile`): at full waves level with three warpgroups at 4096 x 28672 x 4096
#: (H100: 784.8 vs 781.2 us) and 5 % behind at 8192^3 (893.6 vs 847.9, h100_block_wgmma_groups_rejected.json);
#: against the two-block tile at M = 1024 it won only where the wave model gave it >= 10 % less time at
#: that rate (6144 x 4096 45.4 vs 46.8 us, 28672 x 4096 212.4 vs 216.3, 57344 x 8192 805.8 vs 878.1) and
#: lost or won by a few % at 0.94 (8192^2 123.0 vs 118.7, 8192 x 28672 416.2 vs 434.0;
#: h100_block_wide_sweep{,2}.json): costed 1.1 up to K = 8192, and less at longer K (:func:`_wide_rel_time`).
#: "two_block" (2 x 64 x 128, two K blocks a step, :func:`_two_block_step_tile`): 1.2; since its stages are
#: released early (``early_release``, 0-11 % faster: results/h100_ab_block_release.md) 1.1 at K <= 4096
#: ("two_block_short_k", :func:`_two_block_rel_time`): at M = 2048 it then wins at 4096 x 4096 (61.6 vs 64.6
#: us, the model: 0.89 of three warpgroups' waves x tile area) and at no other grid shape.  Against the 128 x
#: 192 tile, whose time was fitted against the two-block tile costed 1.2, it keeps 1.2 at any K: with early
#: release the 128 x 192 tile still won at three of the four M = 1024 grid shapes where it is taken (6144 x
#: 4096 45.0 vs 46.3 us, 57344 x 8192 798.2 vs 859.8, 8192 x 28672 415.0 vs 422.6; 28672 x 4096 213.5 vs
#: 208.7).
#: "two_block_cluster": the two-block tile as clusters of two CTAs along M (``cluster="m"``: the weight tile
#: multicast) where the weight is large (:data:`_CLUSTER_WEIGHT_BYTES`), 1.14: at 1024 x 8192 x 28672 it ran
#: 388.2 us against the 128 x 192 tile's 407.6 (the model's break-even 1.157), at 1024 x 57344 x 8192 792.5 vs
#: 784.8 (break-even 1.12; results/h100_ab_block_cluster.md).
_REL_TIME = {
    "three_wg": 1.0,
    "two_block": 1.2,
    "two_block_short_k": 1.1,
    "two_block_cluster": 1.14,
    "wide": 1.1,
    "rescale_wide": 1.03,
}
#: Weight bytes (N x K, fp8) from which the two-block tile at M > 512 runs as clusters of two CTAs along M
#: (4x the H100's 50 MB L2).  H100, same run, clustered vs not (results/h100_ab_block_cluster.md): 7-9 % faster
#: at the two grid weights this large (8192 x 28672: M = 1024 419.6 -> 388.2 us, 2048 852.1 -> 777.5, 4096
#: 1704.1 -> 1562.6; 57344 x 8192 at M = 1024 862.9 -> 792.5), 1-4 % slower at the six smaller ones
#: (M = 1024: 10240 x 8192 139.8 -> 145.8, 8192^2 114.5 -> 117.1, 28672 x 4096 207.3 -> 209.4).
_CLUSTER_WEIGHT_BYTES = 200_000_000
#: The K up to which the 128 x 192 tile costs _REL_TIME["wide"]; past it its excess over three warpgroups
#: shrinks as 1 / K (a per-tile cost spread over a longer main loop).
_WIDE_REL_K = 8192


def _two_block_rel_time(k: int | None) -> float:
    """The two-block tile's time per output element relative to three warpgroups: 1.1 up to K = 4096
    (_REL_TIME["two_block_short_k"]), 1.2 (_REL_TIME["two_block"]) at longer K or without K.

    H100, same run (results/h100_ab_block_release.md, h100_block_wide_k_sweep.json), the time ratio
    against three warpgroups over the model's ratio of waves x tile area (the effective relative time):
    K = 4096 1.07 / 1.07 / 1.11 (M = 2048, N = 4096 / 6144 / 28672), K = 8192 1.10-1.21, K = 14336 1.11,
    K = 28672 1.23 (2048 x 8192) and ~1.15 (1280 x 8192, early release's gain estimated from the other
    long-K shapes): the longer K, the further behind three warpgroups (its pipeline of three 256-deep
    steps against four 128-deep ones)."""
    return _REL_TIME["two_block_short_k"] if k is not None and k <= 4096 else _REL_TIME["two_block"]


def _wide_rel_time(k: int | None) -> float:
    """The 128 x 192 promoted tile's time per output element relative to three warpgroups: 1.1 up to
    K = 8192, then 1 + 0.1 x 8192 / K (1.057 at K = 14336, 1.029 at 28672).

    Fitted to the tile against the two-block tile at M = 1024, H100, same run each
    (benchmarks/results/h100_block_wide_k_sweep.json), where the wave model's break-even is 1.067 at N =
    8192 (3 waves of 128 x 192 tiles against 3.9 of 128 x 128) and 1.0 at N = 10240 (3.3 against 4.8):
    N = 8192 K = 4096 / 8192 / 14336 / 28672 65.0 vs 62.9, 124.1 vs 118.7, 210.0 vs 213.0, 416.7 vs
    439.5 us (wide slower, slower, faster, faster), N = 10240 K = 14336 / 28672 282.6 vs 266.1, 560.4 vs
    545.3 (slower both): effective 1.10 / 1.12 / 1.05 / 1.01 and 1.06 / 1.03.  Without K: 1.1."""
    if k is None or k <= _WIDE_REL_K:
        return _REL_TIME["wide"]
    return 1.0 + (_REL_TIME["wide"] - 1.0) * _WIDE_REL_K / k

#: The last wave's time with stream-K (tail_split=2, a tail of at most half a wave) relative to a whole
#: wave.  Not the half of a wave that halving the tail tiles' K suggests: H100, the part-full last wave
#: of 44 tiles already ran faster than a full one, and the K ranges add a pipeline fill, the exchange
#: (0-3 us, h100_block_tail_ab.json) and the wait for the slowest contributor.  Measured (same run,
#: h100_block_tail_sweep.json) at 192 x 128 tiles: 5.33 waves (2048 x 8192^2, 2048 x 8192 x 28672,
#: 4096 x 4096^2, 4096 x 4096 x 14336) 1.5-6 % faster, 1.45 waves (1024 x 4096 x 14336) 13 %.
_TAIL_WAVE = 0.75
#: Cut the last wave only where the model saves at least this share of the time: a tail after many whole
#: waves saves little and measured within noise either way (H100, per-channel / block, whole vs cut in
#: h100_block_grid13 vs grid14: 2048 x 57344 x 8192, 37 waves + 44 tiles, 0.86 -> 0.85; 8192 x 10240 x
#: 8192, 26 waves + 8 tiles, 0.88 -> 0.87).
_TAIL_MIN_GAIN = 0.02


def _wave_cost(
    m: int, n: int, cta_m: int, cta_n: int, sms: int, rel_time: float, tail_wave: float = 1.0
) -> float:
    """Waves of CTA tiles x tile area x relative time: the persistent grid's time up to a constant
    (each wave is as long as its tiles however few there are; the last row of tiles is fully
    computed, see the row clamp in ``_kernel``).  ``tail_wave``: the part-full last wave's share of a
    whole one (1: as long; :data:`_TAIL_WAVE` with stream-K)."""
    full, tail = divmod(_cdiv(m, cta_m) * _cdiv(n, cta_n), sms)
    return (full + (tail_wave if tail else 0)) * cta_m * cta_n * rel_time


def _tail_split(m: int, n: int, k: int, cfg: BlockTuningConfig, sms: int) -> int:
    """2 (stream-K over the last wave) where ``cfg``'s tiles leave a last wave at most half full, after
    few enough whole waves that cutting it saves >= _TAIL_MIN_GAIN by the model, and K cuts into two
    ranges of whole pipeline steps at least the pipeline deep; else 1.  A fuller tail gains nothing
    from two ranges (some CTAs would run two of them) and measured slower (H100,
    h100_block_tail_sweep.json: 2048 x 4096 x 4096 / 14336, 2.67 waves of 192 x 128 tiles, 64.5 ->
    71.5 / 203.9 -> 212.0 us); three ranges there (two a CTA, 2/3 of a wave in the model) were no
    better: 64.2 -> 80.0, 202.7 -> 203.7, and 1-2 % slower at 2048 x 10240 x 8192 and 4096 x 8192^2;
    at a half-full tail they were within 1.2 % of two ranges (h100_block_tail_sweep3.json)."""
    tiles = _cdiv(m, cfg.cta_tile_m) * _cdiv(n, cfg.cta_tile_n)
    full, tail = tail_plan(tiles, sms, 2)
    gain = (1 - _TAIL_WAVE) / (full // sms + 1)  # the model's saving: a quarter of a wave over all the waves
    if (
        tail
        and 2 * tail <= sms
        and gain >= _TAIL_MIN_GAIN
        and tail_split_error(dataclasses.replace(cfg, tail_split=2), k) is None
    ):
        return 2
    return 1


def _promoted_tile_cost(m: int, n: int, sms: int, k: int | None = None) -> tuple[float, BlockTuningConfig]:
    """M > 512, promoted accumulation: three 64 x 128 warpgroups along M (192 x 128 CTA tiles), two
    with two K blocks a step (128 x 128) or two 64 x 192 warpgroups (128 x 192, :func:`_wide_tile`),
    whichever the wave cost model gives less time (three, then two-block, on ties), and not three where
    192-row tiles put more than 5 % of M in rows past it.  In the Llama-3 grid the 128 x 192 tile is
    taken at 1024 x 6144 x 4096, 1024 x 28672 x 4096 and 1024 x 57344 x 8192 (see _REL_TIME,
    :func:`_wide_rel_time`).  Where the weight is >= :data:`_CLUSTER_WEIGHT_BYTES` the two-block tile is
    clustered along M (``cluster="m"``, _REL_TIME["two_block_cluster"]): 1000 / 1024 x 8192 x 28672 in the
    grid.  H100, per-channel kernel time / block time (h100_block_m_tail.json): three warpgroups 0.87
    vs 0.65 at 768 x 4096^2, 0.96 vs 0.79 at 1100 x 8192^2, 0.91 vs 0.82 at 1536 x 28672 x 4096, 0.85 vs
    0.75 at 4096 x 8192^2; two-block tiles 0.80 vs 0.62 at 1024 x 4096 x 14336 and 0.83 vs 0.64 at 1024
    x 6144 x 4096."""
    three_cfg = _three_wg_tile("m", width=4)
    # With K known, three-warpgroup tiles whose last wave is at most half full cut it into two K ranges
    # (stream-K, see _tail_split); two-block tiles are never cut (not measured where it would apply).
    split = 1 if k is None else _tail_split(m, n, k, three_cfg, sms)
    three = _wave_cost(m, n, 3 * 64, BLOCK, sms, _REL_TIME["three_wg"], _TAIL_WAVE if split > 1 else 1.0)
    two_rel = _two_block_rel_time(k)
    two_cfg = _two_block_step_tile()
    two_rows = m
    if k is not None and n * k >= _CLUSTER_WEIGHT_BYTES:
        two_rel, two_cfg = _REL_TIME["two_block_cluster"], dataclasses.replace(two_cfg, cluster="m")
        # Clusters take rows of tiles in pairs: an odd count computes its last row twice (H100, 600 x
        # 57344 x 8192, five rows of 128: 601.3 us clustered, 515.3 not, 494.6 with 128 x 192 tiles).
        two_rows = 2 * _cdiv(m, 2 * 128) * 128
    two = _wave_cost(two_rows, n, 128, BLOCK, sms, two_rel)
    # 192-row tiles whose rows past M (computed again by the clamped last row of tiles) are over 5 % of
    # M ran slower than the model says: M = 1024 (128 of 1152 rows), H100 per-channel time / block time
    # 0.76 / 0.73 / 0.75 vs 0.81 / 0.77 / 0.78 with two-block tiles at 28672 x 4096 / 10240 x 8192 /
    # 8192^2, where the model gave three warpgroups 2 % / 0 % / 6 % less time (it was right at 8192 x
    # 28672 and 57344 x 8192: 0.76 / 0.79 vs 0.71 / 0.76).  M = 2048 and 4096 (3 %) follow the model.
    wide = _wave_cost(m, n, 128, WIDE_TILE_N, sms, _wide_rel_time(k))
    rows_past = (_cdiv(m, 3 * 64) * 3 * 64 - m) - (_cdiv(m, 128) * 128 - m)
    three_ok = rows_past <= 0.05 * m
    if three_ok and three <= min(two, wide):
        return three, dataclasses.replace(three_cfg, tail_split=split)
    # (the 128 x 192 tile against the two-block tile at the cost its time was fitted with, see _REL_TIME:
    # 1.2 unclustered, two_block_cluster's own clustered; never where three warpgroups would take less time)
    fitted = two if two_cfg.cluster else two * _REL_TIME["two_block"] / two_rel
    if wide < fitted and not (three_ok and three <= wide):
        return wide, _wide_tile()
    return two, two_cfg


def _fast_accum_falls_back(m: int, n: int, sms: int, k: int | None = None) -> bool:
    """512 < M < 2048: whether ``fast_accum`` keeps the promoted tile because fast_accum's 128 x 256
    rescaled tiles would take longer by the wave cost model (a part-empty last wave that the smaller
    promoted tiles fill).  H100 (h100_block_m_tail.json), per-channel time / block time: 1024 x 6144 x
    4096 promoted 0.82 vs rescaled 0.70, 1024 x 10240 x 8192 0.77 vs 0.73, 1536 x 28672 x 4096 0.91
    vs 0.85, 768 x 4096 x 14336 0.89 vs 0.75; kept: 1024 x 4096^2 0.87 vs 0.81, 768 x 10240 x 8192 0.86
    vs 0.79, 1024 x 8192 x 28672 0.86 vs 0.71.  With the 128 x 192 promoted tile (h100_block_wide_tail_fa600.json):
    600 x 4096^2 24.6 vs 28.3 us, 600 x 4096 x 14336 71.3 vs 81.0, 600 x 28672 x 4096 137.0 vs 144.0."""
    if not 512 < m < 2048:
        return False
    promoted, _ = _promoted_tile_cost(m, n, sms, k)
    return promoted < _wave_cost(m, n, 128, 2 * BLOCK, sms, _REL_TIME["rescale_wide"])


def candidate_configs(
    m: int, n: int, k: int, out_dtype=jnp.bfloat16, limit: int | None = None, fast_accum: bool = False
):
    """The tile sweep's search space: the heuristic default first.  Rescaled-accumulation tiles
    (tensor-core accumulation across K blocks) only with ``fast_accum``: they change the numerics."""
    cands = [default_config(m, n, k, out_dtype, fast_accum)]
    if m <= 64:
        # Most informative first (the GPU check sweeps a prefix of this list).
        cands += [
            _rescale(_small_m_tile(32)),
            _rescale(_small_m_tile(64)),
            _rescale(_small_m_tile(128, num_compute_wgs=2)),
        ]
        cands += [
            _small_m_tile(32, tile_k=BLOCK),
            _small_m_tile(16),
            _small_m_tile(64),
            _small_m_tile(32, steps=12),
            _small_m_tile(128),
            _small_m_tile(128, num_compute_wgs=2),
            _small_m_tile(64, num_compute_wgs=2),
            _small_m_tile(64, tile_k=BLOCK),
            _small_m_tile(16, tile_k=BLOCK),
        ]
    elif m <= 512:
        cands += [_rescale(_two_wg_tile("m", tn, steps=6 if tn < BLOCK else 5)) for tn in (128, 64, 32)]
        cands += [_rescale_wide_tile("n"), _rescale_wide_tile("m", steps=3)]
        cands.append(_two_block_step_tile())
        cands.append(_two_wg_tile("m", BLOCK, steps=6))
        cands.append(_two_wg_tile("m", 256, steps=4))
        for tn in (128, 64, 32):
            cands.append(_two_wg_tile("m", tn, steps=6))
        cands.append(dataclasses.replace(_two_wg_tile("m", 64, steps=4), tile_k=2 * BLOCK))
        cands.append(_two_wg_tile("n", 64, steps=6))
        cands.append(_two_wg_tile("n", 128, steps=5))
    else:
        # Most informative first (the GPU check sweeps a prefix of this list: at M >= 2048 the default is the
        # three-warpgroup tile and the two-blocks-a-step tile comes next, below it the other way round).  The
        # overlapped promotion variants (config.overlap) come last: on an H100 they ran at 0.17-0.34 of the
        # per-channel kernel (ptxas still serializes the wgmmas and spills), the plain 2 x 64 x 128
        # tile at 0.75-0.77 (benchmarks/results/h100_block_sweep.json), 3 x 64 x 128 at 0.78-0.84, two K
        # blocks a step 0.76-0.80 at M = 4096 (h100_block_k256_sweep.json).
        cands += [
            _three_wg_tile("m", width=4),
            _two_block_step_tile(),  # two K blocks a step: half the wait-and-promote points per K
            _wide_tile(),
            dataclasses.replace(_two_block_step_tile(), cluster="m"),  # the weight tile multicast (large weights)
            _wide_tile(width=4),
            dataclasses.replace(_three_wg_tile("m", width=4), epi_slots=2),  # H100: within 1-2 % of one slot
            _two_wg_tile("m", BLOCK, steps=5),
            _three_wg_tile("m"),
            _three_wg_tile("m", grid_minor="n"),
            _three_wg_tile("m", width=16),
            _three_wg_tile("m", steps=3),
            _three_wg_tile("n", steps=3),
            _rescale_wide_tile("n"),
            _rescale(_two_wg_tile("m", BLOCK, steps=5)),
            _rescale_wide_tile("m", steps=4),
            _rescale_wide_tile("n", steps=3),
            _rescale_wide_tile("n", grid_minor="n"),
            _rescale_wide_tile("n", width=16),
            _large_m_tile(),
            _large_m_tile(steps=3, width=8),
            _large_m_tile(grid_minor="n"),
            _large_m_tile(width=16),
            _large_m_tile(width=4),
            _two_wg_tile("m", 256, steps=3, epi_slots=2),
        ]
        for wgd, st, gmd, gw in (
            ("m", 4, "m", 8),
            ("n", 4, "m", 8),
            ("m", 5, "n", 8),
            ("m", 5, "m", 16),
            ("m", 5, "m", 1),
            ("n", 5, "m", 8),
            ("m", 6, "m", 8),
            ("m", 4, "n", 8),
            ("n", 4, "n", 8),
            ("m", 3, "m", 8),
            ("n", 4, "m", 16),
            ("m", 4, "m", 16),
        ):
            cands.append(_two_wg_tile(wgd, 128, steps=st, grid_minor=gmd, width=gw))
        # stream-K over the last wave (tail_split): the two promoted large-M tiles, each K cut 2 and 4 ways
        cands += [
            dataclasses.replace(t, tail_split=s)
            for s in (2, 4)
            for t in (_three_wg_tile("m", width=4), _two_block_step_tile())
        ]
        cands += [
            _overlap(_two_wg_tile("m", 128, steps=5)),
            _overlap(_two_wg_tile("m", 128, steps=3, epi_slots=1), tile_k=2 * BLOCK),
            _overlap(_two_wg_tile("n", 128, steps=4)),
            _overlap(_two_wg_tile("m", 128, steps=4, width=16)),
            _overlap(_two_wg_tile("m", 128, steps=5, grid_minor="n")),
        ]
    out, seen = [], set()
    for c in cands:
        c = _fit_smem(c, out_dtype)
        if c in seen or (c.rescale and not fast_accum) or tail_split_error(c, k):
            continue
        seen.add(c)
        try:
            _validate_config(c, out_dtype)
        except ValueError:
            continue
        out.append(c)
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------
# The kernel.
# ----------------------------------------------------------------------------


def _kernel(
    a_gmem,
    b_gmem,
    ast_gmem,
    bs_gmem,
    *rest,
    config: BlockTuningConfig,
    has_bias: bool,
    m: int,
    n: int,
    k: int,
    tail: tuple[int, int] = (0, 0),
    interpret: bool = False,
):
    rest = list(rest)
    bias_gmem = rest.pop(0) if has_bias else None
    out_gmem, *ws = rest

    dtype = a_gmem.dtype
    out_dtype = out_gmem.dtype
    c = config
    tile_m, tile_n, tile_k = c.tile_m, c.tile_n, c.tile_k
    cta_m, cta_n = c.cta_tile_m, c.cta_tile_n
    m_iters, n_iters, k_iters = _cdiv(m, cta_m), _cdiv(n, cta_n), _cdiv(k, tile_k)
    n_blocks, k_blocks = bs_gmem.shape
    sub = tile_k // BLOCK  # K scale blocks per pipeline step
    n_part = _piece_cols(c)  # columns of one promoted register tile (a weight-scale block, or 64)
    n_sub = tile_n // n_part  # promoted register tiles per warpgroup tile (1, 2, or 3 when 192 wide)
    wide = tile_n == WIDE_TILE_N
    nwg = c.num_compute_wgs
    epi_m = c.epi_tile_m or tile_m
    epi_n = c.epi_tile_n or tile_n
    n_epi = (tile_m // epi_m) * (tile_n // epi_n)
    n_slots = min(c.epi_slots, n_epi)

    # Overlapped promotion (ping-pong accumulators) needs >= 2 pipeline steps: with one step
    # delay_release=1 would release no stage at all (see the synchronization notes in _kernel).
    overlap = c.overlap and k_iters >= 2
    delay_release = 1 if overlap else 0
    # config.early_release: the body arrives on the pipeline's consumed barriers (one per input)
    # itself, right after the step's wgmma completes (see mma_body).
    early_release = c.early_release
    # One pipeline depth for whole-K tiles and tail K ranges: they share the stage buffers.
    steps = max(1, min(c.max_concurrent_steps, k_iters))

    # Stream-K over the last wave (config.tail_split, see tail_plan): n_full whole-K tiles, then
    # n_tail tiles cut into `split` K ranges of k_piece (or k_piece + 1) steps each.
    split = c.tail_split if tail[1] else 1
    grid_m, grid_n = _cluster_tiles(m_iters, n_iters, c.cluster)
    n_full, n_tail = tail if split > 1 else (grid_m * grid_n, 0)
    units = n_full + n_tail * split
    k_piece, k_extra = divmod(k_iters, split)  # the first k_extra K ranges take one step more
    if split > 1:
        assert k_piece >= steps, (k_iters, split, steps)
        (ws_gmem,) = ws
        # One semaphore per tail tile and warpgroup: contributors signal, the owner waits (and
        # brings it back to zero, as Mosaic GPU expects of its global semaphores).  Interpret mode
        # (no global semaphores in jax 0.11.2's interpreter) runs one CTA, which reaches every
        # contributor before any owner: no synchronization needed there.
        sems = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR((n_tail, nwg)))

    in_swizzle = _pick_swizzle(tile_k, k, dtype)
    assert in_swizzle is not None, (tile_k, k)
    in_transforms = _swizzle_transforms(in_swizzle, dtype)
    out_transforms = _swizzle_transforms(_pick_swizzle(epi_n, n, out_dtype), out_dtype)

    # config.cluster: the operand tile the cluster's two CTAs share is multicast (each loads half).
    shared_a = ("cluster",) if c.cluster == "n" else ()
    shared_b = ("cluster",) if c.cluster == "m" else ()

    def pipeline(body, compute_context, grid=(k_iters,)):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=grid,
            memory_registers=_MEMORY_REGISTERS[nwg],
            in_specs=[
                plgpu.BlockSpec(
                    (cta_m, tile_k),
                    lambda kk: (0, kk),
                    transforms=in_transforms,
                    memory_space=plgpu.SMEM,
                    delay_release=delay_release,
                    collective_axes=shared_a,
                ),
                plgpu.BlockSpec(
                    (cta_n, tile_k),
                    lambda kk: (0, kk),
                    transforms=in_transforms,
                    memory_space=plgpu.SMEM,
                    delay_release=delay_release,
                    collective_axes=shared_b,
                ),
                # One step's activation scales of the CTA's rows: one contiguous f32 box.
                plgpu.BlockSpec((sub, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM, delay_release=delay_release),
            ],
            wg_axis="wg",
            num_compute_wgs=nwg,
            max_concurrent_steps=steps,
            compute_context=compute_context,
            manual_consumed_barriers=early_release,
        )

    ignore = lambda *_, **__: None
    bias_dt = bias_gmem.dtype if has_bias else jnp.float32

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, ast_gmem),
        out_smem=plgpu.SMEM((nwg, n_slots, epi_m, epi_n), out_dtype, transforms=out_transforms),
        bias_bars=plgpu.Barrier(num_barriers=nwg),
        # one row per warpgroup, each on TMA's 128-byte grid (see tma_row_len)
        bias_smem=plgpu.SMEM((nwg, tma_row_len(tile_n, bias_dt)), bias_dt),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem, bias_bars, bias_smem):
        @plgpu.nd_loop((units,), collective_axes="cluster_grid" if c.cluster else "sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (u,) = info.index
            if split > 1:
                lin, is_full, is_owner, t_rel, piece = _tail_unit(u, n_full, n_tail, split)
            else:
                lin = u
            m_idx, n_idx = plgpu.planar_snake(
                lin, (grid_m, grid_n), 0 if c.grid_minor_dim == "m" else 1, c.grid_tile_width
            )
            # Clusters walk pairs of CTA tiles; the cluster's CTA 0 / 1 takes the first / second.  Past an
            # odd tile count the second CTA still takes part in the shared loads: it computes the last row
            # (column) of tiles again and writes the same values.  (Left past the edge, its loads were all
            # TMA zero fill, which is slow: H100, 384 x 57344 x 8192, three rows of 128, 314.4 us
            # unclustered, 516.4 clustered, 406.8 with the last row computed again: four rows' work.)
            if c.cluster == "m":
                m_idx = jnp.minimum(m_idx * 2 + lax.axis_index("cluster"), m_iters - 1)
            elif c.cluster == "n":
                n_idx = jnp.minimum(n_idx * 2 + lax.axis_index("cluster"), n_iters - 1)
            # The last row of CTA tiles ends at M instead of past it (see _row_start): H100, 1024 x 4096
            # x 14336 with 192-row tiles, the sixth a third full, ran 144 us unclamped against 1152 x 4096
            # x 14336's 128 us with the same tile count (h100_block_m_tail.json).
            cta_m_slice = pl.ds(_row_start(m_idx, cta_m, m), cta_m)
            cta_n_slice = pl.ds(n_idx * cta_n, cta_n)

            def wg_col0(wg):
                return n_idx * cta_n + (wg * tile_n if c.wg_dimension == "n" else 0)

            def wg_operands(wg, a_smem, b_smem):
                """This warpgroup's A tile, B tile and rows of the step's activation scales."""
                if c.wg_dimension == "m":
                    rows = pl.ds(wg * tile_m, tile_m)
                    return a_smem.at[rows], b_smem, rows
                return a_smem, b_smem.at[pl.ds(wg * tile_n, tile_n)], slice(None)

            def compute_context(eval_pipeline, is_piece=False):
                wg = lax.axis_index("wg")
                col0 = wg_col0(wg)
                if c.wg_dimension == "m":
                    wg_m_slice, wg_n_slice = pl.ds(wg * tile_m, tile_m), slice(None)
                else:
                    wg_m_slice, wg_n_slice = slice(None), pl.ds(wg * tile_n, tile_n)

                if has_bias:
                    plgpu.copy_gmem_to_smem(
                        bias_gmem.at[pl.ds(col0, tile_n)], bias_smem.at[wg, pl.ds(0, tile_n)], bias_bars.at[wg]
                    )

                # The promoted f32 total: one register tile per 128-wide weight-scale block
                # of the warpgroup's N tile (a 256-wide tile is two blocks, multiplied one
                # after the other through one temporary accumulator).
                totals0 = tuple(
                    plgpu.layout_cast(jnp.zeros((tile_m, n_part), jnp.float32), plgpu.Layout.WGMMA)
                    for _ in range(n_sub)
                )
                if c.rescale:
                    totals = _rescale_scope(eval_pipeline, totals0[0], wg)
                elif overlap:
                    totals = _overlap_scope(eval_pipeline, totals0[0])
                else:
                    totals = eval_pipeline(totals0)
                if not is_piece:
                    epilogue(totals, wg, wg_m_slice, wg_n_slice)
                    return

                # A K range of a tail tile: contributors hand their partial total to the owner
                # through the workspace; the owner adds them (in a fixed order: deterministic).
                if _TAIL_ABLATION == "no_exchange":  # measurement only: wrong results (see _TAIL_ABLATION)

                    @pl.when(~is_owner)
                    def _skip():
                        if has_bias:
                            plgpu.barrier_wait(bias_bars.at[wg])

                    pl.when(is_owner)(lambda: epilogue(totals, wg, wg_m_slice, wg_n_slice))
                    return

                @pl.when(~is_owner)
                def _contribute():
                    if has_bias:  # (the bias copy was issued for every unit: complete its barrier phase)
                        plgpu.barrier_wait(bias_bars.at[wg])
                    slot = piece * n_tail + t_rel
                    for h, tot in enumerate(totals):
                        ws_gmem.at[slot, wg, h][...] = tot
                    if sems is not None:
                        plgpu.semaphore_signal(sems.at[t_rel, wg], 1, memory_scope="gpu")

                @pl.when(is_owner)
                def _own():
                    if sems is not None:
                        plgpu.semaphore_wait(sems.at[t_rel, wg], split - 1, memory_scope="gpu")
                    tots = list(totals)
                    for jj in range(split - 1):
                        for h in range(n_sub):
                            part = plgpu.load(
                                ws_gmem.at[jj * n_tail + t_rel, wg, h], layout=plgpu.Layout.WGMMA, optimized=False
                            )
                            tots[h] = tots[h] + part
                    epilogue(tuple(tots), wg, wg_m_slice, wg_n_slice)

            def epilogue(totals, wg, wg_m_slice, wg_n_slice):
                """Bias, cast, and the store through shared memory + TMA."""
                if has_bias:
                    plgpu.barrier_wait(bias_bars.at[wg])
                ys = []
                for h, y in enumerate(totals):
                    if has_bias:
                        bias = plgpu.load(
                            bias_smem.at[wg, pl.ds(h * n_part, n_part)], layout=plgpu.Layout.WGMMA.reduce(0)
                        )
                        y = y + lax.broadcast_in_dim(bias.astype(jnp.float32), (tile_m, n_part), [1])
                    ys.append(y.astype(out_dtype))

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                count = 0
                for h, y in enumerate(ys):
                    for ei in range(tile_m // epi_m):
                        for ej in range(n_part // epi_n):
                            e_m = slice(ei * epi_m, (ei + 1) * epi_m)
                            e_n = slice(ej * epi_n, (ej + 1) * epi_n)
                            o_n = slice(h * n_part + ej * epi_n, h * n_part + (ej + 1) * epi_n)
                            slot = count % n_slots
                            count += 1
                            plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)
                            out_smem[wg, slot] = y[e_m, e_n]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m_slice, wg_n_slice].at[e_m, o_n],
                            )

            def mma_body(idx, a_smem, b_smem, as_smem, *rest, k_step0=0):
                (kk,) = idx
                *consumed, totals = rest  # (the consumed barriers with config.early_release)
                kk = kk + k_step0  # (a tail tile's K range starts at step k_step0)
                wg = lax.axis_index("wg")
                a_t, b_t, as_rows = wg_operands(wg, a_smem, b_smem)
                col0 = wg_col0(wg)

                def release():
                    # config.early_release: every read of this step's stage is done (the wgmma has
                    # completed, the activation scales are in registers): hand it back now.
                    for bar in consumed:
                        plgpu.barrier_arrive(bar)

                if wide:
                    return wide_step(kk, a_t, b_t, as_smem, as_rows, col0, totals, release)
                a_scales = []
                new_totals = []
                for h in range(n_sub):
                    b_h = b_t.at[pl.ds(h * n_part, n_part)] if n_sub > 1 else b_t
                    # Past the last N block (a tile beyond N): clamp; its output is clipped by the
                    # TMA store anyway.
                    nb = jnp.minimum(col0 // BLOCK + h, n_blocks - 1)

                    def step(*acc_refs, h=h, b_h=b_h, nb=nb):
                        for j, acc_ref in enumerate(acc_refs):
                            if sub == 1:
                                plgpu.wgmma(acc_ref, a_t, b_h.T)
                            else:
                                ks = pl.ds(j * BLOCK, BLOCK)
                                plgpu.wgmma(acc_ref, a_t.at[:, ks], b_h.at[:, ks].T)
                        # Scale loads overlap the asynchronous wgmma.  A K block past K (last
                        # step of a K that is not a multiple of tile_k) has zero operands: clamp.
                        b_s = [bs_gmem[nb, jnp.minimum(kk * sub + j, k_blocks - 1)] for j in range(sub)]
                        # The step's activation scales (same for every N block): loaded once.
                        a_s = (
                            []
                            if h
                            else [
                                plgpu.load(as_smem.at[j, as_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                                for j in range(sub)
                            ]
                        )
                        return [r[...] for r in acc_refs], b_s, a_s

                    accs = [plgpu.ACC((tile_m, n_part), jnp.float32) for _ in range(sub)]
                    partials, b_s, a_s = pl.run_scoped(step, *accs)
                    if h == n_sub - 1:
                        release()
                    a_scales += a_s
                    total = totals[h]
                    for j in range(sub):
                        s_row = a_scales[j] * b_s[j]
                        total = total + partials[j] * lax.broadcast_in_dim(s_row, (tile_m, n_part), [0])
                    new_totals.append(total)
                return tuple(new_totals)

            # -- 192-wide tiles (tile_n == WIDE_TILE_N) ---------------------------------------------
            #
            # The block's wgmma covers the whole 64 x 192 warpgroup tile in ONE accumulator (96
            # registers; the promoted total another 96): no serialized halves as in the 256-wide
            # tile, and per 128-deep K block 4.2 bytes of shared-memory traffic per output (TMA
            # writes plus wgmma reads; 3 x 64 x 128 tiles: 4.6, 2 x 64 x 128: 4.9).  Such a tile
            # starts at a multiple of 64 columns, so it spans two weight-scale blocks: 128 + 64
            # columns or 64 + 128.  Promotion runs per 64-column piece, each inside one block: piece
            # 0 takes the first block's scale, piece 2 the second's, piece 1 whichever holds it.
            # (Issuing the wgmma as three 64-wide groups, each promoted as soon as it completes, was
            # correct but 22-26 % slower on an H100: h100_block_wgmma_groups_rejected.json.)
            def wide_step(kk, a_t, b_t, as_smem, as_rows, col0, totals, release):
                def step(acc_ref):
                    plgpu.wgmma(acc_ref, a_t, b_t.T)
                    # Scale loads overlap the asynchronous wgmma (clamped past the last N / K block:
                    # a tile past N is clipped by the TMA store, a K block past K has zero operands).
                    kb = jnp.minimum(kk, k_blocks - 1)
                    nb0 = jnp.minimum(col0 // BLOCK, n_blocks - 1)
                    nb1 = jnp.minimum(col0 // BLOCK + 1, n_blocks - 1)
                    b_s = (bs_gmem[nb0, kb], bs_gmem[nb1, kb])
                    a_s = plgpu.load(as_smem.at[0, as_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                    return acc_ref[...], b_s, a_s

                acc, (b_s0, b_s1), a_s = pl.run_scoped(step, plgpu.ACC((tile_m, tile_n), jnp.float32))
                release()
                mid = jnp.where(col0 % BLOCK == 0, b_s0, b_s1)  # columns 64..127 of the tile
                new_totals = []
                for p, b_s in enumerate((b_s0, mid, b_s1)):
                    s_row = lax.broadcast_in_dim(a_s * b_s, (tile_m, n_part), [0])
                    new_totals.append(totals[p] + acc[:, p * n_part : (p + 1) * n_part] * s_row)
                return tuple(new_totals)

            # -- overlapped promotion (config.overlap) ---------------------------------------------
            #
            # Two wgmma accumulators used alternately.  Step k issues K block k's wgmma into one of
            # them, then wgmma_wait(1): the wgmma groups of a warpgroup complete in issue order, so
            # block k-1's group (the other accumulator) is complete while block k's runs on the
            # tensor cores; block k-1 is promoted into the f32 total with its own scales (carried
            # from step k-1 in registers: the product a_scale[rows] * b_scale, one vector) and its
            # accumulator is re-zeroed for block k+1.  With tile_k=256 the two K blocks of a step
            # alternate statically (a, then b, within every step); with tile_k=128 the step's
            # parity picks the accumulator (lax.cond).
            #
            # Shared-memory stages: the pipeline's consumed-barrier arrival for a stage follows the
            # body's return, and the memory warpgroup refills that stage right after.  Here the
            # body returns with its own wgmma still reading its stage, so every input BlockSpec has
            # delay_release=1: the arrival after step k's body releases step k-1's stage, whose
            # wgmma the wait(1) in step k has completed.  The last step's stage is never released
            # (the pipeline's quiesce only waits for steps 0..N-2) and the memory warpgroup of a
            # persistent CTA starts the next output tile's prologue as soon as that quiesce is done,
            # so the last step's body waits for ALL its wgmma groups (wgmma_wait(0)) before it
            # returns: the arrival that ends the quiesce then comes after the last read of any
            # stage of this tile.  The final promotion (the last block, already complete) runs after
            # the pipeline.  One step (k_iters == 1) would release nothing: no overlap there.
            #
            # Interpret mode (jax 0.11.2) runs wgmma synchronously and cannot store into an
            # accumulator (no rule for wgmma_accumulator_store_p), so there an accumulator is not
            # re-zeroed: its value at its last promotion is carried and subtracted instead (same
            # schedule, same scale bookkeeping; only the reset differs).
            ov_refs = {}

            def _zero_acc():
                return plgpu.layout_cast(jnp.zeros((tile_m, n_part), jnp.float32), plgpu.Layout.WGMMA)

            def _overlap_scope(eval_pipeline, total0):
                s0 = plgpu.layout_cast(jnp.zeros((tile_m,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                bases0 = (_zero_acc(), _zero_acc()) if interpret else ()

                def scope(acc_a, acc_b):
                    ov_refs["accs"] = (acc_a, acc_b)  # read by overlap_body while the pipeline traces
                    total, s_last, bases = eval_pipeline((total0, s0, bases0))
                    # Which accumulator holds the last K block is static: k_iters is.
                    i_last = 1 if sub == 2 or (k_iters - 1) % 2 else 0
                    last = (acc_a, acc_b)[i_last][...]
                    if interpret:
                        last = last - bases[i_last]
                    return (total + last * lax.broadcast_in_dim(s_last, (tile_m, n_part), [0]),)

                return pl.run_scoped(
                    scope, plgpu.ACC((tile_m, n_part), jnp.float32), plgpu.ACC((tile_m, n_part), jnp.float32)
                )

            def overlap_body(idx, a_smem, b_smem, as_smem, carry):
                (kk,) = idx
                total, s_prev, bases = carry
                accs = ov_refs["accs"]
                wg = lax.axis_index("wg")
                a_t, b_t, as_rows = wg_operands(wg, a_smem, b_smem)
                nb = jnp.minimum(wg_col0(wg) // BLOCK, n_blocks - 1)

                def scale(j):
                    # This K block's scale vector (a K block past K has zero operands: clamp).
                    b_s = bs_gmem[nb, jnp.minimum(kk * sub + j, k_blocks - 1)]
                    a_s = plgpu.load(as_smem.at[j, as_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                    return a_s * b_s

                def issue(acc_ref, j):
                    if sub == 1:
                        plgpu.wgmma(acc_ref, a_t, b_t.T)
                    else:
                        ks = pl.ds(j * BLOCK, BLOCK)
                        plgpu.wgmma(acc_ref, a_t.at[:, ks], b_t.at[:, ks].T)

                def promote(total, bases, i, s_row):
                    # Wait until at most one wgmma group (the one just issued) is in flight:
                    # accumulator i's group, issued before it, is complete.
                    done = plgpu.wgmma_accumulator_load(accs[i], wait_n=1)
                    if interpret:
                        base = bases[i]
                        bases = tuple(done if j == i else b for j, b in enumerate(bases))
                        done = done - base
                    else:
                        accs[i][...] = _zero_acc()
                    return total + done * lax.broadcast_in_dim(s_row, (tile_m, n_part), [0]), bases

                if sub == 2:
                    # Accumulator 1 holds the previous step's second K block (zeros at step 0).
                    issue(accs[0], 0)
                    s0, s1 = scale(0), scale(1)
                    total, bases = promote(total, bases, 1, s_prev)
                    issue(accs[1], 1)
                    total, bases = promote(total, bases, 0, s0)
                    s_new = s1
                else:

                    def branch(cur):
                        # Issue into accumulator `cur`, promote the other (the previous step's).
                        def f(total, s_prev, bases):
                            issue(accs[cur], 0)
                            s_row = scale(0)
                            total, bases = promote(total, bases, 1 - cur, s_prev)
                            return total, s_row, bases

                        return f

                    total, s_new, bases = lax.cond(lax.rem(kk, 2) == 0, branch(0), branch(1), total, s_prev, bases)

                @pl.when(kk == k_iters - 1)
                def _drain():
                    plgpu.wgmma_wait(0)

                return total, s_new, bases

            # -- rescaled accumulation (config.rescale) --------------------------------------------
            #
            # One accumulator carried through K in the units of the current K block's scale:
            # with s_kb = a_scale[rows, kb] * b_scale[nb, kb] (one value per row),
            #     acc_kb = acc_{kb-1} * (s_{kb-1} / s_kb) + A_kb B_kb^T,   out = acc_last * s_last,
            # which telescopes to sum_kb s_kb A_kb B_kb^T.  Each step multiplies the finished
            # accumulator by one ratio per row (on the CUDA cores) and issues the block's wgmma into
            # it (pl.run_state with an initialized accumulator; its result is awaited when the step
            # returns).  No second register tile: warpgroup tiles up to 128 x 128.  A row whose scale
            # is zero keeps the previous scale as its unit (the rows past M that TMA zero-fills, whose
            # operands are zero too): no division by zero.  The next step's weight
            # scales (a global load) are issued one step early and carried, so their latency is
            # never on the path to the wgmma.
            def _rescale_scope(eval_pipeline, acc0, wg):
                nb = jnp.minimum(wg_col0(wg) // BLOCK, n_blocks - 1)
                s0 = plgpu.layout_cast(jnp.ones((tile_m,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                b0 = tuple(bs_gmem[nb, min(j, k_blocks - 1)] for j in range(sub))
                acc, s_last, _ = eval_pipeline((acc0, s0, b0))
                return (acc * lax.broadcast_in_dim(s_last, (tile_m, n_part), [0]),)

            def rescale_body(idx, a_smem, b_smem, as_smem, carry):
                (kk,) = idx
                acc, s_prev, b_now = carry
                wg = lax.axis_index("wg")
                a_t, b_t, as_rows = wg_operands(wg, a_smem, b_smem)
                nb = jnp.minimum(wg_col0(wg) // BLOCK, n_blocks - 1)
                # Past the last K block (the last step's prefetch, or a K that is not a multiple of
                # tile_k): clamp; those blocks' operands are zero.
                b_next = tuple(bs_gmem[nb, jnp.minimum((kk + 1) * sub + j, k_blocks - 1)] for j in range(sub))
                for j in range(sub):
                    a_s = plgpu.load(as_smem.at[j, as_rows], layout=plgpu.Layout.WGMMA.reduce(1))
                    s_cur = a_s * b_now[j]
                    s_cur = jnp.where(s_cur == 0, s_prev, s_cur)  # (a NaN scale still propagates)
                    acc = acc * lax.broadcast_in_dim(s_prev / s_cur, (tile_m, n_part), [0])

                    def mma(acc_ref, j=j):
                        if sub == 1:
                            plgpu.wgmma(acc_ref, a_t, b_t.T)
                        else:
                            ks = pl.ds(j * BLOCK, BLOCK)
                            plgpu.wgmma(acc_ref, a_t.at[:, ks], b_t.at[:, ks].T)

                    if interpret:
                        # Interpret mode (jax 0.11.2) cannot run an initialized accumulator
                        # (pl.run_state + plgpu.ACC.init): the block's product goes through a fresh
                        # one and is added (the same f32 sum; the GPU adds inside the wgmma).
                        def fresh(acc_ref, mma=mma):
                            mma(acc_ref)
                            return acc_ref[...]

                        acc = acc + pl.run_scoped(fresh, plgpu.ACC((tile_m, n_part), jnp.float32))
                    else:
                        acc = pl.run_state(mma)(plgpu.ACC.init(acc))
                    s_prev = s_cur
                return acc, s_prev, b_next

            body = rescale_body if c.rescale else overlap_body if overlap else mma_body
            if split == 1:
                pipeline(body, compute_context)(
                    a_gmem.at[cta_m_slice, :],
                    b_gmem.at[cta_n_slice, :],
                    ast_gmem.at[:, cta_m_slice],
                    allocations=pipeline_allocs,
                )
                return

            @pl.when(is_full)
            def _whole_k():
                pipeline(body, compute_context)(
                    a_gmem.at[cta_m_slice, :],
                    b_gmem.at[cta_n_slice, :],
                    ast_gmem.at[:, cta_m_slice],
                    allocations=pipeline_allocs,
                )

            def k_range(k_step0, steps_in_range):
                k_cols = pl.ds(pl.multiple_of(k_step0 * tile_k, tile_k), steps_in_range * tile_k)
                pipeline(
                    functools.partial(mma_body, k_step0=k_step0),
                    functools.partial(compute_context, is_piece=True),
                    grid=(steps_in_range,),
                )(
                    a_gmem.at[cta_m_slice, k_cols],
                    b_gmem.at[cta_n_slice, k_cols],
                    ast_gmem.at[pl.ds(k_step0 * sub, steps_in_range * sub), cta_m_slice],
                    allocations=pipeline_allocs,
                )

            # K range j has k_piece + 1 steps for j < k_extra, k_piece after (a static length per
            # pipeline: two pipelines where split does not divide the K steps).
            if k_extra:
                pl.when(~is_full & (piece < k_extra))(lambda: k_range(piece * (k_piece + 1), k_piece + 1))
                pl.when(~is_full & (piece >= k_extra))(lambda: k_range(piece * k_piece + k_extra, k_piece))
            else:
                pl.when(~is_full)(lambda: k_range(piece * k_piece, k_piece))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------


def _validate(a, b, a_scale, b_scale, bias, out_dtype):
    if jnp.dtype(a.dtype) != IN_DTYPE:
        raise ValueError(f"a has dtype {a.dtype}; expected float8_e4m3fn")
    if jnp.dtype(b.dtype) != IN_DTYPE:
        raise ValueError(f"b has dtype {b.dtype}; expected float8_e4m3fn")
    m, n, k = check_gemm_operands(a, b, out_dtype, *required_alignment(out_dtype))
    kb, nb = _cdiv(k, BLOCK), _cdiv(n, BLOCK)
    for name, x, shape in (("a_scale", a_scale, (m, kb)), ("b_scale", b_scale, (nb, kb))):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected {shape} "
                f"({'(M, ceil(K/128))' if name == 'a_scale' else '(ceil(N/128), ceil(K/128))'})"
            )
        if jnp.dtype(x.dtype) != jnp.dtype(jnp.float32):
            raise ValueError(f"{name} has dtype {x.dtype}; expected float32")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},)")
        if jnp.dtype(bias.dtype) not in _BIAS_DTYPES:
            raise ValueError(f"bias has dtype {bias.dtype}; expected bfloat16, float16 or float32")


def block_scaled_mm(
    a,
    b,
    a_scale,
    b_scale,
    *,
    bias=None,
    out_dtype=jnp.bfloat16,
    config: BlockTuningConfig | None = None,
    fast_accum: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Block-scaled fp8 matmul: 1 x 128 activation groups, 128 x 128 weight blocks.

    Args:
      a: (M, K) float8_e4m3fn activations.
      b: (N, K) float8_e4m3fn weight, K-major.
      a_scale: float32 (M, ceil(K/128)) per-token per-K-group scales.
      b_scale: float32 (ceil(N/128), ceil(K/128)) per-block weight scales.
      bias: optional (N,) float32 / bfloat16 / float16.
      out_dtype: bfloat16, float16 or float32.
      config: tile configuration; None = the tuning cache's entry for this shape if any (or a tuned one
        with ``QLIN_AUTOTUNE=1``: :func:`qlin.kernels.autotune.get_block_config`), else
        :func:`default_config` (always that in interpret mode).
      fast_accum: let the default tiles accumulate the K blocks in the tensor core (rescaled
        accumulation: faster at M > 512, the per-channel kernel's accumulation error instead of
        per-block float32 promotion).  Ignored when ``config`` is given (its ``rescale`` decides).
      interpret: run in Mosaic GPU interpret mode (CPU).  There the default's three-warpgroup
        tiles (M >= 2048) run as two warpgroups: jax 0.11.2's interpreter can deadlock with four
        warpgroups per CTA (the same kernel code, checked on the GPU and cross-lowered in CI),
        and a cut last wave (``tail_split``) runs its units in one CTA, without semaphores.
    """
    out_dtype = jnp.dtype(out_dtype)
    _validate(a, b, a_scale, b_scale, bias, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    if not isinstance(fast_accum, bool):
        raise ValueError(f"fast_accum={fast_accum!r} must be True or False")
    if config is None and not interpret:
        from qlin.kernels import autotune  # local import: avoids a cycle

        config = autotune.get_block_config(m, n, k, out_dtype, fast_accum=fast_accum, has_bias=bias is not None)
    elif config is None:
        config = default_config(m, n, k, out_dtype, fast_accum)
        if config.num_compute_wgs == 3:
            # (two warpgroups make other tiles: the last-wave cut, planned for three, is dropped)
            config = _fit_smem(
                dataclasses.replace(config, num_compute_wgs=2, max_concurrent_steps=5, tail_split=1), out_dtype
            )
    elif interpret and config.num_compute_wgs == 3:
        raise ValueError(
            f"config {config.short()}: three consumer warpgroups do not run in interpret mode (jax 0.11.2's "
            "Mosaic GPU interpreter can deadlock with four warpgroups per CTA); use num_compute_wgs <= 2 there"
        )
    _validate_config(config, out_dtype, bias is not None)
    if err := tail_split_error(config, k):
        raise ValueError(err)
    # M > 8 not a multiple of 8: pad the activation side, slice the output (see tma_rows).
    m_pad = tma_rows(m) - m
    if m_pad:
        a = jnp.pad(a, ((0, m_pad), (0, 0)))
    # (ceil(K/128), M'): one K step's scales for a CTA's rows are one contiguous TMA box; M' covers
    # whole CTA tiles so the box never leaves the array (padded scales meet zero rows of a).
    mp = m + m_pad
    a_scale_t = jnp.pad(a_scale.T, ((0, 0), (0, _cdiv(mp, config.cta_tile_m) * config.cta_tile_m - m)))
    args = [a, b, a_scale_t, b_scale]
    if bias is not None:
        args.append(bias)
    out = _call(tuple(args), config=config, has_bias=bias is not None, out_dtype=out_dtype, interpret=interpret)
    return out[:m] if m_pad else out


def tail_plan(tiles: int, sms: int, split: int) -> tuple[int, int]:
    """Stream-K over the last wave: (whole-K tiles, tail tiles cut into ``split`` K ranges).

    The tail is the tiles past the last whole wave of ``sms`` (all of them when there are fewer);
    with ``split`` > 1 the persistent grid runs every CTA's whole tiles, then the tail's
    ``tail * split`` shorter units, so the last wave is ``split`` times as fine.  No tail (a
    whole number of waves) or ``split`` = 1: every tile whole."""
    tail = tiles % sms if tiles >= sms else tiles
    if split == 1 or tail == 0:
        return tiles, 0
    return tiles - tail, tail


def _tail_unit(u, n_full: int, n_tail: int, split: int):
    """Work unit ``u`` of a cut last wave -> (tile index, whole?, owner?, tail tile, K range).

    Units: the ``n_full`` whole-K tiles, then the tail tiles' first ``split - 1`` K ranges
    ("contributors": partial total to the workspace, then a signal; range j of tail tile t is unit
    n_full + j * n_tail + t), then their last K ranges ("owners": wait, add the partials, epilogue).
    Every unit an owner waits for comes before every owner in the persistent grid's round-robin
    order and waits for nothing itself, so with all CTAs resident no wait can deadlock.  Works on
    traced and plain integers."""
    is_full = u < n_full
    p = jnp.maximum(u - n_full, 0)
    n_contrib = n_tail * (split - 1)
    is_owner = p >= n_contrib
    t_rel = jnp.where(is_owner, p - n_contrib, lax.rem(p, n_tail))
    piece = jnp.where(is_owner, split - 1, p // n_tail)
    lin = jnp.where(is_full, u, n_full + t_rel)
    return lin, is_full, is_owner, t_rel, piece


def tail_split_error(config: BlockTuningConfig, k: int) -> str | None:
    """Why ``config.tail_split`` cannot cut this K (None if it can): the K ranges are whole pipeline
    steps (K a multiple of tile_k; the ranges differ by at most one step), each at least as many as the
    pipeline's depth."""
    s = config.tail_split
    if s == 1:
        return None
    k_iters = _cdiv(k, config.tile_k)
    if k % config.tile_k:
        return f"config.tail_split={s} needs K a multiple of tile_k = {config.tile_k}; got K={k}"
    if k_iters // s < config.max_concurrent_steps:
        return (
            f"config.tail_split={s}: K ranges of {k_iters // s} steps are shorter than the pipeline "
            f"(max_concurrent_steps={config.max_concurrent_steps}); K={k} needs a smaller split"
        )
    return None


def _call(args, *, config, has_bias, out_dtype, interpret):
    if interpret and config.cluster:  # (interpret mode has no clusters: the same tiles without one)
        config = dataclasses.replace(config, cluster=None)
    a, b = args[0], args[1]
    m, k = a.shape
    n = b.shape[0]
    tiles = _cdiv(m, config.cta_tile_m) * _cdiv(n, config.cta_tile_n)
    sms = num_sms()
    n_full, n_tail = tail_plan(tiles, sms, config.tail_split)
    units = n_full + n_tail * config.tail_split
    grid, grid_names = (max(1, min(sms, units)),), ("sm",)
    kwargs = {}
    if config.cluster:
        # A persistent grid of clusters of two CTAs (one cluster per two SMs).
        gm, gn = _cluster_tiles(_cdiv(m, config.cta_tile_m), _cdiv(n, config.cta_tile_n), config.cluster)
        grid, grid_names = (max(1, min(sms // 2, gm * gn)),), ("cluster_grid",)
        kwargs.update(cluster=(2,), cluster_names=("cluster",))
    if interpret and n_tail:
        # The same units (planned for `sms` SMs) in one CTA, in order: every contributor before any
        # owner, so the interpreter (no global semaphores) needs no synchronization.
        grid = (1,)
    if interpret:
        kwargs["interpret"] = plgpu.InterpretGPUParams(num_tma_threads_per_device=64)
    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    if n_tail:
        c = config
        n_part = _piece_cols(c)
        # The contributors' partial totals: one f32 register tile per (K range, tail tile, warpgroup, piece).
        ws = jax.ShapeDtypeStruct(
            (n_tail * (c.tail_split - 1), c.num_compute_wgs, c.tile_n // n_part, c.tile_m, n_part), jnp.float32
        )
        out_type = (out_type, ws)
    f = plgpu.kernel(
        functools.partial(
            _kernel, config=config, has_bias=has_bias, m=m, n=n, k=k, tail=(n_full, n_tail), interpret=interpret
        ),
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        **kwargs,
    )
    out = f(*args)
    return out[0] if n_tail else out
