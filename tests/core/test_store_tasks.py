"""Submitted tasks on a real store (SQLite under a temp state dir): journal
before acknowledge, recovery after a crash, attempts, retries and the dead
letter, request_id idempotency, named tensors across restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from held_kernel import HeldKernel

from kernelmesh.core import devices
from kernelmesh.core.errors import Code, InvalidArgument
from kernelmesh.core.store import StoreUnavailable
from kernelmesh.core.store.sqlite import SqliteStore
from kernelmesh.core.task_retry import RetryPolicy
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions, TaskSpec, TaskState
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.native.backend import LaunchError

FAST_RETRY = RetryPolicy(initial_interval=0.01, maximum_attempts=3)


class Node:
    """A TaskManager over a SQLite store in one state dir; `crash` stops it the
    way kill -9 would as far as the store can tell (running attempts never
    report, nothing is finished on the way out)."""

    def __init__(self, state: Path, **options: object) -> None:
        self.state = state
        self.options = TaskManagerOptions(workers_per_device=1, **options)
        self.store: SqliteStore | None = None
        self.mgr: TaskManager | None = None
        self.held: list[HeldKernel] = []

    async def start(self, *, deviceless: bool = False) -> TaskManager:
        """`deviceless`: an orchestrator before any node joined (it parks tasks)."""
        self.store = SqliteStore(self.state)
        await self.store.open()
        self.mgr = TaskManager(
            [] if deviceless else devices.discover("test", ("cpu",)),
            TensorStore(64 << 20),
            self.options,
            self.store,
        )
        self.mgr.park_unplaced = deviceless
        await self.mgr.start()
        await self.mgr.recover()
        return self.mgr

    def hold(self, op: str) -> HeldKernel:
        """Holds the device's kernels of `op` until the crash (or `release`)."""
        assert self.mgr is not None
        self.held.append(HeldKernel(self.mgr.devices[0], op))
        return self.held[-1]

    async def crash(self) -> None:
        assert self.mgr is not None and self.store is not None
        for worker in self.mgr._workers:
            worker.cancel()
        await asyncio.gather(*self.mgr._workers, return_exceptions=True)
        await self.store.close()  # what was queued for commit lands, as it would have
        for held in self.held:  # a held kernel returns now, to workers that are gone
            held.release()
        self.mgr._pool.shutdown(wait=True)

    async def stop(self) -> None:
        assert self.mgr is not None and self.store is not None
        await self.mgr.shutdown(grace=5.0)
        await self.store.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(**options: object) -> Node:
        made.append(Node(tmp_path / "state", **options))
        return made[-1]

    yield make
    for n in made:
        for held in n.held:
            held.release()
        if n.store is not None and n.store._writer is not None and not n.store._closing:
            await n.stop()


async def finished(task, timeout: float = 30.0):
    await asyncio.wait_for(task.wait(), timeout)
    return task


def relu(n: int = 8, **kw: object) -> TaskSpec:
    return TaskSpec(op="relu", inputs=[np.arange(-n, n, dtype=np.float32)], **kw)


def slow() -> TaskSpec:
    a = np.ones((900, 900), np.float64)
    return TaskSpec(op="matmul", inputs=[a, a])


async def test_a_finished_task_and_its_outputs_survive_a_restart(node):
    first = node()
    mgr = await first.start()
    task = await finished(await mgr.submit_journaled(relu(), request_id="r1", fingerprint="f"))
    await first.crash()
    mgr = await node().start()
    again = mgr.get(task.name, tenant="default")
    assert again.state is TaskState.SUCCEEDED
    np.testing.assert_array_equal(again.outputs[0], np.maximum(np.arange(-8, 8), 0))
    assert [(a.number, a.state) for a in again.attempts] == [(1, TaskState.SUCCEEDED)]
    assert again.device_name == task.device_name


async def test_queued_and_running_tasks_run_again_after_a_crash(node):
    first = node()
    mgr = await first.start()
    held = first.hold("matmul")
    running = await mgr.submit_journaled(slow())
    queued = await mgr.submit_journaled(relu())
    await held.wait_started()
    assert running.state is TaskState.RUNNING and queued.state is TaskState.QUEUED
    await first.crash()

    mgr = await node().start()
    for name in (running.name, queued.name):
        await finished(mgr.get(name, tenant="default"))
    resumed = mgr.get(running.name, tenant="default")
    assert resumed.state is TaskState.SUCCEEDED
    assert [(a.number, a.state) for a in resumed.attempts] == [
        (1, TaskState.FAILED),
        (2, TaskState.SUCCEEDED),
    ]
    assert resumed.attempts[0].error.code == Code.UNAVAILABLE
    assert "lost" in resumed.attempts[0].error.message
    later = mgr.get(queued.name, tenant="default")
    assert later.state is TaskState.SUCCEEDED and later.attempt == 1


