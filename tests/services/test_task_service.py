"""TaskService against an in-process server on a loopback port."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from held_kernel import HeldKernel
from helpers import output, spec, violations

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2


@pytest.fixture
def tasks(channel) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(channel)


async def run(tasks, msg: task_pb2.TaskSpec, **kw) -> task_pb2.Task:
    response = await tasks.RunTask(task_pb2.RunTaskRequest(task=msg), **kw)
    return response.task


async def test_run_task_matmul_returns_numpys_answer(tasks):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 32), dtype=np.float32)
    b = rng.standard_normal((32, 16), dtype=np.float32)
    task = await run(tasks, spec("matmul", a, b))
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert task.device == "cpu:0"
    np.testing.assert_allclose(output(task), a @ b, rtol=1e-5, atol=1e-5)
    assert task.run_duration.ToNanoseconds() > 0


async def test_run_task_large_input_takes_the_queued_path(tasks):
    a = np.arange(1 << 16, dtype=np.float64)
    task = await run(tasks, spec("sum", a))
    assert output(task) == pytest.approx(a.sum())


async def test_unknown_op_is_invalid_argument_naming_op(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, spec("frobnicate", np.ones(3, np.float32)))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.op" in violations(info.value)


async def test_missing_op_is_invalid_argument(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, task_pb2.TaskSpec())
    assert "task.op" in violations(info.value)


async def test_wrong_dtype_names_the_input(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, spec("softmax", np.ones((2, 2), np.int32)))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "task.inputs[0].tensor.dtype" in violations(info.value)


async def test_shape_mismatch_names_the_input(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, spec("matmul", np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)))
    assert "task.inputs[1].tensor.shape" in violations(info.value)


async def test_bad_param_names_the_param(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, spec("sum", np.ones((2, 3), np.float32), axis=7))
    assert "task.params.axis" in violations(info.value)


async def test_data_length_must_match_shape(tasks):
    msg = task_pb2.TaskSpec(op="relu")
    msg.inputs.add(
        tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4], data=b"\0" * 15)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    found = violations(info.value)
    assert "task.inputs[0].tensor.data" in found
    assert "16" in found["task.inputs[0].tensor.data"]


async def test_unspecified_dtype_is_refused(tasks):
    msg = task_pb2.TaskSpec(op="relu")
    msg.inputs.add(tensor=tensor_pb2.Tensor(shape=[1], data=b"\0" * 4))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert "task.inputs[0].tensor.dtype" in violations(info.value)


async def test_element_limit_is_refused_before_allocating(tasks):
    # 2**40 elements would be 4 TiB: the refusal must come from the shape alone.
    msg = task_pb2.TaskSpec(op="relu")
    msg.inputs.add(
        tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20])
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert "task.inputs[0].tensor.shape" in found
    assert "limit" in found["task.inputs[0].tensor.shape"]


async def test_negative_dimension_is_refused(tasks):
    msg = task_pb2.TaskSpec(op="relu")
    msg.inputs.add(tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert "task.inputs[0].tensor.shape" in violations(info.value)


async def test_a_device_this_node_lacks_is_failed_precondition(tasks):
    msg = spec("relu", np.ones(4, np.float32))
    msg.device.name = "opencl:9"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "opencl:9" in info.value.details()


async def test_malformed_device_name_is_invalid_argument(tasks):
    msg = spec("relu", np.ones(4, np.float32))
    msg.device.name = "gpu-zero"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert "task.device.name" in violations(info.value)


async def test_unknown_task_is_not_found(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.GetTask(task_pb2.GetTaskRequest(name="tasks/nope"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_other_tenants_task_is_not_found(tasks):
    submitted = await tasks.SubmitTask(
        task_pb2.SubmitTaskRequest(task=spec("relu", np.ones(4, np.float32))),
        metadata=(("kernelmesh-tenant", "alice"),),
    )
    name = submitted.task.name
    await tasks.GetTask(
        task_pb2.GetTaskRequest(name=name), metadata=(("kernelmesh-tenant", "alice"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.GetTask(
            task_pb2.GetTaskRequest(name=name), metadata=(("kernelmesh-tenant", "bob"),)
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_bad_tenant_metadata_is_invalid_argument(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.ListTasks(
            task_pb2.ListTasksRequest(), metadata=(("kernelmesh-tenant", "a b!"),)
        )
    assert "metadata.kernelmesh-tenant" in violations(info.value)


async def test_submit_then_watch_reaches_succeeded_with_outputs(tasks):
    x = np.linspace(-1, 1, 1 << 16, dtype=np.float32)
    submitted = await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("relu", x)))
    assert submitted.task.state in (
        task_pb2.TASK_STATE_QUEUED,
        task_pb2.TASK_STATE_RUNNING,
        task_pb2.TASK_STATE_SUCCEEDED,
    )
    events = [e async for e in tasks.WatchTask(task_pb2.WatchTaskRequest(name=submitted.task.name))]
    assert events[-1].state == task_pb2.TASK_STATE_SUCCEEDED
    np.testing.assert_array_equal(output(events[-1].task), np.maximum(x, 0))
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=submitted.task.name))
    np.testing.assert_array_equal(output(got.task), np.maximum(x, 0))


async def test_basic_view_omits_output_data(tasks):
    done = await run(tasks, spec("relu", np.ones(8, np.float32)))
    got = await tasks.GetTask(
        task_pb2.GetTaskRequest(name=done.name, view=task_pb2.TASK_VIEW_BASIC)
    )
    assert list(got.task.outputs[0].shape) == [8]
    assert got.task.outputs[0].data == b""


async def test_list_tasks_pages_newest_first_and_filters_state(tasks):
    names = []
    for i in range(5):
        done = await run(tasks, spec("scale", np.ones(2, np.float32), factor=float(i)))
        names.append(done.name)
    page1 = await tasks.ListTasks(task_pb2.ListTasksRequest(page_size=2))
    page2 = await tasks.ListTasks(
        task_pb2.ListTasksRequest(page_size=2, page_token=page1.next_page_token)
    )
    assert [t.name for t in page1.tasks] == names[::-1][:2]
    assert [t.name for t in page2.tasks] == names[::-1][2:4]
    failed = await tasks.ListTasks(task_pb2.ListTasksRequest(state=task_pb2.TASK_STATE_FAILED))
    assert all(t.state == task_pb2.TASK_STATE_FAILED for t in failed.tasks)


async def test_bad_page_token_is_invalid_argument(tasks):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.ListTasks(task_pb2.ListTasksRequest(page_token="garbage"))
    assert "page_token" in violations(info.value)


async def test_stream_tasks_returns_every_result_with_its_correlation_id(tasks):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(8, dtype=np.float32) for _ in range(50)]

    async def requests():
        for i, x in enumerate(xs):
            yield task_pb2.StreamTasksRequest(correlation_id=f"c{i}", task=spec("exp", x))
        yield task_pb2.StreamTasksRequest(correlation_id="bad", task=spec("nope", xs[0]))

    got = {r.correlation_id: r.task async for r in tasks.StreamTasks(requests())}
    assert len(got) == 51
    for i, x in enumerate(xs):
        np.testing.assert_allclose(output(got[f"c{i}"]), np.exp(x), rtol=1e-6)
    assert got["bad"].state == task_pb2.TASK_STATE_FAILED
    assert got["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_stream_tasks_mixes_inline_and_queued_tasks(tasks):
    big = np.ones((256, 256), np.float32)

    async def requests():
        yield task_pb2.StreamTasksRequest(correlation_id="big", task=spec("matmul", big, big))
        yield task_pb2.StreamTasksRequest(correlation_id="small", task=spec("relu", big[0, :4]))

    got = {r.correlation_id: r.task async for r in tasks.StreamTasks(requests())}
    np.testing.assert_allclose(output(got["big"]), big @ big)
    assert output(got["small"]).shape == (4,)


async def test_upload_run_by_reference_keep_outputs_download_delete(tasks):
    a = np.arange(12, dtype=np.float64).reshape(3, 4)

    async def parts():
        yield task_pb2.UploadTensorRequest(
            header=task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3, 4])
        )
        data = a.tobytes()
        yield task_pb2.UploadTensorRequest(chunk=data[:40])
        yield task_pb2.UploadTensorRequest(chunk=data[40:])

    uploaded = (await tasks.UploadTensor(parts())).tensor
    assert uploaded.name.startswith("tensors/") and uploaded.size_bytes == 96
    msg = task_pb2.TaskSpec(op="transpose", keep_outputs=True)
    msg.inputs.add(ref=uploaded.name)
    done = await run(tasks, msg)
    assert not done.outputs and len(done.output_refs) == 1
    parts_out = [
        p
        async for p in tasks.DownloadTensor(
            task_pb2.DownloadTensorRequest(name=done.output_refs[0].name, chunk_size=16)
        )
    ]
    assert parts_out[0].WhichOneof("part") == "header"
    data = b"".join(p.chunk for p in parts_out[1:])
    np.testing.assert_array_equal(np.frombuffer(data, np.float64).reshape(4, 3), a.T)
    await tasks.DeleteTensor(task_pb2.DeleteTensorRequest(name=uploaded.name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.DeleteTensor(task_pb2.DeleteTensorRequest(name=uploaded.name))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_upload_with_short_data_is_invalid_argument(tasks):
    async def parts():
        yield task_pb2.UploadTensorRequest(
            header=task_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4])
        )
        yield task_pb2.UploadTensorRequest(chunk=b"\0" * 8)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await tasks.UploadTensor(parts())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_tensor_reference_is_invalid_argument(tasks):
    msg = task_pb2.TaskSpec(op="relu")
    msg.inputs.add(ref="tensors/missing")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg)
    assert "task.inputs[0].ref" in violations(info.value)


async def test_list_ops_reports_signatures_and_devices(tasks):
    response = await tasks.ListOps(task_pb2.ListOpsRequest())
    by_name = {op.name: op for op in response.ops}
    for name in (
        "add",
        "sub",
        "mul",
        "div",
        "scale",
        "relu",
        "gelu",
        "exp",
        "sum",
        "max",
        "mean",
        "softmax",
        "matmul",
        "transpose",
        "conv2d",
        "fft",
    ):
        assert name in by_name, name
        assert by_name[name].devices[0] == "cpu:0"
    assert tensor_pb2.DTYPE_FLOAT64 in by_name["matmul"].dtypes
    assert {p.name for p in by_name["conv2d"].params} >= {"stride", "padding"}


async def test_list_ops_pages(tasks):
    first = await tasks.ListOps(task_pb2.ListOpsRequest(page_size=5))
    assert len(first.ops) == 5 and first.next_page_token
    rest = await tasks.ListOps(
        task_pb2.ListOpsRequest(page_size=100, page_token=first.next_page_token)
    )
    assert not rest.next_page_token
    assert {o.name for o in first.ops}.isdisjoint({o.name for o in rest.ops})


@pytest.fixture
def server_config(server_config):
    # One worker, so a long task holds the device while others wait in the queue.
    return dataclasses.replace(server_config, workers_per_device=1)


@pytest.fixture
async def occupied(server, tasks) -> AsyncIterator[HeldKernel]:
    """The single worker of cpu:0 busy with a matmul whose kernel is held, so
    tasks submitted next wait in the queue whatever the machine's speed (queued
    matmuls sized for one machine all ran before the next call on a faster one).
    Released after the test, or by it (`occupied.release()`)."""
    (device,) = (d for d in server.tasks.devices if d.name == "cpu:0")
    held = HeldKernel(device, "matmul")
    try:
        a = np.ones((64, 64), np.float64)
        await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("matmul", a, a)))
        await held.wait_started()
        yield held
    finally:
        held.release()


async def _eventually(check, timeout: float = 20.0):
    """Polls `check` (a coroutine function) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not (found := await check()):
        assert loop.time() < give_up, "condition not reached in time"
        await asyncio.sleep(0.02)
    return found


