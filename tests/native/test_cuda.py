"""What only the CUDA backend does, on every CUDA device present: properties, refusals
with and without CuPy, device memory, big-endian uploads, real allocation failures.
Everything every backend must do (op cases against NumPy, transfers, errors, the compile
cache, threads) is in `test_backend_suite.py`. Needs a GPU, pycuda and nvcc; skipped
with the reason `cuda.available()` gives otherwise.

The hand-written fallbacks that CuPy normally replaces (tiled matmul, direct conv2d,
radix-2 fft) run too, on a second handle to the same device with CuPy turned off.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.native import backend, cuda

_REASON = cuda.available()
if _REASON is not None:
    pytest.skip(f"CUDA unavailable: {_REASON}", allow_module_level=True)

# after the skip: these import numba-heavy modules for nothing otherwise
import backend_suite  # noqa: E402
import op_cases  # noqa: E402

DEVICES = backend_suite.devices("cuda")
FALLBACK_CASES = [c for c in op_cases.cases() if c.op in ("matmul", "conv2d", "fft")]


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> cuda.CudaDevice:
    return backend_suite.warmed(request.param)


@pytest.fixture(scope="module")
def fallback(device: cuda.CudaDevice):
    """The same GPU with CuPy switched off: matmul, conv2d and fft on our own kernels."""
    dev = cuda.CudaDevice(device.index)
    dev.cupy, dev.cupy_missing = None, "switched off by the test"
    yield dev
    dev.close()


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=[c.id for c in FALLBACK_CASES])
def test_fallback_kernel_matches_numpy(fallback, case):
    backend_suite.check_case(fallback, case)


# --------------------------------------------------------------------------
# What the device reports
# --------------------------------------------------------------------------


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "cuda" and props.vendor == "NVIDIA" and props.model
    assert props.compute_units >= 1 and props.max_work_group_size >= 32
    assert props.memory_total_bytes > 0 and props.supports_fp64
    assert device.arch in props.fingerprint and props.driver_version in props.fingerprint
    assert f"nvcc {device.compiler.version}" in props.fingerprint


def test_supported_dtypes_are_the_catalogs():
    for dev in DEVICES:
        assert dict(dev.supported) == dict(backend.CATALOG_DTYPES)


def test_fft_lengths_are_refused_only_without_cufft(device, fallback):
    assert fallback.refusal("fft", [(4, 12)], {"inverse": False}) == (
        f"fft on {fallback.name} needs a power-of-two length without CuPy's cuFFT "
        "(switched off by the test), got 12"
    )
    assert fallback.refusal("fft", [(4, 16)], {"inverse": False}) is None
    assert fallback.refusal("fft", [(1,)], {"inverse": True}) is None
    if device.cupy_missing is None:
        assert device.refusal("fft", [(4, 12)], {"inverse": False}) is None


def test_memory_available_shrinks_while_a_buffer_is_held(device):
    before = device.memory_available_bytes()
    assert 0 < before <= device.properties.memory_total_bytes
    with device.active():
        buffer = device.allocator.alloc(256 << 20)
        try:
            assert device.memory_available_bytes() <= before - (256 << 20) + (2 << 20)
        finally:
            device.allocator.free(buffer)


# --------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------


def test_big_endian_inputs_are_transferred_in_native_order(device):
    # the other layouts are in test_backend_suite.py
    rng = np.random.default_rng(1)
    view = rng.standard_normal((40, 60)).astype(">f4")
    (got,) = device.run("add", [view, np.zeros((), np.float32)], {})
    np.testing.assert_array_equal(got, view)
    (got,) = device.run("transpose", [view], {})
    np.testing.assert_array_equal(got, np.ascontiguousarray(view.T))
    (got,) = device.run("matmul", [view, np.ascontiguousarray(view.T)], {})
    np.testing.assert_allclose(got, view @ view.T, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------


def test_an_allocation_beyond_device_memory_is_a_launch_error_and_the_device_recovers(device):
    with device.active(), pytest.raises(backend.LaunchError, match="cannot allocate"):
        device.allocator.alloc(4 * device.properties.memory_total_bytes)
    x = np.arange(-5, 5, dtype=np.float32)
    (out,) = device.run("relu", [x], {})
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_a_run_that_cannot_get_its_memory_is_a_launch_error_and_frees_the_rest(device, monkeypatch):
    free_before = device.memory_available_bytes()
    real_alloc = device.allocator.alloc
    calls = 0

    def alloc_fails_on_the_third(nbytes: int):
        nonlocal calls
        calls += 1
        if calls == 3:  # a, b uploaded; the output's allocation is refused
            return real_alloc(4 * device.properties.memory_total_bytes)
        return real_alloc(nbytes)

    monkeypatch.setattr(device.allocator, "alloc", alloc_fails_on_the_third)
    big = np.ones((2048, 2048), np.float32)
    with pytest.raises(backend.LaunchError):
        device.run("matmul", [big, big], {})
    monkeypatch.undo()
    # the two 16 MiB inputs were freed (pools and other processes blur the last MiBs)
    assert device.memory_available_bytes() >= free_before - (8 << 20)
    (out,) = device.run("add", [big, big], {})
    np.testing.assert_array_equal(out, big + big)
