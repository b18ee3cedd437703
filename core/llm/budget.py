"""Per-tenant token budgets, never overspent by an upstream that counts as
a tokenizer does, and overspent by a bounded amount by one that does not.

Before a call, its worst case is reserved: a bound on the prompt's tokens
that no byte-level tokenizer exceeds (core/llm/tokens.py) plus max_tokens; a
reservation that would take spent + reserved past the budget is refused.
After the call the reservation is settled with the usage the upstream
reported, refunding the difference. A settlement above its reservation (an
upstream whose template or accounting adds more than allowed for) is charged
in full, and the tenant is blocked at once: no reservation is admitted for it
again until the server restarts, so the overspend is
at most what the requests already in flight report beyond their reservations.

Reserve and settle never await, so on one event loop they are atomic by
construction; the lock keeps them atomic for callers on other threads too.
They are the only two places a budget changes: a durable store wraps them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm.config import LLMConfig
from kernelmesh.core.store.base import BudgetAnswer

log = logging.getLogger(__name__)

# A spent budget does not refill by waiting; tell clients to come back much
# later rather than hammer the gateway. In-flight reservations may free room
# sooner, which gets the short hint.
_SPENT_RETRY_AFTER_S = 3600.0
_IN_FLIGHT_RETRY_AFTER_S = 1.0


class BudgetJournal(Protocol):
    """Where reservations are made durable (the usage store): `hold` commits
    before the upstream call, `release` swaps it for the tokens used."""

    def hold(self, tenant: str, tokens: int) -> int: ...

    def release(self, hold_id: int, tenant: str, used: int) -> None: ...


@runtime_checkable
class SharedBudget(Protocol):
    """A journal that reserves in the database itself (the configured store, shared
    by every process on it): the grant is the database's, not this process's."""

    async def reserve(self, tenant: str, tokens: int, budget: int) -> BudgetAnswer: ...

    async def settled(self) -> None:
        """Returns once every settlement released so far is committed."""


@dataclass
class Reservation:
    tenant: str
    tokens: int
    settled: bool = False
    hold_id: int | None = None  # the journal's, for a tenant with a budget


@dataclass
class _Account:
    budget: int
    spent: int = 0
    reserved: int = 0
    # Why no reservation is admitted any more, once a settlement exceeded its
    # reservation.
    blocked: str | None = None


class BudgetLedger:
    def __init__(
        self,
        config: LLMConfig,
        spent: Mapping[str, int] | None = None,
        journal: BudgetJournal | None = None,
    ) -> None:
        """`spent` seeds each tenant's spending (from the usage store), so a
        restart does not hand out the budget again; `journal` makes each
        reservation durable before its call, so a crash does not either."""
        self._config = config
        self._journal = journal
        self._spent_before = dict(spent or {})
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()

    def _account(self, tenant: str) -> _Account | None:
        account = self._accounts.get(tenant)
        if account is None:
            budget = self._config.limits_for(tenant).token_budget
            if budget is None:
                # Not kept: tenant names come from callers, and an entry per
                # name ever seen would grow without bound.
                return None
            account = self._accounts[tenant] = _Account(
                budget=budget, spent=self._spent_before.get(tenant, 0)
            )
        return account

    def reserve(self, tenant: str, tokens: int) -> Reservation:
        with self._lock:
            account = self._account(tenant)
            if account is not None:
                if account.blocked is not None:
                    raise ResourceExhausted(
                        f"tenant {tenant!r} token budget is blocked: {account.blocked}; "
                        f"{account.spent} of {account.budget} tokens spent",
                        retry_after=_SPENT_RETRY_AFTER_S,
                    )
                if account.spent + account.reserved + tokens > account.budget:
                    left = account.budget - account.spent
                    in_flight = account.reserved > 0 and tokens <= left
                    raise ResourceExhausted(
                        f"tenant {tenant!r} token budget: {account.spent} of {account.budget} "
                        f"tokens spent, {account.reserved} reserved by requests in flight; "
                        f"this request may need {tokens}",
                        retry_after=_IN_FLIGHT_RETRY_AFTER_S if in_flight else _SPENT_RETRY_AFTER_S,
                    )
                if self._journal is not None:
                    hold_id = self._journal.hold(tenant, tokens)
                    account.reserved += tokens
                    return Reservation(tenant, tokens, hold_id=hold_id)
                account.reserved += tokens
            return Reservation(tenant, tokens)

    async def reserve_async(self, tenant: str, tokens: int) -> Reservation:
        """`reserve`, decided by the store when it is shared (every process on it
        draws on one budget): awaited, so the event loop is never blocked."""
        shared: object = self._journal
        if not isinstance(shared, SharedBudget):
            return self.reserve(tenant, tokens)
        with self._lock:
            account = self._account(tenant)
            if account is None:
                return Reservation(tenant, tokens)
            if account.blocked is not None:
                raise ResourceExhausted(
                    f"tenant {tenant!r} token budget is blocked: {account.blocked}; "
                    f"{account.spent} of {account.budget} tokens spent",
                    retry_after=_SPENT_RETRY_AFTER_S,
                )
            budget = account.budget
        answer = await shared.reserve(tenant, tokens, budget)
        with self._lock:
            account.spent = answer.spent
            if answer.hold_id is None:
                left = budget - answer.spent
                in_flight = answer.reserved > 0 and tokens <= left
                raise ResourceExhausted(
                    f"tenant {tenant!r} token budget: {answer.spent} of {budget} tokens spent, "
                    f"{answer.reserved} reserved by requests in flight (all servers); "
                    f"this request may need {tokens}",
                    retry_after=_IN_FLIGHT_RETRY_AFTER_S if in_flight else _SPENT_RETRY_AFTER_S,
                )
            account.reserved += tokens
        return Reservation(tenant, tokens, hold_id=answer.hold_id)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replaces the reservation by the tokens really used (0 when the call
        failed before the upstream did any work). Idempotent."""
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            account = self._account(reservation.tenant)
            if account is not None:
                account.reserved -= reservation.tokens
                account.spent += used
                if used > reservation.tokens and account.blocked is None:
                    account.blocked = (
                        f"an upstream reported {used} tokens for a request that reserved "
                        f"{reservation.tokens}"
                    )
                    log.warning(
                        "tenant %r: %s; charged in full and blocked until restart "
                        "(raise the deployment's prompt_overhead_tokens if its chat template "
                        "adds that many)",
                        reservation.tenant,
                        account.blocked,
                    )
            if self._journal is not None and reservation.hold_id is not None:
                self._journal.release(reservation.hold_id, reservation.tenant, used)

    async def settle_async(self, reservation: Reservation, used: int) -> None:
        """`settle`, then waits for a shared store to commit the settlement: until
        it does, every server on the store counts the whole reservation as in
        flight, and a caller's next request could be refused for its own last one."""
        first = not reservation.settled
        self.settle(reservation, used)
        shared: object = self._journal
        if first and reservation.hold_id is not None and isinstance(shared, SharedBudget):
            await shared.settled()

    def spent(self, tenant: str) -> int | None:
        """Tokens spent so far, or None when the tenant has no budget."""
        with self._lock:
            account = self._account(tenant)
            return None if account is None else account.spent
