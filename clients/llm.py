"""The LLM gateway from Python: `client.llm` (blocking) and `async_client.llm`.

>>> with Client() as km:
...     reply = km.llm.generate("Say hi", model="gpt-4o-mini", temperature=0)
...     for text in (tokens := km.llm.stream("Count to 5", model="gpt-4o-mini")):
...         print(text, end="")
...     print(tokens.usage)
...     vectors = km.llm.embed(["a cat", "a dog"])   # float32 array, (2, dims)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from kernelmesh.clients.errors import from_rpc_error
from kernelmesh.v1 import llm_pb2, llm_pb2_grpc

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str


# A prompt: one user message as text, or a conversation of ChatMessages,
# (role, content) pairs or OpenAI-style {"role": ..., "content": ...} dicts.
Prompt = str | Sequence[ChatMessage | tuple[str, str] | Mapping[str, str]]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_proto(cls, msg: llm_pb2.Usage) -> Usage:
        return cls(msg.prompt_tokens, msg.completion_tokens, msg.total_tokens)


@dataclass(frozen=True)
class Generation:
    """A finished completion; `provider`/`deployment` say who answered."""

    text: str
    finish_reason: str  # "stop", "length", "content_filter" or "error"
    usage: Usage
    provider: str
    deployment: str
    cached: bool

    @classmethod
    def from_proto(cls, msg: llm_pb2.GenerateResponse) -> Generation:
        return cls(
            text=msg.message.content,
            finish_reason=_finish_name(msg.finish_reason),
            usage=Usage.from_proto(msg.usage),
            provider=msg.provider,
            deployment=msg.deployment,
            cached=msg.cached,
        )


@dataclass(frozen=True)
class Deployment:
    name: str
    provider: str
    healthy: bool
    breaker: str  # "closed", "open" or "half_open"


@dataclass(frozen=True)
class Model:
    name: str
    deployments: tuple[Deployment, ...]

    @classmethod
    def from_proto(cls, msg: llm_pb2.Model) -> Model:
        return cls(
            msg.name,
            tuple(
                Deployment(
                    d.name,
                    d.provider,
                    d.healthy,
                    llm_pb2.BreakerState.Name(d.breaker_state)
                    .removeprefix("BREAKER_STATE_")
                    .lower(),
                )
                for d in msg.deployments
            ),
        )


def _finish_name(value: int) -> str:
    if value == llm_pb2.FINISH_REASON_UNSPECIFIED:
        return ""
    return llm_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def messages(prompt: Prompt, system: str | None = None) -> list[llm_pb2.ChatMessage]:
    """The request's messages; `system`, when given, goes first."""
    items: list[tuple[str, str]] = [("system", system)] if system is not None else []
    if isinstance(prompt, str):
        items.append(("user", prompt))
    else:
        for item in prompt:
            if isinstance(item, ChatMessage):
                items.append((item.role, item.content))
            elif isinstance(item, Mapping):
                items.append((item["role"], item["content"]))
            else:
                role, content = item
                items.append((role, content))
    out = []
    for role, content in items:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        out.append(
            llm_pb2.ChatMessage(role=llm_pb2.Role.Value("ROLE_" + role.upper()), content=content)
        )
    return out


def options(
    temperature: float | None,
    top_p: float | None,
    max_tokens: int,
    stop: str | Sequence[str],
    seed: int | None,
) -> llm_pb2.GenerationOptions:
    msg = llm_pb2.GenerationOptions(
        max_tokens=max_tokens, stop=[stop] if isinstance(stop, str) else list(stop)
    )
    # Optional fields: left unset, the deployment's default applies.
    if temperature is not None:
        msg.temperature = temperature
    if top_p is not None:
        msg.top_p = top_p
    if seed is not None:
        msg.seed = seed
    return msg


def _vectors(response: llm_pb2.EmbedResponse) -> np.ndarray:
    if not response.embeddings:
        return np.zeros((0, 0), np.float32)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


class _StreamState:
    """What the last chunk of a stream says, shared by both stream classes."""

    finish_reason: str = ""
    usage: Usage | None = None
    provider: str = ""
    deployment: str = ""
    cached: bool = False

    def _take(self, msg: llm_pb2.GenerateStreamResponse) -> str:
        self.provider, self.deployment, self.cached = msg.provider, msg.deployment, msg.cached
        if msg.finish_reason:
            self.finish_reason = _finish_name(msg.finish_reason)
        if msg.HasField("usage"):
            self.usage = Usage.from_proto(msg.usage)
        return msg.delta


