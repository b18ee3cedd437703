"""grpc.health.v1.Health with every method of the current health.proto.

grpcio-health-checking's asyncio servicer answers Check and Watch but not List
(added to health.proto in 2024): the generated base class raises, so grpcurl's
`Health/List` got UNIMPLEMENTED and the server logged an ERROR traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer

from kernelmesh.core.store import Store

log = logging.getLogger(__name__)

# How often the state store is probed, and how long a probe may take.
STORE_PROBE_S = 2.0
STORE_PROBE_TIMEOUT_S = 5.0


class HealthServicer(_AsyncHealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every registered service with its status ("" is the whole server)."""
        response = health_pb2.HealthListResponse()
        for service, status in sorted(self._server_status.items()):
            response.statuses[service].status = status
        return response


class StoreWatch:
    """Readiness follows the state store: while a commit cannot go through (the
    database is down, the state dir is not writable) every service reports
    NOT_SERVING, so a load balancer sends calls elsewhere rather than have
    SubmitTask answer UNAVAILABLE; once commits go through again, SERVING."""

    def __init__(
        self,
        health: HealthServicer,
        store: Store,
        services: Callable[[], Sequence[str]],
        *,
        interval: float = STORE_PROBE_S,
        timeout: float = STORE_PROBE_TIMEOUT_S,
    ) -> None:
        self.health = health
        self.store = store
        self.services = services
        self.interval = interval
        self.timeout = timeout
        self.failing: str | None = None  # why the last probe failed
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def ok(self) -> bool:
        return self.failing is None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-watch")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stopping:
            await self.check()
            await asyncio.sleep(self.interval)

    async def check(self) -> None:
        failing = await self.store.probe(self.timeout)
        if (failing is None) == (self.failing is None):
            self.failing = failing
            return
        self.failing = failing
        if failing is None:
            log.warning("state store %s commits again: serving", self.store.where)
            status = health_pb2.HealthCheckResponse.SERVING
        else:
            log.error("state store %s cannot commit (%s): not serving", self.store.where, failing)
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services():
            await self.health.set(name, status)


__all__ = ["HealthServicer", "StoreWatch"]
