"""LLM token budgets across kill -9: a reservation is committed before the
upstream call, so processes that die mid-call or right after settling never
grant more than the budget in total."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm.budget import BudgetLedger
from kernelmesh.core.store import UsageStore

BUDGET = 300

# One process: grant 100-token calls until the budget refuses or `calls` are
# made, then die by SIGKILL right away (settled calls: before the writer commits).
_PROCESS = """
import os, signal, sys
from types import SimpleNamespace
from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm.budget import BudgetLedger
from kernelmesh.core.store import UsageStore

path, settle, calls = sys.argv[1], sys.argv[2] == "settle", int(sys.argv[3])
store = UsageStore(path)
config = SimpleNamespace(limits_for=lambda t: SimpleNamespace(token_budget=BUDGET))
ledger = BudgetLedger(config, spent=store.budget_spent(), journal=store)
for _ in range(calls):
    try:
        reservation = ledger.reserve("acme", 100)
    except ResourceExhausted:
        break
    print("granted", flush=True)  # the upstream call spends all 100 tokens
    if settle:
        ledger.settle(reservation, 100)
os.kill(os.getpid(), signal.SIGKILL)
""".replace("BUDGET", str(BUDGET))


def ledger(store: UsageStore) -> BudgetLedger:
    config = SimpleNamespace(limits_for=lambda t: SimpleNamespace(token_budget=BUDGET))
    return BudgetLedger(config, spent=store.budget_spent(), journal=store)  # type: ignore[arg-type]


@pytest.mark.parametrize("settle", ["settle", "mid-call"])
def test_processes_killed_after_granting_never_exceed_the_budget(tmp_path, settle):
    path = tmp_path / "usage.sqlite"
    granted = 0
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", _PROCESS, str(path), settle, "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == -9, done.stderr
        granted += done.stdout.count("granted") * 100
    assert granted == BUDGET  # all of it was handed out, and never more


def test_a_settled_call_is_charged_what_it_used_after_a_restart(tmp_path):
    path = tmp_path / "usage.sqlite"
    store = UsageStore(path)
    book = ledger(store)
    book.settle(book.reserve("acme", 100), 40)
    store.flush()
    store.close()
    store = UsageStore(path)
    assert store.budget_spent() == {"acme": 40}
    book = ledger(store)
    book.reserve("acme", 260)
    with pytest.raises(ResourceExhausted):
        book.reserve("acme", 1)
    store.close()


def test_a_reservation_left_by_a_dead_process_is_charged_in_full(tmp_path):
    path = tmp_path / "usage.sqlite"
    store = UsageStore(path)
    ledger(store).reserve("acme", 120)  # the process "dies" here: no settle
    reopened = UsageStore(path)
    assert reopened.budget_spent() == {"acme": 120}
    reopened.close()
    store.close()
