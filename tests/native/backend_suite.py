"""Helpers shared by the accelerator backends' suites (`test_backend_suite.py`, and each
backend's own ``test_<backend>.py``): every backend's devices, found once per process and
warmed up once, pytest params over them, and one op case run on one device.

A backend that cannot run here (`available()` gives the reason) contributes one skipped
param per test, saying why, instead of a skip per case.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import op_cases
import pytest

from kernelmesh.native import cuda, metal, opencl
from kernelmesh.native.backend import Device
from kernelmesh.native.compile_cache import default_cache

BACKENDS: dict[str, ModuleType] = {"opencl": opencl, "cuda": cuda, "metal": metal}


@functools.cache
def unavailable(name: str) -> str | None:
    """Why backend `name` cannot run here, or None."""
    return BACKENDS[name].available()


@functools.cache
def devices(name: str) -> list[Device]:
    """Backend `name`'s devices (the same objects for every suite of this process)."""
    return [] if unavailable(name) is not None else BACKENDS[name].devices()


@functools.cache
def warmed(device: Device) -> Device:
    """`device`, after compiling (or loading from the compile cache) every kernel `run`
    uses; once per device and process."""
    device.warmup()
    return device


def _skipped(name: str, *values: object) -> object:
    reason = f"{name} unavailable: {unavailable(name)}"
    return pytest.param(*values, id=f"{name}-unavailable", marks=pytest.mark.skip(reason=reason))


def backend_params() -> list:
    """One param per backend name, skipped where the backend cannot run."""
    return [pytest.param(n, id=n) if unavailable(n) is None else _skipped(n, n) for n in BACKENDS]


def device_params() -> list:
    """One param per device of every backend."""
    params = []
    for name in BACKENDS:
        if unavailable(name) is not None:
            params.append(_skipped(name, None))
        params.extend(pytest.param(device, id=device.name) for device in devices(name))
    return params


def device_case_params(cases: list[op_cases.OpCase]) -> list:
    """(device, case) for every case on every device of every backend."""
    params = []
    for name in BACKENDS:
        if unavailable(name) is not None:
            params.append(_skipped(name, None, None))
        for device in devices(name):
            params.extend(
                pytest.param(device, case, id=f"{device.name}-{case.id}") for case in cases
            )
    return params


def skip_reason(device: Device, case: op_cases.OpCase) -> str | None:
    """Why `device` does not run `case`, or None."""
    if case.dtype == "float64" and not device.properties.supports_fp64:
        return f"{device.name} has no float64"
    if not device.supports(case.op, case.dtype):
        return f"{device.name} does not offer {case.op} on {case.dtype}"
    return device.refusal(case.op, [x.shape for x in case.inputs], case.params)


def check_case(device: Device, case: op_cases.OpCase) -> None:
    """Runs `case` on `device` (or skips it, saying why): outputs match the NumPy
    reference, inputs are never written, and no output shares an input's memory."""
    reason = skip_reason(device, case)
    if reason:
        pytest.skip(reason)
    before = [x.copy() for x in case.inputs]
    outputs = device.run(case.op, case.inputs, case.params)
    op_cases.assert_matches(case, outputs)
    for x, copy in zip(case.inputs, before, strict=True):
        np.testing.assert_array_equal(x, copy)  # inputs are never written
        assert not any(np.shares_memory(out, x) for out in outputs)


_CHILD = """
import json
from kernelmesh.native import {name}
from kernelmesh.native.compile_cache import default_cache
for device in {name}.devices():
    device.warmup()
    device.close()
cache = default_cache()
print(json.dumps({{"hits": cache.hits, "misses": cache.misses}}))
"""


def second_process_cache_counts(name: str, tmp_path: Path) -> dict[str, int]:
    """The compile cache's hits and misses in a new process that warms up every device of
    backend `name` from a copy of this process's cache."""
    shutil.copytree(default_cache().directory, tmp_path / "kernels")
    env = {**os.environ, "KERNELMESH_CACHE_DIR": str(tmp_path / "kernels")}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD.format(name=name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
