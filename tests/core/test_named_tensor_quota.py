"""A named tensor is charged to its tenant once, however many tasks read it, and
a deleted one stays charged while unfinished tasks still hold its memory."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kernelmesh.core.errors import NotFound, ResourceExhausted
from kernelmesh.core.limits import Quotas
from kernelmesh.core.tasks import TaskManager, TaskSpec

N = 1 << 16
STORED = N * 4  # one float32 tensor of N elements
SUM_OUT = 4  # a float32 scalar


def stored_tensor(manager: TaskManager, tenant: str) -> str:
    return manager.store.put(np.ones(N, np.float32), tenant=tenant).name


async def test_tasks_reading_a_named_tensor_are_charged_their_outputs_only(manager):
    ledger = manager.store.ledger
    ref = stored_tensor(manager, "t")
    assert ledger.bytes_of("t") == STORED
    # Submitted without awaiting: all eight are unfinished at once.
    tasks = [manager.submit(TaskSpec(op="sum", inputs=[ref], tenant="t")) for _ in range(8)]
    assert ledger.bytes_of("t") == STORED + 8 * SUM_OUT
    await asyncio.gather(*(t.wait() for t in tasks))
    assert all(t.outputs[0] == N for t in tasks)
    assert ledger.bytes_of("t") == STORED


async def test_many_readers_fit_a_quota_that_holds_the_tensor_once(manager):
    ledger = manager.store.ledger
    ref = stored_tensor(manager, "t")
    ledger.quotas = Quotas(max_bytes_per_tenant=STORED + 64 * SUM_OUT)
    try:
        tasks = [manager.submit(TaskSpec(op="sum", inputs=[ref], tenant="t")) for _ in range(64)]
        with pytest.raises(ResourceExhausted):
            manager.submit(TaskSpec(op="sum", inputs=[ref], tenant="t"))
        # an inline input is still charged in full
        with pytest.raises(ResourceExhausted):
            manager.submit(TaskSpec(op="relu", inputs=[np.ones(4, np.float32)], tenant="t"))
        await asyncio.gather(*(t.wait() for t in tasks))
    finally:
        ledger.quotas = Quotas()
    # a refused task let go of the tensor as well: deleting it frees it at once
    manager.store.delete(ref, tenant="t")
    assert ledger.bytes_of("t") == 0 and manager.store.used_bytes == 0


async def test_a_deleted_tensor_stays_charged_until_its_readers_end(manager):
    ledger, store = manager.store.ledger, manager.store
    ref = stored_tensor(manager, "t")
    tasks = [manager.submit(TaskSpec(op="sum", inputs=[ref], tenant="t")) for _ in range(4)]
    store.delete(ref, tenant="t")
    with pytest.raises(NotFound):
        store.get(ref, tenant="t")
    # the queued tasks hold the array: its bytes are still this tenant's
    assert ledger.bytes_of("t") == STORED + 4 * SUM_OUT
    assert store.used_bytes == STORED
    await asyncio.gather(*(t.wait() for t in tasks))
    assert all(t.outputs[0] == N for t in tasks)
    assert ledger.bytes_of("t") == 0 and store.used_bytes == 0


async def test_a_deleted_tensor_no_task_reads_is_released_at_once(manager):
    ledger, store = manager.store.ledger, manager.store
    ref = stored_tensor(manager, "t")
    store.delete(ref, tenant="t")
    assert ledger.bytes_of("t") == 0 and store.used_bytes == 0
