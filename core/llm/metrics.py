"""Prometheus metrics of the LLM gateway, on the registry the sidecar's
/metrics serves. Module-level, like kernelmesh.core.metrics, so several
gateways in one process (tests) share them instead of colliding."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from kernelmesh.core.llm.types import BreakerState

BREAKER_STATE = Gauge(
    "kernelmesh_llm_breaker_state",
    "Circuit breaker state per deployment: 0 closed, 1 open, 2 half-open.",
    ["model", "deployment"],
)
REQUESTS = Counter(
    "kernelmesh_llm_requests_total",
    "LLM requests by outcome: ok, cached, error (failed), rejected (refused by the "
    'tenant\'s rate limit or token budget; provider="" for both).',
    ["model", "provider", "outcome"],
)
TOKENS = Counter(
    "kernelmesh_llm_tokens_total",
    "Tokens used, as reported by the upstream (or estimated when it does not say).",
    ["model", "provider", "kind"],
)
UPSTREAM_FAILURES = Counter(
    "kernelmesh_llm_upstream_failures_total",
    "Failed upstream attempts, retried or not.",
    ["model", "deployment", "kind"],
)

BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}
FAILED_REQUESTS = Counter(
    "kernelmesh_llm_failed_requests_total",
    "LLM calls that failed or were refused, by reason: rate_limit and token_budget "
    "(refused by the tenant's limits), or the error's reason in lower case (not_found, "
    "invalid_argument, failed_precondition, unavailable, resource_exhausted). An unknown "
    'model is counted under model="".',
    ["model", "reason"],
)
FAILOVERS = Counter(
    "kernelmesh_llm_failovers_total",
    "Requests passed on to the next deployment, by the deployment that failed them.",
    ["model", "deployment"],
)
