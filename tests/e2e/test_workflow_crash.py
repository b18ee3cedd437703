"""kill -9 of a real `kernelmesh serve` mid-workflow, restarted on the same
state: the workflow completes, and every step ran exactly once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from workflow_chains import (
    CHAIN,
    chain_input,
    chain_steps,
    finished_once,
    matmul_side,
    wait_mid_chain,
)

from kernelmesh.clients import Client
from kernelmesh.clients.workflow_types import StepState, WorkflowState
from kernelmesh.v1 import task_pb2, task_pb2_grpc

pytestmark = pytest.mark.e2e

STEP_SECONDS = 0.25  # each step's kernel time, so the kill lands mid-chain


def test_workflow_survives_kill_9_and_no_finished_step_runs_again(serve_tools, tmp_path: Path):
    args = ["--state-dir", str(tmp_path / "state"), "--no-warmup"]
    proc = serve_tools.start_serve(tmp_path, *args)
    try:
        with Client(proc.target, timeout=60) as km:
            # Steps sized to the CPU: a fixed size ran the whole chain between two polls
            # once the task path got faster.
            n = matmul_side(km, STEP_SECONDS)
    except BaseException:
        serve_tools.stop_serve(proc)
        raise
    a = chain_input(n)
    steps = chain_steps(CHAIN)
    try:
        with Client(proc.target, timeout=30) as km:
            info = km.workflows.submit({"steps": steps}, {"a": a}, request_id="crash-1")
            done = wait_mid_chain(km.workflows, info.name, CHAIN)
        finished_before = {s.id: s.task for s in done}
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(30)
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
    proc = serve_tools.start_serve(tmp_path, *args)
    try:
        with Client(proc.target, timeout=30) as km:
            again = km.workflows.submit({"steps": steps}, {"a": a}, request_id="crash-1")
            assert again.name == info.name, "the retried submission finds the first workflow"
            final, tasks = finished_once(km, info.name, finished_before, CHAIN)
        with grpc.insecure_channel(proc.target) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            for t in tasks:
                full = stub.GetTask(task_pb2.GetTaskRequest(name=t.name)).task
                ran = [x for x in full.attempts if x.state == task_pb2.TASK_STATE_SUCCEEDED]
                assert len(ran) == 1, full.attempts
                if t.name in finished_before.values():
                    # shown finished before the kill: its one attempt, never a second
                    assert len(full.attempts) == 1, full.attempts
        with Client(proc.target, timeout=30) as km:
            wide = a.astype(np.float64)
            expected = wide @ wide
            for _ in range(1, CHAIN):
                expected = expected @ wide
            got = km.download(final.step(f"s{CHAIN - 1}").outputs[0])
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * scale)
    finally:
        serve_tools.stop_serve(proc)


TINY = 1500  # steps that run on the spot: the chain outruns its commits


def test_a_chain_of_tiny_steps_killed_mid_run_reruns_no_step_it_showed_finished(
    serve_tools, tmp_path: Path
):
    """Tiny steps run on the event loop without waiting for their commits; a step
    is shown finished only once its end is committed. Killed mid-chain, every
    step shown finished keeps its one task and its one attempt."""
    args = ["--state-dir", str(tmp_path / "state"), "--no-warmup"]
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    steps = [{"id": "s0", "task": {"op": "relu", "inputs": ["${inputs.x}"]}}]
    for i in range(1, TINY):
        steps.append(
            {"id": f"s{i}", "task": {"op": "relu", "inputs": [f"${{s{i - 1}.outputs[0]}}"]}}
        )
    proc = serve_tools.start_serve(tmp_path, *args)
    try:
        with Client(proc.target, timeout=30) as km:
            km.run("relu", x)  # compiled before the chain starts
            info = km.workflows.submit({"steps": steps}, {"x": x}, request_id="tiny-1")
            deadline = time.monotonic() + 120
            while True:
                now = km.workflows.get(info.name)
                done = [s for s in now.steps if s.state is StepState.SUCCEEDED]
                if len(done) >= 10:
                    break
                assert now.state is WorkflowState.RUNNING and time.monotonic() < deadline, now
                time.sleep(0.005)
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(30)
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
    if len(done) == TINY:
        pytest.skip("the whole chain finished before the kill; nothing to check")
    shown = {s.id: s.task for s in done}
    proc = serve_tools.start_serve(tmp_path, *args)
    try:
        with Client(proc.target, timeout=60) as km:
            again = km.workflows.submit({"steps": steps}, {"x": x}, request_id="tiny-1")
            assert again.name == info.name
            final = km.workflows.wait(info.name, timeout=240)
            assert final.state is WorkflowState.SUCCEEDED, final
            for step_id, task in shown.items():
                assert final.step(step_id).task == task, f"{step_id} ran again"
        with grpc.insecure_channel(proc.target) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            for task in shown.values():
                full = stub.GetTask(task_pb2.GetTaskRequest(name=task)).task
                assert [a.state for a in full.attempts] == [task_pb2.TASK_STATE_SUCCEEDED]
        with Client(proc.target, timeout=30) as km:
            got = km.download(final.step(f"s{TINY - 1}").outputs[0])
            np.testing.assert_array_equal(got, np.maximum(x, 0))
    finally:
        serve_tools.stop_serve(proc)
