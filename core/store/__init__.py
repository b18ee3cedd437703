"""Durable state: the `Store` interface (tasks, attempts, named tensors, API
keys) with SQLite, PostgreSQL and in-memory implementations, and the LLM
usage store."""

from kernelmesh.core.store.base import (
    AttemptRecord,
    SchemaTooNew,
    Snapshot,
    Store,
    StoreError,
    StoreUnavailable,
    TaskRecord,
    TensorRecord,
)
from kernelmesh.core.store.factory import default_state_dir, open_store
from kernelmesh.core.store.usage import _SCHEMA, StoreUsage, UsageRecord, UsageStore

__all__ = [
    "_SCHEMA",
    "AttemptRecord",
    "SchemaTooNew",
    "Snapshot",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoreUsage",
    "TaskRecord",
    "TensorRecord",
    "UsageRecord",
    "UsageStore",
    "default_state_dir",
    "open_store",
]
