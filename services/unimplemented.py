"""Services whose RPCs are declared in the contract but built by later work.
Each RPC answers UNIMPLEMENTED with a message that says so."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

PLANNED = {
    "OrchestratorService": "the multi-node mesh (nodes, placement, workflows)",
}


def _stub(service: str, method: str):
    message = (
        f"kernelmesh.v1.{service}/{method} is declared in the contract but not implemented "
        f"in this release; it arrives with {PLANNED[service]}"
    )

    async def handler(self, request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = method
    return handler


def _servicer_class(base: type, descriptor: ServiceDescriptor) -> type:
    methods = {m.name: _stub(descriptor.name, m.name) for m in descriptor.methods}
    return type(f"Unimplemented{descriptor.name}", (base,), methods)


UnimplementedOrchestratorServicer = _servicer_class(
    orchestrator_pb2_grpc.OrchestratorServiceServicer,
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
)
