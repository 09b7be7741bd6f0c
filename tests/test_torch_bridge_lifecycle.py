"""nn.Module attributes -> qlin Params (zero copy) and the vLLM lifecycle on torch layers, with bad input."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

import qlin  # noqa: E402
from qlin.errors import InputError, NoKernelError, ParamsError  # noqa: E402
from qlin.kernels.xla import XLAKernel  # noqa: E402
from qlin.params import FP8Params, Int8Params  # noqa: E402
from qlin.testing import reference_linear_np  # noqa: E402
from qlin.tolerances import kernel_rtol, rel_err  # noqa: E402
from qlin_torch_bridge import (  # noqa: E402
    LayoutError, MissingAttributeError, apply_weights, params_from_module, process_weights_after_loading, to_jax,
    to_torch,
)
from qlin_torch_bridge.lifecycle import layer_kernel  # noqa: E402

N, K = 48, 64


def frozen(t):
    return nn.Parameter(t, requires_grad=False)


def quantized(config, seed=0, n=N, k=K, **kw):
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    return qlin.quantize_weight(w, config, **kw)


class VllmStyleLayer(nn.Module):
    """A layer as vLLM builds it: parameters named like qlin's Params, created with requires_grad=False."""

    def __init__(self, params, *, scale_shape=None, transposed=False, buffers=()):
        super().__init__()
        self.input_size_per_partition = int(params.weight.shape[1])
        self.output_size_per_partition = int(params.weight.shape[0])
        for attr, value in params.to_mapping().items():
            t = to_torch(value).clone()
            if attr == "weight_scale" and scale_shape is not None:
                t = t.reshape(scale_shape)
            if attr == "weight" and transposed:
                t = t.t()  # vLLM: layer.weight = Parameter(weight.t()) -- a (K, N) view of (N, K) memory
            if attr in buffers:
                self.register_buffer(attr, t)
            else:
                setattr(self, attr, frozen(t))


