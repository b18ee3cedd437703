"""The offline embedding model: works with no configuration and no network,
returns unit vectors whose similarities make sense."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from llm_helpers import deployment

from kernelmesh.core.errors import InvalidArgument, NotFound
from kernelmesh.core.llm import Gateway, parse_config
from kernelmesh.core.llm.providers.local import WordLlamaEmbedder


@pytest.fixture
async def gateway():
    gateway = Gateway.from_file(None)
    await gateway.start()
    yield gateway
    await gateway.close()


async def test_local_vectors_are_normalised_and_related_sentences_are_closer(gateway):
    result = await gateway.embed(
        "acme",
        "",
        [
            "The cat sat on the mat.",
            "A kitten is sleeping on the rug.",
            "Quarterly tax returns are due in April.",
        ],
    )

    vectors = np.array(result.vectors)
    assert vectors.shape == (3, 256)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1
    assert similarity[0, 1] > similarity[1, 2] + 0.1
    assert (result.provider, result.deployment) == ("local", "local")
    assert result.usage.prompt_tokens == result.usage.total_tokens > 10


async def test_local_embeddings_record_usage(gateway):
    await gateway.embed("acme", "local", ["hello world"])
    [record] = gateway.usage("acme")
    assert (record.model, record.provider, record.requests, record.cost) == (
        "local",
        "local",
        1,
        0.0,
    )


def test_loading_the_model_touches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the local embedding model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)

    embedder = WordLlamaEmbedder()
    vectors, tokens = embedder.embed(["offline works"])

    assert vectors.shape == (1, 256)
    assert tokens > 0


async def test_embed_validates_inputs_and_models(gateway):
    with pytest.raises(InvalidArgument) as caught:
        await gateway.embed("acme", "", ["fine", "  "])
    assert [v.field for v in caught.value.violations] == ["inputs[1]"]
    with pytest.raises(InvalidArgument, match="inputs"):
        await gateway.embed("acme", "", [])
    with pytest.raises(NotFound, match="'ada' is not configured"):
        await gateway.embed("acme", "ada", ["x"])


async def test_remote_embedding_models_use_openai_and_ollama(upstream, make_gateway):
    config = parse_config(
        {
            "models": {
                "oa": {"kind": "embedding", "deployments": [deployment("oa", upstream)]},
                "ol": {
                    "kind": "embedding",
                    "deployments": [deployment("ol", upstream, "ollama")],
                },
            }
        }
    )
    gateway = await make_gateway(config)

    via_openai = await gateway.embed("acme", "oa", ["a b", "c"])
    via_ollama = await gateway.embed("acme", "ol", ["a b", "c"])

    assert via_openai.vectors == via_ollama.vectors
    assert len(via_openai.vectors) == 2
    assert via_openai.usage.prompt_tokens == via_ollama.usage.prompt_tokens == 3
    assert upstream.paths["/v1/embeddings"] == upstream.paths["/api/embed"] == 1
