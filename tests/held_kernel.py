"""A device whose kernels of one op wait at a gate until the test releases them.

Tests that need a task still RUNNING (or others still QUEUED behind it) at some
moment hold its kernel instead of guessing how long a big matmul takes: a guess
goes stale on a faster machine, and on a loaded one a poll can miss the whole
run. The held kernel then runs for real, so the task ends as it would have."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kernelmesh.core.devices import LocalDevice

# Released by then whatever the test does, so a kernel thread never outlives it for long.
HOLD_LIMIT_S = 120.0


class HeldKernel:
    """`device.run` of `op` blocks (in its kernel thread) until `release()`.
    Construct it before the task is submitted; `release()` in a `finally`. The
    task must be one that queues: a small CPU task runs inline, on the event
    loop, where a held kernel raises instead."""

    def __init__(self, device: LocalDevice, op: str) -> None:
        self.device = device
        self.op = op
        self.started = threading.Event()
        self._gate = threading.Event()
        self._real = device.run
        self._patched = vars(device).get("run")  # an earlier patch, restored after
        device.run = self._run  # type: ignore[method-assign]

    def _run(self, op: str, inputs: Any, params: Any, outputs: Any = None) -> Any:
        if op == self.op:
            if _on_event_loop():
                # Held here, it would stop the loop that is to release it.
                raise RuntimeError(
                    f"a held {op} kernel ran inline on the event loop: give the test's "
                    "task more elements than TaskManagerOptions.inline_max_elements"
                )
            self.started.set()
            self._gate.wait(HOLD_LIMIT_S)
        return self._real(op, inputs, params, outputs)

    async def wait_started(self, timeout: float = 30.0) -> None:
        """Until a kernel of the op is running (and held)."""
        if not await asyncio.to_thread(self.started.wait, timeout):
            raise AssertionError(f"no {self.op} kernel started within {timeout} s")

    def release(self) -> None:
        """Lets held and later kernels of the op run, and restores the device."""
        self._gate.set()
        if self.device.run == self._run:
            if self._patched is None:
                del self.device.run  # the class's method again
            else:
                self.device.run = self._patched


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
