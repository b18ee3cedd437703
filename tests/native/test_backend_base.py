"""The generic part every backend inherits from `native/backend.py`, checked without a
device: output specs against the catalog, the allocator template (empty requests, size
limit, accounting), the pooled allocator, `Device.run`'s dispatch and empty outputs, the
compile-and-load cache over a kernel table, and the CPU backend's thread budget."""

from __future__ import annotations

import threading

import numba
import numpy as np
import op_cases
import pytest

from kernelmesh.core import ops
from kernelmesh.native import backend, cpu


@pytest.mark.parametrize("case", op_cases.cases(), ids=lambda c: c.id)
def test_output_spec_agrees_with_the_catalogs_validated_call(case):
    metas = [ops.TensorMeta(x.dtype.name, tuple(x.shape)) for x in case.inputs]
    (meta,) = ops.validate(case.op, metas, dict(case.params)).outputs
    spec = backend.output_spec(case.op, case.inputs, case.params)
    assert spec == backend.TensorSpec.of(meta.shape, meta.dtype)


class _HostAllocator(backend.Allocator):
    """Buffers of host bytes, recording what reaches the "driver"."""

    def __init__(self, max_alloc: int | None = None) -> None:
        super().__init__(max_alloc)
        self.driver_allocs: list[int] = []
        self.driver_frees = 0

    def _alloc(self, nbytes: int) -> bytearray:
        if nbytes > 1 << 20:
            raise backend.OutOfDeviceMemory(f"the fake driver refuses {nbytes} bytes")
        self.driver_allocs.append(nbytes)
        return bytearray(nbytes)

    def _free(self, buffer: bytearray) -> None:
        self.driver_frees += 1

    def _copyin(self, buffer: bytearray, host: np.ndarray) -> None:
        buffer[: host.nbytes] = host.tobytes()

    def _copyout(self, host: np.ndarray, buffer: bytearray) -> None:
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(buffer, np.uint8)[: host.nbytes]


class _PooledHostAllocator(backend.PooledAllocator, _HostAllocator):
    def __init__(self, pool_limit: int) -> None:
        backend.PooledAllocator.__init__(self, None, pool_limit)
        self.driver_allocs, self.driver_frees = [], 0


def test_an_empty_request_gets_a_real_buffer_and_is_accounted():
    allocator = _HostAllocator()
    buffer = allocator.alloc(0)
    assert allocator.driver_allocs == [allocator.min_bytes] and allocator.in_use == 1
    allocator.copyin(buffer, np.empty(0, np.float32))  # copies of nothing do nothing
    allocator.copyout(np.empty(0, np.float32), buffer)
    allocator.free(buffer)
    assert allocator.in_use == 0 and allocator.driver_frees == 1


def test_the_size_limit_refuses_before_the_driver_is_asked():
    allocator = _HostAllocator(max_alloc=64)
    with pytest.raises(backend.OutOfDeviceMemory, match="at most 64 bytes"):
        allocator.alloc(65)
    assert allocator.driver_allocs == [] and allocator.in_use == 0


def test_copies_round_trip():
    allocator = _HostAllocator()
    x = np.arange(10, dtype=np.int64)
    buffer = allocator.alloc(x.nbytes)
    allocator.copyin(buffer, x)
    back = np.empty_like(x)
    allocator.copyout(back, buffer)
    np.testing.assert_array_equal(back, x)


def test_the_pool_reuses_by_size_up_to_its_limit_and_releases_on_refusal():
    allocator = _PooledHostAllocator(pool_limit=1000)
    first = allocator.alloc(600)
    allocator.free(first)  # pooled: still held
    assert allocator.held == 600 and allocator.in_use == 0 and allocator.driver_frees == 0
    assert allocator.alloc(600) is first and allocator.driver_allocs == [600]
    second = allocator.alloc(600)
    allocator.free(first)
    allocator.free(second)  # over the limit: back to the driver
    assert allocator.pooled == 600 and allocator.driver_frees == 1
    # the driver refuses; the pool is released and the request refused for real
    with pytest.raises(backend.OutOfDeviceMemory):
        allocator.alloc(2 << 20)
    assert allocator.pooled == 0 and allocator.driver_frees == 2 and allocator.held == 0


class _CountingProgram(backend.Program):
    def __init__(self, name: str) -> None:
        self.name = name
        self.launches: list[backend.LaunchSize] = []

    def launch(self, args: tuple, size: backend.LaunchSize) -> float | None:
        self.launches.append(size)
        return 0.0 if size.wait else None


