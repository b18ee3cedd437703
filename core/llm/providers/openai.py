"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, Ollama's
/v1): POST {base_url}/chat/completions, plain and as server-sent events with
stream_options.include_usage, and POST {base_url}/embeddings."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import aiohttp

from kernelmesh.core.llm.config import ProviderKind
from kernelmesh.core.llm.providers.base import (
    FailureKind,
    Provider,
    UpstreamError,
    finish_reason,
    read_lines,
)
from kernelmesh.core.llm.tokens import estimate_tokens, estimate_usage
from kernelmesh.core.llm.types import (
    Chunk,
    Completion,
    Embeddings,
    FinishReason,
    GenerationOptions,
    Message,
    Usage,
)


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    prompt = int(data.get("prompt_tokens") or 0)
    completion = int(data.get("completion_tokens") or 0)
    return Usage(prompt, completion, int(data.get("total_tokens") or prompt + completion))


class OpenAIProvider(Provider):
    kind = ProviderKind.OPENAI

    def _payload(
        self, messages: Sequence[Message], options: GenerationOptions, stream: bool
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.deployment.model,
            "messages": [{"role": m.role.value, "content": m.content} for m in messages],
            "max_tokens": self.max_tokens(options),
            **self.sampling(options),
        }
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    async def generate(self, messages: Sequence[Message], options: GenerationOptions) -> Completion:
        data = await self._post_json("/chat/completions", self._payload(messages, options, False))
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            reason = finish_reason(choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise self._error(
                FailureKind.PROTOCOL, f"unexpected chat completion shape: {e!r}"
            ) from e
        usage = _usage(data.get("usage")) or estimate_usage(messages, len(text))
        return Completion(text, reason, usage, self.provider, self.name)

    async def stream(
        self, messages: Sequence[Message], options: GenerationOptions
    ) -> AsyncGenerator[Chunk, None]:
        resp = await self._open_stream("/chat/completions", self._payload(messages, options, True))
        complete = False
        reason: FinishReason | None = None
        usage: Usage | None = None
        chars = 0
        try:
            async with aclosing(read_lines(resp.content)) as lines:
                async for raw in lines:
                    line = raw.strip()
                    # Blank lines separate events; ':' lines are SSE comments (keep-alives).
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        complete = True
                        break
                    event = json.loads(data)
                    if not isinstance(event, dict):
                        raise ValueError(f"expected a JSON object, got {data[:100]!r}")
                    if "error" in event:
                        error = event["error"]
                        message = error.get("message") if isinstance(error, dict) else error
                        raise self._error(FailureKind.SERVER, f"error event in stream: {message}")
                    if event.get("usage"):
                        usage = _usage(event["usage"])
                    for choice in event.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            chars += len(delta)
                            yield Chunk(delta, self.provider, self.name)
                        if choice.get("finish_reason"):
                            reason = finish_reason(choice["finish_reason"])
            if not complete:
                raise self._error(FailureKind.PROTOCOL, "the stream ended without its [DONE] event")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, AttributeError) as e:
            raise self._translate(e, "chat completion stream") from e
        finally:
            # Closing (not releasing) an unfinished response drops the
            # connection, which is how the upstream learns to stop generating.
            if complete:
                resp.release()
            else:
                resp.close()
        yield Chunk(
            "",
            self.provider,
            self.name,
            finish_reason=reason or FinishReason.STOP,
            # Upstreams that ignore include_usage get an estimate.
            usage=usage or estimate_usage(messages, chars),
        )

    async def embed(self, inputs: Sequence[str]) -> Embeddings:
        data = await self._post_json(
            "/embeddings", {"model": self.deployment.model, "input": list(inputs)}
        )
        try:
            rows = sorted(data["data"], key=lambda row: row.get("index", 0))
            vectors = [list(map(float, row["embedding"])) for row in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise self._error(FailureKind.PROTOCOL, f"unexpected embeddings shape: {e!r}") from e
        if len(vectors) != len(inputs):
            raise self._error(
                FailureKind.PROTOCOL, f"asked for {len(inputs)} embeddings, got {len(vectors)}"
            )
        usage = _usage(data.get("usage"))
        if usage is None:
            prompt = sum(estimate_tokens(text) for text in inputs)
            usage = Usage(prompt, 0, prompt)
        return Embeddings(vectors, usage, self.provider, self.name)


__all__ = ["OpenAIProvider", "UpstreamError"]
