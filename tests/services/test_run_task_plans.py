"""RunTask and StreamTasks reuse the plan of a call shape that ran inline before:
repeated calls answer as the first did, and bad input is still refused by field."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from helpers import output, rich_status, spec, violations

from kernelmesh.core import metrics
from kernelmesh.core.limits import Quotas
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


# -- the reply of a planned call (services/convert.py: reply_template, fill_planned)

ALICE = (("kernelmesh-tenant", "alice"),)


async def test_a_planned_reply_is_the_task_as_get_task_gives_it(tasks):
    replies = []
    for i in range(3):  # the first plans the shape, the second makes its reply template
        x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) * (i + 1)
        msg = spec("relu", x)
        msg.priority = 5
        reply = await tasks.RunTask(task_pb2.RunTaskRequest(task=msg), metadata=ALICE)
        np.testing.assert_array_equal(output(reply.task), np.maximum(x, 0))
        replies.append(reply.task)
    for task in replies:
        got = await tasks.GetTask(
            task_pb2.GetTaskRequest(name=task.name, view=task_pb2.TASK_VIEW_FULL), metadata=ALICE
        )
        assert task == got.task  # GetTask writes it with convert.fill_task
        assert (task.tenant, task.priority, task.op) == ("alice", 5, "relu")
        assert task.end_time.ToNanoseconds() >= task.start_time.ToNanoseconds() > 0
        assert task.placement.reason and task.device == task.placement.device
    assert len({t.name for t in replies}) == 3


async def test_planned_stream_answers_are_the_tasks_as_get_task_gives_them(tasks):
    xs = [np.linspace(-1, 1, 8, dtype=np.float32) * i for i in range(4)]

    async def requests():
        for i, x in enumerate(xs):
            yield task_pb2.StreamTasksRequest(correlation_id=str(i), task=spec("relu", x))

    answers = [a async for a in tasks.StreamTasks(requests())]
    assert sorted(a.correlation_id for a in answers) == ["0", "1", "2", "3"]
    for answer in answers:
        got = await tasks.GetTask(
            task_pb2.GetTaskRequest(name=answer.task.name, view=task_pb2.TASK_VIEW_FULL)
        )
        assert answer.task == got.task
        np.testing.assert_array_equal(
            output(answer.task), np.maximum(xs[int(answer.correlation_id)], 0)
        )


async def test_planned_calls_are_counted_in_the_task_metrics(tasks):
    x = np.ones(5, np.float32)
    first = await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("gelu", x)))  # plans it
    key_done, key_run = ("gelu", "SUCCEEDED"), ("gelu", first.task.device)
    done = metrics.TASKS.counts().get(key_done, (0, 0.0))[0]
    ran = metrics.TASK_RUN_SECONDS.counts().get(key_run, (0, 0.0))[0]
    for _ in range(4):
        await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("gelu", x)))
    assert metrics.TASKS.counts()[key_done][0] == done + 4
    assert metrics.TASK_RUN_SECONDS.counts()[key_run][0] == ran + 4


def test_fill_planned_refuses_an_output_unlike_its_template():
    from kernelmesh.core.tasks import Task, TaskState
    from kernelmesh.services import convert

    task = Task(
        id="1" * 32,
        seq=1,
        op="relu",
        tenant="default",
        priority=0,
        labels={},
        keep_outputs=False,
        device=None,  # type: ignore[arg-type]
        call=None,
        inputs=None,
        state=TaskState.SUCCEEDED,
        outputs=[np.arange(4, dtype=np.float32)],
        start_time=1.0,
        end_time=2.0,
        run_seconds=0.5,
        device_name="cpu:0",
        placement_reason="the only device",
    )
    template = convert.reply_template(task)
    msg = task_pb2.Task()
    assert convert.fill_planned(msg, template, task)
    assert msg == convert.task_to_proto(task)
    for other in (
        np.arange(4, dtype=np.float64),  # another dtype
        np.arange(4, dtype=">f4"),  # big-endian: fill_task converts it
        np.arange(8, dtype=np.float32)[::2],  # not contiguous
        np.arange(4, dtype=np.float32).reshape(2, 2),  # another shape
    ):
        task.outputs = [other]
        msg = task_pb2.Task()
        assert not convert.fill_planned(msg, template, task)
        assert msg == task_pb2.Task()
    task.outputs = [np.arange(4, dtype=np.float32)]
    task.state = TaskState.FAILED
    assert not convert.fill_planned(task_pb2.Task(), template, task)


async def test_a_planned_call_past_the_tenant_quota_is_resource_exhausted(
    server_config, start_server
):
    quotas = Quotas(max_bytes_per_tenant=1 << 20)
    server = await start_server(dataclasses.replace(server_config, quotas=quotas))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        stub = task_pb2_grpc.TaskServiceStub(chan)
        x = np.ones(1024, np.float32)  # holds 8 KiB while it runs, inputs and output
        run = task_pb2.RunTaskRequest(task=spec("relu", x))
        await stub.RunTask(run)  # plans the shape

        # what the tenant's stored tensors would hold: less room left than the task needs
        server.ledger.reserve("default", (1 << 20) - 4096)
        held = server.ledger.bytes_of("default")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RunTask(run)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert any(
            d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in rich_status(info.value).details
        )
        assert server.ledger.bytes_of("default") == held  # the refused call holds nothing
        server.ledger.release("default", (1 << 20) - 4096)
        reply = await stub.RunTask(run)
        np.testing.assert_array_equal(output(reply.task), x)
        assert server.ledger.bytes_of("default") == 0


def test_servicers_are_served_by_generic_handlers_alone():
    """grpc.aio waits for the next call with one task per registered method: the
    registrar leaves registration out, and the generic handler serves every method."""
    from kernelmesh.services.request_guard import GuardedRegistrar

    class Recording:
        def __init__(self) -> None:
            self.generic: list = []
            self.registered: list = []

        def add_generic_rpc_handlers(self, handlers) -> None:
            self.generic += handlers

        def add_registered_method_handlers(self, service, handlers) -> None:
            self.registered.append(service)

    class Details:
        method = "/kernelmesh.v1.TaskService/RunTask"
        invocation_metadata = ()

    server = Recording()
    task_pb2_grpc.add_TaskServiceServicer_to_server(
        task_pb2_grpc.TaskServiceServicer(), GuardedRegistrar(server)
    )
    assert server.registered == []
    handler = server.generic[0].service(Details())
    assert handler is not None and handler.unary_unary is not None
    assert server.generic[0].service(Details()) is handler  # wrapped once, then looked up
