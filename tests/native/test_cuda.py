"""The CUDA backend on every CUDA device present, against the NumPy references of
`op_cases`, plus its device-level behaviour: properties, transfers, errors, the compile
cache across processes, and concurrent callers. Needs a GPU, pycuda and nvcc; skipped
with the reason `cuda.available()` gives otherwise.

The hand-written fallbacks that CuPy normally replaces (tiled matmul, direct conv2d,
radix-2 fft) run too, on a second handle to the same device with CuPy turned off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from kernelmesh.native import backend, cuda
from kernelmesh.native.compile_cache import default_cache

_REASON = cuda.available()
if _REASON is not None:
    pytest.skip(f"CUDA unavailable: {_REASON}", allow_module_level=True)

import op_cases  # noqa: E402  (after the skip: imports numba-heavy modules for nothing otherwise)

DEVICES = cuda.devices()
CASES = op_cases.cases()
FALLBACK_OPS = ("matmul", "conv2d", "fft")


@pytest.fixture(scope="module", params=DEVICES, ids=[d.name for d in DEVICES])
def device(request) -> cuda.CudaDevice:
    dev = request.param
    dev.warmup()  # compiles, or loads from the compile cache, every kernel run uses
    return dev


@pytest.fixture(scope="module")
def fallback(device: cuda.CudaDevice):
    """The same GPU with CuPy switched off: matmul, conv2d and fft on our own kernels."""
    dev = cuda.CudaDevice(device.index)
    dev._cupy, dev.cupy_missing = None, "switched off by the test"
    yield dev
    dev.close()


def run_case(dev: cuda.CudaDevice, case: op_cases.OpCase) -> None:
    refusal = dev.refusal(case.op, [x.shape for x in case.inputs], case.params)
    if refusal:
        pytest.skip(refusal)
    before = [x.copy() for x in case.inputs]
    outputs = dev.run(case.op, case.inputs, case.params)
    op_cases.assert_matches(case, outputs)
    for x, copy in zip(case.inputs, before, strict=True):
        np.testing.assert_array_equal(x, copy)  # inputs are never written
        assert not any(np.shares_memory(out, x) for out in outputs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_numpy(device, case):
    run_case(device, case)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.op in FALLBACK_OPS],
    ids=[c.id for c in CASES if c.op in FALLBACK_OPS],
)
def test_fallback_kernel_matches_numpy(fallback, case):
    run_case(fallback, case)


# --------------------------------------------------------------------------
# What the device reports
# --------------------------------------------------------------------------


def test_devices_are_named_in_order():
    assert [d.name for d in DEVICES] == [f"cuda:{i}" for i in range(len(DEVICES))]


def test_properties_describe_the_device(device):
    props = device.properties
    assert props.kind == "cuda" and props.vendor == "NVIDIA" and props.model
    assert props.compute_units >= 1 and props.max_work_group_size >= 32
    assert props.memory_total_bytes > 0 and props.supports_fp64
    assert device.arch in props.fingerprint and props.driver_version in props.fingerprint
    assert f"nvcc {device.compiler.version}" in props.fingerprint


def test_supported_dtypes_are_the_cpus():
    from kernelmesh.native import cpu

    for dev in DEVICES:
        assert dict(dev.supported) == dict(cpu.SUPPORTED_DTYPES)


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
    with device._active():
        buffer = device.allocator.alloc(256 << 20)
        try:
            assert device.memory_available_bytes() <= before - (256 << 20) + (2 << 20)
        finally:
            device.allocator.free(buffer)


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
        "big-endian": base.astype(">f4"),
    }
    for name, view in views.items():
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


def test_a_compile_failure_carries_nvccs_log(device):
    broken = 'extern "C" __global__ void km_broken(float* x) { x[0] = undeclared_name; }'
    with pytest.raises(backend.CompileError) as info:
        device.compiler.compile(broken, ())
    assert "undeclared_name" in info.value.log
    assert "undeclared_name" in str(info.value)


def test_an_allocation_beyond_device_memory_is_a_launch_error_and_the_device_recovers(device):
    with device._active(), pytest.raises(backend.LaunchError, match="cannot allocate"):
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


# --------------------------------------------------------------------------
# Compile cache and threads
# --------------------------------------------------------------------------

_CHILD = """
import json
from kernelmesh.native import cuda
from kernelmesh.native.compile_cache import default_cache
for device in cuda.devices():
    device.warmup()
    device.close()
cache = default_cache()
print(json.dumps({"hits": cache.hits, "misses": cache.misses}))
"""


def test_a_second_process_compiles_nothing(device, tmp_path):
    # This process's warmup (the fixture) compiled or loaded every kernel into the
    # default cache; a new process pointed at a copy of it must only load cubins.
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
