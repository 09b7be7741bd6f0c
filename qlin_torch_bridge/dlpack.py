"""Zero-copy torch <-> JAX conversion through DLPack.

``to_jax(t)`` and ``to_torch(a)`` never copy unless asked: the result shares
memory with the input (checked by comparing data pointers after every
conversion) or the call raises :class:`LayoutError`.

Layout. JAX arrays are row-major (C-contiguous). A torch tensor whose memory is
not row-major for its shape -- a transposed view, a strided slice, an
``expand``-ed tensor -- is rejected with :class:`LayoutError` (JAX would either
refuse it or keep a non-default layout that every jitted call re-lays out, a
silent copy per call). ``copy=True`` makes one explicit ``.contiguous()`` copy
instead. Likewise a tensor whose data pointer is not aligned as the JAX backend
requires (64 bytes on the CPU; e.g. ``t[1:]`` of a contiguous tensor) is an error
unless ``copy=True``. For vLLM's transposed weight views see
``params_from_module(weight_layout="kn")``, which undoes the transpose as a view.

dtypes: float8_e4m3fn, float8_e5m2, int8, uint8, int32, bfloat16, float16,
float32. torch >= 2.8 and jaxlib 0.11 exchange fp8 natively (DLPack 1.1 type
codes 10 and 12). Where one side rejects fp8, the tensor crosses as a uint8 view
whose DLPack capsule is re-tagged with the fp8 type code (or the reverse) --
same bytes, same pointer, still zero copy.

CUDA stream ordering. Both directions order the consumer after the producer on the device,
without a host sync (the DLPack stream protocol):

* torch -> JAX: an event recorded on torch's *current* stream is waited on by JAX's stream for
  external ready events (``device.get_stream_for_external_ready_events()``), which jaxlib's import
  takes as the buffer's definition stream -- what ``jax.dlpack.from_dlpack(tensor)`` gets from
  ``tensor.__dlpack__(stream=<that stream>)``. JAX reads the tensor only after every torch kernel
  queued before the call.
* JAX -> torch: jaxlib's export is given torch's current stream (what ``torch.from_dlpack(array)``
  passes to ``array.__dlpack__(stream=...)``); JAX makes that stream wait for the event that
  completes the array. The host does not wait for the computation -- only, inside jaxlib, until
  the computation has been launched (the event must exist to be waited on).

So torch work on its current stream and JAX work interleave correctly without
``torch.cuda.synchronize()``. Converting on one torch stream and then using the
result on another stream is the caller's business, as everywhere in torch. Nothing on these
paths calls ``block_until_ready``, ``unsafe_buffer_pointer`` (it waits for the array) or
``device_get`` (``tests/test_torch_bridge_nosync.py`` traps them). On the CPU there are no
streams: handing a JAX result to torch waits for it, as ``torch.from_dlpack`` does.

Aliasing. JAX assumes arrays are immutable. Mutating a torch tensor in place
while a JAX array aliases it changes what JAX sees (and jitted code may have
cached nothing of it, or anything): do not mutate tensors handed to qlin.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import jax
import jax.numpy as jnp
import torch

from qlin.errors import InputError

__all__ = [
    "LayoutError", "to_jax", "to_torch", "jax_dtype", "torch_dtype", "platform_of", "SUPPORTED_DTYPES",
    "shares_memory",
]


#: Alignment of every buffer handed to JAX: XLA's GPU entry-parameter alignment and TMA's
#: global-address rule are both 16 bytes.
ALIGN_BYTES = 16


class LayoutError(InputError):
    """A tensor's memory layout cannot be shared with JAX without a copy (and no copy was allowed)."""


_PAIRS = (
    (torch.float8_e4m3fn, jnp.float8_e4m3fn),
    (torch.float8_e5m2, jnp.float8_e5m2),
    (torch.int8, jnp.int8),
    (torch.uint8, jnp.uint8),
    (torch.int32, jnp.int32),
    (torch.bfloat16, jnp.bfloat16),
    (torch.float16, jnp.float16),
    (torch.float32, jnp.float32),
)
_T2J = {t: jnp.dtype(j) for t, j in _PAIRS}
_J2T = {jnp.dtype(j): t for t, j in _PAIRS}
#: torch dtypes that cross the bridge.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(t for t, _ in _PAIRS)

