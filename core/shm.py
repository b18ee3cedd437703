"""Shared-memory regions registered by co-located clients (Triton's system
shared-memory extension), per tenant.

A client creates a POSIX shared-memory segment, registers it under a name, and
then names (region, offset, size) in place of tensor bytes. The server maps the
segment once at registration; inputs are read in place (zero-copy NumPy views)
and outputs written straight into it. A segment the client has unlinked (a clean
close, or its process ended and its resource tracker removed it) is dropped the
next time the registry looks at it, so a client that goes away leaves nothing
mapped behind it.

The server maps a segment for a caller only as the OS would let the caller map it
itself: the segment must be owned by the caller's OS user (`owner_uid`, which the
service finds with core.peer_uid). A server running as root would otherwise open
any user's segment. A segment registered by one tenant is refused to every other
tenant while it stays registered; the refusal reads the same as "not yours", so it
says nothing about other tenants."""

from __future__ import annotations

import _posixshmem  # CPython's shm_open, as multiprocessing.shared_memory uses it
import contextlib
import mmap
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernelmesh.core.errors import FailedPrecondition, InvalidArgument, NotFound, Violation

# Where POSIX shared memory lives on Linux; elsewhere we cannot tell a segment was
# unlinked and rely on explicit unregistering.
_SHM_DIR = "/dev/shm"
MAX_REGIONS_PER_TENANT = 64


@dataclass(frozen=True)
class OutputSlot:
    """Where a task's output goes: `byte_size` bytes at `offset` of a region."""

    region: str
    offset: int
    byte_size: int


@dataclass
class Region:
    name: str
    key: str
    byte_size: int
    segment: mmap.mmap

    def view(self, offset: int, byte_size: int, field: str) -> memoryview:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                [
                    Violation(
                        field,
                        f"offset {offset} + byte_size {byte_size} exceeds region "
                        f"{self.name!r} of {self.byte_size} bytes",
                    )
                ]
            )
        return memoryview(self.segment)[offset : offset + byte_size]

    def unlinked(self) -> bool:
        return os.path.isdir(_SHM_DIR) and not os.path.exists(os.path.join(_SHM_DIR, self.key))


