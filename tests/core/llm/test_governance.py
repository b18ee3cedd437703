"""Per-tenant rate limits and token budgets, exact under concurrency."""

from __future__ import annotations

import asyncio

import pytest
from llm_helpers import chat_config, deployment, user

from kernelmesh.core.errors import InvalidArgument, ResourceExhausted
from kernelmesh.core.llm import (
    CacheConfig,
    GenerationOptions,
    Message,
    Role,
    Usage,
    parse_config,
)
from kernelmesh.core.llm.budget import BudgetLedger
from kernelmesh.core.llm.cache import ResponseCache
from kernelmesh.core.llm.ratelimit import TokenBucket
from kernelmesh.core.store import UsageStore


def test_token_bucket_says_when_enough_will_have_refilled(clock):
    bucket = TokenBucket(60, 60.0, clock)  # one per second
    bucket.take(60)

    assert bucket.wait_for(3) == pytest.approx(3.0)
    clock.advance(1.5)
    assert bucket.wait_for(3) == pytest.approx(1.5)
    clock.advance(100)
    assert bucket.level() == 60


async def test_requests_per_minute_refuses_with_retry_after(upstream, make_gateway, clock):
    config = chat_config(
        deployment("primary", upstream), tenants={"default": {"requests_per_minute": 2}}
    )
    gateway = await make_gateway(config, clock=clock)
    await gateway.generate("acme", "chat", user("hi"))
    await gateway.generate("acme", "chat", user("hi"))

    with pytest.raises(ResourceExhausted, match="requests_per_minute") as caught:
        await gateway.generate("acme", "chat", user("hi"))

    assert caught.value.retry_after == pytest.approx(30.0)
    assert upstream.requests == 2
    await gateway.generate("globex", "chat", user("hi"))  # other tenants are unaffected
    clock.advance(30)
    await gateway.generate("acme", "chat", user("hi"))


async def test_tokens_per_minute_counts_real_usage(upstream, make_gateway, clock):
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"tokens_per_minute": 60}}
    )
    gateway = await make_gateway(config, clock=clock)
    options = GenerationOptions(max_tokens=20)
    # Each call reserves ~27 tokens (estimate + max_tokens) and settles at 3.
    for _ in range(10):
        await gateway.generate("acme", "chat", user("hi"), options)

    with pytest.raises(ResourceExhausted, match="tokens_per_minute") as caught:
        await gateway.generate("acme", "chat", user("hi"), GenerationOptions(max_tokens=50))
    assert 0 < caught.value.retry_after <= 60


async def test_a_request_larger_than_the_minute_limit_is_invalid(upstream, make_gateway):
    config = chat_config(
        deployment("primary", upstream), tenants={"default": {"tokens_per_minute": 100}}
    )
    gateway = await make_gateway(config)
    with pytest.raises(InvalidArgument) as caught:
        await gateway.generate("acme", "chat", user("hi"), GenerationOptions(max_tokens=500))
    assert caught.value.violations[0].field == "options.max_tokens"


async def test_budget_is_exact_under_50_concurrent_requests(upstream, make_gateway):
    # Each request reserves a bound on its prompt + max_tokens and really uses
    # 1 + 2 = 3 tokens. The budget fits 25 reservations (and not 26) while
    # all 50 are in flight together; the rest are refused.
    options = GenerationOptions(max_tokens=12)
    config = chat_config(deployment("primary", upstream))
    reservation = (await make_gateway(config))._reservation_for(user("hi"), options, "chat")
    budget = 26 * reservation - 1
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": budget}}
    )
    gateway = await make_gateway(config)
    upstream.stall(0.05)  # keep them all in flight at once

    results = await asyncio.gather(
        *(gateway.generate("acme", "chat", user("hi"), options) for _ in range(50)),
        return_exceptions=True,
    )

    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert (len(ok), len(refused)) == (25, 25)
    assert all(r.usage.total_tokens == 3 for r in ok)
    assert gateway._budget.spent("acme") == 75
    [record] = gateway.usage("acme")
    assert (record.requests, record.total_tokens) == (25, 75)
    assert upstream.requests == 25


async def test_budget_refuses_once_spent_and_cache_hits_cost_nothing(upstream, make_gateway):
    # Room for one reservation with max_tokens=12, and 3 tokens more.
    options = GenerationOptions(max_tokens=12, temperature=0)
    config = chat_config(deployment("primary", upstream))
    reservation = (await make_gateway(config))._reservation_for(user("hi"), options, "chat")
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": reservation + 3}}
    )
    gateway = await make_gateway(config)

    await gateway.generate("acme", "chat", user("hi"), options)  # spends 3
    for _ in range(5):
        assert (await gateway.generate("acme", "chat", user("hi"), options)).cached
    assert gateway._budget.spent("acme") == 3

    # 13 more tokens of max_tokens no longer fit after the 3 spent.
    with pytest.raises(ResourceExhausted, match="token budget") as caught:
        await gateway.generate("acme", "chat", user("hi"), GenerationOptions(max_tokens=13))
    assert caught.value.retry_after > 60


def test_budget_settle_refunds_the_unused_reservation():
    ledger = BudgetLedger(parse_config({"tenants": {"default": {"token_budget": 100}}}))
    first = ledger.reserve("acme", 60)
    with pytest.raises(ResourceExhausted):
        ledger.reserve("acme", 60)

    ledger.settle(first, 10)
    ledger.settle(first, 10)  # idempotent

    assert ledger.spent("acme") == 10
    ledger.reserve("acme", 90)


