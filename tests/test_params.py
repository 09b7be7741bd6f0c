import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlin import FP8Params, Int8Params, Params


def _fp8(n=4, k=8):
    return FP8Params(
        weight=jnp.ones((n, k), jnp.float8_e4m3fn),
        weight_scale=jnp.full((n,), 0.5, jnp.float32),
        input_scale=jnp.float32(2.0),
        input_scale_ub=None,
    )


def test_pytree_roundtrip_and_none_leaves():
    p = _fp8()
    leaves, tree = jax.tree.flatten(p)
    assert len(leaves) == 3  # None fields are not leaves
    q = jax.tree.unflatten(tree, leaves)
    assert isinstance(q, FP8Params)
    assert q.input_scale_ub is None
    np.testing.assert_array_equal(np.asarray(q.weight_scale), np.asarray(p.weight_scale))


def test_tree_map_and_jit():
    p = _fp8()
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float32 else a, p)
    assert float(doubled.input_scale) == 4.0

    @jax.jit
    def f(params):
        return params.weight.astype(jnp.float32).sum() * params.input_scale

    assert float(f(p)) == 4 * 8 * 2.0


def test_key_paths_name_fields():
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(_fp8())[0]]
    assert paths == [".weight", ".weight_scale", ".input_scale"]


def test_static_fields_are_metadata():
    p = _fp8().replace(out_features=3, in_features=7)
    leaves, tree = jax.tree.flatten(p)
    assert len(leaves) == 3
    q = jax.tree.unflatten(tree, leaves)
    assert (q.out_features, q.in_features, q.n, q.k) == (3, 7, 3, 7)
    # different static values -> different treedefs (jit retraces rather than mixing them)
    assert jax.tree.structure(p) != jax.tree.structure(_fp8())


def test_from_layer_reads_attribute_names():
    layer = SimpleNamespace(weight=jnp.zeros((2, 16), jnp.int8), weight_scale=jnp.ones(2), azp_adj=jnp.zeros(2, jnp.int32))
    p = Int8Params.from_layer(layer)
    assert p.input_scale is None and p.input_zero_point is None
    assert p.azp_adj.shape == (2,)
    assert Int8Params.attribute_names() == {
        "weight": "weight", "weight_scale": "weight_scale", "input_scale": "input_scale",
        "input_zero_point": "input_zero_point", "azp_adj": "azp_adj",
    }


def test_from_layer_missing_required_attribute_names_it():
    with pytest.raises(AttributeError, match=r"no attribute 'weight_scale'.*FP8Params"):
        FP8Params.from_layer(SimpleNamespace(weight=jnp.zeros((2, 2))))


def test_from_mapping_and_to_mapping_roundtrip():
    p = _fp8()
    m = p.to_mapping()
    assert set(m) == {"weight", "weight_scale", "input_scale"}
    q = FP8Params.from_mapping(m)
    assert q.input_scale_ub is None
    with pytest.raises(KeyError, match="'weight'"):
        FP8Params.from_mapping({"weight_scale": 1.0})


def test_renamed_attributes_via_class_vars():
    class RenamedParams(FP8Params):
        WEIGHT_SCALE: ClassVar[str] = "weight_scale_inv"

    layer = SimpleNamespace(weight=jnp.zeros((2, 16), jnp.float8_e4m3fn), weight_scale_inv=jnp.ones((1, 1)))
    p = RenamedParams.from_layer(layer)
    assert p.weight_scale.shape == (1, 1)
    assert jax.tree.unflatten(*reversed(jax.tree.flatten(p))).__class__ is RenamedParams


def test_subclass_adds_fields_seed_example():
    # The seed's MyKernelParams(FP8Params) with CUSTOM_SCALE.
    @dataclasses.dataclass
    class MyKernelParams(FP8Params):
        custom_scale: jax.Array
        CUSTOM_SCALE: ClassVar[str] = "custom_scale"

    layer = SimpleNamespace(weight=jnp.zeros((2, 16), jnp.float8_e4m3fn), weight_scale=jnp.ones(()),
                            custom_scale=jnp.full((2,), 3.0))
    p = MyKernelParams.from_layer(layer)
    assert float(p.custom_scale[0]) == 3.0
    leaves, tree = jax.tree.flatten(p)
    assert len(leaves) == 3
    q = jax.jit(lambda t: t)(p)
    assert isinstance(q, MyKernelParams) and float(q.custom_scale[1]) == 3.0
    with pytest.raises(AttributeError, match="custom_scale"):
        MyKernelParams.from_layer(SimpleNamespace(weight=layer.weight, weight_scale=layer.weight_scale))


def test_params_shard_like_arrays():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p = jax.device_put(_fp8(), spec)
    assert p.weight.sharding == spec
    assert isinstance(p, FP8Params) and isinstance(Params, type)
