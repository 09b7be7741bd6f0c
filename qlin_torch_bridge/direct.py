"""Direct launch: qlin's Mosaic GPU kernels called from torch with no JAX dispatch per call.

Through the JAX route a bridged call pays, on the host, jaxlib's DLPack import of ``x`` (~40 us on the
H100 machine), the jitted call's dispatch (~50-65 us) and the export of the result (~6-12 us): more
than the kernels themselves at decode and mid-size shapes (``h100_bridge_check.json``).  For the
layers the fused path serves -- the ``mosaic_gpu`` kernel with dynamic per-token activations (fp8
e4m3, int8 symmetric or asymmetric), per-tensor or per-channel weights -- the bridge launches the
SAME two compiled Mosaic GPU kernels itself: the fused activation quantize and the scaled GEMM, each
compiled once per shape by the machinery behind ``jax.experimental.pallas.mosaic_gpu.as_torch_kernel``
(a call is then a ctypes launch on torch's current stream with torch-allocated outputs;
:class:`_RawKernel`).  The glue between them (the 8-row tile padding, K padding, split-K sum,
slicing) is torch code mirroring
:meth:`qlin.kernels.mosaic_gpu.MosaicGPUScaledMMKernel._matmul`, so the result is the JAX route's
(bit for bit; with split-K >= 3 torch may add the float32 partial sums in another order).

Streams: everything -- the two launches and the torch glue -- is queued on torch's current stream,
so it is ordered with the caller's work like any torch op.  A shape whose kernels fail to build (a jax
version whose interop differs) falls back to the JAX route with a warning, once per shape.

This relies on jax internals (``jax._src.pallas.mosaic_gpu.torch`` and the CUDA plugin's
``MosaicGpuCompile``: what ``plgpu.as_torch_kernel`` uses); where they are missing the route is off.

int8 at M = 1: where the JAX route hands that product to XLA's int8 GEMV (``mosaic_gpu.uses_xla_gemv``:
about as fast as the Mosaic GPU kernel on the device, and XLA's own program), from torch the JAX
dispatch it would need costs more than either kernel, so the direct route runs the Mosaic GPU kernel
there too (the same int32 sums and f32 epilogue).

Anything else (CPU tensors, other configs or kernels, ``input_scale_ub``, inputs the JAX route would
reject or copy) returns None and the caller takes the JAX route.

A call in the steady state (:class:`_Plan`) writes three addresses into pointer arrays filled in when
the shape was first seen, allocates the output and makes the two ctypes launches: no argument
re-derivation, no Stream object (torch's raw current-stream handle), no reshapes.  Shapes that
need K padding or split-K take the general path (:meth:`DirectLinear._run`).

``QLIN_TORCH_DIRECT=0`` turns the direct route off (it is on by default for the jax versions it was
checked with on a GPU, :data:`VERIFIED_JAX`; ``=1`` forces it on elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig
from qlin.kernels import mosaic_gpu_quantize as mq
from qlin.kernels import mosaic_gpu_scaled_mm as mm
from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel
from qlin.params import Int8Params, Params

__all__ = ["DirectLinear", "direct_for", "enabled"]

#: Reuse the quantize kernel's outputs across calls up to this many 8-bit activation bytes: the
#: buffers are shared by every layer with the same input shape on a stream (see :func:`_scratch`).
_SCRATCH_CACHE_BYTES = 16 << 20
_SCRATCH_MAX_ENTRIES = 16
_SCRATCH: dict[tuple, _Scratch] = {}
#: plans kept per entry (one per stream and thread that called it) before the table is cleared
_MAX_PLANS = 64
#: torch's current stream as a raw handle without building a Stream object (what inductor uses)
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_get_ident = threading.get_ident
_X_DTYPES = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16, torch.float32: jnp.float32}
_BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interop():
    """jax's Mosaic GPU <-> torch module (the machinery behind ``plgpu.as_torch_kernel``), or None."""
    try:
        from jax._src.pallas.mosaic_gpu import torch as interop
    except ImportError:
        return None
    ok = all(hasattr(interop, a) for a in ("_compile_fn", "_mlir_to_torch_dtype"))
    return interop if ok else None


