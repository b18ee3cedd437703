"""OpenTelemetry on the client's channels, when the application traces.

Tracing is the application's choice: it installs an SDK `TracerProvider`
(globally, as OpenTelemetry's libraries expect) and every channel the client
makes from then on carries its calls' trace context to the server, through
`opentelemetry-instrumentation-grpc`'s interceptors. Without OpenTelemetry
installed, or without a provider, channels are made as they were: no
interceptor, no cost."""

from __future__ import annotations

import sys
from typing import Any

import grpc


def _tracing() -> bool:
    """Whether the application installed a tracer provider (the API's default
    proxy and no-op providers record nothing, so they are not worth a hop)."""
    # An application that installed a provider has imported the API; one that
    # has not pays nothing here, not even the import.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def aio_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a new grpc.aio channel: a client span per call, its
    context in the call's metadata; none when the application does not trace."""
    if not _tracing():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def _not_server_stream(info: Any) -> bool:
    # The blocking interceptor turns a server stream's call into a generator,
    # which has no cancel(): the client could no longer end such a stream from
    # another thread. Those calls go out untraced (the server still records them).
    return not (getattr(info, "is_server_stream", False) and not info.is_client_stream)


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """A blocking channel with a client span per unary and upload call, or the
    channel itself when the application does not trace."""
    if not _tracing():
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    traced: grpc.Channel = intercept_channel(
        channel, client_interceptor(filter_=_not_server_stream)
    )
    return traced
