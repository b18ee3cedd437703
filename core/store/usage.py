"""The usage store: tokens and cost per tenant, model and provider, in SQLite
(WAL).

Recording must not add latency to a request, so `record` only updates the
in-memory totals and queues the row; one writer thread commits queued rows in
batches. The totals are loaded from the database when the store opens, so
`summary` is exact at once and survives restarts."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_usage (
    ts REAL NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    deployment TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_usage_tenant ON llm_usage (tenant);
"""

log = logging.getLogger(__name__)

_BATCH = 512
_FLUSH_S = 0.5
# Rows kept for another try while the database refuses writes (locked,
# full); beyond this the oldest are dropped rather than grow without bound.
_MAX_PENDING = 100_000


class TokenUsage(Protocol):
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageRecord:
    """A tenant's aggregated usage of one model through one provider."""

    tenant: str
    model: str
    provider: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


_Row = tuple[float, str, str, str, str, int, int, float]


class UsageStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Only the writer thread touches the connection once it starts.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._totals: dict[tuple[str, str, str], _Totals] = {}
        self._lock = threading.Lock()
        for tenant, model, provider, n, p, c, cost in self._db.execute(
            "SELECT tenant, model, provider, COUNT(*), SUM(prompt_tokens),"
            " SUM(completion_tokens), SUM(cost) FROM llm_usage"
            " GROUP BY tenant, model, provider"
        ):
            self._totals[(tenant, model, provider)] = _Totals(n, p, c, cost)
        # Rows wait in a list the writer swaps out every _FLUSH_S (or sooner
        # when _BATCH pile up): appending never wakes a thread, so a request
        # pays no GIL hand-off for its accounting.
        self._rows: list[_Row] = []
        self._wake = threading.Condition(threading.Lock())
        self._committed = threading.Condition()
        self._recorded_rows = 0
        self._committed_rows = 0
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="usage-store", daemon=True)
        self._writer.start()

    def record(
        self,
        tenant: str,
        model: str,
        provider: str,
        deployment: str,
        usage: TokenUsage,
        cost: float,
    ) -> None:
        with self._lock:
            totals = self._totals.get((tenant, model, provider))
            if totals is None:
                totals = self._totals[(tenant, model, provider)] = _Totals()
            totals.requests += 1
            totals.prompt_tokens += usage.prompt_tokens
            totals.completion_tokens += usage.completion_tokens
            totals.cost += cost
        row = (
            time.time(),
            tenant,
            model,
            provider,
            deployment,
            usage.prompt_tokens,
            usage.completion_tokens,
            cost,
        )
        with self._wake:
            self._rows.append(row)
            self._recorded_rows += 1
            if len(self._rows) >= _BATCH:
                self._wake.notify()

    def summary(self, tenant: str) -> list[UsageRecord]:
        with self._lock:
            return [
                UsageRecord(t, m, p, v.requests, v.prompt_tokens, v.completion_tokens, v.cost)
                for (t, m, p), v in sorted(self._totals.items())
                if t == tenant
            ]

    def spent_tokens(self) -> dict[str, int]:
        """Tokens spent per tenant, all models together (seeds token budgets)."""
        spent: dict[str, int] = {}
        with self._lock:
            for (tenant, _, _), v in self._totals.items():
                spent[tenant] = spent.get(tenant, 0) + v.prompt_tokens + v.completion_tokens
        return spent

    def flush(self, timeout: float = 10.0) -> None:
        """Blocks until every recorded row is committed."""
        with self._wake:
            target = self._recorded_rows
            self._wake.notify()
        with self._committed:
            self._committed.wait_for(lambda: self._committed_rows >= target, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._wake:
            self._wake.notify()
        self._writer.join()
        self._db.close()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                if not self._closed and len(self._rows) < _BATCH:
                    self._wake.wait(_FLUSH_S)
                rows, self._rows = self._rows, []
                stop = self._closed
            committed = 0
            if rows:
                try:
                    # Autocommit connection: one explicit transaction per batch.
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT INTO llm_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
                    )
                    self._db.execute("COMMIT")
                    committed = len(rows)
                except sqlite3.Error:
                    # Never leave the write lock held, never let the thread
                    # die: keep the rows for the next round.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    log.exception("usage store: could not commit %d rows", len(rows))
                    if not stop:
                        with self._wake:
                            pending = rows + self._rows
                            dropped = max(0, len(pending) - _MAX_PENDING)
                            self._rows = pending[dropped:]
                            # Dropped rows never commit: flush must not wait for them.
                            committed = dropped
                            # Retry after a pause, even with a full batch waiting.
                            if not self._closed:
                                self._wake.wait(_FLUSH_S)
            with self._committed:
                self._committed_rows += committed
                self._committed.notify_all()
            if stop:
                return
