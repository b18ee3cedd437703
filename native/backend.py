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

`Device.run` receives inputs already validated against the op catalog
(``kernelmesh.core.ops``) and params already normalised, exactly like ``cpu.run``; it
returns fresh C-contiguous NumPy arrays on the host.
"""

from __future__ import annotations

import abc
import functools
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

__all__ = [
    "CATALOG_DTYPES",
    "KERNEL_DIR",
    "Allocator",
    "CallBuffers",
    "CompileError",
    "Compiler",
    "Device",
    "DeviceProperties",
    "LaunchError",
    "OutOfDeviceMemory",
    "Program",
    "ReductionPlan",
    "kernel_source",
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
_NUMERIC = frozenset({"float32", "float64", "int32"})

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
        "transpose": frozenset({"float32", "float64", "int32", "complex64"}),
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


class Allocator(abc.ABC):
    """Device memory: opaque buffers of bytes."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> Any: ...

    @abc.abstractmethod
    def free(self, buffer: Any) -> None: ...

    @abc.abstractmethod
    def copyin(self, buffer: Any, host: np.ndarray) -> None:
        """Copies a C-contiguous host array into `buffer`."""

    @abc.abstractmethod
    def copyout(self, host: np.ndarray, buffer: Any) -> None:
        """Fills the C-contiguous, writable host array from `buffer`."""


class Compiler(abc.ABC):
    """Source text to a loadable binary: pure, so its result can be cached on disk."""

    @abc.abstractmethod
    def compile(self, source: str, options: Sequence[str] = ()) -> bytes: ...


class Program(abc.ABC):
    """One kernel of a loaded binary."""

    @abc.abstractmethod
    def __call__(
        self,
        *args: Any,
        global_size: Sequence[int],
        local_size: Sequence[int] | None = None,
        wait: bool = False,
    ) -> float | None:
        """Launches; with `wait`, blocks and returns the kernel's time in seconds."""


@dataclass(eq=False)
class Device(abc.ABC):
    """One device of a backend, able to run catalog ops."""

    properties: DeviceProperties
    # op -> dtypes this device runs it for; an op absent here is never sent to it
    supported: Mapping[str, frozenset[str]] = field(default_factory=dict)

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

    @abc.abstractmethod
    def run(
        self, op: str, inputs: Sequence[np.ndarray], params: Mapping[str, Any]
    ) -> list[np.ndarray]: ...

    @abc.abstractmethod
    def memory_available_bytes(self) -> int: ...

    def warmup(self) -> None:
        """Compiles (or loads from the compile cache) every kernel `run` uses."""
        return None  # a backend without a compile step has nothing to do

    def close(self) -> None:
        """Releases the device's context and memory pools."""
        return None


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
    # NumPy's output dtype: max keeps x's dtype, an int32 sum is int64 and an int32 mean
    # float64; float sums and means keep x's dtype
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
