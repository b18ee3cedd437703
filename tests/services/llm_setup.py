"""The LLM config the service and facade tests run against: models whose
deployments are the fake upstream in tests/llm_upstream.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import yaml

# Requests per minute of the tenant "tiny": its second request is refused.
TINY_RPM = 1


def write_llm_config(
    directory: Path,
    openai_url: str,
    ollama_url: str,
    extra_models: dict[str, object] | None = None,
) -> Path:
    """`chat` (OpenAI wire), `ollama-chat` (Ollama wire), plus `extra_models`
    as given; retries and breaker tuned so failure tests take milliseconds."""

    def deployment(name: str, provider: str, base_url: str) -> dict[str, object]:
        return {
            "name": name,
            "provider": provider,
            "base_url": base_url,
            "model": "fake-model",
            "max_retries": 0,
            "timeout_s": 10,
        }

    config = {
        "models": {
            "chat": {"kind": "chat", "deployments": [deployment("primary", "openai", openai_url)]},
            "ollama-chat": {
                "kind": "chat",
                "deployments": [deployment("ollama", "ollama", ollama_url)],
            },
            **(extra_models or {}),
        },
        "breaker": {"failure_threshold": 2, "recovery_timeout_s": 60, "success_threshold": 1},
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05},
        "tenants": {"tiny": {"requests_per_minute": TINY_RPM}},
    }
    path = directory / "llm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Waits until `condition()` holds; fails the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.01)
