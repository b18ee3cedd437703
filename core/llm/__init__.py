"""The LLM gateway: providers behind failover, circuit breakers and retries,
with per-tenant rate limits, token budgets, a response cache and usage
accounting. No gRPC here: services/llm_servicer.py translates."""

from __future__ import annotations

from kernelmesh.core.llm.config import (
    BreakerConfig,
    CacheConfig,
    DeploymentConfig,
    LLMConfig,
    LLMConfigError,
    ModelConfig,
    ModelKind,
    ProviderKind,
    RetryConfig,
    TenantLimits,
    load_config,
    parse_config,
)
from kernelmesh.core.llm.gateway import Gateway
from kernelmesh.core.llm.types import (
    BreakerState,
    Chunk,
    Completion,
    DeploymentStatus,
    Embeddings,
    FinishReason,
    GenerationOptions,
    Message,
    ModelInfo,
    Role,
    Usage,
)
from kernelmesh.core.store import UsageRecord, UsageStore

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "CacheConfig",
    "Chunk",
    "Completion",
    "DeploymentConfig",
    "DeploymentStatus",
    "Embeddings",
    "FinishReason",
    "Gateway",
    "GenerationOptions",
    "LLMConfig",
    "LLMConfigError",
    "Message",
    "ModelConfig",
    "ModelInfo",
    "ModelKind",
    "ProviderKind",
    "RetryConfig",
    "Role",
    "TenantLimits",
    "Usage",
    "UsageRecord",
    "UsageStore",
    "load_config",
    "parse_config",
]
