"""Shared plumbing of qlin's W8A8 kernels: config/params types, validation, leading dims."""

from __future__ import annotations

from typing import Any, ClassVar

import jax

from qlin.config import FP8ScaledMMConfig, Int8ScaledMMConfig, ScaledMMConfig
from qlin.kernel import MMLinearKernel, flatten_leading, restore_leading
from qlin.params import FP8Params, Int8Params, Params
from qlin.validate import check_bias, check_input, expected_params_class, normalize_params


class ScaledMMKernel(MMLinearKernel[ScaledMMConfig, Params]):
    """Base of the built-in kernels for :class:`FP8ScaledMMConfig` / :class:`Int8ScaledMMConfig`.

    Subclasses implement :meth:`_matmul` on a 2-D activation; this class does the
    validation, the leading-dimension reshape and the params processing common to all.
    """

    supports_fp8: ClassVar[bool] = True
    supports_int8: ClassVar[bool] = True

    def __init__(self, config: ScaledMMConfig) -> None:
        ok, why = self.can_implement(config)
        if not ok:
            raise ValueError(f"{self.name}: cannot implement {getattr(config, 'describe', lambda: config)()}: {why}")
        super().__init__(config)
        self.params_cls = expected_params_class(config)  # type: ignore[misc]

    @classmethod
    def can_implement(cls, config: Any) -> tuple[bool, str | None]:
        if isinstance(config, FP8ScaledMMConfig):
            return (True, None) if cls.supports_fp8 else (False, "fp8 configs are not implemented")
        if isinstance(config, Int8ScaledMMConfig):
            return (True, None) if cls.supports_int8 else (False, "int8 configs are not implemented")
        return False, f"expects FP8ScaledMMConfig or Int8ScaledMMConfig, got {type(config).__name__}"

    def process_weights_after_loading(self, params: Params | Any) -> Params:
        return normalize_params(self._get_layer_params(params), self.config)

    def apply_weights(self, params: Params | Any, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        params = self._get_layer_params(params)
        x = check_input(x, params)
        bias = check_bias(bias, params.n)
        x2d, lead = flatten_leading(x)
        y = self._matmul(params, x2d, bias)
        return restore_leading(y, lead)

    def _matmul(self, params: Params, x2d: jax.Array, bias: jax.Array | None) -> jax.Array:
        """``(M, K)`` float activation -> ``(M, N)`` in ``config.out_dtype``."""
        raise NotImplementedError


__all__ = ["ScaledMMKernel", "FP8Params", "Int8Params"]
