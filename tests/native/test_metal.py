"""The Metal backend on every Metal device of this Mac, against the NumPy references of
`op_cases`, plus its device-level behaviour: refusals, transfers, errors, the compile
cache and concurrent callers. Elsewhere the whole module is one skip, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from kernelmesh.native import backend, cpu, metal
from kernelmesh.native.compile_cache import default_cache

_REASON = metal.available()
if _REASON is not None:
    pytest.skip(f"Metal unavailable: {_REASON}", allow_module_level=True)

import op_cases  # noqa: E402  (after the skip: imports numba-heavy modules for nothing otherwise)

DEVICES = metal.devices()
CASES = op_cases.cases()


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> metal.MetalDevice:
    dev = request.param
    dev.warmup()  # builds every pipeline run uses, through the compile cache where it can
    return dev


def skip_reason(device: metal.MetalDevice, case: op_cases.OpCase) -> str | None:
    if case.dtype == "float64":
        return "Metal has no float64"
    if not device.supports(case.op, case.dtype):
        return f"{device.name} does not offer {case.op} on {case.dtype}"
    return device.refusal(case.op, [x.shape for x in case.inputs], case.params)


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
    assert [d.name for d in DEVICES] == [f"metal:{i}" for i in range(len(DEVICES))]


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "metal" and props.model and props.driver_version.startswith("macOS")
    assert props.max_work_group_size >= 256 and props.memory_total_bytes > 0
    assert not props.supports_fp64
    assert props.model in props.fingerprint and props.driver_version in props.fingerprint


def test_every_cpu_op_is_offered_without_float64(device):
    assert set(device.supported) == set(cpu.SUPPORTED_DTYPES)
    for op, dtypes in device.supported.items():
        assert dtypes == cpu.SUPPORTED_DTYPES[op] - {"float64"}, op


def test_fft_of_a_length_not_a_power_of_two_is_refused(device):
    reason = device.refusal("fft", [(4, 12)], {"inverse": False})
    assert reason is not None and "power-of-two" in reason and "12" in reason
    assert device.refusal("fft", [(4, 16)], {"inverse": False}) is None
    assert device.refusal("fft", [(1,)], {"inverse": True}) is None
    assert device.refusal("add", [(12,), (12,)], {}) is None


def test_float64_is_refused_by_run_with_the_reason(device):
    x = np.ones(3)
    with pytest.raises(ValueError, match="Metal has no float64"):
        device.run("add", [x, x], {})


def test_memory_available_is_within_the_working_set(device):
    available = device.memory_available_bytes()
    assert 0 <= available <= device.properties.memory_total_bytes


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
    broken = "kernel void broken(device float* x [[buffer(0)]]) { x[0] = undeclared_name; }"
    with pytest.raises(backend.CompileError) as info:
        device.build(broken, "broken.metal")
    assert "undeclared_name" in info.value.log
    assert "undeclared_name" in str(info.value)


def test_a_missing_kernel_is_a_compile_error(device):
    library = device.build("kernel void present(device float* x [[buffer(0)]]) {}", "present")
    with pytest.raises(backend.CompileError, match="absent"):
        device.program(library, "absent")


def test_an_allocation_beyond_one_buffers_limit_is_a_launch_error(device):
    with pytest.raises(backend.OutOfDeviceMemory, match="could not allocate"):
        device.allocator.alloc(device._mtl.maxBufferLength() + 1)
    (out,) = device.run("add", [np.ones(4, np.float32), np.ones(4, np.float32)], {})
    np.testing.assert_array_equal(out, np.full(4, 2, np.float32))


class _FailedCommandBuffer:
    """Reports what Metal reports for a command buffer that faulted on the GPU. No
    reliable way exists to make a real one fail on demand (a GPU timeout takes seconds
    and depends on the machine), so this checks our translation of the failure."""

    def __init__(self, code: int, description: str) -> None:
        self._code, self._description = code, description

    def waitUntilCompleted(self) -> None:
        pass

    def status(self) -> int:
        return metal._pyobjc().Metal.MTLCommandBufferStatusError

    def error(self):
        code, description = self._code, self._description

        class _Error:
            def code(self) -> int:
                return code

            def localizedDescription(self) -> str:
                return description

        return _Error()


def test_a_failed_command_buffer_is_a_launch_error_and_the_device_stays_usable(device):
    timeout = metal._pyobjc().Metal.MTLCommandBufferErrorTimeout
    failed = _FailedCommandBuffer(timeout, "Caused GPU Timeout Error (test)")
    with pytest.raises(backend.LaunchError, match="GPU Timeout Error") as info:
        metal._finish(failed, "add", device.name)
    assert not isinstance(info.value, backend.OutOfDeviceMemory)
    out_of_memory = metal._pyobjc().Metal.MTLCommandBufferErrorOutOfMemory
    with pytest.raises(backend.OutOfDeviceMemory, match="out of memory"):
        metal._finish(_FailedCommandBuffer(out_of_memory, "out of memory (test)"), "add", "gpu")
    (out,) = device.run("mul", [np.full(5, 3, np.int32), np.full(5, 4, np.int32)], {})
    np.testing.assert_array_equal(out, np.full(5, 12, np.int32))


# --------------------------------------------------------------------------
# Compile cache and threads
# --------------------------------------------------------------------------

_CHILD = """
import json
from kernelmesh.native import metal
from kernelmesh.native.compile_cache import default_cache
for device in metal.devices():
    device.warmup()
cache = default_cache()
print(json.dumps({"hits": cache.hits, "misses": cache.misses}))
"""


def test_a_second_process_compiles_nothing(device, tmp_path):
    if metal.offline_toolchain() is None:
        pytest.skip(
            "no offline Metal toolchain (xcrun metal): sources compile in process and "
            "nothing goes to the compile cache"
        )
    shutil.copytree(default_cache().directory, tmp_path / "kernels")
    env = {**os.environ, "KERNELMESH_CACHE_DIR": str(tmp_path / "kernels")}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["misses"] == 0, counts
    assert counts["hits"] > 0, counts


def test_concurrent_callers_get_their_own_results(device):
    rng = np.random.default_rng(7)
    jobs = [
        (
            rng.standard_normal((64, 48)).astype(np.float32),
            rng.standard_normal((48, 32)).astype(np.float32),
        )
        for _ in range(16)
    ]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(indices: range) -> None:
        try:
            for i in indices:
                (results[i],) = device.run("matmul", list(jobs[i]), {})
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(range(k, 16, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (a, b) in enumerate(jobs):
        np.testing.assert_allclose(results[i], a @ b, rtol=1e-4, atol=1e-4)
