"""What only the Metal backend does, on every Metal device of this Mac: properties, dtypes
without float64, refusals, missing kernels, buffer limits, failed command buffers.
Everything every backend must do (op cases against NumPy, transfers, compile errors, the
compile cache, threads) is in `test_backend_suite.py`. Elsewhere the whole module is one
skip, saying why."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.native import backend, metal

_REASON = metal.available()
if _REASON is not None:
    pytest.skip(f"Metal unavailable: {_REASON}", allow_module_level=True)

import backend_suite  # noqa: E402

DEVICES = backend_suite.devices("metal")


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> metal.MetalDevice:
    return backend_suite.warmed(request.param)


# --------------------------------------------------------------------------
# What the device reports
# --------------------------------------------------------------------------


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "metal" and props.model and props.driver_version.startswith("macOS")
    assert props.max_work_group_size >= 256 and props.memory_total_bytes > 0
    assert not props.supports_fp64
    assert props.model in props.fingerprint and props.driver_version in props.fingerprint


def test_every_catalog_op_is_offered_without_float64(device):
    assert set(device.supported) == set(backend.CATALOG_DTYPES)
    for op, dtypes in device.supported.items():
        assert dtypes == backend.CATALOG_DTYPES[op] - {"float64"}, op


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
# Failures
# --------------------------------------------------------------------------


def test_a_missing_kernel_is_a_compile_error(device):
    library = device.build_source(
        "kernel void present(device float* x [[buffer(0)]]) {}", "present"
    )
    with pytest.raises(backend.CompileError, match="absent"):
        device.program_of(library, "absent")


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