class _FakeCompiler(backend.Compiler):
    def __init__(self) -> None:
        self.compiled = 0

    def compile(self, source: str, options=(), *, name: str = "kernel") -> bytes:
        self.compiled += 1
        return f"{name} {' '.join(options)}".encode()


_TABLE = backend.kernel_table(
    backend.KernelFile(
        "opencl_fft.cl", {"a": ("-DA",), "b": ("-DB",)}, {"a": ("k1", "k2"), "b": ("k1",)}
    )
)


class _FakeDevice(backend.Device):
    kernels = _TABLE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.compiler = _FakeCompiler()
        self.loaded: list[bytes] = []
        self.ran: list[backend.OpCall] = []

    def memory_available_bytes(self) -> int:
        return 0

    def builds(self, kernel_file: backend.KernelFile, variant: str) -> bool:
        return variant != "b"

    def load(self, binary: bytes, options) -> bytes:
        self.loaded.append(binary)
        return binary

    def program_of(self, loaded: bytes, name: str) -> backend.Program:
        return _CountingProgram(name)


def _relu(call: backend.OpCall) -> np.ndarray:
    call.device.ran.append(call)
    return np.maximum(call.x, 0)


def _family(name: str) -> backend.OpFn:
    return _relu


_FakeDevice.ops = backend.op_table(
    {f"_op_{name}": _relu for name in ("softmax", "matmul", "transpose", "conv2d", "fft")},
    _family,
    _family,
    _family,
)


