"""Per-RPC Prometheus metrics under the names every gRPC operator knows
(go-grpc-prometheus, grpc-ecosystem/py-grpc-prometheus):

- ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
- ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
- ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram)

RunTask's latency is tens of microseconds, so the wrapper is resolved once per
method (not per call) and counts through `Tally` (a dict lookup, no lock)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kernelmesh.core.metrics import _LATENCY_BUCKETS, Tally

# The task path's latency buckets, widened at both ends: an RPC can be faster than
# any kernel (50 us) and a stream can last minutes.
_HANDLING_BUCKETS = (0.00005, *_LATENCY_BUCKETS, 60.0, 300.0)
_METHOD_LABELS = ("grpc_type", "grpc_service", "grpc_method")

STARTED = Tally("grpc_server_started", "RPCs started on the server.", _METHOD_LABELS)
HANDLED = Tally(
    "grpc_server_handled",
    "RPCs completed on the server, by status code.",
    (*_METHOD_LABELS, "grpc_code"),
)
HANDLING_SECONDS = Tally(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status (whole stream for streaming RPCs).",
    _METHOD_LABELS,
    _HANDLING_BUCKETS,
)


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()  # None until the handler sets one (abort, set_code)
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class _Method:
    """The label keys of one method, built once."""

    __slots__ = ("handled", "key")

    def __init__(self, grpc_type: str, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.key = (grpc_type, service, method)
        self.handled: dict[str, tuple[str, ...]] = {}

    def done(self, code: str, began: float) -> None:
        HANDLING_SECONDS.observe(self.key, time.perf_counter() - began)
        key = self.handled.get(code)
        if key is None:
            key = self.handled[code] = (*self.key, code)
        HANDLED.inc(key)


def _unary_response(inner: Callable[..., Awaitable[Any]], labels: _Method):
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        STARTED.inc(labels.key)
        began = time.perf_counter()
        error = None
        try:
            return await inner(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            labels.done(_code_of(context, error), began)

    return behavior


def _streaming_response(inner: Callable[..., Any], labels: _Method):
    if not inspect.isasyncgenfunction(inner):
        # A handler that writes with context.write() and returns: a coroutine.
        return _unary_response(inner, labels)

    async def behavior(request: Any, context: grpc.aio.ServicerContext):
        STARTED.inc(labels.key)
        began = time.perf_counter()
        error = None
        try:
            async for item in inner(request, context):
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            labels.done(_code_of(context, error), began)

    return behavior


def instrument(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` counted and timed, for a server with no other interceptor: wrapped
    once where it is registered (services.request_guard.GuardedRegistrar), so calls
    skip grpc.aio's interceptor pipeline (a few coroutines per call)."""
    return _wrap(handler, method)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC the server handles, health and reflection included."""

    def __init__(self) -> None:
        # handler -> (handler, wrapped): generic handlers hand out the same handler object
        # for a method on every call, so each is wrapped once.
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        found = self._wrapped.get(id(handler))
        if found is not None and found[0] is handler:
            return found[1]
        wrapped = _wrap(handler, handler_call_details.method)
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, _Method("unary", method)), **codec
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming_response(handler.unary_stream, _Method("server_stream", method)), **codec
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, _Method("client_stream", method)), **codec
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming_response(handler.stream_stream, _Method("bidi_stream", method)), **codec
    )


__all__ = ["HANDLED", "HANDLING_SECONDS", "STARTED", "RpcMetricsInterceptor", "instrument"]
