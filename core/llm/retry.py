"""Retries of one deployment's retryable failures (timeouts, connection
errors, 5xx, 429, malformed or cut answers), with exponential backoff plus
jitter, honouring an upstream's Retry-After up to a cap. Other 4xx are never
retried. After max_retries the gateway fails over to the next deployment."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from kernelmesh.core.llm.config import RetryConfig
from kernelmesh.core.llm.providers.base import UpstreamError

T = TypeVar("T")


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
        exponential = self.config.initial_backoff_s * 2 ** (attempt - 1)
        jitter = random.uniform(0, self.config.initial_backoff_s)
        return min(self.config.max_backoff_s, exponential) + jitter

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return self.delay(error, state.attempt_number + 1)

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        # The first attempt runs bare: the common, successful case pays
        # nothing for tenacity's bookkeeping (tens of microseconds).
        try:
            return await attempt()
        except UpstreamError as e:
            if self.max_retries == 0 or not self.should_retry(e):
                raise
            first = e
        await asyncio.sleep(self.delay(first, 1))
        async for retry in self._retrying.copy():
            with retry:
                return await attempt()
        raise AssertionError("unreachable: tenacity reraises the last failure")
