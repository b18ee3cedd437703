"""Authentication and authorization for every gRPC call: reads
`authorization: Bearer <key>`, checks the key (cached, see core.auth) and the
role table, and makes the key's tenant the call's tenant.

It runs inside each kernelmesh.v1 handler, ahead of the servicer, through the
request guard (services.request_guard.GuardedRegistrar) rather than as a
grpc.aio.ServerInterceptor: the same check at the same point, without a trip
through grpc.aio's interceptor pipeline on every call. Health and reflection
are registered without a key check, so they stay open."""

from __future__ import annotations

import grpc

from kernelmesh.core.auth import KeyRing, bearer_secret
from kernelmesh.services.context import CURRENT_PRINCIPAL


class KeyCheck:
    """An `Authorizer` (services.request_guard) over a KeyRing."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def __call__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        secret = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                secret = bearer_secret(value if isinstance(value, str) else None)
                break
        principal = await self.keys.authenticate(secret)
        self.keys.authorize(principal, method)
        # The handler runs next in this same task and reads the principal from here
        # (services.context.tenant_of).
        CURRENT_PRINCIPAL.set(principal)


__all__ = ["KeyCheck"]
