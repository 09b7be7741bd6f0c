"""compressed-tensors / DeepSeek-fp8 safetensors checkpoints, written here in those layouts, loaded and run."""

import json

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

import qlin  # noqa: E402
from qlin.errors import ParamsError  # noqa: E402
from qlin.testing import reference_linear_np  # noqa: E402
from qlin.tolerances import kernel_rtol, quant_rtol, rel_err  # noqa: E402
from qlin_torch_bridge import QuantLinear, to_torch  # noqa: E402
from qlin_torch_bridge.checkpoint import QuantCheckpoint, load_quantized_linears  # noqa: E402

K = 256
F32 = dict(out_dtype=jnp.float32)


def float_weight(n, k=K, seed=0, scale=1.0):
    return jax.random.normal(jax.random.key(seed), (n, k), jnp.float32) * scale


def ct_group(wtype, wstrategy, astrategy="token", dynamic=True, asym=False, block=None):
    w = {"num_bits": 8, "type": wtype, "strategy": wstrategy, "symmetric": True, "dynamic": False}
    if block:
        w["block_structure"] = list(block)
    a = {"num_bits": 8, "type": wtype, "strategy": astrategy, "symmetric": not asym, "dynamic": dynamic}
    return {"targets": ["Linear"], "weights": w, "input_activations": a}


def write(path, tensors, quantization_config=None):
    path.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    if quantization_config is not None:
        cfg = {"torch_dtype": "float32", "quantization_config": quantization_config}
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def ct_tensors(prefix, params, *, scale_name="weight_scale", per_channel_as_column=True):
    """A layer's tensors in compressed-tensors shapes: (N, 1) channel scales, (1,) static scales."""
    out = {f"{prefix}.weight": to_torch(params.weight).clone()}
    s = to_torch(params.weight_scale).clone()
    if s.dim() == 1 and per_channel_as_column:
        s = s.reshape(-1, 1)
    elif s.dim() == 0:
        s = s.reshape(1)
    out[f"{prefix}.{scale_name}"] = s
    if params.input_scale is not None:
        out[f"{prefix}.input_scale"] = to_torch(params.input_scale).clone().reshape(1)
    zp = getattr(params, "input_zero_point", None)
    if zp is not None:
        out[f"{prefix}.input_zero_point"] = to_torch(zp).clone().reshape(1).to(torch.int8)
    return out


def x_input(m=6, seed=7):
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed))


def run(q: QuantLinear, x):
    with torch.no_grad():
        return q(x).float().numpy()


@pytest.mark.parametrize("cfg", [
    qlin.FP8ScaledMMConfig(**F32),
    qlin.Int8ScaledMMConfig(activation="static", weight_granularity="per_tensor", **F32),
    qlin.Int8ScaledMMConfig(activation="static", symmetric=False, **F32),
], ids=lambda c: c.describe())
def test_single_layer_round_trip(tmp_path, cfg):
    kw = {}
    if cfg.is_static:
        kw["input_scale"] = jnp.float32(4.0 / cfg.qmax)
        if not cfg.symmetric:
            kw["input_zero_point"] = jnp.int32(-5)
    params = qlin.quantize_weight(float_weight(64), cfg, **kw)
    wtype = "float" if isinstance(cfg, qlin.FP8ScaledMMConfig) else "int"
    wstrat = "channel" if cfg.weight_granularity == "per_channel" else "tensor"
    group = ct_group(wtype, wstrat, "tensor" if cfg.is_static else "token", dynamic=not cfg.is_static,
                     asym=not getattr(cfg, "symmetric", True))
    path = write(tmp_path, ct_tensors("model.fc", params),
                 {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}})
    ckpt = QuantCheckpoint(path)
    assert ckpt.layers() == ["model.fc"]
    assert ckpt.config_for("model.fc") == cfg
    q = ckpt.load_linear("model.fc")
    x = x_input()
    assert rel_err(run(q, x), reference_linear_np(x.numpy(), params, cfg)) <= kernel_rtol(jnp.float32)


def _shards(cfg, widths=(64, 32, 32), scales=(1.0, 3.0, 0.5), **kw):
    return [qlin.quantize_weight(float_weight(n, seed=i, scale=s), cfg, **kw)
            for i, (n, s) in enumerate(zip(widths, scales))]


