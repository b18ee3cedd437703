"""Authentication and authorization for every gRPC call: a server interceptor
that reads `authorization: Bearer <key>`, checks the key (cached, see
core.auth) and the role table, and makes the key's tenant the call's tenant.
Health and reflection stay open.

It runs before the request message is read: a caller without a valid key gets
UNAUTHENTICATED (or PERMISSION_DENIED) and the server neither receives nor
decodes what it sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from kernelmesh.core.auth import ROLE_TABLE, KeyRing, is_open
from kernelmesh.core.errors import KernelmeshError
from kernelmesh.services.context import CURRENT_PRINCIPAL
from kernelmesh.services.status import status_of


def _refusal(handler: grpc.RpcMethodHandler | None, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only ends the call with
    `status` (no deserializer: nothing the caller sent is decoded)."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        await context.abort_with_status(status)
        yield  # never reached; makes this an async generator

    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs on every call, so a call with a recently checked key costs a role-table
    lookup, a scan of the (few) metadata entries, the key's shape check and
    SHA-256 (the cache is keyed by digest), one cache lookup and a contextvar set;
    everything else happens on a cache miss or a refusal."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        roles = ROLE_TABLE.get(method)
        if roles is None and is_open(method):
            return await continuation(handler_call_details)
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value
                break
        principal = self.keys.cached(header) if header.__class__ is str else None
        if principal is None:
            try:
                principal = await self.keys.check(header)
            except KernelmeshError as exc:
                return _refusal(await continuation(handler_call_details), status_of(exc))
        if roles is None or principal.role not in roles:
            try:
                self.keys.authorize(principal, method)
            except KernelmeshError as exc:
                return _refusal(await continuation(handler_call_details), status_of(exc))
        # The handler runs later in this same task and reads the principal from
        # here (services.context.tenant_of).
        CURRENT_PRINCIPAL.set(principal)
        return await continuation(handler_call_details)


__all__ = ["AuthInterceptor"]
