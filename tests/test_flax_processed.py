"""Flax layers hold params processed for their kernel, made once (conversion / construction / load),
never re-processed per call; checkpoints store the logical, unpadded params and round-trip bit for bit.

The padding kernel is ``PadNKernel`` (tests/test_api_processed.py: xla plus N padded to a multiple
of 16, counting its ``process_weights_after_loading`` calls); one test runs the real ``mosaic_gpu``
kernel in interpret mode, and one the tensor-parallel linears on 4 CPU devices in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_api_processed import PadNKernel, concrete_calls, pad_kernel, weight_copies  # noqa: F401 (fixture)

import qlin
from qlin.flax import QDense, QLinear, _common, process_nnx, quantize_linen, quantize_nnx
from qlin.tolerances import kernel_rtol, rel_err

F32 = jnp.float32
FP8 = jnp.dtype(jnp.float8_e4m3fn)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, F32)


class Net(nnx.Module):
    def __init__(self, rngs, k=24, n=13):
        init = nnx.initializers.normal(0.5)
        self.a = nnx.Linear(k, n, bias_init=init, rngs=rngs)
        self.b = nnx.Linear(n, n, use_bias=False, rngs=rngs)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(n, n, bias_init=init, rngs=rngs)
        self.stack = make(rngs)

    def __call__(self, x):
        x = self.b(self.a(x)).astype(F32)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x).astype(F32)
        return body(x, self.stack)


def _converted(cfg, kernel=None, seed=0):
    net = Net(nnx.Rngs(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_nnx(net, [qlin.flax.QuantRule(".*", cfg, kernel=kernel)])
    return net


def _same_file(p1, p2) -> bool:
    """Same metadata and the same arrays bit for bit (safetensors' header key order is not fixed)."""
    from qlin.flax.checkpoint import load_arrays

    (a1, m1), (a2, m2) = load_arrays(p1), load_arrays(p2)
    return m1 == m2 and a1.keys() == a2.keys() and all(
        a1[k].dtype == a2[k].dtype and a1[k].shape == a2[k].shape and a1[k].tobytes() == a2[k].tobytes() for k in a1)


def _bytes(model):
    return {"/".join(map(str, p)): (np.asarray(v.get_value()).dtype, np.asarray(v.get_value()).tobytes())
            for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("cfg", [qlin.FP8ScaledMMConfig(out_dtype=F32),
                                 qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)], ids=lambda c: c.describe())
def test_nnx_processed_once_and_applied_as_is(pad_kernel, cfg):
    net = _converted(cfg)
    ref = _converted(cfg, kernel="xla")  # the same weights on the xla kernel, unpadded
    for layer in (net.a, net.b, net.stack):
        assert layer.processed_for == "test_pad_n"
        assert layer.weight[...].shape[-2:] == (16, layer.in_features) and layer.out_features == 13
    assert ref.a.weight[...].shape == (13, 24) and ref.a.processed_for == "xla"
    # one processing per layer (the stack: one per stacked layer), on concrete arrays, at conversion
    assert sorted(concrete_calls(pad_kernel)) == sorted([(13, 24), (13, 13), (13, 13), (13, 13)])
    before = list(pad_kernel.calls)
    x = _x((5, 24))
    y_eager = net(x)
    y_jit = nnx.jit(lambda m, x: m(x))(net, x)
    assert pad_kernel.calls == before  # calls apply the stored params: no process_weights_after_loading
    np.testing.assert_array_equal(y_jit, y_eager)
    assert y_eager.shape == (5, 13) and rel_err(y_eager, ref(x)) <= kernel_rtol(F32)
    # and the traced forward holds no pad / slice / concatenate of an 8-bit weight
    graphdef, state = nnx.split(net)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert weight_copies(jaxpr, jnp.dtype(cfg.weight_dtype)) == []
    # the canonical params are the unpadded ones, bit for bit those of the xla layer
    for a, b in ((net.a, ref.a), (net.stack, ref.stack)):
        la, lb = a.logical_arrays(), b.arrays()
        assert la.keys() == lb.keys()
        for name in la:
            assert np.asarray(la[name]).tobytes() == np.asarray(lb[name]).tobytes(), name
    assert net.a.qparams().weight.shape == (13, 24) and net.a.kernel_params().out_features == 13


def test_nnx_kernel_change_and_hand_set_variables(pad_kernel):
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    lin = nnx.Linear(24, 13, rngs=nnx.Rngs(0))
    q = QLinear.from_linear(lin, cfg)
    x = _x((3, 24))
    y = q(x)
    padded = q.arrays()
    # switching the kernel re-processes in place: unpadded, bit for bit
    q.process("xla")
    assert q.processed_for == "xla" and q.weight[...].shape == (13, 24)
    np.testing.assert_array_equal(np.asarray(q.weight[...], np.float32), np.asarray(padded["weight"][:13], np.float32))
    assert rel_err(q(x), y) <= kernel_rtol(F32)
    q.kernel_name = None  # back to the default selection (the padding kernel)
    q.process()
    assert q.processed_for == "test_pad_n"
    for name, a in q.arrays().items():
        assert np.asarray(a).tobytes() == np.asarray(padded[name]).tobytes(), name
    # the selection changed under the layer (here: the padding kernel unregistered): still right, with a warning
    qlin.unregister_kernel(PadNKernel.name)
    _common._WARNED.clear()
    try:
        with pytest.warns(RuntimeWarning, match="processed for kernel 'test_pad_n' but 'xla' runs"):
            y2 = q(x)
        assert rel_err(y2, y) <= kernel_rtol(F32)
        assert process_nnx(q) == 1 and q.processed_for == "xla" and q.weight[...].shape == (13, 24)
    finally:
        qlin.register_kernel(PadNKernel, platforms=("cpu",), first=True)
    # variables set by hand (logical shapes): the call processes them itself until .process()
    q.process()
    q.weight.set_value(padded["weight"][:13])
    q.weight_scale.set_value(padded["weight_scale"][:13])
    assert rel_err(q(x), y) <= kernel_rtol(F32)
    q.process()
    assert q.weight[...].shape == (16, 24)
    np.testing.assert_array_equal(q(x), y)


def test_nnx_checkpoint_stores_logical_and_round_trips(pad_kernel, tmp_path):
    from qlin.flax.checkpoint import load_arrays, load_nnx, save_nnx

    cfg = qlin.Int8ScaledMMConfig(symmetric=False, out_dtype=F32)
    net = _converted(cfg)
    ref = _converted(cfg, kernel="xla")
    path = tmp_path / "q.safetensors"
    save_nnx(path, net)
    arrays, _ = load_arrays(path)
    assert arrays["a/weight"].shape == (13, 24) and arrays["stack/weight"].shape == (2, 13, 13)
    assert arrays["a/azp_adj"].shape == (13,) and arrays["a/weight_scale"].shape == (13,)
    # the file is exactly what the unpadded (xla) model saves, apart from the recorded kernel override
    save_nnx(tmp_path / "ref.safetensors", ref)
    ref_arrays, _ = load_arrays(tmp_path / "ref.safetensors")
    assert arrays.keys() == ref_arrays.keys()
    assert all(arrays[k].dtype == ref_arrays[k].dtype and arrays[k].tobytes() == ref_arrays[k].tobytes() for k in arrays)
    calls = len(concrete_calls(pad_kernel))
    loaded = load_nnx(path, nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    assert len(concrete_calls(pad_kernel)) == calls + 4  # processed once per layer at load time
    assert loaded.a.processed_for == "test_pad_n" and loaded.a.weight[...].shape == (16, 24)
    assert _bytes(loaded) == _bytes(net)
    x = _x((4, 24))
    np.testing.assert_array_equal(loaded(x), net(x))
    save_nnx(tmp_path / "again.safetensors", loaded)
    assert _same_file(tmp_path / "again.safetensors", path)
    # the same file on a machine whose kernel does not pad: logical arrays, same results
    qlin.unregister_kernel(PadNKernel.name)
    try:
        plain = load_nnx(path, nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
        assert plain.a.processed_for == "xla" and plain.a.weight[...].shape == (13, 24)
        assert rel_err(plain(x), net(x)) <= kernel_rtol(F32)
    finally:
        qlin.register_kernel(PadNKernel, platforms=("cpu",), first=True)


class LinenModel(nn.Module):
    dense: type = nn.Dense
    cfg: object = None

    @nn.compact
    def __call__(self, x):
        kw = {} if self.cfg is None else {"config": self.cfg}
        h = self.dense(13, name="up", **kw)(x)
        return self.dense(13, name="down", **kw)(h.astype(F32))


def test_linen_processed_at_conversion_and_load(pad_kernel, tmp_path):
    from qlin.flax.checkpoint import load_arrays, load_linen, save_linen

    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    m = LinenModel()
    x = _x((3, 24))
    v = m.init(jax.random.key(0), x)
    qm, qv = quantize_linen(m, v, [(".*", cfg)])
    _, ref_v = quantize_linen(m, v, [qlin.flax.QuantRule(".*", cfg, kernel="xla")])
    assert qv["params"]["up"]["weight"].shape == (16, 24) and qv["params"]["down"]["weight"].shape == (16, 13)
    assert qm.dims == (("up", 13, 24), ("down", 13, 13))
    y = jax.jit(qm.apply)(qv, x)
    y_qdense = jax.jit(LinenModel(dense=QDense, cfg=cfg).apply)(qv, x)
    np.testing.assert_array_equal(y, y_qdense)
    y_ref = LinenModel(dense=QDense, cfg=cfg).apply(ref_v, x)  # logical tree: processed inside the call
    assert rel_err(y, y_ref) <= kernel_rtol(F32)
    for fn in (qm.apply, LinenModel(dense=QDense, cfg=cfg).apply):
        assert weight_copies(jax.make_jaxpr(fn)(qv, x), FP8) == []
    # an unprocessed (logical) tree is padded inside every call; .process() is the one-time fix
    logical = qm.logical(qv)
    assert logical["params"]["up"]["weight"].shape == (13, 24)
    assert weight_copies(jax.make_jaxpr(qm.apply)(logical, x), FP8) != []
    again = qm.process(logical)
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(qv)))
    assert jax.tree.leaves(qm.process(qv))[0] is not None  # idempotent on processed trees
    np.testing.assert_array_equal(qm.apply(again, x), y)
    # checkpoints: logical arrays; loading processes; save -> load -> save is bit-exact
    save_linen(tmp_path / "m.safetensors", qv, qm)
    arrays, _ = load_arrays(tmp_path / "m.safetensors")
    assert arrays["params/up/weight"].shape == (13, 24)
    qm2, qv2 = load_linen(tmp_path / "m.safetensors", m)
    assert qm2.layers == qm.layers and qm2.dims == qm.dims
    assert qv2["params"]["up"]["weight"].shape == (16, 24)
    np.testing.assert_array_equal(qm2.apply(qv2, x), y)
    save_linen(tmp_path / "again.safetensors", qv2, qm2)
    assert _same_file(tmp_path / "again.safetensors", tmp_path / "m.safetensors")


def test_mosaic_gpu_interpret_layer_pads_once(monkeypatch):
    """The real padding kernel: mosaic_gpu in interpret mode, registered for the CPU for this test."""
    from qlin.kernels import mosaic_gpu_scaled_mm as mm
    from qlin.kernels.mosaic_gpu import MosaicGPUScaledMMKernel

    class MosaicInterpret(MosaicGPUScaledMMKernel):
        name = "test_mosaic_interpret"

        def __init__(self, config):
            super().__init__(config, interpret=True, tuning=mm.TuningConfig(
                tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2, num_compute_wgs=1,
                epi_tile_m=64, epi_tile_n=16))

        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    lin = nnx.Linear(40, 50, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(0.5))
    qlin.register_kernel(MosaicInterpret, platforms=("cpu",), first=True)
    try:
        q = QLinear.from_linear(lin, cfg)
        calls = []
        monkeypatch.setattr(MosaicInterpret, "process_weights_after_loading",
                            lambda self, p: calls.append(1) or MosaicGPUScaledMMKernel.process_weights_after_loading(self, p))
        assert q.processed_for == "test_mosaic_interpret" and q.weight[...].shape == (56, 64)  # N to 8, K to 32
        x = _x((2, 3, 40))
        graphdef, state = nnx.split(q)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
        # (the kernel pads the quantized activation to K=64 itself; that is not the weight)
        assert weight_copies(jaxpr, FP8, [(50, 40), (56, 64), (50, 64), (56, 40)]) == []
        y = q(x)
        assert calls == []
    finally:
        qlin.unregister_kernel(MosaicInterpret.name)
    ref = QLinear.from_linear(lin, cfg, kernel="xla")
    assert y.shape == (2, 3, 50) and rel_err(y, ref(x)) <= kernel_rtol(F32)


TP_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, "tests")
    import qlin
    from qlin.flax.sharding import TPMLP, shard_column_parallel, column_parallel_linear
    from test_api_processed import PadNKernel, concrete_calls, weight_copies
    from qlin.tolerances import kernel_rtol, rel_err

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    F32 = jnp.float32
    cfg = qlin.FP8ScaledMMConfig(out_dtype=F32)
    H, I = 13, 52                                   # N per column shard 13 and row N 13: padded to 16
    w = lambda shape, s: jax.random.normal(jax.random.key(s), shape, F32)
    wg, wu, wd = w((I, H), 0), w((I, H), 1), w((H, I), 2)
    x = w((6, H), 3)
    qg, qu, qd = (qlin.quantize_weight(a, cfg) for a in (wg, wu, wd))
    ref = qlin.linear(jax.nn.silu(qlin.linear(x, qg, cfg)) * qlin.linear(x, qu, cfg), qd, cfg, kernel="xla")
    qlin.register_kernel(PadNKernel, platforms=("cpu",), first=True)
    out = {}
    mlp = TPMLP.from_params(qg, qu, qd, cfg, mesh)
    out["shapes"] = [list(mlp.gate.weight.shape), list(mlp.down.params.weight.shape)]
    out["concrete_calls"] = len(concrete_calls(PadNKernel))
    out["static_n"] = [mlp.gate.out_features, mlp.down.params.out_features]
    y = jax.jit(lambda m, x: m(x))(mlp, x)
    out["copies"] = weight_copies(jax.make_jaxpr(lambda m, x: m(x))(mlp, x), jnp.dtype(jnp.float8_e4m3fn))
    out["rel_err"] = float(rel_err(y, ref))
    out["tol"] = float(kernel_rtol(F32))
    placed, _ = shard_column_parallel(qg, cfg, mesh)
    yc = jax.jit(lambda x, p: column_parallel_linear(x, p, cfg, mesh))(x, placed)
    out["col_rel_err"] = float(rel_err(yc, qlin.linear(x, qg, cfg, kernel="xla")))
    print("RESULT" + json.dumps(out))
''')


def test_tensor_parallel_processed_once_per_shard():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", TP_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    # gate: 4 shards of 13 rows, each padded to 16; down: N=13 padded to 16, K per shard 13 + 2 statistic columns
    assert out["shapes"] == [[64, 13], [16, 60]], out
    assert out["static_n"] == [13, 13] and out["concrete_calls"] == 0, out  # processed in a jitted shard_map
    assert out["copies"] == [], out
    assert out["rel_err"] <= out["tol"] and out["col_rel_err"] <= out["tol"], out
