"""The SQLite usage store: aggregates per tenant, model and provider, and
keeps them across restarts."""

from __future__ import annotations

import sqlite3

import pytest

from kernelmesh.core.llm import Usage
from kernelmesh.core.store import _SCHEMA, UsageStore


def test_summary_aggregates_per_model_and_provider():
    store = UsageStore()
    store.record("acme", "gpt", "openai", "primary", Usage(10, 5, 15), 0.5)
    store.record("acme", "gpt", "openai", "backup", Usage(1, 1, 2), 0.25)
    store.record("acme", "gpt", "ollama", "local", Usage(3, 3, 6), 0.0)
    store.record("globex", "gpt", "openai", "primary", Usage(100, 100, 200), 9.0)

    records = store.summary("acme")
    store.close()

    assert [(r.model, r.provider, r.requests) for r in records] == [
        ("gpt", "ollama", 1),
        ("gpt", "openai", 2),
    ]
    openai = records[1]
    assert (openai.prompt_tokens, openai.completion_tokens, openai.total_tokens) == (11, 6, 17)
    assert openai.cost == pytest.approx(0.75)


def test_rows_are_committed_to_sqlite_and_reloaded(tmp_path):
    path = tmp_path / "usage.db"
    store = UsageStore(path)
    for _ in range(100):
        store.record("acme", "gpt", "openai", "primary", Usage(2, 3, 5), 0.01)
    store.flush()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM llm_usage").fetchone() == (100,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()

    [record] = UsageStore(path).summary("acme")

    assert (record.requests, record.total_tokens) == (100, 500)
    assert record.cost == pytest.approx(1.0)


def test_a_failed_commit_keeps_the_writer_and_its_rows(tmp_path):
    path = tmp_path / "usage.db"
    store = UsageStore(path)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE llm_usage")  # e.g. a locked or full database
    store.record("acme", "gpt", "openai", "primary", Usage(2, 3, 5), 0.01)
    store.flush(timeout=0.3)  # cannot commit now

    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA)
    store.record("acme", "gpt", "openai", "primary", Usage(2, 3, 5), 0.01)
    store.flush(timeout=5)

    assert store._writer.is_alive()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM llm_usage").fetchone() == (2,)
    store.close()
