"""grpc.health.v1.Health with every method of the current health.proto.

grpcio-health-checking's asyncio servicer answers Check and Watch but not List
(added to health.proto in 2024): the generated base class raises, so grpcurl's
`Health/List` got UNIMPLEMENTED and the server logged an ERROR traceback."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer


class HealthServicer(_AsyncHealthServicer):
    async def List(self, request, context) -> health_pb2.HealthListResponse:
        """Every registered service with its status ("" is the whole server)."""
        response = health_pb2.HealthListResponse()
        for service, status in sorted(self._server_status.items()):
            response.statuses[service].status = status
        return response


__all__ = ["HealthServicer"]
