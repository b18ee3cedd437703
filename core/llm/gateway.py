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
  configuration's fault: no retry, but failover; they are not breaker
  failures (the upstream is up, and the caller must keep seeing the cause,
  not "circuit breaker open") but mark the deployment unhealthy, with the
  reason, in models(). A missing API key variable is found at construction,
  logged, and the deployment skipped without a request. When every
  deployment failed that way the answer is FailedPrecondition.
- 429 is not a breaker failure either: the upstream is alive and says when
  to come back. When every deployment throttles, the caller gets
  ResourceExhausted with the soonest Retry-After, which works because no
  breaker opened meanwhile.
- Deadlines: each deployment gets a window, its timeout_s cut to an equal
  share of the caller's remaining time among the deployments still to try;
  its attempts and the waits between them fit in it, so a hung deployment
  leaves the next ones their turn before the caller gives up.
- A stream fails over only before its first chunk; once text was delivered, a
  break raises Unavailable naming the deployment and the chunks delivered.
- A failed call costs nothing; a cancelled or broken stream is charged the
  prompt and the text delivered, in the budget and the usage store alike
  (estimated, as the upstream never said).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import aiohttp

from kernelmesh.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KernelmeshError,
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
from kernelmesh.core.llm.retry import RetryPolicy, deployment_window
from kernelmesh.core.llm.tokens import (
    estimate_prompt_tokens,
    estimate_tokens,
    estimate_usage,
    input_token_bound,
    prompt_token_bound,
)
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

log = logging.getLogger(__name__)

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
    # The upstream's last refusal of this deployment's key or model id
    # (401/403/404), until a call succeeds.
    refused: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def unusable(self) -> str | None:
        """Why no call is even attempted (a missing API key), or None."""
        return self.provider.unusable


@dataclass
class _Model:
    config: ModelConfig
    deployments: list[_Deployment]
    # What to reserve when a request leaves max_tokens at 0: the largest
    # default of the deployments it might land on.
    default_max_tokens: int
    # The largest template allowance of those deployments.
    prompt_overhead: int

    @property
    def name(self) -> str:
        return self.config.name


class _BreakerOpen(Exception):
    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit breaker open, next probe in {retry_in:.1f}s")
        self.retry_in = retry_in


