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


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_a_workflow_keeps_its_holder_lease_and_cancel_request(store, make_store):
    await store.write(PutWorkflow(workflow(1, owner="orch-x", lease_until=50.0)), wait=True)
    await store.write(UpdateWorkflow("wf1", {"cancel_requested": 7.0}), wait=True)
    store = await reopened(store, make_store)
    try:
        (back,) = (await store.load_workflows()).workflows
        assert (back.owner, back.lease_until, back.cancel_requested) == ("orch-x", 50.0, 7.0)
    finally:
        await store.close()


# What several orchestrators on one store share: only PostgreSQL is shared.
SHARED = ["postgresql"]


@pytest.mark.parametrize("make_store", SHARED, indirect=True)
async def test_workflows_are_read_found_and_listed_newest_first(store):
    await store.write(
        PutWorkflow(workflow(1, request_id="r1", fingerprint="f1")),
        PutWorkflow(workflow(2, state=2)),
        PutWorkflow(workflow(3)),
        PutWorkflow(workflow(4, tenant="other")),
        PutWorkflowStep(WorkflowStepRecord("wf1", "a", 3, "tasks/1", 1, 5.0, 6.0)),
        wait=True,
    )
    snap = await store.read_workflows(["wf1", "wf9"])
    assert [w.id for w in snap.workflows] == ["wf1"]
    assert [s.step_id for s in snap.steps["wf1"]] == ["a"]
    found = await store.find_workflow_request("acme", "r1")
    assert [w.id for w in found.workflows] == ["wf1"]
    assert not (await store.find_workflow_request("other", "r1")).workflows

    page = await store.list_workflow_records("acme", state=None, limit=2, below=None)
    assert [w.id for w in page.workflows] == ["wf3", "wf2"]
    last = page.workflows[-1]
    rest = await store.list_workflow_records(
        "acme", state=None, limit=2, below=(last.create_time, last.id)
    )
    assert [w.id for w in rest.workflows] == ["wf1"] and "wf1" in rest.steps
    running = await store.list_workflow_records("acme", state=1, limit=10, below=None)
    assert [w.id for w in running.workflows] == ["wf3", "wf1"]


@pytest.mark.parametrize("make_store", SHARED, indirect=True)
async def test_a_taken_workflow_request_id_is_refused_as_taken(store):
    from kernelmesh.core.store.base import RequestIdTaken

    await store.write(PutWorkflow(workflow(1, request_id="r", fingerprint="f")), wait=True)
    with pytest.raises(RequestIdTaken):
        await store.write(PutWorkflow(workflow(2, request_id="r", fingerprint="f")), wait=True)
    # the store goes on: the refusal was not a fault
    await store.write(PutWorkflow(workflow(3, request_id="s")), wait=True)
    assert [w.id for w in (await store.load_workflows()).workflows] == ["wf1", "wf3"]


@pytest.mark.parametrize("make_store", SHARED, indirect=True)
async def test_expired_workflow_leases_are_claimed_once_and_the_old_holder_is_told(store):
    await store.write(
        PutWorkflow(workflow(1, owner="x", lease_until=100.0)),  # expires at 100
        PutWorkflow(workflow(2, owner="x", lease_until=100.0, state=2)),  # finished
        PutWorkflow(workflow(3, owner="y", lease_until=1000.0)),  # live elsewhere
        PutWorkflowStep(WorkflowStepRecord("wf1", "a", 3, "tasks/1", 1, 5.0, 6.0)),
        wait=True,
    )
    # x renews in time: nothing to claim
    assert await store.renew_workflow_leases("x", 300.0, ["wf1"]) == []
    assert not (await store.claim_expired_workflows("y", 500.0, 200.0)).workflows
    # x stalls past its lease: y claims the running one (with its steps), once
    claimed = await store.claim_expired_workflows("y", 500.0, 400.0)
    assert [w.id for w in claimed.workflows] == ["wf1"]
    assert claimed.workflows[0].owner == "y" and claimed.workflows[0].lease_until == 500.0
    assert [s.step_id for s in claimed.steps["wf1"]] == ["a"]
    assert not (await store.claim_expired_workflows("z", 600.0, 400.0)).workflows
    # x's late renewal learns that wf1 is no longer its own (and wf9 is gone)
    assert sorted(await store.renew_workflow_leases("x", 700.0, ["wf1", "wf9"])) == ["wf1", "wf9"]
    (row,) = (await store.read_workflows(["wf1"])).workflows
    assert (row.owner, row.lease_until) == ("y", 500.0)


@pytest.mark.parametrize("make_store", SHARED, indirect=True)
async def test_a_cancel_request_reaches_the_holder_of_a_running_workflow(store):
    await store.write(
        PutWorkflow(workflow(1, owner="x", lease_until=100.0)),
        PutWorkflow(workflow(2, owner="x", lease_until=100.0)),
        PutWorkflow(workflow(3, owner="x", lease_until=100.0, state=4)),
        wait=True,
    )
    assert await store.workflow_cancel_requests("x") == []
    await store.write(
        UpdateWorkflow("wf2", {"cancel_requested": 1.0}),
        UpdateWorkflow("wf3", {"cancel_requested": 1.0}),
        wait=True,
    )
    assert await store.workflow_cancel_requests("x") == ["wf2"]
    assert await store.workflow_cancel_requests("y") == []
