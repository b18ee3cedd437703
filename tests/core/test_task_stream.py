"""core.task_stream.pipelined: the flow control of StreamTasks, without gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.core import devices
from kernelmesh.core.task_stream import pipelined
from kernelmesh.core.tasks import Task, TaskManager, TaskManagerOptions, TaskSpec, TaskState
from kernelmesh.core.tensor_store import TensorStore


async def managed(inline: bool) -> TaskManager:
    mgr = TaskManager(
        devices.discover("test"),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=2, inline_max_elements=(1 << 14) if inline else 0),
    )
    await mgr.start()
    return mgr


@pytest.fixture
async def queued():
    """Every task goes through the queue and ends later (nothing runs inline)."""
    mgr = await managed(inline=False)
    try:
        yield mgr
    finally:
        await mgr.shutdown(grace=5.0)


@pytest.fixture
async def inline():
    mgr = await managed(inline=True)
    try:
        yield mgr
    finally:
        await mgr.shutdown(grace=5.0)


async def source(items, fail_after: int | None = None):
    for i, item in enumerate(items):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("the item stream broke")
        yield item


def relu(i: int) -> TaskSpec:
    return TaskSpec(op="relu", inputs=[np.full(4, i - 3, np.float32)])


class Counting:
    """start/answer/cancel for `pipelined`, counting the tasks in flight."""

    def __init__(self, mgr: TaskManager) -> None:
        self.mgr = mgr
        self.in_flight = 0
        self.most = 0
        self.cancelled: list[str] = []

    def start(self, item):
        if item is None:
            return "refused"
        task = self.mgr.begin(item)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        return task

    def answer(self, item, task: Task):
        self.in_flight -= 1
        assert task.state is TaskState.SUCCEEDED
        return (float(item.inputs[0][0]), float(task.outputs[0][0]))

    def cancel(self, task: Task) -> None:
        self.cancelled.append(task.name)
        self.mgr.cancel(task.name, tenant=task.tenant)


@pytest.mark.parametrize("window", [1, 3])
async def test_queued_tasks_are_answered_within_the_window(queued, window):
    calls = Counting(queued)
    items = [relu(i) for i in range(12)]
    stream = pipelined(source(items), calls.start, calls.answer, calls.cancel, window)
    answers = [a async for a in stream]
    assert sorted(answers) == sorted((i - 3.0, max(i - 3.0, 0.0)) for i in range(12))
    assert 1 <= calls.most <= window
    assert calls.cancelled == []


async def test_inline_tasks_and_refused_items_are_answered_in_order(inline):
    calls = Counting(inline)
    items = [relu(0), None, relu(5)]
    answers = [
        a async for a in pipelined(source(items), calls.start, calls.answer, calls.cancel, 4)
    ]
    assert answers == [(-3.0, 0.0), "refused", (2.0, 2.0)]


async def test_a_broken_item_stream_is_raised_after_the_tasks_in_flight(queued):
    calls = Counting(queued)
    stream = pipelined(
        source([relu(i) for i in range(6)], fail_after=4),
        calls.start,
        calls.answer,
        calls.cancel,
        8,
    )
    answers = []
    with pytest.raises(RuntimeError, match="broke"):
        async for answer in stream:
            answers.append(answer)
    assert len(answers) == 4


async def test_closing_the_stream_cancels_the_tasks_in_flight(queued):
    calls = Counting(queued)
    big = np.ones((1500, 1500), np.float64)
    items = [relu(1), TaskSpec(op="matmul", inputs=[big, big])]
    stream = pipelined(source(items), calls.start, calls.answer, calls.cancel, 8)
    first = await anext(stream)
    assert first == (-2.0, 0.0)
    await stream.aclose()
    assert len(calls.cancelled) == 1
    task = queued.get(calls.cancelled[0], tenant="default")
    assert task.state is TaskState.CANCELLED


async def test_the_window_must_be_positive(inline):
    calls = Counting(inline)
    with pytest.raises(ValueError):
        await anext(pipelined(source([]), calls.start, calls.answer, calls.cancel, 0))