# DLPack 1.1 type codes (dlpack.h: kDLUInt = 1, kDLFloat8_e4m3fn = 10, kDLFloat8_e5m2 = 12).
_DL_UINT = 1
_FP8_DL_CODE = {torch.float8_e4m3fn: 10, torch.float8_e5m2: 12}
_FP8_TORCH = tuple(_FP8_DL_CODE)


def jax_dtype(dtype: torch.dtype):
    """The JAX dtype of a torch dtype the bridge supports."""
    try:
        return _T2J[dtype]
    except KeyError:
        raise InputError(f"dtype: torch {dtype} does not cross the bridge; supported: "
                         f"{[str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES]}") from None


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a JAX dtype the bridge supports."""
    try:
        return _J2T[jnp.dtype(dtype)]
    except (KeyError, TypeError):
        raise InputError(f"dtype: JAX {dtype} does not cross the bridge; supported: "
                         f"{[jnp.dtype(j).name for _, j in _PAIRS]}") from None


def platform_of(t: torch.Tensor) -> str:
    """qlin's platform name ("cpu", "cuda", "rocm") for a torch tensor's device."""
    kind = t.device.type
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    raise InputError(f"device: torch tensors on {t.device} cannot be shared with JAX (cpu or cuda only)")


# -- DLPack capsule re-tagging (fp8 <-> uint8, same bytes) ------------------------------------

class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
        ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64),
    ]


# DLManagedTensorVersioned = {DLPackVersion (2 x u32), manager_ctx*, deleter*, u64 flags, DLTensor}
_VERSIONED_DLTENSOR_OFFSET = 8 + 8 + 8 + 8

_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_get_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_get_name.restype = ctypes.c_char_p
_capsule_get_name.argtypes = [ctypes.py_object]


def _retag(capsule: Any, expect_code: int, new_code: int) -> Any:
    """Rewrite the dtype code of an unconsumed 8-bit DLPack capsule in place; returns it."""
    name = _capsule_get_name(capsule)
    if name not in (b"dltensor", b"dltensor_versioned"):
        raise BufferError(f"expected an unconsumed DLPack capsule, got one named {name!r}")
    ptr = _capsule_get_pointer(capsule, name)
    if name == b"dltensor_versioned":
        ptr += _VERSIONED_DLTENSOR_OFFSET
    dl = _DLTensor.from_address(ptr)
    if dl.dtype.bits != 8 or dl.dtype.lanes != 1 or dl.dtype.code != expect_code:
        raise BufferError(f"unexpected DLPack dtype (code {dl.dtype.code}, bits {dl.dtype.bits}) while re-tagging")
    dl.dtype.code = new_code
    return capsule


class _Retagged:
    """A DLPack producer that hands out ``source``'s capsule with another 8-bit dtype code."""

    def __init__(self, source: Any, expect_code: int, new_code: int) -> None:
        self._source, self._expect, self._new = source, expect_code, new_code

    def __dlpack_device__(self):
        return self._source.__dlpack_device__()

    def __dlpack__(self, *, stream: Any = None, **_: Any):
        # Legacy (unversioned) capsule: both torch and JAX accept it; the stream is forwarded as given.
        return _retag(self._source.__dlpack__(stream=stream), self._expect, self._new)


_NATIVE_FP8: dict[str, bool] = {}


def _native_fp8(direction: str) -> bool:
    """Whether this torch/jaxlib pair exchanges fp8 through DLPack directly (probed once, on the CPU)."""
    if direction not in _NATIVE_FP8:
        try:
            if direction == "to_jax":
                t = torch.zeros(8, dtype=torch.float8_e4m3fn)
                ok = jax.dlpack.from_dlpack(t, copy=False).dtype == jnp.float8_e4m3fn
            else:
                a = jnp.zeros(8, jnp.float8_e4m3fn, device=jax.devices("cpu")[0])
                ok = torch.from_dlpack(a).dtype == torch.float8_e4m3fn
        except Exception:  # noqa: BLE001 - any refusal means "not native"
            ok = False
        _NATIVE_FP8[direction] = ok
    return _NATIVE_FP8[direction]


