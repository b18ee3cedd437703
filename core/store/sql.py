"""What SQLite and PostgreSQL share: each write operation as SQL statements
(`?` placeholders), big blobs as files beside the database, and rows back
into records."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kernelmesh.core.api_keys import ApiKeyRecord, Role
from kernelmesh.core.store.base import (
    TASK_UPDATABLE,
    TENSOR_LOCATION_OPS,
    AttemptRecord,
    ChargeBudget,
    DeleteBlob,
    DeleteTask,
    DeleteTensor,
    DeleteTensorLocation,
    Fenced,
    Op,
    PutApiKey,
    PutAttempt,
    PutBlob,
    PutNode,
    PutTask,
    PutTensor,
    PutTensorLocation,
    PutUsage,
    RenewNode,
    RevokeApiKey,
    SettleBudget,
    TaskRecord,
    TensorLocationRecord,
    TensorRecord,
    TensorsLost,
    UpdateTask,
    inputs_key,
    outputs_key,
    tensor_key,
)
from kernelmesh.core.store.workflow_records import (
    WORKFLOW_OPS,
    WORKFLOW_UPDATABLE,
    DeleteWorkflow,
    PutWorkflow,
    PutWorkflowStep,
    UpdateWorkflow,
    WorkflowRecord,
    WorkflowStepRecord,
)

# A row of SQL parameters, or of a query's result.
Row = tuple[Any, ...]

# Blobs up to this size live in the database; bigger ones are files in the
# blob directory (written and fsynced before the transaction that names them).
INLINE_BLOB_BYTES = 256 << 10

TASK_COLUMNS = tuple(f.name for f in dataclasses.fields(TaskRecord))
ATTEMPT_COLUMNS = tuple(f.name for f in dataclasses.fields(AttemptRecord))
TENSOR_COLUMNS = tuple(f.name for f in dataclasses.fields(TensorRecord))
API_KEY_COLUMNS = tuple(f.name for f in dataclasses.fields(ApiKeyRecord))
WORKFLOW_COLUMNS = tuple(f.name for f in dataclasses.fields(WorkflowRecord))
WORKFLOW_STEP_COLUMNS = tuple(f.name for f in dataclasses.fields(WorkflowStepRecord))


def _upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


PUT_TASK = _upsert("tasks", TASK_COLUMNS, ("id",))
PUT_ATTEMPT = _upsert("task_attempts", ATTEMPT_COLUMNS, ("task_id", "number"))
PUT_TENSOR = _upsert("tensors", TENSOR_COLUMNS, ("name",))
PUT_API_KEY = _upsert("api_keys", API_KEY_COLUMNS, ("key_id",))
PUT_BLOB = _upsert("blobs", ("key", "size", "data", "path"), ("key",))
DELETE_BLOB = "DELETE FROM blobs WHERE key = ?"
PUT_WORKFLOW = _upsert("workflows", WORKFLOW_COLUMNS, ("id",))
PUT_WORKFLOW_STEP = _upsert("workflow_steps", WORKFLOW_STEP_COLUMNS, ("workflow_id", "step_id"))
NODE_COLUMNS = ("name", "orchestrator", "address", "registration", "lease_until")
PUT_NODE = _upsert("nodes", NODE_COLUMNS, ("name",))
# Only the orchestrator the node heartbeats to renews it (a stale one cannot).
RENEW_NODE = "UPDATE nodes SET lease_until = ? WHERE name = ? AND orchestrator = ?"
SELECT_NODES = f"SELECT {', '.join(NODE_COLUMNS)} FROM nodes ORDER BY name"
REVOKE_API_KEY = (
    "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND (revoked_at IS NULL OR revoked_at > ?)"
)

PUT_USAGE = "INSERT INTO llm_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# Only while the reservation is there: one charged in full (expired) is spent already.
SETTLE_BUDGET = (
    "UPDATE llm_budget_spent SET tokens = tokens + ? WHERE tenant = ? "
    "AND EXISTS (SELECT 1 FROM llm_reservations WHERE id = ?)"
)
CHARGE_BUDGET = (
    "INSERT INTO llm_budget_spent (tenant, tokens) VALUES (?, ?) ON CONFLICT (tenant) "
    "DO UPDATE SET tokens = llm_budget_spent.tokens + excluded.tokens"
)
SELECT_USAGE = (
    "SELECT tenant, model, provider, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
    "SUM(cost) FROM llm_usage GROUP BY tenant, model, provider"
)
SELECT_BUDGET_SPENT = "SELECT tenant, tokens FROM llm_budget_spent"
# A reservation, in the transaction that holds the tenant's budget row: the
# budget's own row first (the lock), expired reservations charged, then the
# conditional insert. `?` placeholders; PostgreSQL's version casts them.
BUDGET_ROW = (
    "INSERT INTO llm_budget_spent (tenant, tokens) VALUES (?, 0) ON CONFLICT (tenant) DO NOTHING"
)
BUDGET_EXPIRED = (
    "SELECT COALESCE(SUM(tokens), 0) FROM llm_reservations WHERE tenant = ? AND expires < ?"
)
BUDGET_CHARGE = "UPDATE llm_budget_spent SET tokens = tokens + ? WHERE tenant = ?"
BUDGET_DROP_EXPIRED = "DELETE FROM llm_reservations WHERE tenant = ? AND expires < ?"
BUDGET_RESERVE = (
    "INSERT INTO llm_reservations (id, tenant, tokens, owner, expires) "
    "SELECT ?, ?, ?, ?, ? WHERE (SELECT tokens FROM llm_budget_spent WHERE tenant = ?) "
    "+ (SELECT COALESCE(SUM(tokens), 0) FROM llm_reservations WHERE tenant = ?) + ? <= ?"
)
BUDGET_STATE = (
    "SELECT (SELECT tokens FROM llm_budget_spent WHERE tenant = ?), "
    "(SELECT COALESCE(SUM(tokens), 0) FROM llm_reservations WHERE tenant = ?)"
)
TENSOR_LOCATION_COLUMNS = tuple(f.name for f in dataclasses.fields(TensorLocationRecord))
PUT_TENSOR_LOCATION = _upsert("tensor_locations", TENSOR_LOCATION_COLUMNS, ("name",))
SELECT_TENSOR_LOCATIONS = f"SELECT {', '.join(TENSOR_LOCATION_COLUMNS)} FROM tensor_locations"

SELECT_TASKS = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks ORDER BY seq"
SELECT_ATTEMPTS = f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM task_attempts ORDER BY task_id, number"
SELECT_TENSORS = f"SELECT {', '.join(TENSOR_COLUMNS)} FROM tensors"
SELECT_BLOBS = "SELECT key, data, path FROM blobs"
SELECT_API_KEYS = f"SELECT {', '.join(API_KEY_COLUMNS)} FROM api_keys"
SELECT_WORKFLOWS = f"SELECT {', '.join(WORKFLOW_COLUMNS)} FROM workflows ORDER BY seq"
SELECT_WORKFLOW_STEPS = (
    f"SELECT {', '.join(WORKFLOW_STEP_COLUMNS)} FROM workflow_steps ORDER BY workflow_id"
)


class BlobFiles:
    """Big blobs as files: `<dir>/<key with / as __>`. A file is written to a
    temporary name, fsynced and renamed before its row commits, so a row never
    names a half-written file; a file without a row is garbage, removed later."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key.replace("/", "__")

    def write(self, key: str, data: bytes) -> str:
        assert self.directory is not None
        # 0700: every tenant's tensors (core/store/private_paths.py)
        self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.mkdir(exist_ok=True, mode=0o700)
        final = self.path(key)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final.name

    def read(self, name: str) -> bytes:
        assert self.directory is not None
        return (self.directory / name).read_bytes()

    def sweep(self, named: set[str]) -> int:
        """Removes files no row names (written before a crash, never committed).
        Only for a blob dir this process alone writes."""
        if self.directory is None or not self.directory.exists():
            return 0
        removed = 0
        for path in self.directory.iterdir():
            if path.name not in named:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed += 1
        return removed

    def remove(self, keys: Iterable[str]) -> None:
        if self.directory is None:
            return
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.path(key).unlink()


