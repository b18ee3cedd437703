"""RunTask through an orchestrator forwarded to a node: the call carries the
node's token, the tenant and the caller's deadline; a caller that goes away
cancels it on the node; a node lost under it sends the task to another node;
beyond the window of attempts in flight, tasks queue and still run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from mesh_procs import add_request

from kernelmesh.core.mesh.nodes import VERSION
from kernelmesh.core.tasks import REMOTE_WINDOW
from kernelmesh.v1 import (
    device_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    tensor_pb2,
)

TOKEN = "node-token-for-the-forward-test"


class FakeNode(task_pb2_grpc.TaskServiceServicer):
    """A node's TaskService that adds float32 tensors, holding each call until
    `release` is set; it records what each call carried."""

    def __init__(self, *, hold: bool = False) -> None:
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.calls: list[dict] = []
        self.cancelled = 0

    async def RunTask(self, request, context):
        self.calls.append(
            {
                "metadata": dict(context.invocation_metadata()),
                "time_remaining": context.time_remaining(),
                "device": request.task.device.name,
                "inputs": [arg.tensor for arg in request.task.inputs],
            }
        )
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        a, b = (
            np.frombuffer(arg.tensor.data, np.float32).reshape(tuple(arg.tensor.shape))
            for arg in request.task.inputs
        )
        out = a + b
        reply = task_pb2.RunTaskResponse()
        reply.task.state = task_pb2.TASK_STATE_SUCCEEDED
        reply.task.outputs.append(
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=out.shape, data=out.tobytes())
        )
        return reply


async def _serve(node: FakeNode) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    task_pb2_grpc.add_TaskServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _register(mesh, name: str, port: int) -> None:
    await mesh.RegisterNode(
        orchestrator_pb2.RegisterNodeRequest(
            name=name,
            address=f"127.0.0.1:{port}",
            version=VERSION,
            devices=[device_pb2.Device(name="cpu:0", kind=device_pb2.DEVICE_KIND_CPU)],
            capabilities=[orchestrator_pb2.DeviceCapability(device="cpu:0", ops=["add:float32"])],
            node_token=TOKEN,
        )
    )


async def _beats(name: str):
    while True:
        yield orchestrator_pb2.HeartbeatRequest(node=name)
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def joined(channel, node: FakeNode, name: str = "node-a") -> AsyncIterator[None]:
    """`node` served, registered as `name` and heartbeating (a node that never beats
    is lost after the 1 s lease, which a loaded machine can spend mid-test);
    stopped after."""
    server, port = await _serve(node)
    mesh = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    heartbeat = None
    try:
        await _register(mesh, name, port)
        heartbeat = mesh.Heartbeat(_beats(name))
        yield
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        await server.stop(None)


async def _until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def orchestrator(server_config, start_server):
    config = dataclasses.replace(
        server_config, role="orchestrator", with_node=False, lease_seconds=1.0
    )
    return await start_server(config)


@pytest.fixture
async def channel(orchestrator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as chan:
        yield chan


async def test_forwarded_with_token_tenant_and_deadline(orchestrator, channel):
    node = FakeNode(hold=True)
    async with joined(channel, node):
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        x = np.arange(4, dtype=np.float32)
        request = add_request(x)
        call = asyncio.ensure_future(
            tasks.RunTask(request, timeout=20, metadata=[("kernelmesh-tenant", "acme")])
        )
        await _until(lambda: node.calls, "the call to reach the node")
        # On the node, and no longer in the orchestrator's queue for its device.
        (device,) = [d for d in orchestrator.tasks.devices if d.name == "node-a/cpu:0"]
        assert len(device.queue) == 0 and device.running == 1
        node.release.set()
        reply = await call
    np.testing.assert_array_equal(np.frombuffer(reply.task.outputs[0].data, np.float32), x + x)
    assert reply.task.device == "node-a/cpu:0"
    (seen,) = node.calls
    assert seen["device"] == "cpu:0"
    assert seen["inputs"] == [arg.tensor for arg in request.task.inputs]  # as the caller sent them
    assert seen["metadata"]["authorization"] == f"Bearer {TOKEN}"
    assert seen["metadata"]["kernelmesh-tenant"] == "acme"
    # The caller's 20 s, less the time spent, as gRPC encodes it (rounded up a little).
    assert seen["time_remaining"] is not None and 0 < seen["time_remaining"] <= 20.5


async def test_a_caller_that_goes_away_cancels_the_call_on_the_node(orchestrator, channel):
    node = FakeNode(hold=True)
    async with joined(channel, node):  # not lost: the caller cancels
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        call = tasks.RunTask(add_request(np.ones(4, np.float32)), timeout=20)
        await _until(lambda: node.calls, "the call to reach the node")
        call.cancel()
        await _until(lambda: node.cancelled == 1, "the node's call to be cancelled")
        (device,) = [d for d in orchestrator.tasks.devices if d.name == "node-a/cpu:0"]
        await _until(lambda: device.running == 0, "the attempt to end on the orchestrator")


async def test_a_node_lost_under_a_run_task_sends_it_to_another_node(orchestrator, channel):
    lost, healthy = FakeNode(hold=True), FakeNode()
    lost_server, lost_port = await _serve(lost)
    healthy_server, healthy_port = await _serve(healthy)
    mesh = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    heartbeat = None
    try:
        await _register(mesh, "node-a", lost_port)  # never heartbeats: lost after its lease
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        x = np.full(4, 2, np.float32)
        call = asyncio.ensure_future(tasks.RunTask(add_request(x), timeout=30))
        await _until(lambda: lost.calls, "the call to reach node-a")
        await _register(mesh, "node-b", healthy_port)
        heartbeat = mesh.Heartbeat(_beats("node-b"))
        reply = await call
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        await lost_server.stop(None)
        await healthy_server.stop(None)
    assert reply.task.device == "node-b/cpu:0"
    np.testing.assert_array_equal(np.frombuffer(reply.task.outputs[0].data, np.float32), x + x)
    assert len(healthy.calls) == 1
    assert lost.cancelled == 1  # the lost node's attempt was called off


async def test_beyond_the_window_in_flight_tasks_queue_and_still_run(
    orchestrator, channel, server_config
):
    window = server_config.workers_per_device * REMOTE_WINDOW
    node = FakeNode(hold=True)
    async with joined(channel, node):
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        x = np.ones(4, np.float32)
        calls = [
            asyncio.ensure_future(tasks.RunTask(add_request(x), timeout=60))
            for _ in range(window + 5)
        ]
        (device,) = [d for d in orchestrator.tasks.devices if d.name == "node-a/cpu:0"]
        await _until(lambda: len(node.calls) == window, "the window to fill")
        await _until(lambda: len(device.queue) == 5, "the rest to queue")
        assert device.running == window
        node.release.set()
        replies = await asyncio.gather(*calls)
    assert len(node.calls) == window + 5
    for reply in replies:
        np.testing.assert_array_equal(np.frombuffer(reply.task.outputs[0].data, np.float32), x + x)
