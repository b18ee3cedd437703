"""Inline plans: a waiting caller repeating a call shape of plain tensors skips
validation and placement, with the same outcome as `begin`."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.core import devices
from kernelmesh.core.errors import ResourceExhausted, Unavailable
from kernelmesh.core.limits import Quotas
from kernelmesh.core.tasks import TaskManager, TaskSpec, TaskState


def planned(manager: TaskManager, spec: TaskSpec):
    task = manager.begin(spec)
    assert task.state is TaskState.SUCCEEDED
    return manager.inline_plan(spec, task)


async def test_a_planned_task_runs_inline_like_begin(manager):
    x = np.arange(-4, 4, dtype=np.float32)
    plan = planned(manager, TaskSpec(op="relu", inputs=[x]))
    assert plan is not None
    y = -x
    task = manager.begin_planned(plan, [y], tenant="t1", priority=3)
    assert task is not None and task.state is TaskState.SUCCEEDED
    np.testing.assert_array_equal(task.outputs[0], np.maximum(y, 0))
    assert (task.tenant, task.priority, task.op) == ("t1", 3, "relu")
    assert manager.get(task.name, tenant="t1") is task, "recorded as begin records it"
    assert task.inputs is None and task.run_seconds is not None


async def test_specs_that_are_not_plain_tensors_get_no_plan(manager):
    x = np.ones((4, 8), np.float32)
    assert planned(manager, TaskSpec(op="sum", inputs=[x], params={"axis": 1})) is None
    assert planned(manager, TaskSpec(op="relu", inputs=[x], labels={"a": "b"})) is None
    cpu = devices.DeviceSelector(kind=devices.DeviceKind.CPU)
    assert planned(manager, TaskSpec(op="relu", inputs=[x], selector=cpu)) is None
    big = np.ones(1 << 16, np.float32)  # too large to run inline
    task = manager.begin(TaskSpec(op="relu", inputs=[big]))
    assert manager.inline_plan(TaskSpec(op="relu", inputs=[big]), task) is None
    await manager.wait(task)


async def test_a_plan_is_stale_once_the_devices_change(manager):
    x = np.ones(8, np.float32)
    plan = planned(manager, TaskSpec(op="relu", inputs=[x]))
    assert plan is not None
    manager.add_devices([])
    assert manager.begin_planned(plan, [x], tenant="default") is None


async def test_a_planned_task_is_held_to_the_tenant_quotas(manager):
    x = np.ones(8, np.float32)
    plan = planned(manager, TaskSpec(op="relu", inputs=[x]))
    ledger = manager.store.ledger
    ledger.quotas = Quotas(max_bytes_per_tenant=8)
    with pytest.raises(ResourceExhausted):
        manager.begin_planned(plan, [x], tenant="default")
    ledger.quotas = Quotas()
    assert manager.begin_planned(plan, [x], tenant="default").state is TaskState.SUCCEEDED


async def test_no_planned_task_begins_after_shutdown(manager):
    x = np.ones(8, np.float32)
    plan = planned(manager, TaskSpec(op="relu", inputs=[x]))
    await manager.shutdown(grace=1.0)
    with pytest.raises(Unavailable):
        manager.begin_planned(plan, [x], tenant="default")
