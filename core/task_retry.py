"""Retry policy of submitted tasks: Temporal's RetryPolicy fields and
defaults, with Ray's default of 3 attempts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kernelmesh.core.errors import Code, InvalidArgument, Violation

PERMISSION_DENIED = 7
MAX_ATTEMPTS = 100
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


def checked_policy(
    *,
    initial_interval: float | None,
    backoff_coefficient: float,
    maximum_interval: float | None,
    maximum_attempts: int,
    non_retryable: Iterable[int],
    field: str,
    violations: Iterable[Violation] = (),
) -> RetryPolicy:
    """A task's retry policy from a request's fields, Temporal's defaults for the
    unset ones (None or 0); every field out of range is named in one
    InvalidArgument, with the `violations` the caller found already."""
    found: list[Violation] = []
    initial = DEFAULT_RETRY.initial_interval if initial_interval is None else initial_interval
    if initial <= 0:
        found.append(Violation(f"{field}.initial_interval", "must be > 0"))
    if maximum_interval is not None and maximum_interval < initial:
        found.append(Violation(f"{field}.maximum_interval", "must be >= initial_interval"))
    backoff = backoff_coefficient or DEFAULT_RETRY.backoff_coefficient
    if not 1.0 <= backoff <= 100.0:
        found.append(Violation(f"{field}.backoff_coefficient", "must be in [1, 100]"))
    attempts = maximum_attempts or DEFAULT_RETRY.maximum_attempts
    if not 1 <= attempts <= MAX_ATTEMPTS:
        found.append(
            Violation(f"{field}.maximum_attempts", f"must be in [0, {MAX_ATTEMPTS}] (0: 3)")
        )
    found.extend(violations)
    if found:
        raise InvalidArgument(found)
    return RetryPolicy(initial, backoff, maximum_interval, attempts, frozenset(non_retryable))
