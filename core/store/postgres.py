"""The shared store: PostgreSQL through asyncpg (a pool for reads, one writer
task committing queued operations in batches). asyncpg was measured against
psycopg 3 (async) on the local cluster: about 1.4x the rows per second for
batched inserts and lower point-read latency.

Every blob is a bytea row, big ones included (up to PostgreSQL's 1 GiB per
value): orchestrators sharing the database share nothing else. Blob rows that
name a file (written by an earlier version under the state dir) are still read
from it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from kernelmesh.core.api_keys import ApiKeyRecord
from kernelmesh.core.store import migrations, sql
from kernelmesh.core.store.base import (
    BudgetAnswer,
    DeleteTask,
    Fenced,
    NodeRecord,
    Op,
    PutAttempt,
    PutNode,
    PutTask,
    RequestIdTaken,
    SchemaTooNew,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    TensorLocationRecord,
    UpdateTask,
)
from kernelmesh.core.store.workflow_records import WorkflowSnapshot

log = logging.getLogger(__name__)

_T = TypeVar("_T")
if TYPE_CHECKING:
    _Conn: TypeAlias = asyncpg.pool.PoolConnectionProxy[Any]

_RETRY_PAUSE_S = 0.2
_CLOSE_TIMEOUT_S = 5.0
_COMMIT_TIMEOUT_S = 30.0
# What the driver raises when the database or the link fails. InternalClientError
# ("another operation is in progress", on a connection cut mid-call) is not an
# InterfaceError; uncaught, it ended the writer and left every waiter hanging.
_DRIVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_CONNECT_TIMEOUT_S = 10.0
# Held while migrating, so two servers starting together migrate once.
_MIGRATION_LOCK = 0x6B6D_6573  # "kmes"
_NOT_TRANSIENT = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
    asyncpg.SyntaxOrAccessError,
)

_Entry = tuple[tuple[Op, ...], "asyncio.Future[None] | None"]

# A deadlock (40P01) or serialization failure (40001) rolls the transaction back
# whole; it is tried again at once, a few times, not reported as a store fault.
_ROLLED_BACK = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_ROLLBACK_RETRIES = 8
# Locks the task rows a batch writes, in id order, before anything else: every
# transaction that locks several task rows (a batch, a lease renewal, a release)
# takes them in the same order, so none waits on another in a cycle.
_LOCK_TASKS = (
    "SELECT id, node, attempt FROM tasks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE"
)

# LISTEN/NOTIFY between orchestrators sharing the database: "t:<ids>" (tasks whose
# state changed), "c:<ids>" (cancels asked), "n:" (a node record written). Sent in
# the transaction that makes the change, so delivered once it commits.
CHANNEL = "kernelmesh"
_IDS_PER_NOTICE = 200  # 33 bytes each: well under PostgreSQL's 8000-byte payload


def _newest_first(
    table: str,
    columns: Sequence[str],
    tenant: str,
    state: int | None,
    below: tuple[float, str] | None,
) -> tuple[str, list[object]]:
    """A page of a tenant's rows of `table` (one of this module's), newest first by
    creation, optionally in one state and below a (create_time, id) cursor; its
    last `?` is the row limit."""
    where = ["tenant = ?"]
    args: list[object] = [tenant]
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if below is not None:
        where.append("(create_time, id) < (?, ?)")
        args.extend(below)
    statement = (
        f"SELECT {', '.join(columns)} FROM {table} WHERE {' AND '.join(where)} "
        "ORDER BY create_time DESC, id DESC LIMIT ?"
    )
    return statement, args


def _numbered(statement: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...`."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", statement)


# sql.BUDGET_RESERVE with its parameters typed (PostgreSQL cannot infer them in a
# SELECT list), returning the id when the reservation was made.
_PG_BUDGET_RESERVE = _numbered(
    sql.BUDGET_RESERVE.replace(
        "SELECT ?, ?, ?, ?, ? WHERE",
        "SELECT ?::bigint, ?::text, ?::bigint, ?::text, ?::double precision WHERE",
    ).replace("+ ? <= ?", "+ ?::bigint <= ?::bigint")
    + " RETURNING id"
)


def redacted(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# How long one of our sessions may sit in an open transaction before PostgreSQL
# ends it. None of ours waits between statements, so a transaction idle that long
# belongs to a process that stalled (SIGSTOP, a frozen VM, swapping) holding task
# row locks or the sweeper lock: until it ends, no other orchestrator can claim
# those tasks (the claim skips locked rows), however long ago their lease ran out.
STALLED_TRANSACTION_S = 5.0

# Taken (for the claim's transaction) by the one orchestrator that claims expired tasks.
_SWEEPER_LOCK = 0x6B6D_7377  # "kmsw"
_UNFINISHED = "(1, 2)"  # QUEUED, RUNNING
_WORKFLOW_RUNNING = 1  # kernelmesh.v1.WORKFLOW_STATE_RUNNING


class PostgresStore(Store):
    kind = "postgresql"
    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        blob_dir: str | Path | None = None,
        stalled_transaction_s: float = STALLED_TRANSACTION_S,
    ) -> None:
        self.dsn = dsn
        self.stalled_transaction_s = stalled_transaction_s
        # Read only: files that rows written by an earlier version name.
        self.files = sql.BlobFiles(Path(blob_dir) if blob_dir is not None else None)
        # False: blobs over 256 KiB as files under blob_dir, as before (for
        # benchmarks/bench_store.py's comparison; not a setting).
        self.inline_blobs = True
        self._inline = sql.BlobFiles(None)
        self._pool: asyncpg.Pool | None = None
        self._queue: list[_Entry] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._sql: dict[str, str] = {}
        self._listener: asyncpg.Connection | None = None
        self.last_error: str | None = None
        # Transactions committed and queue entries they carried (group commit's effect).
        self.commits = 0
        self.committed_entries = 0
        # Transactions rolled back by a deadlock or serialization failure and retried.
        self.rollbacks = 0

    @property
    def where(self) -> str:
        return redacted(self.dsn)

    def _q(self, statement: str) -> str:
        numbered = self._sql.get(statement)
        if numbered is None:
            numbered = self._sql[statement] = _numbered(statement)
        return numbered

    async def open(self) -> None:
        try:
            self._pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self.dsn or None,
                    min_size=1,
                    max_size=4,
                    server_settings={
                        "idle_in_transaction_session_timeout": str(
                            max(1, round(self.stalled_transaction_s * 1000))
                        )
                    },
                ),
                _CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(
                f"cannot reach PostgreSQL at {self.where}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                found = await conn.fetchval("SELECT MAX(version) FROM schema_version") or 0
                if found > migrations.LATEST:
                    raise SchemaTooNew(migrations.too_new_message(found, self.where))
                for migration in migrations.MIGRATIONS:
                    if migration.version > found:
                        for statement in migrations.render(migration, "postgresql"):
                            await conn.execute(statement)
                        await conn.execute(
                            "INSERT INTO schema_version VALUES ($1)", migration.version
                        )
        except StoreError:
            await self._pool.close()
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._pool.close()
            raise StoreError(
                f"PostgreSQL at {self.where}: cannot set up the schema: {exc}"
            ) from None
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    def write(self, *ops: Op, wait: bool = False) -> asyncio.Future[None] | None:
        if self._closing or self._writer is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((ops, future))
        self._wake.set()
        return future

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue, []
            if not await self._commit(batch) and not self._closing:
                await asyncio.sleep(_RETRY_PAUSE_S)

    async def _commit(self, batch: list[_Entry]) -> bool:
        assert self._pool is not None
        ops = [op for entry, _ in batch for op in entry]
        try:
            # Bounded: a connection cut mid-transaction can leave a call waiting for
            # ever, and every caller waiting for this commit with it.
            unlink, refused = await self._retried(
                lambda: asyncio.wait_for(self._transaction(ops), _COMMIT_TIMEOUT_S),
                "a commit",
            )
        except _NOT_TRANSIENT as exc:
            if len(batch) > 1:
                # One entry the database refuses (a request id another orchestrator
                # already committed) must not fail the others it was grouped with.
                results = [await self._commit([entry]) for entry in batch]
                return all(results)
            return self._failed(batch, exc)
        except _DRIVER_ERRORS as exc:
            return self._failed(batch, exc)
        except Exception as exc:  # an operation no statement expresses: a bug, not a fault
            # Uncaught, it ended the writer task and every waiter hung for ever.
            if len(batch) > 1:
                return all([await self._commit([entry]) for entry in batch])
            log.error("store %s: dropped an update it cannot write: %r", self.where, exc)
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(exc)
            return True
        self.last_error = None
        self.commits += 1
        self.committed_entries += len(batch)
        self.files.remove(unlink)
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)
        if refused:
            log.warning(
                "store %s: dropped the writes of %d tasks another orchestrator holds now "
                "(this one's lease on them ran out): %s",
                self.where,
                len(refused),
                ", ".join(refused[:10]),
            )
            if self.fenced_out is not None:
                self.fenced_out(refused)
        return True

    async def _retried(self, attempt: Callable[[], Awaitable[_T]], what: str) -> _T:
        """`attempt()`, again after a deadlock or serialization failure (its
        transaction was rolled back whole, so trying again is safe)."""
        for tries in range(1, _ROLLBACK_RETRIES + 1):
            try:
                return await attempt()
            except _ROLLED_BACK as exc:
                if tries == _ROLLBACK_RETRIES:
                    raise
                self.rollbacks += 1
                log.warning("store %s: %s was rolled back (%s); retrying", self.where, what, exc)
                await asyncio.sleep(random.uniform(0, 0.01 * tries))
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, batch: list[_Entry], exc: BaseException) -> bool:
        if _request_id_taken(exc):
            # Not a fault of the store: the caller reads the task that holds the id.
            log.info("store %s: a request id is taken: %s", self.where, exc)
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(RequestIdTaken(str(exc)))
            return True
        self.last_error = f"{type(exc).__name__}: {exc}"
        transient = not isinstance(exc, _NOT_TRANSIENT)
        log.error(
            "store %s: a commit of %d entries failed (%s)%s",
            self.where,
            len(batch),
            self.last_error,
            "; unacknowledged updates are kept for the next try" if transient else "",
        )
        error = StoreUnavailable(f"the state store (PostgreSQL) refused a write: {exc}")
        for _, future in batch:
            if future is not None and not future.done():
                future.set_exception(error)
        if transient and not self._closing:  # closing: give up rather than hang
            self._queue[:0] = [(ops, None) for ops, f in batch if f is None and ops]
        return False

    async def _transaction(self, ops: list[Op]) -> tuple[list[str], list[str]]:
        """Commits `ops` in one transaction; returns the blob keys whose files to
        remove and the ids of tasks whose Fenced writes were refused (dropped)."""
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            refused: list[str] = []
            held = _task_ids(ops)
            if held:
                locked = await conn.fetch(_LOCK_TASKS, sorted(held))
                ops, refused = _fence(ops, {r[0]: (r[1], r[2]) for r in locked})
            # Files are written off the event loop: they may be large.
            statements, unlink = await asyncio.to_thread(
                sql.plan, ops, self._inline if self.inline_blobs else self.files
            )
            for statement, rows in sql.grouped(statements):
                if len(rows) == 1:
                    await conn.execute(self._q(statement), *rows[0])
                else:
                    await conn.executemany(self._q(statement), rows)
            for payload in _notices(ops):
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        return unlink, refused

    async def ping(self) -> str | None:
        await self._fetch("SELECT 1")  # raises StoreUnavailable when unreachable
        return None

    async def listen(self, callback: Callable[[str, list[str]], None]) -> bool:
        """Calls `callback(kind, ids)` for each notification another orchestrator
        (or this one) sends; returns whether listening. Called again after the
        connection drops; callers poll as well, so a lost one only slows them."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        if self._closing:
            return False

        def received(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            kind, _, ids = str(payload).partition(":")
            callback(kind, ids.split(",") if ids else [])

        try:
            conn = await asyncio.wait_for(asyncpg.connect(self.dsn or None), _CONNECT_TIMEOUT_S)
            await conn.add_listener(CHANNEL, received)
        except _DRIVER_ERRORS as exc:
            log.warning("store %s: cannot listen for notifications: %s", self.where, exc)
            return False
        self._listener = conn
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(*_DRIVER_ERRORS):
                await asyncio.wait_for(listener.close(), _CLOSE_TIMEOUT_S)
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # A graceful close waits for every connection; one left mid-operation by
                # a cut connection or a cancelled call would make it wait forever.
                await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
            except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError, OSError) as exc:
                log.warning(
                    "store %s: closing the pool: %s; connections terminated", self.where, exc
                )
                pool.terminate()

    async def _fetch(self, statement: str, *args: object) -> list[asyncpg.Record]:
        if self._pool is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        try:
            return await self._pool.fetch(self._q(statement), *args, timeout=_COMMIT_TIMEOUT_S)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the state store (PostgreSQL) failed a read: {exc}") from None

    async def tensor_locations(self, name: str | None = None) -> list[TensorLocationRecord]:
        if name is None:
            rows = await self._fetch(sql.SELECT_TENSOR_LOCATIONS)
        else:
            rows = await self._fetch(sql.SELECT_TENSOR_LOCATIONS + " WHERE name = ?", name)
        return [sql.tensor_location_from_row(tuple(r)) for r in rows]

    async def load(self) -> Snapshot:
        snap = Snapshot()
        snap.tasks = [sql.task_from_row(tuple(r)) for r in await self._fetch(sql.SELECT_TASKS)]
        for row in await self._fetch(sql.SELECT_ATTEMPTS):
            attempt = sql.attempt_from_row(tuple(row))
            snap.attempts.setdefault(attempt.task_id, []).append(attempt)
        snap.tensors = [
            sql.tensor_from_row(tuple(r)) for r in await self._fetch(sql.SELECT_TENSORS)
        ]
        for key, data, path in await self._fetch(sql.SELECT_BLOBS):
            snap.blobs[key] = bytes(data) if path is None else self.files.read(path)
        return snap

    async def load_workflows(self) -> WorkflowSnapshot:
        snap = WorkflowSnapshot(
            [sql.workflow_from_row(tuple(r)) for r in await self._fetch(sql.SELECT_WORKFLOWS)], {}
        )
        for row in await self._fetch(sql.SELECT_WORKFLOW_STEPS):
            step = sql.workflow_step_from_row(tuple(row))
            snap.steps.setdefault(step.workflow_id, []).append(step)
        return snap

    # -- workflows held by several orchestrators -----------------------------------

    async def _workflow_snapshot(
        self, conn: _Conn, statement: str, *args: object
    ) -> WorkflowSnapshot:
        rows = await conn.fetch(self._q(statement), *args, timeout=_COMMIT_TIMEOUT_S)
        snap = WorkflowSnapshot([sql.workflow_from_row(tuple(r)) for r in rows], {})
        ids = [w.id for w in snap.workflows]
        if ids:
            for row in await conn.fetch(
                self._q(
                    sql.SELECT_WORKFLOW_STEPS.replace(
                        " ORDER BY", " WHERE workflow_id = ANY(?) ORDER BY"
                    )
                ),
                ids,
                timeout=_COMMIT_TIMEOUT_S,
            ):
                step = sql.workflow_step_from_row(tuple(row))
                snap.steps.setdefault(step.workflow_id, []).append(step)
        return snap

    async def _read_workflows(self, statement: str, *args: object) -> WorkflowSnapshot:
        if self._pool is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                return await self._workflow_snapshot(conn, statement, *args)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the state store (PostgreSQL) failed a read: {exc}") from None

    async def read_workflows(self, ids: Sequence[str]) -> WorkflowSnapshot:
        return await self._read_workflows(
            sql.SELECT_WORKFLOWS.replace(" ORDER BY", " WHERE id = ANY(?) ORDER BY"), list(ids)
        )

    async def find_workflow_request(self, tenant: str, request_id: str) -> WorkflowSnapshot:
        return await self._read_workflows(
            sql.SELECT_WORKFLOWS.replace(
                " ORDER BY", " WHERE tenant = ? AND request_id = ? ORDER BY"
            ),
            tenant,
            request_id,
        )

    async def list_workflow_records(
        self, tenant: str, *, state: int | None, limit: int, below: tuple[float, str] | None
    ) -> WorkflowSnapshot:
        statement, args = _newest_first("workflows", sql.WORKFLOW_COLUMNS, tenant, state, below)
        return await self._read_workflows(statement, *args, limit)

    async def renew_workflow_leases(
        self, owner: str, until: float, ids: Sequence[str] = ()
    ) -> list[str]:
        """As `renew_task_leases`, for the running workflows `owner` holds."""
        return await self._renew_leases(
            "workflows", "owner", f"state = {_WORKFLOW_RUNNING}", owner, until, ids
        )

    async def claim_expired_workflows(
        self, owner: str, until: float, now: float, limit: int = 100
    ) -> WorkflowSnapshot:
        """Under the sweepers' transaction-scoped advisory lock, as task claims."""

        async def claim(conn: _Conn) -> WorkflowSnapshot:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _SWEEPER_LOCK):
                return WorkflowSnapshot([], {})
            claimed = await conn.fetch(
                "UPDATE workflows SET owner = $1, lease_until = $2 WHERE id IN ("
                f"SELECT id FROM workflows WHERE state = {_WORKFLOW_RUNNING} "
                "AND COALESCE(lease_until, 0) < $3 "
                "ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT $4) RETURNING id",
                owner,
                until,
                now,
                limit,
                timeout=_COMMIT_TIMEOUT_S,
            )
            if not claimed:
                return WorkflowSnapshot([], {})
            return await self._workflow_snapshot(
                conn,
                sql.SELECT_WORKFLOWS.replace(" ORDER BY", " WHERE id = ANY(?) ORDER BY"),
                [r[0] for r in claimed],
            )

        return await self._in_transaction(claim, "a workflow claim")

    async def workflow_cancel_requests(self, owner: str) -> list[str]:
        rows = await self._fetch(
            f"SELECT id FROM workflows WHERE owner = ? AND state = {_WORKFLOW_RUNNING} "
            "AND cancel_requested IS NOT NULL",
            owner,
        )
        return [r[0] for r in rows]

    # -- the mesh ---------------------------------------------------------------

    async def list_nodes(self) -> list[NodeRecord]:
        return [NodeRecord(*tuple(r)) for r in await self._fetch(sql.SELECT_NODES)]

    async def renew_task_leases(
        self, owner: str, until: float, ids: Sequence[str] = ()
    ) -> list[str]:
        """Renews in one transaction, locking the rows in id order (as a commit
        does, so the two never deadlock), then reads which of `ids` are no
        longer `owner`'s: claimed by another orchestrator, or gone."""
        return await self._renew_leases(
            "tasks", "node", f"state IN {_UNFINISHED}", owner, until, ids
        )

    async def _renew_leases(
        self,
        table: str,
        holder: str,
        unfinished: str,
        owner: str,
        until: float,
        ids: Sequence[str],
    ) -> list[str]:
        # table, holder and unfinished are this module's constants, never input

        async def renew(conn: _Conn) -> list[str]:
            await conn.execute(
                f"UPDATE {table} SET lease_until = $1 WHERE id IN (SELECT id FROM {table} "
                f"WHERE {holder} = $2 AND {unfinished} ORDER BY id FOR UPDATE)",
                until,
                owner,
                timeout=_COMMIT_TIMEOUT_S,
            )
            if not ids:
                return []
            rows = await conn.fetch(
                f"SELECT u.id FROM unnest($1::text[]) AS u(id) LEFT JOIN {table} r "
                f"ON r.id = u.id WHERE r.id IS NULL OR r.{holder} IS DISTINCT FROM $2",
                list(ids),
                owner,
                timeout=_COMMIT_TIMEOUT_S,
            )
            return [r[0] for r in rows]

        return await self._in_transaction(renew, f"a lease renewal of {table}")

    async def _in_transaction(self, work: Callable[[_Conn], Awaitable[_T]], what: str) -> _T:
        if self._pool is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        pool = self._pool

        async def attempt() -> _T:
            async with pool.acquire() as conn, conn.transaction():
                return await work(conn)

        try:
            return await self._retried(attempt, what)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the state store (PostgreSQL) failed {what}: {exc}") from None

    async def claim_expired_tasks(
        self, owner: str, until: float, now: float, limit: int = 100
    ) -> Snapshot:
        """One sweeper at a time: the claim holds a transaction-scoped advisory lock,
        so a sweeper that dies mid-claim releases it with its transaction (a session
        lock on a kept connection outlived a kill -9 here and stopped every claim).
        The claimed tasks' attempts and inputs are read in the same transaction: a
        claim committed without them (a read that failed after it) left tasks
        leased to a live claimer that never ran them, renewed for ever."""
        if self._pool is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _SWEEPER_LOCK):
                    return Snapshot()
                rows = await conn.fetch(
                    self._q(
                        f"UPDATE tasks SET node = ?, lease_until = ? WHERE id IN ("
                        f"SELECT id FROM tasks WHERE state IN {_UNFINISHED} "
                        "AND COALESCE(lease_until, 0) < ? "
                        "ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT ?) "
                        f"RETURNING {', '.join(sql.TASK_COLUMNS)}"
                    ),
                    owner,
                    until,
                    now,
                    limit,
                    timeout=_COMMIT_TIMEOUT_S,
                )
                snap = Snapshot(tasks=sorted((sql.task_from_row(tuple(r)) for r in rows), key=_seq))
                await self._fill(conn, snap, inputs=True, outputs=False)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the state store (PostgreSQL) failed a claim: {exc}") from None
        return snap

    async def _fill(
        self,
        conn: asyncpg.pool.PoolConnectionProxy[Any],
        snap: Snapshot,
        *,
        inputs: bool,
        outputs: bool,
    ) -> None:
        """Adds the attempts of `snap`'s tasks, and their input or output blobs."""
        ids = [t.id for t in snap.tasks]
        if not ids:
            return
        for row in await conn.fetch(
            self._q(sql.SELECT_ATTEMPTS.replace(" ORDER BY", " WHERE task_id = ANY(?) ORDER BY")),
            ids,
            timeout=_COMMIT_TIMEOUT_S,
        ):
            attempt = sql.attempt_from_row(tuple(row))
            snap.attempts.setdefault(attempt.task_id, []).append(attempt)
        keys = [f"tasks/{i}/inputs" for i in ids if inputs]
        keys += [f"tasks/{i}/outputs" for i in ids if outputs]
        if not keys:
            return
        found = await conn.fetch(
            self._q(sql.SELECT_BLOBS + " WHERE key = ANY(?)"), keys, timeout=_COMMIT_TIMEOUT_S
        )
        for key, data, path in found:
            snap.blobs[key] = bytes(data) if path is None else self.files.read(path)

    async def _read_snapshot(
        self, statement: str, *args: object, inputs: bool = False, outputs: bool = True
    ) -> Snapshot:
        if self._pool is None:
            raise StoreUnavailable(f"the store {self.where} is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                rows = await conn.fetch(self._q(statement), *args, timeout=_COMMIT_TIMEOUT_S)
                snap = Snapshot(tasks=[sql.task_from_row(tuple(r)) for r in rows])
                await self._fill(conn, snap, inputs=inputs, outputs=outputs)
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"the state store (PostgreSQL) failed a read: {exc}") from None
        return snap

    async def read_tasks(self, ids: list[str], *, outputs: bool = True) -> Snapshot:
        return await self._read_snapshot(
            sql.SELECT_TASKS.replace(" ORDER BY", " WHERE id = ANY(?) ORDER BY"),
            list(ids),
            outputs=outputs,
        )

    async def find_request(self, tenant: str, request_id: str) -> Snapshot:
        return await self._read_snapshot(
            sql.SELECT_TASKS.replace(" ORDER BY", " WHERE tenant = ? AND request_id = ? ORDER BY"),
            tenant,
            request_id,
        )

    async def list_task_records(
        self,
        tenant: str,
        *,
        state: int | None,
        limit: int,
        below: tuple[float, str] | None,
        outputs: bool = False,
    ) -> Snapshot:
        statement, args = _newest_first("tasks", sql.TASK_COLUMNS, tenant, state, below)
        return await self._read_snapshot(statement, *args, limit, outputs=outputs)

    async def release_task_leases(self, owner: str, ids: list[str]) -> None:
        async def release(conn: _Conn) -> None:
            await conn.execute(
                "UPDATE tasks SET lease_until = 0 WHERE id IN (SELECT id FROM tasks "
                "WHERE node = $1 AND id = ANY($2::text[]) ORDER BY id FOR UPDATE)",
                owner,
                list(ids),
                timeout=_COMMIT_TIMEOUT_S,
            )

        await self._in_transaction(release, "a lease release")

    async def cancel_requests(self, owner: str) -> list[str]:
        rows = await self._fetch(
            f"SELECT id FROM tasks WHERE node = ? AND state IN {_UNFINISHED} "
            "AND cancel_requested IS NOT NULL",
            owner,
        )
        return [r[0] for r in rows]

    async def try_sweeper_lock(self) -> bool:
        """Whether to sweep: the one-at-a-time rule is the transaction-scoped lock
        that `claim_expired_tasks` takes."""
        return self._pool is not None

    async def reserve_budget(
        self, tenant: str, tokens: int, budget: int, owner: str, expires: float, now: float
    ) -> BudgetAnswer:
        """One transaction; the tenant's llm_budget_spent row, locked FOR UPDATE,
        serializes reservations of that tenant across every orchestrator."""
        hold = secrets.randbits(62) + 1

        async def reserve(conn: _Conn) -> BudgetAnswer:
            await conn.execute(self._q(sql.BUDGET_ROW), tenant)
            await conn.execute(
                "SELECT 1 FROM llm_budget_spent WHERE tenant = $1 FOR UPDATE", tenant
            )
            expired = int(await conn.fetchval(self._q(sql.BUDGET_EXPIRED), tenant, now))
            if expired:
                await conn.execute(self._q(sql.BUDGET_CHARGE), expired, tenant)
                await conn.execute(self._q(sql.BUDGET_DROP_EXPIRED), tenant, now)
            granted = await conn.fetchval(
                _PG_BUDGET_RESERVE,
                hold,
                tenant,
                tokens,
                owner,
                expires,
                tenant,
                tenant,
                tokens,
                budget,
            )
            row = await conn.fetchrow(self._q(sql.BUDGET_STATE), tenant, tenant)
            assert row is not None  # one row: two scalar subqueries
            return BudgetAnswer(hold if granted else None, int(row[0]), int(row[1]))

        return await self._in_transaction(reserve, "a budget reservation")

    async def budget_usage(
        self,
    ) -> tuple[dict[str, int], list[tuple[str, str, str, int, int, int, float]]]:
        spent = await self._fetch(sql.SELECT_BUDGET_SPENT)
        usage = await self._fetch(sql.SELECT_USAGE)
        return {r[0]: int(r[1]) for r in spent}, [
            (r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), float(r[6])) for r in usage
        ]

    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None:
        rows = await self._fetch(sql.SELECT_API_KEYS + " WHERE digest = ?", bytes(digest))
        return sql.api_key_from_row(tuple(rows[0])) if rows else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._fetch(sql.SELECT_API_KEYS + " WHERE key_id = ?", key_id)
        return sql.api_key_from_row(tuple(rows[0])) if rows else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        if tenant is None:
            rows = await self._fetch(sql.SELECT_API_KEYS + " ORDER BY created_at, key_id")
        else:
            rows = await self._fetch(
                sql.SELECT_API_KEYS + " WHERE tenant = ? ORDER BY created_at, key_id", tenant
            )
        return [sql.api_key_from_row(tuple(r)) for r in rows]