def shares_memory(t: torch.Tensor, a: jax.Array) -> bool:
    """True when the torch tensor and the JAX array start at the same address."""
    if t.numel() == 0:
        return True
    return int(a.unsafe_buffer_pointer()) == int(t.data_ptr())


# -- conversions ---------------------------------------------------------------------------------

def to_jax(t: torch.Tensor, *, copy: bool = False, name: str = "tensor", verify: bool = True) -> jax.Array:
    """A JAX array sharing ``t``'s memory (zero copy), on the JAX device matching ``t.device``.

    Args:
      t: a torch tensor of a supported dtype, on cpu or cuda; one that requires grad is an
        error while grad mode is on (the gradient would be silently lost), fine under no_grad.
      copy: allow ONE explicit copy (``t.contiguous()`` / ``t.clone()``) when ``t``'s
        memory is not row-major or not aligned for JAX. Without it such tensors raise
        :class:`LayoutError`.
      name: how error messages call ``t`` (e.g. ``"layer.weight"``).
      verify: compare the data pointers afterwards (``apply_weights`` skips it on its hot path:
        DLPack with ``copy=False`` either shares memory or raises).
    """
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.requires_grad:
        if torch.is_grad_enabled():
            raise InputError(
                f"{name}: requires grad; qlin's kernels are inference-only and would silently drop the gradient. "
                "Use requires_grad=False parameters (as vLLM does), model.requires_grad_(False), or torch.no_grad()"
            )
        t = t.detach()  # under no_grad nothing is recorded anyway; same memory
    jax_dtype(t.dtype)  # raises on unsupported dtypes
    platform_of(t)
    if not t.is_contiguous():
        if not copy:
            hint = ""
            if t.dim() == 2 and t.t().is_contiguous():
                hint = (" It is a transposed view of row-major memory: pass t.t() (or, for a layer's weight, "
                        "weight_layout='kn') to share it without a copy.")
            raise LayoutError(
                f"{name}: shape {tuple(t.shape)} with strides {tuple(t.stride())} is not row-major (C-contiguous); "
                f"sharing it with JAX would need a copy.{hint} Pass copy=True to copy it explicitly."
            )
        t = t.contiguous()
    fp8_fallback = t.dtype in _FP8_TORCH and not _native_fp8("to_jax")
    if t.data_ptr() % ALIGN_BYTES:
        # jaxlib checks alignment on the CPU only; on CUDA it accepted a 4-byte offset view and
        # the next XLA kernel reading it failed with CUDA_ERROR_MISALIGNED_ADDRESS (H100).
        if not copy:
            raise LayoutError(
                f"{name}: data pointer {t.data_ptr():#x} is not {ALIGN_BYTES}-byte aligned, as XLA's GPU kernels "
                "and TMA require; this happens for views at an offset (e.g. t[1:]). Pass copy=True to copy it "
                "explicitly."
            )
        t = t.clone(memory_format=torch.contiguous_format)
    try:
        a = _from_torch(t, fp8_fallback)
    except ValueError as e:
        if "aligned" not in str(e):
            raise
        if not copy:
            raise LayoutError(
                f"{name}: data pointer {t.data_ptr():#x} is not aligned as JAX requires ({str(e).strip()}); "
                "this happens for views at an offset (e.g. t[1:]). Pass copy=True to copy it explicitly."
            ) from None
        t = t.clone(memory_format=torch.contiguous_format)
        a = _from_torch(t, fp8_fallback)
    if verify and not shares_memory(t, a):  # defensive: never hand out a silent copy
        raise LayoutError(f"{name}: DLPack produced a copy (pointers differ); refusing a silent copy")
    return a


def _from_torch(t: torch.Tensor, fp8_fallback: bool) -> jax.Array:
    producer = _Retagged(t.view(torch.uint8), _DL_UINT, _FP8_DL_CODE[t.dtype]) if fp8_fallback else t
    a = _fast_import(producer, t) if _FAST["on"] else None
    if a is None:
        a = jax.dlpack.from_dlpack(producer, copy=False)
    want = jax_dtype(t.dtype)
    if a.dtype != want:
        raise InputError(f"dtype: DLPack turned torch {t.dtype} into JAX {a.dtype}, expected {want}")
    return a


