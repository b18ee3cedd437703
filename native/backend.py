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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Allocator",
    "CompileError",
    "Compiler",
    "Device",
    "DeviceProperties",
    "LaunchError",
    "OutOfDeviceMemory",
    "Program",
]


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
