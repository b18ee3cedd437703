"""One provider per upstream protocol, chosen by a deployment's `provider`."""

from __future__ import annotations

from kernelmesh.core.llm.config import DeploymentConfig, ProviderKind
from kernelmesh.core.llm.providers.base import FailureKind, Provider, UpstreamError
from kernelmesh.core.llm.providers.local import LocalProvider
from kernelmesh.core.llm.providers.ollama import OllamaProvider
from kernelmesh.core.llm.providers.openai import OpenAIProvider

_PROVIDERS: dict[ProviderKind, type[Provider]] = {
    ProviderKind.OPENAI: OpenAIProvider,
    ProviderKind.OLLAMA: OllamaProvider,
    ProviderKind.LOCAL: LocalProvider,
}


def provider_for(deployment: DeploymentConfig) -> Provider:
    return _PROVIDERS[deployment.provider](deployment)


__all__ = [
    "FailureKind",
    "LocalProvider",
    "OllamaProvider",
    "OpenAIProvider",
    "Provider",
    "UpstreamError",
    "provider_for",
]
