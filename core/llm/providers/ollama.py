"""Ollama's native API: POST {base_url}/api/chat (newline-delimited JSON when
streaming; the last object has done: true, done_reason, prompt_eval_count and
eval_count) and POST {base_url}/api/embed."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import aiohttp

from kernelmesh.core.llm.config import ProviderKind
from kernelmesh.core.llm.providers.base import FailureKind, Provider, finish_reason, read_lines
from kernelmesh.core.llm.tokens import estimate_prompt_tokens, estimate_tokens, tokens_for_chars
from kernelmesh.core.llm.types import (
    Chunk,
    Completion,
    Embeddings,
    GenerationOptions,
    Message,
    Usage,
)


class OllamaProvider(Provider):
    kind = ProviderKind.OLLAMA

    def _payload(
        self, messages: Sequence[Message], options: GenerationOptions, stream: bool
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_predict": self.max_tokens(options), **self.sampling(options)}
        return {
            "model": self.deployment.model,
            "messages": [{"role": m.role.value, "content": m.content} for m in messages],
            "stream": stream,
            "options": opts,
        }

    def _usage(self, final: dict[str, Any], messages: Sequence[Message], chars: int) -> Usage:
        # Ollama omits prompt_eval_count when the prompt was cached; estimate then.
        prompt = final.get("prompt_eval_count")
        completion = final.get("eval_count")
        prompt = int(prompt) if prompt is not None else estimate_prompt_tokens(messages)
        completion = int(completion) if completion is not None else tokens_for_chars(chars)
        return Usage(prompt, completion, prompt + completion)

    async def generate(self, messages: Sequence[Message], options: GenerationOptions) -> Completion:
        data = await self._post_json("/api/chat", self._payload(messages, options, False))
        try:
            text = data["message"].get("content") or ""
        except (KeyError, TypeError, AttributeError) as e:
            raise self._error(FailureKind.PROTOCOL, f"unexpected /api/chat shape: {e!r}") from e
        return Completion(
            text,
            finish_reason(data.get("done_reason")),
            self._usage(data, messages, len(text)),
            self.provider,
            self.name,
        )

    async def stream(
        self, messages: Sequence[Message], options: GenerationOptions
    ) -> AsyncGenerator[Chunk, None]:
        resp = await self._open_stream("/api/chat", self._payload(messages, options, True))
        final: dict[str, Any] | None = None
        chars = 0
        try:
            async with aclosing(read_lines(resp.content)) as lines:
                async for raw in lines:
                    line = raw.strip()
                    if not line:
                        continue
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError(f"expected a JSON object, got {line[:100]!r}")
                    if "error" in event:
                        raise self._error(FailureKind.SERVER, f"error in stream: {event['error']}")
                    delta = (event.get("message") or {}).get("content")
                    if delta:
                        chars += len(delta)
                        yield Chunk(delta, self.provider, self.name)
                    if event.get("done"):
                        final = event
                        break
            if final is None:
                raise self._error(
                    FailureKind.PROTOCOL, "the stream ended without its done: true object"
                )
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
            raise self._translate(e, "/api/chat stream") from e
        finally:
            if final is not None:
                resp.release()
            else:
                resp.close()
        yield Chunk(
            "",
            self.provider,
            self.name,
            finish_reason=finish_reason(final.get("done_reason")),
            usage=self._usage(final, messages, chars),
        )

    async def embed(self, inputs: Sequence[str]) -> Embeddings:
        data = await self._post_json(
            "/api/embed", {"model": self.deployment.model, "input": list(inputs)}
        )
        try:
            vectors = [list(map(float, v)) for v in data["embeddings"]]
        except (KeyError, TypeError, ValueError) as e:
            raise self._error(FailureKind.PROTOCOL, f"unexpected /api/embed shape: {e!r}") from e
        if len(vectors) != len(inputs):
            raise self._error(
                FailureKind.PROTOCOL, f"asked for {len(inputs)} embeddings, got {len(vectors)}"
            )
        count = data.get("prompt_eval_count")
        prompt = int(count) if count is not None else sum(estimate_tokens(t) for t in inputs)
        return Embeddings(vectors, Usage(prompt, 0, prompt), self.provider, self.name)
