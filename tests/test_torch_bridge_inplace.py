"""In-place updates of a processed layer's tensors are never silently ignored.

The hot path keeps JAX views of the layer's parameters (and of the last bias) between calls. Zero-copy
views see in-place writes by construction (same memory). Where a view had to be a copy (``copy=True``
for memory JAX cannot share), an in-place write to the torch tensor must make the layer re-read it:
the cache is keyed on the tensor's identity, data pointer and ``_version`` (bumped by every in-place op).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

import qlin  # noqa: E402
from qlin.testing import reference_linear_np  # noqa: E402
from qlin.tolerances import kernel_rtol, rel_err  # noqa: E402
from qlin_torch_bridge import QuantLinear, apply_weights, lifecycle, process_weights_after_loading, to_torch  # noqa: E402

N, K = 48, 64
CFG = qlin.FP8ScaledMMConfig(out_dtype=jnp.float32)


def quantized(seed):
    w = jax.random.normal(jax.random.key(seed), (N, K), jnp.float32)
    return qlin.quantize_weight(w, CFG)


class Layer(nn.Module):
    def __init__(self, params, n_major_weight=False):
        super().__init__()
        for attr, value in params.to_mapping().items():
            t = to_torch(value).clone()
            if attr == "weight" and n_major_weight:
                t = t.t().contiguous().t()  # logical (N, K), N-major memory: JAX can only take a copy
            setattr(self, attr, nn.Parameter(t, requires_grad=False))


def x_input(m=5):
    return torch.randn(m, K, generator=torch.Generator().manual_seed(1))


def count_rereads(monkeypatch):
    calls = []
    real = lifecycle.params_from_module

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(lifecycle, "params_from_module", spy)
    return calls


def test_in_place_write_to_a_copied_weight_is_picked_up(monkeypatch):
    p1, p2 = quantized(0), quantized(1)
    layer = process_weights_after_loading(Layer(p1, n_major_weight=True), CFG, copy=True)
    st = layer._qlin_state
    # the test is about the copy path: the cached JAX weight is a copy, not a view of layer.weight
    assert st.params.weight.unsafe_buffer_pointer() != layer.weight.data_ptr()
    x = x_input()
    y1 = apply_weights(layer, x)
    assert rel_err(y1.numpy(), reference_linear_np(x.numpy(), p1, CFG)) <= kernel_rtol(jnp.float32)
    with torch.no_grad():  # load new weights in place, as a weight-update / refit would
        layer.weight.copy_(to_torch(p2.weight))
        layer.weight_scale.copy_(to_torch(p2.weight_scale))
    assert layer.weight.stride() == (1, N)  # still N-major: still a copy for JAX
    rereads = count_rereads(monkeypatch)
    y2 = apply_weights(layer, x)
    assert rel_err(y2.numpy(), reference_linear_np(x.numpy(), p2, CFG)) <= kernel_rtol(jnp.float32)
    assert not torch.allclose(y1, y2)
    assert len(rereads) == 1
    apply_weights(layer, x)  # steady again: nothing changed since the re-read
    assert len(rereads) == 1


def test_in_place_write_to_a_shared_scale_is_seen_and_re_read_once(monkeypatch):
    layer = process_weights_after_loading(Layer(quantized(0)), CFG)
    st = layer._qlin_state
    assert st.params.weight_scale.unsafe_buffer_pointer() == layer.weight_scale.data_ptr()  # zero copy
    x = x_input()
    y1 = apply_weights(layer, x).clone()
    rereads = count_rereads(monkeypatch)
    with torch.no_grad():
        layer.weight_scale.mul_(2)
    y2 = apply_weights(layer, x)
    torch.testing.assert_close(y2, y1 * 2, rtol=1e-6, atol=1e-6)
    assert len(rereads) == 1
    # the re-read params still share the layer's memory
    assert layer._qlin_state.params.weight_scale.unsafe_buffer_pointer() == layer.weight_scale.data_ptr()
    assert layer._qlin_state.params.weight.unsafe_buffer_pointer() == layer.weight.data_ptr()
    apply_weights(layer, x)
    assert len(rereads) == 1


def test_in_place_write_to_a_copied_bias_is_picked_up():
    layer = process_weights_after_loading(Layer(quantized(0)), CFG)
    x = x_input()
    storage = torch.linspace(-1, 1, 2 * N)
    bias = storage[::2]  # strided: JAX gets a copy (copy=True)
    y1 = apply_weights(layer, x, bias, copy=True).clone()
    assert layer._qlin_state.bias_jax.unsafe_buffer_pointer() != bias.data_ptr()
    with torch.no_grad():
        bias.add_(1.0)  # a view: bumps the version counter it shares with `storage`
    y2 = apply_weights(layer, x, bias, copy=True)
    torch.testing.assert_close(y2, y1 + 1.0, rtol=1e-5, atol=1e-5)
    storage.mul_(0)  # an in-place write through the base tensor is seen too (shared version counter)
    y3 = apply_weights(layer, x, bias, copy=True)
    torch.testing.assert_close(y3, apply_weights(layer, x), rtol=0, atol=0)


def test_quant_linear_sees_in_place_bias_and_weight_updates():
    torch.manual_seed(0)
    lin = nn.Linear(K, N).requires_grad_(False)
    q = QuantLinear.from_linear(lin, CFG)
    x = x_input()
    with torch.no_grad():
        y1 = q(x).clone()
        q.bias.add_(0.5)
        torch.testing.assert_close(q(x), y1 + 0.5, rtol=1e-5, atol=1e-5)
        q.weight_scale.mul_(0)
        torch.testing.assert_close(q(x), q.bias.expand(5, N), rtol=0, atol=0)


def test_inference_mode_tensors_have_no_version_and_still_work():
    with torch.inference_mode():
        torch.manual_seed(0)
        lin = nn.Linear(K, N)
        q = QuantLinear.from_linear(lin, CFG)
        x = x_input()
        y = q(x)
        versions = [ver for _holder, _attr, obj, _ptr, ver in q._qlin_state.checks if obj is not None]
        assert versions and all(v is None for v in versions)  # inference tensors track no version
        ref = reference_linear_np(x.numpy(), q._qlin_state.params, CFG, q.bias.numpy())
        assert rel_err(np.asarray(y), ref) <= kernel_rtol(jnp.float32)
        assert torch.equal(q(x), y)


@pytest.mark.parametrize("how", ["parameter", "buffer", "plain attribute"])
def test_an_attribute_absent_at_processing_and_set_later_is_read(monkeypatch, how):
    # fp8 dynamic per-token: input_scale_ub is optional; set after processing, the layer must re-read
    layer = process_weights_after_loading(Layer(quantized(0)), CFG)
    assert getattr(layer, "input_scale_ub", None) is None
    x = x_input()
    apply_weights(layer, x)
    rereads = count_rereads(monkeypatch)
    ub = torch.tensor(7.0)
    if how == "parameter":
        layer.input_scale_ub = nn.Parameter(ub, requires_grad=False)
    elif how == "buffer":
        layer.register_buffer("input_scale_ub", ub)
    else:
        layer.input_scale_ub = ub
    apply_weights(layer, x)
    assert len(rereads) == 1
    assert float(layer._qlin_state.params.input_scale_ub) == 7.0
    apply_weights(layer, x)
    assert len(rereads) == 1
