"""The Store contract, the same cases on SQLite, PostgreSQL and the in-memory
store: what is written comes back from `load` (after a reopen for the
durable ones), group commit, API keys, migrations and faults."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import store_records
from postgres_db import create_database, drop_database

from kernelmesh.core.api_keys import ApiKeyRecord, Role
from kernelmesh.core.store import (
    SchemaTooNew,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    TensorRecord,
    migrations,
)
from kernelmesh.core.store.base import (
    AttemptRecord,
    DeleteTask,
    DeleteTensor,
    PutAttempt,
    PutBlob,
    PutTask,
    PutTensor,
    UpdateTask,
    inputs_key,
    outputs_key,
)
from kernelmesh.core.store.memory import MemoryStore
from kernelmesh.core.store.postgres import PostgresStore, redacted
from kernelmesh.core.store.sql import INLINE_BLOB_BYTES
from kernelmesh.core.store.sqlite import SqliteStore

KINDS = ["memory", "sqlite", "postgresql"]
DURABLE = ["sqlite", "postgresql"]


@pytest.fixture
def pg_database() -> AsyncIterator[str]:
    dsn, name = create_database()
    yield dsn
    drop_database(name)


@pytest.fixture
def make_store(request, tmp_path: Path) -> Callable[[], Store]:
    """A factory for stores of the parametrised kind over one place, so a test
    can close a store and open the same state again."""
    kind = request.param
    dsn = request.getfixturevalue("pg_database") if kind == "postgresql" else None
    memory = MemoryStore()

    def make() -> Store:
        if kind == "memory":
            return memory
        if kind == "sqlite":
            return SqliteStore(tmp_path / "state")
        return PostgresStore(dsn, blob_dir=tmp_path / "blobs")

    return make


@pytest.fixture
async def store(make_store) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    yield opened
    await opened.close()


def task(n: int, **changes: object) -> TaskRecord:
    return store_records.task(n, **{"labels": f'{{"n": "{n}"}}', **changes})


async def reopened(store: Store, make_store) -> Store:
    """The same state through a new store object (for memory: the same one)."""
    if isinstance(store, MemoryStore):
        return store
    await store.close()
    fresh = make_store()
    await fresh.open()
    return fresh


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_a_committed_task_comes_back_with_its_blobs_and_attempts(store, make_store):
    record = task(1, request_id="r-1", fingerprint="f")
    await store.write(PutTask(record), PutBlob(inputs_key(record.id), b"in"), wait=True)
    store.write(
        UpdateTask(record.id, {"state": 2, "attempt": 1, "device": "cpu:0", "start_time": 5.0}),
        PutAttempt(AttemptRecord(record.id, 1, 2, "cpu:0", 5.0)),
    )
    await store.sync()
    store = await reopened(store, make_store)
    try:
        snap = await store.load()
        [got] = snap.tasks
        assert (got.id, got.state, got.attempt, got.device) == (record.id, 2, 1, "cpu:0")
        assert (got.request_id, got.fingerprint, got.labels) == ("r-1", "f", record.labels)
        assert snap.blobs[inputs_key(record.id)] == b"in"
        assert [a.number for a in snap.attempts[record.id]] == [1]
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_deleting_a_task_removes_its_attempts_and_blobs(store):
    record = task(2)
    store.write(
        PutTask(record),
        PutBlob(inputs_key(record.id), b"x" * (INLINE_BLOB_BYTES + 1)),
        PutBlob(outputs_key(record.id), b"y"),
        PutAttempt(AttemptRecord(record.id, 1, 3, "cpu:0", 1.0, 2.0)),
    )
    await store.sync()
    store.write(DeleteTask(record.id))
    await store.sync()
    snap = await store.load()
    assert snap.tasks == [] and snap.attempts == {} and snap.blobs == {}
    if isinstance(store, SqliteStore | PostgresStore):
        assert not any(store.files.directory.glob("*")) if store.files.directory.exists() else True


@pytest.mark.parametrize("make_store", DURABLE, indirect=True)
async def test_a_big_blob_survives_a_reopen(store, make_store):
    """A file beside the database on SQLite; a bytea row on PostgreSQL, which
    orchestrators on different machines share with nothing else."""
    data = bytes(range(256)) * ((INLINE_BLOB_BYTES // 256) + 4)
    await store.write(PutTask(task(3)), PutBlob(inputs_key(task(3).id), data), wait=True)
    files = store.files.directory
    as_files = files.exists() and any(files.iterdir())
    assert as_files is (store.kind == "sqlite")
    store = await reopened(store, make_store)
    try:
        assert (await store.load()).blobs[inputs_key(task(3).id)] == data
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_named_tensors_are_kept_until_deleted(store, make_store):
    record = TensorRecord("tensors/a", "acme", "cpu:0", "float32", "[2]", 8, 1.0)
    store.write(
        PutTensor(record, b"\0" * 8),
        PutTensor(
            record.__class__("tensors/b", *["acme", "cpu:0", "float32", "[1]", 4, 2.0]), b"\1" * 4
        ),
    )
    store.write(DeleteTensor("tensors/b"))
    await store.sync()
    store = await reopened(store, make_store)
    try:
        snap = await store.load()
        assert [t.name for t in snap.tensors] == ["tensors/a"]
        assert snap.blobs == {"tensors/a": b"\0" * 8}
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_submissions_arriving_together_share_commits(store):
    """Group commit: 300 waited-for writes issued at once all resolve, in far
    fewer transactions than writes (counted where the store can say)."""
    futures = [store.write(PutTask(task(100 + i)), wait=True) for i in range(300)]
    await asyncio.gather(*futures)
    snap = await store.load()
    assert len(snap.tasks) == 300
    assert [t.seq for t in snap.tasks] == sorted(t.seq for t in snap.tasks)


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_api_keys_follow_the_api_key_store_protocol(store, make_store):
    old = ApiKeyRecord("k1", b"\x01" * 32, "acme", Role.USER, "ci", created_at=10.0)
    new = ApiKeyRecord("k2", b"\x02" * 32, "beta", Role.ADMIN, "ops", 20.0, expires_at=99.0)
    await store.put_api_key(new)
    await store.put_api_key(old)
    assert await store.get_api_key_by_digest(b"\x02" * 32) == new
    assert await store.get_api_key("k1") == old
    assert await store.get_api_key("nope") is None
    assert await store.get_api_key_by_digest(b"\x03" * 32) is None
    assert [r.key_id for r in await store.list_api_keys()] == ["k1", "k2"]
    assert [r.key_id for r in await store.list_api_keys("beta")] == ["k2"]
    revoked = await store.revoke_api_key("k1", 50.0)
    assert revoked is not None and revoked.revoked_at == 50.0
    # An earlier revocation stands; a later one changes nothing.
    assert (await store.revoke_api_key("k1", 60.0)).revoked_at == 50.0
    assert (await store.revoke_api_key("k1", 40.0)).revoked_at == 40.0
    assert await store.revoke_api_key("nope", 1.0) is None
    store = await reopened(store, make_store)
    try:
        got = await store.get_api_key("k1")
        assert got is not None and got.revoked_at == 40.0 and got.role is Role.USER
        assert not got.active_at(45.0) and got.active_at(39.0)
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", DURABLE, indirect=True)
async def test_a_newer_schema_refuses_to_open_naming_both_versions(store, make_store):
    future = migrations.LATEST + 5
    if isinstance(store, SqliteStore):
        await store.close()
        db = sqlite3.connect(store.path)
        db.execute("INSERT INTO schema_version VALUES (?)", (future,))
        db.commit()
        db.close()
    else:
        async with store._pool.acquire() as conn:
            await conn.execute("INSERT INTO schema_version VALUES ($1)", future)
        await store.close()
    again = make_store()
    with pytest.raises(SchemaTooNew) as err:
        await again.open()
    assert f"schema version {future}" in str(err.value)
    assert f"up to {migrations.LATEST}" in str(err.value)


@pytest.mark.parametrize("make_store", DURABLE, indirect=True)
async def test_reopening_applies_no_migration_twice(store, make_store):
    store = await reopened(store, make_store)
    try:
        if isinstance(store, SqliteStore):
            rows = store._read("SELECT version FROM schema_version")
        else:
            rows = await store._fetch("SELECT version FROM schema_version")
        assert [next(iter(r)) for r in rows] == [m.version for m in migrations.MIGRATIONS]
    finally:
        await store.close()


async def test_a_corrupt_database_is_refused_with_its_path(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"state\.sqlite"):
        await SqliteStore(state).open()


async def test_an_unwritable_state_dir_is_refused(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("a file, not a directory")
    with pytest.raises(StoreError, match="cannot create the state dir"):
        await SqliteStore(parent / "state").open()


async def test_a_failed_commit_fails_waiters_and_keeps_unwaited_updates(tmp_path):
    """A write the database refuses fails its waiter with UNAVAILABLE; updates
    nobody waits for are kept and land once the database takes writes again."""
    store = SqliteStore(tmp_path / "state")
    await store.open()
    await store.write(PutTask(task(7)), wait=True)
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    store._db.execute("PRAGMA busy_timeout=50")
    try:
        store.write(UpdateTask(task(7).id, {"state": 3}))
        with pytest.raises(StoreUnavailable):
            await store.write(PutTask(task(8)), wait=True)
    finally:
        blocker.rollback()
        blocker.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = {t.id: t.state for t in (await store.load()).tasks}
        if states.get(task(7).id) == 3:
            break
        await asyncio.sleep(0.05)
    assert states == {task(7).id: 3}
    await store.close()


async def test_postgres_down_at_start_is_an_error_naming_it():
    store = PostgresStore("postgresql://km:secret@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="cannot reach PostgreSQL") as err:
        await store.open()
    assert "secret" not in str(err.value)
    assert redacted("postgresql://km:secret@h/db") == "postgresql://km:***@h/db"


async def test_postgres_dropping_mid_run_is_unavailable_and_recovers(pg_database):
    """Connections cut and refused: a waited-for write fails with UNAVAILABLE
    (never a silent success); the unwaited update lands once PostgreSQL is back."""
    from postgres_db import admin

    name = urlsplit(pg_database).path.lstrip("/")
    store = PostgresStore(pg_database)
    await store.open()
    try:
        await store.write(PutTask(task(1)), wait=True)
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        store.write(UpdateTask(task(1).id, {"state": 3}))
        with pytest.raises(StoreUnavailable):
            await store.write(PutTask(task(2)), wait=True)
        with pytest.raises(StoreUnavailable):
            await store.load()
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        deadline = time.monotonic() + 20
        states: dict[str, int] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(StoreUnavailable):
                states = {t.id: t.state for t in (await store.load()).tasks}
                if states.get(task(1).id) == 3:
                    break
            await asyncio.sleep(0.1)
        assert states == {task(1).id: 3}
    finally:
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await store.close()


async def test_blob_files_no_row_names_are_swept_at_open(tmp_path):
    """A file written just before a crash, whose row never committed, is garbage."""
    store = SqliteStore(tmp_path / "state")
    await store.open()
    data = b"z" * (INLINE_BLOB_BYTES + 1)
    await store.write(PutTask(task(9)), PutBlob(inputs_key(task(9).id), data), wait=True)
    await store.close()
    (store.files.directory / "tasks__orphan__inputs").write_bytes(b"never committed")
    (store.files.directory / "x.tmp").write_bytes(b"half written")
    store = SqliteStore(tmp_path / "state")
    await store.open()
    snap = await store.load()
    assert snap.blobs[inputs_key(task(9).id)] == data
    assert sorted(p.name for p in store.files.directory.iterdir()) == [
        store.files.path(inputs_key(task(9).id)).name
    ]
    await store.close()


# -- where the mesh's nodes hold named tensors (migration 6) -----------------


@pytest.mark.parametrize("make_store", KINDS, indirect=True)
async def test_tensor_locations_are_kept_marked_lost_and_deleted(store, make_store):
    from kernelmesh.core.mesh.tensors import RemoteTensor, TensorLocations

    locations = TensorLocations(store)
    for name, node in (("tensors/a", "node-a"), ("tensors/b", "node-b"), ("tensors/c", "node-a")):
        await locations.put(RemoteTensor(name, "acme", node, "cpu:0", "float32", (2, 3)))
    await locations.forget("tensors/c")
    assert locations.node_gone("node-a", "was lost (test)") == 1
    await store.sync()
    store = await reopened(store, make_store)
    try:
        again = TensorLocations(store)
        assert await again.load() == 2
        a = again.get("tensors/a", "acme")
        assert (a.node, a.shape, a.dtype, a.nbytes) == ("node-a", (2, 3), "float32", 24)
        assert a.lost == "was lost (test)"
        assert again.get("tensors/b", "acme").lost == ""
        assert again.find("tensors/c", "acme") is None
        assert again.find("tensors/b", "other-tenant") is None
        [only] = await store.tensor_locations("tensors/b")
        assert only.node == "node-b"
    finally:
        await store.close()


@pytest.mark.parametrize("make_store", DURABLE, indirect=True)
async def test_an_update_no_statement_expresses_fails_alone_and_the_writer_goes_on(store):
    """A bad operation (a bug upstream) grouped with good ones fails only its own
    waiter; the writer lives on and commits what comes next."""
    bad = store.write(UpdateTask(f"{1:032x}", {"no_such_column": 1}), wait=True)
    good = store.write(PutTask(task(2)), wait=True)
    assert bad is not None and good is not None
    with pytest.raises(ValueError, match="no_such_column"):
        await bad
    await good
    await store.write(PutTask(task(3)), wait=True)
    snap = await store.load()
    assert sorted(t.seq for t in snap.tasks) == [2, 3]
