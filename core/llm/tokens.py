"""Token estimates, for the cases where no tokenizer is at hand: reserving
budget and rate-limit tokens before a call, and usage when an upstream
omits it (some OpenAI-compatible servers send no usage, especially when a
stream is cut). Roughly 4 characters per token is OpenAI's rule of thumb for
English with BPE tokenizers; each chat message also costs ~4 tokens of
framing (role markers). Estimates are corrected by the upstream's real
usage whenever it reports one."""

from __future__ import annotations

from collections.abc import Sequence

from kernelmesh.core.llm.types import Message, Usage

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 2


def tokens_for_chars(chars: int) -> int:
    return (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def estimate_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def estimate_prompt_tokens(messages: Sequence[Message]) -> int:
    return _TOKENS_PER_REPLY + sum(
        _TOKENS_PER_MESSAGE + estimate_tokens(m.content) for m in messages
    )


def estimate_usage(messages: Sequence[Message], completion_chars: int) -> Usage:
    prompt = estimate_prompt_tokens(messages)
    completion = tokens_for_chars(completion_chars)
    return Usage(prompt, completion, prompt + completion)
