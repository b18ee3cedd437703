"""Generation through the gateway against a fake OpenAI upstream: failover
order, retries, Retry-After, non-retryable errors and the cache."""

from __future__ import annotations

import time

import pytest
from llm_helpers import chat_config, deployment, user

from kernelmesh.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from kernelmesh.core.llm import FinishReason, Gateway, GenerationOptions, Message, Role


async def test_generate_returns_text_usage_and_the_answering_deployment(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))

    completion = await gateway.generate("acme", "chat", user("hello there"))

    assert completion.text == "echo hello there"
    assert completion.finish_reason is FinishReason.STOP
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 5
    assert (completion.provider, completion.deployment, completion.cached) == (
        "openai",
        "primary",
        False,
    )


async def test_options_reach_the_upstream(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    options = GenerationOptions(temperature=0.5, top_p=0.9, max_tokens=2, stop=("x",), seed=7)

    completion = await gateway.generate("acme", "chat", user("one two three"), options)

    body = upstream.last_body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.5, 0.9, 2)
    assert (body["stop"], body["seed"], body["model"]) == (["x"], 7, "fake-model")
    assert completion.finish_reason is FinishReason.LENGTH
    assert completion.text == "echo one"


async def test_max_tokens_zero_uses_the_deployment_default(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    await gateway.generate("acme", "chat", user("hi"))
    assert upstream.last_body["max_tokens"] == 64


async def test_api_key_comes_from_the_named_environment_variable(
    upstream, make_gateway, monkeypatch
):
    monkeypatch.setenv("FAKE_LLM_KEY", "secret-value")
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream, api_key_env="FAKE_LLM_KEY"))
    )
    await gateway.generate("acme", "chat", user("hi"))
    assert upstream.last_headers["Authorization"] == "Bearer secret-value"


async def test_server_errors_are_retried_max_retries_times(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream, max_retries=2)))
    upstream.fail_with(500, times=2)

    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.text == "echo hi"
    assert upstream.requests == 3


async def test_failover_follows_the_configured_order(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=1),
            deployment("secondary", upstream2),
        )
    )
    upstream.fail_with(503, times=100)

    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "secondary"
    assert completion.text == "second upstream answers"
    assert upstream.requests == 2  # one try + one retry, then failover
    assert upstream2.requests == 1


async def test_bad_request_is_neither_retried_nor_failed_over(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream), deployment("secondary", upstream2))
    )
    upstream.fail_with(400, times=10)

    with pytest.raises(InvalidArgument, match="injected failure 400"):
        await gateway.generate("acme", "chat", user("hi"))

    assert upstream.requests == 1
    assert upstream2.requests == 0


async def test_auth_failure_fails_over_without_retrying(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream), deployment("secondary", upstream2))
    )
    upstream.fail_with(401, times=10)

    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "secondary"
    assert upstream.requests == 1


async def test_every_deployment_misconfigured_is_a_failed_precondition(upstream, make_gateway):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream, api_key_env="KERNELMESH_UNSET_KEY_VAR"))
    )
    with pytest.raises(FailedPrecondition, match="KERNELMESH_UNSET_KEY_VAR"):
        await gateway.generate("acme", "chat", user("hi"))
    assert upstream.requests == 0


async def test_rate_limited_upstream_is_retried_after_its_retry_after(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    upstream.fail_with(429, times=1, retry_after=0.3)

    started = time.monotonic()
    completion = await gateway.generate("acme", "chat", user("hi"))

    assert time.monotonic() - started >= 0.3
    assert completion.text == "echo hi"
    assert upstream.requests == 2


async def test_retry_after_beyond_the_cap_fails_over_at_once(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream), deployment("secondary", upstream2))
    )
    upstream.fail_with(429, times=1, retry_after=60)

    started = time.monotonic()
    completion = await gateway.generate("acme", "chat", user("hi"))

    # At once: far short of the 60 s it was asked to wait (a loaded machine may
    # take a second or more over the two local calls).
    assert time.monotonic() - started < 10.0
    assert completion.deployment == "secondary"


