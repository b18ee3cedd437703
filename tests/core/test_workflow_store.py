"""Workflow persistence, the same cases on SQLite, PostgreSQL and the
in-memory store (the fixtures are the Store contract's)."""

from __future__ import annotations

import pytest
from test_store_contract import KINDS, make_store, pg_database, reopened, store

from kernelmesh.core.store import migrations
from kernelmesh.core.store.workflow_records import (
    DeleteWorkflow,
    PutWorkflow,
    PutWorkflowStep,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStepRecord,
)

__all__ = ["make_store", "pg_database", "store"]  # fixtures, used by name


def workflow(n: int, **changes: object) -> WorkflowRecord:
    values: dict[str, object] = {
        "id": f"wf{n}",
        "seq": n,
        "tenant": "acme",
        "state": 1,
        "spec": '{"steps": []}',
        "create_time": 1000.0 + n,
    }
    values.update(changes)
    return WorkflowRecord(**values)  # type: ignore[arg-type]


def test_the_workflow_migration_sorts_after_the_first():
    versions = [m.version for m in migrations.MIGRATIONS]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert any("workflow" in m.description for m in migrations.MIGRATIONS)


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_workflows_and_steps_come_back_in_order(store, make_store):
    await store.write(
        PutWorkflow(workflow(2, request_id="r", fingerprint="f")),
        PutWorkflow(workflow(1)),
        wait=True,
    )
    store.write(
        PutWorkflowStep(
            WorkflowStepRecord("wf2", "a", 3, "tasks/1", 1, 5.0, 6.0, outputs='["tensors/x"]')
        ),
        PutWorkflowStep(WorkflowStepRecord("wf2", "b", 2, "tasks/2", 1, 6.0)),
        UpdateWorkflow(
            "wf1", {"state": 3, "end_time": 9.0, "error_code": 13, "error_message": "boom"}
        ),
    )
    # an upsert: the step's later state replaces the earlier one
    store.write(
        PutWorkflowStep(WorkflowStepRecord("wf2", "b", 4, "tasks/2", 2, 6.0, 7.0, 14, "lost"))
    )
    await store.sync()
    store = await reopened(store, make_store)
    try:
        snap = await store.load_workflows()
        assert [w.id for w in snap.workflows] == ["wf1", "wf2"]
        first, second = snap.workflows
        assert (first.state, first.error_code, first.error_message) == (3, 13, "boom")
        assert (second.request_id, second.fingerprint) == ("r", "f")
        steps = {s.step_id: s for s in snap.steps["wf2"]}
        assert steps["a"].outputs == '["tensors/x"]' and steps["a"].end_time == 6.0
        assert (steps["b"].state, steps["b"].attempt, steps["b"].error_message) == (4, 2, "lost")
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_deleting_a_workflow_removes_its_steps(store, make_store):
    await store.write(
        PutWorkflow(workflow(1)),
        PutWorkflowStep(WorkflowStepRecord("wf1", "a", 3)),
        PutWorkflow(workflow(2)),
        wait=True,
    )
    await store.write(DeleteWorkflow("wf1"), wait=True)
    store = await reopened(store, make_store)
    try:
        snap = await store.load_workflows()
        assert [w.id for w in snap.workflows] == ["wf2"]
        assert "wf1" not in snap.steps
    finally:
        await store.close()