def x_input(m=5, k=K, seed=1, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- params_from_module ---------------------------------------------------------------------------

def test_params_from_module_reads_every_field_zero_copy():
    cfg = qlin.FP8ScaledMMConfig(activation="dynamic_per_token")
    layer = VllmStyleLayer(quantized(cfg, input_scale_ub=jnp.float32(5.0)))
    p = params_from_module(layer, FP8Params)
    assert isinstance(p, FP8Params)
    for field, attr in FP8Params.attribute_names().items():
        t, a = getattr(layer, attr, None), getattr(p, field)
        if t is None:
            assert a is None
        else:
            assert a.unsafe_buffer_pointer() == t.data_ptr(), attr
    assert float(p.input_scale_ub) == 5.0


def test_int8_extras_are_read_by_their_class_level_names():
    cfg = qlin.Int8ScaledMMConfig(activation="static", symmetric=False)
    params = quantized(cfg, input_scale=jnp.float32(0.05), input_zero_point=jnp.int32(-3))
    layer = VllmStyleLayer(params)
    p = params_from_module(layer, Int8Params)
    assert p.azp_adj.unsafe_buffer_pointer() == layer.azp_adj.data_ptr()
    assert int(p.input_zero_point) == -3
    np.testing.assert_array_equal(np.asarray(p.azp_adj), np.asarray(params.azp_adj))


@dataclasses.dataclass(kw_only=True)
class SmoothedFP8Params(FP8Params):
    """A subclass with an extra (required) field stored under its own attribute name."""

    smooth: jax.Array

    SMOOTH: ClassVar[str] = "smooth_factor"
    REQUIRED: ClassVar[tuple[str, ...]] = ("weight", "weight_scale", "smooth")


def test_subclass_extra_fields_are_mapped_by_their_names():
    layer = VllmStyleLayer(quantized(qlin.FP8ScaledMMConfig()))
    layer.smooth_factor = frozen(torch.linspace(0.5, 2.0, K))
    p = params_from_module(layer, SmoothedFP8Params)
    assert p.smooth.unsafe_buffer_pointer() == layer.smooth_factor.data_ptr()
    del layer.smooth_factor
    with pytest.raises(MissingAttributeError, match=r"'smooth_factor'.*SmoothedFP8Params\.SMOOTH.*requires"):
        params_from_module(layer, SmoothedFP8Params)


def test_missing_attribute_names_the_attribute_and_the_params_class():
    layer = VllmStyleLayer(quantized(qlin.Int8ScaledMMConfig()))
    del layer.weight_scale
    with pytest.raises(MissingAttributeError, match=r"no attribute 'weight_scale' \(Int8Params\.WEIGHT_SCALE\)"):
        params_from_module(layer, Int8Params)
    with pytest.raises(MissingAttributeError, match="Int8Params"):
        process_weights_after_loading(layer, qlin.Int8ScaledMMConfig())


def test_vllm_transposed_weight_is_read_without_copy():
    cfg = qlin.FP8ScaledMMConfig()
    layer = VllmStyleLayer(quantized(cfg), transposed=True)
    assert tuple(layer.weight.shape) == (K, N) and not layer.weight.is_contiguous()
    p = params_from_module(layer, FP8Params, weight_layout="kn")
    assert p.weight.shape == (N, K)
    assert p.weight.unsafe_buffer_pointer() == layer.weight.data_ptr()
    np.testing.assert_array_equal(np.asarray(p.weight.astype(jnp.float32)), layer.weight.t().float().numpy())
    # the default (N, K) reading refuses it, pointing at weight_layout
    with pytest.raises(ParamsError, match="weight_layout='kn'"):
        params_from_module(layer, FP8Params)


def test_weight_whose_memory_is_not_k_major_needs_an_explicit_copy():
    cfg = qlin.FP8ScaledMMConfig()
    params = quantized(cfg)
    layer = VllmStyleLayer(params)
    layer.weight = frozen(to_torch(params.weight).t().contiguous().t())  # (N, K), N-major memory
    with pytest.raises(LayoutError, match="layer.weight.*not row-major"):
        params_from_module(layer, FP8Params)
    p = params_from_module(layer, FP8Params, copy=True)
    np.testing.assert_array_equal(np.asarray(p.weight.astype(jnp.float32)), np.asarray(params.weight.astype(jnp.float32)))


# -- lifecycle ---------------------------------------------------------------------------------------

CONFIGS = [
    qlin.FP8ScaledMMConfig(out_dtype=jnp.float32),
    qlin.FP8ScaledMMConfig(activation="static", weight_granularity="per_tensor"),
    qlin.Int8ScaledMMConfig(out_dtype=jnp.float16),
    qlin.Int8ScaledMMConfig(activation="static", symmetric=False, out_dtype=jnp.float32),
    qlin.FP8ScaledMMConfig(weight_granularity=(16, 32), activation="dynamic_per_group", group_size=32,
                           out_dtype=jnp.float32),
]


def _static_kw(cfg):
    if not cfg.is_static:
        return {}
    kw = {"input_scale": jnp.float32(3.0 / (cfg.qmax))}
    if isinstance(cfg, qlin.Int8ScaledMMConfig) and not cfg.symmetric:
        kw["input_zero_point"] = jnp.int32(4)
    return kw


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_apply_weights_matches_the_float64_oracle(cfg):
    params = quantized(cfg, **_static_kw(cfg))
    layer = VllmStyleLayer(params)
    process_weights_after_loading(layer, cfg)
    x = x_input()
    bias = torch.linspace(-1, 1, N)
    y = apply_weights(layer, x, bias)
    assert isinstance(y, torch.Tensor) and y.shape == (5, N)
    assert y.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.out_dtype.name]
    ref = reference_linear_np(np.asarray(to_jax(x)), params, cfg, np.asarray(to_jax(bias)))
    assert rel_err(y.float().numpy(), ref) <= kernel_rtol(cfg.out_dtype)


