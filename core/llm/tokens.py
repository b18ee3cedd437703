"""Token counts the gateway needs before, or without, an upstream's word.

Two kinds, for two purposes:

- Estimates (about 4 characters per token, OpenAI's rule of thumb for English
  with BPE tokenizers; ~4 tokens of framing per chat message): rate-limit
  charges, corrected by the real usage afterwards, and usage when an upstream
  omits it (some OpenAI-compatible servers send none, especially when a
  stream is cut).
- Bounds, for budget reservations, which must never be undercut: no
  byte-level BPE tokenizer (GPT's, Llama 3's, Qwen's...) produces more tokens
  than the text has UTF-8 bytes, and a SentencePiece one with byte fallback
  (Llama 2, Mistral) at most one more per text. A real tokenizer would
  reserve less, but no upstream's is available offline (tiktoken downloads
  its BPE files at run time), and a different model's tokenizer is no bound.
  What a chat template adds is a per-message allowance plus the deployment's
  `prompt_overhead_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kernelmesh.core.llm.types import Message, Usage

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 2

# Role markers and separators around each message in the chat templates we
# know (Llama 3: 5, ChatML: 4, OpenAI: 3), plus the SentencePiece dummy prefix.
_BOUND_PER_MESSAGE = 8
# Begin-of-text and the assistant header that primes the reply.
_BOUND_PER_REPLY = 8
# Begin and end markers around each embedding input.
_BOUND_PER_INPUT = 2


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


def _utf8_bytes(text: str) -> int:
    # ASCII (the common case) is one byte a character; only other text pays
    # for an encode.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prompt_token_bound(messages: Sequence[Message], overhead: int) -> int:
    """At most the prompt tokens any byte-level tokenizer counts for
    `messages`, with `overhead` tokens of template the upstream may add."""
    return (
        overhead
        + _BOUND_PER_REPLY
        + sum(_BOUND_PER_MESSAGE + _utf8_bytes(m.content) for m in messages)
    )


def input_token_bound(inputs: Sequence[str]) -> int:
    """At most the tokens any byte-level tokenizer counts for embedding `inputs`."""
    return sum(_BOUND_PER_INPUT + _utf8_bytes(text) for text in inputs)
