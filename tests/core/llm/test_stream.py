"""Streaming through the gateway: SSE and NDJSON, usage on the last chunk,
failover before the first token, errors (never silent truncation) after it,
and cancellation reaching the upstream."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from llm_helpers import chat_config, deployment, user

from kernelmesh.core.errors import Unavailable
from kernelmesh.core.llm import BreakerState, FinishReason, GenerationOptions, Usage


async def collect(stream):
    return [chunk async for chunk in stream]


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def test_openai_stream_yields_tokens_then_usage_on_the_last_chunk(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))

    chunks = await collect(gateway.stream("acme", "chat", user("one two three")))

    assert [c.delta for c in chunks] == ["echo", " one", " two", " three", ""]
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].usage == Usage(3, 4, 7)
    assert {(c.provider, c.deployment) for c in chunks} == {("openai", "primary")}
    assert upstream.last_body["stream_options"] == {"include_usage": True}


async def test_ollama_ndjson_stream_and_generate(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("local-llama", upstream, "ollama")))

    chunks = await collect(
        gateway.stream("acme", "chat", user("a b c"), GenerationOptions(max_tokens=2))
    )
    completion = await gateway.generate("acme", "chat", user("a b c"))

    assert "".join(c.delta for c in chunks) == "echo a"
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage == Usage(3, 2, 5)
    assert upstream.paths["/api/chat"] == 2
    assert completion.text == "echo a b c"
    assert completion.provider == "ollama"
    assert completion.usage == Usage(3, 4, 7)


async def test_stream_fails_over_before_the_first_token(upstream, upstream2, make_gateway):
    gateway = await make_gateway(
        chat_config(
            deployment("primary", upstream, max_retries=1), deployment("secondary", upstream2)
        )
    )
    upstream.fail_with(500, times=10)

    chunks = await collect(gateway.stream("acme", "chat", user("hi")))

    assert "".join(c.delta for c in chunks) == "second upstream answers"
    assert chunks[-1].deployment == "secondary"
    assert upstream.requests == 2


async def test_stream_broken_before_any_token_is_retried(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    upstream.break_stream_after(0, times=1)

    chunks = await collect(gateway.stream("acme", "chat", user("hi")))

    assert "".join(c.delta for c in chunks) == "echo hi"
    assert upstream.requests == 2


async def test_stream_broken_midway_raises_after_the_delivered_chunks(
    upstream, upstream2, make_gateway
):
    gateway = await make_gateway(
        chat_config(deployment("primary", upstream), deployment("secondary", upstream2))
    )
    upstream.break_stream_after(2)
    received = []

    with pytest.raises(Unavailable, match="stream from primary broke after 2 chunks"):
        async for chunk in gateway.stream("acme", "chat", user("one two three four")):
            received.append(chunk.delta)

    assert received == ["echo", " one"]
    assert upstream2.requests == 0  # text was delivered: no failover


@pytest.mark.parametrize("provider", ["openai", "ollama"])
async def test_cancelling_the_consumer_closes_the_upstream_request(
    upstream, make_gateway, provider
):
    gateway = await make_gateway(chat_config(deployment("primary", upstream, provider)))
    upstream.slow_stream(0.2)
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for _ in gateway.stream("acme", "chat", user("one two three four five")):
            first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_for(lambda: upstream.disconnects == 1)


@pytest.mark.parametrize("provider", ["openai", "ollama"])
async def test_closing_the_stream_early_closes_the_upstream_request(
    upstream, make_gateway, provider
):
    gateway = await make_gateway(chat_config(deployment("primary", upstream, provider)))
    upstream.slow_stream(0.2)

    stream = gateway.stream("acme", "chat", user("one two three four five"))
    first = await anext(stream)
    await stream.aclose()

    assert first.delta == "echo"
    await wait_for(lambda: upstream.disconnects == 1)


async def test_cancelling_a_unary_call_closes_the_upstream_request(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    upstream.stall(5)

    task = asyncio.create_task(gateway.generate("acme", "chat", user("hi")))
    await wait_for(lambda: upstream.requests == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await wait_for(lambda: upstream.disconnects == 1)


async def test_cached_stream_is_one_text_chunk_and_a_last_chunk(upstream, make_gateway):
    gateway = await make_gateway(chat_config(deployment("primary", upstream)))
    options = GenerationOptions(temperature=0)

    live = await collect(gateway.stream("acme", "chat", user("one two"), options))
    cached = await collect(gateway.stream("acme", "chat", user("one two"), options))

    assert upstream.requests == 1
    assert [c.delta for c in cached] == ["echo one two", ""]
    assert all(c.cached for c in cached)
    assert cached[-1].usage == live[-1].usage
    assert cached[-1].finish_reason is FinishReason.STOP


async def test_a_broken_stream_is_charged_for_what_it_delivered(upstream, make_gateway):
    config = chat_config(deployment("primary", upstream), tenants={"acme": {"token_budget": 1000}})
    gateway = await make_gateway(config)
    upstream.break_stream_after(2)

    with pytest.raises(Unavailable):
        await collect(gateway.stream("acme", "chat", user("one two three four")))

    [record] = gateway.usage("acme")
    assert record.requests == 1
    assert record.completion_tokens >= 1  # estimated: the upstream never said
    assert gateway._budget.spent("acme") == record.total_tokens


async def raw_sse_server(body: bytes, piece: int = 7) -> TestServer:
    """An upstream answering every chat completion with `body`, written in
    `piece`-byte writes so events and lines straddle chunks."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(body), piece):
            await response.write(body[i : i + piece])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def _event(delta: str | None, finish: str | None = None) -> str:
    choice = {"index": 0, "delta": {} if delta is None else {"content": delta}}
    return json.dumps({"choices": [{**choice, "finish_reason": finish}]})


async def test_sse_comments_crlf_and_data_without_a_space(make_gateway):
    body = (
        ": keep-alive\r\n\r\n"
        f"data:{_event('he')}\r\n\r\n"
        "event: message\r\n"
        f"data: {_event('llo')}\r\n\r\n"
        ":\r\n\r\n"
        f"data: {_event(None, 'stop')}\r\n\r\n"
        'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}\r\n\r\n'
        "data: [DONE]\r\n\r\n"
    ).encode()
    server = await raw_sse_server(body)
    try:
        config = chat_config({**RAW, "base_url": str(server.make_url("/v1"))})
        gateway = await make_gateway(config)

        chunks = await collect(gateway.stream("acme", "chat", user("hi")))
    finally:
        await server.close()

    assert [c.delta for c in chunks] == ["he", "llo", ""]
    assert chunks[-1].usage == Usage(2, 2, 4)


async def test_a_non_object_sse_event_is_an_upstream_failure(make_gateway):
    server = await raw_sse_server(b"data: null\n\ndata: [DONE]\n\n")
    try:
        config = chat_config({**RAW, "base_url": str(server.make_url("/v1"))})
        gateway = await make_gateway(config)

        with pytest.raises(Unavailable, match="every deployment failed"):
            await collect(gateway.stream("acme", "chat", user("hi")))
    finally:
        await server.close()

    [chat] = [m for m in gateway.models() if m.name == "chat"]
    assert chat.deployments[0].breaker is BreakerState.CLOSED  # one failure, threshold 5
    assert gateway._models["chat"].deployments[0].breaker._failures == 1


RAW = {"name": "raw", "provider": "openai", "model": "m", "timeout_s": 2.0, "max_retries": 0}
