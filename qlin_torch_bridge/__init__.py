"""qlin_torch_bridge: torch modules onto qlin's kernels through DLPack (``pip install qlin[torch]``).

* :mod:`~qlin_torch_bridge.dlpack` -- zero-copy ``to_jax`` / ``to_torch`` (fp8 included, stream-ordered).
* :mod:`~qlin_torch_bridge.params` -- ``params_from_module``: an ``nn.Module``'s attributes as qlin Params.
* :mod:`~qlin_torch_bridge.lifecycle` -- vLLM-style ``process_weights_after_loading(layer)`` /
  ``apply_weights(layer, x, bias)`` on torch layers.
* :mod:`~qlin_torch_bridge.linear` -- ``QuantLinear`` and ``quantize_(model, config, filter=...)``.
* :mod:`~qlin_torch_bridge.checkpoint` -- compressed-tensors / DeepSeek-fp8 safetensors checkpoints,
  fused qkv / gate_up shards included.
* :mod:`~qlin_torch_bridge.bench` -- ``bridge_rows``: GEMM-benchmark rows, ``QuantLinear`` vs the same
  kernel called from JAX.

See docs/torch.md.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("qlin_torch_bridge needs PyTorch: pip install 'qlin[torch]'") from e

from qlin_torch_bridge.dlpack import LayoutError, to_jax, to_torch
from qlin_torch_bridge.lifecycle import apply_weights, process_weights_after_loading, replace_parameter
from qlin_torch_bridge.linear import QuantLinear, quantize_
from qlin_torch_bridge.params import MissingAttributeError, params_from_module

__all__ = [
    "to_jax", "to_torch", "LayoutError", "params_from_module", "MissingAttributeError",
    "process_weights_after_loading", "apply_weights", "replace_parameter", "QuantLinear", "quantize_",
]
