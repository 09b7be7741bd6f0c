"""Where are we running: platform name and CUDA compute capability."""

from __future__ import annotations

import jax

PLATFORMS = ("cuda", "rocm", "tpu", "cpu")


def device_platform(device: jax.Device | None = None) -> str:
    """``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"`` for ``device`` (default: the first default-backend device)."""
    device = device or jax.devices()[0]
    p = device.platform
    if p == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return p if p in PLATFORMS else p


def compute_capability(device: jax.Device | None = None) -> int | None:
    """CUDA compute capability as an int (90 for H100), or None off CUDA."""
    device = device or jax.devices()[0]
    if device_platform(device) != "cuda":
        return None
    cc = getattr(device, "compute_capability", None)
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major) * 10 + int(minor or 0)


def describe_device(device: jax.Device | None = None) -> str:
    device = device or jax.devices()[0]
    return f"{device.device_kind} ({device_platform(device)})"
