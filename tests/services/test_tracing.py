"""Traces (issue 8): a client call and its server span are one trace; a
submitted task's run belongs to its submitter's trace, also after a restart;
with no tracer provider nothing is intercepted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from held_kernel import HeldKernel
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_globals import installed, named, spans_when

from kernelmesh.clients import AsyncClient, Client
from kernelmesh.clients import tracing as client_tracing
from kernelmesh.core import devices
from kernelmesh.core.store.sqlite import SqliteStore
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions, TaskSpec, TaskState
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.services import tracing

RUN = "/kernelmesh.v1.TaskService/RunTask"
SUBMIT = "/kernelmesh.v1.TaskService/SubmitTask"
X = np.arange(-8, 8, dtype=np.float32)


@pytest.fixture
def spans():
    with installed() as exporter:
        yield exporter


def kinds(found, kind):
    return [s for s in found if s.kind is kind]


def client_and_server(found, name):
    """The one client and one server span of `name`, or None while either is missing."""
    spans = named(found, name)
    client = kinds(spans, trace.SpanKind.CLIENT)
    server = kinds(spans, trace.SpanKind.SERVER)
    return (client[0], server[0]) if len(client) == 1 and len(server) == 1 else None


async def test_an_async_client_call_and_its_server_span_are_one_trace(
    spans, server_config, start_server
):
    server = await start_server(server_config)
    async with AsyncClient(f"127.0.0.1:{server.port}") as km:
        y = await km.run("relu", X)
    np.testing.assert_array_equal(y, np.maximum(X, 0))

    found = await spans_when(spans, lambda s: client_and_server(s, RUN) is not None)
    pair = client_and_server(found, RUN)
    assert pair is not None, [(s.name, s.kind) for s in found]
    client, server_span = pair
    assert server_span.context.trace_id == client.context.trace_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client.context.span_id


async def test_a_blocking_client_call_and_its_server_span_are_one_trace(
    spans, server_config, start_server
):
    server = await start_server(server_config)

    def call() -> None:
        with Client(f"127.0.0.1:{server.port}") as km:
            km.run("relu", X)

    await asyncio.to_thread(call)
    found = await spans_when(spans, lambda s: client_and_server(s, RUN) is not None)
    pair = client_and_server(found, RUN)
    assert pair is not None, [(s.name, s.kind) for s in found]
    client, server_span = pair
    assert server_span.context.trace_id == client.context.trace_id
    assert server_span.parent.span_id == client.context.span_id


async def test_a_submitted_tasks_run_is_a_span_of_the_submitters_trace(
    spans, server_config, start_server
):
    server = await start_server(server_config)
    tracer = trace.get_tracer("test")
    async with AsyncClient(f"127.0.0.1:{server.port}") as km:
        with tracer.start_as_current_span("submitter") as submitter:
            handle = await km.submit("relu", X)
        info = await handle.wait(timeout=30)
    assert info.state.name == "SUCCEEDED"

    def complete(found):
        return client_and_server(found, SUBMIT) is not None and named(found, "task.run relu")

    found = await spans_when(spans, complete)
    pair = client_and_server(found, SUBMIT)
    assert pair is not None, [(s.name, s.kind) for s in found]
    _, submit_server = pair
    [run] = named(found, "task.run relu")
    trace_id = submitter.get_span_context().trace_id
    assert submit_server.context.trace_id == trace_id
    assert run.context.trace_id == trace_id
    assert run.parent.span_id == submit_server.context.span_id
    assert run.attributes["kernelmesh.task.name"] == handle.name
    # Kept with the task, as the store keeps it.
    task = server.tasks.get(handle.name, tenant="default")
    headers = json.loads(task.trace_context)
    assert headers["traceparent"].split("-")[1] == format(trace_id, "032x")


async def test_health_checks_make_no_spans(spans, server_config, start_server):
    server = await start_server(server_config)
    async with AsyncClient(f"127.0.0.1:{server.port}") as km:
        await km.wait_ready(timeout=30)
        await km.run("relu", X)
    found = await spans_when(spans, lambda s: client_and_server(s, RUN) is not None)
    assert client_and_server(found, RUN) is not None
    assert not [s for s in found if kinds([s], trace.SpanKind.SERVER) and "Health" in s.name]


async def test_without_a_tracer_provider_nothing_is_intercepted(server_config, start_server):
    assert not tracing.enabled()
    assert tracing.server_interceptors() == []
    assert client_tracing.aio_interceptors() == []
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        assert client_tracing.intercept(channel) is channel
    finally:
        channel.close()
    server = await start_server(server_config)
    assert server.tasks.tracing is None
    async with AsyncClient(f"127.0.0.1:{server.port}") as km:
        handle = await km.submit("relu", X)
        await handle.wait(timeout=30)
    assert server.tasks.get(handle.name, tenant="default").trace_context == ""


async def test_a_queued_task_keeps_its_trace_across_a_restart(tmp_path: Path):
    """The traceparent goes into the store with the task; after a crash the
    recovered task's run is still a span of the submitter's trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = tracing.TaskTracing(provider)
    tracer = provider.get_tracer("test")

    async def start() -> tuple[SqliteStore, TaskManager]:
        store = SqliteStore(tmp_path / "state")
        await store.open()
        mgr = TaskManager(
            devices.discover("test", ("cpu",)),
            TensorStore(64 << 20),
            TaskManagerOptions(workers_per_device=1),
            store,
            tracing=hook,
        )
        await mgr.start()
        await mgr.recover()
        return store, mgr

    store, mgr = await start()
    # The matmul's kernel is held, so the one worker stays busy and relu waits
    # (a free-running matmul, sized or not, could end between two polls).
    held = HeldKernel(mgr.devices[0], "matmul")
    try:
        big = np.ones((64, 64), np.float64)
        busy = await mgr.submit_journaled(TaskSpec(op="matmul", inputs=[big, big]))
        with tracer.start_as_current_span("submitter") as submitter:
            queued = await mgr.submit_journaled(TaskSpec(op="relu", inputs=[X]))
        await held.wait_started()
        assert busy.state is TaskState.RUNNING
        assert queued.state is TaskState.QUEUED, "the one worker is busy, so relu waits"
        # Crash: workers stop, nothing is finished on the way out.
        for worker in mgr._workers:
            worker.cancel()
        await asyncio.gather(*mgr._workers, return_exceptions=True)
        await store.close()
    finally:
        held.release()  # the kernel returns to a worker that is gone
    mgr._pool.shutdown(wait=True)
    assert not named(exporter.get_finished_spans(), "task.run relu")

    store, mgr = await start()
    try:
        again = mgr.get(queued.name, tenant="default")
        await asyncio.wait_for(again.wait(), 30)
        assert again.state is TaskState.SUCCEEDED
        [run] = named(exporter.get_finished_spans(), "task.run relu")
        assert run.context.trace_id == submitter.get_span_context().trace_id
        assert run.parent.span_id == submitter.get_span_context().span_id
    finally:
        await mgr.shutdown(grace=5.0)
        await store.close()
        provider.shutdown()


@pytest.mark.parametrize("stored", ["not json", '["a list"]', '{"traceparent": "00-bad"}'])
def test_a_stored_context_that_cannot_be_read_starts_a_new_trace(stored):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    task = SimpleNamespace(
        trace_context=stored, op="relu", name="tasks/x", attempt=1, device_name="cpu:0"
    )
    with tracing.TaskTracing(provider).run(task):
        pass
    [span] = exporter.get_finished_spans()
    assert span.name == "task.run relu" and span.parent is None
