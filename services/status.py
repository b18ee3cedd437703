"""The gRPC rich error model: core errors become google.rpc.Status with
BadRequest, RetryInfo and ErrorInfo details."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kernelmesh.core.errors import (
    Code,
    InvalidArgument,
    KernelmeshError,
    ResourceExhausted,
    Violation,
)

log = logging.getLogger(__name__)

DOMAIN = "kernelmesh.v1"

T = TypeVar("T")

# Trailers carry the status: a message that quotes a huge input (a name, a label)
# must not grow them past what proxies and the client's metadata limit accept.
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256
MAX_DESCRIPTION_CHARS = 512
MAX_VIOLATIONS = 32


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(
    code: int,
    message: str,
    *,
    reason: str | None = None,
    violations: list[Violation] | None = None,
    retry_after: float | None = None,
    metadata: dict[str, str] | None = None,
) -> grpc.Status:
    details = []
    message = _cut(message, MAX_MESSAGE_CHARS)
    if violations:
        violations = [
            Violation(_cut(v.field, MAX_FIELD_CHARS), _cut(v.description, MAX_DESCRIPTION_CHARS))
            for v in violations[:MAX_VIOLATIONS]
        ]
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in violations
                    ]
                )
            )
        )
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if reason:
        details.append(
            _pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
        )
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def status_of(exc: KernelmeshError) -> grpc.Status:
    return to_status(
        int(exc.code),
        exc.message,
        reason=exc.reason,
        violations=exc.violations if isinstance(exc, InvalidArgument) else None,
        retry_after=exc.retry_after if isinstance(exc, ResourceExhausted) else None,
    )


def internal_status(exc: BaseException) -> grpc.Status:
    """INTERNAL for an unexpected exception, logged here with its traceback."""
    log.exception("internal error", exc_info=exc)
    return to_status(
        code_pb2.INTERNAL,
        f"internal error ({type(exc).__name__}); the server logged the details",
        reason="INTERNAL",
    )


@contextlib.asynccontextmanager
async def _statuses(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Ends the call with the rich status of a core error, or INTERNAL for anything
    unexpected: a handler never takes the server down."""
    try:
        yield
    except KernelmeshError as exc:
        await context.abort_with_status(status_of(exc))
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await context.abort_with_status(internal_status(exc))


def rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wraps a unary-response servicer method in `_statuses`."""

    # The same as `_statuses`, inline: an async context manager costs microseconds
    # per call, which RunTask's latency notices.
    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except KernelmeshError as exc:
            await context.abort_with_status(status_of(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort_with_status(internal_status(exc))

    return wrapper


def stream_rpc(
    method: Callable[..., AsyncIterator[T]],
) -> Callable[..., AsyncIterator[T]]:
    """The same as `rpc`, for server-streaming methods."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        # aclosing: however this wrapper ends, the inner generator's cleanup (closing
        # an upstream request, leaving a watch) runs now, not whenever it is collected
        items = method(self, request, context)
        async with _statuses(context), contextlib.aclosing(items):
            async for item in items:
                yield item

    return wrapper


def code_of(value: int) -> grpc.StatusCode:
    for status_code in grpc.StatusCode:
        if status_code.value[0] == value:
            return status_code
    return grpc.StatusCode.UNKNOWN


__all__ = ["Code", "code_of", "internal_status", "rpc", "status_of", "stream_rpc", "to_status"]
