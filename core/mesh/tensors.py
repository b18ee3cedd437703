"""Where the mesh's named tensors are: an orchestrator without devices of its
own stores an uploaded tensor on a node and keeps only this record of it (name,
tenant, dtype, shape, the node that holds it).

A task whose inputs name such tensors is placed near them (placement counts the
bytes a device elsewhere would have to receive), and its forwarded call names
them; placed elsewhere, the orchestrator moves the bytes from the holder to the
chosen node (counted in `kernelmesh_tensor_moves_total`). A node that is lost,
drained or restarted takes its tensors with it: tasks and downloads that need
one fail with FAILED_PRECONDITION naming it.

The records live in the configured Store (migration 6) as well as here: a
restarted orchestrator loads them, and another one sharing the store reads a
record it has not seen from there."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from kernelmesh.core.errors import FailedPrecondition, NotFound
from kernelmesh.core.limits import quote
from kernelmesh.core.store.base import (
    DeleteTensorLocation,
    PutTensorLocation,
    Store,
    TensorLocationRecord,
    TensorsLost,
)

log = logging.getLogger(__name__)


@dataclass
class RemoteTensor:
    name: str  # "tensors/{id}", as the holding node named it
    tenant: str
    node: str  # the node's name
    device: str  # on that node, "cpu:0"
    dtype: str
    shape: tuple[int, ...]
    lost: str = field(default="")  # why the node is gone; "" while it holds the tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def placeholder(self) -> np.ndarray:
        """An array of the tensor's dtype and shape that holds no memory (a
        broadcast scalar), for validating a task's call before it is forwarded."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)

    def check_held(self) -> None:
        if self.lost:
            raise FailedPrecondition(
                f"tensor {quote(self.name)} was held by node {self.node}, which {self.lost}; "
                "upload it again"
            )

    def record(self) -> TensorLocationRecord:
        return TensorLocationRecord(
            name=self.name,
            tenant=self.tenant,
            node=self.node,
            device=self.device,
            dtype=self.dtype,
            shape=json.dumps(list(self.shape)),
            nbytes=self.nbytes,
            lost=self.lost,
        )

    @classmethod
    def of(cls, record: TensorLocationRecord) -> RemoteTensor:
        return cls(
            name=record.name,
            tenant=record.tenant,
            node=record.node,
            device=record.device,
            dtype=record.dtype,
            shape=tuple(int(n) for n in json.loads(record.shape)),
            lost=record.lost,
        )


