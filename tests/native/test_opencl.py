"""What only the OpenCL backend does, on every OpenCL device present (PoCL's CPU device in
CI): its properties, dtypes without fp64, refusals, buffer pool and allocation limits.
Everything every backend must do (op cases against NumPy, transfers, errors, the compile
cache, threads) is in `test_backend_suite.py`."""

from __future__ import annotations

import pytest

from kernelmesh.native import backend, opencl

_REASON = opencl.available()
if _REASON is not None:
    pytest.skip(f"OpenCL unavailable: {_REASON}", allow_module_level=True)

import backend_suite  # noqa: E402

DEVICES = backend_suite.devices("opencl")


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> opencl.OpenCLDevice:
    return backend_suite.warmed(request.param)


# --------------------------------------------------------------------------
# What the device reports
# --------------------------------------------------------------------------


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "opencl" and props.model and props.driver_version
    assert props.compute_units >= 1 and props.max_work_group_size >= 1
    assert props.memory_total_bytes > 0
    assert props.driver_version in props.fingerprint and props.model in props.fingerprint


def test_supported_dtypes_follow_fp64(device):
    assert set(device.supported) == set(backend.CATALOG_DTYPES)
    for op, dtypes in device.supported.items():
        if device.properties.supports_fp64:
            assert dtypes == backend.CATALOG_DTYPES[op]
        else:
            assert "float64" not in dtypes


def test_without_fp64_float64_and_integer_means_are_not_offered():
    supported = opencl._supported(fp64=False)
    for op, dtypes in backend.CATALOG_DTYPES.items():
        dropped = {"float64", "int32", "int64"} if op == "mean" else {"float64"}
        assert supported[op] == dtypes - dropped, op
    assert opencl._supported(fp64=True) == dict(backend.CATALOG_DTYPES)


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
# Failures
# --------------------------------------------------------------------------


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
