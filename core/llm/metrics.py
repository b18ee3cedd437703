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
    "LLM requests by outcome (ok, cached, error, rejected).",
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
