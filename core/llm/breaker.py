"""A circuit breaker per deployment, so a dead upstream is skipped at once
instead of costing every request a timeout.

CLOSED counts consecutive failures; at failure_threshold it opens. OPEN refuses
every call until recovery_timeout_s has passed, then turns HALF_OPEN, which
admits one probe at a time: success_threshold successful probes close it, one
failure opens it again for another recovery_timeout_s.

`allow` hands out a Permit naming the breaker's state generation; a call's
outcome counts only while that generation lasts, so a call admitted before
the breaker opened can neither free the half-open probe slot nor count as a
probe when it finally ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kernelmesh.core.llm.config import BreakerConfig
from kernelmesh.core.llm.types import BreakerState


@dataclass(frozen=True)
class Permit:
    """Permission for one call, from `allow`; truthy."""

    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        # Bumped on every state change: permits from before are stale.
        self._generation = 0
        # Calls come from the event loop, but the HTTP facade or a sync caller
        # may share the gateway from another thread; the lock is uncontended
        # and costs well under a microsecond.
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a probe (0 when it would now)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self._config.recovery_timeout_s - self._clock())

    def allow(self) -> Permit | None:
        """Takes permission for one call, or None; every permit must be
        handed back to record_success, record_failure or release."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return Permit(self._generation, probe=False)
            if self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return Permit(self._generation, probe=True)
            return None

    def _stale(self, permit: Permit | None) -> bool:
        """Whether the call was admitted under an earlier state (None: a
        caller that does not track permits, counted as current)."""
        return permit is not None and permit.generation != self._generation

    def record_success(self, permit: Permit | None = None) -> None:
        with self._lock:
            if self._stale(permit):
                return
            if self._state is BreakerState.HALF_OPEN:
                self._probe_in_flight = False
                self._successes += 1
                if self._successes >= self._config.success_threshold:
                    self._set(BreakerState.CLOSED)
            else:
                self._failures = 0

    def record_failure(self, permit: Permit | None = None) -> None:
        with self._lock:
            if self._stale(permit):
                return
            if self._state is BreakerState.HALF_OPEN:
                self._probe_in_flight = False
                self._open()
            elif self._state is BreakerState.CLOSED:
                self._failures += 1
                if self._failures >= self._config.failure_threshold:
                    self._open()

    def release(self, permit: Permit | None = None) -> None:
        """Ends a call that says nothing about the upstream's health (the
        caller cancelled, or the request itself was invalid)."""
        with self._lock:
            if self._stale(permit):
                return
            if self._state is BreakerState.HALF_OPEN:
                self._probe_in_flight = False

    def _maybe_half_open(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._config.recovery_timeout_s
        ):
            self._set(BreakerState.HALF_OPEN)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._generation += 1
        self._state = state
        self._failures = 0
        self._successes = 0
        self._probe_in_flight = False
        if self._on_change is not None:
            self._on_change(state)
