"""The workflow RPCs of OrchestratorService against an in-process server."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from held_kernel import HeldKernel
from helpers import violations
from llm_setup import write_llm_config
from llm_upstream import Upstream

from kernelmesh.clients import tensors
from kernelmesh.v1 import orchestrator_pb2 as o
from kernelmesh.v1 import orchestrator_pb2_grpc, task_pb2, task_pb2_grpc

SUCCEEDED = o.WORKFLOW_STATE_SUCCEEDED


@pytest.fixture
def stub(channel) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def step(step_id: str, op: str, *inputs, depends_on=(), **params) -> o.WorkflowStep:
    msg = o.WorkflowStep(id=step_id, depends_on=list(depends_on))
    msg.task.op = op
    for item in inputs:
        if isinstance(item, str):
            msg.task.inputs.add(ref=item)
        else:
            msg.task.inputs.add(tensor=tensors.to_proto(item))
    if params:
        msg.task.params.update(params)
    return msg


async def wait_done(stub, name: str, tenant: str = "") -> o.Workflow:
    meta = (("kernelmesh-tenant", tenant),) if tenant else None
    last = None
    async for event in stub.WatchWorkflow(o.WatchWorkflowRequest(name=name), metadata=meta):
        if event.HasField("workflow"):
            last = event.workflow
    assert last is not None and last.state != o.WORKFLOW_STATE_RUNNING
    return last


async def download(channel, name: str) -> np.ndarray:
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    header, chunks = None, []
    async for part in tasks.DownloadTensor(task_pb2.DownloadTensorRequest(name=name)):
        if part.HasField("header"):
            header = part.header
        else:
            chunks.append(part.chunk)
    dtype = tensors.dtype_name(header.dtype)
    return np.frombuffer(b"".join(chunks), dtype=dtype).reshape(tuple(header.shape))


async def test_intermediate_outputs_are_deleted_unless_kept(stub, channel):
    x = np.arange(-3, 3, dtype=np.float32)
    kept_by_step = step("a", "relu", "${inputs.x}")
    kept_by_step.keep_outputs = True
    kept_by_task = step("b", "relu", "${a.outputs[0]}")
    kept_by_task.task.keep_outputs = True
    request = o.SubmitWorkflowRequest(
        steps=[
            kept_by_step,
            kept_by_task,
            step("c", "relu", "${b.outputs[0]}"),
            step("d", "relu", "${c.outputs[0]}"),
        ]
    )
    request.inputs["x"].tensor.CopyFrom(tensors.to_proto(x))
    done = await wait_done(stub, (await stub.SubmitWorkflow(request)).workflow.name)
    assert done.state == SUCCEEDED
    assert [s.keep_outputs for s in done.steps] == [True, True, False, False]
    outputs = {s.id: s.outputs[0].name for s in done.step_statuses}
    for kept in ("a", "b", "d"):
        np.testing.assert_allclose(await download(channel, outputs[kept]), np.maximum(x, 0))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await download(channel, outputs["c"])
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_submit_runs_the_dag_and_outputs_stay_on_the_server(stub, channel):
    x = np.arange(-3, 3, dtype=np.float32)
    request = o.SubmitWorkflowRequest(
        steps=[
            step("pos", "relu", "${inputs.x}"),
            step("twice", "add", "${pos.outputs[0]}", "${pos.outputs[0]}"),
        ]
    )
    request.inputs["x"].tensor.CopyFrom(tensors.to_proto(x))
    submitted = (await stub.SubmitWorkflow(request)).workflow
    assert submitted.name.startswith("workflows/")
    done = await wait_done(stub, submitted.name)
    assert done.state == SUCCEEDED
    statuses = {s.id: s for s in done.step_statuses}
    assert statuses["twice"].state == o.WORKFLOW_STEP_STATE_SUCCEEDED
    assert done.step_tasks["pos"].startswith("tasks/")
    (ref,) = statuses["twice"].outputs
    np.testing.assert_allclose(await download(channel, ref.name), 2 * np.maximum(x, 0))
    got = (await stub.GetWorkflow(o.GetWorkflowRequest(name=submitted.name))).workflow
    assert got.state == SUCCEEDED and got.inputs["x"].name.startswith("tensors/")


async def test_bad_workflow_is_invalid_argument_with_a_violation_per_problem(stub):
    request = o.SubmitWorkflowRequest(
        steps=[
            step("a", "relu", "${b.outputs[0]}"),
            step("b", "relu", "${a.outputs[0]}"),
            step("c", "matmull", np.ones(2, np.float32)),
            step("d", "relu", "${nowhere.outputs[0]}"),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitWorkflow(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert "nowhere" in found["steps[3].task.inputs[0].ref"]
    assert any(d.startswith("cycle: ") for d in found.values()), found


async def test_too_many_steps_is_invalid_argument(stub):
    request = o.SubmitWorkflowRequest(
        steps=[step(f"s{i}", "relu", np.ones(1, np.float32)) for i in range(10_000)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitWorkflow(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(info.value)) == ["steps"]


async def test_request_id_makes_submission_idempotent(stub):
    request = o.SubmitWorkflowRequest(
        steps=[step("a", "relu", np.ones(3, np.float32))], request_id="wf-1"
    )
    first = (await stub.SubmitWorkflow(request)).workflow
    again = (await stub.SubmitWorkflow(request)).workflow
    assert again.name == first.name
    listed = (await stub.ListWorkflows(o.ListWorkflowsRequest())).workflows
    assert [w.name for w in listed] == [first.name]


async def test_other_tenants_workflow_is_not_found(stub):
    request = o.SubmitWorkflowRequest(steps=[step("a", "relu", np.ones(3, np.float32))])
    mine = (await stub.SubmitWorkflow(request, metadata=(("kernelmesh-tenant", "alice"),))).workflow
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetWorkflow(
            o.GetWorkflowRequest(name=mine.name), metadata=(("kernelmesh-tenant", "bob"),)
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    bobs = await stub.ListWorkflows(
        o.ListWorkflowsRequest(), metadata=(("kernelmesh-tenant", "bob"),)
    )
    assert list(bobs.workflows) == []


async def test_watch_reports_step_transitions_with_durations(stub):
    request = o.SubmitWorkflowRequest(
        steps=[
            step("a", "relu", np.ones(3, np.float32)),
            step("b", "relu", "${a.outputs[0]}"),
        ]
    )
    name = (await stub.SubmitWorkflow(request)).workflow.name
    events = [e async for e in stub.WatchWorkflow(o.WatchWorkflowRequest(name=name))]
    assert events[0].HasField("workflow") and events[-1].state == SUCCEEDED
    ends = [e for e in events if e.step and e.step_state == o.WORKFLOW_STEP_STATE_SUCCEEDED]
    assert all(e.HasField("step_duration") for e in ends)


def _held_matmuls(server) -> HeldKernel:
    (device,) = (d for d in server.tasks.devices if d.name == "cpu:0")
    return HeldKernel(device, "matmul")


async def test_cancel_and_list_by_state(server, stub):
    # Held: no step can end before the cancel (eight free-running 900² matmuls
    # could all end before it came on a fast machine, and a finished workflow stays).
    held = _held_matmuls(server)
    try:
        a = np.ones((128, 128), np.float64)  # queued: smaller steps run inline
        request = o.SubmitWorkflowRequest(
            steps=[step(f"m{i}", "matmul", "${inputs.a}", "${inputs.a}") for i in range(8)]
        )
        request.inputs["a"].tensor.CopyFrom(tensors.to_proto(a))
        name = (await stub.SubmitWorkflow(request)).workflow.name
        cancelled = (await stub.CancelWorkflow(o.CancelWorkflowRequest(name=name))).workflow
    finally:
        held.release()
    assert cancelled.state == o.WORKFLOW_STATE_CANCELLED
    listed = await stub.ListWorkflows(o.ListWorkflowsRequest(state=o.WORKFLOW_STATE_CANCELLED))
    assert [w.name for w in listed.workflows] == [name]


@pytest.fixture
async def llm_channel(server_config, tmp_path, start_server):
    async with Upstream() as upstream:
        path = write_llm_config(tmp_path, upstream.openai_url, upstream.ollama_url)
        srv = await start_server(dataclasses.replace(server_config, llm_config=str(path)))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as chan:
            yield chan, upstream


async def test_llm_generate_step_feeds_the_next_prompt(llm_channel):
    channel, _ = llm_channel
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    first = o.WorkflowStep(id="draft")
    first.llm.update({"generate": {"model": "chat", "prompt": "hello there", "max_tokens": 16}})
    second = o.WorkflowStep(id="review")
    second.llm.update(
        {"generate": {"model": "chat", "prompt": "check: ${draft.text}", "max_tokens": 16}}
    )
    request = o.SubmitWorkflowRequest(steps=[first, second])
    name = (await stub.SubmitWorkflow(request)).workflow.name
    done = await wait_done(stub, name)
    assert done.state == SUCCEEDED, done.error
    texts = {s.id: s.text for s in done.step_statuses}
    assert texts["draft"] == "echo hello there"
    # the fake upstream echoes the last user message: the substituted prompt
    assert texts["review"] == "echo check: echo hello there"


async def test_llm_step_retries_an_upstream_outage(llm_channel):
    channel, upstream = llm_channel
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    upstream.fail_with(503, times=1)
    msg = o.WorkflowStep(id="gen")
    msg.llm.update({"generate": {"model": "chat", "prompt": "hi", "max_tokens": 8}})
    msg.retry_policy.maximum_attempts = 3
    msg.retry_policy.initial_interval.FromMilliseconds(10)
    name = (await stub.SubmitWorkflow(o.SubmitWorkflowRequest(steps=[msg]))).workflow.name
    done = await wait_done(stub, name)
    assert done.state == SUCCEEDED, done.error
    assert done.step_statuses[0].attempt == 2


async def test_unknown_model_is_refused_at_submit(llm_channel):
    channel, _ = llm_channel
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    msg = o.WorkflowStep(id="gen")
    msg.llm.CopyFrom(struct_pb2.Struct())
    msg.llm.update({"generate": {"model": "nope", "prompt": "hi"}})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitWorkflow(o.SubmitWorkflowRequest(steps=[msg]))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in violations(info.value)["steps[0].llm.generate.model"]


async def test_text_where_a_tensor_is_needed_is_refused(stub):
    gen = o.WorkflowStep(id="gen")
    gen.llm.update({"generate": {"model": "x", "prompt": "hi"}})
    request = o.SubmitWorkflowRequest(steps=[gen, step("use", "relu", "${gen.text}")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitWorkflow(request)
    assert "tensor is needed" in violations(info.value)["steps[1].task.inputs[0].ref"]


async def test_watch_end_only_sends_the_workflow_and_its_end_without_steps(server, stub):
    x = np.ones((128, 128), np.float32)  # queued: smaller steps run inline
    request = o.SubmitWorkflowRequest(
        steps=[
            step("a", "matmul", x, x),
            step("b", "matmul", "${a.outputs[0]}", x),
            step("c", "relu", "${b.outputs[0]}"),
        ]
    )
    # Held until both watches have begun, so they watch it run (1000² steps, meant
    # to last long enough, could end before a watch began on a fast machine).
    held = _held_matmuls(server)
    try:
        name = (await stub.SubmitWorkflow(request)).workflow.name
        calls = [
            stub.WatchWorkflow(o.WatchWorkflowRequest(name=name, end_only=end_only))
            for end_only in (False, True)
        ]
        firsts = [await call.read() for call in calls]
    finally:
        held.release()

    async def rest(call) -> list:
        got = []
        while (event := await call.read()) is not grpc.aio.EOF:
            got.append(event)
        return got

    every = [firsts[0], *await rest(calls[0])]
    ends = [firsts[1], *await rest(calls[1])]
    assert {e.step for e in every if e.step} == {"a", "b", "c"}, "watched while it ran"
    assert len(ends) == 2 and all(not e.step for e in ends), ends
    assert ends[0].workflow.state == o.WORKFLOW_STATE_RUNNING
    assert ends[-1].workflow.state == SUCCEEDED