#: jax versions whose internals the direct route was checked against on a GPU (bit for bit, both streams).
VERIFIED_JAX = ((0, 11),)


def enabled() -> bool:
    """Whether the direct route may be used: ``QLIN_TORCH_DIRECT=0`` / ``1`` force it off / on (on needs
    jax's torch interop); unset, it is on for the jax versions in :data:`VERIFIED_JAX`."""
    flag = os.environ.get("QLIN_TORCH_DIRECT", "").strip().lower()
    if flag in ("0", "false", "no", "off") or _interop() is None:
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return tuple(jax.__version_info__[:2]) in VERIFIED_JAX


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _with_fp8_outputs(interop):
    """jax 0.11's interop maps f32 / f16 / bf16 / integer kernel outputs to torch dtypes, not fp8 (the
    fused quantize writes fp8): add the two fp8 types while a kernel is being compiled."""
    orig = interop._mlir_to_torch_dtype

    def with_fp8(torch_mod, mlir_dtype):
        name = str(mlir_dtype)
        if name == "f8E4M3FN":
            return torch_mod.float8_e4m3fn
        if name == "f8E5M2":
            return torch_mod.float8_e5m2
        return orig(torch_mod, mlir_dtype)

    with _PATCH_LOCK:  # one compile at a time patches the interop's module attribute
        interop._mlir_to_torch_dtype = with_fp8
        try:
            yield
        finally:
            interop._mlir_to_torch_dtype = orig


class _RawKernel:
    """One compiled Mosaic GPU kernel launched straight from torch on torch's current stream.

    Compiled once: ``fn`` is traced and lowered by JAX, the interop finds the Mosaic GPU call and how
    to lay out its buffers (inputs, outputs, any scratch), and the CUDA plugin's ``MosaicGpuCompile``
    builds it -- what ``plgpu.as_torch_kernel`` does, minus its per-call re-derivation of the argument
    shapes and checks (~30 us per call on the H100 machine), and launched on the CURRENT stream rather
    than the default one, so no event fences are needed.  A call: torch allocates the outputs, the
    buffer pointers go to the kernel's launch function.
    """

    def __init__(self, fn: Callable, in_structs: tuple) -> None:
        import ctypes

        from jax._src.lib.mlir import passmanager
        from jax.experimental import mosaic as _mosaic  # noqa: F401 - registers the dialect
        from jax.experimental.mosaic import gpu as mgpu

        interop = _interop()
        module = jax.jit(fn).trace(*in_structs).lower().compiler_ir()
        with module.context:
            mgpu.dialect.register_inliner_extensions(module.context)  # undo jit's outlining
            passmanager.PassManager.parse("builtin.module(inline{default-pipeline=})").run(module.operation)
            with _with_fp8_outputs(interop):
                call, self._prepare_args, self._prepare_outputs, self._get_outputs = (
                    interop._find_mgpu_call_in_module(module))
            asm = call.attributes["mhlo.backend_config"]["module"].value_bytes
        lib = _plugin_library()
        compile_fn, unload_fn = lib.MosaicGpuCompile, lib.MosaicGpuUnload
        compile_fn.argtypes, compile_fn.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.POINTER(ctypes.c_void_p)
        unload_fn.argtypes, unload_fn.restype = [ctypes.POINTER(ctypes.c_void_p)], None
        torch.cuda.init()
        compiled = compile_fn(ctypes.c_char_p(asm), ctypes.c_int(len(asm)))
        if not compiled:
            raise RuntimeError("MosaicGpuCompile failed")
        self._function = compiled[0]
        self._launch = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_void_p))(compiled[1])
        weakref.finalize(self, unload_fn, compiled)
        self.device = torch.device("cuda", torch.cuda.current_device())
        n_in = len(jax.tree.leaves(in_structs))
        probe = tuple(object() for _ in range(n_in))
        try:  # inputs handed to the kernel as they are (no scratch buffers or constants to add)?
            self._plain_args = tuple(self._prepare_args(*probe, device=self.device)) == probe
        except Exception:  # noqa: BLE001 - a thunk that needs real tensors: always prepare
            self._plain_args = False
        outs = jax.tree.leaves(jax.eval_shape(fn, *in_structs))
        # (shape, torch dtype) of each output; None where outputs alias inputs (let the interop place them)
        aliases = call.output_operand_aliases
        self.out_specs = None if (aliases is not None and len(aliases)) else tuple(
            (tuple(o.shape), getattr(torch, jnp.dtype(o.dtype).name)) for o in outs)
        self._n_ptrs = n_in + len(outs)
        self._ptr_array = ctypes.c_void_p * self._n_ptrs
        # (launch, function, n_ptrs) for a caller that keeps its own pointer array (inputs then outputs)
        # and calls launch(function, stream, array); None when the interop must prepare the arguments
        # or place the outputs (then only __call__ launches it)
        self.raw = (self._launch, self._function, self._n_ptrs) if (
            self._plain_args and self.out_specs is not None) else None

    def new_outputs(self) -> tuple | None:
        """Freshly allocated output tensors (None when the interop must place them)."""
        if self.out_specs is None:
            return None
        return tuple(torch.empty(shape, dtype=dt, device=self.device) for shape, dt in self.out_specs)

    def __call__(self, *args: torch.Tensor, stream: int | None = None, out: tuple | None = None):
        """Launch on ``stream`` (a CUDA stream handle; default torch's current stream), writing into
        ``out`` (tensors of :attr:`out_specs`; default new ones).  Returns the output(s)."""
        dev = self.device
        if not self._plain_args:
            args = self._prepare_args(*args, device=dev)
        if out is None:
            out = self.new_outputs()
        if out is None:
            result = self._get_outputs(*self._prepare_outputs(*args, device=dev))
            outs = result
        else:
            result = outs = out
        ptrs = [t.data_ptr() for t in args]
        ptrs += [t.data_ptr() for t in outs]
        if stream is None:
            stream = _current_stream(dev.index)
        self._launch(self._function, stream, self._ptr_array(*ptrs))
        return result[0] if len(result) == 1 else result


