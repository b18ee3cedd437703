"""Device service, health, reflection, the unimplemented services, the HTTP
sidecar and graceful shutdown, against an in-process server."""

from __future__ import annotations

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from held_kernel import HeldKernel
from helpers import spec

from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)


async def test_list_devices_reports_the_real_cpu(channel):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    response = await stub.ListDevices(device_pb2.ListDevicesRequest())
    cpu = response.devices[0]
    assert cpu.name == "cpu:0" and cpu.kind == device_pb2.DEVICE_KIND_CPU
    assert cpu.model and cpu.compute_units >= 1 and cpu.threads >= 1
    assert cpu.memory_total_bytes > cpu.memory_available_bytes > 0
    assert 0.0 <= cpu.status.utilization <= 1.0


async def test_list_devices_filters_by_kind(channel):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    response = await stub.ListDevices(
        device_pb2.ListDevicesRequest(kind=device_pb2.DEVICE_KIND_CUDA)
    )
    assert list(response.devices) == []


async def test_get_unknown_device_is_not_found(channel):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetDevice(device_pb2.GetDeviceRequest(name="cuda:7"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_watch_devices_streams_updates(channel):
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    call = stub.WatchDevices(device_pb2.WatchDevicesRequest(interval_ms=100))
    updates = []
    async for update in call:
        updates.append(update)
        if len(updates) == 3:
            break
    call.cancel()
    assert all(u.statuses[0].name == "cpu:0" for u in updates)
    assert (
        updates[-1].statuses[0].time.ToNanoseconds() > updates[0].statuses[0].time.ToNanoseconds()
    )


async def test_health_reports_serving_per_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "kernelmesh.v1.TaskService",
        "kernelmesh.v1.DeviceService",
        "kernelmesh.v1.LLMService",
    ):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    mesh = await health.Check(
        health_pb2.HealthCheckRequest(service="kernelmesh.v1.OrchestratorService")
    )
    assert mesh.status == health_pb2.HealthCheckResponse.SERVING  # the node RPCs


async def test_reflection_lists_every_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        break
    assert {
        "kernelmesh.v1.DeviceService",
        "kernelmesh.v1.TaskService",
        "kernelmesh.v1.LLMService",
        "kernelmesh.v1.OrchestratorService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_orchestrator_serves_nodes_and_workflows(channel):
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    assert (await stub.ListNodes(orchestrator_pb2.ListNodesRequest())).nodes == []
    assert (await stub.ListWorkflows(orchestrator_pb2.ListWorkflowsRequest())).workflows == []


async def test_sidecar_serves_probes_and_metrics(server, channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", np.ones(4, np.float32))))
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/health/live", "/health/ready", "/health/startup"):
            async with session.get(base + path) as response:
                assert response.status == 200, path
        async with session.get(base + "/metrics") as response:
            text = await response.text()
    assert 'kernelmesh_tasks_total{op="relu",state="SUCCEEDED"}' in text
    assert "kernelmesh_task_run_seconds_bucket" in text
    assert "kernelmesh_queue_depth" in text


async def test_graceful_stop_finishes_queued_work(server, channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    big = np.ones((600, 600), np.float64)
    names = [
        (
            await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("matmul", big, big)))
        ).task.name
        for _ in range(4)
    ]
    await server.stop(grace=30.0)
    states = {server.tasks.get(n, tenant="default").state.name for n in names}
    assert states == {"SUCCEEDED"}


async def test_stop_without_grace_fails_leftover_work_with_unavailable(server, channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    # Held kernels: the work is surely left over at the stop (1500² matmuls, sent
    # one by one, could each end before the next arrived on a fast machine).
    (device,) = (d for d in server.tasks.devices if d.name == "cpu:0")
    held = HeldKernel(device, "matmul")
    try:
        a = np.ones((64, 64), np.float64)
        names = [
            (
                await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("matmul", a, a)))
            ).task.name
            for _ in range(6)
        ]
        await held.wait_started()
        await server.stop(grace=0.0)
    finally:
        held.release()
    left = [server.tasks.get(n, tenant="default") for n in names]
    assert all(t.state.terminal for t in left)
    unavailable = [t for t in left if t.state.name == "FAILED"]
    assert unavailable, "with no grace some work must be reported as not done"
    assert all(t.error.code == 14 and "shut down" in t.error.message for t in unavailable)


async def test_new_work_after_stop_is_refused_with_unavailable(server):
    from kernelmesh.core.errors import Unavailable
    from kernelmesh.core.tasks import TaskSpec

    await server.stop(grace=0.0)
    with pytest.raises(Unavailable, match="shutting down"):
        server.tasks.submit(TaskSpec(op="relu", inputs=[np.ones(4, np.float32)]))


async def test_a_warmed_server_freezes_what_it_started_with(
    server_config, start_server, monkeypatch
):
    """A warmed (long-running) server moves its startup objects out of the cycle
    collector, so full collections under load stop walking them; the kernels' warm-up
    itself is left out here (it is slow on a cold cache)."""
    import dataclasses
    import gc

    from kernelmesh.core import devices

    async def no_refining(found, after=()):
        return None

    monkeypatch.setattr(devices, "prepare", lambda found: None)
    monkeypatch.setattr(devices, "refine_later", no_refining)
    gc.unfreeze()
    try:
        server = await start_server(dataclasses.replace(server_config, warmup=True))
        assert server.started
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1:7"),
        ("localhost", "localhost:7"),
        ("::1", "[::1]:7"),
        ("[::1]", "[::1]:7"),
        ("::", "[::]:7"),
    ],
)
def test_an_ipv6_host_is_bracketed_for_grpc(host, address):
    from kernelmesh.services.server import host_port

    assert host_port(host, 7) == address
