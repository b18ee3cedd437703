"""The usage store: tokens and cost per tenant, model and provider, in SQLite
(WAL).

Recording must not add latency to a request, so `record` only updates the
in-memory totals and queues the row; one writer thread commits queued rows in
batches. The totals are loaded from the database when the store opens, so
`summary` is exact at once and survives restarts.

Token budgets are kept exactly across crashes apart from that: `hold` commits
a budget reservation before the upstream call starts (synchronous=NORMAL in
WAL mode: it survives kill -9, at tens of microseconds), and `release` swaps
it for the tokens really used in one transaction. At open, a reservation left
by a process that died is charged in full: its call's outcome is unknown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kernelmesh.core.errors import Unavailable
from kernelmesh.core.store.base import (
    BudgetAnswer,
    ChargeBudget,
    PutUsage,
    SettleBudget,
    Store,
    StoreUnavailable,
)

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

# Budget spending apart from the usage rows, so a reservation and the spend that
# replaces it change in one transaction. Created seeded from llm_usage, for state
# written before these tables existed.
_BUDGET_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_reservations (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS llm_budget_spent (
    tenant TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    ts REAL NOT NULL
);
"""

log = logging.getLogger(__name__)

_BATCH = 512
_FLUSH_S = 0.5
# Rows kept for another try while the database refuses writes (locked,
# full); beyond this the oldest are dropped rather than grow without bound.
_MAX_PENDING = 100_000
# How long a call waits for its budget settlement to commit before it answers
# anyway (the settlement stays queued; the reservation is held until it lands).
_SETTLE_WAIT_S = 5.0


class TokenUsage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


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
        self._open_budget()
        self._totals: dict[tuple[str, str, str], _Totals] = {}
        self._lock = threading.Lock()
        self._load_totals(
            self._db.execute(
                "SELECT tenant, model, provider, COUNT(*), SUM(prompt_tokens),"
                " SUM(completion_tokens), SUM(cost) FROM llm_usage"
                " GROUP BY tenant, model, provider"
            )
        )
        # Rows wait in a list the writer swaps out every _FLUSH_S (or sooner
        # when _BATCH pile up): appending never wakes a thread, so a request
        # pays no GIL hand-off for its accounting.
        self._rows: list[_Row] = []
        self._releases: list[tuple[int, str, int]] = []
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
        self._add_to_totals(tenant, model, provider, usage, cost)
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

    def _open_budget(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            fresh = not db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'llm_budget_spent'"
            ).fetchone()
            # One statement at a time: executescript would commit this transaction.
            for statement in filter(str.strip, _BUDGET_SCHEMA.split(";")):
                db.execute(statement)
            if fresh:
                db.execute(
                    "INSERT INTO llm_budget_spent SELECT tenant,"
                    " SUM(prompt_tokens + completion_tokens), MAX(ts) FROM llm_usage"
                    " GROUP BY tenant"
                )
            # Reservations of a process that died: their calls may have spent it all.
            db.execute(
                "INSERT INTO llm_budget_spent SELECT tenant, tokens, ts FROM llm_reservations"
            )
            db.execute("DELETE FROM llm_reservations")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._budget_spent: dict[str, int] = dict(
            db.execute("SELECT tenant, SUM(tokens) FROM llm_budget_spent GROUP BY tenant")
        )
        self._holds: sqlite3.Connection | None = None
        self._holds_lock = threading.Lock()
        if self.path != ":memory:":
            self._holds = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
            self._holds.execute("PRAGMA synchronous=NORMAL")

    def hold(self, tenant: str, tokens: int) -> int:
        """Commits a budget reservation now (before the upstream call); returns
        its id for `release`. 0 for an in-memory store (nothing to survive)."""
        if self._holds is None:
            return 0
        with self._holds_lock:
            try:
                cursor = self._holds.execute(
                    "INSERT INTO llm_reservations (tenant, tokens, ts) VALUES (?, ?, ?)",
                    (tenant, tokens, time.time()),
                )
            except sqlite3.Error as exc:
                raise Unavailable(
                    f"the usage store {self.path} cannot record a budget reservation: {exc}"
                ) from None
            return int(cursor.lastrowid or 0)

    def release(self, hold_id: int, tenant: str, used: int) -> None:
        """Replaces a reservation by the tokens used, in one transaction (queued
        for the writer like usage rows: until it commits, a crash charges the
        whole reservation, never less)."""
        with self._lock:
            self._budget_spent[tenant] = self._budget_spent.get(tenant, 0) + used
        if hold_id == 0:
            return
        with self._wake:
            self._releases.append((hold_id, tenant, used))
            self._recorded_rows += 1

    def _load_totals(self, rows: Iterable[tuple[str, str, str, int, int, int, float]]) -> None:
        """Replaces the totals by `rows` of (tenant, model, provider, requests,
        prompt tokens, completion tokens, cost)."""
        totals = {(t, m, p): _Totals(n, pt, ct, cost) for t, m, p, n, pt, ct, cost in rows}
        with self._lock:
            self._totals = totals

    def _add_to_totals(
        self, tenant: str, model: str, provider: str, usage: TokenUsage, cost: float
    ) -> None:
        with self._lock:
            totals = self._totals.get((tenant, model, provider))
            if totals is None:
                totals = self._totals[(tenant, model, provider)] = _Totals()
            totals.requests += 1
            totals.prompt_tokens += usage.prompt_tokens
            totals.completion_tokens += usage.completion_tokens
            totals.cost += cost

    def budget_spent(self) -> dict[str, int]:
        """Tokens charged to each tenant's budget, crashes included (seeds budgets)."""
        with self._lock:
            return dict(self._budget_spent)

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
        if self._holds is not None:
            self._holds.close()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                if not self._closed and len(self._rows) < _BATCH:
                    self._wake.wait(_FLUSH_S)
                rows, self._rows = self._rows, []
                releases, self._releases = self._releases, []
                stop = self._closed
            committed = 0
            if rows or releases:
                try:
                    # Autocommit connection: one explicit transaction per batch.
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT INTO llm_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
                    )
                    now = time.time()
                    self._db.executemany(
                        "INSERT INTO llm_budget_spent VALUES (?, ?, ?)",
                        [(tenant, used, now) for _, tenant, used in releases],
                    )
                    self._db.executemany(
                        "DELETE FROM llm_reservations WHERE id = ?",
                        [(hold_id,) for hold_id, _, _ in releases],
                    )
                    self._db.execute("COMMIT")
                    committed = len(rows) + len(releases)
                except sqlite3.Error:
                    # Never leave the write lock held, never let the thread
                    # die: keep the rows for the next round.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    log.exception("usage store: could not commit %d rows", len(rows))
                    if not stop:
                        with self._wake:
                            self._releases[:0] = releases
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


