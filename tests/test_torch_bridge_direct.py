"""The bridge's direct route (qlin_torch_bridge/direct.py): qlin's Mosaic GPU kernels launched from torch.

On the CPU the two kernels run in Mosaic GPU interpret mode behind a stand-in for ``as_torch_kernel``
(torch tensors in and out through DLPack), so the torch glue -- 8-row tiles, K / N padding, the
asymmetric zero-point columns, leading dims, bias -- is checked bit for bit against the JAX route
(``kernel.apply_weights``).  benchmarks/gpu_bridge_check.py runs the real launches on an H100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.kernels import mosaic_gpu_scaled_mm as mm
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel
from qlin.quantize import quantize_weight
from qlin_torch_bridge import direct
from qlin_torch_bridge.dlpack import to_jax, to_torch


def interpret_launcher(fn, in_structs):
    """``gpu_launcher`` for interpret mode: torch in, the JAX function, torch out (zero copy)."""
    jf = jax.jit(fn)
    jf.trace(*in_structs)  # the shapes the route promises are the ones it passes

    def call(*args):
        outs = jf(*[to_jax(t, name="arg") for t in args])
        if isinstance(outs, (tuple, list)):
            return tuple(to_torch(o, name="out") for o in outs)
        return to_torch(outs, name="out")

    return call


def _layer(config, n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    kernel = MosaicGPUScaledMMKernel(config, interpret=True)
    params = kernel.process_weights_after_loading(quantize_weight(w, config))
    d = direct.direct_for(kernel, params, "cpu", to_torch=lambda a: to_torch(a, name="p"),
                          launcher=interpret_launcher)
    assert d is not None
    return kernel, params, d


def _x(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


CASES = [
    # (config, N, K, x shape, x dtype, bias dtype)
    (FP8ScaledMMConfig(), 64, 256, (5, 256), torch.bfloat16, None),  # M < 8: one 8-row tile
    (FP8ScaledMMConfig(), 200, 304, (2, 7, 304), torch.float32, torch.bfloat16),  # N, K padded; lead dims
    (FP8ScaledMMConfig(weight_granularity="per_tensor"), 48, 128, (13, 128), torch.float16, torch.float32),
    (Int8ScaledMMConfig(), 64, 256, (9, 256), torch.bfloat16, torch.float32),
    (Int8ScaledMMConfig(), 64, 256, (1, 256), torch.bfloat16, torch.bfloat16),  # the JAX route: XLA's GEMV
    (Int8ScaledMMConfig(symmetric=False), 72, 208, (3, 208), torch.bfloat16, torch.bfloat16),  # zp columns
    (Int8ScaledMMConfig(symmetric=False, out_dtype=jnp.float32), 40, 256, (17, 256), torch.float32, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].describe()}-N{c[1]}K{c[2]}-x{c[3]}")
def test_direct_route_matches_the_jax_route_bit_for_bit(case):
    cfg, n, k, xshape, xdt, bdt = case
    kernel, params, d = _layer(cfg, n, k)
    x = _x(xshape, xdt)
    bias = None if bdt is None else _x((n,), bdt, seed=2)
    y = d(x, bias)
    assert y is not None and tuple(y.shape) == (*xshape[:-1], n)
    assert y.dtype == getattr(torch, jnp.dtype(cfg.out_dtype).name) and y.is_contiguous()
    want = kernel.apply_weights(params, to_jax(x, name="x"), None if bias is None else to_jax(bias, name="b"))
    np.testing.assert_array_equal(y.float().numpy(), np.asarray(want.astype(jnp.float32)))
    # a second call reuses the compiled launches (and the padded bias)
    assert d(x, bias) is not None and len(d._entries) == 1


def test_direct_route_declines_what_the_jax_route_must_handle():
    kernel, params, d = _layer(Int8ScaledMMConfig(), 64, 256)
    x = _x((4, 256), torch.bfloat16)
    assert d(_x((256, 4), torch.bfloat16).t(), None) is None  # not row-major
    assert d(x[:, :128], None) is None  # K mismatch
    assert d(x.to(torch.int32), None) is None  # dtype
    assert d(x.requires_grad_(True), None) is None
    assert d(_x((4, 256), torch.bfloat16), _x((63,), torch.float32)) is None  # bias shape
    _, _, d300 = _layer(FP8ScaledMMConfig(), 64, 300)
    assert d300(_x((4, 300), torch.bfloat16), None) is None  # K % 16 != 0: the jnp quantize, not the kernel


def test_direct_for_applies_only_to_the_fused_mosaic_path():
    to_t = lambda a: to_torch(a, name="p")  # noqa: E731
    w = jnp.ones((64, 256), jnp.float32)
    for cfg in (FP8ScaledMMConfig(activation="static"), FP8ScaledMMConfig(activation="dynamic_per_tensor")):
        k = MosaicGPUScaledMMKernel(cfg, interpret=True)
        p = k.process_weights_after_loading(quantize_weight(w, cfg, input_scale=0.1 if cfg.is_static else None))
        assert direct.direct_for(k, p, "cpu", to_torch=to_t, launcher=interpret_launcher) is None
    cfg = FP8ScaledMMConfig()
    k = MosaicGPUScaledMMKernel(cfg, interpret=True)
    p = k.process_weights_after_loading(quantize_weight(w, cfg))
    assert direct.direct_for(k, p, "cpu", to_torch=to_t) is None  # interpret kernels need a test launcher
    assert direct.direct_for(k, p.replace(input_scale_ub=jnp.float32(10.0)), "cpu", to_torch=to_t,
                             launcher=interpret_launcher) is None
    tuned = MosaicGPUScaledMMKernel(cfg, interpret=True)
    tuned.tuning = object()
    assert direct.direct_for(tuned, p, "cpu", to_torch=to_t, launcher=interpret_launcher) is None
    real = MosaicGPUScaledMMKernel(cfg, interpret=False)
    assert direct.direct_for(real, p, "cpu", to_torch=to_t) is None  # CPU tensors: never


def test_direct_route_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("QLIN_TORCH_DIRECT", "0")
    assert not direct.enabled()
    monkeypatch.setenv("QLIN_TORCH_DIRECT", "1")
    assert direct.enabled() == (direct._interop() is not None)
    monkeypatch.delenv("QLIN_TORCH_DIRECT")
    verified = tuple(jax.__version_info__[:2]) in direct.VERIFIED_JAX
    assert direct.enabled() == (verified and direct._interop() is not None)
    monkeypatch.setattr(direct, "VERIFIED_JAX", ())
    assert not direct.enabled()  # an unchecked jax: off unless forced


def test_fp8_outputs_map_to_torch_fp8_while_compiling_only():
    interop = direct._interop()
    if interop is None:
        pytest.skip("no Mosaic GPU torch interop in this jax")
    from jax._src.lib.mlir import ir

    orig = interop._mlir_to_torch_dtype
    with ir.Context():
        f8 = ir.Float8E4M3FNType.get()
        with pytest.raises(NotImplementedError):
            orig(torch, f8)  # what jax 0.11.2 does by itself
        with direct._with_fp8_outputs(interop):
            assert interop._mlir_to_torch_dtype(torch, f8) is torch.float8_e4m3fn
            assert interop._mlir_to_torch_dtype(torch, ir.Float8E5M2Type.get()) is torch.float8_e5m2
            assert interop._mlir_to_torch_dtype(torch, ir.BF16Type.get()) is torch.bfloat16
    assert interop._mlir_to_torch_dtype is orig


def test_a_shape_whose_kernels_fail_to_build_falls_back_with_a_warning():
    kernel, params, d = _layer(FP8ScaledMMConfig(), 64, 256)

    def broken(fn, in_structs):
        raise NotImplementedError("Unsupported MLIR type")

    d.launcher = broken
    with pytest.warns(RuntimeWarning, match="direct launch unavailable for M=4"):
        assert d(_x((4, 256), torch.bfloat16), None) is None
    assert "NotImplementedError" in d.build_errors[(4, torch.bfloat16, None)]
    assert d(_x((4, 256), torch.bfloat16), None) is None  # remembered: no second build, no second warning


def test_bias_padding_is_cached_until_the_bias_changes():
    kernel, params, d = _layer(FP8ScaledMMConfig(), 200, 256)
    bias = _x((200,), torch.float32, seed=3)
    first = d._bias(bias)
    assert first.shape == (d.n_pad,) and d._bias(bias) is first
    with torch.no_grad():
        bias.mul_(2)  # in place: _version moves, the padded copy is rebuilt
    again = d._bias(bias)
    assert again is not first and torch.equal(again[:200], bias)


def test_scratch_buffers_are_shared_per_stream_and_shape_and_bounded(monkeypatch):
    class FakeQuant:
        def __init__(self, rows):
            self.device = torch.device("cpu")
            self.out_specs = (((rows, 64), torch.int8), ((rows,), torch.float32))

        def new_outputs(self):
            return tuple(torch.empty(shape, dtype=dt) for shape, dt in self.out_specs)

    monkeypatch.setattr(direct, "_SCRATCH", {})
    monkeypatch.setattr(direct, "_SCRATCH_MAX_ENTRIES", 2)
    a, b, c = FakeQuant(8), FakeQuant(16), FakeQuant(24)
    first = direct._scratch(a, stream=7)
    assert direct._scratch(FakeQuant(8), stream=7) is first  # another layer, same shapes and stream: shared
    assert direct._scratch(a, stream=8) is not first  # another stream: its own buffers
    direct._scratch(b, stream=7)  # a third entry: the least recently used (a on stream 7) is dropped
    assert len(direct._SCRATCH) == 2 and direct._scratch(a, stream=7) is not first
    c.out_specs = None
    assert direct._scratch(c, stream=7) is None  # outputs the interop must place: never cached


def test_layers_of_equal_shapes_share_their_compiled_kernels(monkeypatch):
    compiled = []

    def counting_launcher(fn, in_structs):
        compiled.append(in_structs)
        return interpret_launcher(fn, in_structs)

    monkeypatch.setattr(direct, "gpu_launcher", counting_launcher)
    monkeypatch.setattr(direct, "_KERNELS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = FP8ScaledMMConfig()
    layers = []
    for n, seed in ((64, 0), (64, 1), (48, 2)):  # two layers of one shape, one of another N
        w = jnp.asarray(np.random.default_rng(seed).standard_normal((n, 256)), jnp.float32)
        kernel = MosaicGPUScaledMMKernel(cfg, interpret=True)
        params = kernel.process_weights_after_loading(quantize_weight(w, cfg))
        d = direct.DirectLinear(kernel, params, to_torch=lambda a: to_torch(a, name="p"), interpret=True)
        assert d.launcher is counting_launcher
        layers.append((kernel, params, d))
    x = _x((5, 256), torch.bfloat16)
    for kernel, params, d in layers:
        y = d(x, None)
        want = kernel.apply_weights(params, to_jax(x, name="x"))
        np.testing.assert_array_equal(y.float().numpy(), np.asarray(want.astype(jnp.float32)))
    # quantize: one kernel for all three (same M, K); GEMM: one per N
    assert len(compiled) == 3 and len(direct._KERNELS) == 3


def _at(ptr: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The CPU tensor of ``shape`` / ``dtype`` at address ``ptr`` (what a kernel sees through a pointer)."""
    import ctypes

    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    buf = (ctypes.c_char * n).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


