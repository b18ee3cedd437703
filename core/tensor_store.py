"""Named tensors kept on the node ("tensors/{id}") so a later task or a
download reads them without a round trip through the client. With a `Store`
attached, every put and delete is journaled, and `restore` brings them back
after a restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from kernelmesh.core.errors import NotFound, ResourceExhausted
from kernelmesh.core.limits import TenantLedger, quote
from kernelmesh.core.store import Store, TensorRecord
from kernelmesh.core.store.base import DeleteTensor, PutTensor

PREFIX = "tensors/"
_ZERO = bytes(16)  # one element of any dtype


@dataclass(frozen=True)
class StoredTensor:
    name: str
    tenant: str
    device: str
    array: np.ndarray

    @property
    def size_bytes(self) -> int:
        return int(self.array.nbytes)

    def hollow(self) -> StoredTensor:
        """The reference without its bytes (its array a read-only zero-stride
        stand-in of the same dtype and shape): what a finished task keeps, so the
        tensor's memory goes when the tensor is deleted."""
        array = self.array
        stand_in = np.ndarray(array.shape, array.dtype, _ZERO, strides=(0,) * array.ndim)
        return replace(self, array=stand_in)


class TensorStore:
    """A byte-bounded, tenant-scoped in-memory store of named tensors."""

    def __init__(self, max_bytes: int, ledger: TenantLedger | None = None) -> None:
        self.max_bytes = max_bytes
        # Per-tenant byte quotas, shared with the tasks that hold inputs and outputs.
        self.ledger = ledger or TenantLedger()
        self._items: dict[str, StoredTensor] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.journal: Store | None = None
        # unfinished tasks reading each named tensor, and the bytes of deleted
        # tensors that such tasks still hold
        self._pins: dict[str, int] = {}
        self._held_after_delete: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def reserve_check(self, nbytes: int) -> None:
        """Refuses before allocating when nbytes would not fit."""
        if self._bytes + nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"tensor store is full: {self._bytes} of {self.max_bytes} bytes used, "
                f"{nbytes} more requested; delete tensors with DeleteTensor",
                retry_after=5.0,
            )

    def put(
        self, array: np.ndarray, *, tenant: str, device: str = "cpu:0", reserved: bool = False
    ) -> StoredTensor:
        """`reserved`: the tenant's ledger already holds these bytes (an upload
        reserves chunk by chunk as they arrive)."""
        with self._lock:
            self.reserve_check(array.nbytes)
            if not reserved:
                self.ledger.reserve(tenant, array.nbytes)
            name = PREFIX + uuid.uuid4().hex
            item = StoredTensor(name=name, tenant=tenant, device=device, array=array)
            self._items[name] = item
            self._bytes += array.nbytes
        if self.journal is not None:
            self.journal.write(PutTensor(_record(item), np.ascontiguousarray(array).tobytes()))
        return item

    def restore(self, records: list[TensorRecord], blobs: dict[str, bytes]) -> int:
        """Brings back journaled tensors (at start); returns how many."""
        restored = 0
        for record in records:
            data = blobs.get(record.name)
            if data is None:
                continue
            array = np.frombuffer(data, dtype=record.dtype).reshape(json.loads(record.shape))
            with self._lock:
                self._items[record.name] = StoredTensor(
                    record.name, record.tenant, record.device, array
                )
                self._bytes += array.nbytes
            # admitted before the restart: counted again, never refused
            self.ledger.reserve(record.tenant, array.nbytes, enforce=False)
            restored += 1
        return restored

    def get(self, name: str, *, tenant: str) -> StoredTensor:
        item = self._items.get(name)
        # Another tenant's tensor is reported exactly like a missing one.
        if item is None or item.tenant != tenant:
            raise NotFound(f"tensor {quote(name)} not found")
        return item

    def delete(self, name: str, *, tenant: str) -> None:
        """Forgets the name at once. While unfinished tasks read the tensor (`pin`)
        its bytes stay charged, to the tenant and the store, and go with the last
        `unpin`: those tasks hold its memory, and releasing it here would let a
        tenant delete and upload again past its quota."""
        with self._lock:
            item = self.get(name, tenant=tenant)
            del self._items[name]
            if self._pins.get(name):
                self._held_after_delete[name] = item.size_bytes
            else:
                self._free(tenant, item.size_bytes)
        if self.journal is not None:
            self.journal.write(DeleteTensor(name))

    def pin(self, names: tuple[str, ...]) -> None:
        """Counts a reader of each named tensor (a task admitted with them as
        inputs); tasks are charged for their other inputs and outputs only."""
        with self._lock:
            for name in names:
                self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, tenant: str, names: tuple[str, ...]) -> None:
        with self._lock:
            for name in names:
                left = self._pins.get(name, 0) - 1
                if left > 0:
                    self._pins[name] = left
                    continue
                self._pins.pop(name, None)
                nbytes = self._held_after_delete.pop(name, None)
                if nbytes is not None:
                    self._free(tenant, nbytes)

    def _free(self, tenant: str, nbytes: int) -> None:
        self._bytes -= nbytes
        self.ledger.release(tenant, nbytes)


def _record(item: StoredTensor) -> TensorRecord:
    return TensorRecord(
        name=item.name,
        tenant=item.tenant,
        device=item.device,
        dtype=item.array.dtype.name,
        shape=json.dumps(list(item.array.shape)),
        nbytes=item.size_bytes,
        create_time=time.time(),
    )
