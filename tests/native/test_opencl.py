"""The OpenCL backend on every OpenCL device present (PoCL's CPU device in CI), against
the NumPy references of `op_cases`, plus its device-level behaviour: refusals, transfers,
errors, the compile cache across processes, and concurrent callers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from kernelmesh.native import backend, opencl
from kernelmesh.native.compile_cache import default_cache

_REASON = opencl.available()
if _REASON is not None:
    pytest.skip(f"OpenCL unavailable: {_REASON}", allow_module_level=True)

import op_cases  # noqa: E402  (after the skip: imports numba-heavy modules for nothing otherwise)

DEVICES = opencl.devices()
CASES = op_cases.cases()


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> opencl.OpenCLDevice:
    dev = request.param
    dev.warmup()  # compiles, or loads from the compile cache, every program run uses
    return dev


def skip_reason(device: opencl.OpenCLDevice, case: op_cases.OpCase) -> str | None:
    if not device.supports(case.op, case.dtype):
        return f"{device.name} does not offer {case.op} on {case.dtype} (no fp64)"
    refusal = device.refusal(case.op, [x.shape for x in case.inputs], case.params)
    if refusal:
        return refusal
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_numpy(device, case):
    reason = skip_reason(device, case)
    if reason:
        pytest.skip(reason)
    before = [x.copy() for x in case.inputs]
    outputs = device.run(case.op, case.inputs, case.params)
    op_cases.assert_matches(case, outputs)
    for x, copy in zip(case.inputs, before, strict=True):
        np.testing.assert_array_equal(x, copy)  # inputs are never written
        assert not any(np.shares_memory(out, x) for out in outputs)


# --------------------------------------------------------------------------
# What the device reports
# --------------------------------------------------------------------------


def test_devices_are_named_in_order():
    assert [d.name for d in DEVICES] == [f"opencl:{i}" for i in range(len(DEVICES))]


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "opencl" and props.model and props.driver_version
    assert props.compute_units >= 1 and props.max_work_group_size >= 1
    assert props.memory_total_bytes > 0
    assert props.driver_version in props.fingerprint and props.model in props.fingerprint


def test_supported_dtypes_follow_fp64(device):
    from kernelmesh.native import cpu

    assert set(device.supported) == set(cpu.SUPPORTED_DTYPES)
    for op, dtypes in device.supported.items():
        if device.properties.supports_fp64:
            assert dtypes == cpu.SUPPORTED_DTYPES[op]
        else:
            assert "float64" not in dtypes


def test_fft_of_a_length_not_a_power_of_two_is_refused(device):
    reason = device.refusal("fft", [(4, 12)], {"inverse": False})
    assert reason == f"fft on {device.name} needs a power-of-two length, got 12"
    assert device.refusal("fft", [(4, 16)], {"inverse": False}) is None
    assert device.refusal("fft", [(1,)], {"inverse": True}) is None
    assert device.refusal("add", [(12,), (12,)], {}) is None


def test_memory_available_counts_what_the_backend_holds(device):
    total = device.properties.memory_total_bytes
    device.allocator.release_pool()
    assert device.memory_available_bytes() == total  # nothing held between calls
    buffer = device.allocator.alloc(1 << 20)
    assert device.memory_available_bytes() == total - (1 << 20)
    device.allocator.free(buffer)  # kept in the pool for the next call: still held
    assert device.memory_available_bytes() == total - (1 << 20)
    assert device.allocator.alloc(1 << 20) is buffer
    device.allocator.free(buffer)
    device.allocator.release_pool()
    assert device.memory_available_bytes() == total


# --------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------


def test_non_contiguous_inputs_are_transferred_in_logical_order(device):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 60)).astype(np.float32)
    views = {
        "transposed": base.T,
        "strided": base[::3, 1::2],
        "reversed": base[::-1, ::-1],
        "fortran": np.asfortranarray(base),
    }
    for name, view in views.items():
        assert not view.flags.c_contiguous or name == "fortran"
        (got,) = device.run("add", [view, np.zeros((), np.float32)], {})
        np.testing.assert_array_equal(got, view, err_msg=name)
        (got,) = device.run("transpose", [view], {})
        np.testing.assert_array_equal(got, np.ascontiguousarray(view.T), err_msg=name)


def test_outputs_are_fresh_writable_arrays(device):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    x.flags.writeable = False
    (out,) = device.run("relu", [x], {})
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
    assert not np.shares_memory(out, x)


# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------


def test_a_compile_failure_carries_the_compiler_log(device):
    broken = "__kernel void broken(__global float *x) { x[0] = undeclared_name; }"
    with pytest.raises(backend.CompileError) as info:
        device.compiler.compile(broken, ("-DT=float",))
    assert "undeclared_name" in info.value.log
    assert "undeclared_name" in str(info.value)


def test_an_allocation_beyond_one_buffers_limit_is_a_launch_error(device):
    with pytest.raises(backend.LaunchError, match="cannot allocate"):
        device.allocator.alloc(device.allocator.max_alloc + 1)
    assert device.allocator.in_use == 0


def test_a_driver_failure_surfaces_as_a_launch_error(device, monkeypatch):
    # Lift our own size check, so the OpenCL driver itself refuses a buffer far larger
    # than the device's memory.
    monkeypatch.setattr(device.allocator, "max_alloc", 1 << 62)
    with pytest.raises(backend.LaunchError):
        device.allocator.alloc(4 * device.properties.memory_total_bytes)


def test_a_failed_run_frees_its_buffers(device, monkeypatch):
    monkeypatch.setattr(device.allocator, "max_alloc", 1000)
    x = np.ones(200, np.float32)  # 800 bytes: under the lowered limit
    with pytest.raises(backend.LaunchError):
        big = np.ones((20, 20), np.float32)  # 1600 bytes: over it
        device.run("matmul", [big, big], {})
    device.run("relu", [x], {})
    assert device.allocator.in_use == 0


# --------------------------------------------------------------------------
# Compile cache and threads
# --------------------------------------------------------------------------

_CHILD = """
import json
from kernelmesh.native import opencl
from kernelmesh.native.compile_cache import default_cache
for device in opencl.devices():
    device.warmup()
cache = default_cache()
print(json.dumps({"hits": cache.hits, "misses": cache.misses}))
"""


def test_a_second_process_compiles_nothing(device, tmp_path):
    # This process's warmup (the fixture) compiled or loaded every program into the
    # default cache; a new process pointed at a copy of it must only load binaries.
    shutil.copytree(default_cache().directory, tmp_path / "kernels")
    env = {**os.environ, "KERNELMESH_CACHE_DIR": str(tmp_path / "kernels")}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["misses"] == 0, counts
    assert counts["hits"] > 0, counts


def test_many_threads_running_at_once_get_their_own_results(device):
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(15):
                a = rng.standard_normal((37, 41)).astype(np.float32)
                b = rng.standard_normal((41, 29)).astype(np.float32)
                (mm,) = device.run("matmul", [a, b], {})
                np.testing.assert_allclose(mm, a @ b, rtol=1e-4, atol=1e-4)
                (s,) = device.run("sum", [a], {"axis": 1, "keepdims": False})
                np.testing.assert_allclose(s, a.sum(axis=1, dtype=np.float64), rtol=1e-5)
                (added,) = device.run("add", [a, np.full((), seed, np.float32)], {})
                np.testing.assert_array_equal(added, a + np.float32(seed))
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert device.allocator.in_use == 0
