"""The LLM gateway: one governed entry point for generation, streaming and
embeddings in front of OpenAI-compatible, Ollama and local deployments.

A request's path: validate -> cache (deterministic requests only) -> rate
limits and budget reservation (atomic: nothing awaits in between) -> the
model's deployments in order, each behind its circuit breaker, retried with
exponential backoff and jitter on retryable failures -> settle the budget and
rate-limit tokens with the real usage -> record usage and cost.

Decisions:
- A cache hit costs one request against requests_per_minute but no tokens and
  no budget, and is not recorded as usage: no upstream did any work.
- 400-like upstream answers are the request's fault: no retry, no failover,
  InvalidArgument. 401/403/404 (and a missing API key) are the deployment's
  fault: no retry, but failover, and they count against its breaker; when
  every deployment failed that way the answer is FailedPrecondition.
- A stream fails over only before its first chunk; once text was delivered, a
  break raises Unavailable naming the deployment and the chunks delivered.
- A failed call costs nothing; a cancelled or broken stream is charged the
  prompt and the text delivered, in the budget and the usage store alike
  (estimated, as the upstream never said).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import aiohttp

from kernelmesh.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violation,
)
from kernelmesh.core.llm import metrics
from kernelmesh.core.llm.breaker import CircuitBreaker, Permit
from kernelmesh.core.llm.budget import BudgetLedger, Reservation
from kernelmesh.core.llm.cache import ResponseCache
from kernelmesh.core.llm.config import (
    DeploymentConfig,
    LLMConfig,
    ModelConfig,
    ModelKind,
    load_config,
)
from kernelmesh.core.llm.providers import FailureKind, Provider, UpstreamError, provider_for
from kernelmesh.core.llm.ratelimit import RateLimiter
from kernelmesh.core.llm.retry import RetryPolicy
from kernelmesh.core.llm.tokens import estimate_prompt_tokens, estimate_tokens, estimate_usage
from kernelmesh.core.llm.types import (
    BreakerState,
    Chunk,
    Completion,
    DeploymentStatus,
    Embeddings,
    GenerationOptions,
    Message,
    ModelInfo,
    Usage,
)
from kernelmesh.core.llm.validation import check_chat, check_inputs
from kernelmesh.core.metrics import child
from kernelmesh.core.store import UsageRecord, UsageStore

T = TypeVar("T")

_NO_CHAT_MODEL = """no chat model is configured, so there is nowhere to send generation requests.
Describe one in a YAML file, for example:

  models:
    gpt-4o-mini:
      kind: chat
      deployments:            # tried in order: the failover chain
        - name: openai
          provider: openai    # or ollama (base_url: http://127.0.0.1:11434, no key)
          base_url: https://api.openai.com/v1
          model: gpt-4o-mini
          api_key_env: OPENAI_API_KEY   # the variable's NAME; keys never go in the file

