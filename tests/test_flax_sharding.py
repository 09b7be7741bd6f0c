"""Tensor-parallel quantized linears on 8 CPU devices, against the single-device result.

XLA_FLAGS=--xla_force_host_platform_device_count=8 only takes effect before jax
initialises its backend, which another test module in this pytest process may
already have done. So the cases (tests/flax_sharding_cases.py) run in a fresh
Python process with the flag set; this test fails if any of them fails or skips.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("flax_sharding_cases.py")


def test_tensor_parallel_cases_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(CASES)],
        cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= 15, out[-3000:]
    assert not re.search(r"\d+ (skipped|failed|error)", out), out[-3000:]
