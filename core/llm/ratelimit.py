"""Per-tenant token buckets: requests per minute and tokens per minute.

A request is admitted only when both buckets hold enough; otherwise it is
refused with the time until they will, which becomes RetryInfo. Tokens are
charged up front on an estimate (prompt estimate + max_tokens) and settled
with the real usage afterwards, so a tenant is never refused for tokens it
did not use, and usage above the estimate is still paid for (the bucket may
go into debt, delaying the tenant's next requests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kernelmesh.core.errors import InvalidArgument, ResourceExhausted, Violation
from kernelmesh.core.llm.config import LLMConfig, TenantLimits


class TokenBucket:
    """Holds up to `capacity`, refilled continuously at capacity per `period_s`."""

    def __init__(self, capacity: float, period_s: float, clock: Callable[[], float]) -> None:
        self.capacity = float(capacity)
        self._rate = capacity / period_s
        self._clock = clock
        self._level = float(capacity)
        self._updated = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self._rate)
        self._updated = now
        return self._level

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0 when it can be now)."""
        missing = amount - self.level()
        return 0.0 if missing <= 0 else missing / self._rate

    def take(self, amount: float) -> None:
        self.level()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        self.level()
        self._level = min(self.capacity, self._level + amount)


class _TenantBuckets:
    def __init__(self, limits: TenantLimits, clock: Callable[[], float]) -> None:
        self.requests = (
            TokenBucket(limits.requests_per_minute, 60.0, clock)
            if limits.requests_per_minute is not None
            else None
        )
        self.tokens = (
            TokenBucket(limits.tokens_per_minute, 60.0, clock)
            if limits.tokens_per_minute is not None
            else None
        )


class RateLimiter:
    def __init__(self, config: LLMConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._tenants: dict[str, _TenantBuckets] = {}
        self._lock = threading.Lock()

    def _buckets(self, tenant: str) -> _TenantBuckets:
        found = self._tenants.get(tenant)
        if found is None:
            limits = self._config.limits_for(tenant)
            found = _TenantBuckets(limits, self._clock)
            # Tenant names come from callers: only those with limits to
            # track are kept, or every name ever seen would stay in memory.
            if found.requests is not None or found.tokens is not None:
                self._tenants[tenant] = found
        return found

    def acquire(self, tenant: str, tokens: int) -> None:
        """Takes one request and `tokens` tokens, or raises ResourceExhausted
        without taking anything."""
        with self._lock:
            buckets = self._buckets(tenant)
            if buckets.tokens is not None and tokens > buckets.tokens.capacity:
                # No amount of waiting admits this request: say what to change.
                raise InvalidArgument(
                    [
                        Violation(
                            "options.max_tokens",
                            f"the request needs up to {tokens} tokens, more than tenant "
                            f"{tenant!r}'s tokens_per_minute ({int(buckets.tokens.capacity)}); "
                            f"lower max_tokens or shorten the prompt",
                        )
                    ]
                )
            wait_requests = buckets.requests.wait_for(1) if buckets.requests else 0.0
            wait_tokens = buckets.tokens.wait_for(tokens) if buckets.tokens and tokens else 0.0
            if wait_requests > 0 or wait_tokens > 0:
                what = (
                    f"requests_per_minute ({int(buckets.requests.capacity)})"
                    if wait_requests >= wait_tokens and buckets.requests
                    else f"tokens_per_minute ({int(buckets.tokens.capacity)})"  # type: ignore[union-attr]
                )
                retry_after = max(wait_requests, wait_tokens)
                raise ResourceExhausted(
                    f"tenant {tenant!r} is over its {what}; retry in {retry_after:.2f}s",
                    retry_after=retry_after,
                )
            if buckets.requests is not None:
                buckets.requests.take(1)
            if buckets.tokens is not None and tokens:
                buckets.tokens.take(tokens)

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        """Corrects a reservation of `reserved` tokens to the `used` ones."""
        with self._lock:
            bucket = self._buckets(tenant).tokens
            if bucket is None or reserved == used:
                return
            if used < reserved:
                bucket.give_back(reserved - used)
            else:
                bucket.take(used - reserved)
