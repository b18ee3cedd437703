"""Errors raised by the client: one class per gRPC status, carrying the rich
details (field violations, retry delay, reason) the server attached."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class KernelmeshError(Exception):
    """A failed call. `code` is the gRPC status; details are parsed out."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.violations = violations
        self.retry_delay = retry_delay
        self.reason = reason
        self.metadata = metadata or {}

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.violations:
            text += "".join(f"\n  {v.field}: {v.description}" for v in self.violations)
        if self.retry_delay is not None:
            text += f"\n  retry after {self.retry_delay:.3g}s"
        return text


class InvalidArgumentError(KernelmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KernelmeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(KernelmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(KernelmeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(KernelmeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(KernelmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(KernelmeshError):
    code = grpc.StatusCode.CANCELLED


class UnimplementedError(KernelmeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(KernelmeshError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnimplementedError,
        InternalError,
    )
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> KernelmeshError:
    """Builds the error for a status, parsing google.rpc.Status details."""
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    reason = ""
    info: dict[str, str] = {}
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        message = status.message or message
        for detail in status.details:
            # Unpack fills the message only when the detail is of its type.
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            error_info = error_details_pb2.ErrorInfo()
            if detail.Unpack(bad):
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry):
                retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Unpack(error_info):
                reason = error_info.reason
                info = dict(error_info.metadata)
    cls = _BY_CODE.get(code, KernelmeshError)
    return cls(
        message,
        code=code,
        violations=tuple(violations),
        retry_delay=retry_delay,
        reason=reason,
        metadata=info,
    )


def from_rpc_error(err: grpc.RpcError) -> KernelmeshError:
    # Blocking calls give (key, value) named tuples, grpc.aio a Metadata of
    # pairs; the stubs type neither as the pairs both iterate as.
    metadata = cast(Iterable[tuple[str, str | bytes]], err.trailing_metadata() or ())
    return error_for(err.code(), err.details() or "", metadata)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Raises a failed call as its KernelmeshError (blocking or awaited alike)."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
