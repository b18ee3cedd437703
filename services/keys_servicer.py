"""OrchestratorService's API key RPCs (Create, List, Revoke). The other
OrchestratorService RPCs (nodes, workflows) still answer UNIMPLEMENTED until
the mesh arrives."""

from __future__ import annotations

import grpc

from kernelmesh.core.api_keys import ApiKeyRecord, Role
from kernelmesh.core.auth import KEY_PREFIX, KeyRing
from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.limits import quote
from kernelmesh.services import convert, paging
from kernelmesh.services.context import check_tenant
from kernelmesh.services.status import rpc
from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

ROLE_FROM_PROTO = {
    orchestrator_pb2.API_KEY_ROLE_ADMIN: Role.ADMIN,
    orchestrator_pb2.API_KEY_ROLE_USER: Role.USER,
    orchestrator_pb2.API_KEY_ROLE_NODE: Role.NODE,
}
ROLE_TO_PROTO = {v: k for k, v in ROLE_FROM_PROTO.items()}


def _timestamp(target, seconds: float | None) -> None:
    if seconds is not None:
        target.FromNanoseconds(int(seconds * 1e9))


def key_to_proto(record: ApiKeyRecord) -> orchestrator_pb2.ApiKey:
    """Everything but the secret, which is never stored."""
    msg = orchestrator_pb2.ApiKey(
        name=KEY_PREFIX + record.key_id,
        tenant=record.tenant,
        role=ROLE_TO_PROTO[record.role],
        label=record.label,
    )
    _timestamp(msg.create_time, record.created_at)
    _timestamp(msg.expire_time, record.expires_at)
    _timestamp(msg.revoke_time, record.revoked_at)
    return msg


# Timestamps a key may carry: up to the end of year 9999, as google.protobuf.Timestamp.
MAX_SECONDS = 253_402_300_799
MAX_GRACE_SECONDS = 10 * 365 * 86_400


def _seconds(msg, field: str, low: float, high: float) -> float:
    """A Timestamp's seconds, refused outside [low, high] (Durations:
    convert.duration_seconds)."""
    if not 0 <= msg.nanos < 1_000_000_000 or not low <= msg.seconds <= high:
        raise InvalidArgument([Violation(field, f"out of range ({low:g} to {high:g} seconds)")])
    return msg.seconds + msg.nanos / 1e9


def _key_id(name: str) -> str:
    if not name.startswith(KEY_PREFIX) or len(name) > 128 or len(name) == len(KEY_PREFIX):
        raise InvalidArgument(
            [Violation("name", f"an API key name, 'apiKeys/{{id}}'; got {quote(name)}")]
        )
    return name[len(KEY_PREFIX) :]


class ApiKeyServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """The API-key RPCs of OrchestratorService (composed with the others in server.py)."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    @rpc
    async def CreateApiKey(
        self, request: orchestrator_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CreateApiKeyResponse:
        role = ROLE_FROM_PROTO.get(request.role)
        if role is None:
            raise InvalidArgument(
                [Violation("role", "API_KEY_ROLE_ADMIN, API_KEY_ROLE_USER or API_KEY_ROLE_NODE")]
            )
        tenant = check_tenant(request.tenant, "tenant")
        expires_at = (
            _seconds(request.expire_time, "expire_time", 0, MAX_SECONDS)
            if request.HasField("expire_time")
            else None
        )
        created = await self.keys.create(
            tenant=tenant, role=role, label=request.label, expires_at=expires_at
        )
        return orchestrator_pb2.CreateApiKeyResponse(
            api_key=key_to_proto(created.record), secret=created.secret
        )

    @rpc
    async def ListApiKeys(
        self, request: orchestrator_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListApiKeysResponse:
        tenant = check_tenant(request.tenant, "tenant") if request.tenant else None
        records = await self.keys.store.list_api_keys(tenant)
        page, token = paging.page_of(records, request.page_token, request.page_size)
        return orchestrator_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(r) for r in page], next_page_token=token
        )

    @rpc
    async def RevokeApiKey(
        self, request: orchestrator_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RevokeApiKeyResponse:
        grace = (
            convert.duration_seconds(request.grace, "grace", maximum=MAX_GRACE_SECONDS)
            if request.HasField("grace")
            else 0.0
        )
        record = await self.keys.revoke(_key_id(request.name), grace=grace)
        return orchestrator_pb2.RevokeApiKeyResponse(api_key=key_to_proto(record))


__all__ = ["ApiKeyServicer", "key_to_proto"]
