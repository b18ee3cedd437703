"""Workflows on two orchestrators sharing one real PostgreSQL: a workflow
submitted to X is read, listed and watched through Y; its request id sent to Y
returns it; X is killed (-9) mid-workflow and Y, once X's lease has run out,
claims the workflow and finishes it, with every step run once."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for
from workflow_chains import CHAIN, chain_input, chain_steps, matmul_side, wait_mid_chain

from kernelmesh.clients import Client
from kernelmesh.clients.workflow_types import WorkflowState
from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.e2e

STEP_SECONDS = 0.4  # each step's kernel time, so the kill lands mid-chain
LEASE = "2"


def step_tasks(dsn: str, workflow_id: str) -> dict[str, list[tuple[int, int]]]:
    """Per step, its tasks in the store: (state, attempts that succeeded)."""
    import asyncpg

    async def read() -> dict[str, list[tuple[int, int]]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT t.request_id, t.state, (SELECT count(*) FROM task_attempts a "
                "WHERE a.task_id = t.id AND a.state = 3) FROM tasks t "
                "WHERE t.request_id LIKE $1",
                f"workflows/{workflow_id}/steps/%",
            )
        finally:
            await conn.close()
        found: dict[str, list[tuple[int, int]]] = {}
        for request_id, state, ok in rows:
            step = request_id.split("/steps/", 1)[1]
            found.setdefault(step, []).append((state, ok))
        return found

    return asyncio.run(read())


def test_a_workflow_is_shared_by_both_orchestrators_and_survives_its_holder(dsn, procs):
    x = procs.orchestrator("--store", dsn, "--lease-seconds", LEASE, "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", LEASE, "--name", "orch-y", name="y")
    procs.node("node-a", f"{x.target},{y.target}", "--backends", "cpu")
    for orch in (x, y):
        wait_for(lambda o=orch: ready_nodes(o.target) == {"node-a"}, what=f"node-a on {orch.name}")

    with Client(x.target, timeout=60) as km:
        # Steps sized to the CPU, so X dies with some steps done and some not.
        n = matmul_side(km, STEP_SECONDS)
        a = chain_input(n)
        ref = km.upload(a)  # kept on node-a, found by either orchestrator
        steps = chain_steps(CHAIN)
        info = km.workflows.submit({"steps": steps}, {"a": ref}, request_id="shared-1")

    events: list = []
    with Client(y.target, timeout=60) as on_y:
        # Y answers for the workflow X holds.
        seen = on_y.workflows.get(info.name)
        assert seen.name == info.name and seen.state is WorkflowState.RUNNING
        assert info.name in [w.name for w in on_y.workflows.list()]
        assert (
            on_y.workflows.submit({"steps": steps}, {"a": ref}, request_id="shared-1").name
            == info.name
        ), "the same request id through Y returns X's workflow"
        with pytest.raises(Exception) as refused:
            on_y.workflows.submit({"steps": steps[:2]}, {"a": ref}, request_id="shared-1")
        assert "request_id" in str(refused.value), refused.value

        watcher = threading.Thread(
            target=lambda: events.extend(on_y.workflows.watch(info.name, timeout=240)),
            daemon=True,
        )
        watcher.start()

        done = wait_mid_chain(on_y.workflows, info.name, CHAIN)
        finished_before = {s.id: s.task for s in done}
        x.kill9()

        final = on_y.workflows.wait(info.name, timeout=180)
        assert final.state is WorkflowState.SUCCEEDED, final
        for step_id, task in finished_before.items():
            assert final.step(step_id).task == task, f"{step_id} ran again"
        watcher.join(30)
        assert not watcher.is_alive()
        assert events and events[-1].state is WorkflowState.SUCCEEDED, events[-1:]
        assert {e.step for e in events if e.step} >= {f"s{i}" for i in range(len(done), CHAIN)}

        expected = a.astype(np.float64) @ a.astype(np.float64)
        for _ in range(1, CHAIN):
            expected = expected @ a.astype(np.float64)
        got = on_y.download(final.step(f"s{CHAIN - 1}").outputs[0])
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * scale)

    per_step = step_tasks(dsn, info.name.removeprefix("workflows/"))
    assert per_step == {f"s{i}": [(3, 1)] for i in range(CHAIN)}, (
        "each step one task, succeeded by one attempt"
    )
    assert "claimed 1 running workflows" in y.output()


def test_a_cancel_through_another_orchestrator_reaches_the_holder(dsn, procs):
    x = procs.orchestrator("--store", dsn, "--lease-seconds", LEASE, "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", LEASE, "--name", "orch-y", name="y")
    procs.node("node-a", x.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(x.target) == {"node-a"}, what="node-a on X")
    with Client(x.target, timeout=60) as km:
        # A chain long enough (8 steps of 2000x2000 matmuls) to be cancelled mid-run.
        ref = km.upload(np.ones((2000, 2000), np.float32))
        info = km.workflows.submit({"steps": chain_steps(CHAIN)}, {"a": ref})
    with grpc.insecure_channel(y.target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        got = stub.GetWorkflow(orchestrator_pb2.GetWorkflowRequest(name=info.name), timeout=30)
        assert got.workflow.state == orchestrator_pb2.WORKFLOW_STATE_RUNNING, "ran too fast"
        reply = stub.CancelWorkflow(
            orchestrator_pb2.CancelWorkflowRequest(name=info.name), timeout=30
        )
        # Y returns once X has cancelled it (within X's next round).
        assert reply.workflow.state == orchestrator_pb2.WORKFLOW_STATE_CANCELLED, reply
    with Client(x.target, timeout=30) as km:
        assert km.workflows.get(info.name).state is WorkflowState.CANCELLED

    # A second workflow, through Y: either orchestrator lists both, newest first,
    # page by page, and filters by state.
    with Client(y.target, timeout=60) as km:
        other = km.workflows.submit(
            {"steps": [{"id": "r", "task": {"op": "relu", "inputs": ["${inputs.a}"]}}]},
            {"a": ref},
        )
        assert km.workflows.wait(other.name, timeout=60).state is WorkflowState.SUCCEEDED
    with grpc.insecure_channel(x.target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        first = stub.ListWorkflows(orchestrator_pb2.ListWorkflowsRequest(page_size=1), timeout=30)
        assert [w.name for w in first.workflows] == [other.name] and first.next_page_token
        second = stub.ListWorkflows(
            orchestrator_pb2.ListWorkflowsRequest(page_size=1, page_token=first.next_page_token),
            timeout=30,
        )
        assert [w.name for w in second.workflows] == [info.name]
        assert not second.next_page_token
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListWorkflows(
                orchestrator_pb2.ListWorkflowsRequest(page_token="not-a-token"), timeout=30
            )
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT, bad.value
    with grpc.insecure_channel(y.target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        cancelled = stub.ListWorkflows(
            orchestrator_pb2.ListWorkflowsRequest(state=orchestrator_pb2.WORKFLOW_STATE_CANCELLED),
            timeout=30,
        )
        assert [w.name for w in cancelled.workflows] == [info.name]
        assert cancelled.workflows[0].step_statuses, "the steps come with it"
