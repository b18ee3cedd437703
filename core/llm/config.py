"""The LLM gateway's configuration: models and their ordered deployments (the
failover chain), circuit breaker, retries, per-tenant limits and the response
cache, read from a YAML file.

Secrets never live in the file: a deployment names the environment variable
that holds its API key (`api_key_env`), and a literal key is refused.

    models:
      gpt-4o-mini:
        kind: chat
        deployments:
          - name: openai-primary
            provider: openai
            base_url: https://api.openai.com/v1
            model: gpt-4o-mini
            api_key_env: OPENAI_API_KEY
            timeout_s: 15               # the most it holds a request, retries included
          - name: local-ollama
            provider: ollama
            base_url: http://127.0.0.1:11434
            model: llama3.2
    breaker: {failure_threshold: 5, recovery_timeout_s: 30, success_threshold: 2}
    retry: {initial_backoff_s: 0.25, max_backoff_s: 8, max_retry_after_s: 30}
    tenants:
      default: {requests_per_minute: 600, tokens_per_minute: 200000, token_budget: null}
    cache: {max_entries: 1024, ttl_s: 300}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

LOCAL_EMBEDDING_MODEL = "local"
DEFAULT_TENANT = "default"


class LLMConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key path."""


class ModelKind(Enum):
    CHAT = "chat"
    EMBEDDING = "embedding"


class ProviderKind(Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    LOCAL = "local"


@dataclass(frozen=True)
class DeploymentConfig:
    name: str
    provider: ProviderKind
    base_url: str = ""
    # The upstream's model id (e.g. "gpt-4o-mini", "llama3.2").
    model: str = ""
    # The NAME of the environment variable holding the API key.
    api_key_env: str | None = None
    # The longest this deployment may hold a request, its retries included,
    # before the gateway fails over (for a stream: until its first chunk; after
    # that, the longest silence between two chunks). A caller's deadline
    # shortens it further, leaving room for the deployments after this one.
    # 15 s: a hung primary fails over well inside the Python client's 30 s.
    timeout_s: float = 15.0
    connect_timeout_s: float = 5.0
    # Retries of retryable failures on this deployment before failing over.
    max_retries: int = 2
    input_cost_per_1k: float = 0.0
    output_cost_per_1k: float = 0.0
    default_max_tokens: int = 1024
    # Prompt tokens the upstream may add beyond the messages (chat template,
    # a default system prompt), reserved on top of the messages' own bound.
    prompt_overhead_tokens: int = 32

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_cost_per_1k + completion_tokens * self.output_cost_per_1k
        ) / 1000.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: ModelKind
    deployments: tuple[DeploymentConfig, ...]


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    recovery_timeout_s: float = 30.0
    success_threshold: int = 2


@dataclass(frozen=True)
class RetryConfig:
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    # An upstream's Retry-After is honoured up to this many seconds; longer
    # waits fail over instead of holding the caller.
    max_retry_after_s: float = 30.0


