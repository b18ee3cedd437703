"""OpenTelemetry traces for the server processes.

`configure` installs the SDK with an OTLP exporter when
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; otherwise no
tracer provider exists and nothing below adds any work: no interceptor on the
server, none on the channels the server makes, no span around a task.

With a provider (from `configure`, or one a test or an embedding application
installed), a call's server span continues the caller's trace (W3C
`traceparent` in the metadata), a submitted task keeps its submitter's trace
context in the store, and its run is a span of that trace, also after a
restart."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kernelmesh.core.tasks import Task

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# W3C Trace Context whatever OTEL_PROPAGATORS says: the store's column holds its
# headers (traceparent, and tracestate when there is one) as a JSON object.
_W3C = TraceContextTextMapPropagator()


def configure(service_name: str) -> TracerProvider | None:
    """Installs the SDK exporting over OTLP/gRPC when an OTLP endpoint is set
    (the exporter reads the endpoint, headers and TLS settings from the
    standard OTEL_EXPORTER_OTLP_* variables); returns the provider, or None
    when nothing is to be exported. `OTEL_SERVICE_NAME` overrides the name."""
    if not any(os.environ.get(name) for name in _ENDPOINT_VARIABLES):
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)  # flushed and shut down at exit by the SDK
    return provider


def enabled() -> bool:
    """Whether spans are recorded: a tracer provider is installed."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The server's tracing interceptor (health checks left out: Kubernetes probes
    them every few seconds), or none when tracing is off."""
    if not enabled():
        return []
    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """For every grpc.aio channel the server makes (to a node, to another
    orchestrator): the call continues the current trace. None when off."""
    if not enabled():
        return []
    return aio_client_interceptors()


def aio_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel whose calls carry the caller's trace context."""
    interceptors = list(client_interceptors()) or None
    if credentials is None:
        return grpc.aio.insecure_channel(target, options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options, interceptors=interceptors)


class TaskTracing:
    """What the task manager calls, only when tracing is on: the submitter's
    context to keep with a queued task, and the span of each attempt's run."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("kernelmesh.tasks", tracer_provider=tracer_provider)

    @staticmethod
    def capture() -> str:
        """The current span's W3C headers as a JSON object ("" outside any trace)."""
        carrier: dict[str, str] = {}
        _W3C.inject(carrier)
        return json.dumps(carrier, separators=(",", ":")) if carrier else ""

    @contextlib.contextmanager
    def run(self, task: Task) -> Iterator[None]:
        """A span for one attempt's run, a child of the submitter's span; current
        while the attempt runs, so calls it makes (to a node) continue the trace."""
        parent = _W3C.extract(_headers(task.trace_context))
        with self._tracer.start_as_current_span(
            f"task.run {task.op}",
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            attributes={
                "kernelmesh.task.name": task.name,
                "kernelmesh.task.op": task.op,
                "kernelmesh.task.attempt": task.attempt,
                "kernelmesh.device": task.device_name,
            },
        ):
            yield


def _headers(stored: str) -> dict[str, str]:
    """The stored headers; none (a new trace) when the column holds something else."""
    try:
        headers = json.loads(stored)
    except ValueError:
        return {}
    return headers if isinstance(headers, dict) else {}


def task_tracing() -> TaskTracing | None:
    """The task manager's hook, or None when tracing is off (then it does nothing)."""
    return TaskTracing() if enabled() else None
