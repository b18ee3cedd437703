"""UploadTensor, DownloadTensor and DeleteTensor on an orchestrator without
devices of its own: the tensor is stored on a node (the one holding the fewest
bytes), the orchestrator keeps only where it is (core/mesh/tensors.py), and
downloads and deletes are relayed to that node. Chunks pass through as they
arrive; nothing is buffered here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kernelmesh.core import ops
from kernelmesh.core.errors import InvalidArgument, Unavailable, Violation
from kernelmesh.core.limits import Quotas
from kernelmesh.core.mesh.nodes import Mesh, Node, NodeState
from kernelmesh.core.mesh.tensors import RemoteTensor, TensorLocations
from kernelmesh.services import convert
from kernelmesh.services.mesh_forward import Forwarder
from kernelmesh.v1 import task_pb2

# What a relayed error keeps of the node's answer: the rich error details.
_DETAILS = "grpc-status-details-bin"


class TensorRelay:
    def __init__(
        self,
        mesh: Mesh,
        forwarder: Forwarder,
        locations: TensorLocations,
        limits: ops.Limits,
        quotas: Quotas,
    ) -> None:
        self.mesh = mesh
        self.forwarder = forwarder
        self.locations = locations
        self.limits = limits
        self.quotas = quotas
        locations.deleter = self.delete_on_node

    async def delete_on_node(self, item: RemoteTensor) -> None:
        """Deletes a tensor the orchestrator let go of (a workflow's intermediate)
        on the node holding it; one that is gone already is fine."""
        node = self.mesh.nodes.get(item.node)
        if node is None or node.state is NodeState.LOST:
            return
        try:
            await self.forwarder.stub(node).DeleteTensor(
                task_pb2.DeleteTensorRequest(name=item.name),
                metadata=self.forwarder.metadata(node, item.tenant),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def holds(self, name: str, tenant: str) -> bool:
        return await self.locations.lookup(name, tenant) is not None

    def _holder(self) -> Node:
        ready = {
            n.name: n
            for n in self.mesh.list()
            if n.state is NodeState.READY and not n.foreign and n.devices
        }
        chosen = self.locations.choose(ready)
        if chosen is None:
            raise Unavailable("no node has joined to store the tensor; retry once one has")
        return ready[chosen]

    async def upload(
        self,
        requests: AsyncIterator[task_pb2.UploadTensorRequest],
        tenant: str,
        context: grpc.aio.ServicerContext,
    ) -> task_pb2.UploadTensorResponse:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "header":
            problem = "the stream was empty" if first is None else "must come first"
            raise InvalidArgument([Violation("header", problem)])
        dtype = convert.numpy_dtype(first.header.dtype, "header.dtype")
        convert.check_shape(first.header.shape, dtype, "header", self.limits, self.quotas.max_dims)
        node = self._holder()

        async def parts() -> AsyncIterator[task_pb2.UploadTensorRequest]:
            yield first
            async for request in requests:
                yield request

        try:
            reply = await self.forwarder.stub(node).UploadTensor(
                parts(),
                metadata=self.forwarder.metadata(node, tenant),
                timeout=context.time_remaining(),
            )
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, exc)
        ref = reply.tensor
        await self.locations.put(
            RemoteTensor(
                name=ref.name,
                tenant=tenant,
                node=node.name,
                device=ref.device,
                dtype=dtype.name,
                shape=tuple(ref.shape),
            )
        )
        ref.device = f"{node.name}/{ref.device}"
        return reply

    async def download(
        self, request: task_pb2.DownloadTensorRequest, tenant: str, context
    ) -> AsyncIterator[task_pb2.DownloadTensorResponse]:
        item = self.locations.get(request.name, tenant)
        item.check_held()
        node = self.mesh.nodes.get(item.node)
        if node is None or node.state is NodeState.LOST:
            # Not (yet) joined here: this orchestrator restarted and the node has
            # not rejoined, or it is joined to another orchestrator of the store.
            raise Unavailable(
                f"tensor {request.name} is held by node {item.node}, which is not "
                "connected to this orchestrator now; retry"
            )
        call = self.forwarder.stub(node).DownloadTensor(
            request,
            metadata=self.forwarder.metadata(node, tenant),
            timeout=context.time_remaining(),
        )
        try:
            async for part in call:
                if part.WhichOneof("part") == "header":
                    part.header.device = f"{node.name}/{part.header.device}"
                yield part
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, exc)

    async def delete(self, name: str, tenant: str, context) -> None:
        item = self.locations.get(name, tenant)
        node = self.mesh.nodes.get(item.node)
        if not item.lost and node is not None:
            try:
                await self.forwarder.stub(node).DeleteTensor(
                    task_pb2.DeleteTensorRequest(name=name),
                    metadata=self.forwarder.metadata(node, tenant),
                    timeout=context.time_remaining(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    await _relay_error(context, exc)
        await self.locations.forget(name)


async def _relay_error(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError):
    """Ends the call with the node's status, details and all."""
    trailing = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k == _DETAILS)
    await context.abort(exc.code(), exc.details() or "", trailing)


__all__ = ["TensorRelay"]
