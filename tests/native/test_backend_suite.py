"""What every accelerator backend (OpenCL, CUDA, Metal) must do, on every device of every
backend that runs here: every case of `op_cases` against its NumPy reference, transfers
of non-contiguous inputs, fresh outputs, compile errors carrying the compiler's log, a
failed run freeing its buffers and leaving the device usable, the compile cache across
processes, and concurrent callers. A backend that cannot run here is one skip per test,
with its `available()` reason; float64 cases skip on devices without float64.

What only one backend does is tested in its own ``test_<backend>.py``.
"""

from __future__ import annotations

import threading

import backend_suite
import numpy as np
import op_cases
import pytest

from kernelmesh.native import backend, metal, opencl

CASES = op_cases.cases()


@pytest.fixture(scope="module", params=backend_suite.device_params())
def device(request) -> backend.Device:
    return backend_suite.warmed(request.param)


@pytest.mark.parametrize(
    ("device", "case"), backend_suite.device_case_params(CASES), indirect=["device"]
)
def test_op_matches_numpy(device, case):
    backend_suite.check_case(device, case)


@pytest.mark.parametrize("name", backend_suite.backend_params())
def test_devices_are_named_in_order(name):
    names = [d.name for d in backend_suite.devices(name)]
    assert names == [f"{name}:{i}" for i in range(len(names))]


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
        (got,) = device.run("matmul", [view, np.ascontiguousarray(view.T)], {})
        np.testing.assert_allclose(got, view @ view.T, rtol=1e-4, atol=1e-4, err_msg=name)


def test_outputs_are_fresh_writable_arrays(device):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    x.flags.writeable = False
    (out,) = device.run("relu", [x], {})
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
    assert not np.shares_memory(out, x)


# --------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------

# backend -> compiles a kernel that uses an undeclared name, as that backend compiles
_COMPILE_BROKEN = {
    "opencl": lambda device: device.compiler.compile(
        "__kernel void broken(__global float *x) { x[0] = undeclared_name; }", ("-DT=float",)
    ),
    "cuda": lambda device: device.compiler.compile(
        'extern "C" __global__ void km_broken(float* x) { x[0] = undeclared_name; }', ()
    ),
    "metal": lambda device: device.build_source(
        "kernel void broken(device float* x [[buffer(0)]]) { x[0] = undeclared_name; }",
        "broken.metal",
    ),
}


def test_a_compile_failure_carries_the_compiler_log(device):
    with pytest.raises(backend.CompileError) as info:
        _COMPILE_BROKEN[device.properties.kind](device)
    assert "undeclared_name" in info.value.log
    assert "undeclared_name" in str(info.value)


def test_a_run_that_cannot_get_its_memory_is_a_launch_error_frees_the_rest_and_recovers(
    device, monkeypatch
):
    allocator = device.allocator
    real_alloc, real_free = allocator.alloc, allocator.free
    allocated: list[object] = []
    freed: list[object] = []

    def alloc_fails_on_the_third(nbytes: int):
        if len(allocated) == 2:  # a, b uploaded; the output's allocation is refused
            raise backend.OutOfDeviceMemory(f"the test refuses {nbytes} bytes")
        allocated.append(real_alloc(nbytes))
        return allocated[-1]

    def free(buffer) -> None:
        freed.append(buffer)
        real_free(buffer)

    monkeypatch.setattr(allocator, "alloc", alloc_fails_on_the_third)
    monkeypatch.setattr(allocator, "free", free)
    big = np.ones((64, 64), np.float32)
    with pytest.raises(backend.LaunchError, match="the test refuses"):
        device.run("matmul", [big, big], {})
    monkeypatch.undo()
    assert len(allocated) == 2 and len(freed) == 2
    assert all(any(f is a for f in freed) for a in allocated)  # both inputs freed
    if isinstance(device, opencl.OpenCLDevice):
        assert device.allocator.in_use == 0
    (out,) = device.run("add", [big, big], {})
    np.testing.assert_array_equal(out, big + big)


# --------------------------------------------------------------------------
# Compile cache and threads
# --------------------------------------------------------------------------


def test_a_second_process_compiles_nothing(device, tmp_path):
    # This process's warmup (the fixture) compiled or loaded every kernel into the
    # default cache; a new process pointed at a copy of it must only load binaries.
    if isinstance(device, metal.MetalDevice) and metal.offline_toolchain() is None:
        pytest.skip(
            "no offline Metal toolchain (xcrun metal): sources compile in process and "
            "nothing goes to the compile cache"
        )
    counts = backend_suite.second_process_cache_counts(device.properties.kind, tmp_path)
    assert counts["misses"] == 0, counts
    assert counts["hits"] > 0, counts


def test_many_threads_running_at_once_get_their_own_results(device):
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    # fft where the device takes this length (cuFFT does; radix-2 kernels refuse 41)
    with_fft = device.refusal("fft", [(37, 41)], {"inverse": False}) is None
    # sums accumulate in float32 without float64: a bound on that rounding, row by row
    fp64 = device.properties.supports_fp64

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
                expected = a.sum(axis=1, dtype=np.float64)
                if fp64:
                    np.testing.assert_allclose(s, expected, rtol=1e-5)
                else:
                    bound = 41 * np.finfo(np.float32).eps * np.abs(a).sum(axis=1)
                    assert np.all(np.abs(s - expected) <= bound + 1e-5 * np.abs(expected))
                (added,) = device.run("add", [a, np.full((), seed, np.float32)], {})
                np.testing.assert_array_equal(added, a + np.float32(seed))
                if with_fft:
                    (f,) = device.run("fft", [a], {"inverse": False})
                    np.testing.assert_allclose(f, np.fft.fft(a), rtol=1e-4, atol=1e-3)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    if isinstance(device, opencl.OpenCLDevice):
        assert device.allocator.in_use == 0