def _prefer_huge_pages(segment: mmap.mmap) -> None:
    """Asks for transparent huge pages where the host allows them for shared memory
    (/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise): kernels stream a
    4 KiB-paged 256 MiB region at a third of the speed of huge-paged memory on
    virtual machines. A no-op elsewhere."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            segment.madvise(advice)


def _not_available(key: str) -> str:
    # One message for "another user's segment" and "another tenant's region": the
    # caller learns nothing it could not learn from listing /dev/shm itself.
    return (
        f"shared-memory segment {key[:128]!r} is not owned by the calling process's user "
        "or is registered by another tenant; the server maps only segments of the "
        "caller's own user"
    )


class SharedMemoryRegistry:
    """Regions by (tenant, name). Thread-safe: kernels run off the event loop."""

    def __init__(self) -> None:
        self._regions: dict[tuple[str, str], Region] = {}
        self._lock = threading.Lock()
        # Segments whose close was refused while a running task still viewed them.
        self._closing: list[mmap.mmap] = []

    def register(
        self, tenant: str, name: str, key: str, byte_size: int, *, owner_uid: int
    ) -> Region:
        """Maps segment `key` as region `name` of `tenant`, for a caller whose OS
        user is `owner_uid`."""
        violations = []
        if not name:
            violations.append(Violation("region.name", "required"))
        if not key or "/" in key.strip("/"):
            violations.append(Violation("region.key", "required: a shared-memory name"))
        if byte_size <= 0:
            violations.append(Violation("region.byte_size", "must be positive"))
        if violations:
            raise InvalidArgument(violations)
        key = key.strip("/")
        self.sweep()
        self._refuse_if_held_by_another(tenant, key)
        # Mapped directly, not through multiprocessing's SharedMemory: that would
        # register the client's segment with this process's resource tracker, which
        # unlinks it when the server exits.
        try:
            fd = _posixshmem.shm_open("/" + key, os.O_RDWR | os.O_NOFOLLOW, mode=0o600)
        except OSError as exc:
            raise FailedPrecondition(
                f"shared-memory segment {key!r} cannot be opened on the server's host "
                f"({exc.strerror or exc}); shared memory needs the client on the same host"
            ) from None
        try:
            info = os.fstat(fd)
            # Checked on the open descriptor: no window for a swap after the check.
            if info.st_uid != owner_uid or not stat.S_ISREG(info.st_mode):
                raise FailedPrecondition(_not_available(key))
            size = info.st_size
            segment = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)
        if segment is not None:
            _prefer_huge_pages(segment)
        if segment is None or size < byte_size:
            if segment is not None:
                segment.close()
            raise InvalidArgument(
                [
                    Violation(
                        "region.byte_size",
                        f"{byte_size} bytes exceed segment {key!r} of {size} bytes",
                    )
                ]
            )
        region = Region(name, key, byte_size, segment)
        with self._lock:
            if self._held_by_another(tenant, key):  # registered while this one mapped it
                segment.close()
                raise FailedPrecondition(_not_available(key))
            if (tenant, name) in self._regions:
                segment.close()
                raise InvalidArgument(
                    [Violation("region.name", f"region {name!r} is already registered")]
                )
            if sum(1 for t, _ in self._regions if t == tenant) >= MAX_REGIONS_PER_TENANT:
                segment.close()
                raise FailedPrecondition(
                    f"a tenant may register at most {MAX_REGIONS_PER_TENANT} regions; "
                    "unregister some first"
                )
            self._regions[(tenant, name)] = region
        return region

    def _held_by_another(self, tenant: str, key: str) -> bool:
        return any(t != tenant and r.key == key for (t, _), r in self._regions.items())

    def _refuse_if_held_by_another(self, tenant: str, key: str) -> None:
        with self._lock:
            if self._held_by_another(tenant, key):
                raise FailedPrecondition(_not_available(key))

    def unregister(self, tenant: str, name: str = "") -> int:
        """Drops one region (or every region of the tenant, for an empty name)."""
        with self._lock:
            keys = [k for k in self._regions if k[0] == tenant and (not name or k[1] == name)]
            if name and not keys:
                raise NotFound(f"shared-memory region {name!r} is not registered")
            dropped = [self._regions.pop(k) for k in keys]
        for region in dropped:
            self._close(region.segment)
        return len(dropped)

    def get(self, tenant: str, name: str, field: str) -> Region:
        region = self._regions.get((tenant, name))
        if region is None:
            raise InvalidArgument(
                [Violation(field, f"shared-memory region {name!r} is not registered")]
            )
        if region.unlinked():
            self.unregister(tenant, name)
            raise InvalidArgument(
                [Violation(field, f"shared-memory region {name!r} was removed by its owner")]
            )
        return region

    def list(self, tenant: str) -> list[Region]:
        self.sweep()
        return sorted(
            (r for (t, _), r in self._regions.items() if t == tenant), key=lambda r: r.name
        )

    def sweep(self) -> None:
        """Drops regions whose segment was unlinked (their client went away)."""
        with self._lock:
            gone = [k for k, r in self._regions.items() if r.unlinked()]
            dropped = [self._regions.pop(k) for k in gone]
            closing, self._closing = self._closing, []
        for region in dropped:
            self._close(region.segment)
        for segment in closing:
            self._close(segment)

    def close(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            self._close(region.segment)

    def _close(self, segment: mmap.mmap) -> None:
        try:
            segment.close()
        except BufferError:  # a running task still reads it: close it on a later sweep
            with self._lock:
                self._closing.append(segment)

    # -- tensors -------------------------------------------------------------

    def input(
        self,
        tenant: str,
        region: str,
        offset: int,
        byte_size: int,
        dtype: np.dtype,
        shape: tuple[int, ...],
        field: str,
    ) -> np.ndarray:
        """A zero-copy, read-only view of an input tensor in a region."""
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if byte_size != need:
            raise InvalidArgument(
                [
                    Violation(
                        f"{field}.byte_size",
                        f"is {byte_size}; shape {list(shape)} of {dtype.name} needs exactly {need}",
                    )
                ]
            )
        found = self.get(tenant, region, f"{field}.region")
        if offset % dtype.itemsize:
            raise InvalidArgument(
                [Violation(f"{field}.offset", f"must be a multiple of {dtype.itemsize}")]
            )
        buf = found.view(offset, byte_size, f"{field}.byte_size")
        array = np.frombuffer(buf, dtype=dtype).reshape(shape)
        array.flags.writeable = False
        return array

    def output_room(
        self, tenant: str, region: str, offset: int, byte_size: int, need: int, field: str
    ) -> memoryview:
        """Where an output of `need` bytes goes; refuses a slot that is too small."""
        if byte_size < need:
            raise InvalidArgument(
                [
                    Violation(
                        f"{field}.byte_size",
                        f"is {byte_size}; the output needs {need} bytes",
                    )
                ]
            )
        found = self.get(tenant, region, f"{field}.region")
        return found.view(offset, need, f"{field}.byte_size")

    def check_outputs(
        self,
        tenant: str,
        slots: Sequence[OutputSlot],
        outputs: Sequence[tuple[tuple[int, ...], np.dtype]],
        field: str,
    ) -> None:
        """Refuses output slots that are too few or too small for outputs of these
        shapes and dtypes (none at all: the outputs travel in the reply)."""
        if len(slots) not in (0, len(outputs)):
            raise InvalidArgument(
                [Violation(field, f"has {len(slots)} entries; the op has {len(outputs)}")]
            )
        for i, (slot, (shape, dtype)) in enumerate(zip(slots, outputs, strict=False)):
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            self.output_room(
                tenant, slot.region, slot.offset, slot.byte_size, need, f"{field}[{i}]"
            )

    def write_outputs(
        self, tenant: str, slots: Sequence[OutputSlot], outputs: Sequence[np.ndarray], field: str
    ) -> None:
        """Copies a finished task's outputs into their slots."""
        for i, (slot, out) in enumerate(zip(slots, outputs, strict=True)):
            room = self.output_room(
                tenant, slot.region, slot.offset, slot.byte_size, out.nbytes, f"{field}[{i}]"
            )
            np.copyto(np.frombuffer(room, dtype=out.dtype).reshape(out.shape), out)