class RawInterpretKernel:
    """``_RawKernel`` for interpret mode: ``raw``'s launch reads its arguments through the pointer array
    (as the real launch does), so the steady-state plans -- pointers filled in once, per stream and
    thread -- are checked, not just the torch glue."""

    def __init__(self, fn, in_structs):
        self.jf = jax.jit(fn)
        tdt = lambda d: getattr(torch, jnp.dtype(d).name)  # noqa: E731
        self.in_specs = tuple((tuple(s.shape), tdt(s.dtype)) for s in in_structs)
        outs = jax.tree.leaves(jax.eval_shape(fn, *in_structs))
        self.out_specs = tuple((tuple(o.shape), tdt(o.dtype)) for o in outs)
        self.device = torch.device("cpu")
        self.launches = []  # the stream of each raw launch
        self.raw = (self._launch, "fn", len(self.in_specs) + len(self.out_specs))

    def new_outputs(self):
        return tuple(torch.empty(shape, dtype=dt) for shape, dt in self.out_specs)

    def _launch(self, function, stream, arr):
        assert function == "fn"
        self.launches.append(stream)
        specs = self.in_specs + self.out_specs
        ts = [_at(arr[i], shape, dt) for i, (shape, dt) in enumerate(specs)]
        n_in = len(self.in_specs)
        res = jax.tree.leaves(self.jf(*[to_jax(t, name="arg") for t in ts[:n_in]]))
        for dst, r in zip(ts[n_in:], res):
            dst.copy_(to_torch(r, name="out"))

    def __call__(self, *args, stream=None, out=None):  # the general path (K padding, split-K)
        outs = self.new_outputs() if out is None else out
        arr = [t.data_ptr() for t in args] + [t.data_ptr() for t in outs]
        self._launch("fn", stream, arr)
        return outs[0] if len(outs) == 1 else outs


