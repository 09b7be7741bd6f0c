"""A/B: the block kernel's per-K-block wgmma into a fresh accumulator with scale-d = 0 (H100 / H200).

The promoted block kernel (:mod:`qlin.kernels.mosaic_gpu_block_scaled_mm`) issues every K block's wgmma
into a fresh ``plgpu.ACC``.  jax 0.11.2 emits every wgmma with scale-d (``use_out``) = 1, so a fresh
accumulator is a zero splat put through an optimization barrier and a ``wgmma.fence``: 64 zero registers
a thread per 64 x 128 block, rewritten before every block.  With ``wgmma ... p`` and p = false the first
instruction ignores its accumulator, so the zeros need not exist.  Does that register traffic cost time?

This is a MEASUREMENT tool, not qlin code: while :func:`fresh_accumulators` is active it patches jax
0.11.2's Mosaic GPU dialect lowering (``jax.experimental.mosaic.gpu.dialect_lowering``) so that every
``mosaic_gpu.wgmma`` whose accumulator is an optimization barrier of a zero constant (a fresh ACC, that
barrier used by nothing else) has the barrier dropped and its first wgmma instruction emitted with untied
output registers and scale-d = 0 (Pallas's ``wgmma.fence`` after the barrier stays).  The results must be
bit-identical to the unpatched kernel's.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/ab_fresh_acc.py [--phases check,time] [--deadline-s 420]

``check``: odd shapes (partial M / N / K tiles) x the first candidate configs (promoted and, with
``fast_accum``, rescaled), patched and unpatched, against a float64 reference and each other.
``time``: per-channel kernel, then the block kernel's default config unpatched / patched, alternated twice
(CUPTI medians of 20 warm runs over rotated weight copies).  Writes $OUT/ab_fresh_acc.json.

H100 result (benchmarks/results/h100_block_fresh_acc_rejected.json): bit-identical at the 38 promoted check
configs; timed at 12 shapes, the patched kernel ran 0.93x at 8192^3 (856 -> 922 us) and within -1.3 % to +0.7 % of
the unpatched one elsewhere: the zero fill is not where the block kernel's time goes (ptxas handles it), so jax
0.11.2's fixed scale-d is no limit for it.  Not taken into qlin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.experimental.mosaic.gpu  # noqa: E402,F401  (loads the submodules patched below)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jaxlib.mlir import ir  # noqa: E402
from jaxlib.mlir.dialects import llvm  # noqa: E402

_WGMMA = sys.modules["jax.experimental.mosaic.gpu.wgmma"]
_DIALECT = sys.modules["jax.experimental.mosaic.gpu.dialect_lowering"]
_MARK = "qlin_fresh_accumulator"
#: what the last patched lowerings did: wgmma ops marked fresh, first instructions rewritten, barriers dropped
STATS = {"fresh_ops": 0, "fresh_instrs": 0, "dropped_barriers": 0}


def _op(value_owner):
    return getattr(value_owner, "operation", value_owner)


def _is_zero_constant(value) -> bool:
    """``value`` is a zero vector: a splat ``arith.constant`` 0 (or a ``vector.broadcast`` of a scalar 0)."""
    op = _op(value.owner)
    if isinstance(op, ir.Operation) and op.name == "vector.broadcast":
        op = _op(op.operands[0].owner)
    if not isinstance(op, ir.Operation) or op.name != "arith.constant":
        return False
    val = op.attributes["value"]
    if isinstance(val, ir.DenseElementsAttr):
        if not val.is_splat:
            return False
        val = val.get_splat_value()
    return isinstance(val, (ir.FloatAttr, ir.IntegerAttr)) and val.value == 0


def _mark_fresh(op) -> None:
    for region in op.regions:
        for block in region:
            for child in block:
                child = child.operation
                if child.name == "mosaic_gpu.wgmma":
                    barrier = _op(child.operands[0].owner)
                    uses = list(barrier.results[0].uses) if isinstance(barrier, ir.Operation) else []
                    if (
                        isinstance(barrier, ir.Operation)
                        and barrier.name == "mosaic_gpu.optimization_barrier"
                        and len(barrier.operands) == 1
                        and _is_zero_constant(barrier.operands[0])
                        and len(uses) == 1
                        and uses[0].operand_number == 0
                    ):
                        child.attributes[_MARK] = ir.UnitAttr.get()
                        barrier.attributes[_MARK] = ir.UnitAttr.get()
                        STATS["fresh_ops"] += 1
                _mark_fresh(child)


class _FirstWGMMAWithoutAccumulator:
    """Stands in for the ``llvm`` dialect module inside one ``wgmma_m64`` call: its first wgmma inline asm
    loses the tied accumulator inputs and gets scale-d = 0; everything else passes through."""

    def __init__(self):
        self.done = False

    def __getattr__(self, name):
        return getattr(llvm, name)

    def inline_asm(self, res, operands, asm, constraints, **kw):
        if self.done or "wgmma.mma_async" not in asm:
            return llvm.inline_asm(res, operands, asm, constraints, **kw)
        self.done = True
        cons = constraints.split(",")
        n_out = sum(c.startswith("=") for c in cons)
        assert cons[n_out : 2 * n_out] == [str(i) for i in range(n_out)], "unexpected wgmma operand layout"
        cons = cons[:n_out] + cons[2 * n_out :]
        ops = list(operands)[n_out:]
        i32 = ir.IntegerType.get_signless(32)
        ops[cons[n_out:].index("n")] = llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, 0)).result  # scale-d

        def renumber(m):  # operands past the dropped tied inputs move down by n_out
            i = int(m.group(1))
            return "$%d" % (i - n_out if i >= 2 * n_out else i)

        STATS["fresh_instrs"] += 1
        return llvm.inline_asm(res, ops, re.sub(r"\$(\d+)", renumber, asm), ",".join(cons), **kw)


@contextlib.contextmanager
def fresh_accumulators():
    """Within: Mosaic GPU kernels lowered (compiled) get the fresh-accumulator wgmma (see the module doc)."""
    orig_lower = _DIALECT.lower_mgpu_dialect
    orig_rules = {k: _DIALECT._lowerings[k] for k in ("mosaic_gpu.wgmma", "mosaic_gpu.optimization_barrier")}
    orig_m64 = _WGMMA.wgmma_m64
    state = {"fresh": False}

    def lower(module, launch_context, auto_barriers=True):
        for op in module.body:
            _mark_fresh(op.operation)
        return orig_lower(module, launch_context, auto_barriers=auto_barriers)

    def barrier_rule(ctx, op):
        if _MARK in op.operation.attributes:
            STATS["dropped_barriers"] += 1
            return [op.operands[0]]
        return orig_rules["mosaic_gpu.optimization_barrier"](ctx, op)

    def wgmma_rule(ctx, op):
        state["fresh"] = _MARK in op.operation.attributes
        try:
            return orig_rules["mosaic_gpu.wgmma"](ctx, op)
        finally:
            state["fresh"] = False

    def wgmma_m64(acc, *args, **kw):
        if not state["fresh"]:
            return orig_m64(acc, *args, **kw)
        state["fresh"] = False  # the op's first 64-row, first K-group call only
        _WGMMA.llvm = _FirstWGMMAWithoutAccumulator()
        try:
            return orig_m64(acc, *args, **kw)
        finally:
            _WGMMA.llvm = llvm

    _DIALECT.lower_mgpu_dialect = lower
    _DIALECT._lowerings.update({"mosaic_gpu.wgmma": wgmma_rule, "mosaic_gpu.optimization_barrier": barrier_rule})
    _WGMMA.wgmma_m64 = wgmma_m64
    try:
        yield
    finally:
        _DIALECT.lower_mgpu_dialect = orig_lower
        _DIALECT._lowerings.update(orig_rules)
        _WGMMA.wgmma_m64 = orig_m64


CHECK_SHAPES = [(77, 272, 416), (1000, 4112, 4128), (200, 1040, 1184), (16, 4096, 4224), (2100, 1536, 2080)]
TIME_SHAPES = [
    (8192, 8192, 8192), (4096, 4096, 4096), (2048, 4096, 4096), (1024, 8192, 8192), (1024, 28672, 4096),
    (1024, 4096, 14336), (2048, 8192, 28672), (4096, 28672, 4096), (1024, 10240, 8192), (2048, 10240, 8192),
    (256, 8192, 8192), (16, 8192, 8192),
]  # fmt: skip


def _compiled(patched: bool, args, many: bool = False, **kw):
    """A fresh jit of the block kernel (a new closure: no cache hit), lowered patched or not and compiled now;
    ``many``: the program that runs it once per argument set (``bench.many``, what the timer times)."""
    from qlin import bench
    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    fn = jax.jit(lambda a, b, x, y: bmm.block_scaled_mm(a, b, x, y, **kw))
    prog = jax.jit(bench.many(fn)) if many else fn
    before = STATS["fresh_instrs"]
    with fresh_accumulators() if patched else contextlib.nullcontext():
        lowered = prog.lower(args) if many else prog.lower(*args)
    rewritten = STATS["fresh_instrs"] - before
    # The patch reaches only the patched side; there, every promoted config has fresh accumulators (the
    # rescaled ones, fast_accum's, carry one accumulator through K: nothing to rewrite).
    assert rewritten == 0 if not patched else (rewritten > 0) != bool(kw.get("config") and kw["config"].rescale), (
        patched,
        rewritten,
    )
    return lowered.compile()


def phase_check(rows, dump, deadline):
    import gpu_block_check as G

    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    rng = np.random.default_rng(0)
    for m, n, k in CHECK_SHAPES:
        a, b, a_s, b_s, _ = G.host_operands(rng, m, n, k)
        ref = G.reference64(a, b, a_s, b_s)
        args = [jnp.asarray(x) for x in (a, b, a_s, b_s)]
        for fast in (False, True):
            for cfg in bmm.candidate_configs(m, n, k, fast_accum=fast, limit=5):
                if time.time() > deadline:
                    return
                row = {"kind": "check", "M": m, "N": n, "K": k, "config": cfg.short()}
                try:
                    outs = [
                        G.poisoned_call(_compiled(p, args, config=cfg), args, (m, n), jnp.bfloat16)
                        for p in (False, True)
                    ]
                    row.update(
                        rel_err_off=float(np.linalg.norm(outs[0] - ref) / np.linalg.norm(ref)),
                        rel_err_on=float(np.linalg.norm(outs[1] - ref) / np.linalg.norm(ref)),
                        max_abs_on_off=float(np.max(np.abs(outs[1] - outs[0]))),
                        finite=bool(np.all(np.isfinite(outs[1]))),
                    )
                    row["ok"] = (
                        row["finite"] and row["max_abs_on_off"] == 0.0 and row["rel_err_on"] < G.tol(jnp.bfloat16)
                    )
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:800])
                rows.append(row)
                print(row, flush=True)
        dump()


def phase_time(rows, dump, deadline):
    import gpu_block_check as G

    from qlin.kernels import mosaic_gpu_block_scaled_mm as bmm

    for m, n, k in TIME_SHAPES:
        if time.time() > deadline:
            return
        a, a_s, bs = G.device_operands(m, n, k, G.bench.n_copies(n, k))
        sets = [(a, b, a_s, b_s) for b, b_s in bs]
        ref = G.ref_block_f32(a, bs[0][0], a_s, bs[0][1])
        row = {"kind": "time", "M": m, "N": n, "K": k, "config": bmm.default_config(m, n, k).short()}
        try:
            from qlin import bench

            row["chan_us"] = G.measure_us(G.per_channel_fn(), G.channel_sets(a, a_s, bs, n))
            progs = {p: _compiled(p, sets, many=True) for p in (False, True)}
            for p, prog in progs.items():
                row[f"rel_err_{'on' if p else 'off'}"] = G.rel(prog(sets)[0], ref)
            for order in ((False, True), (True, False)):
                for p in order:
                    ms = bench.cupti_timer(progs[p], (sets,), 20)
                    row.setdefault(f"us_{'on' if p else 'off'}", []).append(float(np.median(ms)) * 1e3 / len(sets))
            off, on = float(np.mean(row["us_off"])), float(np.mean(row["us_on"]))
            row.update(speedup=off / on, chan_ratio_off=row["chan_us"] / off, chan_ratio_on=row["chan_us"] / on)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:800]
        rows.append(row)
        print(row, flush=True)
        dump()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="check,time")
    p.add_argument("--deadline-s", type=float, default=420.0)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    deadline = time.time() + args.deadline_s
    rows: list[dict] = []
    out = Path(args.out) / "ab_fresh_acc.json"

    def dump():
        out.write_text(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "stats": STATS, "rows": rows}, indent=1
            )
        )

    for phase in args.phases.split(","):
        {"check": phase_check, "time": phase_time}[phase](rows, dump, deadline)
    dump()


if __name__ == "__main__":
    main()
