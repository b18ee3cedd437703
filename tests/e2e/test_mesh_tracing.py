"""One trace across three processes (issue 8): a traced client calls a real
`kernelmesh orchestrator`, which forwards the task to a real `kernelmesh node`;
both servers export to a collector running in the test (OTLP/gRPC), the client
keeps its spans in memory. The client's span, the orchestrator's server span and
the node's server span share one trace id, each the child of the hop before."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from otel_globals import installed, named
from test_tracing_e2e import SERVER, Collector

from kernelmesh.clients import Client

pytestmark = pytest.mark.e2e

CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_CLIENT
RUN = "/kernelmesh.v1.TaskService/RunTask"


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def otlp(port: int, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: spans leave at once
        "OTEL_SERVICE_NAME": service,
    }


def test_client_orchestrator_and_node_are_one_trace(procs, collector):
    received, port = collector
    orch = procs.orchestrator("--store", "memory", env=otlp(port, "orch-under-test"))
    procs.node(
        "node-a", orch.target, "--backends", "cpu", "--auth", env=otlp(port, "node-under-test")
    )
    wait_for(lambda: ready_nodes(orch.target) == {"node-a"}, what="node-a READY")

    x = np.arange(-4, 4, dtype=np.float32)
    with installed() as local, Client(orch.target, timeout=60) as km:
        np.testing.assert_array_equal(km.run("relu", x), np.maximum(x, 0))
        [client] = named(local.get_finished_spans(), RUN)
    trace_id = client.context.trace_id

    at_orch = received.wait_for(
        lambda s: s.service == "orch-under-test" and s.name == RUN and s.kind == SERVER
    )
    at_node = received.wait_for(
        lambda s: s.service == "node-under-test" and s.name == RUN and s.kind == SERVER
    )
    assert at_orch is not None and at_node is not None, received.spans
    assert at_orch.trace_id == at_node.trace_id == trace_id
    assert at_orch.parent_span_id == client.context.span_id
    # the node's server span continues the orchestrator's call to it
    forwarded = received.wait_for(lambda s: s.span_id == at_node.parent_span_id)
    assert forwarded is not None, received.spans
    assert forwarded.service == "orch-under-test" and forwarded.kind == CLIENT
    assert forwarded.trace_id == trace_id
