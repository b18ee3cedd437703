"""The store's part of the mesh: node records on every store kind; on
PostgreSQL (shared by several orchestrators) task leases, claims of expired
tasks that skip rows another claimer holds, and one sweeper at a time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from store_records import task

from kernelmesh.core.store.base import (
    AttemptRecord,
    NodeRecord,
    PutAttempt,
    PutBlob,
    PutNode,
    PutTask,
    RenewNode,
    UpdateTask,
    inputs_key,
)
from kernelmesh.core.store.memory import MemoryStore
from kernelmesh.core.store.postgres import PostgresStore
from kernelmesh.core.store.sqlite import SqliteStore


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_node_records_are_kept_and_renewed_only_by_their_orchestrator(
    kind, tmp_path: Path, request
):
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SqliteStore(tmp_path / "state")
    else:
        store = PostgresStore(request.getfixturevalue("pg_dsn"))
    await store.open()
    try:
        await store.write(
            PutNode(NodeRecord("node-a", "orch-x", "127.0.0.1:1", "reg", 10.0)), wait=True
        )
        await store.write(RenewNode("node-a", "orch-y", 99.0), wait=True)  # not its holder
        assert [n.lease_until for n in await store.list_nodes()] == [10.0]
        await store.write(RenewNode("node-a", "orch-x", 20.0), wait=True)
        assert await store.list_nodes() == [
            NodeRecord("node-a", "orch-x", "127.0.0.1:1", "reg", 20.0)
        ]
    finally:
        await store.close()


async def test_expired_tasks_are_claimed_once_with_attempts_and_inputs(pg_dsn):
    x, y, z = PostgresStore(pg_dsn), PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    for s in (x, y, z):
        await s.open()
    try:
        now = time.time()
        await x.write(
            PutTask(task(1, node="orch-x", lease_until=now - 1, state=2, attempt=1)),
            PutAttempt(AttemptRecord(f"{1:032x}", 1, 2, "node-a/cpu:0", now - 5)),
            PutBlob(inputs_key(f"{1:032x}"), b"inputs-1"),
            PutTask(task(2, node="orch-x", lease_until=now + 60)),  # held: not claimed
            PutTask(task(3, node="orch-x", lease_until=now - 1, state=3)),  # finished
            PutTask(task(4)),  # written before leases existed (NULL): claimable
            wait=True,
        )
        first, second = await asyncio.gather(
            y.claim_expired_tasks("orch-y", now + 30, now),
            z.claim_expired_tasks("orch-z", now + 30, now),
        )
        claimed = [t.id for t in first.tasks] + [t.id for t in second.tasks]
        assert sorted(claimed) == [f"{1:032x}", f"{4:032x}"]  # each once
        snap = first if any(t.seq == 1 for t in first.tasks) else second
        assert snap.blobs[inputs_key(f"{1:032x}")] == b"inputs-1"
        assert [a.number for a in snap.attempts[f"{1:032x}"]] == [1]
        assert (await y.claim_expired_tasks("orch-y", now + 30, now)).tasks == []

        # The holder renews its unfinished tasks, and learns which of those it
        # thought it held were claimed meanwhile (1 and 4) or are gone (9).
        await y.write(UpdateTask(f"{4:032x}", {"state": 3}), wait=True)
        ids = [f"{n:032x}" for n in (1, 2, 3, 4, 9)]
        lost = await x.renew_task_leases("orch-x", now + 120, ids)
        assert sorted(lost) == [f"{n:032x}" for n in (1, 4, 9)]
        leases = await x.read_tasks(ids, outputs=False)
        assert {t.seq: t.lease_until for t in leases.tasks}[2] == now + 120
        assert {t.seq: t.lease_until for t in leases.tasks}[3] == now - 1  # finished
    finally:
        for s in (x, y, z):
            await s.close()


async def test_one_sweeper_at_a_time_and_a_dead_one_blocks_nobody(pg_dsn):
    """The claim holds a transaction-scoped advisory lock: while another sweeper's
    claim runs, a claim takes nothing; once that transaction ends (committed, or its
    process killed), the next claim proceeds. A session lock on a kept connection
    outlived a killed orchestrator and stopped every later claim."""
    import asyncpg

    from kernelmesh.core.store.postgres import _SWEEPER_LOCK

    y = PostgresStore(pg_dsn)
    await y.open()
    other = await asyncpg.connect(pg_dsn)
    try:
        now = time.time()
        await y.write(PutTask(task(7, node="orch-x", lease_until=now - 1)), wait=True)
        sweeping = other.transaction()
        await sweeping.start()
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", _SWEEPER_LOCK)
        assert (await y.claim_expired_tasks("orch-y", now + 30, now)).tasks == []
        other.terminate()  # the other sweeper dies mid-claim
        give_up = time.monotonic() + 10  # until PostgreSQL sees its session end
        while not (claimed := await y.claim_expired_tasks("orch-y", now + 30, now)).tasks:
            assert time.monotonic() < give_up, "the dead sweeper's lock was never released"
            await asyncio.sleep(0.05)
        assert [t.id for t in claimed.tasks] == [f"{7:032x}"]
    finally:
        if not other.is_closed():
            other.terminate()
        await y.close()


async def test_a_request_id_another_orchestrator_holds_is_refused_as_taken(pg_dsn):
    """The unique (tenant, request_id) index makes one task per request id across
    orchestrators; the refusal is RequestIdTaken (not UNAVAILABLE), and the task
    holding the id is found with its attempts."""
    from kernelmesh.core.store.base import RequestIdTaken

    x, y = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    for s in (x, y):
        await s.open()
    try:
        await x.write(PutTask(task(1, request_id="r", node="orch-x")), wait=True)
        with pytest.raises(RequestIdTaken):
            await y.write(PutTask(task(2, request_id="r", node="orch-y")), wait=True)
        # Grouped with others, the refused entry alone fails.
        refused = y.write(PutTask(task(3, request_id="r")), wait=True)
        accepted = y.write(PutTask(task(4, request_id="s")), wait=True)
        with pytest.raises(RequestIdTaken):
            await refused
        await accepted
        found = await y.find_request("acme", "r")
        assert [t.id for t in found.tasks] == [f"{1:032x}"]
        assert (await y.find_request("other", "r")).tasks == []
    finally:
        for s in (x, y):
            await s.close()


async def test_reads_lists_cancels_and_notifications_across_orchestrators(pg_dsn):
    x, y = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    for s in (x, y):
        await s.open()
    heard: list[tuple[str, list[str]]] = []
    try:
        assert await y.listen(lambda kind, ids: heard.append((kind, ids)))
        await x.write(
            *(PutTask(task(n, node="orch-x", lease_until=time.time() + 60)) for n in range(1, 6)),
            PutBlob(f"tasks/{1:032x}/outputs", b"out-1"),
            PutAttempt(AttemptRecord(f"{1:032x}", 1, 3, "cpu:0", 1.0, 2.0)),
            wait=True,
        )
        snap = await y.read_tasks([f"{1:032x}", f"{9:032x}"])
        assert [t.id for t in snap.tasks] == [f"{1:032x}"]
        assert snap.blobs == {f"tasks/{1:032x}/outputs": b"out-1"}
        assert [a.number for a in snap.attempts[f"{1:032x}"]] == [1]

        # Newest first by (create_time, id), in pages.
        page = await y.list_task_records("acme", state=None, limit=2, below=None)
        assert [t.seq for t in page.tasks] == [5, 4]
        last = page.tasks[-1]
        page = await y.list_task_records(
            "acme", state=None, limit=10, below=(last.create_time, last.id)
        )
        assert [t.seq for t in page.tasks] == [3, 2, 1]
        assert (await y.list_task_records("acme", state=3, limit=10, below=None)).tasks == []

        # A cancel asked through y is seen by x, the holder, until the task ends.
        await y.write(UpdateTask(f"{2:032x}", {"cancel_requested": time.time()}), wait=True)
        assert await x.cancel_requests("orch-x") == [f"{2:032x}"]
        assert await x.cancel_requests("orch-y") == []
        await x.write(UpdateTask(f"{2:032x}", {"state": 5}), wait=True)
        assert await x.cancel_requests("orch-x") == []

        give_up = time.monotonic() + 10
        while not {"t", "c"} <= {kind for kind, _ in heard}:
            assert time.monotonic() < give_up, f"notifications: {heard}"
            await asyncio.sleep(0.05)
        assert ("c", [f"{2:032x}"]) in heard
        changed = {i for kind, ids in heard if kind == "t" for i in ids}
        assert changed == {f"{n:032x}" for n in range(1, 6)}

        # Claimed but not taken up: handed back for the next sweep.
        await x.release_task_leases("orch-x", [f"{3:032x}"])
        now = time.time()
        claimed = await y.claim_expired_tasks("orch-y", now + 30, now)
        assert [t.id for t in claimed.tasks] == [f"{3:032x}"]
    finally:
        for s in (x, y):
            await s.close()


async def test_big_blobs_live_in_postgresql_and_old_file_blobs_are_still_read(
    pg_dsn, tmp_path: Path
):
    """Orchestrators on different machines share nothing but the database: a blob
    over the inline threshold is a bytea row, no file; a row an earlier version
    wrote naming a file under the blob dir is still read from it."""
    from kernelmesh.core.store.sql import INLINE_BLOB_BYTES

    blobs = tmp_path / "blobs"
    store = PostgresStore(pg_dsn, blob_dir=blobs)
    await store.open()
    try:
        big = bytes(range(256)) * (INLINE_BLOB_BYTES // 256 + 64)
        await store.write(PutBlob("tasks/a/inputs", big), wait=True)
        assert not blobs.exists() or not any(blobs.iterdir())
        rows = await store._fetch("SELECT size, path FROM blobs WHERE key = ?", "tasks/a/inputs")
        assert [tuple(r) for r in rows] == [(len(big), None)]

        store.inline_blobs = False  # as an earlier version wrote big blobs
        await store.write(PutBlob("tasks/b/inputs", big), wait=True)
        assert [p.name for p in blobs.iterdir()] == ["tasks__b__inputs"]
        store.inline_blobs = True
        snap = await store.load()
        assert snap.blobs["tasks/a/inputs"] == big
        assert snap.blobs["tasks/b/inputs"] == big
    finally:
        await store.close()


async def test_a_request_id_held_elsewhere_answers_with_that_task_and_follows_it(pg_dsn):
    """Y is asked for a request id X committed (X alive, or dead and not yet
    claimed): Y answers with X's task read from the store, one task in all, and a
    caller waiting on it (a resumed workflow step) wakes when X finishes it."""
    import json

    import numpy as np

    from kernelmesh.core import devices
    from kernelmesh.core.errors import InvalidArgument
    from kernelmesh.core.mesh.shared_tasks import SharedTasks
    from kernelmesh.core.store import codec
    from kernelmesh.core.store.base import outputs_key
    from kernelmesh.core.tasks import TaskManager, TaskSpec, TaskState
    from kernelmesh.core.tensor_store import TensorStore

    store = PostgresStore(pg_dsn)
    await store.open()
    y = TaskManager(devices.discover("y", ("cpu",)), TensorStore(1 << 20), journal=store)
    y.owner = "orch-y"
    y.shared_view = SharedTasks(y, store, poll_s=0.05)
    await y.start()
    try:
        held = task(
            1,
            tenant="default",
            request_id="r",
            fingerprint="fp",
            node="orch-x",
            lease_until=time.time() + 600,
            spec=json.dumps({"params": {}, "retry": {}}),
            labels="{}",
        )
        await store.write(PutTask(held), wait=True)
        x = np.ones(4, np.float32)
        spec = TaskSpec(op="relu", inputs=[x])
        view = await y.submit_journaled(spec, request_id="r", fingerprint="fp")
        assert view.id == held.id and view.state is TaskState.QUEUED
        with pytest.raises(InvalidArgument):
            await y.submit_journaled(spec, request_id="r", fingerprint="other")
        assert [
            t.id
            for t in (
                await store.list_task_records("default", state=None, limit=10, below=None)
            ).tasks
        ] == [held.id]

        waiting = asyncio.ensure_future(view.wait())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        # X finishes it.
        await store.write(
            PutBlob(outputs_key(held.id), codec.encode([x * 2])),
            UpdateTask(held.id, {"state": 3, "end_time": time.time()}),
            wait=True,
        )
        await asyncio.wait_for(waiting, 10)
        assert view.state is TaskState.SUCCEEDED
        assert np.array_equal(view.outputs[0], x * 2)
    finally:
        await y.shutdown(0)
        await store.close()
