"""Several orchestrators on one PostgreSQL: a holder whose lease ran out cannot
write the end of a task another orchestrator claimed (fenced writes), and lease
renewals and group commits lock task rows in one order (no deadlock), with a
deadlock from elsewhere retried rather than surfaced."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from store_records import task

from kernelmesh.core.store.base import (
    AttemptRecord,
    Fenced,
    PutAttempt,
    PutBlob,
    PutTask,
    UpdateTask,
    outputs_key,
)
from kernelmesh.core.store.memory import MemoryStore
from kernelmesh.core.store.postgres import PostgresStore

STALLED_S = 2.0  # PostgreSQL ends a session idle in a transaction after this


def end(task_id: str, node: str, attempt: int) -> Fenced:
    """A holder's end of attempt `attempt`: outputs, the task's state, the attempt."""
    return Fenced(
        task_id,
        node,
        attempt,
        (
            PutBlob(outputs_key(task_id), f"{node}-outputs".encode()),
            UpdateTask(task_id, {"state": 3, "end_time": 2.0}),
            PutAttempt(AttemptRecord(task_id, attempt, 3, f"{node}/cpu:0", 1.0, 2.0)),
        ),
    )


def start(task_id: str, node: str, attempt: int) -> Fenced:
    return Fenced(
        task_id,
        node,
        attempt - 1,
        (
            UpdateTask(task_id, {"state": 2, "attempt": attempt}),
            PutAttempt(AttemptRecord(task_id, attempt, 2, f"{node}/cpu:0", 1.0)),
        ),
    )


async def test_a_stale_holder_cannot_write_the_end_of_a_claimed_task(pg_dsn):
    x, y = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    for s in (x, y):
        await s.open()
    fenced: list[str] = []
    x.fenced_out = fenced.extend
    one, two = f"{1:032x}", f"{2:032x}"
    try:
        now = time.time()
        await x.write(
            PutTask(task(1, node="orch-x", lease_until=now + 60)),
            PutTask(task(2, node="orch-x", lease_until=now + 60)),
            wait=True,
        )
        # One batch: a start (attempt 0 -> 1) and the end of that attempt; the
        # second is checked against the row as the first left it.
        await x.write(start(one, "orch-x", 1), start(two, "orch-x", 1), wait=True)
        await x.write(end(two, "orch-x", 1), wait=True)
        assert fenced == []

        # X stalls past its lease; Y claims task 1 and runs attempt 2 to its end.
        claimed = await y.claim_expired_tasks("orch-y", now + 600, now + 120)
        assert [t.id for t in claimed.tasks] == [one]
        await y.write(start(one, "orch-y", 2), end(one, "orch-y", 2), wait=True)

        # X comes back and writes the end of its attempt 1: dropped whole, and X is told.
        await x.write(end(one, "orch-x", 1), wait=True)
        assert fenced == [one]
        snap = await y.read_tasks([one, two])
        attempts = {i: [(a.number, a.state) for a in snap.attempts[i]] for i in (one, two)}
        assert attempts[one] == [(1, 2), (2, 3)]  # X's attempt 1 never marked SUCCEEDED
        assert attempts[two] == [(1, 3)]
        assert snap.blobs[outputs_key(one)] == b"orch-y-outputs"
        # X's renewal says which of the tasks it thought it held are no longer its.
        assert await x.renew_task_leases("orch-x", now + 60, [one, two]) == [one]
        # A wrong attempt number is refused even for the holder.
        await y.write(end(one, "orch-y", 1), wait=True)
        assert x.last_error is None and y.last_error is None
    finally:
        for s in (x, y):
            await s.close()


async def test_the_memory_store_fences_the_same_way():
    store = MemoryStore()
    fenced: list[str] = []
    store.fenced_out = fenced.extend
    one = f"{1:032x}"
    store.write(PutTask(task(1, node="orch-y", attempt=2)))
    store.write(end(one, "orch-x", 2), end(one, "orch-y", 1))
    assert fenced == [one, one] and store.tasks[one].state == 1
    store.write(end(one, "orch-y", 2))
    assert store.tasks[one].state == 3 and fenced == [one, one]


async def test_renewals_and_commits_lock_in_one_order_and_never_deadlock(pg_dsn):
    """A holder renews while its writer commits updates of the same rows in any
    order, and a second orchestrator records cancels of them: before the rows
    were locked in id order by both, this deadlocked (40P01)."""
    x, y = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    for s in (x, y):
        await s.open()
    ids = [f"{n:032x}" for n in range(1, 41)]
    rounds = 60
    try:
        await x.write(
            *(PutTask(task(n, node="orch-x", lease_until=time.time() + 60)) for n in range(1, 41)),
            wait=True,
        )
        rng = random.Random(7)

        async def renew() -> None:
            for _ in range(rounds):
                assert await x.renew_task_leases("orch-x", time.time() + 60, ids) == []

        async def commit(store: PostgresStore, field: str) -> None:
            for i in range(rounds):
                order = rng.sample(ids, len(ids))
                # Several entries per batch, each touching rows in its own order.
                futures = [
                    store.write(
                        *(UpdateTask(t, {field: float(i)}) for t in order[k : k + 10]), wait=True
                    )
                    for k in range(0, len(order), 10)
                ]
                await asyncio.gather(*futures)

        await asyncio.wait_for(
            asyncio.gather(renew(), commit(x, "run_seconds"), commit(y, "cancel_requested")), 120
        )
        assert x.rollbacks == 0 and y.rollbacks == 0
        assert x.last_error is None and y.last_error is None
    finally:
        for s in (x, y):
            await s.close()


async def test_a_deadlock_is_retried_not_surfaced(pg_dsn):
    """Another session locks task 2 then task 1 while the store's commit holds 1
    and waits for 2: PostgreSQL breaks the cycle by rolling the commit back
    (40P01); the store tries it again and its caller sees it succeed."""
    import asyncpg

    store = PostgresStore(pg_dsn)
    await store.open()
    other = await asyncpg.connect(pg_dsn)
    one, two = f"{1:032x}", f"{2:032x}"
    try:
        await store.write(PutTask(task(1)), PutTask(task(2)), wait=True)
        # The store's session is the one that detects the deadlock (and is rolled back).
        await other.execute("SET deadlock_timeout = '30s'")
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", two)
        committed = store.write(
            UpdateTask(one, {"device": "d5"}), UpdateTask(two, {"device": "d5"}), wait=True
        )
        assert committed is not None

        async def waiting_for_lock() -> bool:
            return bool(
                await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

        give_up = time.monotonic() + 20
        while not await waiting_for_lock():
            assert time.monotonic() < give_up, "the commit never waited for task 2"
            await asyncio.sleep(0.02)
        # Now the cycle: this session wants task 1, which the commit holds.
        await asyncio.wait_for(
            other.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", one), 30
        )
        await locking.commit()
        await asyncio.wait_for(committed, 30)
        assert store.rollbacks >= 1 and store.last_error is None
        snap = await store.read_tasks([one, two], outputs=False)
        assert [t.device for t in snap.tasks] == ["d5", "d5"]
    finally:
        await other.close()
        await store.close()


async def test_a_holder_stalled_mid_transaction_does_not_stop_the_claim(pg_dsn):
    """X stalls (as under SIGSTOP) inside a transaction that holds its task rows
    locked. PostgreSQL ends X's session once it has been idle in the transaction
    for `stalled_transaction_s`, so Y claims the expired tasks rather than
    skipping their locked rows for as long as X stays stopped."""
    # Long enough that the first claim surely comes while X's session still lives
    # (at 0.5 s a loaded machine could let PostgreSQL end it before that claim).
    x = PostgresStore(pg_dsn, stalled_transaction_s=STALLED_S)
    y = PostgresStore(pg_dsn)
    for s in (x, y):
        await s.open()
    ids = [f"{n:032x}" for n in (1, 2)]
    try:
        now = time.time()
        await x.write(
            *(PutTask(task(n, node="orch-x", lease_until=now - 1)) for n in (1, 2)), wait=True
        )
        assert x._pool is not None
        stalled = await x._pool.acquire()
        held = stalled.transaction()
        await held.start()
        await stalled.execute("SELECT id FROM tasks ORDER BY id FOR UPDATE")
        # Locked: the claim skips both rows while X's transaction is open.
        assert (await y.claim_expired_tasks("orch-y", now + 600, now)).tasks == []
        claimed: list[str] = []
        deadline = time.monotonic() + 30
        while not claimed and time.monotonic() < deadline:
            claimed = [t.id for t in (await y.claim_expired_tasks("orch-y", now + 600, now)).tasks]
            await asyncio.sleep(0.05)
        assert claimed == ids
        with pytest.raises(Exception, match=r"idle-in-transaction|connection"):
            await stalled.execute("SELECT 1")
        await x._pool.release(stalled)
        # X's pool replaces the ended session: X's renewal now reports both lost.
        assert await x.renew_task_leases("orch-x", now + 60, ids) == ids
    finally:
        for s in (x, y):
            await s.close()
