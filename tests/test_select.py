"""Selection: priority order, reasons, QLIN_DISABLED_KERNELS, overrides, and the seed's custom kernel."""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlin
from qlin import (FP8Params, FP8ScaledMMConfig, Int8ScaledMMConfig, MMLinearKernel, MMLinearLayerConfig,
                  NoKernelError, choose_kernel, register_kernel, registered_kernels, unregister_kernel)
from qlin.select import explain


def test_cpu_order_and_choice():
    assert [k.name for k in registered_kernels("cpu")][:2] == ["xla", "reference"]
    assert choose_kernel(FP8ScaledMMConfig(), platform="cpu").name == "xla"
    assert choose_kernel(Int8ScaledMMConfig(symmetric=False)).name == "xla"


def test_disabled_kernels_env(monkeypatch):
    monkeypatch.setenv("QLIN_DISABLED_KERNELS", "xla")
    assert choose_kernel(FP8ScaledMMConfig(), platform="cpu").name == "reference"
    verdicts = {v.name: v for v in explain(FP8ScaledMMConfig(), platform="cpu")}
    assert not verdicts["xla"].ok and "QLIN_DISABLED_KERNELS" in verdicts["xla"].reason
    monkeypatch.setenv("QLIN_DISABLED_KERNELS", "xla, reference")
    with pytest.raises(NoKernelError) as e:
        choose_kernel(FP8ScaledMMConfig(), platform="cpu")
    assert [name for name, _ in e.value.reasons] == ["xla", "reference"]
    assert "disabled by QLIN_DISABLED_KERNELS" in str(e.value)


def test_unknown_disabled_kernel_name_is_an_error(monkeypatch):
    monkeypatch.setenv("QLIN_DISABLED_KERNELS", "xla,cutlass_fp8")
    with pytest.raises(ValueError, match=r"QLIN_DISABLED_KERNELS: unknown kernel name\(s\) \['cutlass_fp8'\]"):
        choose_kernel(FP8ScaledMMConfig())


def test_override(monkeypatch):
    assert choose_kernel(FP8ScaledMMConfig(), override="reference").name == "reference"
    monkeypatch.setenv("QLIN_KERNEL", "reference")
    assert choose_kernel(FP8ScaledMMConfig()).name == "reference"
    monkeypatch.delenv("QLIN_KERNEL")
    with pytest.raises(KeyError, match="not registered"):
        choose_kernel(FP8ScaledMMConfig(), override="nope")


def test_platform_argument_validated():
    with pytest.raises(ValueError, match="platform: expected one of"):
        choose_kernel(FP8ScaledMMConfig(), platform="metal")


# -- the seed's "Typical Usage" example, in JAX ------------------------------------------

@dataclasses.dataclass(frozen=True)
class MyKernelConfig(MMLinearLayerConfig):
    static: bool
    output_dtype: Any


@dataclasses.dataclass
class MyKernelParams(FP8Params):
    custom_scale: jax.Array
    CUSTOM_SCALE: ClassVar[str] = "custom_scale"


def preprocess_weights(w):
    return w  # e.g. a re-layout; identity keeps the example small


class MyKernel(MMLinearKernel[MyKernelConfig, MyKernelParams]):
    name = "my_kernel"
    params_cls = MyKernelParams

    @classmethod
    def is_supported(cls, compute_capability=None):
        if compute_capability and compute_capability < 90:
            return False, "Requires compute capability >= 9.0"
        return True, None

    @classmethod
    def can_implement(cls, config):
        if not isinstance(config, MyKernelConfig):
            return False, "Only MyKernelConfig"
        if not config.static:
            return False, "Only static quantization supported"
        return True, None

    def process_weights_after_loading(self, layer):
        params = self._get_layer_params(layer)
        return params.replace(weight=preprocess_weights(params.weight))

    def apply_weights(self, layer, x, bias=None):
        params = self._get_layer_params(layer)
        xq = (x / params.input_scale).astype(jnp.float8_e4m3fn)
        acc = jax.lax.dot_general(xq, params.weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        out = acc * params.input_scale * params.weight_scale * params.custom_scale
        if bias is not None:
            out = out + bias
        return out.astype(self.config.output_dtype)


@pytest.fixture
def my_kernel_registered():
    register_kernel(MyKernel, platforms=("cuda", "cpu"), first=True)
    yield MyKernel
    unregister_kernel("my_kernel")


def test_seed_custom_kernel_example(my_kernel_registered):
    cfg = MyKernelConfig(static=True, output_dtype=jnp.float32)
    assert registered_kernels("cpu")[0] is MyKernel
    assert choose_kernel(cfg, platform="cpu") is MyKernel
    assert choose_kernel(cfg, compute_capability=90, platform="cuda") is MyKernel
    # on an A100 the kernel is rejected with its reason, and nothing else can run MyKernelConfig
    with pytest.raises(NoKernelError) as e:
        choose_kernel(cfg, compute_capability=80, platform="cuda")
    reasons = dict(e.value.reasons)
    assert reasons["my_kernel"] == "Requires compute capability >= 9.0"
    assert "expects FP8ScaledMMConfig or Int8ScaledMMConfig" in reasons["xla"]
    # dynamic config: rejected by can_implement
    with pytest.raises(NoKernelError, match="Only static quantization supported"):
        choose_kernel(MyKernelConfig(static=False, output_dtype=jnp.float32), platform="cpu")
    # the lifecycle on a layer-like object
    from types import SimpleNamespace

    w = jax.random.normal(jax.random.key(0), (8, 16))
    layer = SimpleNamespace(weight=w.astype(jnp.float8_e4m3fn), weight_scale=jnp.float32(1.0),
                            input_scale=jnp.float32(0.5), custom_scale=jnp.float32(2.0))
    kernel = choose_kernel(cfg, platform="cpu")(cfg)
    params = kernel.process_weights_after_loading(layer)
    assert isinstance(params, MyKernelParams)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    y = jax.jit(kernel.apply_weights)(params, x)
    expect = (np.asarray((x / 0.5).astype(jnp.float8_e4m3fn), np.float64)
              @ np.asarray(layer.weight, np.float64).T) * 0.5 * 2.0
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5)
    # qlin.linear goes through the same selection and runs it too
    np.testing.assert_allclose(np.asarray(qlin.linear(x, params, cfg)), expect, rtol=1e-5)


def test_register_rejects_non_kernels_and_name_clash(my_kernel_registered):
    with pytest.raises(TypeError, match="MMLinearKernel subclass"):
        register_kernel(object)  # type: ignore[arg-type]

    class Clash(MyKernel):
        name = "my_kernel"

    with pytest.raises(ValueError, match="already registered as 'my_kernel'"):
        register_kernel(Clash)


def test_register_before_named_kernel():
    class Early(MyKernel):
        name = "early"

    register_kernel(Early, platforms=("tpu",), before="xla")
    try:
        names = [k.name for k in registered_kernels("tpu")]
        assert names.index("early") == names.index("xla") - 1
    finally:
        unregister_kernel("early")
