"""Per-call facts a servicer reads from the gRPC context: tenant, deadline."""

from __future__ import annotations

import re
import time
from contextvars import ContextVar

import grpc

from kernelmesh.core.auth import Principal
from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.tasks import DEFAULT_TENANT

# With auth off, a caller may name its tenant in this metadata key. With auth on,
# the key's tenant is the call's tenant and this metadata is ignored.
TENANT_METADATA_KEY = "kernelmesh-tenant"
# Set by services.auth_interceptor for the call being handled (auth on only).
CURRENT_PRINCIPAL: ContextVar[Principal | None] = ContextVar("kernelmesh_principal", default=None)
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_tenant(value: str, field: str) -> str:
    """`value` if it is a valid tenant name, else INVALID_ARGUMENT naming `field`.
    One rule for gRPC metadata and HTTP headers."""
    if not _TENANT_RE.match(value):
        raise InvalidArgument(
            [
                Violation(
                    field,
                    "a tenant name: 1-64 characters of letters, digits, '_', '.', '-', "
                    "starting with a letter or digit",
                )
            ]
        )
    return value


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    principal = CURRENT_PRINCIPAL.get()
    if principal is not None:
        return principal.tenant
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA_KEY:
            return check_tenant(value, f"metadata.{TENANT_METADATA_KEY}")
    return DEFAULT_TENANT


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on the time.monotonic() clock, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
