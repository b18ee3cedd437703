"""The task lifecycle in core, without gRPC."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from held_kernel import HeldKernel

from kernelmesh.core import devices
from kernelmesh.core.errors import Code, FailedPrecondition, InvalidArgument, NotFound
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions, TaskSpec, TaskState
from kernelmesh.core.tensor_store import TensorStore


def big_matmul() -> TaskSpec:
    a = np.ones((1200, 1200), np.float64)
    return TaskSpec(op="matmul", inputs=[a, a])


async def test_run_returns_outputs_and_timings(manager):
    x = np.arange(-4, 4, dtype=np.float32)
    task = await manager.run(TaskSpec(op="relu", inputs=[x]))
    assert task.state is TaskState.SUCCEEDED
    np.testing.assert_array_equal(task.outputs[0], np.maximum(x, 0))
    assert task.run_seconds is not None and task.end_time >= task.start_time >= task.create_time
    assert task.inputs is None, "inputs are released once a task ends"


async def test_validation_failure_records_nothing(manager):
    with pytest.raises(InvalidArgument) as info:
        manager.submit(TaskSpec(op="matmul", inputs=[np.ones((2, 3), np.float32)] * 2))
    assert any("inputs[1]" in v.field for v in info.value.violations)
    assert manager.list(tenant="default")[0] == []


async def test_selector_for_missing_backend_is_failed_precondition(manager):
    spec = TaskSpec(
        op="relu",
        inputs=[np.ones(2, np.float32)],
        selector=devices.DeviceSelector(kind=devices.DeviceKind.CUDA),
    )
    with pytest.raises(FailedPrecondition, match="cuda"):
        manager.submit(spec)


async def test_strict_priority_when_busy(manager):
    manager.submit(big_matmul())
    x = np.ones(1 << 16, np.float32)
    order: list[str] = []
    low = manager.submit(TaskSpec(op="exp", inputs=[x], priority=0, labels={"n": "low"}))
    high = manager.submit(TaskSpec(op="exp", inputs=[x], priority=5, labels={"n": "high"}))
    for t in (low, high):
        t.add_done_callback(lambda t: order.append(t.labels["n"]))
    await asyncio.gather(low.wait(), high.wait())
    assert order == ["high", "low"]


async def test_tenants_share_the_device_round_robin(manager):
    manager.submit(big_matmul())
    x = np.ones(1 << 16, np.float32)
    order: list[str] = []
    tasks = [manager.submit(TaskSpec(op="exp", inputs=[x], tenant="a")) for _ in range(4)]
    tasks.append(manager.submit(TaskSpec(op="exp", inputs=[x], tenant="b")))
    for t in tasks:
        t.add_done_callback(lambda t: order.append(t.tenant))
    await asyncio.gather(*(t.wait() for t in tasks))
    assert order.index("b") <= 1, f"tenant b waited behind all of a's work: {order}"


async def test_cancel_queued_task(manager):
    manager.submit(big_matmul())
    queued = manager.submit(TaskSpec(op="exp", inputs=[np.ones(1 << 16, np.float32)]))
    manager.cancel(queued.name, tenant="default")
    assert queued.state is TaskState.CANCELLED and queued.start_time is None
    assert queued.error.code is Code.CANCELLED


async def test_cancel_running_task_discards_its_result(manager):
    # The kernel is held, so the task is surely running (a poll of a free-running
    # matmul could miss its whole run) and returns only after the cancel.
    held = HeldKernel(manager.devices[0], "matmul")
    try:
        running = manager.submit(big_matmul())
        await held.wait_started()
        assert running.state is TaskState.RUNNING
        manager.cancel(running.name, tenant="default")
        assert running.state is TaskState.CANCELLED
    finally:
        held.release()
    device = running.device
    deadline = time.monotonic() + 60
    while device.running:  # the step counting the return also drops its result
        assert time.monotonic() < deadline, "the cancelled kernel never returned"
        await asyncio.sleep(0.01)
    assert running.state is TaskState.CANCELLED and running.outputs == []


async def test_deadline_fails_the_task(manager):
    manager.submit(big_matmul())
    spec = TaskSpec(op="exp", inputs=[np.ones(1 << 16, np.float32)])
    task = await manager.run(spec, deadline=time.monotonic() + 0.01)
    assert task.state is TaskState.FAILED and task.error.code is Code.DEADLINE_EXCEEDED


async def test_watch_yields_each_state_then_ends(manager):
    manager.submit(big_matmul())
    task = manager.submit(TaskSpec(op="exp", inputs=[np.ones(1 << 16, np.float32)]))
    states = [e.state async for e in manager.watch(task.name, tenant="default")]
    assert states == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]


async def test_retention_forgets_oldest_finished_tasks(manager):
    first = await manager.run(TaskSpec(op="relu", inputs=[np.ones(2, np.float32)]))
    for _ in range(60):
        await manager.run(TaskSpec(op="relu", inputs=[np.ones(2, np.float32)]))
    with pytest.raises(NotFound):
        manager.get(first.name, tenant="default")
    assert len(manager.list(tenant="default", page_size=1000)[0]) == 50


async def test_retention_by_bytes_forgets_the_oldest_outputs():
    mgr = TaskManager(
        devices.discover("test", ("cpu",)),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=1, retention_bytes=3 * 4096),
    )
    await mgr.start()
    try:
        tasks = [
            await mgr.run(TaskSpec(op="relu", inputs=[np.ones(1024, np.float32)])) for _ in range(5)
        ]
        for old in tasks[:2]:
            with pytest.raises(NotFound):
                mgr.get(old.name, tenant="default")
        for kept in tasks[2:]:
            assert mgr.get(kept.name, tenant="default").outputs[0].nbytes == 4096
    finally:
        await mgr.shutdown(grace=5.0)


async def test_retention_by_age_forgets_finished_tasks_on_an_idle_server():
    mgr = TaskManager(
        devices.discover("test", ("cpu",)),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=1, retention_seconds=0.5),
    )
    await mgr.start()
    try:
        task = await mgr.run(TaskSpec(op="relu", inputs=[np.ones(4, np.float32)]))
        assert mgr.get(task.name, tenant="default") is task
        # nothing else finishes: the age sweep alone forgets it
        deadline = time.monotonic() + 30
        while task.name in mgr._tasks:
            assert time.monotonic() < deadline, "an expired task was kept"
            await asyncio.sleep(0.05)
        with pytest.raises(NotFound):
            mgr.get(task.name, tenant="default")
        assert time.time() - task.end_time >= 0.5
    finally:
        await mgr.shutdown(grace=5.0)


async def test_keep_outputs_stores_a_named_tensor(manager):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    task = await manager.run(TaskSpec(op="transpose", inputs=[x], keep_outputs=True))
    (ref,) = task.output_refs
    stored = manager.store.get(ref.name, tenant="default")
    np.testing.assert_array_equal(stored.array, x.T)
    again = await manager.run(TaskSpec(op="transpose", inputs=[ref.name]))
    np.testing.assert_array_equal(again.outputs[0], x)
    with pytest.raises(NotFound):
        manager.store.get(ref.name, tenant="someone-else")


async def test_kernel_failure_fails_the_task_not_the_manager(manager, monkeypatch):
    device = manager.devices[0]

    def broken(op, inputs, params, outputs=None):
        raise MemoryError("out of resources")

    monkeypatch.setattr(device, "run", broken)
    task = await manager.run(TaskSpec(op="exp", inputs=[np.ones(1 << 16, np.float32)]))
    assert task.state is TaskState.FAILED and task.error.code is Code.INTERNAL
    assert "out of resources" in task.error.message
    monkeypatch.undo()
    ok = await manager.run(TaskSpec(op="exp", inputs=[np.ones(1 << 16, np.float32)]))
    assert ok.state is TaskState.SUCCEEDED


async def test_shutdown_fails_queued_work_after_grace(manager):
    manager.submit(big_matmul())
    queued = [manager.submit(big_matmul()) for _ in range(3)]
    await manager.shutdown(grace=0.0)
    assert all(t.state.terminal for t in queued)
    assert any(t.error is not None and t.error.code is Code.UNAVAILABLE for t in queued)


async def test_catalog_verdicts_are_reused_for_the_same_shapes_and_params(manager):
    x = np.ones((4, 8), np.float32)
    first = manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 1}))
    again = manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 1}))
    other = manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 0}))
    assert again.call is first.call
    assert other.call is not first.call and other.call.outputs[0].shape == (8,)


async def test_a_cached_verdict_never_admits_a_param_of_another_type(manager):
    x = np.ones((4, 8), np.float32)
    manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 1}))
    # True == 1 and hashes alike, but a bool is not an axis
    with pytest.raises(InvalidArgument):
        manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": True}))


async def test_refusals_are_not_cached(manager):
    x = np.ones((4, 8), np.float32)
    for _ in range(2):
        with pytest.raises(InvalidArgument):
            manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 5}))
    assert manager.submit(TaskSpec(op="sum", inputs=[x], params={"axis": 1})).call.outputs