then export OPENAI_API_KEY=... and start the server with
`kernelmesh serve --llm-config FILE`. Embed needs no configuration: model 'local'."""


@dataclass
class _Deployment:
    model: str
    config: DeploymentConfig
    provider: Provider
    breaker: CircuitBreaker
    retry: RetryPolicy

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class _Model:
    config: ModelConfig
    deployments: list[_Deployment]
    # What to reserve when a request leaves max_tokens at 0: the largest
    # default of the deployments it might land on.
    default_max_tokens: int

    @property
    def name(self) -> str:
        return self.config.name


class _BreakerOpen(Exception):
    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit breaker open, next probe in {retry_in:.1f}s")


@dataclass
class _Admission:
    tenant: str
    tokens: int
    reservation: Reservation


class Gateway:
    def __init__(
        self,
        config: LLMConfig,
        store: UsageStore | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._owns_store = store is None
        self._store = store if store is not None else UsageStore(":memory:")
        self._clock = clock
        self._limiter = RateLimiter(config, clock=clock)
        self._budget = BudgetLedger(config, spent=self._store.budget_spent(), journal=self._store)
        self._cache = ResponseCache(config.cache, clock=clock)
        self._session: aiohttp.ClientSession | None = None
        self._start_lock = asyncio.Lock()
        self._models: dict[str, _Model] = {}
        for model in config.models.values():
            deployments = [self._deployment(model, d) for d in model.deployments]
            self._models[model.name] = _Model(
                model, deployments, max(d.default_max_tokens for d in model.deployments)
            )
        self._has_chat = any(m.kind is ModelKind.CHAT for m in config.models.values())

    @classmethod
    def from_file(cls, path: str | Path | None, store: UsageStore | None = None) -> Gateway:
        """None gives no chat models and the local embedding model."""
        return cls(load_config(path), store)

    def _deployment(self, model: ModelConfig, config: DeploymentConfig) -> _Deployment:
        gauge = child(metrics.BREAKER_STATE, model.name, config.name)
        gauge.set(0)
        breaker = CircuitBreaker(
            self.config.breaker,
            clock=self._clock,
            on_change=lambda state: gauge.set(metrics.BREAKER_VALUES[state]),
        )
        retry = RetryPolicy(self.config.retry, config.max_retries)
        return _Deployment(model.name, config, provider_for(config), breaker, retry)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Opens the one HTTP session every provider shares (keep-alive
        connections are reused across requests, tenants and models)."""
        async with self._start_lock:
            if self._session is not None:
                return
            connector = aiohttp.TCPConnector(
                limit=1024, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30
            )
            # Per-request timeouts come from each deployment's config.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
            for model in self._models.values():
                for deployment in model.deployments:
                    deployment.provider.bind(self._session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owns_store:
            await asyncio.to_thread(self._store.close)

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the API -----------------------------------------------------------

    async def generate(
        self,
        tenant: str,
        model: str,
        messages: Sequence[Message],
        options: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, shared safely
    ) -> Completion:
        entry = self._chat_model(model)
        messages, options = check_chat(messages, options)
        key, hit = self._cached(tenant, model, messages, options)
        if hit is not None:
            return replace(hit, cached=True)
        admission = self._admit(tenant, entry, messages, options)
        used = 0
        try:
            deployment, _, completion = await self._failover(
                entry, lambda d: d.provider.generate(messages, options)
            )
            used = completion.usage.total_tokens
        finally:
            self._settle(admission, used)
        self._record(tenant, deployment, completion.usage)
        self._cache.put(key, completion)
        return completion

    def _cached(
        self, tenant: str, model: str, messages: Sequence[Message], options: GenerationOptions
    ) -> tuple[Hashable | None, Completion | None]:
        """The request's cache key and its cached answer, if any. A hit still takes
        one request from the tenant's rate limit, but no tokens."""
        key = self._cache.key(tenant, model, messages, options)
        hit = self._cache.get(key)
        if hit is not None:
            self._limiter.acquire(tenant, 0)
            child(metrics.REQUESTS, model, hit.provider, "cached").inc()
        return key, hit

    async def stream(
        self,
        tenant: str,
        model: str,
        messages: Sequence[Message],
        options: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, shared safely
    ) -> AsyncIterator[Chunk]:
        entry = self._chat_model(model)
        messages, options = check_chat(messages, options)
        key, hit = self._cached(tenant, model, messages, options)
        if hit is not None:
            yield Chunk(hit.text, hit.provider, hit.deployment, cached=True)
            yield Chunk(
                "",
                hit.provider,
                hit.deployment,
                finish_reason=hit.finish_reason,
                usage=hit.usage,
                cached=True,
            )
            return

        admission = self._admit(tenant, entry, messages, options)
        used = 0
        try:
            deployment, permit, (upstream, chunk) = await self._failover(
                entry, lambda d: _first_chunk(d.provider.stream(messages, options)), stream=True
            )
            delivered = 0
            chars = 0
            parts: list[str] | None = [] if key is not None else None
            try:
                while chunk.finish_reason is None:
                    delivered += 1
                    chars += len(chunk.delta)
                    if parts is not None:
                        parts.append(chunk.delta)
                    yield chunk
                    chunk = await anext(upstream)
            except (UpstreamError, StopAsyncIteration) as e:
                deployment.breaker.record_failure(permit)
                self._failure_metric(deployment, e)
                used = self._charge_partial(
                    tenant, deployment, messages, delivered, chars, "broken"
                )
                reason = str(e) if isinstance(e, UpstreamError) else "ended without a last chunk"
                raise Unavailable(
                    f"stream from {deployment.name} broke after {delivered} chunks: {reason}"
                ) from e
            except BaseException:
                # The consumer cancelled or closed the stream: says nothing
                # about the upstream's health.
                deployment.breaker.release(permit)
                used = self._charge_partial(
                    tenant, deployment, messages, delivered, chars, "cancelled"
                )
                raise
            finally:
                # Closes the upstream response (and its connection when
                # unfinished) before this generator returns.
                await upstream.aclose()
            deployment.breaker.record_success(permit)
            usage = chunk.usage or estimate_usage(messages, chars)
            used = usage.total_tokens
            self._settle(admission, used)
            self._record(tenant, deployment, usage)
            if parts is not None:
                self._cache.put(
                    key,
                    Completion(
                        "".join(parts),
                        chunk.finish_reason,
                        usage,
                        chunk.provider,
                        chunk.deployment,
                    ),
                )
            yield chunk if chunk.usage is not None else replace(chunk, usage=usage)
        finally:
            self._settle(admission, used)

    async def embed(self, tenant: str, model: str, inputs: Sequence[str]) -> Embeddings:
        entry = self._embedding_model(model or self.config.default_embedding_model)
        inputs = check_inputs(inputs)
        estimate = sum(estimate_tokens(text) for text in inputs)
        admission = self._admit_tokens(tenant, estimate)
        used = 0
        try:
            deployment, _, result = await self._failover(entry, lambda d: d.provider.embed(inputs))
            used = result.usage.total_tokens
        finally:
            self._settle(admission, used)
        self._record(tenant, deployment, result.usage)
        return result

    def models(self) -> list[ModelInfo]:
        infos = []
        for model in self._models.values():
            statuses = []
            for d in model.deployments:
                state = d.breaker.state
                statuses.append(
                    DeploymentStatus(
                        d.name, d.provider.provider, state is BreakerState.CLOSED, state
                    )
                )
            infos.append(ModelInfo(model.name, model.config.kind.value, tuple(statuses)))
        return infos

    def usage(self, tenant: str) -> list[UsageRecord]:
        return self._store.summary(tenant)

    # -- models ------------------------------------------------------------

    def _chat_model(self, name: str) -> _Model:
        if not self._has_chat:
            raise FailedPrecondition(_NO_CHAT_MODEL)
        entry = self._lookup(name)
        if entry.config.kind is not ModelKind.CHAT:
            chat = ", ".join(self.config.chat_models)
            raise InvalidArgument(
                [Violation("model", f"{name!r} is an embedding model; chat models: {chat}")]
            )
        return entry

    def _embedding_model(self, name: str) -> _Model:
        entry = self._lookup(name)
        if entry.config.kind is not ModelKind.EMBEDDING:
            embedding = ", ".join(
                m.name for m in self._models.values() if m.config.kind is ModelKind.EMBEDDING
            )
            raise InvalidArgument(
                [Violation("model", f"{name!r} is a chat model; embedding models: {embedding}")]
            )
        return entry

    def _lookup(self, name: str) -> _Model:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(
                f"model {name!r} is not configured; configured: {', '.join(self._models)}"
            )
        return entry

    # -- governance ----------------------------------------------------------

    def _admit(
        self, tenant: str, model: _Model, messages: Sequence[Message], options: GenerationOptions
    ) -> _Admission:
        worst_case = estimate_prompt_tokens(messages) + (
            options.max_tokens or model.default_max_tokens
        )
        return self._admit_tokens(tenant, worst_case)

    def _admit_tokens(self, tenant: str, tokens: int) -> _Admission:
        # No await between the two: a request is either admitted by both the
        # budget and the rate limiter or charged by neither.
        reservation = self._budget.reserve(tenant, tokens)
        try:
            self._limiter.acquire(tenant, tokens)
        except BaseException:
            self._budget.settle(reservation, 0)
            raise
        return _Admission(tenant, tokens, reservation)

    def _settle(self, admission: _Admission, used: int) -> None:
        if admission.reservation.settled:
            return
        self._budget.settle(admission.reservation, used)
        self._limiter.settle(admission.tenant, admission.tokens, used)

    def _record(
        self, tenant: str, deployment: _Deployment, usage: Usage, outcome: str = "ok"
    ) -> None:
        cost = deployment.config.cost(usage.prompt_tokens, usage.completion_tokens)
        provider = deployment.provider.provider
        self._store.record(tenant, deployment.model, provider, deployment.name, usage, cost)
        child(metrics.REQUESTS, deployment.model, provider, outcome).inc()
        child(metrics.TOKENS, deployment.model, provider, "prompt").inc(usage.prompt_tokens)
        child(metrics.TOKENS, deployment.model, provider, "completion").inc(usage.completion_tokens)

    def _charge_partial(
        self,
        tenant: str,
        deployment: _Deployment,
        messages: Sequence[Message],
        delivered: int,
        chars: int,
        outcome: str,
    ) -> int:
        """A stream that ended early after delivering text is charged (budget
        and usage store alike) the prompt and the delivered text, estimated:
        the upstream never sent its usage. Returns the tokens charged."""
        if not delivered:
            return 0
        usage = estimate_usage(messages, chars)
        self._record(tenant, deployment, usage, outcome)
        return usage.total_tokens

    # -- resilience ----------------------------------------------------------

    async def _failover(
        self,
        model: _Model,
        call: Callable[[_Deployment], Awaitable[T]],
        *,
        stream: bool = False,
    ) -> tuple[_Deployment, Permit, T]:
        """Tries each deployment in order; returns the first success with the
        deployment that gave it and its breaker permit (still held for a
        stream, whose caller settles it at the stream's end)."""
        if self._session is None:
            await self.start()
        failures: list[str] = []
        all_misconfigured = True
        # Retry-After of each deployment that answered 429; None once any failed otherwise
        rate_limited: list[float] | None = []
        for deployment in model.deployments:
            try:
                permit, result = await self._with_retries(deployment, call, stream)
                return deployment, permit, result
            except _BreakerOpen as e:
                failures.append(f"{deployment.name}: {e}")
                all_misconfigured = False
                rate_limited = None
            except UpstreamError as e:
                if rate_limited is not None and e.status == 429:
                    rate_limited.append(e.retry_after if e.retry_after is not None else 1.0)
                else:
                    rate_limited = None
                if e.kind is FailureKind.BAD_REQUEST:
                    raise InvalidArgument(
                        [Violation("request", f"{deployment.name} refused the request: {e}")]
                    ) from e
                failures.append(f"{deployment.name}: {e}")
                all_misconfigured &= e.kind is FailureKind.MISCONFIGURED
        child(metrics.REQUESTS, model.name, "", "error").inc()
        summary = f"model {model.name!r}: every deployment failed: " + "; ".join(failures)
        if all_misconfigured:
            raise FailedPrecondition(summary)
        if rate_limited:
            # every provider is throttling this model: say when the first will take calls
            raise ResourceExhausted(summary, retry_after=min(rate_limited))
        raise Unavailable(summary)

    async def _with_retries(
        self, deployment: _Deployment, call: Callable[[_Deployment], Awaitable[T]], stream: bool
    ) -> tuple[Permit, T]:
        return await deployment.retry.call(lambda: self._attempt(deployment, call, stream))

    async def _attempt(
        self, deployment: _Deployment, call: Callable[[_Deployment], Awaitable[T]], stream: bool
    ) -> tuple[Permit, T]:
        breaker = deployment.breaker
        permit = breaker.allow()
        if permit is None:
            raise _BreakerOpen(breaker.retry_in())
        try:
            result = await call(deployment)
        except UpstreamError as e:
            self._failure_metric(deployment, e)
            if e.kind is FailureKind.BAD_REQUEST:
                breaker.release(permit)
            else:
                breaker.record_failure(permit)
            raise
        except BaseException:
            breaker.release(permit)
            raise
        # A stream's health is known at its end; the caller settles it then.
        if not stream:
            breaker.record_success(permit)
        return permit, result

    @staticmethod
    def _failure_metric(deployment: _Deployment, error: BaseException) -> None:
        kind = error.kind.value if isinstance(error, UpstreamError) else "broken"
        child(metrics.UPSTREAM_FAILURES, deployment.model, deployment.name, kind).inc()


async def _first_chunk(
    upstream: AsyncIterator[Chunk],
) -> tuple[AsyncIterator[Chunk], Chunk]:
    """Opens a stream up to its first chunk, so that failures before any text
    was delivered can still be retried or failed over."""
    try:
        first = await anext(upstream)
    except BaseException:
        await upstream.aclose()  # type: ignore[attr-defined]
        raise
    return upstream, first