async def test_a_watcher_after_the_restart_sees_the_task_finish(node):
    first = node()
    mgr = await first.start()
    first.hold("matmul")  # so relu is still queued at the crash
    await mgr.submit_journaled(slow())
    queued = await mgr.submit_journaled(relu())
    await first.crash()
    mgr = await node().start()
    states = [e.state async for e in mgr.watch(queued.name, tenant="default")]
    assert states[-1] is TaskState.SUCCEEDED


async def test_a_failing_attempt_is_retried_with_backoff(node, monkeypatch):
    mgr = await node().start()
    device = mgr.devices[0]
    calls = []
    real = device.run

    def flaky(op, inputs, params, outputs=None):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise LaunchError("device lost")
        return real(op, inputs, params, outputs)

    monkeypatch.setattr(device, "run", flaky)
    task = await finished(
        await mgr.submit_journaled(relu(4096, retry=RetryPolicy(initial_interval=0.05)))
    )
    assert task.state is TaskState.SUCCEEDED
    assert [(a.number, a.state) for a in task.attempts] == [
        (1, TaskState.FAILED),
        (2, TaskState.FAILED),
        (3, TaskState.SUCCEEDED),
    ]
    assert all(a.error.code == Code.UNAVAILABLE for a in task.attempts[:2])
    # Backoff: 0.05 s, then 0.1 s (coefficient 2.0).
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1


async def test_exhausted_retries_end_failed_with_every_attempt_kept(node, monkeypatch):
    first = node()
    mgr = await first.start()

    def broken(op, inputs, params, outputs=None):
        raise LaunchError("device lost")

    monkeypatch.setattr(mgr.devices[0], "run", broken)
    task = await finished(await mgr.submit_journaled(relu(4096, retry=FAST_RETRY)))
    assert task.state is TaskState.FAILED and task.error.code == Code.UNAVAILABLE
    assert [a.number for a in task.attempts] == [1, 2, 3]
    assert all(a.error is not None and "device lost" in a.error.message for a in task.attempts)
    failed, _ = mgr.list(tenant="default", state=TaskState.FAILED)
    assert [t.name for t in failed] == [task.name]
    await first.crash()
    kept = (await node().start()).get(task.name, tenant="default")
    assert kept.state is TaskState.FAILED and len(kept.attempts) == 3


async def test_a_non_retryable_error_ends_the_task_at_once(node, monkeypatch):
    mgr = await node().start()

    def broken(op, inputs, params, outputs=None):
        raise ValueError("bad kernel")  # INTERNAL

    monkeypatch.setattr(mgr.devices[0], "run", broken)
    policy = RetryPolicy(initial_interval=0.01, non_retryable=frozenset({int(Code.INTERNAL)}))
    task = await finished(await mgr.submit_journaled(relu(4096, retry=policy)))
    assert task.state is TaskState.FAILED and task.error.code == Code.INTERNAL
    assert len(task.attempts) == 1


async def test_the_same_request_id_returns_the_first_task(node):
    mgr = await node().start()
    first = await mgr.submit_journaled(relu(), request_id="req-1", fingerprint="a")
    again = await mgr.submit_journaled(relu(), request_id="req-1", fingerprint="a")
    other_tenant = await mgr.submit_journaled(
        relu(tenant="beta"), request_id="req-1", fingerprint="a"
    )
    assert again is first and other_tenant is not first
    with pytest.raises(InvalidArgument, match="request_id"):
        await mgr.submit_journaled(relu(), request_id="req-1", fingerprint="b")


async def test_concurrent_duplicates_make_one_task(node):
    mgr = await node().start()
    tasks = await asyncio.gather(
        *(mgr.submit_journaled(relu(), request_id="dup", fingerprint="f") for _ in range(50))
    )
    assert len({t.name for t in tasks}) == 1
    assert len(mgr.list(tenant="default")[0]) == 1


async def test_a_request_id_is_remembered_across_a_restart(node):
    first = node()
    mgr = await first.start()
    task = await mgr.submit_journaled(relu(), request_id="keep", fingerprint="f")
    await first.crash()
    mgr = await node().start()
    again = await mgr.submit_journaled(relu(), request_id="keep", fingerprint="f")
    assert again.name == task.name
    assert len(mgr.list(tenant="default")[0]) == 1


async def test_a_refused_commit_acknowledges_nothing(node):
    first = node()
    mgr = await first.start()
    await first.store.close()  # the store is gone
    with pytest.raises(StoreUnavailable):
        await mgr.submit_journaled(relu(), request_id="x", fingerprint="f")
    assert mgr.list(tenant="default")[0] == []
    await mgr.shutdown(0)