# -- fast paths ---------------------------------------------------------------------------------
# ``jax.dlpack.from_dlpack`` / ``torch.from_dlpack`` spend tens of microseconds of Python per call
# (device lookups, a new ``Stream`` and ``Event`` object per call in torch's ``__dlpack__``, JAX's
# ``to_dlpack`` building a fresh single-device Array, ...). The fast paths do the same DLPack steps
# with everything that does not change between calls cached per device (a :class:`_Route`):
#
# * torch -> JAX: record ONE cached torch event on torch's current stream, make JAX's stream for
#   external ready events (a cached ``torch.cuda.ExternalStream``) wait on it, hand the capsule to
#   jaxlib's import with that stream -- exactly what ``__dlpack__(stream=jax_stream)`` does, without
#   allocating an event and two stream objects per call. Re-recording the cached event is safe:
#   ``cudaStreamWaitEvent`` waits for the record that precedes it, later records do not affect it.
# * JAX -> torch: jaxlib's export with torch's current stream (the DLPack stream protocol: JAX makes
#   that stream wait for the event that completes the array, on the device), then torch's capsule
#   import. No ``block_until_ready``, no ``unsafe_buffer_pointer`` (which waits for the array).
#
# Neither path blocks the host on the GPU. On the CPU there are no streams: JAX's export waits for
# the array (the host is the consumer), exactly like ``torch.from_dlpack``.
# They use jaxlib's import/export functions directly; if those are missing or their signature
# changed, the paths switch themselves off and the public APIs are used (tests run both paths).
try:  # pragma: no cover - depends on the jaxlib build
    from jax._src import xla_bridge as _xla_bridge
    from jax._src.lib import _jax as _jaxlib

    _RAW_IMPORT = getattr(_jaxlib, "dlpack_managed_tensor_to_buffer", None)
    _RAW_EXPORT = getattr(_jaxlib, "buffer_to_dlpack_managed_tensor", None)
    _JaxRuntimeError = getattr(_jaxlib, "JaxRuntimeError", RuntimeError)
except Exception:  # noqa: BLE001
    _RAW_IMPORT = _RAW_EXPORT = None
    _JaxRuntimeError = RuntimeError

_TORCH_TO_CAPSULE = getattr(torch.utils.dlpack, "to_dlpack", None)
_TORCH_FROM_CAPSULE = getattr(torch._C, "_from_dlpack", None) or torch.utils.dlpack.from_dlpack
_RAW_CUDA_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)

_FAST: dict[str, bool] = {"on": _RAW_IMPORT is not None and _TORCH_TO_CAPSULE is not None,
                          "export": _RAW_EXPORT is not None}
_DL_CPU, _DL_CUDA = 1, 2


class _Route:
    """What a conversion between one torch device and its JAX device needs, computed once."""

    __slots__ = ("jax_device", "dl_type", "index", "jax_stream", "jax_stream_torch", "event", "lock")

    def __init__(self, jax_device: Any, dl_type: int, index: int) -> None:
        self.jax_device, self.dl_type, self.index = jax_device, dl_type, index
        self.jax_stream: int | None = None  # JAX's stream for external ready events (CUDA)
        self.jax_stream_torch: Any = None  # the same stream as a torch.cuda.ExternalStream
        self.event: Any = None  # the one torch event recorded per torch -> JAX hand-over
        self.lock = threading.Lock()  # record + wait of the shared event must not interleave across threads
        if dl_type == _DL_CUDA:
            try:
                self.jax_stream = int(jax_device.get_stream_for_external_ready_events())
            except _JaxRuntimeError as err:
                if "UNIMPLEMENTED" not in str(err):
                    raise
            if self.jax_stream is not None:
                self.jax_stream_torch = torch.cuda.ExternalStream(self.jax_stream, device=index)
                self.event = torch.cuda.Event()

    def torch_stream(self) -> int | None:
        """torch's current stream on this device as DLPack's ``stream`` integer (None on the CPU)."""
        if self.dl_type != _DL_CUDA:
            return None
        raw = _RAW_CUDA_STREAM(self.index) if _RAW_CUDA_STREAM is not None else \
            torch.cuda.current_stream(self.index).cuda_stream
        return 1 if raw == 0 else raw  # DLPack: 1 is CUDA's legacy default stream, 0 is disallowed

    def order_after_torch(self) -> int | None:
        """Make JAX's external-ready stream wait for the work queued so far on torch's current stream."""
        if self.jax_stream is None:
            return None
        # One torch Stream object per call (caching them by raw handle saved ~0.5 us of host time but was
        # in the code that faulted with CUDA_ERROR_MISALIGNED_ADDRESS on an H100; the per-call lookup is
        # the variant that passed every GPU stream-ordering check).
        ev, current = self.event, torch.cuda.current_stream(self.index)
        with self.lock:
            ev.record(current)
            self.jax_stream_torch.wait_event(ev)
        return self.jax_stream


