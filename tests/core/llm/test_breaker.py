"""The circuit breaker on its own (hand-moved clock), and through the gateway:
a dead deployment's breaker opens, ListModels shows it, and it recovers."""

from __future__ import annotations

import pytest
from llm_helpers import FakeClock, chat_config, deployment, user

from kernelmesh.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from kernelmesh.core.llm import BreakerConfig, BreakerState
from kernelmesh.core.llm.breaker import CircuitBreaker

CONFIG = BreakerConfig(failure_threshold=3, recovery_timeout_s=30, success_threshold=2)


def opened(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(CONFIG, clock=clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    return breaker


def test_opens_after_failure_threshold_consecutive_failures(clock):
    breaker = CircuitBreaker(CONFIG, clock=clock)
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED

    breaker.allow()
    breaker.record_failure()

    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == 30


def test_a_success_resets_the_failure_count(clock):
    breaker = CircuitBreaker(CONFIG, clock=clock)
    for outcome in ["fail", "fail", "ok", "fail", "fail"]:
        breaker.allow()
        breaker.record_failure() if outcome == "fail" else breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_after_recovery_timeout_admits_one_probe_at_a_time(clock):
    breaker = opened(clock)
    clock.advance(29.9)
    assert not breaker.allow()

    clock.advance(0.1)

    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # the probe is still in flight


def test_success_threshold_probes_close_it(clock):
    breaker = opened(clock)
    clock.advance(30)
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.HALF_OPEN

    assert breaker.allow()
    breaker.record_success()

    assert breaker.state is BreakerState.CLOSED


def test_a_failed_probe_reopens_for_another_recovery_timeout(clock):
    breaker = opened(clock)
    clock.advance(30)
    breaker.allow()

    breaker.record_failure()

    assert breaker.state is BreakerState.OPEN
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


def test_a_released_probe_frees_the_slot_without_verdict(clock):
    breaker = opened(clock)
    clock.advance(30)
    breaker.allow()

    breaker.release()

    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()


def test_a_call_admitted_before_the_breaker_opened_cannot_free_the_probe_slot(clock):
    breaker = CircuitBreaker(CONFIG, clock=clock)
    late = breaker.allow()  # still in flight while other calls open the breaker
    for _ in range(3):
        breaker.record_failure(breaker.allow())
    clock.advance(30)
    probe = breaker.allow()
    assert probe

    breaker.release(late)  # the old call is cancelled: says nothing about the probe

    assert not breaker.allow()  # the probe is still in flight
    breaker.record_success(probe)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_late_success_from_before_the_breaker_opened_is_not_a_probe(clock):
    breaker = CircuitBreaker(CONFIG, clock=clock)
    late = breaker.allow()
    for _ in range(3):
        breaker.record_failure(breaker.allow())
    clock.advance(30)
    probe = breaker.allow()

    breaker.record_success(late)
    breaker.record_success(probe)

    # success_threshold is 2: only one probe has succeeded.
    assert breaker.state is BreakerState.HALF_OPEN


async def test_dead_deployment_breaker_opens_fails_over_and_recovers(
    upstream, upstream2, make_gateway, clock
):
    config = chat_config(
        deployment("primary", upstream, max_retries=0),
        deployment("secondary", upstream2),
        breaker={"failure_threshold": 2, "recovery_timeout_s": 10, "success_threshold": 1},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.fail_with(500, times=2)

    for _ in range(2):
        assert (await gateway.generate("acme", "chat", user("hi"))).deployment == "secondary"
    [chat] = [m for m in gateway.models() if m.name == "chat"]
    assert [(d.name, d.breaker, d.healthy) for d in chat.deployments] == [
        ("primary", BreakerState.OPEN, False),
        ("secondary", BreakerState.CLOSED, True),
    ]

    # Open: the primary is skipped without a request.
    await gateway.generate("acme", "chat", user("hi"))
    assert upstream.requests == 2

    clock.advance(10)
    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "primary"
    assert upstream.requests == 3
    [chat] = [m for m in gateway.models() if m.name == "chat"]
    assert chat.deployments[0].breaker is BreakerState.CLOSED


async def test_open_breakers_everywhere_are_unavailable(upstream, make_gateway, clock):
    config = chat_config(
        deployment("primary", upstream, max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 10},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.fail_with(500, times=1)
    with pytest.raises(Unavailable, match="primary: HTTP 500"):
        await gateway.generate("acme", "chat", user("hi"))

    with pytest.raises(Unavailable, match=r"primary: circuit breaker open, next probe in 10\.0s"):
        await gateway.generate("acme", "chat", user("hi"))

    assert upstream.requests == 1


async def test_killed_deployment_fails_over_opens_and_recovers_when_back(
    upstream, upstream2, make_gateway, clock
):
    config = chat_config(
        deployment("primary", upstream, max_retries=0),
        deployment("secondary", upstream2),
        breaker={"failure_threshold": 2, "recovery_timeout_s": 30, "success_threshold": 2},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.down()

    for _ in range(3):
        assert (await gateway.generate("acme", "chat", user("hi"))).deployment == "secondary"
    assert gateway.models()[0].deployments[0].breaker is BreakerState.OPEN

    await upstream.up()
    clock.advance(30)
    assert gateway.models()[0].deployments[0].breaker is BreakerState.HALF_OPEN
    for _ in range(2):
        assert (await gateway.generate("acme", "chat", user("hi"))).deployment == "primary"

    assert gateway.models()[0].deployments[0].breaker is BreakerState.CLOSED


async def test_throttling_is_not_a_breaker_failure_and_its_retry_after_works(
    upstream, make_gateway, clock
):
    # A 429 says the upstream is alive: however many, the breaker stays
    # closed, so the call made after the Retry-After reaches the upstream.
    config = chat_config(
        deployment("primary", upstream, max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 30},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.fail_with(429, times=3, retry_after=1)
    for _ in range(3):
        with pytest.raises(ResourceExhausted) as caught:
            await gateway.generate("acme", "chat", user("hi"))
        assert caught.value.retry_after == 1

    assert gateway.models()[0].deployments[0].breaker is BreakerState.CLOSED
    clock.advance(1.1)
    assert (await gateway.generate("acme", "chat", user("hi"))).text == "echo hi"
    assert upstream.requests == 4


async def test_a_misconfigured_deployment_is_not_a_breaker_failure(upstream, make_gateway, clock):
    # 401/403/404 say the deployment's configuration is wrong, not that the
    # upstream is down: the caller keeps getting the cause, never "breaker open".
    config = chat_config(
        deployment("primary", upstream, max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 30},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.fail_with(401, times=3)
    for _ in range(3):
        with pytest.raises(FailedPrecondition, match="HTTP 401"):
            await gateway.generate("acme", "chat", user("hi"))

    [status] = gateway.models()[0].deployments
    assert status.breaker is BreakerState.CLOSED
    assert not status.healthy and "HTTP 401" in status.reason
    await gateway.generate("acme", "chat", user("hi"))
    [status] = gateway.models()[0].deployments
    assert status.healthy and status.reason == ""


async def test_an_impatient_caller_does_not_open_the_breaker(upstream, make_gateway, clock):
    # A window cut short by the caller's own deadline says nothing against a
    # slow but healthy upstream; only the deployment's timeout_s does.
    config = chat_config(
        deployment("primary", upstream, timeout_s=5, max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 30},
    )
    gateway = await make_gateway(config, clock=clock)
    upstream.stall(0.5)
    with pytest.raises(DeadlineExceeded):
        await gateway.generate("acme", "chat", user("hi"), timeout=0.1)

    assert gateway.models()[0].deployments[0].breaker is BreakerState.CLOSED
    upstream.stall(0)
    assert (await gateway.generate("acme", "chat", user("hi"), timeout=5)).text == "echo hi"