def plan(ops: Iterable[Op], files: BlobFiles) -> tuple[list[tuple[str, Row]], list[str]]:
    """The statements for `ops`, in order, and the blob keys whose files to remove
    once they commit."""
    statements: list[tuple[str, Row]] = []
    unlink: list[str] = []
    for op in ops:
        statements.extend(_statements(op, files, unlink))
    return statements, unlink


def _statements(op: Op, files: BlobFiles, unlink: list[str]) -> Iterator[tuple[str, Row]]:
    if isinstance(op, Fenced):
        # Checked by a store several processes share before planning (PostgreSQL);
        # one process alone on its store (SQLite) is always the holder.
        for inner in op.ops:
            yield from _statements(inner, files, unlink)
    elif isinstance(op, PutUsage):
        yield PUT_USAGE, dataclasses.astuple(op)
    elif isinstance(op, SettleBudget):
        yield SETTLE_BUDGET, (op.used, op.tenant, op.hold_id)
        yield "DELETE FROM llm_reservations WHERE id = ?", (op.hold_id,)
    elif isinstance(op, ChargeBudget):
        yield CHARGE_BUDGET, (op.tenant, op.tokens)
    elif isinstance(op, PutTask):
        yield PUT_TASK, dataclasses.astuple(op.record)
    elif isinstance(op, UpdateTask):
        yield _update("tasks", TASK_UPDATABLE, op.id, op.fields)
    elif isinstance(op, PutAttempt):
        yield PUT_ATTEMPT, dataclasses.astuple(op.record)
    elif isinstance(op, PutBlob):
        yield _put_blob(op.key, op.data, files)
    elif isinstance(op, DeleteBlob):
        unlink.append(op.key)
        yield DELETE_BLOB, (op.key,)
    elif isinstance(op, DeleteTask):
        for key in (inputs_key(op.id), outputs_key(op.id)):
            unlink.append(key)
            yield DELETE_BLOB, (key,)
        yield "DELETE FROM task_attempts WHERE task_id = ?", (op.id,)
        yield "DELETE FROM tasks WHERE id = ?", (op.id,)
    elif isinstance(op, PutTensor):
        yield _put_blob(tensor_key(op.record.name), op.data, files)
        yield PUT_TENSOR, dataclasses.astuple(op.record)
    elif isinstance(op, DeleteTensor):
        unlink.append(tensor_key(op.name))
        yield DELETE_BLOB, (tensor_key(op.name),)
        yield "DELETE FROM tensors WHERE name = ?", (op.name,)
    elif isinstance(op, PutApiKey):
        r = op.record
        yield (
            PUT_API_KEY,
            (
                r.key_id,
                bytes(r.digest),
                r.tenant,
                str(r.role),
                r.label,
                float(r.created_at),
                r.expires_at,
                r.revoked_at,
            ),
        )
    elif isinstance(op, RevokeApiKey):
        yield REVOKE_API_KEY, (float(op.at), op.key_id, float(op.at))
    elif isinstance(op, WORKFLOW_OPS):
        yield from _workflow_statements(op)
    elif isinstance(op, PutNode):
        yield PUT_NODE, dataclasses.astuple(op.record)
    elif isinstance(op, RenewNode):
        yield RENEW_NODE, (op.lease_until, op.name, op.orchestrator)
    elif isinstance(op, TENSOR_LOCATION_OPS):
        yield _tensor_location_statement(op)
    else:  # pragma: no cover - a new Op without SQL is a programming error
        raise TypeError(f"unknown store operation {op!r}")