@pytest.fixture
def raw_route(monkeypatch):
    """Direct layers built with RawInterpretKernel launches on a stand-in 'stream' the test sets."""
    monkeypatch.setattr(direct, "_SCRATCH", {})
    stream = {"now": 11}
    monkeypatch.setattr(direct, "_current_stream", lambda index: stream["now"])

    def make(cfg, n, k, seed=0):
        w = jnp.asarray(np.random.default_rng(seed).standard_normal((n, k)), jnp.float32)
        kernel = MosaicGPUScaledMMKernel(cfg, interpret=True)
        params = kernel.process_weights_after_loading(quantize_weight(w, cfg))
        d = direct.direct_for(kernel, params, "cpu", to_torch=lambda a: to_torch(a, name="p"),
                              launcher=RawInterpretKernel)
        return kernel, params, d

    return make, stream


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].describe()}-N{c[1]}K{c[2]}-x{c[3]}")
def test_steady_state_launches_match_the_jax_route_bit_for_bit(case, raw_route):
    make, _ = raw_route
    cfg, n, k, xshape, xdt, bdt = case
    kernel, params, d = make(cfg, n, k)
    bias = None if bdt is None else _x((n,), bdt, seed=2)
    for seed in (1, 5):  # the second call reuses the plan with new x / output / bias addresses
        x = _x(xshape, xdt, seed=seed)
        y = d(x, bias)
        assert y is not None and tuple(y.shape) == (*xshape[:-1], n) and y.is_contiguous()
        want = kernel.apply_weights(params, to_jax(x, name="x"), None if bias is None else to_jax(bias, name="b"))
        np.testing.assert_array_equal(y.float().numpy(), np.asarray(want.astype(jnp.float32)))
    (e,) = d._entries.values()
    (plan,) = e.plans.values()
    # K padded (304 -> 320, 208 -> 256): the quantized columns are cut and re-padded: the general path
    assert (plan is None) == (e.kq != k or d.k_pad != k)
    assert e.quant.launches == [11, 11] and e.gemm.launches == [11, 11]


