"""`Client.llm`, `AsyncClient.llm` and `kernelmesh llm` against a real
`kernelmesh serve --llm-config` process whose deployments are the fake
upstream (tests/llm_upstream.py), plus the shared unconfigured server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import yaml
from llm_upstream import Upstream

from kernelmesh.clients import (
    CancelledError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from kernelmesh.clients.llm import ChatMessage, Generation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up, _ = Upstream.start_in_thread()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(autouse=True)
def healthy_upstream(upstream: Upstream) -> None:
    upstream.reset()


@pytest.fixture(scope="module")
def llm_served(upstream, serve_tools, tmp_path_factory):
    """A `kernelmesh serve` whose model "chat" is the fake upstream."""
    directory = tmp_path_factory.mktemp("llm-serve")
    config = {
        "models": {
            "chat": {
                "kind": "chat",
                "deployments": [
                    {
                        "name": "primary",
                        "provider": "openai",
                        "base_url": upstream.openai_url,
                        "model": "fake-model",
                        "max_retries": 0,
                    }
                ],
            }
        },
        "tenants": {"tiny": {"requests_per_minute": 1}},
        # A broken stream must not open the breaker for the tests after it.
        "breaker": {"failure_threshold": 100},
    }
    path = directory / "llm.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = serve_tools.start_serve(directory, "--llm-config", str(path), "--no-warmup")
    try:
        with Client(proc.target, timeout=10.0) as km:
            km.wait_ready(timeout=60.0, service="kernelmesh.v1.LLMService")
        yield proc
    finally:
        serve_tools.stop_serve(proc)


@pytest.fixture
def lface(llm_served, connect):
    """A client of this test's face on the LLM-configured server."""
    return connect(llm_served.target, timeout=30.0)


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kernelmesh.clients", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
        check=False,
    )


# -- both faces ----------------------------------------------------------------------


async def test_generate_returns_a_generation(lface):
    reply = await lface.llm.generate("hello there", model="chat", system="be brief")
    assert isinstance(reply, Generation)
    assert reply.text == "echo hello there"
    assert reply.finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    assert (reply.provider, reply.deployment, reply.cached) == ("openai", "primary", False)


async def test_generate_accepts_a_conversation(lface, upstream):
    await lface.llm.generate(
        [
            ChatMessage("system", "s"),
            ("user", "first"),
            {"role": "assistant", "content": "a"},
            ("user", "second"),
        ],
        model="chat",
        max_tokens=1,
    )
    assert [m["role"] for m in upstream.last_body["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]


async def test_unknown_role_is_refused_before_sending(lface, upstream):
    before = upstream.requests
    with pytest.raises(ValueError, match="unknown role"):
        await lface.llm.generate([("wizard", "hi")], model="chat")
    assert upstream.requests == before


async def test_seeded_request_comes_from_the_cache_the_second_time(lface):
    prompt = f"cached? {lface.is_async}"  # the other face's run must not warm the cache
    first = await lface.llm.generate(prompt, model="chat", seed=1)
    second = await lface.llm.generate(prompt, model="chat", seed=1)
    assert (first.cached, second.cached) == (False, True)


async def test_stream_yields_text_then_exposes_usage(lface):
    stream = lface.client.llm.stream("a b c", model="chat")
    assert stream.usage is None
    chunks = await lface.collect(stream)
    assert "".join(chunks) == "echo a b c"
    assert len(chunks) == 4
    assert stream.finish_reason == "stop"
    assert stream.usage.completion_tokens == 4
    assert stream.deployment == "primary"


async def test_stream_that_breaks_raises_after_the_delivered_text(lface, upstream):
    upstream.break_stream_after(2)
    received, error = await lface.drain(lface.client.llm.stream("one two three four", model="chat"))
    assert isinstance(error, UnavailableError)
    assert received[:1] == ["echo"]


async def test_cancelled_stream_stops_and_reaches_the_upstream(lface, upstream):
    upstream.slow_stream(0.2)
    stream = lface.client.llm.stream("w " * 50, model="chat")
    chunks = aiter(stream) if lface.is_async else iter(stream)
    assert await lface.next(chunks) == "echo"
    stream.cancel()
    received, error = await lface.drain(chunks)
    assert isinstance(error, CancelledError), error
    assert len(received) < 5
    deadline = time.monotonic() + 10
    while upstream.disconnects == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert upstream.disconnects >= 1


async def test_embed_returns_a_float32_matrix(lface):
    vectors = await lface.llm.embed(["a cat", "a dog", "tax law"])
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and vectors.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (await lface.llm.embed("one string")).shape == (1, vectors.shape[1])


async def test_models_lists_deployments_with_breaker_state(lface):
    models = {m.name: m for m in await lface.llm.models()}
    assert set(models) == {"chat", "local"}
    (primary,) = models["chat"].deployments
    assert (primary.name, primary.provider, primary.healthy, primary.breaker) == (
        "primary",
        "openai",
        True,
        "closed",
    )


async def test_errors_are_typed(lface, llm_served, connect):
    with pytest.raises(NotFoundError):
        await lface.llm.generate("x", model="nope")
    with pytest.raises(InvalidArgumentError) as info:
        await lface.llm.generate("x", model="chat", temperature=7.0)
    assert info.value.violations[0].field == "options.temperature"
    tiny = connect(llm_served.target, tenant="tiny")
    # One request a minute: whichever face ran first may have spent it.
    with pytest.raises(ResourceExhaustedError) as info:
        await tiny.llm.generate("x", model="chat")
        await tiny.llm.generate("y", model="chat")
    assert info.value.retry_delay is not None and info.value.retry_delay > 0


async def test_generate_is_not_retried_by_the_client(lface, upstream):
    upstream.fail_with(503, times=1)
    before = upstream.requests
    with pytest.raises(UnavailableError):
        await lface.llm.generate("x", model="chat")
    assert upstream.requests == before + 1


async def test_unconfigured_server_explains_and_still_embeds(served, connect):
    km = connect(served.target, timeout=30.0)
    with pytest.raises(FailedPreconditionError, match="--llm-config"):
        await km.llm.generate("hi", model="gpt-4o-mini")
    assert (await km.llm.embed(["offline works"])).shape[0] == 1


# -- the command line ------------------------------------------------------------------


def test_cli_chat_streams_the_reply_and_reports_usage(llm_served):
    done = cli("llm", "chat", "-t", llm_served.target, "--model", "chat", "hello from cli")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo hello from cli\n"
    assert "primary (openai)" in done.stderr
    assert "4 completion tokens" in done.stderr
    assert "finish stop" in done.stderr


def test_cli_chat_reads_the_prompt_from_stdin(llm_served):
    done = subprocess.run(
        [sys.executable, "-m", "kernelmesh.clients", "llm", "chat", "-t", llm_served.target,
         "-m", "chat"],
        input="piped prompt",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo piped prompt\n"


def test_cli_chat_error_exits_1_with_the_reason(llm_served):
    done = cli("llm", "chat", "-t", llm_served.target, "--model", "nope", "hi")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


def test_cli_models_and_embed(llm_served):
    models = cli("llm", "models", "-t", llm_served.target)
    assert models.returncode == 0, models.stderr
    assert "chat" in models.stdout and "breaker closed" in models.stdout
    embed = cli("llm", "embed", "-t", llm_served.target, "a cat", "a kitten")
    assert embed.returncode == 0, embed.stderr
    assert "norm 1.0000" in embed.stdout
    assert "cosine similarities" in embed.stdout
