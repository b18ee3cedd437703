"""The embedded store: one SQLite database in WAL mode under the state
directory, written by one thread in batches (group commit), blobs over
256 KiB as files beside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any

from kernelmesh.core.api_keys import ApiKeyRecord
from kernelmesh.core.store import migrations, private_paths, sql
from kernelmesh.core.store.base import (
    BudgetAnswer,
    NodeRecord,
    Op,
    SchemaTooNew,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    TensorLocationRecord,
)
from kernelmesh.core.store.workflow_records import WorkflowSnapshot

log = logging.getLogger(__name__)

DB_NAME = "state.sqlite"
_RETRY_PAUSE_S = 0.2

_Entry = tuple[tuple[Op, ...], "asyncio.Future[None] | None"]


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, directory: str | Path, *, synchronous: str = "FULL") -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.files = sql.BlobFiles(self.directory / "blobs")
        # FULL: a commit survives power loss, not only a killed process.
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # Budget reservations commit at once, apart from the batched writer.
        self._budget_db: sqlite3.Connection | None = None
        self._budget_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._closing = False
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None
        # Transactions committed and queue entries they carried (group commit's effect).
        self.commits = 0
        self.committed_entries = 0

    @property
    def where(self) -> str:
        return str(self.path)

    # -- opening ------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def _open(self) -> None:
        try:
            private_paths.state_dir(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot create the state dir {self.directory}: {exc}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise StoreError(f"the state dir {self.directory} is not writable")
        try:
            # Every tenant's data: 0600 before SQLite writes a byte (its -wal and
            # -shm files take the database's mode), blobs/ 0700.
            private_paths.own_file(self.path)
            for left in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm"), self.files.directory):
                if left is not None:  # left readable by an earlier version
                    private_paths.tighten(
                        left, private_paths.DIR_MODE if left.is_dir() else private_paths.FILE_MODE
                    )
        except OSError as exc:
            raise StoreError(f"cannot make {self.path} private to this user: {exc}") from None
        try:
            self._db = self._connect()
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode})")
            self._migrate(self._db)
            self._reader = self._connect()
            self._budget_db = self._connect()
            # Before the writer starts: no file of this process is mid-commit.
            named = self._db.execute("SELECT path FROM blobs WHERE path IS NOT NULL").fetchall()
            self.files.sweep({path for (path,) in named})
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path} cannot be used as the kernelmesh state database "
                f"(corrupt, or not a database?): {exc}"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            if found > migrations.LATEST:
                raise SchemaTooNew(migrations.too_new_message(found, str(self.path)))
            for migration in migrations.MIGRATIONS:
                if migration.version > found:
                    for statement in migrations.render(migration, "sqlite"):
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version VALUES (?)", (migration.version,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writing --------------------------------------------------------------

    def write(self, *ops: Op, wait: bool = False) -> asyncio.Future[None] | None:
        future = asyncio.get_running_loop().create_future() if wait else None
        with self._cond:
            if self._closing or self._writer is None:
                raise StoreUnavailable(f"the store {self.path} is closed")
            self._queue.append((ops, future))
            self._cond.notify()
        return future

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            if not self._commit(batch) and not self._closing:
                with self._cond:
                    self._cond.wait(_RETRY_PAUSE_S)

    def _commit(self, batch: list[_Entry]) -> bool:
        assert self._db is not None
        db = self._db
        try:
            statements, unlink = sql.plan((op for ops, _ in batch for op in ops), self.files)
        except (sqlite3.Error, OSError) as exc:
            return self._failed(batch, exc)
        except Exception as exc:  # an operation no statement expresses: a bug, not a fault
            # Uncaught, it ended the writer thread and every waiter hung for ever.
            return self._refused(batch, exc)
        try:
            db.execute("BEGIN IMMEDIATE")
            for statement, rows in sql.grouped(statements):
                db.executemany(statement, rows)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            return self._failed(batch, exc)
        self.last_error = None
        self.commits += 1
        self.committed_entries += len(batch)
        self.files.remove(unlink)
        self._settle([f for _, f in batch if f is not None], None)
        return True

    def _failed(self, batch: list[_Entry], exc: sqlite3.Error | OSError) -> bool:
        db = self._db
        if db is not None and db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        self.last_error = f"{type(exc).__name__}: {exc}"
        transient = isinstance(exc, sqlite3.OperationalError | OSError)
        log.error(
            "store %s: a commit of %d entries failed (%s)%s",
            self.path,
            len(batch),
            self.last_error,
            "; unacknowledged updates are kept for the next try" if transient else "",
        )
        error = StoreUnavailable(f"the state store {self.path} refused a write: {exc}")
        self._settle([f for _, f in batch if f is not None], error)
        if transient and not self._closing:  # closing: give up rather than hang
            kept = [(ops, None) for ops, f in batch if f is None and ops]
            with self._cond:
                self._queue[:0] = kept
        return False

    def _refused(self, batch: list[_Entry], exc: Exception) -> bool:
        """Drops the entry that cannot be written, its waiter told why; the others
        it was grouped with are committed one by one."""
        if len(batch) > 1:
            for entry in batch:
                self._commit([entry])
            return True
        log.error("store %s: dropped an update it cannot write: %r", self.path, exc)
        self._settle([f for _, f in batch if f is not None], exc)
        return True

    def _settle(self, futures: list[asyncio.Future[None]], error: Exception | None) -> None:
        if futures and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(_settle, futures, error)

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        for db in (self._db, self._reader, self._budget_db):
            if db is not None:
                db.close()
        self._db = self._reader = self._budget_db = None

    async def ping(self) -> str | None:
        # An empty transaction writes nothing, so it passes on a file that can no
        # longer be written; the next real commit would not.
        for path in (self.directory, self.path):
            if not os.access(path, os.W_OK):
                return f"{path} is missing or not writable"
        return None

    # -- reading --------------------------------------------------------------

    def _read(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._reader is None:
            raise StoreUnavailable(f"the store {self.path} is closed")
        with self._read_lock:
            try:
                return self._reader.execute(statement, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(
                    f"the state store {self.path} failed a read: {exc}"
                ) from None

    async def list_nodes(self) -> list[NodeRecord]:
        rows = await asyncio.to_thread(self._read, sql.SELECT_NODES)
        return [NodeRecord(*row) for row in rows]

    async def tensor_locations(self, name: str | None = None) -> list[TensorLocationRecord]:
        if name is None:
            rows = await asyncio.to_thread(self._read, sql.SELECT_TENSOR_LOCATIONS)
        else:
            rows = await asyncio.to_thread(
                self._read, sql.SELECT_TENSOR_LOCATIONS + " WHERE name = ?", (name,)
            )
        return [sql.tensor_location_from_row(r) for r in rows]

    async def load(self) -> Snapshot:
        return await asyncio.to_thread(self._load)

    def _load(self) -> Snapshot:
        snap = Snapshot()
        snap.tasks = [sql.task_from_row(r) for r in self._read(sql.SELECT_TASKS)]
        for row in self._read(sql.SELECT_ATTEMPTS):
            attempt = sql.attempt_from_row(row)
            snap.attempts.setdefault(attempt.task_id, []).append(attempt)
        snap.tensors = [sql.tensor_from_row(r) for r in self._read(sql.SELECT_TENSORS)]
        for key, data, path in self._read(sql.SELECT_BLOBS):
            snap.blobs[key] = bytes(data) if path is None else self.files.read(path)
        return snap

    async def load_workflows(self) -> WorkflowSnapshot:
        return await asyncio.to_thread(self._load_workflows)

    def _load_workflows(self) -> WorkflowSnapshot:
        snap = WorkflowSnapshot(
            [sql.workflow_from_row(r) for r in self._read(sql.SELECT_WORKFLOWS)], {}
        )
        for row in self._read(sql.SELECT_WORKFLOW_STEPS):
            step = sql.workflow_step_from_row(row)
            snap.steps.setdefault(step.workflow_id, []).append(step)
        return snap

    async def reserve_budget(
        self, tenant: str, tokens: int, budget: int, owner: str, expires: float, now: float
    ) -> BudgetAnswer:
        return await asyncio.to_thread(
            self._reserve_budget, tenant, tokens, budget, owner, expires, now
        )

    def _reserve_budget(
        self, tenant: str, tokens: int, budget: int, owner: str, expires: float, now: float
    ) -> BudgetAnswer:
        db = self._budget_db
        if db is None:
            raise StoreUnavailable(f"the store {self.path} is closed")
        with self._budget_lock:
            try:
                # BEGIN IMMEDIATE: one reservation at a time across processes.
                db.execute("BEGIN IMMEDIATE")
                db.execute(sql.BUDGET_ROW, (tenant,))
                (expired,) = db.execute(sql.BUDGET_EXPIRED, (tenant, now)).fetchone()
                if expired:
                    db.execute(sql.BUDGET_CHARGE, (expired, tenant))
                    db.execute(sql.BUDGET_DROP_EXPIRED, (tenant, now))
                hold = secrets.randbits(62) + 1
                granted = db.execute(
                    sql.BUDGET_RESERVE,
                    (hold, tenant, tokens, owner, expires, tenant, tenant, tokens, budget),
                ).rowcount
                spent, reserved = db.execute(sql.BUDGET_STATE, (tenant, tenant)).fetchone()
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise StoreUnavailable(
                    f"the state store {self.path} cannot record a budget reservation: {exc}"
                ) from None
        return BudgetAnswer(hold if granted == 1 else None, int(spent), int(reserved))

    async def budget_usage(
        self,
    ) -> tuple[dict[str, int], list[tuple[str, str, str, int, int, int, float]]]:
        spent = await asyncio.to_thread(self._read, sql.SELECT_BUDGET_SPENT)
        usage = await asyncio.to_thread(self._read, sql.SELECT_USAGE)
        return {t: int(n) for t, n in spent}, [tuple(r) for r in usage]

    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None:
        rows = await asyncio.to_thread(
            self._read, sql.SELECT_API_KEYS + " WHERE digest = ?", (bytes(digest),)
        )
        return sql.api_key_from_row(rows[0]) if rows else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await asyncio.to_thread(
            self._read, sql.SELECT_API_KEYS + " WHERE key_id = ?", (key_id,)
        )
        return sql.api_key_from_row(rows[0]) if rows else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        if tenant is None:
            rows = await asyncio.to_thread(
                self._read, sql.SELECT_API_KEYS + " ORDER BY created_at, key_id"
            )
        else:
            rows = await asyncio.to_thread(
                self._read,
                sql.SELECT_API_KEYS + " WHERE tenant = ? ORDER BY created_at, key_id",
                (tenant,),
            )
        return [sql.api_key_from_row(r) for r in rows]


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
