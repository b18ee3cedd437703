"""The LLM gateway from Python: `client.llm` (blocking) and `async_client.llm`.

>>> with Client() as km:
...     reply = km.llm.generate("Say hi", model="gpt-4o-mini", temperature=0)
...     for text in (tokens := km.llm.stream("Count to 5", model="gpt-4o-mini")):
...         print(text, end="")
...     print(tokens.usage)
...     vectors = km.llm.embed(["a cat", "a dog"])   # float32 array, (2, dims)

Both faces run the same request plans (`plans`); the values they return live
in `llm_types` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import numpy as np

from kernelmesh.clients import plans
from kernelmesh.clients.llm_types import (
    ROLES,
    ChatMessage,
    Deployment,
    Generation,
    Model,
    Prompt,
    StreamState,
    Usage,
    messages,
    options,
)
from kernelmesh.clients.transport import AsyncStreaming, AsyncTransport, Streaming, Transport
from kernelmesh.v1 import llm_pb2


class TextStream(StreamState):
    """An iterator of text chunks as the model produces them. Once exhausted,
    `finish_reason`, `usage`, `provider`, `deployment` and `cached` hold the
    last chunk's values. A stream that breaks mid-way raises (UnavailableError),
    never ends quietly. `cancel()` or leaving a `with` block stops generation."""

    def __init__(self, chunks: Streaming[llm_pb2.GenerateStreamResponse]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[str]:
        return filter(None, map(self.take, self._chunks))

    @property
    def text(self) -> str:
        """Reads the rest of the stream and returns it joined."""
        return "".join(self)

    def cancel(self) -> None:
        self._chunks.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class AsyncTextStream(StreamState):
    """The asyncio twin of `TextStream`: `async for text in stream`."""

    def __init__(self, chunks: AsyncStreaming[llm_pb2.GenerateStreamResponse]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._chunks:
            if delta := self.take(chunk):
                yield delta

    def cancel(self) -> None:
        self._chunks.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class LLM:
    """`Client.llm`: generation, token streams, embeddings and the model list,
    over the client's connection (its deadline, tenant, API key and TLS)."""

    def __init__(self, transport: Transport) -> None:
        self._io = transport

    def generate(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: str | Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Generates a completion. temperature 0 or a seed makes the request
        deterministic, so the gateway may answer it from its cache."""
        request = plans.generate_request(
            prompt, model, system, temperature, top_p, max_tokens, stop, seed
        )
        return self._io.run(plans.generate(request, timeout))

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: str | Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> TextStream:
        """Streams a completion: iterate for text chunks, then read `.usage`.
        `timeout` bounds the whole stream (default: the client's timeout)."""
        request = plans.generate_request(
            prompt, model, system, temperature, top_p, max_tokens, stop, seed
        )
        return TextStream(self._io.stream(plans.generate_stream(request, timeout)))

    def embed(
        self, texts: str | Sequence[str], *, model: str = "", timeout: float | None = None
    ) -> np.ndarray:
        """Embeddings as a float32 array of shape (len(texts), dims); a single
        string counts as a list of one. model "" is the server's default (the
        offline "local" model unless configured otherwise)."""
        return self._io.run(plans.embed(texts, model, timeout))

    def models(self) -> list[Model]:
        """Every configured model with its deployments' health and breaker state."""
        return self._io.run(plans.models())


class AsyncLLM:
    """`AsyncClient.llm`: the same surface as `LLM`, awaitable."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._io = transport

    async def generate(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: str | Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Generation:
        request = plans.generate_request(
            prompt, model, system, temperature, top_p, max_tokens, stop, seed
        )
        return await self._io.run(plans.generate(request, timeout))

    def stream(
        self,
        prompt: Prompt,
        *,
        model: str = "",
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: str | Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
    ) -> AsyncTextStream:
        """`async for text in km.llm.stream(...)`; then read `.usage`."""
        request = plans.generate_request(
            prompt, model, system, temperature, top_p, max_tokens, stop, seed
        )
        return AsyncTextStream(self._io.stream(plans.generate_stream(request, timeout)))

    async def embed(
        self, texts: str | Sequence[str], *, model: str = "", timeout: float | None = None
    ) -> np.ndarray:
        return await self._io.run(plans.embed(texts, model, timeout))

    async def models(self) -> list[Model]:
        return await self._io.run(plans.models())


__all__ = [
    "LLM",
    "ROLES",
    "AsyncLLM",
    "AsyncTextStream",
    "ChatMessage",
    "Deployment",
    "Generation",
    "Model",
    "Prompt",
    "TextStream",
    "Usage",
    "messages",
    "options",
]
