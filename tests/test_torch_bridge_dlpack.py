"""Zero-copy torch <-> JAX conversion: every dtype, both directions, pointers compared; layouts; fp8 fallback."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qlin.errors import InputError  # noqa: E402
from qlin_torch_bridge import dlpack  # noqa: E402
from qlin_torch_bridge.dlpack import LayoutError, to_jax, to_jax_hot, to_torch  # noqa: E402

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.int32, torch.bfloat16, torch.float16,
          torch.float32]


def _sample(dtype, shape=(32, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.int8, torch.int32):
        return torch.randint(-100, 100, shape, generator=g, dtype=dtype)
    return (torch.randn(shape, generator=g) * 4).to(dtype)


def _same_values(t, a):
    # compare bytes: fp8 NaN-free here, but byte equality is the strictest statement
    tb = t.contiguous().view(torch.uint8).numpy() if t.element_size() == 1 else t.view(
        {2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()
    ab = np.asarray(a).view(tb.dtype)
    return np.array_equal(tb, ab)


@pytest.fixture(params=["native", "retagged", "public-api"])
def fp8_path(request, monkeypatch):
    """fp8 natively or through the uint8 view + re-tagged capsule fallback; the fast import or JAX's public one."""
    if request.param == "retagged":
        monkeypatch.setattr(dlpack, "_NATIVE_FP8", {"to_jax": False, "to_torch": False})
    if request.param == "public-api":
        monkeypatch.setitem(dlpack._FAST, "on", False)
        monkeypatch.setitem(dlpack._FAST, "export", False)
    return request.param


def test_fast_import_is_active():
    # the hot path this jaxlib should take; if jaxlib changes, this says so (the public path still works)
    assert dlpack._FAST["on"] and dlpack._FAST["export"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_to_jax_is_zero_copy(dtype, fp8_path):
    t = _sample(dtype)
    a = to_jax(t)
    assert a.dtype == dlpack.jax_dtype(dtype)
    assert a.shape == tuple(t.shape)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    assert _same_values(t, a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jax_to_torch_is_zero_copy(dtype, fp8_path):
    a = to_jax(_sample(dtype, seed=1)).copy()  # a JAX-owned buffer
    t = to_torch(a)
    assert t.dtype == dtype
    assert tuple(t.shape) == a.shape
    assert t.data_ptr() == a.unsafe_buffer_pointer()
    assert _same_values(t, a)


def test_fp8_values_survive_the_retagged_path(monkeypatch):
    monkeypatch.setattr(dlpack, "_NATIVE_FP8", {"to_jax": False, "to_torch": False})
    t = torch.tensor([0.0, 1.0, -2.5, 448.0, -448.0, 0.015625], dtype=torch.float32).to(torch.float8_e4m3fn)
    a = to_jax(t)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), t.float().numpy())
    back = to_torch(jnp.asarray([3.0, -0.5], jnp.float8_e5m2))
    assert back.dtype == torch.float8_e5m2
    assert back.float().tolist() == [3.0, -0.5]


def test_jax_results_round_trip_back_to_the_same_torch_memory():
    t = _sample(torch.float32)
    assert to_torch(to_jax(t)).data_ptr() == t.data_ptr()
    y = jax.jit(lambda v: v * 2)(to_jax(t))
    ty = to_torch(y)
    assert ty.data_ptr() == y.unsafe_buffer_pointer()
    torch.testing.assert_close(ty, t * 2)


def test_scalars_and_vectors_are_zero_copy():
    for t in (torch.tensor(0.25), torch.arange(7, dtype=torch.int32), torch.ones(5, 1)):
        a = to_jax(t)
        assert a.unsafe_buffer_pointer() == t.data_ptr() and a.shape == tuple(t.shape)


def test_transposed_view_is_rejected_not_copied():
    base = _sample(torch.float32, (16, 24))
    with pytest.raises(LayoutError, match=r"not row-major.*transposed view.*copy=True"):
        to_jax(base.t())
    # the view's transpose is the original memory: zero copy, right values
    a = to_jax(base.t().t())
    assert a.unsafe_buffer_pointer() == base.data_ptr()


def test_transposed_view_with_explicit_copy_has_the_right_layout():
    base = _sample(torch.float32, (16, 24))
    a = to_jax(base.t(), copy=True)
    assert a.shape == (24, 16)
    assert a.unsafe_buffer_pointer() != base.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), base.t().numpy())


@pytest.mark.parametrize("make", [
    lambda b: b[:, ::2],            # strided columns
    lambda b: b[::2],               # strided rows
    lambda b: b[:1].expand(16, 24),  # broadcast (stride 0)
], ids=["cols", "rows", "expand"])
def test_non_contiguous_views(make):
    view = make(_sample(torch.float32, (16, 24)))
    with pytest.raises(LayoutError, match="not row-major"):
        to_jax(view)
    np.testing.assert_array_equal(np.asarray(to_jax(view, copy=True)), view.numpy())


def test_unaligned_view_needs_an_explicit_copy():
    base = torch.arange(64, dtype=torch.float32)
    view = base[1:]  # contiguous, but 4 bytes past an aligned allocation
    with pytest.raises(LayoutError, match="aligned"):
        to_jax(view)
    np.testing.assert_array_equal(np.asarray(to_jax(view, copy=True)), view.numpy())


@pytest.mark.parametrize("offset", [1, 4, 8])
def test_views_not_16_byte_aligned_are_refused_on_every_path(offset):
    # jaxlib checks alignment only on the CPU; on an H100 it accepted a 4-byte offset view and the next
    # kernel failed with CUDA_ERROR_MISALIGNED_ADDRESS, so the bridge checks 16 bytes itself.
    base = torch.arange(256, dtype=torch.int8)
    assert base.data_ptr() % 64 == 0
    view = base[offset:]
    with pytest.raises(LayoutError, match="16-byte aligned"):
        to_jax(view)
    with pytest.raises(LayoutError, match="16-byte aligned"):
        to_jax_hot(view)
    np.testing.assert_array_equal(np.asarray(to_jax(view, copy=True)), view.numpy())
    aligned = base[64:]  # jaxlib's CPU client wants 64 bytes; CUDA buffers get the bridge's 16-byte check
    assert to_jax(aligned).unsafe_buffer_pointer() == aligned.data_ptr()


def test_bad_tensors_get_clear_errors():
    with pytest.raises(InputError, match="weight: requires grad"):
        to_jax(torch.ones(3, requires_grad=True), name="weight")
    with pytest.raises(InputError, match="float64 does not cross"):
        to_jax(torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match="expected a torch.Tensor"):
        to_jax(np.ones(3))
    with pytest.raises(InputError, match="meta"):
        to_jax(torch.ones(3, device="meta"))
    with pytest.raises(InputError, match="expected a jax.Array"):
        to_torch(torch.ones(3))
    with pytest.raises(InputError, match="does not cross"):
        to_torch(jnp.ones(3, jnp.int16))
