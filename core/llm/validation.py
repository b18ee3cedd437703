"""Checks of chat and embedding requests before anything is reserved or sent,
each problem reported as a field violation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.llm.types import GenerationOptions, Message, Role

MAX_STOP_SEQUENCES = 4
MAX_EMBED_INPUTS = 2048
# Far above any model's context; refuses typos like 10**9 before they are
# reserved against budgets.
MAX_TOKENS_LIMIT = 1_000_000


def check_chat(
    messages: Sequence[Message], options: GenerationOptions
) -> tuple[tuple[Message, ...], GenerationOptions]:
    """Returns the messages as a tuple and the options with `stop` as a tuple
    (both hashable, for the cache key), or raises InvalidArgument."""
    violations: list[Violation] = []
    messages = tuple(messages)
    if not messages:
        violations.append(Violation("messages", "at least one message is required"))
    # The isinstance checks hold for typed callers; they are for those that are not
    # (a dict from JSON, a str role), which mypy counts as unreachable.
    for i, message in enumerate(messages):
        if not isinstance(message, Message) or not isinstance(message.role, Role):
            violations.append(  # type: ignore[unreachable]
                Violation(
                    f"messages[{i}].role",
                    f"must be one of {', '.join(r.value for r in Role)}",
                )
            )
        elif not isinstance(message.content, str):
            violations.append(Violation(f"messages[{i}].content", "must be a string"))  # type: ignore[unreachable]
    if options.temperature is not None and not 0.0 <= options.temperature <= 2.0:
        violations.append(
            Violation("options.temperature", f"must be between 0 and 2, got {options.temperature}")
        )
    if options.top_p is not None and not 0.0 < options.top_p <= 1.0:
        violations.append(Violation("options.top_p", f"must be in (0, 1], got {options.top_p}"))
    if not 0 <= options.max_tokens <= MAX_TOKENS_LIMIT:
        violations.append(
            Violation(
                "options.max_tokens",
                f"must be between 0 (the deployment's default) and {MAX_TOKENS_LIMIT}, "
                f"got {options.max_tokens}",
            )
        )
    stop = tuple(options.stop)
    if len(stop) > MAX_STOP_SEQUENCES:
        violations.append(Violation("options.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences"))
    if any(not isinstance(s, str) or not s for s in stop):
        violations.append(Violation("options.stop", "stop sequences must be non-empty strings"))
    if violations:
        raise InvalidArgument(violations)
    if not isinstance(options.stop, tuple):
        options = dataclasses.replace(options, stop=stop)  # type: ignore[unreachable]
    return messages, options


def check_inputs(inputs: Sequence[str]) -> list[str]:
    violations: list[Violation] = []
    if isinstance(inputs, str):
        raise InvalidArgument([Violation("inputs", "expected a list of strings, got one string")])
    inputs = list(inputs)
    if not inputs:
        violations.append(Violation("inputs", "at least one input is required"))
    if len(inputs) > MAX_EMBED_INPUTS:
        violations.append(
            Violation("inputs", f"at most {MAX_EMBED_INPUTS} inputs, got {len(inputs)}")
        )
    for i, text in enumerate(inputs):
        if not isinstance(text, str) or not text.strip():
            violations.append(Violation(f"inputs[{i}]", "must be a non-empty string"))
    if violations:
        raise InvalidArgument(violations)
    return inputs