_ROUTES: dict[int, _Route | None] = {}  # torch's t.get_device() (-1: cpu) -> route


def _route(t: torch.Tensor) -> _Route | None:
    if t.is_cuda:
        key = t.get_device()
    elif t.is_cpu:
        key = -1
    else:  # meta, mps, xpu, ...
        return None
    hit = _ROUTES.get(key, False)
    if hit is False:
        hit = None
        try:
            dl_type, dev_id = t.__dlpack_device__()
            dl_type = int(dl_type)
            if dl_type in (_DL_CPU, _DL_CUDA) and not (dl_type == _DL_CUDA and getattr(torch.version, "hip", None)):
                backend = _xla_bridge.get_backend("cpu" if dl_type == _DL_CPU else "cuda")
                hit = _Route(backend.device_from_local_hardware_id(dev_id), dl_type, max(key, 0))
        except Exception:  # noqa: BLE001 - e.g. no CUDA backend in this JAX: the public path says why
            hit = None
        _ROUTES[key] = hit  # pinned host, ROCm, ...: None, the public path knows the rules
    return hit


def _fast_import(producer: Any, t: torch.Tensor) -> jax.Array | None:
    route = _route(t)
    if route is None:
        return None
    if producer is t:
        stream = route.order_after_torch()
        capsule = _TORCH_TO_CAPSULE(t)
    else:  # the re-tagged fp8 fallback: torch orders itself through the stream protocol
        stream = route.jax_stream
        capsule = producer.__dlpack__(stream=stream)
    try:
        return _RAW_IMPORT(capsule, route.jax_device, stream, False, route.dl_type)
    except TypeError:  # jaxlib changed the signature: use the public API from now on
        _FAST["on"] = False
        return None
    except Exception as e:  # noqa: BLE001 - same message contract as jax.dlpack.from_dlpack
        if "is not aligned to" in str(e):
            raise ValueError(f"source data buffer {str(e)[str(e).index('is not aligned to'):]}") from None
        raise


def _fast_export(a: jax.Array, route: _Route) -> torch.Tensor | None:
    """``a`` (single-device, on ``route``'s device) as a torch tensor, ordered on torch's current stream."""
    try:
        capsule = _RAW_EXPORT(a, stream=route.torch_stream())
    except TypeError:  # jaxlib changed the signature: use the public API from now on
        _FAST["export"] = False
        return None
    return _TORCH_FROM_CAPSULE(capsule)


# torch dtypes the hot path hands over without checks beyond contiguity (fp8 may need the fallback).
_HOT_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int32, torch.uint8})


def to_jax_hot(t: torch.Tensor, *, name: str = "tensor", copy: bool = False) -> jax.Array:
    """:func:`to_jax` for a layer's hot path: the same result and errors, fewer checks when ``t`` is plain.

    A contiguous, grad-free tensor of a non-fp8 dtype on a known device goes straight through the
    cached route; anything else (and every error message) takes :func:`to_jax`.
    """
    if (_FAST["on"] and t.dtype in _HOT_DTYPES and not t.requires_grad and t.is_contiguous()
            and not t.data_ptr() % ALIGN_BYTES):
        route = _route(t)
        if route is not None:
            stream = route.order_after_torch()
            try:
                return _RAW_IMPORT(_TORCH_TO_CAPSULE(t), route.jax_device, stream, False, route.dl_type)
            except Exception:  # noqa: BLE001 - unaligned, signature change, ...: the full path decides
                pass
    return to_jax(t, copy=copy, name=name, verify=False)