def test_budget_spending_survives_a_restart(tmp_path):
    path = tmp_path / "usage.db"
    store = UsageStore(path)
    store.record("acme", "chat", "openai", "primary", Usage(30, 50, 80), 0.1)
    store.close()

    reopened = UsageStore(path)
    ledger = BudgetLedger(
        parse_config({"tenants": {"default": {"token_budget": 100}}}),
        spent=reopened.spent_tokens(),
    )
    reopened.close()

    assert ledger.spent("acme") == 80
    with pytest.raises(ResourceExhausted):
        ledger.reserve("acme", 21)


def test_the_cache_key_does_not_hold_the_prompt():
    cache = ResponseCache(CacheConfig())
    huge = "x" * 1_000_000
    options = GenerationOptions(temperature=0)

    key = cache.key("acme", "chat", (Message(Role.USER, huge),), options)

    # Up to max_entries keys stay in memory: a prompt's text must not.
    assert len(repr(key)) < 1000
    assert key == cache.key("acme", "chat", (Message(Role.USER, "x" * 1_000_000),), options)
    assert key != cache.key("acme", "chat", (Message(Role.SYSTEM, huge),), options)
    assert key != cache.key("globex", "chat", (Message(Role.USER, huge),), options)


async def test_tenants_without_limits_leave_no_state_behind(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))

    for i in range(20):
        await gateway.generate(f"tenant-{i}", "chat", user("hi"))

    assert len(gateway._limiter._tenants) == 0
    assert len(gateway._budget._accounts) == 0


# -- budgets hold whatever the upstream counts ---------------------------------------

CJK = "你好世界" * 50  # 200 characters, 600 UTF-8 bytes, one "word"


async def _fifty(gateway, text: str, tenant: str = "acme") -> list[object]:
    options = GenerationOptions(max_tokens=12)
    return await asyncio.gather(
        *(gateway.generate(tenant, "chat", user(text), options) for _ in range(50)),
        return_exceptions=True,
    )


async def test_budget_holds_under_50_concurrent_requests_when_the_upstream_counts_characters(
    upstream, make_gateway
):
    # The upstream counts one prompt token per character (200 for CJK), four
    # times the old characters / 4 estimate: the reservation must still cover it.
    budget = 5000
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": budget}}
    )
    gateway = await make_gateway(config)
    upstream.count_prompt_by("chars")
    upstream.stall(0.05)  # all 50 in flight together

    results = await _fifty(gateway, CJK)

    ok = [r for r in results if not isinstance(r, BaseException)]
    assert ok and all(r.usage.prompt_tokens == 200 for r in ok)
    assert all(isinstance(r, ResourceExhausted) for r in results if r not in ok)
    assert gateway._budget.spent("acme") == sum(r.usage.total_tokens for r in ok)
    assert gateway._budget.spent("acme") <= budget


async def test_a_request_whose_reservation_cannot_fit_is_refused_before_the_upstream(
    upstream, make_gateway
):
    config = chat_config(deployment("primary", upstream), tenants={"acme": {"token_budget": 500}})
    gateway = await make_gateway(config)
    upstream.count_prompt_by("chars")

    with pytest.raises(ResourceExhausted, match="token budget"):
        await gateway.generate("acme", "chat", user(CJK), GenerationOptions(max_tokens=12))

    assert upstream.requests == 0
    assert gateway._budget.spent("acme") == 0


async def test_a_settlement_above_its_reservation_is_charged_and_blocks_the_tenant(
    upstream, make_gateway
):
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": 100_000}}
    )
    gateway = await make_gateway(config)
    upstream.over_report(5000)  # far beyond any bound on a 2-byte prompt

    first = await gateway.generate("acme", "chat", user("hi"), GenerationOptions(max_tokens=12))

    assert first.usage.prompt_tokens == 5001
    assert gateway._budget.spent("acme") == first.usage.total_tokens  # charged in full
    with pytest.raises(ResourceExhausted, match="blocked") as caught:
        await gateway.generate("acme", "chat", user("hi"), GenerationOptions(max_tokens=12))
    assert caught.value.retry_after > 60
    assert upstream.requests == 1
    await gateway.generate("globex", "chat", user("hi"))  # other tenants carry on


async def test_overspend_is_bounded_by_the_requests_in_flight_at_the_first_over_report(
    upstream, make_gateway
):
    # 50 requests, each held 20 ms upstream, each reported 100 tokens above
    # anything it could reserve. Only those admitted before the first settlement
    # can overspend; every later one is refused. The first 10 arrive 2 ms apart,
    # in flight together; the other 40 once those have settled (all 50 2 ms apart
    # relied on the first settlement coming within 100 ms, which a loaded
    # machine need not do).
    budget = 3000
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": budget}}
    )
    gateway = await make_gateway(config)
    upstream.over_report(100)
    upstream.stall(0.02)
    options = GenerationOptions(max_tokens=12)

    async def one(i: int) -> object:
        await asyncio.sleep(0.002 * i)
        return await gateway.generate("acme", "chat", user("hi"), options)

    first = await asyncio.gather(*(one(i) for i in range(10)), return_exceptions=True)
    later = await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)
    results = first + later

    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(ok) + len(refused) == 50
    reserved_each = gateway._reservation_for(user("hi"), options, "chat")
    excess_each = ok[0].usage.total_tokens - reserved_each
    assert excess_each > 0
    spent = gateway._budget.spent("acme")
    assert spent == len(ok) * ok[0].usage.total_tokens
    # Without the block, every request whose reservation fits would run.
    assert len(ok) < budget // reserved_each
    assert spent - budget <= len(ok) * excess_each
    assert any("blocked" in r.message for r in refused)
    assert all(isinstance(r, ResourceExhausted) and "blocked" in r.message for r in later)