def _seq(record: TaskRecord) -> int:
    return record.seq


def _task_ids(ops: Iterable[Op]) -> set[str]:
    """The existing task rows a batch writes (inserts of new tasks lock nothing
    another transaction waits on)."""
    ids: set[str] = set()
    for op in ops:
        if isinstance(op, UpdateTask | DeleteTask):
            ids.add(op.id)
        elif isinstance(op, Fenced):
            ids.add(op.task_id)
        elif isinstance(op, PutAttempt):
            ids.add(op.record.task_id)
    return ids


def _fence(ops: list[Op], rows: dict[str, tuple[str | None, int]]) -> tuple[list[Op], list[str]]:
    """`ops` with each Fenced group replaced by its writes if the task's row (as
    locked, then as the batch's earlier writes change it) is its node's at its
    attempt, or dropped; and the ids of the tasks whose groups were dropped."""
    kept: list[Op] = []
    refused: list[str] = []
    for op in ops:
        if not isinstance(op, Fenced):
            kept.append(op)
            _track(op, rows)
            continue
        row = rows.get(op.task_id)
        if row is None or row[0] != op.node or (op.attempt is not None and row[1] != op.attempt):
            if op.task_id not in refused:
                refused.append(op.task_id)
            continue
        for inner in op.ops:
            kept.append(inner)
            _track(inner, rows)
    return kept, refused