def test_fused_fp8_per_tensor_shards_are_requantized_to_the_max_scale(tmp_path):
    cfg = qlin.FP8ScaledMMConfig(weight_granularity="per_tensor", activation="dynamic_per_token", **F32)
    shards = _shards(cfg)
    names = [f"layers.0.attn.{s}_proj" for s in "qkv"]
    tensors = {}
    for name, p in zip(names, shards):
        tensors |= ct_tensors(name, p)
    group = ct_group("float", "tensor")
    ckpt = QuantCheckpoint(write(tmp_path, tensors, {"quant_method": "compressed-tensors",
                                                     "config_groups": {"g": group}}))
    params, fused_cfg = ckpt.load_params(names)
    s = np.array([float(p.weight_scale) for p in shards], np.float32)
    assert fused_cfg == cfg
    assert float(params.weight_scale) == s.max()
    # each shard, dequantized with its own scale and requantized with the max (numpy + ml_dtypes oracle)
    want = np.concatenate([
        (np.asarray(p.weight).astype(np.float32) * si / s.max()).astype(ml_dtypes.float8_e4m3fn)
        for p, si in zip(shards, s)
    ])
    np.testing.assert_array_equal(np.asarray(params.weight).view(np.uint8), want.view(np.uint8))
    # the shard holding the max scale is unchanged
    k = int(s.argmax())
    start = sum(p.weight.shape[0] for p in shards[:k])
    np.testing.assert_array_equal(np.asarray(params.weight[start:start + shards[k].weight.shape[0]]).view(np.uint8),
                                  np.asarray(shards[k].weight).view(np.uint8))
    # and the fused layer still computes the float layer to fp8 accuracy
    x = x_input()
    ref = np.concatenate([x.numpy() @ np.asarray(float_weight(n, seed=i, scale=sc)).T
                          for i, (n, sc) in enumerate(zip((64, 32, 32), (1.0, 3.0, 0.5)))], axis=1)
    assert rel_err(run(ckpt.load_linear(names), x), ref) <= quant_rtol(cfg)


def test_fused_int8_per_tensor_shards_expand_to_per_channel(tmp_path):
    cfg = qlin.Int8ScaledMMConfig(weight_granularity="per_tensor", **F32)
    shards = _shards(cfg, widths=(48, 80))
    names = ["mlp.gate_proj", "mlp.up_proj"]
    tensors = {}
    for name, p in zip(names, shards):
        tensors |= ct_tensors(name, p)
    ckpt = QuantCheckpoint(write(tmp_path, tensors, {"quant_method": "compressed-tensors",
                                                     "config_groups": {"g": ct_group("int", "tensor")}}))
    params, fused_cfg = ckpt.load_params(names)
    assert fused_cfg.weight_granularity == "per_channel"
    np.testing.assert_array_equal(np.asarray(params.weight), np.concatenate([np.asarray(p.weight) for p in shards]))
    np.testing.assert_array_equal(np.asarray(params.weight_scale),
                                  np.concatenate([np.full(p.weight.shape[0], float(p.weight_scale), np.float32)
                                                  for p in shards]))
    # same activation quantization, same integer products: fused == concatenated shards
    x = x_input()
    fused = run(ckpt.load_linear(names), x)
    parts = np.concatenate([reference_linear_np(x.numpy(), p, cfg) for p in shards], axis=1)
    assert rel_err(fused, parts) <= kernel_rtol(jnp.float32)


def test_fused_static_input_scales(tmp_path):
    fp8 = qlin.FP8ScaledMMConfig(activation="static", weight_granularity="per_tensor", **F32)
    shards = [qlin.quantize_weight(float_weight(32, seed=i), fp8, input_scale=jnp.float32(s))
              for i, s in enumerate((0.01, 0.03, 0.02))]
    tensors = {}
    for i, p in enumerate(shards):
        tensors |= ct_tensors(f"a.{'qkv'[i]}_proj", p)
    ckpt = QuantCheckpoint(write(tmp_path / "fp8", tensors))  # no config.json: inferred from the tensors
    params, cfg = ckpt.load_params([f"a.{c}_proj" for c in "qkv"])
    assert cfg.is_static and float(params.input_scale) == pytest.approx(0.03)

    i8 = qlin.Int8ScaledMMConfig(activation="static", symmetric=False, weight_granularity="per_tensor", **F32)
    ranges = [(0.02, -10), (0.01, 40), (0.05, 3)]
    shards = [qlin.quantize_weight(float_weight(32, seed=i), i8, input_scale=jnp.float32(s),
                                   input_zero_point=jnp.int32(z)) for i, (s, z) in enumerate(ranges)]
    tensors = {}
    for i, p in enumerate(shards):
        tensors |= ct_tensors(f"a.{'qkv'[i]}_proj", p)
    ckpt = QuantCheckpoint(write(tmp_path / "int8", tensors))
    params, cfg = ckpt.load_params([f"a.{c}_proj" for c in "qkv"])
    s, z = float(params.input_scale), int(params.input_zero_point)
    lo, hi = s * (-128 - z), s * (127 - z)
    for si, zi in ranges:  # the fused range covers every shard's range (to one quantization step)
        assert lo <= si * (-128 - zi) + s and hi >= si * (127 - zi) - s


