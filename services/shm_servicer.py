"""SharedMemoryService, and the shared-memory parts of the task path: inputs read
in place from a registered region, outputs written into one (core/shm.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

from kernelmesh.core import ops
from kernelmesh.core.errors import FailedPrecondition
from kernelmesh.core.peer_uid import parse_peer, peer_uid
from kernelmesh.core.shm import OutputSlot, SharedMemoryRegistry
from kernelmesh.core.tasks import Task
from kernelmesh.services import convert, paging
from kernelmesh.services.context import tenant_of
from kernelmesh.services.status import rpc
from kernelmesh.v1 import shm_pb2, shm_pb2_grpc, task_pb2, tensor_pb2

InputResolver = Callable[[tensor_pb2.SharedMemoryTensor, str], np.ndarray]


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", also
    URL-encoded as "ipv6:%5B::1%5D:5000", "unix:/path") is on this host."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    endpoint = parse_peer(peer)
    return endpoint is not None and endpoint[0].is_loopback


def require_local(context: grpc.aio.ServicerContext) -> None:
    peer = context.peer() or ""
    if not is_local_peer(peer):
        raise FailedPrecondition(
            f"shared memory needs the client on the server's host; this call came from "
            f"{peer or 'an unknown address'} (send tensor bytes instead)"
        )


def _region_proto(region) -> shm_pb2.SharedMemoryRegion:
    return shm_pb2.SharedMemoryRegion(name=region.name, key=region.key, byte_size=region.byte_size)


class SharedMemoryServicer(shm_pb2_grpc.SharedMemoryServiceServicer):
    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self.registry = registry

    @rpc
    async def RegisterSharedMemory(
        self, request: shm_pb2.RegisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> shm_pb2.RegisterSharedMemoryResponse:
        require_local(context)
        r = request.region
        tenant = tenant_of(context)
        # The OS user of the calling process: only its own segments are mapped for it.
        # Read off the event loop (a busy host's /proc/net/tcp has many rows).
        owner_uid = await asyncio.to_thread(peer_uid, context.peer() or "")
        region = self.registry.register(tenant, r.name, r.key, r.byte_size, owner_uid=owner_uid)
        if context.cancelled():  # the caller went: its connection no longer names its user
            self.registry.unregister(tenant, region.name)
            raise FailedPrecondition("the call was cancelled; the region is not registered")
        return shm_pb2.RegisterSharedMemoryResponse(region=_region_proto(region))

    @rpc
    async def UnregisterSharedMemory(
        self, request: shm_pb2.UnregisterSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> shm_pb2.UnregisterSharedMemoryResponse:
        self.registry.unregister(tenant_of(context), request.name)
        return shm_pb2.UnregisterSharedMemoryResponse()

    @rpc
    async def ListSharedMemory(
        self, request: shm_pb2.ListSharedMemoryRequest, context: grpc.aio.ServicerContext
    ) -> shm_pb2.ListSharedMemoryResponse:
        regions = self.registry.list(tenant_of(context))
        page, token = paging.page_of(regions, request.page_token, request.page_size)
        return shm_pb2.ListSharedMemoryResponse(
            regions=[_region_proto(r) for r in page], next_page_token=token
        )


def input_resolver(
    registry: SharedMemoryRegistry, context: grpc.aio.ServicerContext, tenant: str
) -> InputResolver:
    """Reads `TensorArg.shm` inputs of one call, in place."""

    def resolve(msg: tensor_pb2.SharedMemoryTensor, field: str) -> np.ndarray:
        require_local(context)
        dtype = convert.numpy_dtype(msg.dtype, f"{field}.dtype")
        convert.check_shape(msg.shape, dtype, field, ops.Limits(10**18, 10**18))
        return registry.input(
            tenant, msg.region, msg.offset, msg.byte_size, dtype, tuple(msg.shape), field
        )

    return resolve


def _slots(spec: task_pb2.TaskSpec) -> list[OutputSlot]:
    return [OutputSlot(s.region, s.offset, s.byte_size) for s in spec.output_shm]


def check_outputs(
    registry: SharedMemoryRegistry, tenant: str, spec: task_pb2.TaskSpec, task: Task
) -> None:
    """Refuses `output_shm` slots that are too small or too few, before waiting."""
    metas = [(tuple(m.shape), np.dtype(m.dtype)) for m in task.call.outputs]
    registry.check_outputs(tenant, _slots(spec), metas, "task.output_shm")


def write_outputs(
    registry: SharedMemoryRegistry,
    tenant: str,
    spec: task_pb2.TaskSpec,
    task: Task,
    reply: task_pb2.Task,
) -> None:
    """Writes a finished task's outputs into its `output_shm` slots; the reply then
    carries their dtype and shape only."""
    registry.write_outputs(tenant, _slots(spec), task.outputs, "task.output_shm")
    convert.fill_task(reply, task, full=False)  # outputs as dtype and shape only
