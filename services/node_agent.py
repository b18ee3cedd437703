"""The node's side of membership: register with an orchestrator from the join
list, keep the lease alive over the Heartbeat stream, obey its commands, and
move on to the next orchestrator of the list when one goes away."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence

import grpc

from kernelmesh.core import ops
from kernelmesh.core.device_monitor import DeviceMonitor
from kernelmesh.core.devices import LocalDevice
from kernelmesh.core.mesh.nodes import VERSION
from kernelmesh.services import convert, tracing
from kernelmesh.services.mesh_forward import API_KEY_ENV
from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

# Seconds between tries when no orchestrator of the join list answers.
RETRY_SECONDS = 0.5


def capabilities(devices: Sequence[LocalDevice]) -> list[orchestrator_pb2.DeviceCapability]:
    """What each device runs (every op and dtype its backend supports) and its speed."""
    catalog = ops.list_ops()
    out = []
    for device in devices:
        cap = orchestrator_pb2.DeviceCapability(
            device=device.name,
            ops=[
                f"{spec.name}:{dtype}"
                for spec in catalog
                for dtype in spec.dtypes
                if device.supports(spec.name, dtype)
            ],
        )
        if device.speed is not None:
            cap.launch_seconds = device.speed.launch_seconds
            cap.bytes_per_second = device.speed.bytes_per_second
            cap.flops_per_second = device.speed.flops_per_second
        out.append(cap)
    return out


class NodeAgent:
    """Keeps this node a member of the mesh until it is drained or stopped."""

    def __init__(
        self,
        *,
        name: str,
        address: str,
        join: Sequence[str],
        devices: Sequence[LocalDevice],
        monitor: DeviceMonitor,
        api_key: str | None = None,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not join:
            raise ValueError("a node needs at least one orchestrator address to join")
        self.name = name
        self.address = address
        self.join = list(join)
        self.devices = list(devices)
        self.monitor = monitor
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        # What the orchestrators present when they call this node (services/node_auth.py).
        self.token = token
        self.credentials = credentials
        self.drained = asyncio.Event()
        self.joined = asyncio.Event()
        self.orchestrator = ""  # the address it is joined through now
        self._task: asyncio.Task | None = None

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _registration(self) -> orchestrator_pb2.RegisterNodeRequest:
        return orchestrator_pb2.RegisterNodeRequest(
            name=self.name,
            address=self.address,
            version=VERSION,
            devices=[convert.device_to_proto(d.info, self.monitor.status(d)) for d in self.devices],
            capabilities=capabilities(self.devices),
            node_token=self.token,
        )

    async def _run(self) -> None:
        for address in itertools.cycle(self.join):
            try:
                await self._member_of(address)
            except grpc.aio.AioRpcError as exc:
                self.joined.clear()
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.error("orchestrator %s refused this node: %s", address, exc.details())
                else:
                    log.warning("orchestrator %s: %s %s", address, exc.code().name, exc.details())
            if self.drained.is_set():
                return
            await asyncio.sleep(RETRY_SECONDS)

    async def _member_of(self, address: str) -> None:
        async with tracing.aio_channel(address, credentials=self.credentials) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            reply = await stub.RegisterNode(
                self._registration(), metadata=self._metadata(), timeout=10
            )
            interval = max(0.05, reply.lease_seconds / 3) if reply.lease_seconds else 1.0
            self.orchestrator = address
            self.joined.set()
            log.info("joined the mesh through %s as %s", address, reply.node.name)
            call = stub.Heartbeat(self._beats(interval), metadata=self._metadata())
            async for command in call:
                if command.WhichOneof("command") == "drain":
                    log.info("drain requested by %s: finishing running work", address)
                    self.drained.set()
                    call.cancel()
                    return
            # The orchestrator ended the stream (it is stopping): try the next one.

    async def _beats(self, interval: float) -> AsyncIterator[orchestrator_pb2.HeartbeatRequest]:
        while True:
            statuses = [self.monitor.status(d) for d in self.devices]
            yield orchestrator_pb2.HeartbeatRequest(
                node=self.name,
                statuses=[convert.status_to_proto(s) for s in statuses],
                queue_depth=sum(s.queue_depth for s in statuses),
                running=sum(s.running for s in statuses),
            )
            await asyncio.sleep(interval)
