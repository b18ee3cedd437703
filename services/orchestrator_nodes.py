"""OrchestratorService's node RPCs: RegisterNode, Heartbeat, ListNodes, GetNode,
DrainNode. The server composes this with the service's other RPCs (API keys,
workflows) into one OrchestratorService servicer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from kernelmesh.core.devices import DeviceInfo, DeviceKind, DeviceStatus
from kernelmesh.core.errors import KernelmeshError
from kernelmesh.core.mesh.nodes import (
    Capability,
    Mesh,
    Node,
    Registration,
    check_counts,
)
from kernelmesh.core.placement import DeviceSpeed
from kernelmesh.services import convert, paging
from kernelmesh.services.status import rpc, status_of
from kernelmesh.v1 import device_pb2, orchestrator_pb2


def node_to_proto(node: Node) -> orchestrator_pb2.Node:
    msg = orchestrator_pb2.Node(
        name=node.resource_name,
        address=node.address,
        state=int(node.state),
        version=node.version,
        queue_depth=node.queue_depth,
        running=node.running,
    )
    for device in node.devices:
        status = device.reported or DeviceStatus(
            device.local_name,
            0.0,
            device.info.memory_total_bytes,
            device.info.memory_total_bytes,
            len(device.queue),
            device.running,
        )
        msg.devices.append(convert.device_to_proto(device.info, status))
        cap = device.capability
        if cap is not None:
            out = msg.capabilities.add(
                device=device.local_name, ops=sorted(f"{o}:{d}" for o, d in cap.ops)
            )
            if cap.speed is not None:
                out.launch_seconds = cap.speed.launch_seconds
                out.bytes_per_second = cap.speed.bytes_per_second
                out.flops_per_second = cap.speed.flops_per_second
    msg.last_heartbeat_time.FromNanoseconds(int(node.last_heartbeat * 1e9))
    msg.lease_expire_time.FromNanoseconds(int(node.lease_expire_wall * 1e9))
    return msg


def _device_info(msg: device_pb2.Device) -> DeviceInfo:
    return DeviceInfo(
        name=msg.name,
        kind=convert.PROTO_TO_KIND.get(msg.kind, DeviceKind.CPU),
        model=msg.model[:256],
        vendor=msg.vendor[:256],
        driver_version=msg.driver_version[:256],
        compute_units=msg.compute_units,
        threads=msg.threads,
        features=tuple(msg.features[:256]),
        memory_total_bytes=msg.memory_total_bytes,
        supports_fp64=msg.supports_fp64,
        supports_fp16=msg.supports_fp16,
        max_work_group_size=msg.max_work_group_size,
        node="",
    )


def _capability(msg: orchestrator_pb2.DeviceCapability) -> Capability:
    pairs = set()
    for entry in msg.ops[:4097]:
        op, _, dtype = entry.partition(":")
        pairs.add((op, dtype))
    speed = None
    if msg.launch_seconds > 0 and msg.bytes_per_second > 0 and msg.flops_per_second > 0:
        speed = DeviceSpeed(msg.launch_seconds, msg.bytes_per_second, msg.flops_per_second)
    return Capability(msg.device, frozenset(pairs), speed)


def _status(msg: device_pb2.DeviceStatus) -> DeviceStatus:
    return DeviceStatus(
        msg.name,
        msg.utilization,
        msg.memory_total_bytes,
        msg.memory_available_bytes,
        msg.queue_depth,
        msg.running,
    )


def registration_of(request: orchestrator_pb2.RegisterNodeRequest) -> Registration:
    return Registration(
        name=request.name,
        address=request.address,
        version=request.version,
        devices=[_device_info(d) for d in request.devices],
        capabilities=[_capability(c) for c in request.capabilities],
        token=request.node_token,
    )


class NodeRpcs:
    """A mixin for the OrchestratorService servicer: the node RPCs."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    @rpc
    async def RegisterNode(
        self, request: orchestrator_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RegisterNodeResponse:
        # Sizes first: nothing per device is built for a request that claims too much.
        check_counts(len(request.devices), len(request.capabilities))
        record = ""
        if self.mesh.store is not None:
            from kernelmesh.services.mesh_sync import encode

            record = encode(request)
        node = self.mesh.register(registration_of(request), record)
        return orchestrator_pb2.RegisterNodeResponse(
            node=node_to_proto(node),
            heartbeat_interval_seconds=max(1, int(self.mesh.heartbeat_seconds)),
            lease_seconds=self.mesh.lease_seconds,
        )

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[orchestrator_pb2.HeartbeatRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[orchestrator_pb2.HeartbeatResponse]:
        """Each request renews the node's lease; commands (drain) flow back."""
        node: Node | None = None
        sender: asyncio.Task | None = None
        replies: asyncio.Queue = asyncio.Queue()

        async def relay(n: Node) -> None:
            while True:
                command = await n.commands.get()
                if command == "drain":
                    replies.put_nowait(orchestrator_pb2.HeartbeatResponse(drain=True))
                else:
                    replies.put_nowait(orchestrator_pb2.HeartbeatResponse(cancel_task=command))

        async def read() -> None:
            nonlocal node, sender
            try:
                async for req in request_iterator:
                    try:
                        current = self.mesh.heartbeat(
                            req.node.removeprefix("nodes/"),
                            req.queue_depth,
                            req.running,
                            [_status(s) for s in req.statuses[:256]],
                        )
                    except KernelmeshError as exc:
                        replies.put_nowait(exc)
                        return
                    if current is not node:
                        node = current
                        if sender is not None:
                            sender.cancel()
                        sender = asyncio.create_task(relay(node))
                        if node.state.name == "DRAINING":
                            replies.put_nowait(orchestrator_pb2.HeartbeatResponse(drain=True))
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await replies.get()
                if item is None:
                    return
                if isinstance(item, KernelmeshError):
                    await context.abort_with_status(status_of(item))
                yield item
        finally:
            reader.cancel()
            if sender is not None:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @rpc
    async def ListNodes(
        self, request: orchestrator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListNodesResponse:
        nodes = self.mesh.list()
        page, token = paging.page_of(nodes, request.page_token, request.page_size)
        return orchestrator_pb2.ListNodesResponse(
            nodes=[node_to_proto(n) for n in page], next_page_token=token
        )

    @rpc
    async def GetNode(
        self, request: orchestrator_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetNodeResponse:
        return orchestrator_pb2.GetNodeResponse(node=node_to_proto(self.mesh.get(request.name)))

    @rpc
    async def DrainNode(
        self, request: orchestrator_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.DrainNodeResponse:
        return orchestrator_pb2.DrainNodeResponse(node=node_to_proto(self.mesh.drain(request.name)))