class TensorLocations:
    """The orchestrator's record of which node holds each tensor, written
    through to `store` when one is given."""

    def __init__(self, store: Store | None = None) -> None:
        self._items: dict[str, RemoteTensor] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self.store = store
        # Deletes a tensor on the node holding it (the orchestrator's relay sets
        # it): `discard` lets a workflow's freed intermediates go from their node.
        self.deleter: Callable[[RemoteTensor], Awaitable[None]] | None = None
        self._deleting: set[asyncio.Task[None]] = set()

    def discard(self, name: str, tenant: str) -> bool:
        """Forgets the tenant's tensor and deletes it on its node in the
        background; False when there is no record of it."""
        item = self.find(name, tenant)
        if item is None:
            return False
        self.remove(name)
        if self.deleter is not None and not item.lost:
            job = asyncio.get_running_loop().create_task(self._delete(item))
            self._deleting.add(job)
            job.add_done_callback(self._deleting.discard)
        return True

    async def _delete(self, item: RemoteTensor) -> None:
        assert self.deleter is not None
        try:
            await self.deleter(item)
        except Exception as exc:  # the node went meanwhile: its copy went with it
            log.warning("tensor %s not deleted on node %s: %s", item.name, item.node, exc)

    async def load(self) -> int:
        """The records the store keeps (at start); returns how many."""
        if self.store is None:
            return 0
        records = await self.store.tensor_locations()
        with self._lock:
            for record in records:
                self._items[record.name] = RemoteTensor.of(record)
        return len(records)

    async def refresh(self) -> None:
        """Takes in the store's records as they are now (a shared store: other
        orchestrators upload and lose tensors too), so tasks submitted here are
        placed by them. Records only here are kept (their write may not have
        committed yet); a delete elsewhere is seen by `lookup`, and by a task
        naming the tensor, which the node then refuses."""
        if self.store is None:
            return
        records = await self.store.tensor_locations()
        with self._lock:
            for record in records:
                self._items[record.name] = RemoteTensor.of(record)

    async def lookup(self, name: str, tenant: str) -> RemoteTensor | None:
        """`find`, asking a shared store (another orchestrator may have written
        or changed the record) before answering."""
        if self.store is not None and self.store.shared:
            records = await self.store.tensor_locations(name)
            with self._lock:
                if records:
                    self._items[name] = RemoteTensor.of(records[0])
                else:
                    self._items.pop(name, None)
        return self.find(name, tenant)

    async def put(self, item: RemoteTensor) -> None:
        """`add`, returning once the store has committed the record."""
        with self._lock:
            self._items[item.name] = item
        if self.store is not None:
            future = self.store.write(PutTensorLocation(item.record()), wait=True)
            if future is not None:
                await future

    async def forget(self, name: str) -> None:
        """`remove`, returning once the store has committed it."""
        with self._lock:
            self._items.pop(name, None)
        if self.store is not None:
            future = self.store.write(DeleteTensorLocation(name), wait=True)
            if future is not None:
                await future

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: RemoteTensor) -> None:
        with self._lock:
            self._items[item.name] = item
        if self.store is not None:
            self.store.write(PutTensorLocation(item.record()))

    def find(self, name: str, tenant: str) -> RemoteTensor | None:
        """The record, or None when there is none for this tenant (another
        tenant's tensor is reported exactly like a missing one)."""
        item = self._items.get(name)
        return item if item is not None and item.tenant == tenant else None

    def get(self, name: str, tenant: str) -> RemoteTensor:
        item = self.find(name, tenant)
        if item is None:
            raise NotFound(f"tensor {quote(name)} not found")
        return item

    def remove(self, name: str) -> None:
        with self._lock:
            found = self._items.pop(name, None)
        if found is not None and self.store is not None:
            self.store.write(DeleteTensorLocation(name))

    def node_gone(self, node: str, why: str, *, record: bool = True) -> int:
        """The node's tensors are gone with it; returns how many. `record`: write
        it to the store too (only the orchestrator the node heartbeats to does; one
        that merely lost sight of it in a shared store may be wrong)."""
        count = 0
        with self._lock:
            for item in self._items.values():
                if item.node == node and not item.lost:
                    item.lost = why
                    count += 1
        if record and self.store is not None:
            self.store.write(TensorsLost(node, why))
        return count

    def held_bytes(self) -> dict[str, int]:
        """Bytes of tensors per node that holds them."""
        out: dict[str, int] = {}
        for item in self._items.values():
            if not item.lost:
                out[item.node] = out.get(item.node, 0) + item.nbytes
        return out

    def choose(self, nodes: Iterable[str]) -> str | None:
        """The node a new tensor goes to: of `nodes` (those that can take one),
        the one holding the fewest bytes; ties take turns."""
        names = sorted(nodes)
        if not names:
            return None
        held = self.held_bytes()
        start = next(self._turn) % len(names)
        names = names[start:] + names[:start]
        return min(names, key=lambda n: held.get(n, 0))


def near(inputs: Mapping[int, RemoteTensor]) -> dict[str, int]:
    """Bytes of a task's stored inputs per node holding them (for placement)."""
    out: dict[str, int] = {}
    for item in inputs.values():
        if not item.lost:
            out[item.node] = out.get(item.node, 0) + item.nbytes
    return out


__all__ = ["RemoteTensor", "TensorLocations", "near"]
