"""Traces across real processes (issue 8): a `kernelmesh serve` told to export
over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) sends its spans to a collector running
in the test, and they continue the test client's trace: the server span of a
call is a child of the client's span, a submitted task's run is in the
submitter's trace. `--log-format json` logs one JSON object per line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from otel_globals import installed, named

from kernelmesh.clients import Client

pytestmark = pytest.mark.e2e

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    kind: int
    trace_id: int
    span_id: int
    parent_span_id: int
    service: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ExportedSpan(
                            span.name,
                            span.kind,
                            int.from_bytes(span.trace_id, "big"),
                            int.from_bytes(span.span_id, "big"),
                            int.from_bytes(span.parent_span_id or b"\0", "big"),
                            attributes.get("service.name", ""),
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(
        self, match: Callable[[ExportedSpan], bool], timeout: float = 30.0
    ) -> ExportedSpan | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [s for s in self.spans if match(s)]
            if found:
                return found[0]
            time.sleep(0.05)
        return None


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


@pytest.fixture
def traced_serve(serve_tools, tmp_path, collector):
    received, port = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: spans leave at once
        "OTEL_SERVICE_NAME": "kernelmesh-under-test",
    }
    proc = serve_tools.start_serve(tmp_path, "--no-warmup", "--log-format", "json", env=env)
    try:
        yield proc, received
    finally:
        serve_tools.stop_serve(proc)


def test_the_servers_spans_continue_the_clients_trace(traced_serve):
    proc, received = traced_serve
    x = np.arange(-4, 4, dtype=np.float32)
    with installed() as local, Client(proc.target, timeout=30) as km:
        km.wait_ready(timeout=60)
        km.run("relu", x)
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("submitter") as submitter:
            handle = km.submit("relu", x)
        assert handle.wait(timeout=30).state.name == "SUCCEEDED"
        [client] = named(local.get_finished_spans(), "/kernelmesh.v1.TaskService/RunTask")

    run = received.wait_for(
        lambda s: s.name == "/kernelmesh.v1.TaskService/RunTask" and s.kind == SERVER
    )
    assert run is not None, received.spans
    assert run.trace_id == client.context.trace_id
    assert run.parent_span_id == client.context.span_id
    assert run.service == "kernelmesh-under-test"

    submitted = submitter.get_span_context().trace_id
    task_run = received.wait_for(lambda s: s.name == "task.run relu" and s.trace_id == submitted)
    assert task_run is not None, received.spans


def test_json_logs_are_one_object_per_line(traced_serve):
    proc, _ = traced_serve
    lines = [line for line in proc.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any("recovered" in e["message"] for e in entries), proc.output()
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
