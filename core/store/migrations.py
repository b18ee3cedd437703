"""The schema as numbered migrations, one dialect-neutral text each.

A migration is applied once, in order, inside one transaction, and the
schema version is recorded with it. Never edit a released migration: add the
next number. `{blob}`, `{real}` and `{bigint}` are filled per dialect."""

from __future__ import annotations

from dataclasses import dataclass

# The tasks table is shaped for claims by several orchestrators (the mesh):
# `attempt` is the fencing token, `lease_until` the claim's expiry, and the
# (state, not_before, priority, seq) index serves
# `... WHERE state = QUEUED ... FOR UPDATE SKIP LOCKED`.
_V1 = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    seq {bigint} NOT NULL,
    tenant TEXT NOT NULL,
    request_id TEXT,
    fingerprint TEXT,
    op TEXT NOT NULL,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    spec TEXT NOT NULL,
    labels TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    device TEXT NOT NULL,
    node TEXT,
    lease_until {real},
    not_before {real},
    create_time {real} NOT NULL,
    start_time {real},
    end_time {real},
    run_seconds {real},
    error_code INTEGER,
    error_message TEXT,
    output_refs TEXT NOT NULL,
    output_bytes {bigint} NOT NULL,
    trace_context TEXT NOT NULL
);
CREATE UNIQUE INDEX tasks_request_id ON tasks (tenant, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX tasks_claim ON tasks (state, not_before, priority, seq);
CREATE INDEX tasks_tenant_seq ON tasks (tenant, seq);

CREATE TABLE task_attempts (
    task_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    state INTEGER NOT NULL,
    device TEXT NOT NULL,
    start_time {real},
    end_time {real},
    error_code INTEGER,
    error_message TEXT,
    PRIMARY KEY (task_id, number)
);

CREATE TABLE blobs (
    key TEXT PRIMARY KEY,
    size {bigint} NOT NULL,
    data {blob},
    path TEXT
);

CREATE TABLE tensors (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    nbytes {bigint} NOT NULL,
    create_time {real} NOT NULL
);

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    digest {blob} NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    role TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at {real} NOT NULL,
    expires_at {real},
    revoked_at {real}
);
"""


# Workflows (issue 10): the spec as JSON, and one row per step so a restart
# resumes from the finished steps.
_V2_WORKFLOWS = """
CREATE TABLE workflows (
    id TEXT PRIMARY KEY,
    seq {bigint} NOT NULL,
    tenant TEXT NOT NULL,
    state INTEGER NOT NULL,
    spec TEXT NOT NULL,
    request_id TEXT,
    fingerprint TEXT,
    create_time {real} NOT NULL,
    end_time {real},
    error_code INTEGER,
    error_message TEXT
);
CREATE UNIQUE INDEX workflows_request_id ON workflows (tenant, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX workflows_tenant_seq ON workflows (tenant, seq);

CREATE TABLE workflow_steps (
    workflow_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    task TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    start_time {real},
    end_time {real},
    error_code INTEGER,
    error_message TEXT,
    outputs TEXT NOT NULL,
    text TEXT,
    PRIMARY KEY (workflow_id, step_id)
);
"""

# The mesh: nodes as their orchestrator registered them (the request, opaque
# here), so every orchestrator sharing the store can place on every node; the
# lease is renewed by the orchestrator the node heartbeats to.
_V3_NODES = """
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    orchestrator TEXT NOT NULL,
    address TEXT NOT NULL,
    registration TEXT NOT NULL,
    lease_until {real} NOT NULL
);
"""


# Several orchestrators on one store: a cancel asked of one that does not hold
# the task is recorded here, and the holder acts on it.
_V4_CANCEL_REQUESTS = """
ALTER TABLE tasks ADD COLUMN cancel_requested {real};
CREATE INDEX tasks_holder ON tasks (node, state);
"""


# LLM usage and token budgets in the configured store (shared by every process on
# it): usage rows; each tenant's spent tokens (its row is the lock a reservation
# takes); reservations in flight, with their process and an expiry past which a
# reservation nobody settled is charged in full (its process died mid-call).
_V5_LLM_BUDGETS = """
CREATE TABLE llm_usage (
    ts {real} NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    deployment TEXT NOT NULL,
    prompt_tokens {bigint} NOT NULL,
    completion_tokens {bigint} NOT NULL,
    cost {real} NOT NULL
);
CREATE INDEX llm_usage_tenant ON llm_usage (tenant);
CREATE TABLE llm_budget_spent (
    tenant TEXT PRIMARY KEY,
    tokens {bigint} NOT NULL
);
CREATE TABLE llm_reservations (
    id {bigint} PRIMARY KEY,
    tenant TEXT NOT NULL,
    tokens {bigint} NOT NULL,
    owner TEXT NOT NULL,
    expires {real} NOT NULL
);
CREATE INDEX llm_reservations_tenant ON llm_reservations (tenant, expires);
"""

# The mesh's named tensors held on nodes (core/mesh/tensors.py): where each
# one is, so a restarted orchestrator, or another one sharing the store,
# still finds it. `lost` is why its node went ("" while the node holds it).
# (Migration 5 is the LLM budgets'.)
_V6_TENSOR_LOCATIONS = """
CREATE TABLE tensor_locations (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    nbytes {bigint} NOT NULL,
    lost TEXT NOT NULL
);
CREATE INDEX tensor_locations_node ON tensor_locations (node);
"""


# Workflows held by one of several orchestrators on one store, as tasks are:
# the holder and its lease (renewed; an expired one is claimed by another
# orchestrator, which resumes the workflow), and a cancel asked of another one.
_V7_WORKFLOW_LEASES = """
ALTER TABLE workflows ADD COLUMN owner TEXT;
ALTER TABLE workflows ADD COLUMN lease_until {real};
ALTER TABLE workflows ADD COLUMN cancel_requested {real};
CREATE INDEX workflows_holder ON workflows (owner, state);
CREATE INDEX workflows_tenant_time ON workflows (tenant, create_time, id);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tasks, attempts, blobs, named tensors, API keys", _V1),
    Migration(2, "workflows and their steps", _V2_WORKFLOWS),
    Migration(3, "nodes of the mesh", _V3_NODES),
    Migration(4, "cancel requests of tasks held by another orchestrator", _V4_CANCEL_REQUESTS),
    Migration(5, "LLM usage, token budgets and their reservations", _V5_LLM_BUDGETS),
    Migration(6, "where the mesh's nodes hold named tensors", _V6_TENSOR_LOCATIONS),
    Migration(7, "workflow holders, leases and cancel requests", _V7_WORKFLOW_LEASES),
)
LATEST = MIGRATIONS[-1].version

_TYPES = {
    "sqlite": {"blob": "BLOB", "real": "REAL", "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "real": "DOUBLE PRECISION", "bigint": "BIGINT"},
}


def render(migration: Migration, dialect: str) -> list[str]:
    """The migration's statements for one dialect."""
    text = migration.sql.format(**_TYPES[dialect])
    return [s.strip() for s in text.split(";") if s.strip()]


def too_new_message(found: int, where: str) -> str:
    return (
        f"the state in {where} has schema version {found}, but this kernelmesh "
        f"knows schema versions up to {LATEST}: it was written by a newer kernelmesh. "
        "Run that version, or point --state-dir/--store elsewhere."
    )