def _track(op: Op, rows: dict[str, tuple[str | None, int]]) -> None:
    if isinstance(op, PutTask):
        rows[op.record.id] = (op.record.node, op.record.attempt)
    elif isinstance(op, UpdateTask) and op.id in rows and "attempt" in op.fields:
        node, _ = rows[op.id]
        rows[op.id] = (node, int(op.fields["attempt"]))  # type: ignore[call-overload]
    elif isinstance(op, DeleteTask):
        rows.pop(op.id, None)


def _notices(ops: Iterable[Op]) -> list[str]:
    """The notifications a batch sends: which tasks changed state, which were
    asked to cancel, and whether a node record was written."""
    changed: list[str] = []
    cancels: list[str] = []
    nodes = False
    for op in ops:
        if isinstance(op, PutTask):
            changed.append(op.record.id)
        elif isinstance(op, UpdateTask):
            if "state" in op.fields:
                changed.append(op.id)
            if "cancel_requested" in op.fields:
                cancels.append(op.id)
        elif isinstance(op, PutNode):
            nodes = True
    out = [
        f"{kind}:{','.join(ids[i : i + _IDS_PER_NOTICE])}"
        for kind, ids in (("t", changed), ("c", cancels))
        for i in range(0, len(ids), _IDS_PER_NOTICE)
    ]
    if nodes:
        out.append("n:")
    return out


def _request_id_taken(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.UniqueViolationError) and getattr(
        exc, "constraint_name", None
    ) in ("tasks_request_id", "workflows_request_id")
