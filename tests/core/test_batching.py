"""Dynamic batching in core: compatible tasks run as one call and split back, each
with its own result, error and cancellation."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from kernelmesh.core import devices
from kernelmesh.core.batching import BatchingOptions
from kernelmesh.core.config import load
from kernelmesh.core.errors import Code
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions, TaskSpec, TaskState
from kernelmesh.core.tensor_store import TensorStore


def make_manager(**batching) -> TaskManager:
    options = BatchingOptions(enabled=True, **batching)
    options.check()
    return TaskManager(
        devices.discover("test", ("cpu",)),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=1, batching=options),
    )


@pytest.fixture
async def batched():
    managers: list[TaskManager] = []

    async def start(**batching) -> TaskManager:
        mgr = make_manager(**batching)
        await mgr.start()
        managers.append(mgr)
        return mgr

    yield start
    for mgr in managers:
        await mgr.shutdown(grace=5.0)


class CountingRun:
    """Wraps the CPU device's run to count calls and the batch sizes they carry."""

    def __init__(self, device) -> None:
        self.device = device
        self.real = device.run
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, op, inputs, params, outputs=None):
        self.calls.append((op, inputs[0].shape))
        return self.real(op, inputs, params, outputs)


async def finished(tasks) -> None:
    await asyncio.wait_for(asyncio.gather(*(t.wait() for t in tasks)), 30)


async def test_matmuls_of_one_class_run_in_one_batch_pair_by_pair_on_the_cpu(batched, monkeypatch):
    # NumPy's stacked matmul is a BLAS call per pair anyway: the CPU runs the pairs of
    # one batch (one executor hop) one by one, with no stacked copy of the operands.
    mgr = await batched(preferred_batch_sizes=(4,), max_batch_size=4, max_queue_delay_us=10**6)
    counting = CountingRun(mgr.devices[0])
    monkeypatch.setattr(mgr.devices[0], "run", counting)
    rng = np.random.default_rng(0)
    pairs = [
        (rng.standard_normal((8, 5), np.float32), rng.standard_normal((5, 3), np.float32))
        for _ in range(4)
    ]
    tasks = [mgr.submit(TaskSpec(op="matmul", inputs=[a, b])) for a, b in pairs]
    await finished(tasks)
    assert counting.calls == [("matmul", (8, 5))] * 4
    for task, (a, b) in zip(tasks, pairs, strict=True):
        assert task.state is TaskState.SUCCEEDED
        np.testing.assert_allclose(task.outputs[0], a @ b, rtol=1e-5)
    assert mgr._batcher.batches_run == 1 and mgr._batcher.tasks_batched == 4


async def test_run_waits_at_most_the_queue_delay_and_runs_a_partial_batch(batched):
    mgr = await batched(preferred_batch_sizes=(8,), max_batch_size=8, max_queue_delay_us=2000)
    x = np.arange(6, dtype=np.float32) - 3
    a, b = await asyncio.gather(
        mgr.run(TaskSpec(op="relu", inputs=[x])),
        mgr.run(TaskSpec(op="scale", inputs=[x], params={"factor": 2.0})),
    )
    np.testing.assert_array_equal(a.outputs[0], np.maximum(x, 0))
    np.testing.assert_array_equal(b.outputs[0], x * 2)


async def test_elementwise_batches_split_back_per_task(batched, monkeypatch):
    mgr = await batched(preferred_batch_sizes=(3,), max_batch_size=3, max_queue_delay_us=10**6)
    counting = CountingRun(mgr.devices[0])
    monkeypatch.setattr(mgr.devices[0], "run", counting)
    xs = [np.full((2, 3), i, np.float64) for i in range(3)]
    tasks = [mgr.submit(TaskSpec(op="add", inputs=[x, x + 1])) for x in xs]
    await finished(tasks)
    assert counting.calls == [("add", (18,))]
    for task, x in zip(tasks, xs, strict=True):
        assert task.outputs[0].shape == (2, 3)
        np.testing.assert_array_equal(task.outputs[0], 2 * x + 1)


async def test_different_classes_never_share_a_batch(batched, monkeypatch):
    mgr = await batched(preferred_batch_sizes=(2,), max_batch_size=2, max_queue_delay_us=5000)
    counting = CountingRun(mgr.devices[0])
    monkeypatch.setattr(mgr.devices[0], "run", counting)
    tasks = [
        mgr.submit(TaskSpec(op="scale", inputs=[np.ones(4, np.float32)], params={"factor": f}))
        for f in (2.0, 3.0)
    ]
    await finished(tasks)
    assert sorted(counting.calls) == [("scale", (4,)), ("scale", (4,))]
    assert [t.outputs[0][0] for t in tasks] == [2.0, 3.0]


