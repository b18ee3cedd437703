"""Retries of one deployment's retryable failures (timeouts, connection
errors, 5xx, 429, malformed or cut answers), with exponential backoff plus
jitter, honouring an upstream's Retry-After up to a cap. Other 4xx are never
retried. Every attempt, and every wait between them, fits in the
deployment's window (see deployment_window); then the gateway fails over to
the next deployment."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_any, stop_base

from kernelmesh.core.llm.config import RetryConfig
from kernelmesh.core.llm.providers.base import UpstreamError

T = TypeVar("T")

# A retry that would have less time than this before the window closes is
# not started: failing over serves the caller sooner.
_MIN_ATTEMPT_S = 0.05


def deployment_window(remaining: float | None, left: int, timeout_s: float) -> float:
    """Seconds one deployment may hold a request, its retries included: its
    own timeout_s, cut to an equal share of the caller's `remaining` time
    among the `left` deployments still to try (itself included), so that a
    hung one leaves the others their turn before the caller gives up."""
    if remaining is None:
        return timeout_s
    return max(0.0, min(timeout_s, remaining / max(1, left)))


class _OutOfWindow(stop_base):
    """Stops when the next attempt could not start, after its wait, with
    _MIN_ATTEMPT_S still left before `until` (event-loop time)."""

    def __init__(self, until: float) -> None:
        self.until = until

    def __call__(self, retry_state: RetryCallState) -> bool:
        now = asyncio.get_running_loop().time()
        return now + retry_state.upcoming_sleep + _MIN_ATTEMPT_S >= self.until


class RetryPolicy:
    def __init__(self, config: RetryConfig, max_retries: int) -> None:
        self.config = config
        self.max_retries = max_retries
        # Attempt numbers in tenacity count from the first retry; the first
        # attempt runs outside it (see call).
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, max_retries)),
            wait=self._wait,
            retry=retry_if_exception(self.should_retry),
            reraise=True,
        )

    def should_retry(self, error: BaseException) -> bool:
        if not isinstance(error, UpstreamError) or not error.retryable:
            return False
        # Waiting longer than max_retry_after_s would hold the caller
        # hostage; failing over serves them sooner.
        return error.retry_after is None or error.retry_after <= self.config.max_retry_after_s

    def delay(self, error: BaseException | None, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        if isinstance(error, UpstreamError) and error.retry_after is not None:
            return error.retry_after
        # Exponential backoff plus random jitter, so that many clients
        # retrying together do not hit the upstream in step.
        exponential: float = self.config.initial_backoff_s * 2 ** (attempt - 1)
        jitter = random.uniform(0, self.config.initial_backoff_s)
        return min(self.config.max_backoff_s, exponential) + jitter

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return self.delay(error, state.attempt_number + 1)

    async def call(self, attempt: Callable[[], Awaitable[T]], until: float) -> T:
        """Runs `attempt`, retrying while it fails retryably and the next try
        still fits before `until` (event-loop time)."""
        # The first attempt runs bare: the common, successful case pays
        # nothing for tenacity's bookkeeping (tens of microseconds).
        try:
            return await attempt()
        except UpstreamError as e:
            if self.max_retries == 0 or not self.should_retry(e):
                raise
            first = e
        wait = self.delay(first, 1)
        if asyncio.get_running_loop().time() + wait + _MIN_ATTEMPT_S >= until:
            raise first
        await asyncio.sleep(wait)
        retrying = self._retrying.copy(
            stop=stop_any(stop_after_attempt(max(1, self.max_retries)), _OutOfWindow(until))
        )
        async for retry in retrying:
            with retry:
                return await attempt()
        raise AssertionError("unreachable: tenacity reraises the last failure")