def _listing(tasks, state):
    async def listed():
        reply = await tasks.ListTasks(task_pb2.ListTasksRequest(state=state))
        return [t for t in reply.tasks if t.op == "exp"]

    return listed


async def test_cancel_queued_task_never_runs(tasks, occupied):
    queued = (
        await tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(task=spec("exp", np.ones(1 << 16, np.float32)))
        )
    ).task
    cancelled = await tasks.CancelTask(task_pb2.CancelTaskRequest(name=queued.name))
    assert cancelled.task.state == task_pb2.TASK_STATE_CANCELLED
    got = await tasks.GetTask(task_pb2.GetTaskRequest(name=queued.name))
    assert got.task.state == task_pb2.TASK_STATE_CANCELLED
    assert not got.task.HasField("start_time")


async def test_priority_runs_first_when_the_device_is_busy(tasks, occupied):
    x = np.ones(1 << 16, np.float32)
    low = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=spec("exp", x)))).task
    high_spec = spec("exp", x)
    high_spec.priority = 10
    high = (await tasks.SubmitTask(task_pb2.SubmitTaskRequest(task=high_spec))).task
    occupied.release()  # both wait in the queue: the worker takes them in priority order
    for name in (low.name, high.name):
        async for _ in tasks.WatchTask(task_pb2.WatchTaskRequest(name=name)):
            pass
    low_t = (await tasks.GetTask(task_pb2.GetTaskRequest(name=low.name))).task
    high_t = (await tasks.GetTask(task_pb2.GetTaskRequest(name=high.name))).task
    assert high_t.start_time.ToNanoseconds() < low_t.start_time.ToNanoseconds()


async def test_deadline_is_honoured_and_the_task_is_marked(tasks, occupied):
    msg = spec("exp", np.ones(1 << 16, np.float32))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(tasks, msg, timeout=0.05)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    failed = await _eventually(_listing(tasks, task_pb2.TASK_STATE_FAILED))
    assert failed[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


async def test_client_cancellation_cancels_the_task(tasks, occupied):
    call = tasks.RunTask(task_pb2.RunTaskRequest(task=spec("exp", np.ones(1 << 16, np.float32))))
    (queued,) = await _eventually(_listing(tasks, task_pb2.TASK_STATE_QUEUED))
    call.cancel()
    (cancelled,) = await _eventually(_listing(tasks, task_pb2.TASK_STATE_CANCELLED))
    assert cancelled.name == queued.name
    assert not cancelled.HasField("start_time")
