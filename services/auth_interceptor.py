"""Authentication and authorization for every gRPC call: reads
`authorization: Bearer <key>`, checks the key (cached, see core.auth), checks
the role table, and makes the key's tenant the call's tenant. Health and
reflection stay open.

It is the request guard with a key check in front, so a call passes one
interceptor, not two (each step of grpc.aio's interceptor pipeline costs a
coroutine round per call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from kernelmesh.core.auth import KeyRing, bearer_secret, is_open
from kernelmesh.core.errors import KernelmeshError
from kernelmesh.services.context import CURRENT_PRINCIPAL
from kernelmesh.services.request_guard import RequestGuard
from kernelmesh.services.status import status_of


def _refusal(handler: grpc.RpcMethodHandler | None, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only ends the call with
    `status`; requests are not even decoded."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(streaming)


class AuthInterceptor(RequestGuard):
    def __init__(self, keys: KeyRing) -> None:
        super().__init__()
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if is_open(method):
            return await super().intercept_service(continuation, handler_call_details)
        secret = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                secret = bearer_secret(value if isinstance(value, str) else None)
                break
        try:
            principal = await self.keys.authenticate(secret)
            self.keys.authorize(principal, method)
        except KernelmeshError as exc:
            return _refusal(await continuation(handler_call_details), status_of(exc))
        # The handler runs in this same task, so it reads the principal from here
        # (services.context.tenant_of).
        CURRENT_PRINCIPAL.set(principal)
        return await super().intercept_service(continuation, handler_call_details)


__all__ = ["AuthInterceptor"]
