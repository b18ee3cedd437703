"""The OpenAI-compatible HTTP facade, driven by the official `openai` SDK (and
raw aiohttp where the SDK hides the wire), against an in-process server whose
gateway talks to the fake upstream."""

from __future__ import annotations

import contextlib
import json
import logging

import aiohttp
import numpy as np
import openai
import pytest
from aiohttp import web
from llm_setup import eventually

HELLO = [{"role": "user", "content": "hello world"}]


def sdk(server, api_key: str = "acme", **kw) -> openai.AsyncOpenAI:
    # max_retries=0: the SDK would otherwise retry 429s and 5xx by itself.
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=api_key, max_retries=0, **kw
    )


@pytest.fixture
async def client(llm_server):
    async with sdk(llm_server) as c:
        yield c


async def test_chat_completion(client):
    raw = await client.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "echo hello world"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3
    assert raw.headers["x-kernelmesh-deployment"] == "primary"
    assert raw.headers["x-kernelmesh-cache"] == "miss"


async def test_chat_options_reach_the_upstream(client, upstream):
    reply = await client.chat.completions.create(
        model="chat",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
        ],
        max_tokens=2,
        temperature=0.2,
        stop="zzz",
        seed=3,
    )
    assert reply.choices[0].finish_reason == "length"
    sent = upstream.last_body
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["seed"]) == (
        2,
        0.2,
        ["zzz"],
        3,
    )


async def test_stream_with_include_usage(client):
    stream = await client.chat.completions.create(
        model="chat", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    # The usage chunk comes last, with no choices; no other chunk has usage.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(client):
    stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_stream_that_breaks_mid_way_raises_in_the_sdk(client, upstream):
    upstream.break_stream_after(2)
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="broke after"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received and received[0] == "echo"


async def test_deterministic_request_is_a_cache_hit(client, upstream):
    for expected in ("miss", "hit"):
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=HELLO, temperature=0
        )
        assert raw.headers["x-kernelmesh-cache"] == expected
    assert upstream.requests == 1


async def test_embeddings_base64_default_and_float(client):
    texts = ["a cat sat on the mat", "a kitten sat on a rug", "quarterly stock market report"]
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = await client.embeddings.create(model="local", input=texts)
    floats = await client.embeddings.create(model="local", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a[0] @ a[1] > a[0] @ a[2]
    assert [d.index for d in default.data] == [0, 1, 2]
    assert default.usage.prompt_tokens > 0


async def test_embeddings_of_one_string(client):
    reply = await client.embeddings.create(model="local", input="hello", encoding_format="float")
    assert len(reply.data) == 1


async def test_models_lists_configured_models_with_deployments(client):
    models = {m.id: m async for m in client.models.list()}
    assert set(models) == {"chat", "ollama-chat", "local"}
    assert models["chat"].deployments[0]["breaker"] == "closed"
    one = await client.models.retrieve("ollama-chat")
    assert one.kind == "chat"


async def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert info.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_stream_refused_before_its_first_token_gets_a_real_status(client):
    # Headers wait for the first chunk, so an early failure is an HTTP error,
    # not a 200 with an error event.
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)


async def test_rate_limit_is_429_with_retry_after(llm_server):
    # The bearer token names the tenant until API keys exist.
    async with sdk(llm_server, api_key="tiny") as tiny:
        await tiny.chat.completions.create(model="chat", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as info:
            await tiny.chat.completions.create(model="chat", messages=HELLO)
    headers = info.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert int(headers["retry-after-ms"]) > 0
    assert info.value.body["type"] == "rate_limit_error"


async def test_tenant_header_takes_precedence_over_the_bearer_token(llm_server):
    async with sdk(
        llm_server, api_key="roomy", default_headers={"X-Kernelmesh-Tenant": "tiny"}
    ) as c:
        await c.chat.completions.create(model="chat", messages=HELLO)
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="chat", messages=HELLO)


async def test_invalid_request_is_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="chat", messages=[{"role": "wizard", "content": "hi"}]
        )
    assert info.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="chat", messages=HELLO, temperature=9)
    # Core's "options.temperature" is the JSON field "temperature" here.
    assert info.value.body["param"] == "temperature"


async def test_upstream_failures_are_503(client, upstream):
    upstream.fail_with(500, times=1)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="chat", messages=HELLO)
    assert info.value.status_code == 503


async def test_client_disconnect_closes_the_upstream_stream(llm_server, upstream):
    upstream.slow_stream(0.5)
    url = f"http://127.0.0.1:{llm_server.http_port}/v1/chat/completions"
    body = {"model": "chat", "messages": HELLO, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body)
        line = await response.content.readline()
        assert json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == "echo"
        response.close()  # drop the connection mid-stream
    await eventually(lambda: upstream.disconnects == 1)


async def test_malformed_json_is_400(llm_server):
    url = f"http://127.0.0.1:{llm_server.http_port}/v1/chat/completions"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "body"


async def test_without_config_chat_is_400_and_embeddings_work(server):
    async with sdk(server) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert "--llm-config" in info.value.body["message"]
        reply = await c.embeddings.create(model="local", input=["offline"])
        assert len(reply.data[0].embedding) > 0


async def test_throttled_upstream_does_not_open_the_breaker(client, upstream):
    # The breaker opens after 2 failures in this config; 429s are not failures,
    # so the call made after the Retry-After reaches the (now healthy) upstream.
    upstream.fail_with(429, times=3, retry_after=1)
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="chat", messages=HELLO)
        assert info.value.response.headers["retry-after"] == "1"

    reply = await client.chat.completions.create(model="chat", messages=HELLO)

    assert reply.choices[0].message.content == "echo hello world"


async def test_a_client_gone_before_done_is_not_an_error(llm_server, monkeypatch, caplog):
    # What aiohttp raises when the client closed the connection after the last
    # token, just before [DONE] is written (a race, forced here).
    write = web.StreamResponse.write

    async def closing_on_done(self, data):
        # Only the facade's answers: the fake upstream is aiohttp too.
        if data == b"data: [DONE]\n\n" and self._req.url.port == llm_server.http_port:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        return await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", closing_on_done)
    url = f"http://127.0.0.1:{llm_server.http_port}/v1/chat/completions"
    body = {"model": "chat", "messages": HELLO, "stream": True}
    with caplog.at_level("DEBUG", logger="kernelmesh.services.openai_facade"):
        lines = []
        # Before the fix the facade wrote an HTTP 500 into the event stream.
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
                async for line in resp.content:
                    if line.strip():
                        lines.append(line)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    # Every token event arrived intact; only [DONE] was lost with the client.
    assert b"[DONE]" not in b"".join(lines) and len(lines) >= 3