@dataclass
class _Admission:
    tenant: str
    # Charged to the rate limiter: an estimate, corrected afterwards.
    tokens: int
    # Held in the budget: a bound no honest upstream exceeds.
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
                model,
                deployments,
                max(d.default_max_tokens for d in model.deployments),
                max(d.prompt_overhead_tokens for d in model.deployments),
            )
            for deployment in deployments:
                if deployment.unusable is not None:
                    log.warning(
                        "LLM model %r, deployment %r is unusable: %s; it is skipped until "
                        "the server is restarted with the variable set",
                        model.name,
                        deployment.name,
                        deployment.unusable,
                    )
        self._has_chat = any(m.kind is ModelKind.CHAT for m in config.models.values())

    @classmethod
    def from_file(cls, path: str | Path | None, store: UsageStore | None = None) -> Gateway:
        """None gives no chat models and the local embedding model."""
        return cls(load_config(path), store)

    def _deployment(self, model: ModelConfig, config: DeploymentConfig) -> _Deployment:
        breaker = CircuitBreaker(self.config.breaker, clock=self._clock)
        # Read at each scrape: an open breaker turns half-open when its
        # cool-down ends, whether or not a call asks it.
        metrics.BREAKER_STATE.labels(model.name, config.name).set_function(
            lambda: metrics.BREAKER_VALUES[breaker.state]
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
        for model in self._models.values():
            for d in model.deployments:
                # The series keeps its last value, not this gateway alive.
                last = metrics.BREAKER_VALUES[d.breaker.state]
                metrics.BREAKER_STATE.labels(model.name, d.name).set_function(lambda v=last: v)  # type: ignore[misc]
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
        *,
        timeout: float | None = None,
    ) -> Completion:
        """`timeout`: the seconds the caller will wait (its deadline), which
        sizes each deployment's window; None leaves them their timeout_s."""
        try:
            entry = self._chat_model(model)
            messages, options = check_chat(messages, options)
            key, hit = self._cached(tenant, model, messages, options)
            if hit is not None:
                return replace(hit, cached=True)
            admission = await self._admit(tenant, entry, messages, options)
            used = 0
            try:
                deployment, _, completion = await self._failover(
                    entry, lambda d: d.provider.generate(messages, options), timeout
                )
                used = completion.usage.total_tokens
            finally:
                await self._settled(admission, used)
        except KernelmeshError as e:
            _count_failure(model, self._models, e)
            raise
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
            try:
                self._limiter.acquire(tenant, 0)
            except KernelmeshError as e:
                e.metric_reason = "rate_limit"  # type: ignore[attr-defined]
                raise
            child(metrics.REQUESTS, model, hit.provider, "cached").inc()
        return key, hit

    async def stream(
        self,
        tenant: str,
        model: str,
        messages: Sequence[Message],
        options: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, shared safely
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """`timeout` as for generate; it sizes the windows for the first chunk."""
        try:
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

            admission = await self._admit(tenant, entry, messages, options)
            used = 0
            try:
                deployment, permit, (upstream, chunk) = await self._failover(
                    entry,
                    lambda d: _first_chunk(d.provider.stream(messages, options)),
                    timeout,
                    stream=True,
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
                    reason = (
                        str(e) if isinstance(e, UpstreamError) else "ended without a last chunk"
                    )
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
                deployment.refused = None
                usage = chunk.usage or estimate_usage(messages, chars)
                used = usage.total_tokens
                await self._settled(admission, used)
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
        except KernelmeshError as e:
            _count_failure(model, self._models, e)
            raise

    async def embed(
        self, tenant: str, model: str, inputs: Sequence[str], *, timeout: float | None = None
    ) -> Embeddings:
        model = model or self.config.default_embedding_model
        try:
            entry = self._embedding_model(model)
            inputs = check_inputs(inputs)
            estimate = sum(estimate_tokens(text) for text in inputs)
            admission = await self._admit_tokens(tenant, entry, estimate, input_token_bound(inputs))
            used = 0
            try:
                deployment, _, result = await self._failover(
                    entry, lambda d: d.provider.embed(inputs), timeout
                )
                used = result.usage.total_tokens
            finally:
                await self._settled(admission, used)
        except KernelmeshError as e:
            _count_failure(model, self._models, e)
            raise
        self._record(tenant, deployment, result.usage)
        return result

    def models(self) -> list[ModelInfo]:
        infos = []
        for model in self._models.values():
            statuses = []
            for d in model.deployments:
                state = d.breaker.state
                reason = d.unusable or d.refused or ""
                statuses.append(
                    DeploymentStatus(
                        d.name,
                        d.provider.provider,
                        state is BreakerState.CLOSED and not reason,
                        state,
                        reason,
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

    def _reservation_for(
        self, messages: Sequence[Message], options: GenerationOptions, model: str
    ) -> int:
        """The budget a chat request holds while it runs: a bound on its
        prompt no honest upstream exceeds, plus the most it may generate."""
        entry = self._models[model]
        return prompt_token_bound(messages, entry.prompt_overhead) + (
            options.max_tokens or entry.default_max_tokens
        )

    async def _admit(
        self, tenant: str, model: _Model, messages: Sequence[Message], options: GenerationOptions
    ) -> _Admission:
        completion = options.max_tokens or model.default_max_tokens
        return await self._admit_tokens(
            tenant,
            model,
            estimate_prompt_tokens(messages) + completion,
            prompt_token_bound(messages, model.prompt_overhead) + completion,
        )

    async def _admit_tokens(
        self, tenant: str, model: _Model, estimate: int, bound: int
    ) -> _Admission:
        """Takes `bound` tokens of the tenant's budget and `estimate` of its
        per-minute limit, or neither: a refused rate limit gives the reservation
        back. The reservation is awaited (a database transaction when the budget
        lives in the configured store), committed before the upstream call."""
        try:
            reservation = await self._budget.reserve_async(tenant, bound)
        except KernelmeshError as e:
            e.metric_reason = "token_budget"  # type: ignore[attr-defined]
            raise
        try:
            self._limiter.acquire(tenant, estimate)
        except BaseException as e:
            self._budget.settle(reservation, 0)
            if isinstance(e, KernelmeshError):
                e.metric_reason = "rate_limit"  # type: ignore[attr-defined]
            raise
        return _Admission(tenant, estimate, reservation)

    def _settle(self, admission: _Admission, used: int) -> None:
        if admission.reservation.settled:
            return
        self._budget.settle(admission.reservation, used)
        self._limiter.settle(admission.tenant, admission.tokens, used)

    async def _settled(self, admission: _Admission, used: int) -> None:
        """`_settle`, answering only once a shared budget has the settlement, so
        the caller's next request is not refused for the one that just ended."""
        if admission.reservation.settled:
            return
        self._limiter.settle(admission.tenant, admission.tokens, used)
        await self._budget.settle_async(admission.reservation, used)

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
        timeout: float | None,
        *,
        stream: bool = False,
    ) -> tuple[_Deployment, Permit, T]:
        """Tries each deployment in order, each within its window; returns the
        first success with the deployment that gave it and its breaker permit
        (still held for a stream, whose caller settles it at the stream's end)."""
        if self._session is None:
            await self.start()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        failures: list[str] = []
        all_misconfigured = True
        # When each throttling (429) or open deployment takes calls again;
        # None once any failed otherwise.
        come_back: list[float] | None = []
        throttled = False
        last = len(model.deployments) - 1
        for i, deployment in enumerate(model.deployments):
            if i:
                child(metrics.FAILOVERS, model.name, model.deployments[i - 1].name).inc()
            unusable = deployment.unusable
            if unusable is not None:
                failures.append(f"{deployment.name}: {unusable}")
                continue
            remaining = None if deadline is None else deadline - loop.time()
            left = 1 if deadline is None or i == last else _open_to_calls(model.deployments[i:])
            window = deployment_window(remaining, left, deployment.config.timeout_s)
            if window <= 0:
                break  # the caller's time is up
            until = loop.time() + window
            # A window cut short by the caller's deadline that closes says
            # nothing against the upstream: only its own timeout_s does.
            own = window >= deployment.config.timeout_s
            try:
                permit, result = await deployment.retry.call(
                    functools.partial(self._attempt, deployment, call, stream, until, own),
                    until,
                )
                return deployment, permit, result
            except _BreakerOpen as e:
                failures.append(f"{deployment.name}: {e}")
                all_misconfigured = False
                if come_back is not None:
                    come_back.append(e.retry_in)
            except UpstreamError as e:
                if e.kind is FailureKind.BAD_REQUEST:
                    raise InvalidArgument(
                        [Violation("request", f"{deployment.name} refused the request: {e}")]
                    ) from e
                if come_back is not None and e.kind is FailureKind.RATE_LIMITED:
                    throttled = True
                    come_back.append(e.retry_after if e.retry_after is not None else 1.0)
                elif e.kind is not FailureKind.MISCONFIGURED:
                    come_back = None
                failures.append(f"{deployment.name}: {e}")
                all_misconfigured &= e.kind is FailureKind.MISCONFIGURED
        summary = f"model {model.name!r}: every deployment failed: " + "; ".join(failures)
        if deadline is not None and loop.time() >= deadline:
            # The last window closed with the caller's time: say so, as the
            # caller's own clock is about to.
            raise DeadlineExceeded(f"the deadline passed; {summary}")
        if all_misconfigured:
            raise FailedPrecondition(summary)
        if come_back and throttled:
            # Every deployment that can answer is throttling (or cooling down):
            # the soonest of them is when a retry can work.
            raise ResourceExhausted(summary, retry_after=min(come_back))
        raise Unavailable(summary)

    async def _attempt(
        self,
        deployment: _Deployment,
        call: Callable[[_Deployment], Awaitable[T]],
        stream: bool,
        until: float,
        own_timeout: bool,
    ) -> tuple[Permit, T]:
        breaker = deployment.breaker
        permit = breaker.allow()
        if permit is None:
            raise _BreakerOpen(breaker.retry_in())
        try:
            async with asyncio.timeout_at(until):
                result = await call(deployment)
        except UpstreamError as e:
            self._failure_metric(deployment, e)
            if e.kind in _NOT_A_FAULT:
                breaker.release(permit)
                if e.kind is FailureKind.MISCONFIGURED:
                    deployment.refused = str(e)
            else:
                breaker.record_failure(permit)
            raise
        except TimeoutError as e:
            # The window closed (asyncio.timeout_at); the provider's own
            # timeouts arrive as UpstreamError.
            error = UpstreamError(
                deployment.name, FailureKind.TIMEOUT, "no answer within the deployment's window"
            )
            self._failure_metric(deployment, error)
            if own_timeout:
                breaker.record_failure(permit)
            else:
                breaker.release(permit)
            raise error from e
        except BaseException:
            breaker.release(permit)
            raise
        # A stream's health is known at its end; the caller settles it then.
        if not stream:
            breaker.record_success(permit)
            deployment.refused = None
        return permit, result

    @staticmethod
    def _failure_metric(deployment: _Deployment, error: BaseException) -> None:
        kind = error.kind.value if isinstance(error, UpstreamError) else "broken"
        child(metrics.UPSTREAM_FAILURES, deployment.model, deployment.name, kind).inc()


# Failures that say nothing against the upstream's health: the request's own
# fault, throttling (the upstream is alive and says when to come back), and a
# deployment's configuration (key, model id) that a breaker cannot fix.
_NOT_A_FAULT = {FailureKind.BAD_REQUEST, FailureKind.RATE_LIMITED, FailureKind.MISCONFIGURED}


def _open_to_calls(deployments: Sequence[_Deployment]) -> int:
    """How many of these may take a call now (usable, breaker not open): the
    ones a caller's remaining time is shared among."""
    return max(
        1,
        sum(
            1
            for d in deployments
            if d.unusable is None and d.breaker.state is not BreakerState.OPEN
        ),
    )


def _count_failure(model: str, models: dict[str, _Model], error: KernelmeshError) -> None:
    """Counts a failed or refused call by reason. An unknown model name is no
    label: callers choose it, and every name would be a new series."""
    label = model if model in models else ""
    reason = getattr(error, "metric_reason", None)
    child(metrics.REQUESTS, label, "", "rejected" if reason else "error").inc()
    child(metrics.FAILED_REQUESTS, label, reason or error.reason.lower()).inc()


async def _first_chunk(
    upstream: AsyncGenerator[Chunk, None],
) -> tuple[AsyncGenerator[Chunk, None], Chunk]:
    """Opens a stream up to its first chunk, so that failures before any text
    was delivered can still be retried or failed over."""
    try:
        first = await anext(upstream)
    except BaseException:
        await upstream.aclose()
        raise
    return upstream, first
