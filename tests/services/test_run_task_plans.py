"""RunTask and StreamTasks reuse the plan of a call shape that ran inline before:
repeated calls answer as the first did, and bad input is still refused by field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from helpers import output, spec, violations

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2


@pytest.fixture
def tasks(channel) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(channel)


async def test_repeated_calls_of_one_shape_each_get_their_own_answer(tasks):
    names = set()
    for i in range(4):
        x = np.arange(-8, 8, dtype=np.float32) * (i - 1.5)
        reply = await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", x)))
        np.testing.assert_array_equal(output(reply.task), np.maximum(x, 0))
        assert reply.task.state == task_pb2.TASK_STATE_SUCCEEDED
        names.add(reply.task.name)
        got = await tasks.GetTask(task_pb2.GetTaskRequest(name=reply.task.name))
        assert got.task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert len(names) == 4


async def test_a_known_shape_with_wrong_bytes_is_refused_by_field(tasks):
    x = np.ones(4, np.float32)
    for _ in range(2):  # the second call has a plan for this shape
        await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", x)))
    bad = task_pb2.TaskSpec(op="relu")
    bad.inputs.add(
        tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 15)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.RunTask(task_pb2.RunTaskRequest(task=bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task.inputs[0].tensor.data" in violations(info.value)


async def test_params_labels_and_other_shapes_do_not_take_a_plan(tasks):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("sum", x, axis=1)))
    reply = await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("sum", x, axis=0)))
    np.testing.assert_array_equal(output(reply.task), x.sum(axis=0))
    labelled = spec("relu", x)
    labelled.labels["run"] = "7"
    for _ in range(2):
        reply = await tasks.RunTask(task_pb2.RunTaskRequest(task=labelled))
        assert dict(reply.task.labels) == {"run": "7"}
    y = np.arange(6, dtype=np.float32).reshape(2, 3) - 3
    reply = await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("relu", y)))
    np.testing.assert_array_equal(output(reply.task), np.maximum(y, 0))


async def test_stream_items_of_one_shape_each_get_their_own_answer(tasks):
    xs = [np.arange(-4, 4, dtype=np.float32) * (i - 2) for i in range(5)]

    async def requests():
        for i, x in enumerate(xs):
            yield task_pb2.StreamTasksRequest(correlation_id=str(i), task=spec("relu", x))

    answers = {a.correlation_id: a async for a in tasks.StreamTasks(requests())}
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(output(answers[str(i)].task), np.maximum(x, 0))
