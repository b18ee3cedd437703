"""The gateway's domain values: chat messages, generation options, completions,
stream chunks, embeddings and the health of models' deployments."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(Enum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    ERROR = "error"


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class GenerationOptions:
    temperature: float | None = None
    top_p: float | None = None
    # 0 means the deployment's default_max_tokens.
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        """Whether the same request may be answered from the cache."""
        return self.temperature == 0 or self.seed is not None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    usage: Usage
    provider: str
    deployment: str
    cached: bool = False


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed completion; finish_reason and usage are set on
    the last chunk only."""

    delta: str
    provider: str
    deployment: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    cached: bool = False


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    usage: Usage
    provider: str
    deployment: str


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    provider: str
    healthy: bool
    breaker: BreakerState
    # Why it is unusable, when it is for a reason other than its breaker: a
    # missing API key variable, or the upstream refusing its key or model id.
    reason: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "chat" or "embedding"
    deployments: tuple[DeploymentStatus, ...]
