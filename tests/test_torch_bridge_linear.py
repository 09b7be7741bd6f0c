"""QuantLinear (drop-in quantized nn.Linear) and quantize_(model, config, filter=...)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

import qlin  # noqa: E402
from qlin.errors import InputError  # noqa: E402
from qlin.testing import reference_linear_np  # noqa: E402
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err  # noqa: E402
from qlin_torch_bridge import LayoutError, QuantLinear, quantize_, to_jax  # noqa: E402
from qlin_torch_bridge import linear as linear_mod  # noqa: E402

F32 = dict(out_dtype=jnp.float32)
CONFIGS = [
    qlin.FP8ScaledMMConfig(**F32),
    qlin.FP8ScaledMMConfig(fp8_format="e5m2", **F32),
    qlin.Int8ScaledMMConfig(**F32),
    qlin.Int8ScaledMMConfig(symmetric=False, **F32),
]


def gaussian_linear(k=128, n=96, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def x_input(*lead, k=128, seed=1):
    return torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_quant_linear_vs_float_and_vs_oracle(cfg):
    lin = gaussian_linear()
    q = QuantLinear.from_linear(lin, cfg)
    x = x_input(3, 5)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    # the quantization error against the float layer
    assert rel_err(y.numpy(), ref.numpy()) <= quant_rtol(cfg)
    # the kernel against the float64 oracle on the same 8-bit operands
    params = q._qlin_state.params
    oracle = reference_linear_np(x.numpy(), params, cfg, lin.bias.detach().numpy())
    assert rel_err(y.numpy(), oracle) <= kernel_rtol(jnp.float32)


def test_quant_linear_holds_8bit_frozen_parameters_and_shares_the_bias():
    lin = gaussian_linear()
    q = QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig())
    assert q.weight.dtype == torch.float8_e4m3fn and tuple(q.weight.shape) == (96, 128)
    assert q.weight_scale.dtype == torch.float32 and tuple(q.weight_scale.shape) == (96,)
    assert all(not p.requires_grad for p in q.parameters())
    assert q.bias.data_ptr() == lin.bias.data_ptr()  # no copy of the float bias
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert "fp8-e4m3fn" in repr(q) and "kernel='xla'" in repr(q)


def test_weight_is_quantized_once(monkeypatch):
    calls = []
    real = linear_mod.quantize_weight
    monkeypatch.setattr(linear_mod, "quantize_weight", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = nn.Sequential(gaussian_linear(), nn.ReLU(), gaussian_linear(96, 64, seed=2))
    quantize_(model, qlin.Int8ScaledMMConfig())
    assert len(calls) == 2
    ptr = model[0].weight.data_ptr()
    with torch.no_grad():
        for _ in range(3):
            model(x_input(4))
    assert len(calls) == 2 and model[0].weight.data_ptr() == ptr


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": gaussian_linear(64, 64, 1), "o": gaussian_linear(64, 64, 2)})
        self.norm = nn.LayerNorm(64)
        self.mlp = nn.Sequential(gaussian_linear(64, 128, 3), nn.GELU(), gaussian_linear(128, 64, 4))

    def forward(self, x):
        h = self.attn["o"](self.attn["q"](x))
        return self.mlp(self.norm(h + x))


def test_quantize_swaps_every_linear_and_respects_the_filter():
    model = Block()
    seen = []

    def only_mlp(mod, fqn):
        seen.append((type(mod).__name__, fqn))
        return fqn.startswith("mlp.")

    out = quantize_(model, qlin.FP8ScaledMMConfig(), filter=only_mlp)
    assert out is model
    assert isinstance(model.mlp[0], QuantLinear) and isinstance(model.mlp[2], QuantLinear)
    assert type(model.attn["q"]) is nn.Linear and type(model.attn["o"]) is nn.Linear
    assert ("Linear", "attn.q") in seen and ("Linear", "mlp.2") in seen
    quantize_(model, qlin.FP8ScaledMMConfig())
    assert all(not isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_match_dtype_keeps_the_model_dtype(dtype):
    model = Block().to(dtype)
    ref_model = Block().to(dtype)
    ref_model.load_state_dict(model.state_dict())
    quantize_(model, qlin.FP8ScaledMMConfig())  # config says bf16; layers follow the model
    x = x_input(2, 7, k=64).to(dtype)
    with torch.no_grad():
        y, ref = model(x), ref_model(x)
    assert y.dtype == dtype
    # whole-block error: two quantized layers in series, through LayerNorm
    assert rel_err(y.float().numpy(), ref.float().numpy()) <= 2 * quant_rtol(qlin.FP8ScaledMMConfig())
    q = quantize_(gaussian_linear(), qlin.FP8ScaledMMConfig(), match_dtype=False)
    with torch.no_grad():
        assert q(x_input(2)).dtype == torch.bfloat16


def test_a_bare_linear_is_returned_swapped():
    q = quantize_(gaussian_linear(), qlin.Int8ScaledMMConfig())
    assert isinstance(q, QuantLinear)


@pytest.mark.parametrize("cfg", [
    qlin.FP8ScaledMMConfig(activation="static", **F32),
    qlin.Int8ScaledMMConfig(activation="static", **F32),
    qlin.Int8ScaledMMConfig(activation="static", symmetric=False, **F32),
], ids=lambda c: c.describe())
def test_static_calibration(cfg):
    model = nn.Sequential(gaussian_linear(), nn.ReLU(), gaussian_linear(96, 32, seed=5))
    batches = [x_input(8, seed=s) + 0.5 for s in range(3)]
    with torch.no_grad():
        hidden = [torch.relu(model[0](b)) for b in batches]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])  # the float model, before the swap
    quantize_(model, cfg, calibrate=lambda m: [m(b) for b in batches])
    for q, seen in ((model[0], torch.cat(batches)), (model[2], torch.cat(hidden))):
        want_s, want_zp = qlin.calibrate_static(to_jax(seen), cfg)
        np.testing.assert_allclose(float(q.input_scale), float(want_s), rtol=1e-6)
        if want_zp is not None:
            assert int(q.input_zero_point) == int(want_zp)
    with torch.no_grad():
        y = torch.cat([model(b) for b in batches])
    assert rel_err(y.numpy(), ref.numpy()) <= 2 * quant_rtol(cfg)


def test_calibration_arguments_are_checked():
    with pytest.raises(InputError, match="calibrate: config.activation='static' needs"):
        quantize_(Block(), qlin.FP8ScaledMMConfig(activation="static"))
    with pytest.raises(InputError, match="calibrate: given, but"):
        quantize_(Block(), qlin.FP8ScaledMMConfig(), calibrate=lambda m: None)
    with pytest.raises(InputError, match="'attn.q' saw no input"):
        quantize_(Block(), qlin.FP8ScaledMMConfig(activation="static"), calibrate=lambda m: None)
    with pytest.raises(InputError, match="config: expected"):
        quantize_(Block(), "fp8")


def test_non_contiguous_inputs_need_allow_input_copy():
    lin = gaussian_linear()
    x = x_input(4, 3)[:, 0]  # strided, like BERT's pooler input
    strict = QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig(**F32))
    with pytest.raises(LayoutError, match="x: shape"):
        strict(x)
    relaxed = QuantLinear.from_linear(lin, qlin.FP8ScaledMMConfig(**F32), allow_input_copy=True)
    with torch.no_grad():
        torch.testing.assert_close(relaxed(x), strict(x.contiguous()))


def test_training_mode_input_is_refused():
    q = QuantLinear.from_linear(gaussian_linear(), qlin.FP8ScaledMMConfig())
    with pytest.raises(InputError, match="requires grad"):
        q(x_input(2).requires_grad_())


def test_param_data_moves_are_picked_up_and_dtype_casts_spare_quantized_params():
    lin = gaussian_linear()
    q = QuantLinear.from_linear(lin, qlin.Int8ScaledMMConfig(**F32))
    x = x_input(3)
    with torch.no_grad():
        y = q(x)
        # what module.to(device) does: same Parameter object, new storage
        q.weight_scale.data = q.weight_scale.data.clone() * 2
        torch.testing.assert_close(q(x) - lin.bias, (y - lin.bias) * 2, rtol=1e-5, atol=1e-4)
        q.weight_scale.data = q.weight_scale.data.clone() / 2
        q.half()
        assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
        assert q.bias.dtype == torch.float16
        torch.testing.assert_close(q(x), y, rtol=2e-3, atol=2e-2)  # only the bias was rounded to f16


def test_a_linear_shared_under_two_names_is_swapped_at_both():
    shared = gaussian_linear(64, 64)
    model = nn.Module()
    model.a, model.b = shared, shared
    quantize_(model, qlin.FP8ScaledMMConfig())
    assert isinstance(model.a, QuantLinear) and model.a is model.b
