"""The LLM gateway's values (messages, generations, usage, models) and the
request builders both LLM faces share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kernelmesh.v1 import llm_pb2

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
            # Message constructors take an enum value by its name.
            llm_pb2.ChatMessage(role="ROLE_" + role.upper(), content=content)
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


def vectors(response: llm_pb2.EmbedResponse) -> np.ndarray:
    if not response.embeddings:
        return np.zeros((0, 0), np.float32)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


class StreamState:
    """What the last chunk of a token stream says, kept by both stream faces."""

    finish_reason: str = ""
    usage: Usage | None = None
    provider: str = ""
    deployment: str = ""
    cached: bool = False

    def take(self, msg: llm_pb2.GenerateStreamResponse) -> str:
        self.provider, self.deployment, self.cached = msg.provider, msg.deployment, msg.cached
        if msg.finish_reason:
            self.finish_reason = _finish_name(msg.finish_reason)
        if msg.HasField("usage"):
            self.usage = Usage.from_proto(msg.usage)
        return msg.delta
