"""kernelmesh.v1 LLM messages to core.llm values and back. Validation here is
only what the proto leaves open (enum values); the gateway checks the rest."""

from __future__ import annotations

from collections.abc import Sequence

from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.llm import (
    BreakerState,
    Chunk,
    Completion,
    Embeddings,
    FinishReason,
    GenerationOptions,
    Message,
    ModelInfo,
    Role,
    Usage,
)
from kernelmesh.v1 import llm_pb2

_ROLES = {
    llm_pb2.ROLE_SYSTEM: Role.SYSTEM,
    llm_pb2.ROLE_USER: Role.USER,
    llm_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    llm_pb2.ROLE_TOOL: Role.TOOL,
}
_FINISH = {
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.CONTENT_FILTER: llm_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.ERROR: llm_pb2.FINISH_REASON_ERROR,
}
_BREAKER = {
    BreakerState.CLOSED: llm_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: llm_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: llm_pb2.BREAKER_STATE_HALF_OPEN,
}
_ROLE_NAMES = ", ".join(llm_pb2.Role.Name(v) for v in _ROLES)


def messages_from_proto(msgs: Sequence[llm_pb2.ChatMessage]) -> list[Message]:
    """Every message with an unset or unknown role is reported at once, so a
    caller fixes its request in one round trip."""
    violations = [
        Violation(f"messages[{i}].role", f"must be one of {_ROLE_NAMES}; got {m.role}")
        for i, m in enumerate(msgs)
        if m.role not in _ROLES
    ]
    if violations:
        raise InvalidArgument(violations)
    return [Message(_ROLES[m.role], m.content) for m in msgs]


def options_from_proto(msg: llm_pb2.GenerationOptions) -> GenerationOptions:
    # proto3 `optional` fields: absence (provider default) differs from 0.
    return GenerationOptions(
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        max_tokens=msg.max_tokens,
        stop=tuple(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
    )


def usage_to_proto(usage: Usage) -> llm_pb2.Usage:
    return llm_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def completion_to_proto(c: Completion) -> llm_pb2.GenerateResponse:
    return llm_pb2.GenerateResponse(
        message=llm_pb2.ChatMessage(role=llm_pb2.ROLE_ASSISTANT, content=c.text),
        finish_reason=_FINISH[c.finish_reason],
        usage=usage_to_proto(c.usage),
        provider=c.provider,
        deployment=c.deployment,
        cached=c.cached,
    )


def chunk_to_proto(c: Chunk) -> llm_pb2.GenerateStreamResponse:
    msg = llm_pb2.GenerateStreamResponse(
        delta=c.delta, provider=c.provider, deployment=c.deployment, cached=c.cached
    )
    if c.finish_reason is not None:
        msg.finish_reason = _FINISH[c.finish_reason]
    if c.usage is not None:
        msg.usage.CopyFrom(usage_to_proto(c.usage))
    return msg


def embeddings_to_proto(e: Embeddings) -> llm_pb2.EmbedResponse:
    return llm_pb2.EmbedResponse(
        embeddings=[llm_pb2.Embedding(values=v) for v in e.vectors],
        usage=usage_to_proto(e.usage),
        provider=e.provider,
    )


def model_to_proto(m: ModelInfo) -> llm_pb2.Model:
    return llm_pb2.Model(
        name=m.name,
        deployments=[
            llm_pb2.Deployment(
                name=d.name,
                provider=d.provider,
                healthy=d.healthy,
                breaker_state=_BREAKER[d.breaker],
                unhealthy_reason=d.reason,
            )
            for d in m.deployments
        ],
    )