def _workflow_statements(op: object) -> Iterator[tuple[str, Row]]:
    if isinstance(op, PutWorkflow):
        yield PUT_WORKFLOW, dataclasses.astuple(op.record)
    elif isinstance(op, UpdateWorkflow):
        yield _update("workflows", WORKFLOW_UPDATABLE, op.id, op.fields)
    elif isinstance(op, PutWorkflowStep):
        yield PUT_WORKFLOW_STEP, dataclasses.astuple(op.record)
    elif isinstance(op, DeleteWorkflow):
        yield "DELETE FROM workflow_steps WHERE workflow_id = ?", (op.id,)
        yield "DELETE FROM workflows WHERE id = ?", (op.id,)


def _tensor_location_statement(op: object) -> tuple[str, Row]:
    if isinstance(op, PutTensorLocation):
        return PUT_TENSOR_LOCATION, dataclasses.astuple(op.record)
    if isinstance(op, DeleteTensorLocation):
        return "DELETE FROM tensor_locations WHERE name = ?", (op.name,)
    assert isinstance(op, TensorsLost)
    return (
        "UPDATE tensor_locations SET lost = ? WHERE node = ? AND lost = ''",
        (op.why, op.node),
    )


def tensor_location_from_row(row: Row) -> TensorLocationRecord:
    return TensorLocationRecord(*row)


def _update(
    table: str, updatable: frozenset[str], key: str, fields: dict[str, object]
) -> tuple[str, Row]:
    """UPDATE of the named columns of one row, refusing any not in `updatable`."""
    names = sorted(fields)
    unknown = set(names) - updatable
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    sets = ", ".join(f"{n} = ?" for n in names)
    return f"UPDATE {table} SET {sets} WHERE id = ?", (*(fields[n] for n in names), key)


def _put_blob(key: str, data: bytes, files: BlobFiles) -> tuple[str, Row]:
    if len(data) > INLINE_BLOB_BYTES and files.directory is not None:
        return PUT_BLOB, (key, len(data), None, files.write(key, data))
    return PUT_BLOB, (key, len(data), bytes(data), None)


def grouped(statements: list[tuple[str, Row]]) -> Iterator[tuple[str, list[Row]]]:
    """Runs of the same statement, so each run is one executemany."""
    current: str | None = None
    rows: list[Row] = []
    for sql, params in statements:
        if sql != current and rows:
            yield current, rows  # type: ignore[misc]
            rows = []
        current = sql
        rows.append(params)
    if rows:
        yield current, rows  # type: ignore[misc]


def task_from_row(row: Row) -> TaskRecord:
    return TaskRecord(*row)


def attempt_from_row(row: Row) -> AttemptRecord:
    return AttemptRecord(*row)


def tensor_from_row(row: Row) -> TensorRecord:
    return TensorRecord(*row)


def api_key_from_row(row: Row) -> ApiKeyRecord:
    key_id, digest, tenant, role, label, created, expires, revoked = row
    return ApiKeyRecord(
        key_id=key_id,
        digest=bytes(digest),
        tenant=tenant,
        role=Role(role),
        label=label,
        created_at=created,
        expires_at=expires,
        revoked_at=revoked,
    )


def workflow_from_row(row: Row) -> WorkflowRecord:
    return WorkflowRecord(*row)


def workflow_step_from_row(row: Row) -> WorkflowStepRecord:
    return WorkflowStepRecord(*row)
