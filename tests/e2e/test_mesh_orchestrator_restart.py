"""kill -9 of a real `kernelmesh orchestrator` (SQLite state dir) with one real
node: restarted on the same port and state, it recovers its unfinished tasks
and workflow steps before any node has joined again. They wait for the node
(parked) instead of failing, and each runs to SUCCEEDED exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from mesh_procs import Procs, ready_nodes, wait_for

from kernelmesh.clients import Client
from kernelmesh.clients.workflow_types import StepState, WorkflowState
from kernelmesh.v1 import task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e

PROBE = 800  # a matmul timed to size the work
TASK_SECONDS = 0.5  # each task's kernel time on the node, so the kill lands mid-batch
MAX_N = 3200
TASKS = 16
CHAIN = 8
BASIC = task_pb2.TASK_VIEW_BASIC  # attempts, and outputs without their data
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED


def start_mesh(procs: Procs, state: Path, port: int = 0):
    # A lease long enough that a node busy with the matmuls keeps it on a loaded machine.
    return procs.orchestrator("--state-dir", str(state), "--lease-seconds", "10", port=port)


def sized(km: Client, seconds: float) -> int:
    """A matmul side that takes about `seconds` on the node (from a timed probe: a
    fixed size ran everything between two polls on a fast machine)."""
    probe = np.ones((PROBE, PROBE), np.float32)
    one = min(km.run_task("matmul", probe, probe).run_seconds for _ in range(5))
    return int(min(MAX_N, max(PROBE, PROBE * (seconds / max(one, 1e-4)) ** (1 / 3))))


def restart(procs: Procs, orch, state: Path):
    orch.kill9()
    again = start_mesh(procs, state, port=orch.port)
    # The node rejoins by itself once the orchestrator answers again.
    wait_for(lambda: ready_nodes(again.target) == {"na"}, timeout=90, what="node na rejoined")
    return again


def attempts_of(target: str, names: list[str], timeout: float = 240.0) -> dict:
    """Every task once terminal, its attempts included."""
    deadline = time.monotonic() + timeout
    done: dict[str, task_pb2.Task] = {}
    with grpc.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        while time.monotonic() < deadline and len(done) < len(names):
            for name in names:
                if name not in done:
                    task = stub.GetTask(task_pb2.GetTaskRequest(name=name, view=BASIC)).task
                    if task.state >= SUCCEEDED:
                        done[name] = task
            time.sleep(0.1)
    assert len(done) == len(names), f"{len(names) - len(done)} tasks did not finish"
    return done


def test_tasks_unfinished_at_kill_9_run_once_the_node_rejoins(procs, tmp_path: Path):
    state = tmp_path / "state"
    orch = start_mesh(procs, state)
    procs.node("na", orch.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(orch.target) == {"na"}, what="node na READY")
    with Client(orch.target, timeout=120) as km:
        n = sized(km, TASK_SECONDS)
        # Uploaded once (held on the node): inline inputs made each submission
        # journal its own copy, and the first tasks finished before the last was in.
        a = km.upload(np.ones((n, n), np.float32))
        names = [km.submit("matmul", a, a).name for _ in range(TASKS)]

    with grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)

        def some_done_some_not() -> bool:
            states = [
                stub.GetTask(task_pb2.GetTaskRequest(name=name, view=BASIC)).task.state
                for name in names
            ]
            done = states.count(SUCCEEDED)
            return done >= 1 and TASKS - done >= 2

        wait_for(some_done_some_not, timeout=120, what="some tasks finished, some not")
    orch = restart(procs, orch, state)
    assert "recovered" in orch.output(), orch.output()[-2000:]
    done = attempts_of(orch.target, names)
    for name, task in done.items():
        assert task.state == SUCCEEDED, f"{name}: {task.error}"
        ran = [x for x in task.attempts if x.state == SUCCEEDED]
        assert len(ran) == 1, task.attempts
        assert list(task.outputs[0].shape) == [n, n]


def test_a_workflow_killed_mid_chain_finishes_after_restart(procs, tmp_path: Path):
    state = tmp_path / "state"
    orch = start_mesh(procs, state)
    procs.node("na", orch.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(orch.target) == {"na"}, what="node na READY")
    with Client(orch.target, timeout=120) as km:
        n = sized(km, TASK_SECONDS)
    rng = np.random.default_rng(0)
    # Scaled by 1/sqrt(n), the chain's products keep entries of the same size.
    a = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    steps = [{"id": "s0", "task": {"op": "matmul", "inputs": ["${inputs.a}", "${inputs.a}"]}}]
    for i in range(1, CHAIN):
        steps.append(
            {
                "id": f"s{i}",
                "task": {"op": "matmul", "inputs": [f"${{s{i - 1}.outputs[0]}}", "${inputs.a}"]},
            }
        )
    with Client(orch.target, timeout=60) as km:
        info = km.workflows.submit({"steps": steps}, {"a": a}, request_id="restart-1")
        deadline = time.monotonic() + 120
        while True:  # until some steps are done and some are not
            now = km.workflows.get(info.name)
            done = [s for s in now.steps if s.state is StepState.SUCCEEDED]
            if 2 <= len(done) < CHAIN - 1:
                break
            assert now.state is WorkflowState.RUNNING and time.monotonic() < deadline, now
            time.sleep(0.02)
    finished_before = {s.id: s.task for s in done}
    orch = restart(procs, orch, state)
    with Client(orch.target, timeout=60) as km:
        final = km.workflows.wait(info.name, timeout=240)
        assert final.state is WorkflowState.SUCCEEDED, final
        for step_id, task in finished_before.items():
            assert final.step(step_id).task == task, f"{step_id} ran again"
        tasks = [t for t in km.list_tasks() if t.labels.get("workflow") == info.name]
        per_step: dict[str, int] = {}
        for t in tasks:
            per_step[t.labels["step"]] = per_step.get(t.labels["step"], 0) + 1
        assert per_step == {f"s{i}": 1 for i in range(CHAIN)}, "one task per step"
    full = attempts_of(orch.target, [t.name for t in tasks])
    for name, task in full.items():
        assert [x.state for x in task.attempts].count(SUCCEEDED) == 1, task.attempts
        if name in finished_before.values():
            assert len(task.attempts) == 1, task.attempts  # finished before: never again


def test_an_orchestrator_without_flags_keeps_its_state_in_the_per_user_dir(procs, tmp_path: Path):
    """Durable by default, like `serve`: SQLite under $XDG_STATE_HOME/kernelmesh
    (the helper points XDG_STATE_HOME at the test's temp dir)."""
    orch = procs.orchestrator()
    expected = tmp_path / "xdg-state" / "kernelmesh" / "state.sqlite"
    log = orch.output()
    assert f"sqlite store at {expected}" in log, log[-2000:]
    assert "memory store" not in log
    assert expected.exists()
