"""A node's own port, started with --auth: only its orchestrators may call it.

The node makes a random 256-bit token at start and sends it with RegisterNode
(over the join channel, TLS when --join-ca is set); the orchestrators present
it as `authorization: Bearer <token>` on every call they forward. A call
without it is UNAUTHENTICATED before its request is read. Health and
reflection stay open, for probes.

The token lives only in the node's memory and in the orchestrators' (and in the
node record of a shared store, so another orchestrator can forward too); a
restarted node makes a new one and registers again."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from kernelmesh.core.auth import Unauthenticated, bearer_secret, is_open
from kernelmesh.services.auth_interceptor import _refusal
from kernelmesh.services.status import status_of


def new_token() -> str:
    return secrets.token_urlsafe(32)


class NodeTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._missing = status_of(
            Unauthenticated(
                "this is a kernelmesh node: only the orchestrators it joined may call it "
                "(send your calls to an orchestrator)"
            )
        )

    def _admits(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                secret = bearer_secret(value if isinstance(value, str) else None)
                # constant time: the comparison says nothing about the token
                return secret is not None and hmac.compare_digest(secret.encode(), self._token)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if is_open(handler_call_details.method) or self._admits(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        return _refusal(await continuation(handler_call_details), self._missing)


__all__ = ["NodeTokenInterceptor", "new_token"]