@pytest.mark.parametrize("fmt", ["deepseek", "compressed-tensors"])
def test_block_fp8_reads_weight_scale_inv_and_weight_scale(tmp_path, fmt):
    cfg = qlin.FP8ScaledMMConfig(weight_granularity=(128, 128), activation="dynamic_per_group", group_size=128,
                                 **F32)
    shards = [qlin.quantize_weight(float_weight(n, seed=i), cfg) for i, n in enumerate((256, 128))]
    names = ["m.gate_proj", "m.up_proj"]
    tensors = {}
    for name, p in zip(names, shards):
        scale_name = "weight_scale_inv" if fmt == "deepseek" else "weight_scale"
        tensors |= ct_tensors(name, p, scale_name=scale_name)
    if fmt == "deepseek":
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    else:
        qc = {"quant_method": "compressed-tensors",
              "config_groups": {"g": ct_group("float", "block", "group", block=(128, 128)) | {}}}
        qc["config_groups"]["g"]["input_activations"]["group_size"] = 128
    ckpt = QuantCheckpoint(write(tmp_path, tensors, qc))
    assert ckpt.config_for("m.up_proj") == cfg
    x = x_input()
    single = run(ckpt.load_linear("m.up_proj"), x)
    assert rel_err(single, reference_linear_np(x.numpy(), shards[1], cfg)) <= kernel_rtol(jnp.float32)
    params, _ = ckpt.load_params(names)
    assert params.weight_scale.shape == (3, 2)
    fused = run(ckpt.load_linear(names), x)
    parts = np.concatenate([reference_linear_np(x.numpy(), p, cfg) for p in shards], axis=1)
    assert rel_err(fused, parts) <= kernel_rtol(jnp.float32)


def test_checkpoint_errors(tmp_path):
    cfg = qlin.FP8ScaledMMConfig()
    p = qlin.quantize_weight(float_weight(32), cfg)
    t = ct_tensors("a", p)
    t["a.weight_scale_inv"] = t["a.weight_scale"].clone()
    ckpt = QuantCheckpoint(write(tmp_path / "both", t))
    with pytest.raises(ParamsError, match="both weight_scale and weight_scale_inv"):
        ckpt.load_params("a")
    t = ct_tensors("a", p) | {"a.weight_zero_point": torch.ones(32, 1, dtype=torch.int8)}
    with pytest.raises(ParamsError, match="weight_zero_point"):
        QuantCheckpoint(write(tmp_path / "wzp", t)).load_params("a")
    t = ct_tensors("a", p) | ct_tensors("b", qlin.quantize_weight(float_weight(32, k=128), cfg))
    with pytest.raises(ParamsError, match="share in_features"):
        QuantCheckpoint(write(tmp_path / "k", t)).load_params(["a", "b"])


class TinyDecoderLayer(nn.Module):
    """vLLM-style fused projections over separately quantized shards; lm_head left in float."""

    def __init__(self, d=K, ffn=384):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(d, 3 * 64, bias=False)
        self.self_attn.o_proj = nn.Linear(3 * 64, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(d, 2 * ffn, bias=False)
        self.mlp.down_proj = nn.Linear(ffn, d, bias=False)
        self.lm_head = nn.Linear(d, 50, bias=False)

    def forward(self, x):
        h = x + self.self_attn.o_proj(self.self_attn.qkv_proj(x))
        g, u = self.mlp.gate_up_proj(h).chunk(2, dim=-1)
        h = h + self.mlp.down_proj(torch.nn.functional.silu(g) * u)
        return self.lm_head(h)


def test_load_quantized_linears_into_a_model_with_fused_layers(tmp_path):
    torch.manual_seed(0)
    model = TinyDecoderLayer()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
    cfg = qlin.FP8ScaledMMConfig(**F32)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    splits = {"self_attn.qkv_proj": (["q_proj", "k_proj", "v_proj"], [64, 64, 64]),
              "mlp.gate_up_proj": (["gate_proj", "up_proj"], [384, 384])}
    tensors = {}
    for fqn, w in sd.items():
        layer = fqn.removesuffix(".weight")  # lm_head is stored quantized too; config.json ignores it
        parent, _, child = layer.rpartition(".")
        parts = [(f"{parent}.{n}", chunk) for n, chunk in zip(splits[layer][0], w.split(splits[layer][1]))] \
            if layer in splits else [(layer, w)]
        for name, chunk in parts:
            tensors |= ct_tensors(f"model.layers.0.{name}", qlin.quantize_weight(jnp.asarray(chunk.numpy()), cfg))
    qc = {"quant_method": "compressed-tensors", "config_groups": {"g": ct_group("float", "channel")},
          "ignore": ["lm_head"]}
    ckpt = QuantCheckpoint(write(tmp_path, tensors, qc), out_dtype="float32")
    assert "model.layers.0.lm_head" in ckpt.layers() and ckpt.config_for("model.layers.0.lm_head") is None
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    swapped = load_quantized_linears(model, ckpt, prefix="model.layers.0.")
    assert sorted(swapped) == ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"]
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        y = model(x)
    assert rel_err(y.numpy(), ref.numpy()) <= 2 * quant_rtol(cfg)
    # a model built empty (on the meta device, as loaders do) gets the same layers, loaded on the cpu
    with torch.device("meta"):
        empty = TinyDecoderLayer()
    assert sorted(load_quantized_linears(empty, ckpt, prefix="model.layers.0.")) == sorted(swapped)
    qkv, qkv_meta = model.self_attn.qkv_proj, empty.self_attn.qkv_proj
    assert qkv_meta.weight.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(qkv_meta(x), qkv(x), rtol=0, atol=0)