def _plugin_library():
    """The CUDA PJRT plugin's shared library (it exports ``MosaicGpuCompile`` / ``MosaicGpuUnload``)."""
    import ctypes

    for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            plugin = importlib.import_module(name)
        except ImportError:
            continue
        return ctypes.CDLL(plugin._get_library_path())
    return ctypes.CDLL(None)


_KERNELS: dict[tuple, _RawKernel] = {}


def _shared_kernel(key: tuple, fn: Callable, in_structs: tuple) -> _RawKernel:
    """The compiled kernel for ``key`` (everything that determines it: the plan or tile config, the
    epilogue, dtypes, shapes, the device), compiled on first use: a model's layers of equal shapes
    compile each kernel once, as the JAX route's compilation cache does."""
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = gpu_launcher(fn, in_structs)
    return kernel


def gpu_launcher(fn: Callable, in_structs: tuple) -> Callable:
    """Compile ``fn`` (one Mosaic GPU kernel) for these argument shapes; returns ``f(*tensors)``."""
    return _RawKernel(fn, tuple(in_structs))


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


class _Entry:
    """The two compiled launches (and their static glue) for one (M, x dtype, bias dtype)."""

    __slots__ = ("m", "rows", "kq", "chunks", "width", "quant", "gemm", "split_k", "has_bias", "swap", "plans")

    def __init__(self, m, rows, kq, chunks, width, quant, gemm, split_k, has_bias, swap=False):
        self.m, self.rows, self.kq, self.chunks, self.width = m, rows, kq, chunks, width
        self.quant, self.gemm, self.split_k, self.has_bias = quant, gemm, split_k, has_bias
        self.swap = swap  # swap_ab: the weight is the kernel's first operand (see mosaic_gpu_scaled_mm)
        self.plans: dict[tuple, _Plan | None] = {}


class _Plan:
    """The steady state of one entry on one (stream, thread): both launches' pointer arrays filled in
    once (weights, scales, the shared quantize buffers), so a call writes only the addresses of ``x``,
    the output and the bias.  Per thread because ctypes releases the GIL during a launch, so another
    thread must not rewrite the array it reads.  ``scratch`` is a weak reference: the shared buffers
    stay owned by :data:`_SCRATCH` (bounded), and a plan whose buffers were dropped is rebuilt."""

    __slots__ = ("scratch", "skey", "qarr", "garr", "out_i", "bias_i", "out_shape", "out_dtype")


