"""The interface every kernel backend follows (cpu, opencl, cuda, metal).

A backend is one module with a handful of small classes, in the spirit of tinygrad's
``runtime/ops_*.py``: an Allocator (allocate, copy in, copy out), a Compiler (source in,
binary out: a pure function, so `compile_cache` caches it generically), a Program (a
loaded binary that launches), and a Device that wires them together and runs catalog
ops. The task manager only sees `Device`.

Each backend module exposes:

- ``NAME``: the device-name prefix and kind (``"opencl"``), so devices are ``opencl:0``;
- ``available() -> str | None``: ``None`` when the backend can run here, else why not
  (missing package, no driver, wrong OS), for logs, ``kernelmesh devices`` and skips;
- ``devices() -> list[Device]``: every usable device of this backend, in a stable order.

The generic part is here, written once (tinygrad's ``device.py`` shape), so a new
backend is one file holding only what is its own:

- `Device.run`: one dispatch for every backend. Inputs come validated against the op
  catalog (``kernelmesh.core.ops``), params normalised, and the output specs of the
  validated call; empty outputs are answered here; each op is one function of an
  `OpCall` (`op_table` builds a backend's table from its ``_op_<name>`` functions and
  one function per family of elementwise ops and reductions). It returns fresh
  C-contiguous NumPy arrays on the host.
- `Device.program`: kernels compiled once per device fingerprint through the on-disk
  `compile_cache`, loaded once per process, from the backend's table of `KernelFile`s,
  which warm-up and the source tests read too. A backend supplies `load`, `program_of`
  and, where a build needs the device's own options, `options` and `builds`.
- `Allocator`: empty requests, the per-buffer limit and the bytes in use, over a
  backend's `_alloc/_free/_copyin/_copyout`; `PooledAllocator` keeps freed buffers.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import math
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from kernelmesh.native.compile_cache import default_cache

__all__ = [
    "CATALOG_DTYPES",
    "KERNEL_DIR",
    "Allocator",
    "CallBuffers",
    "CompileError",
    "Compiler",
    "Conv2dGeometry",
    "Device",
    "DeviceProperties",
    "KernelFile",
    "LaunchError",
    "LaunchSize",
    "OpCall",
    "OpFn",
    "OutOfDeviceMemory",
    "PooledAllocator",
    "Program",
    "ReductionPlan",
    "TensorSpec",
    "kernel_source",
    "kernel_table",
    "op_table",
    "output_spec",
    "reduction_plan",
    "without_float64",
]

# Kernel sources of every backend: files, never strings buried in Python.
KERNEL_DIR = Path(__file__).resolve().parent / "kernels"


@functools.cache
def kernel_source(filename: str) -> str:
    """The text of one file of ``native/kernels/``, read once per process."""
    return (KERNEL_DIR / filename).read_text(encoding="utf-8")


_FLOATS = frozenset({"float32", "float64"})
_NUMERIC = frozenset({"float32", "float64", "int32", "int64"})

# op -> the dtypes each catalog op is defined for: what the CPU backend runs, and what
# every other backend offers less what its device cannot do (see `without_float64`).
CATALOG_DTYPES: Mapping[str, frozenset[str]] = types.MappingProxyType(
    {
        "add": _NUMERIC,
        "sub": _NUMERIC,
        "mul": _NUMERIC,
        "div": _FLOATS,
        "relu": _NUMERIC,
        "gelu": _FLOATS,
        "exp": _FLOATS,
        "scale": _FLOATS,
        "sum": _NUMERIC,
        "max": _NUMERIC,
        "mean": _NUMERIC,
        "softmax": _FLOATS,
        "matmul": _FLOATS,
        "transpose": frozenset({"float32", "float64", "int32", "int64", "complex64"}),
        "conv2d": _FLOATS,
        "fft": frozenset({"complex64", "float32"}),
    }
)


def without_float64(table: Mapping[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
    """`table` (op -> dtypes) for a device without float64: the same ops, less float64."""
    return types.MappingProxyType({op: dtypes - {"float64"} for op, dtypes in table.items()})


@dataclass(frozen=True)
class DeviceProperties:
    """What discovery reports about one device."""

    kind: str  # the backend's NAME
    index: int
    model: str
    vendor: str
    driver_version: str
    compute_units: int
    max_work_group_size: int
    memory_total_bytes: int
    supports_fp64: bool
    supports_fp16: bool
    threads: int = 0
    features: tuple[str, ...] = ()
    # Names the exact compiler target: device model + driver (+ arch). Part of every
    # compile-cache key, so a driver upgrade never loads a stale binary.
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"


class CompileError(RuntimeError):
    """A kernel source failed to compile; `log` is the compiler's own output."""

    def __init__(self, what: str, log: str) -> None:
        super().__init__(f"{what} failed to compile:\n{log.strip()}")
        self.what = what
        self.log = log