def _fake(tmp_path, monkeypatch) -> _FakeDevice:
    monkeypatch.setenv("KERNELMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backend, "default_cache", lambda: _cache(tmp_path))
    props = backend.DeviceProperties("fake", 0, "m", "v", "d", 1, 1, 1, False, False)
    return _FakeDevice(props, {"relu": frozenset({"float32"}), "sum": frozenset({"float32"})})


def _cache(tmp_path):
    from kernelmesh.native.compile_cache import CompileCache

    return CompileCache(tmp_path)


def test_run_dispatches_with_the_given_output_spec_and_answers_empty_outputs(tmp_path, monkeypatch):
    device = _fake(tmp_path, monkeypatch)
    x = np.array([-1.0, 2.0], np.float32)
    spec = ops.TensorMeta("float32", (2,))
    (out,) = device.run("relu", [x], {}, [spec])
    np.testing.assert_array_equal(out, [0.0, 2.0])
    (call,) = device.ran
    assert call.out == backend.TensorSpec.of((2,), np.float32)
    (empty,) = device.run("relu", [np.empty((3, 0), np.float32)], {})
    assert empty.shape == (3, 0) and len(device.ran) == 1  # answered without the op
    (zeros,) = device.run("sum", [np.empty((3, 0), np.float32)], {"axis": 1})
    np.testing.assert_array_equal(zeros, np.zeros(3, np.float32))
    assert len(device.ran) == 1
    with pytest.raises(ValueError, match="relu for float64 does not run on fake:0"):
        device.run("relu", [np.ones(2)], {})


def test_programs_compile_once_load_once_and_warm_up_follows_the_table(tmp_path, monkeypatch):
    device = _fake(tmp_path, monkeypatch)
    steps: list[str] = []
    device.warmup(steps.append)
    assert steps == ["opencl_fft.cl:a"] and device.warmup_steps() == 1  # build "b" unused
    assert device.compiler.compiled == 1 and len(device.loaded) == 1
    program = device.program("opencl_fft.cl", "a", "k2")
    assert device.program("opencl_fft.cl", "a", "k2") is program
    assert device.compiler.compiled == 1 and len(device.loaded) == 1
    program(1, 2, global_size=[4], local_size=[2], wait=True)
    assert program.launches == [backend.LaunchSize((4,), (2,), True)]
    with pytest.raises(ValueError, match="has no kernel 'k3'"):
        device.program("opencl_fft.cl", "a", "k3")
    device.close()
    fresh = _fake(tmp_path, monkeypatch)  # a new process: the binary comes from the cache
    fresh.warmup()
    assert fresh.compiler.compiled == 0 and len(fresh.loaded) == 1


def test_op_table_prefers_a_modules_own_function_over_the_familys():
    others = {f"_op_{name}": _relu for name in ("softmax", "matmul", "transpose", "conv2d")}
    with pytest.raises(LookupError, match="_op_fft"):
        backend.op_table(others, str, str, str)
    others |= {"_op_fft": _relu, "_op_add": _relu}
    table = backend.op_table(others, str, str, str)
    assert set(table) == set(backend.CATALOG_DTYPES)
    assert table["add"] is _relu and table["sub"] == "sub" and table["mean"] == "mean"


def test_the_cpu_thread_budget_shares_the_cores_among_overlapping_ops():
    budget = cpu._ThreadBudget(cores=4)
    before = numba.get_num_threads()
    seen: list[int] = []
    entered, release = threading.Barrier(2), threading.Event()

    def op() -> None:
        with budget:
            entered.wait(timeout=30)
            seen.append(numba.get_num_threads())
            release.wait(timeout=30)

    other = threading.Thread(target=op)
    other.start()
    with budget:
        entered.wait(timeout=30)
        assert budget.running == 2 and budget._blas_threads == 1
        release.set()
    other.join(timeout=30)
    assert budget.running == 0 and numba.get_num_threads() == before
    assert seen == [min(2, before)] or seen == [min(4, before)]  # whichever entered first
    with budget:  # alone again: BLAS gets every core back
        assert budget._blas_threads == 4


def test_a_planned_run_answers_as_run_does_with_its_checks_made_once(tmp_path, monkeypatch):
    device = _fake(tmp_path, monkeypatch)
    spec = ops.TensorMeta("float32", (2,))
    runner = device.planned("relu", [(2,)], "float32", {}, [spec])
    for x in ([-1.0, 2.0], [3.0, -4.0]):
        (out,) = runner([np.array(x, np.float32)])
        np.testing.assert_array_equal(out, np.maximum(x, 0))
    assert [c.out for c in device.ran] == [backend.TensorSpec.of((2,), np.float32)] * 2
    (empty,) = device.planned("relu", [(3, 0)], "float32", {}, [ops.TensorMeta("float32", (3, 0))])(
        [np.empty((3, 0), np.float32)]
    )
    zeros = device.planned(
        "sum", [(3, 0)], "float32", {"axis": 1}, [ops.TensorMeta("float32", (3,))]
    )
    np.testing.assert_array_equal(zeros([np.empty((3, 0), np.float32)])[0], np.zeros(3))
    assert empty.shape == (3, 0) and len(device.ran) == 2  # both answered without the op
    with pytest.raises(ValueError, match="relu for float64 does not run on fake:0"):
        device.planned("relu", [(2,)], "float64", {}, [ops.TensorMeta("float64", (2,))])
    with pytest.raises(ValueError, match="has no op 'nope'"):
        device.planned("nope", [(2,)], "float32", {}, [spec])


def test_tiny_cpu_calls_skip_the_thread_budget_and_big_ones_take_it(monkeypatch):
    entered: list[int] = []

    class Watching(cpu._ThreadBudget):
        def __enter__(self) -> None:
            entered.append(1)
            super().__enter__()

    monkeypatch.setattr(cpu, "_budget", Watching(cores=2))
    device = cpu._device()
    small = np.arange(16, dtype=np.float32) - 8
    big = np.arange(1 << 14, dtype=np.float32) - 8
    for x in (small, big):
        meta = [ops.TensorMeta("float32", x.shape)]
        np.testing.assert_array_equal(device.run("relu", [x], {}, meta)[0], np.maximum(x, 0))
        runner = device.planned("relu", [x.shape], "float32", {}, meta)
        np.testing.assert_array_equal(runner([x])[0], np.maximum(x, 0))
    assert len(entered) == 2  # the big call's, by run and by its plan


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "relu", "gelu"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_a_planned_tiny_elementwise_cpu_call_answers_as_run_does(op, dtype):
    device = cpu._device()
    if dtype not in cpu.SUPPORTED_DTYPES[op]:
        pytest.skip(f"{op} does not run {dtype} on the CPU")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 5)) * 10).astype(dtype)
    y = (rng.standard_normal((3, 5)) * 10).astype(dtype)
    y[y == 0] = 1
    if dtype.startswith("float"):
        x[0, 0] = np.nan
    binary = op in ("add", "sub", "mul", "div")
    scalar = y.reshape(-1)[:1]  # shape (1,): a scalar operand
    cases = [[x, y], [x, scalar], [scalar, x]] if binary else [[x]]
    cases.append([np.asfortranarray(a) for a in cases[0]])  # not C-contiguous: copied
    for inputs in cases:
        call = ops.validate(op, inputs, {})
        shapes = [m.shape for m in call.inputs]
        runner = device.planned(op, shapes, dtype, call.params, call.outputs)
        with np.errstate(all="ignore"):
            (planned,) = runner(inputs)
            (ran,) = device.run(op, inputs, call.params, call.outputs)
        assert planned.dtype == ran.dtype and planned.shape == ran.shape
        assert planned.flags.c_contiguous
        np.testing.assert_array_equal(planned, ran)
