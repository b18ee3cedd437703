"""Shared memory for clients on the server's host (Triton's system shared-memory
extension): tensors pass through a POSIX shared-memory segment instead of the wire.

>>> with Client(target) as km:
...     region = km.shared_memory(256 << 20)      # created and registered
...     x = region.put(array)                      # copied in once
...     y = km.run("relu", x)                      # the server reads it in place
...     out = km.run_into("relu", x, outputs=[region.output(x.byte_size, x.byte_size)])
"""

from __future__ import annotations

import contextlib
import math
import mmap
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from kernelmesh.clients import tensors
from kernelmesh.clients.calls import Plan, call, rpc
from kernelmesh.v1 import shm_pb2, task_pb2, tensor_pb2

REGISTER = rpc(
    "SharedMemoryService",
    "RegisterSharedMemory",
    shm_pb2.RegisterSharedMemoryRequest,
    shm_pb2.RegisterSharedMemoryResponse,
)
UNREGISTER = rpc(
    "SharedMemoryService",
    "UnregisterSharedMemory",
    shm_pb2.UnregisterSharedMemoryRequest,
    shm_pb2.UnregisterSharedMemoryResponse,
)


@dataclass(frozen=True)
class ShmTensor:
    """A task input held in a registered region: pass it where an array goes."""

    region: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def byte_size(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to_proto(self) -> tensor_pb2.SharedMemoryTensor:
        code = tensors.to_proto(np.zeros((), self.dtype)).dtype
        return tensor_pb2.SharedMemoryTensor(
            region=self.region,
            offset=self.offset,
            byte_size=self.byte_size,
            dtype=code,
            shape=self.shape,
        )


@dataclass(frozen=True)
class ShmOutput:
    """Where the server writes one output: `byte_size` bytes at `offset`."""

    region: SharedMemoryRegion
    offset: int
    byte_size: int

    def to_proto(self) -> tensor_pb2.SharedMemoryOutput:
        return tensor_pb2.SharedMemoryOutput(
            region=self.region.name, offset=self.offset, byte_size=self.byte_size
        )


class SharedMemoryRegion:
    """A POSIX shared-memory segment this process creates and owns (it is unlinked
    on `close`, or by Python's resource tracker if the process ends first)."""

    def __init__(self, byte_size: int, name: str | None = None) -> None:
        self.segment = shared_memory.SharedMemory(create=True, size=byte_size)
        # huge pages where the host allows them for shared memory (before any page is
        # touched): kernels read 4 KiB-paged memory markedly slower on virtual machines
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.segment._mmap.madvise(advice)  # type: ignore[attr-defined]
        self.name = name or f"region-{uuid.uuid4().hex[:12]}"
        self.byte_size = byte_size

    @property
    def key(self) -> str:
        return self.segment.name

    def array(self, offset: int, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
        """A view of the region (no copy)."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        buf = self.segment.buf
        if buf is None:
            raise ValueError(f"shared-memory region {self.name} is closed")
        return np.frombuffer(buf, dtype, count, offset).reshape(shape)

    def put(self, array: np.ndarray, offset: int = 0) -> ShmTensor:
        """Copies `array` into the region at `offset`; returns the input that names it."""
        array = np.asarray(array)
        np.copyto(self.array(offset, array.dtype, array.shape), array)
        return ShmTensor(self.name, offset, array.dtype, tuple(array.shape))

    def tensor(self, offset: int, dtype: np.dtype | str, shape: tuple[int, ...]) -> ShmTensor:
        """Names data already in the region (written through `array`)."""
        return ShmTensor(self.name, offset, np.dtype(dtype), tuple(shape))

    def output(self, offset: int, byte_size: int) -> ShmOutput:
        return ShmOutput(self, offset, byte_size)

    def to_proto(self) -> shm_pb2.SharedMemoryRegion:
        return shm_pb2.SharedMemoryRegion(name=self.name, key=self.key, byte_size=self.byte_size)

    def close(self) -> None:
        """Removes the segment; arrays still viewing it keep their memory until they go."""
        with contextlib.suppress(FileNotFoundError):
            self.segment.unlink()
        try:
            self.segment.close()
        except BufferError:  # views of it are alive: the mapping goes with the last one
            self.segment._buf = None  # type: ignore[attr-defined]
            self.segment._mmap = None  # type: ignore[attr-defined]


# -- plans, for both faces ----------------------------------------------------------


def register(region: SharedMemoryRegion) -> Plan[None]:
    yield from call(REGISTER, shm_pb2.RegisterSharedMemoryRequest(region=region.to_proto()))


def unregister(name: str) -> Plan[None]:
    yield from call(UNREGISTER, shm_pb2.UnregisterSharedMemoryRequest(name=name))


def run_into(
    spec: task_pb2.TaskSpec, outputs: list[ShmOutput], timeout: float | None = None
) -> Plan[tuple[np.ndarray, ...]]:
    """Runs a task whose outputs the server writes into `outputs`; returns views of
    them in the regions."""
    from kernelmesh.clients.plans import RUN_TASK

    spec.output_shm.extend(o.to_proto() for o in outputs)
    reply = yield from call(RUN_TASK, task_pb2.RunTaskRequest(task=spec), timeout)
    return tuple(
        slot.region.array(slot.offset, tensors.dtype_name(meta.dtype), tuple(meta.shape))
        for slot, meta in zip(outputs, reply.task.outputs, strict=True)
    )
