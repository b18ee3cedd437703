"""A workflow on the mesh (a real orchestrator and two real nodes) whose step is
running on a node killed with -9: the step runs again on the other node as a
new attempt, WatchWorkflow shows that attempt and why, and the step's output is
used once by the step after it."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for

from kernelmesh.clients import Client
from kernelmesh.clients.workflow_types import StepState, WorkflowEvent, WorkflowState
from kernelmesh.v1 import task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e

PROBE = 1200  # a matmul timed on a node to size the step
STEP_SECONDS = 1.0  # the step's kernel time, so the kill lands while it runs
MIN_N, MAX_N = 1600, 3200
BASIC = task_pb2.TASK_VIEW_BASIC


def test_a_step_on_a_node_killed_mid_step_runs_again_elsewhere_and_is_used_once(procs):
    orch = procs.orchestrator("--store", "memory", "--lease-seconds", "1.5")
    nodes = {
        "node-a": procs.node("node-a", orch.target, "--backends", "cpu"),
        "node-b": procs.node("node-b", orch.target, "--backends", "cpu"),
    }
    wait_for(lambda: ready_nodes(orch.target) == set(nodes), what="both nodes READY")
    small = np.ones((8, 8), np.float32)
    spec = {
        "steps": [
            {"id": "big", "task": {"op": "matmul", "inputs": ["${inputs.a}", "${inputs.a}"]}},
            {"id": "after", "task": {"op": "relu", "inputs": ["${big.outputs[0]}"]}},
        ]
    }
    with Client(orch.target, timeout=120) as km, grpc.insecure_channel(orch.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        # Compiled on both nodes first: a node busy compiling may miss heartbeats.
        for name in nodes:
            km.run("matmul", small, small, device=f"nodes/{name}")
        # The step sized to the nodes' CPU: a fixed 1600² could end between two
        # polls on a fast machine, and the kill then found nothing running.
        probe = np.ones((PROBE, PROBE), np.float32)
        one = min(
            km.run_task("matmul", probe, probe, device=f"nodes/{name}").run_seconds
            for name in nodes
            for _ in range(2)
        )
        n = int(min(MAX_N, max(MIN_N, PROBE * (STEP_SECONDS / max(one, 1e-4)) ** (1 / 3))))
        # Scaled by 1/sqrt(n), a @ a has entries of about 1, so the check at the
        # end compares numbers well above its atol.
        a = (np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
        info = km.workflows.submit(spec, {"a": a})
        events: list[WorkflowEvent] = []
        watcher = threading.Thread(
            target=lambda: events.extend(km.workflows.watch(info.name, timeout=240)), daemon=True
        )
        watcher.start()

        def running_node() -> str:
            step = km.workflows.get(info.name).step("big")
            if step.state is not StepState.RUNNING or not step.task:
                return ""
            task = stub.GetTask(task_pb2.GetTaskRequest(name=step.task, view=BASIC)).task
            if task.state != task_pb2.TASK_STATE_RUNNING:
                return ""
            return task.device.split("/")[0]

        victim = str(wait_for(running_node, timeout=120, what="step big running on a node"))
        nodes[victim].kill9()
        final = km.workflows.wait(info.name, timeout=240)
        watcher.join(60)

        assert final.state is WorkflowState.SUCCEEDED, final
        big = final.step("big")
        assert big.attempt == 2, big
        task = stub.GetTask(task_pb2.GetTaskRequest(name=big.task, view=BASIC)).task
        lost, ran = task.attempts[0], task.attempts[1]
        assert lost.state == task_pb2.TASK_STATE_FAILED and lost.device.startswith(victim)
        assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert victim in lost.error.message
        assert ran.state == task_pb2.TASK_STATE_SUCCEEDED and not ran.device.startswith(victim)
        assert len(task.attempts) == 2, task.attempts

        # WatchWorkflow showed the new attempt, where it ran and why.
        again = [e for e in events if e.step == "big" and "attempt 2" in e.message]
        assert again and again[0].step_state is StepState.RUNNING, [e.message for e in events]
        assert "(attempt 1: " in again[0].message and victim in again[0].message, again[0].message
        assert events[-1].state is WorkflowState.SUCCEEDED

        # The step after it ran once, on the output of the attempt that succeeded.
        after = final.step("after")
        used = stub.GetTask(task_pb2.GetTaskRequest(name=after.task, view=BASIC)).task
        assert [x.state for x in used.attempts] == [task_pb2.TASK_STATE_SUCCEEDED]
        wide = a.astype(np.float64)
        np.testing.assert_allclose(
            km.download(after.outputs[0]), np.maximum(wide @ wide, 0), rtol=1e-3, atol=1e-3
        )