@dataclass(frozen=True)
class TenantLimits:
    """None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Total tokens (prompt + completion) the tenant may spend while the
    # usage store's history lasts.
    token_budget: int | None = None


@dataclass(frozen=True)
class CacheConfig:
    # 0 disables the cache.
    max_entries: int = 1024
    ttl_s: float = 300.0


@dataclass(frozen=True)
class LLMConfig:
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    default_embedding_model: str = LOCAL_EMBEDDING_MODEL

    def limits_for(self, tenant: str) -> TenantLimits:
        found = self.tenants.get(tenant)
        if found is None:
            found = self.tenants.get(DEFAULT_TENANT, _UNLIMITED)
        return found

    @property
    def chat_models(self) -> list[str]:
        return [m.name for m in self.models.values() if m.kind is ModelKind.CHAT]


_UNLIMITED = TenantLimits()

LOCAL_MODEL = ModelConfig(
    name=LOCAL_EMBEDDING_MODEL,
    kind=ModelKind.EMBEDDING,
    deployments=(DeploymentConfig(name="local", provider=ProviderKind.LOCAL, model="wordllama"),),
)

# What an API key looks like, so that a key pasted into the file is refused
# instead of silently being committed: the prefixes providers use (OpenAI,
# Anthropic, Groq, xAI, Google, Hugging Face, ...), long hex, long base64 or
# base64url, and JWTs.
_KEY_PREFIXED = re.compile(r"^(sk-|sk_|gsk_|xai-|AIza|hf_|pk-|rk-|ghp_|glpat-)[A-Za-z0-9_\-]{8,}$")
_KEY_HEX = re.compile(r"^[0-9A-Fa-f]{32,}$")
_KEY_BASE64 = re.compile(r"^[A-Za-z0-9+/_\-]{32,}={0,2}$")
_KEY_JWT = re.compile(r"^eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def looks_like_secret(value: str) -> bool:
    """Whether a config value has the shape of an API key or token. Variable
    names (OPENAI_API_KEY, even long ones) and model ids ("Qwen/Qwen2-VL-72B-
    Instruct") do not: base64 counts only with lower case, upper case and
    digits mixed in a long unbroken run (or base64's own + and = marks), as
    random keys are and names made of words are not."""
    value = value.strip()
    if _KEY_PREFIXED.match(value) or _KEY_HEX.match(value) or _KEY_JWT.match(value):
        return True
    if not _KEY_BASE64.match(value):
        return False
    mixed = (
        any(c.islower() for c in value)
        and any(c.isupper() for c in value)
        and any(c.isdigit() for c in value)
    )
    longest_run = max(len(run) for run in _NOT_ALNUM.split(value))
    return mixed and (longest_run >= 16 or "+" in value or value.endswith("="))


_SECRET_FIELDS = {"api_key", "key", "token", "secret", "password", "authorization"}


def load_config(path: str | Path | None) -> LLMConfig:
    """Reads a YAML file; None gives the built-in configuration (the local
    embedding model only)."""
    if path is None:
        return parse_config({})
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LLMConfigError(f"{path}: cannot read the LLM config: {e}") from e
    except yaml.YAMLError as e:
        raise LLMConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_config(data or {}, source=str(path))


def parse_config(data: Any, source: str = "llm config") -> LLMConfig:
    """Validates a parsed document; every error names its key path."""
    at = _Path(source)
    top = _mapping(data, at)
    _known(top, at, {"models", "breaker", "retry", "tenants", "cache", "default_embedding_model"})

    models: dict[str, ModelConfig] = {}
    for name, body in _mapping(top.get("models") or {}, at / "models").items():
        models[str(name)] = _model(str(name), body, at / "models" / str(name))
    # The offline embedding model is always there, unless the file defines its own "local".
    models.setdefault(LOCAL_EMBEDDING_MODEL, LOCAL_MODEL)

    tenants = {
        str(name): _dataclass(TenantLimits, body, at / "tenants" / str(name), minimum=0)
        for name, body in _mapping(top.get("tenants") or {}, at / "tenants").items()
    }
    default_embedding = top.get("default_embedding_model", LOCAL_EMBEDDING_MODEL)
    target = models.get(str(default_embedding))
    if target is None or target.kind is not ModelKind.EMBEDDING:
        embedding = [n for n, m in models.items() if m.kind is ModelKind.EMBEDDING]
        raise LLMConfigError(
            f"{at / 'default_embedding_model'}: {default_embedding!r} is not an embedding "
            f"model; embedding models: {', '.join(embedding)}"
        )
    breaker = _dataclass(BreakerConfig, top.get("breaker") or {}, at / "breaker", minimum=0)
    for key in ("failure_threshold", "success_threshold"):
        if getattr(breaker, key) < 1:
            raise LLMConfigError(f"{at / 'breaker' / key}: must be at least 1")
    return LLMConfig(
        models=models,
        breaker=breaker,
        retry=_dataclass(RetryConfig, top.get("retry") or {}, at / "retry", minimum=0),
        tenants=tenants,
        cache=_dataclass(CacheConfig, top.get("cache") or {}, at / "cache", minimum=0),
        default_embedding_model=str(default_embedding),
    )


class _Path:
    """A key path for error messages: `file: models.gpt.deployments[0].provider`."""

    def __init__(self, source: str, parts: tuple[str, ...] = ()) -> None:
        self.source = source
        self.parts = parts

    def __truediv__(self, key: str | int) -> _Path:
        part = f"[{key}]" if isinstance(key, int) else str(key)
        return _Path(self.source, (*self.parts, part))

    def __str__(self) -> str:
        dotted = "".join(p if p.startswith("[") else f".{p}" for p in self.parts).lstrip(".")
        return f"{self.source}: {dotted}" if dotted else self.source


def _mapping(value: Any, at: _Path) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise LLMConfigError(f"{at}: expected a mapping, got {type(value).__name__}")
    return value


def _known(body: Mapping[str, Any], at: _Path, known: set[str]) -> None:
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise LLMConfigError(
            f"{at}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


def _model(name: str, body: Any, at: _Path) -> ModelConfig:
    body = _mapping(body, at)
    _known(body, at, {"kind", "deployments"})
    kind_name = body.get("kind", ModelKind.CHAT.value)
    try:
        kind = ModelKind(kind_name)
    except ValueError:
        raise LLMConfigError(
            f"{at / 'kind'}: {kind_name!r} is not one of {', '.join(k.value for k in ModelKind)}"
        ) from None
    raw = body.get("deployments")
    if not isinstance(raw, list) or not raw:
        raise LLMConfigError(f"{at / 'deployments'}: expected a non-empty list of deployments")
    deployments = tuple(_deployment(d, kind, at / "deployments" / i) for i, d in enumerate(raw))
    names = [d.name for d in deployments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LLMConfigError(
            f"{at / 'deployments'}: duplicate deployment names {', '.join(duplicates)}"
        )
    return ModelConfig(name=name, kind=kind, deployments=deployments)


def _deployment(body: Any, kind: ModelKind, at: _Path) -> DeploymentConfig:
    body = _mapping(body, at)
    for key, value in body.items():
        if str(key).lower() in _SECRET_FIELDS:
            raise LLMConfigError(
                f"{at / str(key)}: secrets are never read from the config file; export the "
                f"key in an environment variable and name it with api_key_env "
                f"(e.g. api_key_env: OPENAI_API_KEY)"
            )
        if isinstance(value, str) and looks_like_secret(value):
            # The value is never echoed: it may be a live key.
            raise LLMConfigError(
                f"{at / str(key)}: this looks like an API key; secrets are never read from the "
                f"config file: put it in an environment variable and set "
                f"api_key_env to that variable's name"
            )
    values = dict(body)
    provider_name = values.get("provider")
    try:
        provider = ProviderKind(provider_name)
    except ValueError:
        raise LLMConfigError(
            f"{at / 'provider'}: {provider_name!r} is not one of "
            f"{', '.join(p.value for p in ProviderKind)}"
        ) from None
    values["provider"] = provider
    if "name" not in values:
        raise LLMConfigError(f"{at / 'name'}: every deployment needs a name")
    values["name"] = str(values["name"])
    deployment: DeploymentConfig = _dataclass(DeploymentConfig, values, at, minimum=0)
    if provider is ProviderKind.LOCAL:
        if kind is not ModelKind.EMBEDDING:
            raise LLMConfigError(
                f"{at / 'provider'}: the local provider serves embeddings only; "
                f"use it in a model with kind: embedding"
            )
    else:
        if not deployment.base_url.startswith(("http://", "https://")):
            raise LLMConfigError(
                f"{at / 'base_url'}: expected an http:// or https:// URL, "
                f"got {deployment.base_url!r}"
            )
        if not deployment.model:
            raise LLMConfigError(f"{at / 'model'}: the upstream's model id is required")
    if deployment.api_key_env is not None and not _ENV_NAME.match(deployment.api_key_env):
        # Not echoed either: a malformed name may be a key of a shape not
        # recognised above.
        raise LLMConfigError(
            f"{at / 'api_key_env'}: expected the NAME of an environment variable "
            f"(letters, digits and _, like OPENAI_API_KEY); got a value of "
            f"{len(deployment.api_key_env)} characters that is not one"
        )
    if deployment.timeout_s <= 0 or deployment.connect_timeout_s <= 0:
        raise LLMConfigError(f"{at / 'timeout_s'}: timeouts must be positive")
    if deployment.default_max_tokens < 1:
        raise LLMConfigError(f"{at / 'default_max_tokens'}: must be at least 1")
    return deployment


def _dataclass(cls: type, body: Any, at: _Path, *, minimum: float) -> Any:
    """Builds a flat dataclass of numbers and strings, checking types and that
    numbers are at least `minimum`."""
    body = _mapping(body, at)
    specs = {f.name: f for f in fields(cls)}
    _known(body, at, set(specs))
    values: dict[str, Any] = {}
    for key, value in body.items():
        expected = str(specs[key].type)
        if value is None and "None" in expected:
            values[key] = None
            continue
        if "int" in expected or "float" in expected:
            wants_int = "int" in expected and "float" not in expected
            ok = isinstance(value, int) if wants_int else isinstance(value, int | float)
            if isinstance(value, bool) or not ok:
                raise LLMConfigError(
                    f"{at / key}: expected {'an integer' if wants_int else 'a number'}, "
                    f"got {value!r}"
                )
            if value < minimum:
                raise LLMConfigError(f"{at / key}: must be at least {minimum}, got {value}")
        elif "str" in expected and not isinstance(value, str | Enum):
            raise LLMConfigError(f"{at / key}: expected a string, got {value!r}")
        values[key] = value
    return cls(**values)