async def test_named_tensors_survive_a_restart_and_deletes_stick(node):
    first = node()
    mgr = await first.start()
    kept = mgr.store.put(np.arange(6, dtype=np.float64).reshape(2, 3), tenant="acme")
    gone = mgr.store.put(np.ones(3, np.float32), tenant="acme")
    mgr.store.delete(gone.name, tenant="acme")
    await first.store.sync()
    await first.crash()
    mgr = await node().start()
    np.testing.assert_array_equal(
        mgr.store.get(kept.name, tenant="acme").array, np.arange(6).reshape(2, 3)
    )
    assert len(mgr.store) == 1


async def test_finished_tasks_past_retention_age_are_forgotten_at_start(node):
    first = node()
    mgr = await first.start()
    task = await finished(await mgr.submit_journaled(relu()))
    await first.crash()
    mgr = await node(retention_seconds=0.0).start()
    assert mgr.list(tenant="default")[0] == []
    assert task.name not in {t.name for t in mgr.list(tenant="default")[0]}
    await mgr.journal.sync()
    assert (await mgr.journal.load()).tasks == []


async def test_a_graceful_stop_leaves_unfinished_tasks_for_the_next_start(node):
    first = node()
    mgr = await first.start()
    held = first.hold("matmul")  # relu waits behind it however fast the machine
    try:
        await mgr.submit_journaled(slow())
        waiting = await mgr.submit_journaled(relu())
        await mgr.shutdown(grace=0.0)
    finally:
        held.release()
    assert waiting.state is TaskState.QUEUED, "not failed: the store keeps it"
    await first.store.close()
    mgr = await node().start()
    again = await finished(mgr.get(waiting.name, tenant="default"))
    assert again.state is TaskState.SUCCEEDED


async def test_an_orchestrator_restarted_before_its_nodes_join_parks_tasks_then_runs_them(node):
    first = node()
    mgr = await first.start()
    running = await mgr.submit_journaled(slow())
    queued = await mgr.submit_journaled(relu())
    deadline = time.monotonic() + 30
    while running.state is not TaskState.RUNNING and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert running.state is TaskState.RUNNING and queued.state is TaskState.QUEUED
    await first.crash()

    mgr = await node().start(deviceless=True)
    for name in (running.name, queued.name):
        waiting = mgr.get(name, tenant="default")
        assert waiting.state is TaskState.QUEUED, waiting.error  # not failed: no node yet
    assert mgr.store.ledger.tasks_of("default") == 2, "parked tasks stay admitted"
    mgr.add_devices(devices.discover("test", ("cpu",)))  # a node joins
    for name in (running.name, queued.name):
        done = await finished(mgr.get(name, tenant="default"))
        assert done.state is TaskState.SUCCEEDED, done.error
        assert [a.state for a in done.attempts].count(TaskState.SUCCEEDED) == 1
    assert [a.state for a in mgr.get(running.name, tenant="default").attempts] == [
        TaskState.FAILED,
        TaskState.SUCCEEDED,
    ]
    assert mgr.store.ledger.tasks_of("default") == 0, "admitted once, given back once"


async def test_a_parked_task_fails_at_its_deadline(node):
    first = node()
    mgr = await first.start()
    await mgr.submit_journaled(slow())
    late = await mgr.submit_journaled(relu(), deadline=time.monotonic() + 0.5)
    await first.crash()
    mgr = await node().start(deviceless=True)
    parked = mgr.get(late.name, tenant="default")
    assert parked.state is TaskState.QUEUED
    await finished(parked)
    assert parked.state is TaskState.FAILED
    assert parked.error.code == Code.DEADLINE_EXCEEDED, parked.error
    assert "waiting for a node" in parked.error.message


async def test_a_graceful_stop_does_not_wait_for_parked_tasks_and_keeps_them(node):
    first = node()
    mgr = await first.start()
    await mgr.submit_journaled(slow())
    waiting = await mgr.submit_journaled(relu())
    await first.crash()
    parked_at = node()
    mgr = await parked_at.start(deviceless=True)
    assert mgr.get(waiting.name, tenant="default").state is TaskState.QUEUED
    # No node can join a stopping orchestrator: the grace is not spent waiting.
    await asyncio.wait_for(mgr.shutdown(grace=120.0), 30)
    assert mgr.get(waiting.name, tenant="default").state is TaskState.QUEUED
    await parked_at.store.close()
    mgr = await node().start()
    again = await finished(mgr.get(waiting.name, tenant="default"))
    assert again.state is TaskState.SUCCEEDED
