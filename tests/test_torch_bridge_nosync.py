"""The bridge's steady-state call path: no host synchronisation, no re-processing, the lean conversions.

On the GPU a host sync in ``apply_weights`` (``block_until_ready``, ``unsafe_buffer_pointer`` on a
result not yet computed, ``device_get``, ``.item()``, ``torch.cuda.synchronize``, ...) would serialise
every call with the device. These tests run the hot path with every such function replaced by one
that records the call and raises, so a sync slipped into the path fails here, on the CPU.
"""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.array import ArrayImpl  # noqa: E402

import qlin  # noqa: E402
from qlin.errors import InputError  # noqa: E402
from qlin_torch_bridge import QuantLinear, apply_weights, lifecycle  # noqa: E402
from qlin_torch_bridge import dlpack  # noqa: E402
from qlin_torch_bridge.dlpack import LayoutError, to_jax_hot, to_torch_hot  # noqa: E402

K, N = 64, 48


class SyncCalled(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Every host-syncing entry point raises :class:`SyncCalled`; yields the list of calls made."""
    calls = []

    def trap(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise SyncCalled(f"{name} called on the steady-state path")
        return f

    targets = [
        (ArrayImpl, "block_until_ready"), (ArrayImpl, "unsafe_buffer_pointer"),
        (ArrayImpl, "tolist"), (ArrayImpl, "item"), (ArrayImpl, "copy_to_host_async"),
        (jax, "block_until_ready"), (jax, "device_get"),
        (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"), (torch.Tensor, "cpu"),
        (torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize"),
        (lifecycle, "params_from_module"),  # re-reading (and re-validating) params is not steady state
        (lifecycle, "process_weights_after_loading"),
    ]
    saved = [(obj, name, obj.__dict__[name] if name in obj.__dict__ else getattr(obj, name)) for obj, name in targets]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, trap(f"{getattr(obj, '__name__', obj)}.{name}"))
        yield calls
    finally:
        for obj, name, orig in saved:
            setattr(obj, name, orig)


def _layer(cfg=None, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=bias).requires_grad_(False)
    return QuantLinear.from_linear(lin, cfg or qlin.FP8ScaledMMConfig(out_dtype=jnp.float32))


@pytest.mark.parametrize("cfg", [qlin.FP8ScaledMMConfig(out_dtype=jnp.float32),
                                 qlin.Int8ScaledMMConfig(out_dtype=jnp.float32)], ids=["fp8", "int8"])
def test_steady_state_call_path_does_not_sync(cfg):
    q = _layer(cfg)
    x = torch.randn(8, K)
    want = q(x).clone()  # first call: caches (bias import, jit compile) may do anything
    with torch.no_grad(), no_host_sync() as calls:
        ys = [q(x) for _ in range(3)] + [apply_weights(q, x, q.bias)]
    assert calls == []
    for y in ys:
        assert torch.equal(y, want)


def test_the_sync_trap_catches_syncs():
    # the guard above is only worth something if it does trip on the calls it lists
    a = jnp.ones(3)
    for fn in (lambda: a.block_until_ready(), lambda: a.unsafe_buffer_pointer(), lambda: jax.device_get(a),
               lambda: torch.ones(1).item(), lambda: torch.cuda.synchronize()):
        with no_host_sync() as calls, pytest.raises(SyncCalled):
            fn()
        assert len(calls) == 1
    assert a.block_until_ready() is a  # restored afterwards


def test_changed_parameter_is_re_read_outside_the_steady_state():
    q = _layer()
    x = torch.randn(8, K)
    q(x)
    q.weight_scale.data = q.weight_scale.data * 2  # new memory: the cached params are stale
    with no_host_sync() as calls, pytest.raises(SyncCalled):
        q(x)
    assert calls == ["qlin_torch_bridge.lifecycle.params_from_module"]


def test_hot_conversions_share_memory_and_fall_back_with_the_same_errors():
    x = torch.randn(16, K)
    a = to_jax_hot(x)
    assert a.unsafe_buffer_pointer() == x.data_ptr() and a.dtype == jnp.float32
    y = jnp.arange(12.0).reshape(3, 4) * 2  # a JAX-owned result
    t = to_torch_hot(y, x)
    assert t.data_ptr() == y.unsafe_buffer_pointer() and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), np.asarray(y))
    with pytest.raises(LayoutError, match="x: shape"):
        to_jax_hot(torch.randn(K, 8).t(), name="x")
    assert to_jax_hot(torch.randn(K, 8).t(), copy=True).shape == (8, K)
    w = torch.randn(4, K, requires_grad=True)
    with pytest.raises(InputError, match="requires grad"):
        to_jax_hot(w, name="w")
    with torch.no_grad():
        assert to_jax_hot(w).unsafe_buffer_pointer() == w.data_ptr()
    f8 = torch.randn(4, 8).to(torch.float8_e4m3fn)  # fp8 takes the full path (native or re-tagged)
    assert to_jax_hot(f8).dtype == jnp.float8_e4m3fn
    with pytest.raises(InputError, match="meta"):
        to_jax_hot(torch.empty(4, device="meta"))


def test_routes_are_cached_per_device():
    x = torch.randn(4)
    r = dlpack._route(x)
    assert r is dlpack._route(torch.randn(8)) and r.jax_device.platform == "cpu"
    assert r.jax_stream is None and r.torch_stream() is None  # the CPU has no streams
    assert dlpack._route(torch.empty(1, device="meta")) is None


def test_hot_path_without_the_fast_paths(monkeypatch):
    # jaxlib without the raw import/export functions: the public DLPack APIs, same results
    monkeypatch.setitem(dlpack._FAST, "on", False)
    monkeypatch.setitem(dlpack._FAST, "export", False)
    q = _layer()
    x = torch.randn(8, K)
    y = q(x)
    ref = to_torch_hot(q._qlin_state.call(q._qlin_state.leaves, to_jax_hot(x), to_jax_hot(q.bias)), x)
    assert torch.equal(y, ref)
