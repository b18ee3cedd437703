"""The gateway's Prometheus metrics: refusals, failed calls by reason,
failovers, and a breaker gauge that follows the breaker without being read."""

from __future__ import annotations

import pytest
from llm_helpers import chat_config, deployment, user
from prometheus_client import REGISTRY

from kernelmesh.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from kernelmesh.core.llm import GenerationOptions


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def failed(model: str, reason: str) -> float:
    return sample("kernelmesh_llm_failed_requests_total", model=model, reason=reason)


async def test_rate_limit_and_budget_refusals_are_counted(upstream, make_gateway):
    config = chat_config(
        deployment("primary", upstream),
        tenants={
            "tiny": {"requests_per_minute": 1},
            "poor": {"token_budget": 10},
        },
    )
    gateway = await make_gateway(config)
    rejected = sample(
        "kernelmesh_llm_requests_total", model="chat", provider="", outcome="rejected"
    )
    limited, budget = failed("chat", "rate_limit"), failed("chat", "token_budget")

    await gateway.generate("tiny", "chat", user("hi"))
    with pytest.raises(ResourceExhausted):
        await gateway.generate("tiny", "chat", user("hi"))
    with pytest.raises(ResourceExhausted):
        await gateway.generate("poor", "chat", user("hi"), GenerationOptions(max_tokens=50))

    after = sample("kernelmesh_llm_requests_total", model="chat", provider="", outcome="rejected")
    assert after == rejected + 2
    assert failed("chat", "rate_limit") == limited + 1
    assert failed("chat", "token_budget") == budget + 1


async def test_failed_calls_are_counted_by_reason(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream, max_retries=0)))
    unknown, invalid = failed("", "not_found"), failed("chat", "invalid_argument")
    unavailable = failed("chat", "unavailable")

    with pytest.raises(NotFound):
        await gateway.generate("acme", "no-such-model", user("hi"))
    with pytest.raises(InvalidArgument):
        await gateway.generate("acme", "chat", user("hi"), GenerationOptions(temperature=9))
    upstream.fail_with(500, times=1)
    with pytest.raises(Unavailable):
        await gateway.generate("acme", "chat", user("hi"))
    upstream.break_stream_after(1, times=1)
    with pytest.raises(Unavailable):
        async for _ in gateway.stream("acme", "chat", user("one two three")):
            pass

    # An unknown name is not a label (callers choose it: unbounded series).
    assert failed("", "not_found") == unknown + 1
    assert failed("chat", "invalid_argument") == invalid + 1
    assert failed("chat", "unavailable") == unavailable + 2


async def test_failovers_are_counted(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("fo-primary", upstream, max_retries=0),
            deployment("fo-secondary", upstream2),
        )
    )
    before = sample("kernelmesh_llm_failovers_total", model="chat", deployment="fo-primary")
    upstream.fail_with(500, times=1)

    assert (await gateway.generate("acme", "chat", user("hi"))).deployment == "fo-secondary"

    after = sample("kernelmesh_llm_failovers_total", model="chat", deployment="fo-primary")
    assert after == before + 1


async def test_the_breaker_gauge_follows_the_cool_down_without_anyone_reading_it(
    upstream, make_gateway, clock
):
    config = chat_config(
        deployment("gauge-primary", upstream, max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 6},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.fail_with(500, times=1)
    with pytest.raises(Unavailable):
        await gateway.generate("acme", "chat", user("hi"))
    assert sample("kernelmesh_llm_breaker_state", model="chat", deployment="gauge-primary") == 1

    clock.advance(7)

    # Nothing touched the gateway since: the scrape alone sees half-open.
    assert sample("kernelmesh_llm_breaker_state", model="chat", deployment="gauge-primary") == 2
