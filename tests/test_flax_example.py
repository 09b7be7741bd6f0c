"""examples/flax_transformer.py runs end to end (tiny sizes) and reports sane numbers."""

import json

import jax.numpy as jnp

import qlin
from qlin.testing import load_script
from qlin.tolerances import quant_rtol

def test_flax_transformer_example_small(tmp_path, monkeypatch):
    ex = load_script("examples/flax_transformer.py", "flax_transformer_example")
    monkeypatch.setenv("OUT", str(tmp_path))
    layers = 1
    result = ex.main(["--small", "--layers", str(layers), "--iters", "1"])
    rows = {r["model"]: r for r in result["results"]}
    assert set(rows) == {"bf16", "fp8", "int8", "fp8-static"}
    cfgs = {"fp8": qlin.FP8ScaledMMConfig(), "int8": qlin.Int8ScaledMMConfig(),
            "fp8-static": qlin.FP8ScaledMMConfig(activation="static")}
    for name, cfg in cfgs.items():
        r = rows[name]
        assert r["config"] == cfg.describe() and r["ms"] > 0
        # each block adds at most about one layer's quantization error to the logits
        assert 0 < r["rel_err"] <= layers * quant_rtol(cfg), r
        assert 1 - r["cosine"] <= (layers * quant_rtol(cfg)) ** 2
    assert json.loads((tmp_path / "flax_transformer.json").read_text())["results"] == result["results"]
    assert jnp.isfinite(rows["bf16"]["rel_err_vs_f32"])