def test_process_replaces_changed_parameters_vllm_style():
    cfg = qlin.Int8ScaledMMConfig(activation="static", symmetric=False, out_dtype=jnp.float32)
    params = quantized(cfg, input_scale=jnp.float32(0.02), input_zero_point=jnp.int32(1))
    params = params.replace(azp_adj=None)  # the kernel computes it
    layer = VllmStyleLayer(params, scale_shape=(N, 1), buffers=("input_scale",))
    layer.input_scale = layer.input_scale.reshape(1)  # compressed-tensors stores (1,)
    old_weight, old_scale = layer.weight, layer.weight_scale
    assert not hasattr(layer, "azp_adj")
    process_weights_after_loading(layer, cfg)
    # untouched weight keeps its identity; the (N, 1) scale is replaced by a new (N,) parameter
    assert layer.weight is old_weight
    assert layer.weight_scale is not old_scale
    assert isinstance(layer.weight_scale, nn.Parameter) and not layer.weight_scale.requires_grad
    assert tuple(layer.weight_scale.shape) == (N,)
    assert "weight_scale" in dict(layer.named_parameters())
    # a buffer stays a buffer (with the canonical () shape)
    assert "input_scale" in dict(layer.named_buffers()) and tuple(layer.input_scale.shape) == ()
    # azp_adj was computed and registered; every replaced parameter shares memory with the processed params
    assert isinstance(layer.azp_adj, nn.Parameter) and layer.azp_adj.dtype == torch.int32
    processed = layer._qlin_state.params
    for attr in ("weight_scale", "azp_adj", "input_zero_point"):
        assert getattr(layer, attr).data_ptr() == getattr(processed, attr).unsafe_buffer_pointer(), attr
    np.testing.assert_array_equal(layer.azp_adj.numpy(), np.asarray(qlin.quantize.compute_azp_adj(params.weight)))
    assert layer_kernel(layer).name == "xla"


def test_transposed_vllm_layer_runs_through_the_lifecycle():
    cfg = qlin.FP8ScaledMMConfig(out_dtype=jnp.float32)
    params = quantized(cfg)
    layer = VllmStyleLayer(params, transposed=True)
    process_weights_after_loading(layer, cfg, weight_layout="kn")
    x = x_input()
    assert rel_err(apply_weights(layer, x).numpy(), reference_linear_np(x.numpy(), params, cfg)) <= kernel_rtol(
        jnp.float32)


