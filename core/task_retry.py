"""Retry policy of submitted tasks: Temporal's RetryPolicy fields and
defaults, with Ray's default of 3 attempts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kernelmesh.core.errors import Code

PERMISSION_DENIED = 7
# Errors that say retrying cannot help: bad input, a missing backend or model,
# a refused caller; cancellation and the task's own deadline end it too.
ALWAYS_FINAL = frozenset(
    {
        int(Code.INVALID_ARGUMENT),
        int(Code.FAILED_PRECONDITION),
        PERMISSION_DENIED,
        int(Code.CANCELLED),
        int(Code.DEADLINE_EXCEEDED),
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_interval: float = 1.0  # seconds
    backoff_coefficient: float = 2.0
    maximum_interval: float | None = None  # None: 100 x initial_interval
    maximum_attempts: int = 3  # attempts in all; 1 never retries
    non_retryable: frozenset[int] = field(default_factory=frozenset)  # google.rpc.Code values

    def retryable(self, code: int) -> bool:
        return code not in ALWAYS_FINAL and code not in self.non_retryable

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` failed."""
        cap = self.maximum_interval
        if cap is None:
            cap = 100.0 * self.initial_interval
        return min(self.initial_interval * self.backoff_coefficient ** max(0, attempt - 1), cap)

    def to_json(self) -> dict[str, object]:
        return {
            "initial_interval": self.initial_interval,
            "backoff_coefficient": self.backoff_coefficient,
            "maximum_interval": self.maximum_interval,
            "maximum_attempts": self.maximum_attempts,
            "non_retryable": sorted(self.non_retryable),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(
            initial_interval=float(data["initial_interval"]),
            backoff_coefficient=float(data["backoff_coefficient"]),
            maximum_interval=data.get("maximum_interval"),
            maximum_attempts=int(data["maximum_attempts"]),
            non_retryable=frozenset(int(c) for c in data.get("non_retryable", ())),
        )


DEFAULT_RETRY = RetryPolicy()
