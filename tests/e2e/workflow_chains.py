"""The chain of matmul steps the workflow crash and failover tests kill mid-way:
the steps, an input whose products keep their size, and the wait until some
steps are done and some are not."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kernelmesh.clients.workflow_types import StepState, WorkflowState

CHAIN = 8


def chain_steps(length: int = CHAIN) -> list[dict]:
    """s0 = a @ a, then each step multiplies the one before by a."""
    steps = [{"id": "s0", "task": {"op": "matmul", "inputs": ["${inputs.a}", "${inputs.a}"]}}]
    for i in range(1, length):
        steps.append(
            {
                "id": f"s{i}",
                "task": {"op": "matmul", "inputs": [f"${{s{i - 1}.outputs[0]}}", "${inputs.a}"]},
            }
        )
    return steps


def chain_input(n: int, seed: int = 0) -> np.ndarray:
    """Scaled by 1/sqrt(n), so the chain's products keep entries of the same size
    and the final comparison is not against numbers that have shrunk to nothing."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)


def wait_mid_chain(workflows: Any, name: str, length: int = CHAIN, timeout: float = 120) -> list:
    """Polls until at least two steps succeeded and at least two have not; returns
    the succeeded steps."""
    deadline = time.monotonic() + timeout
    while True:
        now = workflows.get(name)
        done = [s for s in now.steps if s.state is StepState.SUCCEEDED]
        if 2 <= len(done) < length - 1:
            return done
        assert now.state is WorkflowState.RUNNING and time.monotonic() < deadline, now
        time.sleep(0.02)


def finished_once(km: Any, name: str, finished_before: dict[str, str], length: int = CHAIN):
    """Waits for the workflow to succeed after its server came back; checks no
    step finished before came back with another task and each step has one task.
    Returns the finished workflow and its steps' tasks."""
    final = km.workflows.wait(name, timeout=240)
    assert final.state is WorkflowState.SUCCEEDED, final
    for step_id, task in finished_before.items():
        assert final.step(step_id).task == task, f"{step_id} ran again"
    tasks = [t for t in km.list_tasks() if t.labels.get("workflow") == name]
    per_step: dict[str, int] = {}
    for t in tasks:
        per_step[t.labels["step"]] = per_step.get(t.labels["step"], 0) + 1
    assert per_step == {f"s{i}": 1 for i in range(length)}, "one task per step"
    return final, tasks


def matmul_side(km: Any, seconds: float, start: int = 600, largest: int = 3200) -> int:
    """A float32 matmul side whose run takes about `seconds` where `km` runs it:
    measured at the guessed size and guessed again, up to four times (one probe
    at a small size, on a machine whose load changes, has been off tenfold)."""
    n = start
    for _ in range(4):
        x = np.ones((n, n), np.float32)
        took = min(km.run_task("matmul", x, x).run_seconds for _ in range(2))
        if took >= 0.7 * seconds or n >= largest:
            break
        n = int(min(largest, max(n + 1, n * (seconds / max(took, 1e-4)) ** (1 / 3))))
    return n