class LaunchError(RuntimeError):
    """A launch or transfer failed on the device (bad launch, lost device)."""


class OutOfDeviceMemory(LaunchError):
    """The device could not allocate or launch for lack of memory or resources; the
    task fails with RESOURCE_EXHAUSTED and the device stays usable."""


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of one output, as the catalog's validated call infers them."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, shape: Sequence[int], dtype: Any) -> TensorSpec:
        return cls(tuple(map(int, shape)), np.dtype(dtype))

    @functools.cached_property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def empty(self) -> np.ndarray:
        return np.empty(self.shape, self.dtype)


# --------------------------------------------------------------------------
# Allocators
# --------------------------------------------------------------------------


class Allocator(abc.ABC):
    """Device memory: opaque buffers of bytes, with the bookkeeping every backend shares.

    A backend writes `_alloc`, `_free`, `_copyin` and `_copyout` (tinygrad's shape);
    this class handles empty requests (a device buffer of `min_bytes` stands in, since
    drivers refuse zero-length allocations), the per-buffer size limit, the count of
    bytes in use, and copies of nothing. `_alloc` raises `OutOfDeviceMemory` when the
    driver refuses."""

    # Smallest buffer handed to the driver: an empty tensor still gets a real buffer,
    # which no kernel reads past its element count.
    min_bytes = 1

    def __init__(self, max_alloc: int | None = None) -> None:
        self.max_alloc = max_alloc
        self.in_use = 0
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes this allocator holds from the driver."""
        return self.in_use

    def alloc(self, nbytes: int) -> Any:
        if self.max_alloc is not None and nbytes > self.max_alloc:
            raise OutOfDeviceMemory(
                f"cannot allocate {nbytes} bytes on {self.device_name}: one buffer may hold "
                f"at most {self.max_alloc} bytes"
            )
        size = max(nbytes, self.min_bytes)
        buffer = self._acquire(size)
        with self._lock:
            self.in_use += size
            self._sizes[id(buffer)] = size
        return buffer

    def free(self, buffer: Any) -> None:
        with self._lock:
            size = self._sizes.pop(id(buffer))
            self.in_use -= size
        self._release(buffer, size)

    def copyin(self, buffer: Any, host: np.ndarray) -> None:
        """Copies a C-contiguous host array into `buffer`."""
        if host.nbytes:
            self._copyin(buffer, host)

    def copyout(self, host: np.ndarray, buffer: Any) -> None:
        """Fills the C-contiguous, writable host array from `buffer`."""
        if host.nbytes:
            self._copyout(host, buffer)

    def release_pool(self) -> None:
        """Gives pooled buffers back to the driver (none without a pool)."""
        return None

    device_name = "the device"

    # what the pool overrides: where a buffer comes from and where it goes
    def _acquire(self, size: int) -> Any:
        return self._alloc(size)

    def _release(self, buffer: Any, size: int) -> None:
        self._free(buffer)

    @abc.abstractmethod
    def _alloc(self, nbytes: int) -> Any: ...

    @abc.abstractmethod
    def _free(self, buffer: Any) -> None: ...

    @abc.abstractmethod
    def _copyin(self, buffer: Any, host: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _copyout(self, host: np.ndarray, buffer: Any) -> None: ...


class PooledAllocator(Allocator):
    """An `Allocator` that keeps freed buffers, by exact size, for the next request of
    that size (tinygrad's LRUAllocator), up to `pool_limit` bytes in all.

    Worth it where a fresh buffer costs its first touch: on PoCL, filling a new 64 MiB
    buffer ran at 1 GB/s (page faults), a reused one at memcpy speed. When the driver
    refuses an allocation, the pool is released and the allocation tried once more."""

    def __init__(self, max_alloc: int | None = None, pool_limit: int = 256 << 20) -> None:
        super().__init__(max_alloc)
        self.pool_limit = pool_limit
        self.pooled = 0
        self._pool: dict[int, list[Any]] = {}

    @property
    def held(self) -> int:
        return self.in_use + self.pooled

    def _acquire(self, size: int) -> Any:
        with self._lock:
            reusable = self._pool.get(size)
            if reusable:
                self.pooled -= size
                return reusable.pop()
        try:
            return self._alloc(size)
        except OutOfDeviceMemory:
            self.release_pool()  # the pool may be what stands in the way
            return self._alloc(size)

    def _release(self, buffer: Any, size: int) -> None:
        with self._lock:
            if self.pooled + size <= self.pool_limit:
                self._pool.setdefault(size, []).append(buffer)
                self.pooled += size
                return
        self._free(buffer)

    def release_pool(self) -> None:
        with self._lock:
            pooled = [b for buffers in self._pool.values() for b in buffers]
            self._pool.clear()
            self.pooled = 0
        for buffer in pooled:
            self._free(buffer)


# --------------------------------------------------------------------------
# Compiler, program, kernel tables
# --------------------------------------------------------------------------


class Compiler(abc.ABC):
    """Source text to a loadable binary: pure, so its result can be cached on disk."""

    @abc.abstractmethod
    def compile(self, source: str, options: Sequence[str] = (), *, name: str = "kernel") -> bytes:
        """The binary of `source` built with `options`; `name` labels the compiler's log."""


@dataclass(frozen=True)
class LaunchSize:
    """The grid of one launch, in the backend's own units (work-items on OpenCL, blocks
    and threads on CUDA, threadgroups on Metal); `wait`: block and time the kernel."""

    global_size: tuple[int, ...]
    local_size: tuple[int, ...] | None
    wait: bool


class Program(abc.ABC):
    """One kernel of a loaded binary."""

    def __call__(
        self,
        *args: Any,
        global_size: Sequence[int],
        local_size: Sequence[int] | None = None,
        wait: bool = False,
    ) -> float | None:
        """Launches; with `wait`, blocks and returns the kernel's time in seconds."""
        local = None if local_size is None else tuple(int(v) for v in local_size)
        return self.launch(args, LaunchSize(tuple(int(v) for v in global_size), local, wait))

    @abc.abstractmethod
    def launch(self, args: tuple, size: LaunchSize) -> float | None:
        """`__call__`'s work, with the sizes as tuples of ints."""


@dataclass(frozen=True)
class KernelFile:
    """One kernel source file of ``native/kernels/``: the builds it is compiled as (build
    name -> compile options) and the kernels each build holds. Every backend declares its
    kernels as a table of these (`Device.kernels`); warm-up and the source tests read the
    same table, so a kernel missing from a file, or a file missing from the table, shows
    without running anything."""

    file: str
    variants: Mapping[str, tuple[str, ...]]
    kernels: Mapping[str, tuple[str, ...]]

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.file


def kernel_table(*files: KernelFile) -> Mapping[str, KernelFile]:
    """file name -> KernelFile, read-only."""
    return types.MappingProxyType({k.file: k for k in files})


# The catalog's families of ops that backends build from one function each.
BINARY_OPS = ("add", "sub", "mul", "div")
UNARY_OPS = ("relu", "gelu", "exp", "scale")
REDUCTIONS = ("sum", "max", "mean")


def op_table(
    namespace: Mapping[str, Any],
    binary: Callable[[str], OpFn],
    unary: Callable[[str], OpFn],
    reduce: Callable[[str], OpFn],
) -> Mapping[str, OpFn]:
    """A backend's ops, catalog name -> OpFn: the function ``_op_<name>`` of `namespace`
    (the backend module's globals) where there is one, else `binary`, `unary` or `reduce`
    of the name, for the ops of their family."""
    families = dict.fromkeys(BINARY_OPS, binary) | dict.fromkeys(UNARY_OPS, unary)
    families |= dict.fromkeys(REDUCTIONS, reduce)
    table = {}
    for name in CATALOG_DTYPES:
        fn = namespace.get(f"_op_{name}")
        if fn is None and name not in families:
            raise LookupError(f"the backend defines no _op_{name} for catalog op {name!r}")
        table[name] = fn if fn is not None else families[name](name)
    return types.MappingProxyType(table)


# One op of a backend: one `OpCall` (validated inputs, normalised params, the output's
# spec from the validated call, the call's device buffers) -> a fresh C-contiguous array.
OpFn = Callable[["OpCall"], np.ndarray]


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    # np.dtype.name builds its string on every access: a few microseconds per task
    return dtype.name


@functools.lru_cache(maxsize=4096)
def _spec_of(shape: tuple[int, ...], dtype: Any) -> TensorSpec:
    # the validated calls repeat (their verdicts are cached too): so do their specs
    return TensorSpec.of(shape, dtype)


@dataclass(eq=False)
class Device(abc.ABC):
    """One device of a backend, able to run catalog ops.

    The generic part lives here: op dispatch (`run`: one signature for every backend,
    with the outputs the catalog inferred, and empty outputs answered without touching
    the device), the compile-and-load cache (`program`: compiled once per device through
    the on-disk `compile_cache`, loaded once per process) and warm-up over the backend's
    kernel table. A backend supplies `ops`, `kernels`, `compiler`, and `load`/`program_of`
    for its binaries."""

    properties: DeviceProperties
    # op -> dtypes this device runs it for; an op absent here is never sent to it
    supported: Mapping[str, frozenset[str]] = field(default_factory=dict)

    # the backend's ops (catalog name -> OpFn) and kernel files (file -> KernelFile)
    ops: ClassVar[Mapping[str, OpFn]] = types.MappingProxyType({})
    kernels: ClassVar[Mapping[str, KernelFile]] = types.MappingProxyType({})
    compiler: Compiler | None = field(default=None, init=False, repr=False)
    # dtype -> why this backend never runs it, for the error of a call that asks anyway
    missing_dtypes: ClassVar[Mapping[str, str]] = types.MappingProxyType({})

    def __post_init__(self) -> None:
        # (file, variant, kernel) -> Program, and (file, variant) -> loaded binary
        self._programs: dict[tuple[str, str, str], Program] = {}
        self._binaries: dict[tuple[str, str], Any] = {}
        self._program_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.properties.name

    def supports(self, op: str, dtype: str) -> bool:
        return dtype in self.supported.get(op, ())

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        """Why this device cannot run this particular call (beyond op and dtype), or
        None. E.g. OpenCL's fft refuses lengths that are not powers of two."""
        return None

    # -- running ---------------------------------------------------------------

    def run(
        self,
        op: str,
        inputs: Sequence[np.ndarray],
        params: Mapping[str, Any],
        outputs: Sequence[Any] | None = None,
    ) -> list[np.ndarray]:
        """Runs one catalog op on validated inputs and normalised params; returns fresh
        C-contiguous host arrays. `outputs` are the validated call's output specs (any
        objects with ``shape`` and ``dtype``); a caller without them gets them from
        `output_spec`, the same rules for an already valid call."""
        fn = self.ops.get(op)
        if fn is None:
            raise ValueError(f"the {self.properties.kind} backend has no op {op!r}")
        dtype = _dtype_name(inputs[0].dtype)
        if dtype not in self.supported.get(op, ()):
            why = self.missing_dtypes.get(dtype, f"not implemented on {self.properties.kind}")
            raise ValueError(f"{op} for {dtype} does not run on {self.name}: {why}")
        if type(self).refusal is not Device.refusal:  # only backends that refuse some calls
            reason = self.refusal(op, [x.shape for x in inputs], params)
            if reason:
                raise ValueError(reason)
        if not outputs:
            out = output_spec(op, inputs, params)
        elif isinstance(outputs[0], TensorSpec):
            out = outputs[0]
        else:
            out = _spec_of(outputs[0].shape, outputs[0].dtype)
        if out.size == 0:
            return [out.empty()]
        if any(x.size == 0 for x in inputs):
            # a non-empty output of empty inputs is a sum of nothing (sum over an empty
            # axis, matmul with K = 0, conv2d without input channels): zeros
            return [np.zeros(out.shape, out.dtype)]
        if type(self).running is Device.running:  # the task path: no per-call context
            with OpCall(self, op, inputs, params, out) as call:
                return [fn(call)]
        with OpCall(self, op, inputs, params, out) as call, self.running(call):
            return [fn(call)]

    def planned(
        self,
        op: str,
        shapes: Sequence[tuple[int, ...]],
        dtype: str,
        params: Mapping[str, Any],
        outputs: Sequence[Any],
    ) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
        """`run` for one call shape (op, input shapes and dtype, params, the validated
        outputs), its checks done once here: the returned function takes inputs of
        exactly that shape and runs them as `run` would. Raises what `run` raises for
        a call it refuses."""
        fn = self.ops.get(op)
        if fn is None:
            raise ValueError(f"the {self.properties.kind} backend has no op {op!r}")
        if dtype not in self.supported.get(op, ()):
            why = self.missing_dtypes.get(dtype, f"not implemented on {self.properties.kind}")
            raise ValueError(f"{op} for {dtype} does not run on {self.name}: {why}")
        if type(self).refusal is not Device.refusal:
            reason = self.refusal(op, list(shapes), params)
            if reason:
                raise ValueError(reason)
        out = (
            outputs[0]
            if isinstance(outputs[0], TensorSpec)
            else _spec_of(tuple(outputs[0].shape), outputs[0].dtype)
        )
        if out.size == 0:
            return lambda inputs: [out.empty()]
        if any(math.prod(shape) == 0 for shape in shapes):
            return lambda inputs: [np.zeros(out.shape, out.dtype)]  # as in `run`
        elements = out.size + sum(math.prod(shape) for shape in shapes)
        if type(self).running is Device.running or not self.needs_running(op, elements):
            return self.planned_bare(op, fn, params, out)

        def surrounded(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            with OpCall(self, op, inputs, params, out) as call, self.running(call):
                return [fn(call)]

        return surrounded

    def planned_bare(
        self, op: str, fn: OpFn, params: Mapping[str, Any], out: TensorSpec
    ) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
        """`planned`'s run of a call shape that needs no `running` context around it,
        its inputs non-empty; a backend may run some ops more directly."""

        def bare(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
            with OpCall(self, op, inputs, params, out) as call:
                return [fn(call)]

        return bare

    def needs_running(self, op: str, elements: int) -> bool:
        """Whether a call of `op` over this many elements (inputs and output together)
        needs `running` around it; a backend whose context only matters for large
        calls (the CPU's thread budget) answers False for small ones."""
        return True

    def running(self, call: OpCall) -> contextlib.AbstractContextManager[Any]:
        """What surrounds one op (the driver's context, an autorelease pool, turning
        driver errors into `LaunchError`); nothing by default."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def memory_available_bytes(self) -> int: ...

    # -- programs: compiled once per device, loaded once per process -------------

    def options(self, kernel_file: KernelFile, variant: str) -> tuple[str, ...]:
        """The compile options of one build on this device (the table's, plus whatever
        the device adds)."""
        return kernel_file.variants[variant]

    def builds(self, kernel_file: KernelFile, variant: str) -> bool:
        """Whether this device uses this build (a device without float64 skips those)."""
        return True

    def active(self) -> contextlib.AbstractContextManager[Any]:
        """What must be current to load programs (CUDA's context); nothing by default."""
        return contextlib.nullcontext()

    def program(self, file: str, variant: str, name: str) -> Program:
        """Kernel `name` of build `variant` of `file`, compiled or loaded on first use."""
        key = (file, variant, name)
        program = self._programs.get(key)
        if program is not None:
            return program
        kernel_file = self.kernels[file]
        if name not in kernel_file.kernels[variant]:
            raise ValueError(f"{file} ({variant}) has no kernel {name!r}")
        with self._program_lock:
            program = self._programs.get(key)
            if program is None:
                loaded = self._binaries.get((file, variant))
                if loaded is None:
                    loaded = self._binaries[(file, variant)] = self.build(kernel_file, variant)
                program = self._programs[key] = self.program_of(loaded, name)
        return program

    def build(self, kernel_file: KernelFile, variant: str) -> Any:
        """The loaded binary of one build: compiled through the on-disk compile cache,
        keyed on this device's fingerprint, then loaded."""
        options = self.options(kernel_file, variant)
        source = kernel_source(kernel_file.file)
        return self.load(self.compile_cached(source, options, kernel_file.file, variant), options)

    def compile_cached(
        self, source: str, options: Sequence[str], file: str, variant: str = ""
    ) -> bytes:
        """The binary of `source` for this device, from the compile cache or compiled."""
        compiler = self.compiler
        if compiler is None:
            raise CompileError(file, f"{self.properties.kind} has no compiler")
        return default_cache().get_or_compile(
            self.properties.kind,
            self.properties.fingerprint,
            source,
            tuple(options),
            lambda: compiler.compile(source, tuple(options), name=file),
            name=f"{file}:{variant}" if variant else file,
        )

    def load(self, binary: bytes, options: Sequence[str]) -> Any:
        """A compiled binary, loaded on the device (a module, a program, a library)."""
        raise NotImplementedError(f"{self.properties.kind} loads no binaries")

    def program_of(self, loaded: Any, name: str) -> Program:
        """Kernel `name` of a loaded binary."""
        raise NotImplementedError(f"{self.properties.kind} has no programs")

    def forget_programs(self) -> None:
        """Drops every loaded program (on close)."""
        with self._program_lock:
            self._programs.clear()
            self._binaries.clear()

    def warm_builds(self) -> list[tuple[KernelFile, str]]:
        """Every (file, build) of the kernel table this device uses."""
        return [
            (kernel_file, variant)
            for kernel_file in self.kernels.values()
            for variant in kernel_file.kernels
            if self.builds(kernel_file, variant)
        ]

    def warmup_steps(self) -> int:
        """How many steps `warmup` reports through its `progress`."""
        return len(self.warm_builds())

    def warmup(self, progress: Callable[[str], None] | None = None) -> None:
        """Compiles (or loads from the compile cache) every kernel `run` uses, build by
        build; `progress` hears each build's name as it starts."""
        with self.active():
            for kernel_file, variant in self.warm_builds():
                if progress is not None:
                    progress(f"{kernel_file.file}:{variant}")
                for name in kernel_file.kernels[variant]:
                    self.program(kernel_file.file, variant, name)

    def close(self) -> None:
        """Releases the device's context and memory pools."""
        self.forget_programs()


# --------------------------------------------------------------------------
# Host-side helpers every accelerator backend shares
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReductionPlan:
    """What a reduction (sum, max, mean) computes, before any device work: the output's
    shape and dtype, and x seen as C-contiguous (planes, n, cols) with n reduced."""

    axis: int | None  # normalised to 0..ndim-1; None reduces every axis
    keepdims: bool
    shape: tuple[int, ...]  # of the output
    # NumPy's output dtype: max keeps x's dtype, an integer sum is int64 and an integer
    # mean float64; float sums and means keep x's dtype
    dtype: np.dtype
    # what sums accumulate in where the device can: int64 for integers, float64 for
    # floats (exact, or far more accurate than float32); max "accumulates" in x's dtype
    acc_dtype: np.dtype
    planes: int
    n: int
    cols: int

    @property
    def outputs(self) -> int:
        return self.planes * self.cols

    @property
    def empty(self) -> bool:
        """No outputs, or an empty reduced extent: nothing for a kernel to do, and the
        answer is `np.zeros(shape, dtype)` (validation lets only sum reduce nothing)."""
        return self.planes * self.n * self.cols == 0

    def accumulator(self, fp64: bool) -> np.dtype:
        """`acc_dtype` on a device with or without float64: without it, float sums
        accumulate in float32."""
        if not fp64 and self.acc_dtype == np.float64:
            return np.dtype(np.float32)
        return self.acc_dtype


def reduction_plan(x: np.ndarray, params: Mapping[str, Any], op: str) -> ReductionPlan:
    """The plan of reduction `op` ("sum", "max" or "mean") of x with normalised params
    (``axis``: an int, possibly negative, or None; ``keepdims``)."""
    axis, keepdims = params.get("axis"), bool(params.get("keepdims", False))
    if axis is not None:
        axis %= x.ndim
    axes = range(x.ndim) if axis is None else (axis,)
    kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    shape = kept if keepdims else tuple(d for a, d in enumerate(x.shape) if a not in axes)
    if op == "max":
        dtype = acc_dtype = x.dtype
    elif x.dtype.kind == "i":
        acc_dtype = np.dtype(np.int64)
        dtype = acc_dtype if op == "sum" else np.dtype(np.float64)
    else:
        dtype, acc_dtype = x.dtype, np.dtype(np.float64)
    if axis is None:
        planes, n, cols = 1, x.size, 1
    else:
        planes, n, cols = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    return ReductionPlan(axis, keepdims, shape, dtype, acc_dtype, planes, n, cols)


def output_spec(op: str, inputs: Sequence[np.ndarray], params: Mapping[str, Any]) -> TensorSpec:
    """The output of an already valid call: what ``core.ops.validate`` infers, for callers
    that hold arrays but no validated call (warm-up, rate measurement, tests)."""
    x = inputs[0]
    if op in ("add", "sub", "mul", "div"):
        b = inputs[1]
        scalar_b = b.shape in ((), (1,))
        return TensorSpec.of(x.shape if x.shape == b.shape or scalar_b else b.shape, x.dtype)
    if op in ("sum", "max", "mean"):
        plan = reduction_plan(x, params, op)
        return TensorSpec.of(plan.shape, plan.dtype)
    if op == "matmul":
        return TensorSpec.of((*x.shape[:-1], inputs[1].shape[-1]), x.dtype)
    if op == "transpose":
        return TensorSpec.of(x.shape[::-1], x.dtype)
    if op == "conv2d":
        g = Conv2dGeometry.of(x.shape, inputs[1].shape, params)
        return TensorSpec.of((g.n, g.o, g.oh, g.ow), x.dtype)
    if op == "fft":
        return TensorSpec.of(x.shape, np.complex64)
    return TensorSpec.of(x.shape, x.dtype)  # relu, gelu, exp, scale, softmax


class CallBuffers:
    """The device buffers of one `Device.run`, all freed when it ends, whatever happens:

        with CallBuffers(allocator) as buffers:
            dx, out = buffers.upload(x), buffers.alloc(x.nbytes)
            ...
            return buffers.download(out, x.shape, x.dtype)

    Built on the `Allocator` interface alone; a backend may subclass it for per-call
    extras."""

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        self._buffers: list[Any] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for buffer in self._buffers:
            self.allocator.free(buffer)
        self._buffers.clear()

    def alloc(self, nbytes: int) -> Any:
        """A buffer of `nbytes`, freed with the others when the call ends."""
        buffer = self.allocator.alloc(nbytes)
        self._buffers.append(buffer)
        return buffer

    def upload(self, host: np.ndarray) -> Any:
        """A device copy of `host`. Kernels index dense row-major memory of native byte
        order: strided, Fortran-ordered or byte-swapped inputs are copied on the host
        first (a no-op for C-contiguous native ones)."""
        host = np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("="))
        buffer = self.alloc(host.nbytes)
        self.allocator.copyin(buffer, host)
        return buffer

    def download(self, buffer: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A fresh C-contiguous host array of `shape` and `dtype`, filled from `buffer`."""
        host = np.empty(shape, dtype)
        self.allocator.copyout(host, buffer)
        return host


class OpCall(CallBuffers):
    """One `Device.run`: the op, its validated inputs, normalised params and output spec,
    and the device buffers it allocates (all freed when it ends, whatever happens)."""

    def __init__(
        self,
        device: Device,
        op: str,
        inputs: Sequence[np.ndarray],
        params: Mapping[str, Any],
        out: TensorSpec,
    ) -> None:
        super().__init__(getattr(device, "allocator", None))
        self.device, self.op, self.inputs, self.params, self.out = device, op, inputs, params, out

    @property
    def x(self) -> np.ndarray:
        """The first input."""
        return self.inputs[0]

    def kernel(self, file: str, variant: str, name: str) -> Program:
        return self.device.program(file, variant, name)

    def upload_all(self) -> list[Any]:
        """A device copy of every input, in order."""
        return [self.upload(x) for x in self.inputs]

    def alloc_out(self) -> Any:
        """A device buffer for the output."""
        return self.alloc(self.out.nbytes)

    def result(self, buffer: Any) -> np.ndarray:
        """The output, downloaded from `buffer`."""
        return self.download(buffer, self.out.shape, self.out.dtype)

    def conv2d(self) -> Conv2dGeometry:
        return Conv2dGeometry.of(self.inputs[0].shape, self.inputs[1].shape, self.params)


@dataclass(frozen=True)
class Conv2dGeometry:
    """Every extent of a conv2d: input (n, c, h, w), weights (o, c, kh, kw), stride,
    padding, output (oh, ow)."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    oh: int
    ow: int

    @classmethod
    def of(
        cls, x: Sequence[int], weights: Sequence[int], params: Mapping[str, Any]
    ) -> Conv2dGeometry:
        (sh, sw), (ph, pw) = params["stride"], params["padding"]
        n, c, h, w = x
        o, _, kh, kw = weights
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return cls(n, c, h, w, o, kh, kw, sh, sw, ph, pw, oh, ow)

    @property
    def window(self) -> int:
        """Elements of one receptive field: c * kh * kw."""
        return self.c * self.kh * self.kw

    def astuple(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)