async def test_a_task_cancelled_while_its_batch_forms_leaves_it(batched, monkeypatch):
    mgr = await batched(preferred_batch_sizes=(3,), max_batch_size=3, max_queue_delay_us=10**6)
    counting = CountingRun(mgr.devices[0])
    monkeypatch.setattr(mgr.devices[0], "run", counting)
    x = np.ones((4, 4), np.float32)
    first = mgr.submit(TaskSpec(op="matmul", inputs=[x, x]))
    second = mgr.submit(TaskSpec(op="matmul", inputs=[x, 2 * x]))
    mgr.cancel(first.name, tenant="default")
    assert first.state is TaskState.CANCELLED and first.error.code is Code.CANCELLED
    assert mgr._batcher.forming() == 1
    third = mgr.submit(TaskSpec(op="matmul", inputs=[x, 3 * x]))
    fourth = mgr.submit(TaskSpec(op="matmul", inputs=[x, 4 * x]))
    await finished([second, third, fourth])
    assert counting.calls == [("matmul", (4, 4))] * 3
    assert mgr._batcher.batches_run == 1 and mgr._batcher.tasks_batched == 3
    assert [t.outputs[0][0, 0] for t in (second, third, fourth)] == [8.0, 12.0, 16.0]
    assert first.state is TaskState.CANCELLED and first.outputs == []


async def test_a_task_cancelled_while_its_batch_runs_has_its_share_discarded(batched, monkeypatch):
    mgr = await batched(preferred_batch_sizes=(3,), max_batch_size=3, max_queue_delay_us=10**6)
    device = mgr.devices[0]
    real = device.run
    entered, gate = threading.Event(), threading.Event()

    def held(op, inputs, params, outputs=None):
        # in the kernel thread: the batch is running when `entered` is set
        entered.set()
        assert gate.wait(30), "the test never released the batch"
        return real(op, inputs, params, outputs)

    monkeypatch.setattr(device, "run", held)
    x = np.ones((4, 4), np.float32)
    tasks = [mgr.submit(TaskSpec(op="matmul", inputs=[x, k * x])) for k in (1, 2, 3)]
    assert await asyncio.to_thread(entered.wait, 30), "the batch never started"
    assert all(t.state is TaskState.RUNNING for t in tasks)
    first, second, third = tasks
    mgr.cancel(second.name, tenant="default")
    assert second.state is TaskState.CANCELLED and second.error.code is Code.CANCELLED
    gate.set()
    await finished([first, third])
    assert mgr._batcher.batches_run == 1 and mgr._batcher.tasks_batched == 3
    assert [t.outputs[0][0, 0] for t in (first, third)] == [4.0, 12.0]
    assert second.state is TaskState.CANCELLED and second.outputs == []


async def test_one_failing_task_fails_only_itself(batched, monkeypatch):
    mgr = await batched(preferred_batch_sizes=(3,), max_batch_size=3, max_queue_delay_us=10**6)
    device = mgr.devices[0]
    real = device.run
    poison = np.float32(7.0)

    def picky(op, inputs, params, outputs=None):
        if (inputs[0] == poison).any():
            raise ValueError("poisoned input")
        return real(op, inputs, params, outputs)

    monkeypatch.setattr(device, "run", picky)
    values = (1.0, 7.0, 2.0)
    tasks = [mgr.submit(TaskSpec(op="exp", inputs=[np.full(5, v, np.float32)])) for v in values]
    await finished(tasks)
    ok_a, bad, ok_b = tasks
    assert bad.state is TaskState.FAILED and "poisoned input" in bad.error.message
    assert bad.error.code is Code.INTERNAL
    for task, v in ((ok_a, 1.0), (ok_b, 2.0)):
        assert task.state is TaskState.SUCCEEDED
        np.testing.assert_allclose(task.outputs[0], np.exp(np.full(5, v, np.float32)))


async def test_big_tasks_and_unbatchable_ops_run_alone(batched):
    mgr = await batched(max_task_elements=16, max_queue_delay_us=10**6)
    big = mgr.submit(TaskSpec(op="relu", inputs=[np.ones(64, np.float32)]))
    other = mgr.submit(TaskSpec(op="sum", inputs=[np.ones(8, np.float32)]))
    await finished([big, other])
    assert big.state is TaskState.SUCCEEDED and other.outputs[0] == 8.0
    assert mgr._batcher.batches_run == 0


def test_the_server_config_batching_section(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text(
        "batching:\n  enabled: true\n  ops: [matmul]\n  preferred_batch_sizes: [4, 8]\n"
        "  max_batch_size: 8\n  max_queue_delay_us: 200\n"
    )
    config = load(path)
    assert config.batching == BatchingOptions(
        enabled=True,
        ops=("matmul",),
        preferred_batch_sizes=(4, 8),
        max_batch_size=8,
        max_queue_delay_us=200,
    )
    assert not load().batching.enabled
    path.write_text("batching:\n  enabled: true\n  ops: [softmax]\n")
    with pytest.raises(ValueError, match="softmax cannot be batched"):
        load(path)
    path.write_text("batching:\n  delay: 3\n")
    with pytest.raises(ValueError, match="unknown settings: delay"):
        load(path)
