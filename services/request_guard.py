"""Guards every kernelmesh.v1 handler: every malformed request becomes
INVALID_ARGUMENT before a servicer sees it, and anything a handler lets escape
becomes a status. Handlers are wrapped once, when servicers are registered
(`GuardedRegistrar`), so calls pay for one wrapper and no trip through grpc.aio's
interceptor pipeline.

- Bytes that do not decode as the method's request message (truncated,
  invalid UTF-8 in a string field, nesting past protobuf's limit) are answered
  INVALID_ARGUMENT, not the UNKNOWN grpcio gives, and log no traceback.
- proto3 keeps enum numbers it does not know; a request carrying one in any
  field, however deep, is refused naming the field.
- An exception escaping a handler becomes its rich status (a core error) or
  INTERNAL (logged once), never UNKNOWN.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from kernelmesh.core.errors import InvalidArgument, KernelmeshError, Violation
from kernelmesh.services.status import internal_status, status_of

log = logging.getLogger(__name__)

# Methods whose servicer checks every enum of its requests itself: StreamTasks
# answers a FAILED task for a bad item and goes on; Generate reports unset and
# unknown roles together; the TaskSpec of RunTask and SubmitTask is checked by
# services.convert (dtypes, device kind), which keeps the walk off the hot path.
# Their requests are decoded here but not walked.
ENUMS_CHECKED_BY_SERVICER = frozenset(
    {
        "/kernelmesh.v1.TaskService/RunTask",
        "/kernelmesh.v1.TaskService/SubmitTask",
        "/kernelmesh.v1.TaskService/StreamTasks",
        "/kernelmesh.v1.LLMService/Generate",
        "/kernelmesh.v1.LLMService/GenerateStream",
    }
)

# Methods whose servicer may yield replies already encoded (bytes): DownloadTensor's
# chunks are written straight from the tensor's memory, since building and
# serializing a 4 MiB protobuf message runs at under 1 GB/s, a copy at 8.
PRE_ENCODED_REPLIES = frozenset({"/kernelmesh.v1.TaskService/DownloadTensor"})


def _pre_encoded_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serializer(reply: Any) -> bytes:
        return reply if type(reply) is bytes else serialize(reply)

    return serializer


class _Refused:
    """Stands in for a request that failed decoding or checking."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


# --- unknown enum numbers, anywhere in a message -------------------------

_Checker = Callable[[Any, str, list[Violation]], None]
_CHECKERS: dict[str, _Checker | None] = {}


def _checker(desc: Descriptor) -> _Checker | None:
    """A function reporting unknown enum numbers in messages of this type, or
    None when the type holds no enum (then nothing is walked at all). Well-known
    google.protobuf types are skipped: Struct's NullValue means null whatever
    its number."""
    if desc.full_name in _CHECKERS:
        return _CHECKERS[desc.full_name]
    _CHECKERS[desc.full_name] = None  # a recursive type refers to itself: no enum via that path
    steps: list[tuple[FieldDescriptor, Any]] = []
    for field in desc.fields:
        if field.type == FieldDescriptor.TYPE_ENUM:
            steps.append((field, frozenset(v.number for v in field.enum_type.values)))
        elif (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not field.message_type.full_name.startswith("google.protobuf.")
        ):
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"]
                if value.type != FieldDescriptor.TYPE_MESSAGE:
                    continue
                inner = _checker(value.message_type)
                if inner is not None:
                    steps.append((field, ("map", inner)))
                continue
            inner = _checker(field.message_type)
            if inner is not None:
                steps.append((field, inner))
    if not steps:
        return None

    plan = [(f.name, _is_repeated(f), f.enum_type.name if f.enum_type else "", r) for f, r in steps]

    def check(msg: Any, path: str, out: list[Violation]) -> None:
        for name, repeated, enum, rule in plan:
            where = f"{path}{name}"
            if isinstance(rule, frozenset):
                values = getattr(msg, name) if repeated else (getattr(msg, name),)
                for i, value in enumerate(values):
                    if value not in rule:
                        at = f"{where}[{i}]" if repeated else where
                        out.append(Violation(at, f"{value} is not a {enum} value"))
            elif isinstance(rule, tuple):  # a map of messages
                for key, value in getattr(msg, name).items():
                    rule[1](value, f"{where}[{key!s:.32}].", out)
            elif repeated:
                for i, item in enumerate(getattr(msg, name)):
                    rule(item, f"{where}[{i}].", out)
            elif msg.HasField(name):
                rule(getattr(msg, name), f"{where}.", out)

    _CHECKERS[desc.full_name] = check
    return check


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 6 has `is_repeated` and deprecates `label`
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def unknown_enums(msg: Any) -> list[Violation]:
    """Violations for every unknown enum number in `msg` (empty if none)."""
    check = _checker(msg.DESCRIPTOR)
    if check is None:
        return []
    out: list[Violation] = []
    check(msg, "", out)
    return out