def test_parameters_replaced_after_processing_are_picked_up():
    cfg = qlin.FP8ScaledMMConfig(out_dtype=jnp.float32)
    layer = VllmStyleLayer(quantized(cfg))
    layer.qlin_config = cfg
    process_weights_after_loading(layer)
    x = x_input()
    y1 = apply_weights(layer, x)
    layer.weight_scale = frozen(layer.weight_scale.detach() * 2)
    y2 = apply_weights(layer, x)
    torch.testing.assert_close(y2, y1 * 2, rtol=1e-6, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------

def test_wrong_dtypes():
    cfg = qlin.FP8ScaledMMConfig()
    layer = VllmStyleLayer(quantized(cfg))
    layer.weight = frozen(layer.weight.float())
    with pytest.raises(ParamsError, match="weight: expected dtype float8_e4m3fn"):
        process_weights_after_loading(layer, cfg)
    layer = process_weights_after_loading(VllmStyleLayer(quantized(cfg)), cfg)
    with pytest.raises(InputError, match="x: expected a float16/bfloat16/float32"):
        apply_weights(layer, torch.ones(2, K, dtype=torch.int32))
    with pytest.raises(InputError, match="x: torch torch.float64 does not cross|float64 does not cross"):
        apply_weights(layer, torch.ones(2, K, dtype=torch.float64))
    with pytest.raises(InputError, match="last dimension must equal the weight's K"):
        apply_weights(layer, torch.ones(2, K + 1))


def test_tensors_on_different_devices():
    cfg = qlin.FP8ScaledMMConfig()
    layer = VllmStyleLayer(quantized(cfg))
    layer.weight_scale = frozen(torch.ones(N, device="meta"))
    with pytest.raises(InputError, match=r"weight_scale is on meta but VllmStyleLayer.weight is on cpu"):
        process_weights_after_loading(layer, cfg)
    layer = process_weights_after_loading(VllmStyleLayer(quantized(cfg)), cfg)
    with pytest.raises(InputError, match=r"x \(input\) is on meta but VllmStyleLayer.weight is on cpu"):
        apply_weights(layer, torch.ones(2, K, device="meta"))


class _HopperOnly(XLAKernel):
    """A kernel registered for cuda only (as the Mosaic GPU kernel is)."""

    name = "test_hopper_only"


@pytest.fixture
def gpu_only_kernel():
    qlin.register_kernel(_HopperOnly, platforms=("cuda",), first=True)
    yield _HopperOnly.name
    qlin.unregister_kernel(_HopperOnly.name)


def test_cpu_tensors_with_a_gpu_only_kernel(gpu_only_kernel):
    cfg = qlin.FP8ScaledMMConfig()
    layer = VllmStyleLayer(quantized(cfg))
    with pytest.raises(InputError, match=r"'test_hopper_only' runs on \['cuda'\] only.*torch tensors on cpu"):
        process_weights_after_loading(layer, cfg, kernel=gpu_only_kernel)
    # selection without an override never picks it for cpu tensors
    process_weights_after_loading(layer, cfg)
    assert layer_kernel(layer).name != gpu_only_kernel


def test_qlin_kernel_env_forcing_a_gpu_kernel_on_cpu_tensors(gpu_only_kernel, monkeypatch):
    monkeypatch.setenv("QLIN_KERNEL", gpu_only_kernel)
    with pytest.raises(InputError, match=r"QLIN_KERNEL: 'test_hopper_only' runs on \['cuda'\] only"):
        process_weights_after_loading(VllmStyleLayer(quantized(qlin.FP8ScaledMMConfig())), qlin.FP8ScaledMMConfig())


def test_unknown_kernel_name_is_an_error():
    layer = VllmStyleLayer(quantized(qlin.FP8ScaledMMConfig()))
    with pytest.raises((KeyError, NoKernelError), match="no_such_kernel"):
        process_weights_after_loading(layer, qlin.FP8ScaledMMConfig(), kernel="no_such_kernel")


def test_requires_grad_weights_and_inputs():
    cfg = qlin.FP8ScaledMMConfig()
    layer = VllmStyleLayer(quantized(cfg))
    layer.weight_scale = nn.Parameter(layer.weight_scale.detach().clone())  # requires_grad=True (nn default)
    with pytest.raises(InputError, match=r"VllmStyleLayer.weight_scale: requires grad.*inference-only"):
        process_weights_after_loading(layer, cfg)
    layer = process_weights_after_loading(VllmStyleLayer(quantized(cfg)), cfg)
    with pytest.raises(InputError, match="x: requires grad"):
        apply_weights(layer, torch.ones(2, K, requires_grad=True))
    with torch.no_grad():
        assert apply_weights(layer, torch.ones(2, K, requires_grad=True)).shape == (2, N)


def test_apply_before_process_and_missing_config():
    layer = VllmStyleLayer(quantized(qlin.FP8ScaledMMConfig()))
    with pytest.raises(InputError, match="call process_weights_after_loading"):
        apply_weights(layer, x_input())
    with pytest.raises(InputError, match="qlin_config"):
        process_weights_after_loading(layer)


def test_non_contiguous_input_is_an_error_unless_copy_is_allowed():
    cfg = qlin.Int8ScaledMMConfig(out_dtype=jnp.float32)
    params = quantized(cfg)
    layer = process_weights_after_loading(VllmStyleLayer(params), cfg)
    hidden = torch.randn(4, 3, K)
    cls_tokens = hidden[:, 0]  # a strided view, as BERT's pooler takes it
    with pytest.raises(LayoutError, match="x: shape"):
        apply_weights(layer, cls_tokens)
    y = apply_weights(layer, cls_tokens, copy=True)
    ref = reference_linear_np(cls_tokens.contiguous().numpy(), params, cfg)
    assert rel_err(y.numpy(), ref) <= kernel_rtol(jnp.float32)


def test_apply_weights_shares_x_and_y_with_the_kernel_call():
    cfg = qlin.FP8ScaledMMConfig(out_dtype=jnp.float32)
    layer = process_weights_after_loading(VllmStyleLayer(quantized(cfg)), cfg)
    state = layer._qlin_state
    seen = {}
    real = state.call

    def spy(leaves, xj, bj):
        seen["x"], seen["y"] = xj, real(leaves, xj, bj)
        return seen["y"]

    state.call = spy
    x = x_input()
    y = apply_weights(layer, x)
    assert seen["x"].unsafe_buffer_pointer() == x.data_ptr()
    assert y.data_ptr() == seen["y"].unsafe_buffer_pointer()
