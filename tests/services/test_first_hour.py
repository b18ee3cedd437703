"""What a new user's first mistakes meet on the server side: Health/List,
GetTask without a name, an unknown op, and a WatchTask whose result is too big
for gRPC's usual 4 MiB receive limit."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import spec, violations

from kernelmesh.services.task_servicer import WATCH_OUTPUTS_MAX_BYTES
from kernelmesh.v1 import task_pb2, task_pb2_grpc


async def test_health_list_names_every_service_without_logging_an_error(channel, caplog):
    caplog.set_level(logging.ERROR)
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.List(health_pb2.HealthListRequest())
    statuses = {name: s.status for name, s in response.statuses.items()}
    assert statuses[""] == health_pb2.HealthCheckResponse.SERVING
    assert statuses["kernelmesh.v1.TaskService"] == health_pb2.HealthCheckResponse.SERVING
    # The mesh's node RPCs answer (workflows and API keys are still UNIMPLEMENTED).
    assert statuses["kernelmesh.v1.OrchestratorService"] == (health_pb2.HealthCheckResponse.SERVING)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_get_task_without_a_name_is_invalid_argument_naming_the_field(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tasks.GetTask(task_pb2.GetTaskRequest(name=""))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in violations(caught.value)


async def test_watch_task_without_a_name_is_invalid_argument(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in tasks.WatchTask(task_pb2.WatchTaskRequest(name="")):
            pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_op_suggests_the_closest_one(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    msg = spec("relu", np.ones(4, np.float32))
    msg.op = "rleu"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tasks.RunTask(task_pb2.RunTaskRequest(task=msg))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "did you mean 'relu'" in violations(caught.value)["task.op"]


async def _last_event(tasks, name: str) -> task_pb2.WatchTaskResponse:
    last = None
    async for event in tasks.WatchTask(task_pb2.WatchTaskRequest(name=name), timeout=60):
        last = event
    assert last is not None
    return last


async def test_watch_task_of_a_big_result_says_where_to_read_it(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    big = np.ones((1000, 1000), np.float32)  # 4 MB out: what grpcurl could not read
    submitted = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("relu", big)))
    last = await _last_event(tasks, submitted.task.name)

    assert last.state == task_pb2.TASK_STATE_SUCCEEDED
    assert last.ByteSize() < WATCH_OUTPUTS_MAX_BYTES
    assert not last.HasField("task")
    assert "GetTask" in last.message and "TASK_VIEW_FULL" in last.message
    full = await tasks.GetTask(
        task_pb2.GetTaskRequest(name=submitted.task.name, view=task_pb2.TASK_VIEW_FULL)
    )
    assert len(full.task.outputs[0].data) == big.nbytes


async def test_watch_task_of_a_small_result_carries_the_outputs(channel):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    small = np.full(64, -1.0, np.float32)
    submitted = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("relu", small)))
    last = await _last_event(tasks, submitted.task.name)
    assert last.state == task_pb2.TASK_STATE_SUCCEEDED
    assert len(last.task.outputs[0].data) == small.nbytes
