"""Kernel registry and selection.

Each platform (``cuda``, ``rocm``, ``tpu``, ``cpu``) has an ordered list of
kernel classes. :func:`choose_kernel` walks the list for the current (or given)
platform and returns the first kernel that ``is_supported`` here and
``can_implement`` the config; otherwise it raises :class:`NoKernelError` with
every kernel's reason.

Environment:
  ``QLIN_DISABLED_KERNELS=name1,name2``: never select these kernels.
  ``QLIN_KERNEL=name``: force this kernel (an error, not a fallback, if it cannot run the config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qlin.errors import NoKernelError
from qlin.kernel import MMLinearKernel
from qlin.platform import PLATFORMS, compute_capability as _current_cc, device_platform

_REGISTRY: dict[str, list[type[MMLinearKernel]]] = {p: [] for p in PLATFORMS}
_VERSION = [0]  # bumped on every registry change; part of api.py's cache key


def registry_version() -> int:
    return _VERSION[0]


def register_kernel(
    cls: type[MMLinearKernel] | None = None,
    *,
    platforms: tuple[str, ...] = PLATFORMS,
    first: bool = False,
    before: str | None = None,
):
    """Register a kernel class for ``platforms``; usable as ``@register_kernel`` or a call.

    By default the kernel goes last (lowest priority); ``first=True`` puts it
    ahead of every kernel, ``before="xla"`` just ahead of the named one.
    Registering a class again moves it.
    """

    def do_register(kernel_cls: type[MMLinearKernel]) -> type[MMLinearKernel]:
        if not (isinstance(kernel_cls, type) and issubclass(kernel_cls, MMLinearKernel)):
            raise TypeError(f"register_kernel: expected an MMLinearKernel subclass, got {kernel_cls!r}")
        unknown = [p for p in platforms if p not in _REGISTRY]
        if unknown:
            raise ValueError(f"platforms: unknown platform(s) {unknown}; expected some of {PLATFORMS}")
        for other in all_kernels():
            if other.name == kernel_cls.name and other is not kernel_cls:
                raise ValueError(f"register_kernel: a different kernel is already registered as {kernel_cls.name!r}")
        for p in platforms:
            lst = _REGISTRY[p]
            if kernel_cls in lst:
                lst.remove(kernel_cls)
            if first:
                lst.insert(0, kernel_cls)
            elif before is not None:
                names = [k.name for k in lst]
                lst.insert(names.index(before) if before in names else len(lst), kernel_cls)
            else:
                lst.append(kernel_cls)
        _VERSION[0] += 1
        return kernel_cls

    return do_register(cls) if cls is not None else do_register


def unregister_kernel(name: str) -> None:
    """Remove the kernel called ``name`` from every platform."""
    found = False
    for lst in _REGISTRY.values():
        for k in list(lst):
            if k.name == name:
                lst.remove(k)
                found = True
    if not found:
        raise KeyError(f"unregister_kernel: no kernel named {name!r}; registered: {sorted(kernel_names())}")
    _VERSION[0] += 1


def registered_kernels(platform: str) -> list[type[MMLinearKernel]]:
    """The kernels of ``platform`` in priority order."""
    if platform not in _REGISTRY:
        raise ValueError(f"platform: expected one of {PLATFORMS}, got {platform!r}")
    return list(_REGISTRY[platform])


def all_kernels() -> list[type[MMLinearKernel]]:
    seen: list[type[MMLinearKernel]] = []
    for lst in _REGISTRY.values():
        for k in lst:
            if k not in seen:
                seen.append(k)
    return seen


def kernel_names() -> set[str]:
    return {k.name for k in all_kernels()}


def get_kernel_class(name: str) -> type[MMLinearKernel]:
    for k in all_kernels():
        if k.name == name:
            return k
    raise KeyError(f"kernel {name!r} is not registered; registered: {sorted(kernel_names())}")


def disabled_kernels(value: str | None = None) -> frozenset[str]:
    """Names in ``QLIN_DISABLED_KERNELS`` (or ``value``); unknown names are an error."""
    raw = os.environ.get("QLIN_DISABLED_KERNELS", "") if value is None else value
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = names - kernel_names()
    if unknown:
        raise ValueError(
            f"QLIN_DISABLED_KERNELS: unknown kernel name(s) {sorted(unknown)}; registered: {sorted(kernel_names())}"
        )
    return names


@dataclass(frozen=True)
class Verdict:
    """One kernel's answer for one config: usable here or not, and why."""

    name: str
    ok: bool
    reason: str | None


def _verdict(cls: type[MMLinearKernel], config, cc: int | None, disabled: frozenset[str]) -> Verdict:
    if cls.name in disabled:
        return Verdict(cls.name, False, "disabled by QLIN_DISABLED_KERNELS")
    ok, why = cls.is_supported(cc)
    if not ok:
        return Verdict(cls.name, False, why or "not supported on this hardware")
    ok, why = cls.can_implement(config)
    if not ok:
        return Verdict(cls.name, False, why or "cannot implement this config")
    return Verdict(cls.name, True, None)


def _resolve(platform: str | None, compute_capability: int | None) -> tuple[str, int | None]:
    if platform is None:
        platform = device_platform()
        if compute_capability is None:
            compute_capability = _current_cc()
    if platform not in _REGISTRY:
        raise ValueError(f"platform: expected one of {PLATFORMS}, got {platform!r}")
    return platform, compute_capability


def explain(config, compute_capability: int | None = None, platform: str | None = None) -> list[Verdict]:
    """Every kernel of the platform with its verdict for ``config`` (what ``qlin info`` prints)."""
    platform, cc = _resolve(platform, compute_capability)
    disabled = disabled_kernels()
    return [_verdict(k, config, cc, disabled) for k in _REGISTRY[platform]]


def choose_kernel(
    config,
    compute_capability: int | None = None,
    platform: str | None = None,
    *,
    override: str | type[MMLinearKernel] | None = None,
) -> type[MMLinearKernel]:
    """The first kernel class of the platform that is supported and can implement ``config``.

    ``override`` (or ``QLIN_KERNEL``) names one kernel to use; it must be able to
    run the config, else :class:`NoKernelError` says why.
    """
    platform, cc = _resolve(platform, compute_capability)
    disabled = disabled_kernels()
    if override is None and os.environ.get("QLIN_KERNEL"):
        override = os.environ["QLIN_KERNEL"].strip()
    if override is not None:
        cls = get_kernel_class(override) if isinstance(override, str) else override
        v = _verdict(cls, config, cc, disabled)
        if not v.ok:
            raise NoKernelError(f"Kernel override {cls.name!r} cannot run {_cfg(config)} on {platform}:", [(v.name, v.reason)])
        return cls
    verdicts = []
    for cls in _REGISTRY[platform]:
        v = _verdict(cls, config, cc, disabled)
        if v.ok:
            return cls
        verdicts.append((v.name, v.reason or ""))
    cc_text = f" (compute capability {cc})" if cc is not None else ""
    raise NoKernelError(f"No kernel for {_cfg(config)} on {platform}{cc_text}. Rejections:", verdicts)


def _cfg(config) -> str:
    describe = getattr(config, "describe", None)
    return describe() if callable(describe) else repr(config)
