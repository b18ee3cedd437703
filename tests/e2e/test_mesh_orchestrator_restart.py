"""kill -9 of a real `kernelmesh orchestrator` (SQLite state dir) with one real
node: restarted on the same port and state, it recovers its unfinished tasks
and workflow steps before any node has joined again. They wait for the node
(parked) instead of failing, and each runs to SUCCEEDED exactly once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from mesh_procs import Procs, ready_nodes, wait_for
from workflow_chains import (
    CHAIN,
    chain_input,
    chain_steps,
    finished_once,
    matmul_side,
    wait_mid_chain,
)

from kernelmesh.clients import Client
from kernelmesh.v1 import task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e

TASK_SECONDS = 0.5  # each task's kernel time on the node, so the kill lands mid-batch
TASKS = 16
BASIC = task_pb2.TASK_VIEW_BASIC  # attempts, and outputs without their data
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED


def start_mesh(procs: Procs, state: Path, port: int = 0):
    # A lease long enough that a node busy with the matmuls keeps it on a loaded machine.
    return procs.orchestrator("--state-dir", str(state), "--lease-seconds", "10", port=port)


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


def mesh_of_one_node(procs, state: Path) -> tuple[Any, int]:
    """An orchestrator on `state` with node na joined, and the matmul size whose
    run takes about TASK_SECONDS there."""
    orch = start_mesh(procs, state)
    procs.node("na", orch.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(orch.target) == {"na"}, what="node na READY")
    with Client(orch.target, timeout=120) as km:
        return orch, matmul_side(km, TASK_SECONDS)


def test_tasks_unfinished_at_kill_9_run_once_the_node_rejoins(procs, tmp_path: Path):
    state = tmp_path / "state"
    orch, n = mesh_of_one_node(procs, state)
    with Client(orch.target, timeout=120) as km:
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
    orch, n = mesh_of_one_node(procs, state)
    a = chain_input(n)
    steps = chain_steps(CHAIN)
    with Client(orch.target, timeout=60) as km:
        info = km.workflows.submit({"steps": steps}, {"a": a}, request_id="restart-1")
        done = wait_mid_chain(km.workflows, info.name, CHAIN)
    finished_before = {s.id: s.task for s in done}
    orch = restart(procs, orch, state)
    with Client(orch.target, timeout=60) as km:
        _, tasks = finished_once(km, info.name, finished_before, CHAIN)
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