async def test_every_deployment_throttling_is_resource_exhausted_with_the_soonest_retry(
    upstream, upstream2, make_gateway
):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=0),
            deployment("secondary", upstream2, max_retries=0),
        )
    )
    upstream.fail_with(429, times=5, retry_after=90)
    upstream2.fail_with(429, times=5, retry_after=45)

    with pytest.raises(ResourceExhausted) as caught:
        await gateway.generate("acme", "chat", user("hi"))

    assert caught.value.retry_after == 45
    assert "primary: HTTP 429" in caught.value.message
    assert "secondary: HTTP 429" in caught.value.message


async def test_throttling_mixed_with_other_failures_is_unavailable(
    upstream, upstream2, make_gateway
):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=0),
            deployment("secondary", upstream2, max_retries=0),
        )
    )
    upstream.fail_with(429, times=5, retry_after=90)
    upstream2.fail_with(503, times=5)

    with pytest.raises(Unavailable):
        await gateway.generate("acme", "chat", user("hi"))


async def test_all_deployments_failing_is_unavailable_naming_each(upstream, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=0),
            deployment("secondary", upstream, max_retries=0),
        )
    )
    upstream.fail_with(502, times=10)

    with pytest.raises(Unavailable) as caught:
        await gateway.generate("acme", "chat", user("hi"))

    assert "primary: HTTP 502" in caught.value.message
    assert "secondary: HTTP 502" in caught.value.message


async def test_a_stalled_upstream_times_out_and_fails_over(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, timeout_s=0.1, max_retries=0),
            deployment("secondary", upstream2),
        )
    )
    upstream.stall(2)

    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "secondary"


async def test_a_dead_upstream_fails_over(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=1), deployment("secondary", upstream2)
        )
    )
    await gateway.generate("acme", "chat", user("warm the connection pool"))
    upstream.down()

    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "secondary"


async def test_deterministic_requests_are_served_from_the_cache(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    options = GenerationOptions(temperature=0)

    first = await gateway.generate("acme", "chat", user("hi"), options)
    second = await gateway.generate("acme", "chat", user("hi"), options)

    assert upstream.requests == 1
    assert (first.cached, second.cached) == (False, True)
    assert second.text == first.text
    assert second.usage == first.usage


async def test_the_cache_is_per_tenant_and_skips_sampled_requests(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))

    await gateway.generate("acme", "chat", user("hi"), GenerationOptions(seed=1))
    other = await gateway.generate("globex", "chat", user("hi"), GenerationOptions(seed=1))
    await gateway.generate("acme", "chat", user("hi"), GenerationOptions(temperature=0.7))
    await gateway.generate("acme", "chat", user("hi"), GenerationOptions(temperature=0.7))

    assert other.cached is False
    assert upstream.requests == 4


async def test_usage_and_cost_are_recorded_per_tenant_model_and_provider(upstream, make_gateway):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream, input_cost_per_1k=1.0, output_cost_per_1k=2.0))
    )
    await gateway.generate("acme", "chat", user("hello there"))  # 2 prompt, 3 completion
    await gateway.generate("acme", "chat", user("hi"))  # 1 prompt, 2 completion

    [record] = gateway.usage("acme")

    assert (record.tenant, record.model, record.provider) == ("acme", "chat", "openai")
    assert (record.requests, record.prompt_tokens, record.completion_tokens) == (2, 3, 5)
    assert record.cost == pytest.approx((3 * 1.0 + 5 * 2.0) / 1000)
    assert gateway.usage("globex") == []


