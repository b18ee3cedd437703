"""Membership of the mesh: the nodes that joined this orchestrator, their
devices as the placement sees them, and their leases.

A node registers (name, address, version, devices and what each runs), then
renews a lease with heartbeats. A node whose lease runs out is LOST: its
devices leave placement, the tasks queued for them are placed again, and the
attempts it was running are cancelled here and run again elsewhere as new
attempts (a late answer from the lost attempt is fenced off by the attempt
number). A drained node takes no new work; once its running attempts have
finished it leaves the mesh.

The gRPC call that forwards an attempt to a node lives in `services`
(`Forward`); this module only decides and keeps the books."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelmesh.core import metrics
from kernelmesh.core.devices import DeviceInfo, DeviceKind, DeviceStatus, LocalDevice
from kernelmesh.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    KernelmeshError,
    NotFound,
    Violation,
)
from kernelmesh.core.mesh.tensors import TensorLocations
from kernelmesh.core.placement import DeviceSpeed
from kernelmesh.core.store.base import NodeRecord, PutNode, RenewNode, Store

if TYPE_CHECKING:
    from kernelmesh.core.tasks import Task, TaskFailure, TaskManager

log = logging.getLogger(__name__)

VERSION = "0.1.0"
NODE_PREFIX = "nodes/"
# Bounds on what a node may claim about itself: RegisterNode beyond them is
# refused before anything is built from it.
MAX_DEVICES = 256
MAX_OPS_PER_DEVICE = 4096
MAX_NAME = 63
MAX_ADDRESS = 255
MAX_FIELD = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")
# Lost nodes stay listed (state LOST) until they rejoin or this many are kept.
MAX_LOST_KEPT = 1000


class NodeState(IntEnum):
    """Values match kernelmesh.v1.NodeState."""

    READY = 1
    DRAINING = 2
    LOST = 3


class NodeLost(Exception):
    """The node running an attempt is gone (lease expired, connection broken,
    shutting down): the attempt goes back to the queue."""


class AttemptFailed(Exception):
    """The node answered with a failure (or a result that was refused)."""

    def __init__(self, failure: TaskFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


# Sends one attempt of `task` to the node of `device`; returns the outputs.
Forward = Callable[["RemoteDevice", "Task"], Awaitable[list[np.ndarray]]]


@dataclass(frozen=True)
class Capability:
    device: str  # the name on its node, "cpu:0"
    ops: frozenset[tuple[str, str]]  # (op, dtype)
    speed: DeviceSpeed | None


def kind_refusal(kind: DeviceKind, op: str, shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Why any device of this kind refuses a call, by its shapes alone: the rules
    of native/opencl.py and native/metal.py `refusal` that hold on every such
    device (tests/core/test_placement.py checks them against a real OpenCL one)."""
    if kind in (DeviceKind.OPENCL, DeviceKind.METAL) and op == "fft" and shapes and shapes[0]:
        n = shapes[0][-1]
        if n > 0 and n & (n - 1):
            return f"fft on {kind.value} needs a power-of-two length, got {n}"
    if kind is DeviceKind.METAL:
        largest = max((math.prod(shape) for shape in shapes), default=0)
        if largest >= 1 << 32:  # its kernels index with 32-bit uints
            return f"a tensor of {largest} elements is over Metal kernels' 2**32 index range"
    return None


@dataclass(eq=False)
class RemoteDevice(LocalDevice):
    """A device of another node, as placement sees it: named "node/kind:i",
    with this orchestrator's queue for it. Its attempts are forwarded."""

    node: Node | None = None
    local_name: str = ""
    capability: Capability | None = None
    reported: DeviceStatus | None = None
    # Set when the node leaves placement (lost or draining): workers stop.
    gone: bool = False
    lost_reason: str = ""
    remote = True

    def supports(self, op: str, dtype: str) -> bool:
        return self.capability is not None and (op, dtype) in self.capability.ops

    def refusal(
        self, op: str, shapes: Sequence[tuple[int, ...]], params: Mapping[str, Any]
    ) -> str | None:
        """The shape limits its kind always has (the node's device refuses the
        same): placed there anyway, the node answered FAILED_PRECONDITION and the
        task failed although another node could run it. Limits that depend on
        the node's set-up (CUDA's fft without CuPy, a Metal device's largest
        buffer) are the node's to check."""
        why = kind_refusal(self.info.kind, op, shapes)
        return f"{why} on {self.name}" if why else None

    def run(
        self,
        op: str,
        inputs: Sequence[np.ndarray],
        params: Mapping[str, Any],
        outputs: Sequence[Any] | None = None,
    ) -> list[np.ndarray]:
        raise RuntimeError("a remote device runs attempts through forward()")

    def memory_available_bytes(self) -> int:
        if self.reported is not None:
            return self.reported.memory_available_bytes
        return self.info.memory_total_bytes

    async def forward(self, task: Task) -> list[np.ndarray]:
        assert self.node is not None
        return await self.node.mesh.forward(self, task)


