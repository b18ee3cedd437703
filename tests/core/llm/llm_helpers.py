"""Helpers for the gateway's tests: configurations against fake upstreams
with tiny backoffs (so the suite stays fast) and a clock tests move by hand."""

from __future__ import annotations

from typing import Any

from llm_upstream import Upstream

from kernelmesh.core.llm import LLMConfig, Message, Role, parse_config

FAST_RETRY = {"initial_backoff_s": 0.001, "max_backoff_s": 0.005, "max_retry_after_s": 1.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def deployment(
    name: str, upstream: Upstream, provider: str = "openai", **overrides: Any
) -> dict[str, Any]:
    base_url = upstream.openai_url if provider == "openai" else upstream.ollama_url
    return {
        "name": name,
        "provider": provider,
        "base_url": base_url,
        "model": "fake-model",
        "timeout_s": 2.0,
        "max_retries": 2,
        "default_max_tokens": 64,
        **overrides,
    }


def chat_config(*deployments: dict[str, Any], **top: Any) -> LLMConfig:
    """One chat model, "chat", over the given deployments in order."""
    return parse_config(
        {
            "models": {"chat": {"kind": "chat", "deployments": list(deployments)}},
            "retry": FAST_RETRY,
            **top,
        }
    )


def user(text: str) -> list[Message]:
    return [Message(Role.USER, text)]