class StoreUsage(UsageStore):
    """LLM usage and token budgets in the configured `Store` (SQLite under the
    state dir, or PostgreSQL shared by several orchestrators), in place of a
    `usage.sqlite` per process.

    A reservation is one transaction in the database (`Store.reserve_budget`:
    serialized per tenant, granted only while spent + reserved + tokens stays
    within the budget), committed before the upstream call, awaited without
    blocking the event loop. It carries this process's name and an expiry: a
    reservation nobody settled by then (its process died mid-call) is charged
    in full by the next reservation of the tenant, never less. Settlements and
    usage rows ride the store's group commit; until a settlement commits, the
    whole reservation stays held. Totals for `summary` are loaded at `open`
    and kept here (this process's calls added as they happen)."""

    def __init__(self, store: Store, owner: str, *, reservation_ttl_s: float = 900.0) -> None:
        # UsageStore's SQLite file is not used: the Store holds everything.
        self.store = store
        self.owner = owner
        self.reservation_ttl_s = reservation_ttl_s
        self.path = store.where
        self._totals = {}
        self._lock = threading.Lock()
        self._budget_spent = {}
        self._closed = False

    async def import_file(self, path: Path) -> bool:
        """Brings the usage rows and spent budgets of a `usage.sqlite` an earlier
        version kept (a reservation it left is charged in full, as it always was)
        into the store, then renames the file `usage.sqlite.imported`. A crash
        between the commit and the rename imports it twice: spending counted
        twice, never a budget handed out again."""

        def read() -> tuple[dict[str, int], list[_Row]]:
            legacy = UsageStore(path)  # charges reservations a dead process left
            try:
                spent = legacy.budget_spent()
                rows = legacy._db.execute("SELECT * FROM llm_usage").fetchall()
            finally:
                legacy.close()
            return spent, rows

        if not path.is_file():
            return False
        spent, rows = await asyncio.to_thread(read)
        future = self.store.write(
            *(PutUsage(*row) for row in rows),
            *(ChargeBudget(tenant, tokens) for tenant, tokens in spent.items() if tokens),
            wait=True,
        )
        if future is not None:
            await future
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.rename(
                    part.with_name(part.name.replace("usage.sqlite", "usage.sqlite.imported"))
                )
        log.info(
            "imported %d LLM usage rows and the spent budgets of %d tenants from %s",
            len(rows),
            len(spent),
            path,
        )
        await self.open()
        return True

    async def open(self) -> None:
        """Loads the totals (after the store is open)."""
        spent, usage = await self.store.budget_usage()
        with self._lock:
            self._budget_spent = dict(spent)
        self._load_totals(usage)

    def record(
        self,
        tenant: str,
        model: str,
        provider: str,
        deployment: str,
        usage: TokenUsage,
        cost: float,
    ) -> None:
        self._add_to_totals(tenant, model, provider, usage, cost)
        row = PutUsage(
            time.time(),
            tenant,
            model,
            provider,
            deployment,
            usage.prompt_tokens,
            usage.completion_tokens,
            cost,
        )
        try:
            self.store.write(row)
        except StoreUnavailable as exc:  # closing: the totals here were shown already
            log.warning("usage not recorded: %s", exc)

    async def reserve(self, tenant: str, tokens: int, budget: int) -> BudgetAnswer:
        now = time.time()
        return await self.store.reserve_budget(
            tenant, tokens, budget, self.owner, now + self.reservation_ttl_s, now
        )

    def hold(self, tenant: str, tokens: int) -> int:
        raise TypeError("StoreUsage reserves in the database: use `reserve`")

    def release(self, hold_id: int, tenant: str, used: int) -> None:
        with self._lock:
            self._budget_spent[tenant] = self._budget_spent.get(tenant, 0) + used
        try:
            self.store.write(SettleBudget(hold_id, tenant, used))
        except StoreUnavailable as exc:  # the reservation stays: charged in full later
            log.warning("budget settlement not recorded: %s", exc)

    async def settled(self, timeout: float = _SETTLE_WAIT_S) -> None:
        """Waits (bounded) for the settlements queued so far to commit; one that
        cannot commit now stays queued and keeps its reservation held meanwhile."""
        try:
            async with asyncio.timeout(timeout):
                await self.store.sync()
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("budget settlement not yet committed: %s", exc or "timed out")

    def flush(self, timeout: float = 10.0) -> None:
        return None  # the store's group commit; `await store.sync()` waits for it

    def close(self) -> None:
        self._closed = True  # the server closes the store itself