@dataclass(eq=False)
class Node:
    mesh: Mesh
    name: str
    address: str
    version: str
    devices: list[RemoteDevice]
    state: NodeState = NodeState.READY
    lease_until: float = 0.0  # time.monotonic()
    last_heartbeat: float = field(default_factory=time.time)
    lease_expire_wall: float = 0.0
    queue_depth: int = 0
    running: int = 0
    # Commands for the heartbeat stream, read by the node's open stream.
    commands: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    # Forwarded attempts in flight, cancelled if the node is lost.
    inflight: set[asyncio.Future[Any]] = field(default_factory=set)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    # Joined to another orchestrator on the shared store: placed here, its lease
    # read from the store.
    foreign: bool = False
    # Presented on every forwarded call (a node with --auth refuses calls without it).
    token: str = field(default="", repr=False)

    @property
    def resource_name(self) -> str:
        return NODE_PREFIX + self.name


def _bad(field_: str, description: str) -> InvalidArgument:
    return InvalidArgument([Violation(field_, description)])


@dataclass(frozen=True)
class Registration:
    """A RegisterNode request, as plain values (the servicer converts)."""

    name: str
    address: str
    version: str
    devices: Sequence[DeviceInfo]
    capabilities: Sequence[Capability]
    # What the node admits forwarded calls with (it made it; see services/node_auth.py).
    token: str = ""

    def check(self, version: str) -> None:
        if not _NAME_RE.match(self.name or ""):
            raise _bad(
                "name",
                f"a node name: 1-{MAX_NAME} letters, digits, '_', '.', '-', "
                "starting with a letter or digit",
            )
        if len(self.address) > MAX_ADDRESS or not _ADDRESS_RE.match(self.address):
            raise _bad("address", "host:port the orchestrator can reach the node at")
        if len(self.token) > MAX_FIELD:
            raise _bad("node_token", f"at most {MAX_FIELD} characters")
        if self.version != version:
            raise FailedPrecondition(
                f"version skew: node {self.name!r} runs kernelmesh {self.version or '(unset)'} "
                f"and this orchestrator runs {version}; run the same version on both"
            )


def check_counts(devices: int, capabilities: int) -> None:
    """Cheap checks on sizes, before any per-device object is built."""
    if devices > MAX_DEVICES:
        raise _bad("devices", f"at most {MAX_DEVICES} devices per node (got {devices})")
    if capabilities > MAX_DEVICES:
        raise _bad("capabilities", f"at most {MAX_DEVICES} entries (got {capabilities})")


def placeholder(name: str) -> RemoteDevice:
    """Stands for a device no longer in the mesh (a restored task's), so its name
    is kept; it is gone, so a task on it is placed again."""
    node, _, local = name.rpartition("/")
    kind = local.partition(":")[0]
    info = DeviceInfo(
        name=name,
        kind=DeviceKind(kind) if kind in {k.value for k in DeviceKind} else DeviceKind.CPU,
        model="",
        vendor="",
        driver_version="",
        compute_units=0,
        threads=0,
        features=(),
        memory_total_bytes=0,
        supports_fp64=False,
        supports_fp16=False,
        max_work_group_size=0,
        node=node,
    )
    return RemoteDevice(info=info, backend=None, local_name=local, gone=True)  # type: ignore[arg-type]