class TextStream(_StreamState):
    """An iterator of text chunks as the model produces them. Once exhausted,
    `finish_reason`, `usage`, `provider`, `deployment` and `cached` hold the
    last chunk's values. A stream that breaks mid-way raises (UnavailableError),
    never ends quietly. `cancel()` or leaving a `with` block stops generation."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[str]:
        try:
            for msg in self._call:
                delta = self._take(msg)
                if delta:
                    yield delta
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            self._call.cancel()

    @property
    def text(self) -> str:
        """Reads the rest of the stream and returns it joined."""
        return "".join(self)

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class AsyncTextStream(_StreamState):
    """The asyncio twin of `TextStream`: `async for text in stream`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for msg in self._call:
                delta = self._take(msg)
                if delta:
                    yield delta
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class LLM:
    """`Client.llm`: generation, token streams, embeddings and the model list."""

    def __init__(
        self,
        channel: grpc.Channel,
        call: Callable[..., Any],
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
    ) -> None:
        self._stub = llm_pb2_grpc.LLMServiceStub(channel)
        # The client's unary call with its retry policy, for embed and models.
        self._call = call
        self._metadata = metadata
        self._timeout = timeout

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
        request = llm_pb2.GenerateRequest(
            model=model,
            messages=messages(prompt, system),
            options=options(temperature, top_p, max_tokens, stop, seed),
        )
        # No client-side retry: the gateway has already retried and failed
        # over, and retrying here would multiply upstream calls and charges.
        try:
            response = self._stub.Generate(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return Generation.from_proto(response)

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
        request = llm_pb2.GenerateStreamRequest(
            model=model,
            messages=messages(prompt, system),
            options=options(temperature, top_p, max_tokens, stop, seed),
        )
        call = self._stub.GenerateStream(
            request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata
        )
        return TextStream(call)

    def embed(
        self, texts: str | Sequence[str], *, model: str = "", timeout: float | None = None
    ) -> np.ndarray:
        """Embeddings as a float32 array of shape (len(texts), dims); a single
        string counts as a list of one. model "" is the server's default (the
        offline "local" model unless configured otherwise)."""
        inputs = [texts] if isinstance(texts, str) else list(texts)
        request = llm_pb2.EmbedRequest(model=model, inputs=inputs)
        return _vectors(self._call(self._stub.Embed, request, timeout))

    def models(self) -> list[Model]:
        """Every configured model with its deployments' health and breaker state."""
        found: list[Model] = []
        token = ""
        while True:
            response = self._call(
                self._stub.ListModels, llm_pb2.ListModelsRequest(page_size=1000, page_token=token)
            )
            found += [Model.from_proto(m) for m in response.models]
            token = response.next_page_token
            if not token:
                return found


class AsyncLLM:
    """`AsyncClient.llm`: the same surface as `LLM`, awaitable."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        call: Callable[..., Awaitable[Any]],
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
    ) -> None:
        self._stub = llm_pb2_grpc.LLMServiceStub(channel)
        self._call = call
        self._metadata = metadata
        self._timeout = timeout

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
        request = llm_pb2.GenerateRequest(
            model=model,
            messages=messages(prompt, system),
            options=options(temperature, top_p, max_tokens, stop, seed),
        )
        # No client-side retry, as in `LLM.generate`.
        try:
            response = await self._stub.Generate(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return Generation.from_proto(response)

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
        request = llm_pb2.GenerateStreamRequest(
            model=model,
            messages=messages(prompt, system),
            options=options(temperature, top_p, max_tokens, stop, seed),
        )
        call = self._stub.GenerateStream(
            request, timeout=self._timeout if timeout is None else timeout, metadata=self._metadata
        )
        return AsyncTextStream(call)

    async def embed(
        self, texts: str | Sequence[str], *, model: str = "", timeout: float | None = None
    ) -> np.ndarray:
        inputs = [texts] if isinstance(texts, str) else list(texts)
        request = llm_pb2.EmbedRequest(model=model, inputs=inputs)
        return _vectors(await self._call(self._stub.Embed, request, timeout))

    async def models(self) -> list[Model]:
        found: list[Model] = []
        token = ""
        while True:
            response = await self._call(
                self._stub.ListModels, llm_pb2.ListModelsRequest(page_size=1000, page_token=token)
            )
            found += [Model.from_proto(m) for m in response.models]
            token = response.next_page_token
            if not token:
                return found


__all__ = [
    "LLM",
    "AsyncLLM",
    "AsyncTextStream",
    "ChatMessage",
    "Deployment",
    "Generation",
    "Model",
    "TextStream",
    "Usage",
]