def test_plans_are_per_stream_and_thread_and_follow_the_shared_buffers(raw_route, monkeypatch):
    import threading

    make, stream = raw_route
    kernel, params, d = make(FP8ScaledMMConfig(), 64, 256)
    x = _x((16, 256), torch.bfloat16)
    want = np.asarray(kernel.apply_weights(params, to_jax(x, name="x")).astype(jnp.float32))
    check = lambda y: np.testing.assert_array_equal(y.float().numpy(), want)  # noqa: E731
    check(d(x, None))
    (e,) = d._entries.values()
    first = next(iter(e.plans.values()))
    stream["now"] = 12
    check(d(x, None))  # another stream: its own plan and its own quantize buffers
    assert len(e.plans) == 2 and len(direct._SCRATCH) == 2
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("y", d(x, None)))
    t.start()
    t.join()
    check(other["y"])
    assert len(e.plans) == 3 and len(direct._SCRATCH) == 2  # another thread: own arrays, shared buffers
    stream["now"] = 11
    direct._SCRATCH.clear()  # the shared buffers dropped (evicted): the plan is rebuilt, not reused
    check(d(x, None))
    again = e.plans[(11, threading.get_ident())]
    assert again is not first and again.scratch() is direct._SCRATCH[again.skey]


SWAP_AB = mm.TuningConfig(
    tile_m=64, tile_n=8, tile_k=64, max_concurrent_steps=3, num_compute_wgs=1, wg_dimension="m",
    grid_minor_dim="m", epi_tile_m=64, epi_tile_n=8, epi_slots=1, swap_ab=True,
)  # fmt: skip
SWAP_CASES = [
    # (config, N, K, x shape, split_k): the kernels take the weight first (swap_ab); split-K's partials are
    # summed and transposed by torch as scaled_mm's XLA reduction does
    (FP8ScaledMMConfig(), 128, 256, (5, 256), 1),
    (FP8ScaledMMConfig(out_dtype=jnp.float32), 128, 256, (3, 256), 2),
    (Int8ScaledMMConfig(symmetric=False), 192, 256, (2, 9, 256), 2),
    (Int8ScaledMMConfig(), 128, 256, (4, 256), 1),
]


@pytest.mark.parametrize("case", SWAP_CASES, ids=lambda c: f"{c[0].describe()}-x{c[3]}-sk{c[4]}")
@pytest.mark.parametrize("steady", [False, True], ids=["general", "steady"])
def test_swap_ab_configs_match_the_jax_route_bit_for_bit(case, steady, monkeypatch, raw_route):
    cfg, n, k, xshape, split_k = case
    swap = dataclasses.replace(SWAP_AB, split_k=split_k)
    monkeypatch.setattr(mm, "default_config", lambda *a, **kw: swap)  # what the JAX route gets too
    kernel, params, d = raw_route[0](cfg, n, k) if steady else _layer(cfg, n, k)
    bias = _x((n,), torch.bfloat16, seed=2)
    for seed in (1, 5):
        x = _x(xshape, torch.bfloat16, seed=seed)
        y = d(x, bias)
        assert y is not None and tuple(y.shape) == (*xshape[:-1], n) and y.is_contiguous()
        want = kernel.apply_weights(params, to_jax(x, name="x"), to_jax(bias, name="b"))
        np.testing.assert_array_equal(y.float().numpy(), np.asarray(want.astype(jnp.float32)))
    (e,) = d._entries.values()
    assert e.swap and e.split_k == split_k
    if steady:
        assert (next(iter(e.plans.values())) is None) == (split_k > 1)  # split-K: the general path