async def test_unknown_model_is_not_found(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    with pytest.raises(NotFound, match="'gpt-9' is not configured; configured: chat, local"):
        await gateway.generate("acme", "gpt-9", user("hi"))


async def test_invalid_requests_name_their_fields(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    bad = GenerationOptions(temperature=3.0, top_p=0.0, max_tokens=-1)

    with pytest.raises(InvalidArgument) as caught:
        await gateway.generate("acme", "chat", [], bad)

    fields = {v.field for v in caught.value.violations}
    assert fields == {"messages", "options.temperature", "options.top_p", "options.max_tokens"}
    assert upstream.requests == 0


async def test_generation_without_a_chat_model_explains_how_to_configure_one():
    gateway = Gateway.from_file(None)
    try:
        with pytest.raises(FailedPrecondition) as caught:
            await gateway.generate("acme", "anything", [Message(Role.USER, "hi")])
    finally:
        await gateway.close()
    message = caught.value.message
    assert "kernelmesh serve --llm-config" in message
    assert "api_key_env" in message
    assert "deployments:" in message


# -- attempts sized to the caller's deadline -------------------------------------------


async def test_a_hung_primary_fails_over_within_the_callers_deadline(
    upstream, upstream2, make_gateway
):
    # The primary's own timeout (20 s) and retries would outlast the caller:
    # its attempts get a share of the caller's 2 s, leaving the rest to the secondary.
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, timeout_s=20, max_retries=2),
            deployment("secondary", upstream2),
        )
    )
    upstream.stall(30)

    started = time.monotonic()
    completion = await gateway.generate("acme", "chat", user("hi"), timeout=2.0)

    assert completion.deployment == "secondary"
    assert time.monotonic() - started < 2.0


async def test_a_hung_primary_stream_fails_over_within_the_callers_deadline(
    upstream, upstream2, make_gateway
):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, timeout_s=20), deployment("secondary", upstream2)
        )
    )
    upstream.stall(30)

    chunks = [c async for c in gateway.stream("acme", "chat", user("hi"), timeout=2.0)]

    assert chunks[-1].deployment == "secondary"


def test_default_attempts_fail_over_well_inside_the_clients_30_s_deadline():
    from kernelmesh.core.llm import DeploymentConfig, ProviderKind
    from kernelmesh.core.llm.retry import deployment_window

    default = DeploymentConfig(name="d", provider=ProviderKind.OPENAI)
    # Two deployments under the Python client's default 30 s deadline: the
    # primary gets at most half, the secondary the rest.
    assert deployment_window(30.0, 2, default.timeout_s) <= 15.0
    # No deadline (an HTTP caller): the deployment's own timeout, which bounds
    # its retries too, short enough that a failover still fits in 30 s.
    assert deployment_window(None, 2, default.timeout_s) == default.timeout_s <= 15.0
    assert deployment_window(30.0, 1, default.timeout_s) == default.timeout_s


# -- a missing API key is reported at start ---------------------------------------------


async def test_a_missing_api_key_variable_is_reported_at_start(upstream, make_gateway, caplog):
    config = chat_config(
        deployment("primary", upstream, api_key_env="KERNELMESH_UNSET_KEY_VAR", max_retries=0),
        breaker={"failure_threshold": 1, "recovery_timeout_s": 30},
    )

    with caplog.at_level("WARNING", logger="kernelmesh.core.llm.gateway"):
        gateway = await make_gateway(config)
    assert any("KERNELMESH_UNSET_KEY_VAR" in r.getMessage() for r in caplog.records)

    [status] = gateway.models()[0].deployments
    assert not status.healthy
    assert "KERNELMESH_UNSET_KEY_VAR" in status.reason
    # Every call names the cause; it never turns into "circuit breaker open".
    for _ in range(4):
        with pytest.raises(FailedPrecondition, match="KERNELMESH_UNSET_KEY_VAR"):
            await gateway.generate("acme", "chat", user("hi"))
    assert upstream.requests == 0


PRIMARY_TIMEOUT_S = 1.5


async def test_a_deployments_timeout_bounds_its_retries_too(upstream, upstream2, make_gateway):
    # No caller deadline: timeout_s is the most one deployment may hold the
    # request, retries included, so a hung one costs one timeout, not three.
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, timeout_s=PRIMARY_TIMEOUT_S, max_retries=2),
            deployment("secondary", upstream2),
        )
    )
    upstream.stall(30)

    started = time.monotonic()
    completion = await gateway.generate("acme", "chat", user("hi"))

    assert completion.deployment == "secondary"
    # Under two timeouts: one, and the secondary's answer (given as much again,
    # for a loaded machine; 0.4 s and < 0.8 s left it 0.4 s).
    assert time.monotonic() - started < 2 * PRIMARY_TIMEOUT_S
