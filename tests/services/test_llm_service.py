"""LLMService against an in-process server whose gateway talks to the fake
upstream (tests/llm_upstream.py) on loopback."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import rich_status, violations
from llm_setup import eventually, write_llm_config

from kernelmesh.v1 import llm_pb2, llm_pb2_grpc

USER = llm_pb2.ROLE_USER


@pytest.fixture
async def llm(llm_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{llm_server.port}") as chan:
        yield llm_pb2_grpc.LLMServiceStub(chan)


def chat(text: str, model: str = "chat", **options) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        model=model,
        messages=[llm_pb2.ChatMessage(role=USER, content=text)],
        options=llm_pb2.GenerationOptions(**options),
    )


def chat_stream(text: str, model: str = "chat", **options) -> llm_pb2.GenerateStreamRequest:
    return llm_pb2.GenerateStreamRequest(
        model=model,
        messages=[llm_pb2.ChatMessage(role=USER, content=text)],
        options=llm_pb2.GenerationOptions(**options),
    )


def tenant(name: str) -> tuple[tuple[str, str], ...]:
    return (("kernelmesh-tenant", name),)


# -- without any configuration -----------------------------------------------------


async def test_without_config_generate_explains_how_to_configure(channel):
    stub = llm_pb2_grpc.LLMServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(chat("hello"))
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "--llm-config" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.GenerateStream(chat_stream("hello")):
            pass
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_without_config_embed_works_offline_with_the_local_model(channel):
    stub = llm_pb2_grpc.LLMServiceStub(channel)
    texts = ["a cat sat on the mat", "a kitten sat on a rug", "quarterly stock market report"]
    response = await stub.Embed(llm_pb2.EmbedRequest(inputs=texts))
    vectors = np.array([e.values for e in response.embeddings])
    assert vectors.shape[0] == 3 and vectors.shape[1] > 0
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated
    assert response.provider == "local"
    assert response.usage.prompt_tokens > 0


async def test_health_reports_llm_service_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service="kernelmesh.v1.LLMService"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# -- generation ---------------------------------------------------------------------


async def test_generate_returns_the_answer_usage_and_who_answered(llm):
    response = await llm.Generate(chat("hello world"))
    assert response.message.role == llm_pb2.ROLE_ASSISTANT
    assert response.message.content == "echo hello world"
    assert response.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert response.usage.completion_tokens == 3
    assert response.usage.total_tokens == response.usage.prompt_tokens + 3
    assert (response.provider, response.deployment, response.cached) == ("openai", "primary", False)


async def test_generate_passes_options_to_the_upstream(llm, upstream):
    response = await llm.Generate(
        chat("one two three four", max_tokens=2, temperature=0.5, top_p=0.9, stop=["x"], seed=7)
    )
    assert response.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert response.message.content == "echo one"
    sent = upstream.last_body
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (2, 0.5, 0.9)
    assert (sent["stop"], sent["seed"]) == (["x"], 7)


async def test_unset_optional_options_are_not_sent(llm, upstream):
    await llm.Generate(chat("hi"))
    assert "temperature" not in upstream.last_body
    assert "seed" not in upstream.last_body


async def test_deterministic_request_is_answered_from_the_cache(llm, upstream):
    first = await llm.Generate(chat("cache me", temperature=0))
    second = await llm.Generate(chat("cache me", temperature=0))
    assert (first.cached, second.cached) == (False, True)
    assert second.message.content == first.message.content
    assert upstream.requests == 1


async def test_unknown_role_names_the_message(llm):
    request = chat("hi")
    request.messages.add(role=llm_pb2.ROLE_UNSPECIFIED, content="?")
    request.messages.add(role=42, content="?")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Generate(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert {"messages[1].role", "messages[2].role"} <= set(violations(info.value))


async def test_out_of_range_option_names_the_field(llm):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Generate(chat("hi", temperature=5.0))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "options.temperature" in violations(info.value)


async def test_unknown_model_is_not_found(llm):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Generate(chat("hi", model="no-such-model"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_rate_limit_is_resource_exhausted_with_retry_info_per_tenant(llm):
    await llm.Generate(chat("one"), metadata=tenant("tiny"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Generate(chat("two"), metadata=tenant("tiny"))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = [
        d for d in rich_status(info.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    ]
    assert retry, "RESOURCE_EXHAUSTED carries RetryInfo"
    # Another tenant is not held back by tiny's limit.
    await llm.Generate(chat("three"), metadata=tenant("roomy"))


async def test_deadline_closes_the_upstream_request(llm, upstream):
    upstream.stall(5.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Generate(chat("slow"), timeout=0.3)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: upstream.disconnects == 1)


# -- streaming ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["chat", "ollama-chat"])
async def test_stream_delivers_tokens_then_usage_on_the_last_chunk(llm, model):
    chunks = [c async for c in llm.GenerateStream(chat_stream("a b c", model=model))]
    assert "".join(c.delta for c in chunks) == "echo a b c"
    assert len(chunks) >= 4
    last = chunks[-1]
    assert last.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert last.usage.completion_tokens == 4
    assert all(not c.HasField("usage") for c in chunks[:-1])
    assert all(c.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert last.deployment == ("primary" if model == "chat" else "ollama")


async def test_every_token_received_reaches_the_client_before_unavailable(llm, upstream):
    # The upstream sends 3 tokens and resets the connection: all 3 reach the
    # gRPC client, then UNAVAILABLE, on every run (2: the breaker opens after that).
    for _ in range(2):
        upstream.break_stream_after(3, times=1)
        call = llm.GenerateStream(chat_stream("one two three four five"))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in call:
                received.append(chunk.delta)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert received == ["echo", " one", " two"]
        assert "broke after 3 chunks" in info.value.details()


async def test_cancelled_stream_closes_the_upstream_request(llm, upstream):
    upstream.slow_stream(0.5)
    call = llm.GenerateStream(chat_stream("one two three four five"))
    first = await call.read()
    assert first.delta == "echo"
    call.cancel()
    await eventually(lambda: upstream.disconnects == 1)


async def test_stream_deadline_closes_the_upstream_request(llm, upstream):
    upstream.slow_stream(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in llm.GenerateStream(chat_stream("one two three four"), timeout=0.3):
            pass
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: upstream.disconnects == 1)


# -- embeddings and the model list --------------------------------------------------


async def test_embed_with_the_default_model_is_local(llm):
    response = await llm.Embed(llm_pb2.EmbedRequest(inputs=["hello"]))
    assert response.provider == "local"
    assert len(response.embeddings) == 1


async def test_embed_without_inputs_is_invalid_argument(llm):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.Embed(llm_pb2.EmbedRequest(model="local"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs" in violations(info.value)


async def test_list_models_pages_through_every_model(llm):
    names, token = [], ""
    while True:
        page = await llm.ListModels(llm_pb2.ListModelsRequest(page_size=1, page_token=token))
        assert len(page.models) <= 1
        names += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert sorted(names) == ["chat", "local", "ollama-chat"]


async def test_list_models_refuses_a_foreign_page_token(llm):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await llm.ListModels(llm_pb2.ListModelsRequest(page_token="nonsense"))
    assert "page_token" in violations(info.value)


async def test_list_models_shows_an_open_breaker(llm, upstream):
    upstream.fail_with(500, times=10)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await llm.Generate(chat("x"))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    response = await llm.ListModels(llm_pb2.ListModelsRequest())
    chat_model = next(m for m in response.models if m.name == "chat")
    (primary,) = chat_model.deployments
    assert (primary.name, primary.provider) == ("primary", "openai")
    assert primary.breaker_state == llm_pb2.BREAKER_STATE_OPEN
    assert not primary.healthy


async def test_concurrent_streams_each_get_their_own_answer(llm):
    async def one(i: int) -> str:
        return "".join([c.delta async for c in llm.GenerateStream(chat_stream(f"n{i}"))])

    answers = await asyncio.gather(*(one(i) for i in range(20)))
    assert answers == [f"echo n{i}" for i in range(20)]


# -- durable state -----------------------------------------------------------------


async def test_usage_survives_a_restart_with_a_state_dir(server_config, tmp_path, upstream):
    from kernelmesh.services.server import Server

    path = write_llm_config(tmp_path, upstream.openai_url, upstream.ollama_url)
    config = dataclasses.replace(
        server_config, llm_config=str(path), state_dir=str(tmp_path / "state")
    )
    seen = []
    for restart in (False, True):
        srv = Server(config)
        await srv.start()
        try:
            if not restart:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as chan:
                    stub = llm_pb2_grpc.LLMServiceStub(chan)
                    await stub.Generate(chat("count me"), metadata=tenant("acct"))
            seen.append(srv.llm.usage("acct"))
        finally:
            await srv.stop(grace=1.0)
    # In the state store itself (migration 5), not a usage.sqlite of its own.
    assert (tmp_path / "state" / "state.sqlite").is_file()
    assert not (tmp_path / "state" / "usage.sqlite").exists()
    (before,), (after,) = seen
    assert after == before
    assert after.requests == 1 and after.prompt_tokens > 0 and after.completion_tokens > 0


# -- servers with their own model lists -----------------------------------------------


async def _llm_server_with(start_server, server_config, tmp_path, upstream, models):
    path = write_llm_config(tmp_path, upstream.openai_url, upstream.ollama_url, models)
    return await start_server(dataclasses.replace(server_config, llm_config=str(path)))


async def test_a_hung_primary_fails_over_inside_the_callers_deadline(
    start_server, server_config, tmp_path, upstream
):
    # The primary's timeout_s and retries alone would outlast the caller's
    # 3 s; the attempts are sized to the deadline, so the secondary answers.
    failover = {
        "kind": "chat",
        "deployments": [
            {
                "name": "hung",
                "provider": "openai",
                "base_url": upstream.openai_url,
                "model": "hung-model",
                "timeout_s": 20,
                "max_retries": 2,
            },
            {
                "name": "standby",
                "provider": "openai",
                "base_url": upstream.openai_url,
                "model": "fake-model",
            },
        ],
    }
    srv = await _llm_server_with(
        start_server, server_config, tmp_path, upstream, {"failover": failover}
    )
    upstream.stall(30, model="hung-model")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as chan:
        stub = llm_pb2_grpc.LLMServiceStub(chan)
        response = await stub.Generate(chat("hi", model="failover"), timeout=3.0)
        assert response.deployment == "standby"
        chunks = [
            c async for c in stub.GenerateStream(chat_stream("hi", model="failover"), timeout=3.0)
        ]
        assert chunks[-1].deployment == "standby"


async def test_list_models_names_a_missing_api_key(start_server, server_config, tmp_path, upstream):
    keyless = {
        "kind": "chat",
        "deployments": [
            {
                "name": "keyless",
                "provider": "openai",
                "base_url": upstream.openai_url,
                "model": "fake-model",
                "api_key_env": "KERNELMESH_TEST_UNSET_KEY",
            }
        ],
    }
    srv = await _llm_server_with(
        start_server, server_config, tmp_path, upstream, {"keyless": keyless}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as chan:
        stub = llm_pb2_grpc.LLMServiceStub(chan)
        response = await stub.ListModels(llm_pb2.ListModelsRequest())
        [model] = [m for m in response.models if m.name == "keyless"]
        [status] = model.deployments
        assert not status.healthy
        assert "KERNELMESH_TEST_UNSET_KEY" in status.unhealthy_reason
        for _ in range(4):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(chat("hi", model="keyless"))
            assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "KERNELMESH_TEST_UNSET_KEY" in info.value.details()
