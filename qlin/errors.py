"""qlin's exceptions. Each message names the offending argument and what was expected."""

from __future__ import annotations


class QlinError(Exception):
    """Base class of qlin's own errors."""


class ConfigError(QlinError, ValueError):
    """A layer config is inconsistent (raised on construction)."""


class ParamsError(QlinError, ValueError):
    """Params do not match their config: shape, dtype, granularity or scale values."""


class InputError(QlinError, ValueError):
    """An activation, bias or other call argument is malformed."""


class NoKernelError(QlinError, RuntimeError):
    """No registered kernel is supported here and can implement the config.

    ``reasons`` lists ``(kernel name, why it was rejected)`` for every kernel considered.
    """

    def __init__(self, message: str, reasons: list[tuple[str, str]]):
        self.reasons = list(reasons)
        lines = [message] + [f"  - {name}: {why}" for name, why in self.reasons]
        super().__init__("\n".join(lines))
