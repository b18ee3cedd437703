"""Domain errors. Each carries a google.rpc.Code value so the services layer
maps it to a gRPC status without core knowing about gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Code(IntEnum):
    """The google.rpc.Code values kernelmesh uses (numbers are the standard's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class KernelmeshError(Exception):
    code: Code = Code.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KernelmeshError):
    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[Violation], message: str | None = None) -> None:
        self.violations = list(violations)
        super().__init__(message or "; ".join(f"{v.field}: {v.description}" for v in violations))


class NotFound(KernelmeshError):
    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(KernelmeshError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(KernelmeshError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(KernelmeshError):
    code = Code.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(KernelmeshError):
    code = Code.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(KernelmeshError):
    code = Code.CANCELLED
    reason = "CANCELLED"
