"""Where the mesh's named tensors are: an orchestrator without devices of its
own stores an uploaded tensor on a node and keeps only this record of it (name,
tenant, dtype, shape, the node that holds it).

A task whose inputs name such tensors is placed near them (placement counts the
bytes a device elsewhere would have to receive), and its forwarded call names
them; placed elsewhere, the orchestrator moves the bytes from the holder to the
chosen node (counted in `kernelmesh_tensor_moves_total`). A node that is lost,
drained or restarted takes its tensors with it: tasks and downloads that need
one fail with FAILED_PRECONDITION naming it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from kernelmesh.core.errors import FailedPrecondition, NotFound
from kernelmesh.core.limits import quote


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


class TensorLocations:
    """The orchestrator's record of which node holds each tensor."""

    def __init__(self) -> None:
        self._items: dict[str, RemoteTensor] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: RemoteTensor) -> None:
        with self._lock:
            self._items[item.name] = item

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
            self._items.pop(name, None)

    def node_gone(self, node: str, why: str) -> int:
        """The node's tensors are gone with it; returns how many."""
        count = 0
        with self._lock:
            for item in self._items.values():
                if item.node == node and not item.lost:
                    item.lost = why
                    count += 1
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