class _Scratch:
    """The quantize kernel's output buffers shared by the calls of one (device, stream, shapes)."""

    __slots__ = ("bufs", "__weakref__")

    def __init__(self, bufs: tuple) -> None:
        self.bufs = bufs


class DirectLinear:
    """One processed layer's direct route: torch views of the processed params, launches per M.

    Args:
      kernel: the layer's :class:`MosaicGPUScaledMMKernel`.
      params: its processed params (JAX arrays; the torch views share their memory).
      to_torch: JAX array -> torch tensor without a copy (the bridge's DLPack export).
      launcher: ``launcher(fn, in_structs)`` turns a JAX function of one Mosaic GPU kernel into a
        torch-callable for arguments of those shapes (default :func:`gpu_launcher`; tests pass an
        interpret-mode stand-in).
      interpret: build the kernels for Mosaic GPU interpret mode (tests on the CPU).
    """

    def __init__(self, kernel: MosaicGPUScaledMMKernel, params: Params, *, to_torch: Callable[[Any], torch.Tensor],
                 launcher: Callable | None = None, interpret: bool = False) -> None:
        cfg = kernel.config
        self.config = cfg
        self.n, self.k = params.n, params.k
        self.n_pad, self.k_pad = (int(d) for d in params.weight.shape)
        self.wdtype = jnp.dtype(params.weight.dtype)
        self.out_dtype = jnp.dtype(cfg.out_dtype)
        self.symmetric = not (isinstance(cfg, Int8ScaledMMConfig) and not cfg.symmetric)
        self.qargs = mq._config_args(cfg)
        self.interpret = interpret
        self.launcher = launcher or gpu_launcher
        ws = jnp.asarray(params.weight_scale, jnp.float32)
        self.per_channel_w = ws.size != 1
        self.weight = to_torch(params.weight)
        self.b_scale = to_torch(ws.reshape(-1))  # (N_pad,) or (1,): what scaled_mm hands its kernel
        self.azp_adj = None
        if not self.symmetric:
            assert isinstance(params, Int8Params) and params.azp_adj is not None
            self.azp_adj = to_torch(jnp.asarray(params.azp_adj, jnp.int32).reshape(-1))
        self._entries: dict[tuple, _Entry | None] = {}
        self.build_errors: dict[tuple, str] = {}
        self._bias_src: tuple | None = None
        self._bias_pad: torch.Tensor | None = None

    # -- compile once per shape ----------------------------------------------------------------
    def _entry(self, m: int, x_dtype: torch.dtype, bias_dtype: torch.dtype | None) -> _Entry | None:
        key = (m, x_dtype, bias_dtype)
        if key in self._entries:
            return self._entries[key]
        entry = None
        jdt = jnp.dtype(_X_DTYPES[x_dtype])
        ok, _ = mq.can_fuse((m, self.k), jdt, self.config)
        if ok:
            try:
                entry = self._build(m, jdt, bias_dtype)
            except Exception as e:  # noqa: BLE001 - the JAX route still works; say why once
                self.build_errors[key] = f"{type(e).__name__}: {e}"
                warnings.warn(f"qlin_torch_bridge: direct launch unavailable for M={m}, x {x_dtype} "
                              f"({self.build_errors[key][:300]}); using the JAX route", RuntimeWarning, stacklevel=3)
        self._entries[key] = entry
        return entry

    def _build(self, m: int, jdt, bias_dtype) -> _Entry:
        rows = _round_up(m, mm.TMA_ROW_TILE)  # the fused kernel allocates whole 8-row tiles (as _matmul)
        a = self.qargs
        p = mq.plan(m, self.k, jdt, granularity="per_token", symmetric=self.symmetric)
        qfn = mq._build(p, jdt, kind=a["kind"], per_group=False, has_ub=False, symmetric=self.symmetric,
                        fp8_format=a.get("fp8_format", "e4m3fn"), interpret=self.interpret,
                        rows_out=None if rows == m else rows)
        has_bias, has_azp = bias_dtype is not None, not self.symmetric
        epi = mm._Epilogue(a_scale_vec=rows != 1, b_scale_vec=self.per_channel_w, has_bias=has_bias,
                           has_azp=has_azp, azp_vec=has_azp and rows != 1)
        from qlin.kernels import autotune  # the tile choice scaled_mm makes for the same call

        config = autotune.get_config(rows, self.n_pad, self.k_pad, self.wdtype, self.out_dtype,
                                     has_bias=has_bias, has_azp=has_azp)
        n_row = int(epi.a_scale_vec) + int(epi.azp_vec)
        n_col = int(epi.b_scale_vec) + int(epi.has_bias) + int(epi.has_azp)
        mm._validate_config(config, self.wdtype, self.out_dtype, n_row, n_col)
        out_dtype, interpret = self.out_dtype, self.interpret

        def gemm(*args):
            return mm._call(args, config=config, epi=epi, out_dtype=out_dtype, interpret=interpret)

        sds = jax.ShapeDtypeStruct
        f32, i32 = jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)
        q_in = (sds((m, p.chunks, p.width), jdt),)
        g_in = [sds((rows, self.k_pad), self.wdtype), sds((self.n_pad, self.k_pad), self.wdtype),
                sds((rows,), f32), sds(tuple(self.b_scale.shape), f32)]
        if config.swap_ab:  # the weight first: the kernel's wgmma A side
            g_in[0], g_in[1] = g_in[1], g_in[0]
        if has_bias:
            g_in.append(sds((self.n_pad,), jnp.dtype(_X_DTYPES[bias_dtype])))
        if has_azp:
            g_in += [sds((rows,), i32), sds((self.n_pad,), i32)]
        g_in = tuple(g_in)
        if self.launcher is gpu_launcher:  # layers of the same shapes share one compiled kernel each
            dev = torch.cuda.current_device()
            quant = _shared_kernel(("quant", dev, p, jdt, a["kind"], self.symmetric, a.get("fp8_format"), rows),
                                   qfn, q_in)
            gemm_launch = _shared_kernel(("gemm", dev, config, epi, out_dtype, g_in), gemm, g_in)
        else:
            quant, gemm_launch = self.launcher(qfn, q_in), self.launcher(gemm, g_in)
        return _Entry(m, rows, p.k_padded, p.chunks, p.width, quant, gemm_launch, config.split_k, has_bias,
                      config.swap_ab)

    # -- per call ------------------------------------------------------------------------------
    def _bias(self, bias: torch.Tensor) -> torch.Tensor:
        if self.n_pad == self.n:
            return bias
        src, ver = self._bias_src, _version(bias)
        if src is not None and src[0] is bias and src[1] == bias.data_ptr() and ver is not None and src[2] == ver:
            return self._bias_pad
        padded = F.pad(bias, (0, self.n_pad - self.n))
        self._bias_src, self._bias_pad = (bias, bias.data_ptr(), ver), padded
        return padded

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ W^T (+ bias)`` through the direct launches, or None (take the JAX route)."""
        if x.dtype not in _X_DTYPES or x.ndim < 1 or x.shape[-1] != self.k or x.requires_grad:
            return None
        if not x.is_contiguous() or x.data_ptr() % 16:
            return None  # the JAX route copies (allow_input_copy) or names the layout problem
        if bias is not None and (bias.dtype not in _BIAS_DTYPES or tuple(bias.shape) != (self.n,)
                                 or not bias.is_contiguous() or bias.requires_grad):
            return None
        lead = x.shape[:-1]
        m = x.numel() // self.k if self.k else 0
        if m < 1:
            return None
        e = self._entry(m, x.dtype, None if bias is None else bias.dtype)
        if e is None:
            return None
        if self.interpret and getattr(e.quant, "raw", None) is None:
            return self._run(e, x, bias, lead)  # an interpret-mode test launcher: the general path
        return self._on_device(e, x, bias, lead)

    def _on_device(self, e: _Entry, x, bias, lead):
        dev = x.device
        if dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):  # the kernels launch in the current device's context
                return self._launch(e, x, bias, lead)
        return self._launch(e, x, bias, lead)

    def _launch(self, e: _Entry, x: torch.Tensor, bias, lead) -> torch.Tensor:
        """The steady state: two launches through the entry's :class:`_Plan` for this stream and thread
        (the output allocation and, for padded N or 8-row tiles, a slice are the only torch work)."""
        dev = x.device
        stream = _current_stream(dev.index)
        pkey = (stream, _get_ident())
        plan = e.plans.get(pkey)
        holder = plan.scratch() if plan is not None else None
        if holder is None:
            if plan is None and pkey in e.plans:  # this entry has no steady state (see _new_plan)
                return self._run(e, x, bias, lead)
            plan = self._new_plan(e, stream, pkey)
            if plan is None:
                return self._run(e, x, bias, lead)
            holder = plan.scratch()
        shared = _SCRATCH.pop(plan.skey, None)
        if shared is not None:
            _SCRATCH[plan.skey] = shared  # most recently used last
        qarr, garr = plan.qarr, plan.garr
        qarr[0] = x.data_ptr()
        launch, function, _ = e.quant.raw
        launch(function, stream, qarr)
        y = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=dev)
        garr[plan.out_i] = y.data_ptr()
        if plan.bias_i is not None:
            garr[plan.bias_i] = self._bias(bias).data_ptr()
        launch, function, _ = e.gemm.raw
        launch(function, stream, garr)
        if e.rows != e.m or self.n_pad != self.n:
            y = y[: e.m, : self.n]
            if self.n_pad != self.n:
                y = y.contiguous()
        return y.view(*lead, self.n)

    def _new_plan(self, e: _Entry, stream: int, pkey: tuple) -> _Plan | None:
        """Build (and remember) the plan for ``pkey``; None where the entry needs the general path: K
        padding (the quantized columns are cut and re-padded), split-K (a torch sum), quantize outputs
        too large to share, or kernels whose arguments the interop must prepare."""
        import ctypes

        qraw, graw = getattr(e.quant, "raw", None), getattr(e.gemm, "raw", None)
        if (qraw is None or graw is None or e.kq != self.k or self.k_pad != self.k or e.split_k != 1
                or e.rows * e.kq > _SCRATCH_CACHE_BYTES):
            e.plans[pkey] = None
            return None
        holder = _scratch(e.quant, stream)
        bufs = holder.bufs
        ptrs = [bufs[0].data_ptr(), self.weight.data_ptr()]
        if e.swap:
            ptrs.reverse()  # the weight first: the kernel's wgmma A side
        ptrs += [bufs[1].data_ptr(), self.b_scale.data_ptr()]
        bias_i = None
        if e.has_bias:
            bias_i = len(ptrs)
            ptrs.append(None)
        if self.azp_adj is not None:
            ptrs += [bufs[2].data_ptr(), self.azp_adj.data_ptr()]
        out_i = len(ptrs)
        ptrs.append(None)
        if graw[2] != len(ptrs) or qraw[2] != 1 + len(bufs) or len(e.gemm.out_specs) != 1:
            e.plans[pkey] = None  # not the argument lists scaled_mm's kernels take: general path
            return None
        plan = _Plan()
        plan.scratch, plan.skey = weakref.ref(holder), _scratch_key(e.quant, stream)
        plan.qarr = (ctypes.c_void_p * qraw[2])(None, *(t.data_ptr() for t in bufs))
        plan.garr = (ctypes.c_void_p * graw[2])(*ptrs)
        plan.out_i, plan.bias_i = out_i, bias_i
        plan.out_shape, plan.out_dtype = e.gemm.out_specs[0]
        if len(e.plans) >= _MAX_PLANS:  # threads come and go: keep the table small
            e.plans.clear()
        e.plans[pkey] = plan
        return plan

    def _run(self, e: _Entry, x: torch.Tensor, bias, lead) -> torch.Tensor:
        k, k_pad = self.k, self.k_pad
        x2 = x.reshape(e.m, k)
        if e.kq != k:
            x2 = F.pad(x2, (0, e.kq - k))
        x3 = x2.view(e.m, e.chunks, e.width)
        if self.interpret and getattr(e.quant, "raw", None) is None:  # a plain interpret-mode test launcher
            outs = e.quant(x3)
            gemm = e.gemm
        else:
            stream = _current_stream(x.device.index)
            holder = _scratch(e.quant, stream) if e.rows * e.kq <= _SCRATCH_CACHE_BYTES else None
            outs = e.quant(x3, stream=stream, out=None if holder is None else holder.bufs)
            gemm = functools.partial(e.gemm, stream=stream)
        q = outs[0].view(e.rows, e.kq)
        if e.kq != k or k_pad != k:
            # the quantized padding columns are not zero for asymmetric int8 (q = zero point): cut, re-pad
            q = F.pad(q[:, :k], (0, k_pad - k))
        args = [self.weight, q] if e.swap else [q, self.weight]
        args += [outs[1].reshape(-1), self.b_scale]
        if bias is not None:
            args.append(self._bias(bias))
        if self.azp_adj is not None:
            args += [outs[2].reshape(-1), self.azp_adj]
        y = gemm(*args)
        if e.split_k > 1:  # what scaled_mm's XLA reduction does: sum (and transpose swap_ab's partials)
            y, dt = y.sum(0), _torch_dtype(self.out_dtype)
            if e.swap:  # (N, token columns) -> (rows, N), cast in the same copy
                y = torch.empty((e.rows, y.shape[0]), dtype=dt, device=y.device).copy_(y[:, : e.rows].t())
            else:
                y = y.to(dt)
        y = y[: e.m, : self.n] if (e.rows != e.m or self.n_pad != self.n) else y
        if self.n_pad != self.n:
            y = y.contiguous()
        return y.reshape(*lead, self.n)


def _scratch_key(quant: _RawKernel, stream: int) -> tuple:
    return (quant.device.index, stream, quant.out_specs)


def _scratch(quant: _RawKernel, stream: int) -> _Scratch | None:
    """Output buffers for the quantize kernel, shared by every call on ``stream`` with these shapes.

    The quantized activations live only between the quantize and the GEMM launch of one call, both
    queued on ``stream``; the next call that reuses the buffers (any layer with the same input shape)
    queues after them on the same stream, so reuse is ordered without an allocation per call.  At most
    ``_SCRATCH_MAX_ENTRIES`` shapes are kept (least recently used dropped; torch's allocator hands a
    dropped buffer only to later work on the same stream, which is queued after the work that used it).
    """
    specs = quant.out_specs
    if specs is None:
        return None
    key = _scratch_key(quant, stream)
    holder = _SCRATCH.pop(key, None)
    if holder is None:
        holder = _Scratch(quant.new_outputs())
        while len(_SCRATCH) >= _SCRATCH_MAX_ENTRIES:
            _SCRATCH.pop(next(iter(_SCRATCH)))
    _SCRATCH[key] = holder  # most recently used last
    return holder


def _current_stream(device_index: int | None) -> int:
    """torch's current CUDA stream on the device, as the raw handle the launches take."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(torch.cuda.current_device() if device_index is None else device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version: never reuse a padded copy of one
        return None


def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, jnp.dtype(dtype).name)


def direct_for(kernel: Any, params: Params, platform: str, *, to_torch: Callable[[Any], torch.Tensor],
               launcher: Callable | None = None, interpret: bool | None = None) -> DirectLinear | None:
    """The layer's direct route, or None where it does not apply (see the module docstring)."""
    if type(kernel) is not MosaicGPUScaledMMKernel or kernel.tuning is not None:
        return None
    interpret = kernel.interpret if interpret is None else interpret
    if interpret != (launcher is not None):
        return None  # interpret-mode kernels only with a test launcher; real ones only on the GPU
    if launcher is None and (platform != "cuda" or not enabled()):
        return None
    cfg = kernel.config
    if not isinstance(cfg, (FP8ScaledMMConfig, Int8ScaledMMConfig)) or cfg.activation != "dynamic_per_token":
        return None
    if getattr(params, "input_scale_ub", None) is not None:
        return None
    return DirectLinear(kernel, params, to_torch=to_torch, launcher=launcher, interpret=interpret)
