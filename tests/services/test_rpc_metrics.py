"""Per-RPC metrics: grpc_server_started_total, grpc_server_handled_total by
status code, and the grpc_server_handling_seconds histogram, read from the
registry that /metrics serves."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from helpers import spec
from prometheus_client import REGISTRY

from kernelmesh.v1 import task_pb2, task_pb2_grpc

TASKS = ("grpc_service", "kernelmesh.v1.TaskService")


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def unary(method: str, **extra: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": TASKS[1], "grpc_method": method, **extra}


async def test_run_task_counts_started_handled_ok_and_its_latency(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    before = {
        "started": sample("grpc_server_started_total", **unary("RunTask")),
        "ok": sample("grpc_server_handled_total", **unary("RunTask", grpc_code="OK")),
        "timed": sample("grpc_server_handling_seconds_count", **unary("RunTask")),
    }
    for _ in range(3):
        await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", np.ones(8, np.float32))))

    assert sample("grpc_server_started_total", **unary("RunTask")) == before["started"] + 3
    ok = sample("grpc_server_handled_total", **unary("RunTask", grpc_code="OK"))
    assert ok == before["ok"] + 3
    assert sample("grpc_server_handling_seconds_count", **unary("RunTask")) == before["timed"] + 3
    assert sample("grpc_server_handling_seconds_sum", **unary("RunTask")) > 0


async def test_a_rejected_call_is_counted_under_its_status_code(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    labels = unary("RunTask", grpc_code="INVALID_ARGUMENT")
    before = sample("grpc_server_handled_total", **labels)
    msg = spec("relu", np.ones(8, np.float32))
    msg.op = "nope"
    with pytest.raises(grpc.aio.AioRpcError):
        await tasks.RunTask(task_pb2.RunTaskRequest(task=msg))
    # abort sends the status before the handler returns: the count follows within a
    # few turns of the server's loop
    for _ in range(200):
        if sample("grpc_server_handled_total", **labels) > before:
            break
        await asyncio.sleep(0.01)
    assert sample("grpc_server_handled_total", **labels) == before + 1


async def test_a_server_stream_is_counted_once_with_its_type(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    submitted = await tasks.SubmitTask(
        task_pb2.SubmitTaskRequest(task=spec("relu", np.ones(8, np.float32)))
    )
    labels = {"grpc_type": "server_stream", "grpc_service": TASKS[1], "grpc_method": "WatchTask"}
    before = sample("grpc_server_handled_total", **labels, grpc_code="OK")
    events = [e async for e in tasks.WatchTask(task_pb2.WatchTaskRequest(name=submitted.task.name))]
    assert events[-1].state == task_pb2.TASK_STATE_SUCCEEDED
    assert sample("grpc_server_handled_total", **labels, grpc_code="OK") == before + 1


async def test_a_bidi_stream_is_counted_with_its_type(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    labels = {"grpc_type": "bidi_stream", "grpc_service": TASKS[1], "grpc_method": "StreamTasks"}
    before = sample("grpc_server_started_total", **labels)

    async def requests():
        for i in range(5):
            yield task_pb2.StreamTasksRequest(
                correlation_id=str(i), task=spec("relu", np.ones(4, np.float32))
            )

    answers = [r async for r in tasks.StreamTasks(requests())]
    assert len(answers) == 5
    assert sample("grpc_server_started_total", **labels) == before + 1


async def test_with_auth_on_a_call_refused_by_the_key_check_is_counted(
    server_config, start_server, tmp_path
):
    # with auth on, the metrics run as the outermost interceptor: a call the key
    # check refuses never reaches a handler, and is still counted
    config = dataclasses.replace(server_config, auth=True, state_dir=str(tmp_path / "state"))
    server = await start_server(config)
    labels = unary("RunTask", grpc_code="UNAUTHENTICATED")
    before = sample("grpc_server_handled_total", **labels)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        tasks = task_pb2_grpc.TaskServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", np.ones(4, np.float32))))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(200):
        if sample("grpc_server_handled_total", **labels) > before:
            break
        await asyncio.sleep(0.01)
    assert sample("grpc_server_handled_total", **labels) == before + 1