class Mesh:
    """The nodes of this orchestrator and their leases."""

    def __init__(
        self,
        tasks: TaskManager,
        forward: Forward,
        *,
        lease_seconds: float = 10.0,
        version: str = VERSION,
    ) -> None:
        self.tasks = tasks
        self.forward = forward
        self.lease_seconds = lease_seconds
        self.version = version
        self.nodes: dict[str, Node] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # A store shared with other orchestrators (PostgreSQL): node records and
        # their leases are written there, under this orchestrator's id.
        self.store: Store | None = None
        self.owner = ""
        self.changed = asyncio.Event()  # set on every membership change (WatchDevices)
        # The tensors the nodes hold for an orchestrator without devices of its own:
        # a node that goes takes its tensors with it.
        self.tensors: TensorLocations | None = None

    @property
    def heartbeat_seconds(self) -> float:
        return max(0.05, self.lease_seconds / 3)

    async def start(self) -> None:
        metrics.NODES.set_function(
            lambda: sum(n.state is not NodeState.LOST for n in self.nodes.values())
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # -- membership -------------------------------------------------------

    def register(self, reg: Registration, record: str = "") -> Node:
        """A node joins through this orchestrator. `record` (the request, as the
        servicer encodes it) is kept in a shared store for the other orchestrators."""
        reg.check(self.version)
        node = self._join(reg, foreign=False)
        if self.store is not None:
            self.store.write(
                PutNode(
                    NodeRecord(reg.name, self.owner, reg.address, record, node.lease_expire_wall)
                )
            )
        return node

    def sync_foreign(self, entries: Sequence[tuple[NodeRecord, Registration]]) -> None:
        """Nodes joined to the other orchestrators of the shared store: placed here
        too, while their lease in the store holds."""
        now = time.time()
        for record, reg in entries:
            if record.orchestrator == self.owner or record.lease_until <= now:
                continue
            node = self.nodes.get(record.name)
            if node is not None and node.state is not NodeState.LOST:
                if not node.foreign:
                    continue  # it heartbeats here: this orchestrator knows best
                if node.address == record.address and node.token == reg.token:
                    node.lease_until = time.monotonic() + (record.lease_until - now)
                    node.lease_expire_wall = record.lease_until
                    continue
            try:
                reg.check(self.version)
                node = self._join(reg, foreign=True)
            except KernelmeshError as exc:
                log.warning("node %s in the store is not usable here: %s", record.name, exc)
                continue
            node.lease_until = time.monotonic() + (record.lease_until - now)
            node.lease_expire_wall = record.lease_until

    def _join(self, reg: Registration, *, foreign: bool) -> Node:
        by_device = {c.device: c for c in reg.capabilities}
        seen: set[str] = set()
        devices: list[RemoteDevice] = []
        for i, info in enumerate(reg.devices):
            if not info.name or len(info.name) > MAX_FIELD or info.name in seen:
                raise _bad(f"devices[{i}].name", "a unique device name such as 'cpu:0'")
            seen.add(info.name)
            cap = by_device.get(info.name)
            if cap is not None and len(cap.ops) > MAX_OPS_PER_DEVICE:
                raise _bad("capabilities", f"at most {MAX_OPS_PER_DEVICE} ops per device")
            qualified = f"{reg.name}/{info.name}"
            devices.append(
                RemoteDevice(
                    info=DeviceInfo(**{**info.__dict__, "name": qualified, "node": reg.name}),
                    backend=None,  # type: ignore[arg-type]
                    speed=cap.speed if cap else None,
                    local_name=info.name,
                    capability=cap,
                )
            )
        old = self.nodes.get(reg.name)
        if old is not None and old.state is not NodeState.LOST:
            if old.foreign and old.address == reg.address:
                # The same process, now joined here: its running attempts go on.
                old.state = NodeState.LOST
                self.tasks.remove_devices(old.devices)
            else:
                # A restarted node rejoins under its name: the old incarnation's
                # work is as lost as its process.
                self._lose(old, "the node registered again (restarted)")
        node = Node(
            self, reg.name, reg.address, reg.version, devices, foreign=foreign, token=reg.token
        )
        for device in devices:
            device.node = node
        self.nodes.pop(reg.name, None)
        self.nodes[reg.name] = node
        self._renew(node)
        self.tasks.add_devices(devices)
        self._trim_lost()
        self.changed.set()
        log.info(
            "node %s joined from %s with %s",
            reg.name,
            reg.address,
            ", ".join(d.name for d in devices) or "no devices",
        )
        return node

    def heartbeat(
        self, name: str, queue_depth: int, running: int, statuses: Sequence[DeviceStatus]
    ) -> Node:
        node = self.nodes.get(name)
        if node is None or node.state is NodeState.LOST:
            raise NotFound(
                f"node {name!r} is not registered here (its lease may have expired); register again"
            )
        node.queue_depth = queue_depth
        node.running = running
        by_name = {d.local_name: d for d in node.devices}
        for status in statuses:
            device = by_name.get(status.name)
            if device is not None:
                device.reported = status
        self._renew(node)
        if self.store is not None:
            self.store.write(RenewNode(name, self.owner, node.lease_expire_wall))
        return node

    def _renew(self, node: Node) -> None:
        node.lease_until = time.monotonic() + self.lease_seconds
        node.last_heartbeat = time.time()
        node.lease_expire_wall = node.last_heartbeat + self.lease_seconds

    def get(self, name: str) -> Node:
        key = name.removeprefix(NODE_PREFIX)
        node = self.nodes.get(key)
        if node is None:
            raise NotFound(f"node {name!r} not found (nodes: {', '.join(self.nodes) or 'none'})")
        return node

    def list(self) -> list[Node]:
        return sorted(self.nodes.values(), key=lambda n: n.name)

    def drain(self, name: str) -> Node:
        """No new work for the node; its running attempts finish, then it leaves."""
        node = self.get(name)
        if node.state is NodeState.READY:
            node.state = NodeState.DRAINING
            self.tasks.remove_devices(node.devices)
            node.commands.put_nowait("drain")
            asyncio.get_running_loop().create_task(self._leave_when_idle(node))
            self.changed.set()
            log.info("node %s draining", node.name)
        return node

    async def _leave_when_idle(self, node: Node) -> None:
        while node.inflight and node.state is NodeState.DRAINING:
            await asyncio.wait(set(node.inflight))
        if node.state is NodeState.DRAINING and self.nodes.get(node.name) is node:
            del self.nodes[node.name]
            node.drained.set()
            self.changed.set()
            self._tensors_gone(node, "was drained and left the mesh")
            log.info("node %s drained and left the mesh", node.name)

    # -- leases -----------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.lease_seconds / 4))
            self.sweep()

    def sweep(self) -> builtins.list[Node]:
        """Declares LOST every node whose lease has run out."""
        now = time.monotonic()
        lost = [
            n for n in self.nodes.values() if n.state is not NodeState.LOST and n.lease_until < now
        ]
        for node in lost:
            self._lose(node, f"no heartbeat for {self.lease_seconds:g}s (lease expired)")
        return lost

    def unreachable(self, node: Node, reason: str) -> None:
        """A forwarded call found the node unreachable: it is LOST at once."""
        if node.state is not NodeState.LOST and self.nodes.get(node.name) is node:
            self._lose(node, reason)

    def _lose(self, node: Node, reason: str) -> None:
        was = node.state
        node.state = NodeState.LOST
        log.warning("node %s lost: %s", node.name, reason)
        metrics.NODES_LOST.inc(())
        for device in node.devices:
            device.lost_reason = reason
        if was is NodeState.READY:
            self.tasks.remove_devices(node.devices)
        for future in list(node.inflight):
            future.cancel()
        node.drained.set()
        self.changed.set()
        self._tensors_gone(node, f"was lost ({reason})")

    def _tensors_gone(self, node: Node, why: str) -> None:
        if self.tensors is not None:
            count = self.tensors.node_gone(node.name, why, record=not node.foreign)
            if count:
                log.warning("node %s took %d stored tensors with it", node.name, count)

    def _trim_lost(self) -> None:
        lost = [k for k, n in self.nodes.items() if n.state is NodeState.LOST]
        for key in lost[: max(0, len(lost) - MAX_LOST_KEPT)]:
            del self.nodes[key]

    # -- the mesh's devices -----------------------------------------------

    def devices(self) -> builtins.list[RemoteDevice]:
        return [d for n in self.list() if n.state is not NodeState.LOST for d in n.devices]


__all__ = [
    "VERSION",
    "AttemptFailed",
    "Capability",
    "Forward",
    "Mesh",
    "Node",
    "NodeLost",
    "NodeState",
    "Registration",
    "RemoteDevice",
    "check_counts",
]