# --- the guard ------------------------------------------------------------


def _safe_deserializer(
    deserialize: Callable[[bytes], Any] | None, check_enums: bool
) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            msg = deserialize(raw) if deserialize is not None else raw
        except Exception as exc:  # DecodeError, or invalid UTF-8 in a string field
            return _Refused(
                InvalidArgument(
                    [Violation("request", f"not a valid encoding of the request message: {exc}")]
                )
            )
        if check_enums and deserialize is not None:
            violations = unknown_enums(msg)
            if violations:
                return _Refused(InvalidArgument(violations))
        return msg

    return decode


def checked(request: Any) -> Any:
    """A request a streaming handler read itself (`context.read()`); raises the
    INVALID_ARGUMENT of one that failed decoding or checks."""
    if type(request) is _Refused:
        raise request.error
    return request


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield checked(request)
        del request  # not kept alive while the next one is awaited


async def _items(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses: an async generator, or a coroutine that
    writes with context.write (or only aborts, like an unimplemented stub)."""
    if inspect.isawaitable(result):
        await result
        return
    async for item in result:
        yield item


async def _end(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if context.done():
        # The caller cancelled or went away, so a status can no longer be sent
        # (this is what grpcio's failed "execute_batch" on abort means).
        log.debug("call ended before its status was sent: %s", type(exc).__name__)
        return
    if isinstance(exc, KernelmeshError):
        await context.abort_with_status(status_of(exc))
    if isinstance(exc, NotImplementedError):
        # what generated servicer bases (and grpcio-health's List) raise
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented")
    await context.abort_with_status(internal_status(exc))


def guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with safe decoding, enum checks and every escaping error turned
    into a status."""
    check_items = method not in ENUMS_CHECKED_BY_SERVICER
    deserializer = _safe_deserializer(handler.request_deserializer, check_items)
    serializer = handler.response_serializer
    if method in PRE_ENCODED_REPLIES:
        serializer = _pre_encoded_or(serializer)

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            try:
                if type(request) is _Refused:
                    raise request.error
                return await inner(request, context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as exc:
                await _end(context, exc)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)

    if handler.unary_stream is not None:
        inner = handler.unary_stream

        async def unary_stream(request, context):
            try:
                if type(request) is _Refused:
                    raise request.error
                async for item in _items(inner(request, context)):
                    yield item
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as exc:
                await _end(context, exc)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(requests, context):
            try:
                return await inner(_checked(requests), context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as exc:
                await _end(context, exc)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)

    inner = handler.stream_stream

    async def stream_stream(requests, context):
        try:
            async for item in _items(inner(_checked(requests), context)):
                yield item
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            await _end(context, exc)

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)


class _GuardedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrap) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # not this service's method; never cached (names are free text)
        self._wrapped[method] = wrapped = self._wrap(handler, method)
        return wrapped


class GuardedRegistrar:
    """Stands in for the grpc.aio server while servicers are added to it: every
    handler a servicer registers is guarded once, here.

        registrar = GuardedRegistrar(server)
        task_pb2_grpc.add_TaskServiceServicer_to_server(servicer, registrar)
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        outer: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler] | None = None,
    ) -> None:
        self._server = server
        # wraps each guarded handler once more (the RPC metrics, when they are not an
        # interceptor): outside the guard, so it sees the status the guard gives
        self._outer = outer

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        guarded = guard(handler, method)
        return guarded if self._outer is None else self._outer(guarded, method)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGeneric(h, self._wrap) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """Not passed on: the generated code adds the same handlers as a generic handler
        too, and serving every method that way is cheaper in grpc.aio. Its server waits
        for the next call with one pending task per registered method, so with every
        method registered (38 here) each call ran an `asyncio.wait` over 39 tasks: a
        done-callback added and removed on each, more main-thread time per RunTask than
        the handler itself. Unregistered, there is one such task, and finding a method
        is a dict lookup in the first `_GuardedGeneric` that knows it."""


__all__ = ["GuardedRegistrar", "guard", "unknown_enums"]