def hot_route(t: torch.Tensor) -> _Route | None:
    """The cached route of ``t``'s device for :func:`import_hot` / :func:`export_hot` (None: no fast path)."""
    return _route(t) if (_FAST["on"] or _FAST["export"]) else None


def fast_export_dtype(dtype: Any) -> bool:
    """Whether a JAX result of ``dtype`` crosses on the fast export (fp8 may need the re-tagged capsule)."""
    want = _J2T.get(jnp.dtype(dtype))
    return want is not None and want not in _FP8_TORCH


def import_hot(t: torch.Tensor, route: _Route) -> jax.Array | None:
    """``t`` on ``route``'s JAX device, zero copy, stream-ordered, for a ``t`` the caller knows is on that
    device; None when ``t`` needs :func:`to_jax_hot`'s checks (fp8, grad, strides, alignment, no fast path)."""
    if not (_FAST["on"] and t.dtype in _HOT_DTYPES and not t.requires_grad and t.is_contiguous()
            and not t.data_ptr() % ALIGN_BYTES):
        return None
    stream = route.order_after_torch()
    try:
        return _RAW_IMPORT(_TORCH_TO_CAPSULE(t), route.jax_device, stream, False, route.dl_type)
    except Exception:  # noqa: BLE001 - unaligned, signature change, ...: the full path decides (and explains)
        return None


def export_hot(a: jax.Array, route: _Route) -> torch.Tensor | None:
    """A kernel's single-device result of a :func:`fast_export_dtype` dtype, on ``route``'s device, as a
    torch tensor ordered on torch's current stream; None when the fast export is off."""
    return _fast_export(a, route) if _FAST["export"] else None


def to_torch_hot(a: jax.Array, like: torch.Tensor, *, name: str = "array") -> torch.Tensor:
    """:func:`to_torch` for a layer's hot path: ``a`` is a kernel's single-device result on ``like``'s device."""
    if _FAST["export"]:
        want = _J2T.get(a.dtype)
        if want is not None and want not in _FP8_TORCH:
            route = _route(like)
            if route is not None:
                t = _fast_export(a, route)
                if t is not None:
                    return t
    return to_torch(a, name=name, verify=False)


def to_torch(a: jax.Array, *, name: str = "array", verify: bool = True) -> torch.Tensor:
    """A torch tensor sharing ``a``'s memory (zero copy), on the torch device matching ``a``'s device.

    ``verify`` compares the data pointers afterwards (skipped on ``apply_weights``'s hot path).
    """
    if not isinstance(a, jax.Array):
        raise InputError(f"{name}: expected a jax.Array, got {type(a).__name__}")
    if len(a.devices()) != 1:
        raise InputError(f"{name}: only single-device arrays cross DLPack, got one on {len(a.devices())} devices")
    want = torch_dtype(a.dtype)
    if want in _FP8_TORCH and not _native_fp8("to_torch"):
        t = torch.from_dlpack(_Retagged(a, _FP8_DL_CODE[want], _DL_UINT)).view(want)
    else:
        t = _export(a)
    if t.dtype != want:
        raise InputError(f"dtype: DLPack turned JAX {a.dtype} into torch {t.dtype}, expected {want}")
    if verify and not shares_memory(t, a):
        raise LayoutError(f"{name}: DLPack produced a copy (pointers differ); refusing a silent copy")
    return t


def _export(a: jax.Array) -> torch.Tensor:
    """``torch.from_dlpack(a)`` through the cached route when the fast export is on."""
    if _FAST["export"]:
        dev = next(iter(a.devices()))
        route = _JAX_ROUTES.get(dev, False)
        if route is False:
            route = _JAX_ROUTES[dev] = _route_for_jax_device(dev)
        if route is not None:
            t = _fast_export(a, route)
            if t is not None:
                return t
    return torch.from_dlpack(a)


_JAX_ROUTES: dict[Any, _Route | None] = {}


def _route_for_jax_device(dev: Any) -> _Route | None:
    if dev.platform == "cpu":
        return _route(torch.empty(0))
    if dev.platform in ("cuda", "gpu") and torch.cuda.is_available() and not getattr(torch.version, "hip", None):
        return _route(torch.empty(0, device=f"cuda:{dev.local_hardware_id}"))
    return None
