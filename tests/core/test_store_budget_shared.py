"""LLM token budgets in the configured store (SQLite or PostgreSQL): a
reservation is one transaction in the database, committed before the upstream
call; processes killed mid-call never make the total granted exceed the budget;
two servers on one PostgreSQL draw on one budget; a dead process's reservation
is charged in full once it expires."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from postgres_db import create_database, drop_database

from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm.budget import BudgetLedger
from kernelmesh.core.store import Store, StoreUsage
from kernelmesh.core.store.memory import MemoryStore
from kernelmesh.core.store.postgres import PostgresStore
from kernelmesh.core.store.sqlite import SqliteStore

BUDGET = 300


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """What `--store` would name: a SQLite state dir or a PostgreSQL URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "state")
        return
    dsn, name = create_database()
    yield dsn
    drop_database(name)


def open_store(where: str) -> Store:
    if where.startswith("postgres"):
        return PostgresStore(where)
    return SqliteStore(where)


def config(budget: int = BUDGET) -> SimpleNamespace:
    return SimpleNamespace(limits_for=lambda t: SimpleNamespace(token_budget=budget))


# One process: reserve 100-token calls through the store until refused or `calls`
# are made, then die by SIGKILL at once (settled calls: before the group commit).
_PROCESS = """
import asyncio, os, signal, sys
from types import SimpleNamespace
from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm.budget import BudgetLedger
from kernelmesh.core.store import StoreUsage
from kernelmesh.core.store.postgres import PostgresStore
from kernelmesh.core.store.sqlite import SqliteStore

where, settle, calls = sys.argv[1], sys.argv[2] == "settle", int(sys.argv[3])

async def main():
    store = PostgresStore(where) if where.startswith("postgres") else SqliteStore(where)
    await store.open()
    usage = StoreUsage(store, f"proc-{os.getpid()}")
    await usage.open()
    config = SimpleNamespace(limits_for=lambda t: SimpleNamespace(token_budget=BUDGET))
    ledger = BudgetLedger(config, journal=usage)
    for _ in range(calls):
        try:
            reservation = await ledger.reserve_async("acme", 100)
        except ResourceExhausted:
            break
        print("granted", flush=True)  # the upstream call spends all 100 tokens
        if settle:
            ledger.settle(reservation, 100)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
""".replace("BUDGET", str(BUDGET))


@pytest.mark.parametrize("settle", ["settle", "mid-call"])
def test_processes_killed_after_granting_never_exceed_the_budget(where, settle):
    granted = 0
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", _PROCESS, where, settle, "2"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == -9, done.stderr
        granted += done.stdout.count("granted") * 100
    assert granted == BUDGET  # all of it was handed out, and never more


async def test_two_servers_on_one_postgresql_share_one_budget():
    """Two servers' stores (separate pools) reserve for one tenant at once: the
    database grants exactly what fits, wherever the requests arrive."""
    dsn, name = create_database()
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    try:
        ledgers = []
        for i, store in enumerate(stores):
            await store.open()
            usage = StoreUsage(store, f"orch-{i}")
            await usage.open()
            ledgers.append(BudgetLedger(config(100), journal=usage))  # type: ignore[arg-type]

        async def one(i: int) -> int:
            try:
                await ledgers[i % 2].reserve_async("acme", 7)
            except ResourceExhausted:
                return 0
            return 7

        granted = await asyncio.gather(*(one(i) for i in range(40)))
        assert sum(granted) == 98  # 14 of 7 tokens fit in 100; never more
        assert {i % 2 for i, g in enumerate(granted) if g} == {0, 1}  # both servers granted
        answer = await stores[0].reserve_budget("acme", 2, 100, "orch-0", time.time() + 60, 0.0)
        assert answer.hold_id is not None and (answer.spent, answer.reserved) == (0, 100)
    finally:
        for store in stores:
            await store.close()
        drop_database(name)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_settled_and_expired_reservations(kind, tmp_path, request):
    """A settled reservation is charged what its call used; one nobody settled
    (its process died) stays held until it expires, then is charged in full."""
    if kind == "memory":
        store: Store = MemoryStore()
    elif kind == "sqlite":
        store = SqliteStore(tmp_path / "state")
    else:
        dsn, name = create_database()
        request.addfinalizer(lambda: drop_database(name))
        store = PostgresStore(dsn)
    await store.open()
    try:
        now = 1000.0
        first = await store.reserve_budget("acme", 60, 100, "a", now + 10, now)
        assert first.hold_id is not None
        usage = StoreUsage(store, "a")
        usage.release(first.hold_id, "acme", 25)
        await store.sync()
        dead = await store.reserve_budget("acme", 70, 100, "dead", now + 10, now)
        assert dead.hold_id is not None and (dead.spent, dead.reserved) == (25, 70)
        refused = await store.reserve_budget("acme", 10, 100, "b", now + 10, now)
        assert refused.hold_id is None
        # Past its expiry the dead process's reservation is spent in full, not freed.
        later = await store.reserve_budget("acme", 5, 100, "b", now + 60, now + 11)
        assert later.hold_id is not None and (later.spent, later.reserved) == (95, 5)
        usage.release(dead.hold_id, "acme", 1)  # too late: it was charged in full
        await store.sync()
        spent, _ = await store.budget_usage()
        assert spent == {"acme": 95}
    finally:
        await store.close()


async def test_usage_rows_are_kept_in_the_store(tmp_path):
    store = SqliteStore(tmp_path / "state")
    await store.open()
    usage = StoreUsage(store, "a")
    await usage.open()
    tokens = SimpleNamespace(prompt_tokens=3, completion_tokens=4)
    usage.record("acme", "m", "openai", "primary", tokens, 0.5)  # type: ignore[arg-type]
    usage.record("acme", "m", "openai", "primary", tokens, 0.5)  # type: ignore[arg-type]
    await store.sync()
    await store.close()

    store = SqliteStore(tmp_path / "state")
    await store.open()
    try:
        again = StoreUsage(store, "b")
        await again.open()
        (record,) = again.summary("acme")
        assert (record.requests, record.prompt_tokens, record.completion_tokens) == (2, 6, 8)
        assert record.cost == 1.0
    finally:
        await store.close()


async def test_a_usage_sqlite_of_an_earlier_version_is_imported_once(tmp_path):
    """Its spent budgets (a reservation left by a crash charged in full) and usage
    rows move into the store; the file is renamed, so a restart does not add them again."""
    from kernelmesh.core.store import UsageStore

    legacy = tmp_path / "state" / "usage.sqlite"
    old = UsageStore(legacy)
    tokens = SimpleNamespace(prompt_tokens=3, completion_tokens=4)
    old.record("acme", "m", "openai", "primary", tokens, 0.5)  # type: ignore[arg-type]
    old.release(old.hold("acme", 50), "acme", 7)
    old.hold("acme", 120)  # the process dies mid-call
    old.flush()
    old.close()

    for _ in range(2):  # a restart imports nothing more
        store = SqliteStore(tmp_path / "state")
        await store.open()
        try:
            usage = StoreUsage(store, "a")
            await usage.open()
            await usage.import_file(legacy)
            assert not legacy.exists()
            assert (tmp_path / "state" / "usage.sqlite.imported").is_file()
            spent, _ = await store.budget_usage()
            assert spent == {"acme": 127}
            assert usage.budget_spent() == {"acme": 127}
            (record,) = usage.summary("acme")
            assert (record.requests, record.prompt_tokens) == (1, 3)
            refused = await store.reserve_budget("acme", 200, 300, "a", time.time() + 60, 0.0)
            assert refused.hold_id is None and refused.spent == 127
        finally:
            await store.close()
