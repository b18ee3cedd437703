"""Ready queue throughput: push N tasks, then pop them all, for

* the Cython `ReadyQueue` (strict priority, round-robin between tenants),
* a heapq of (-priority, seq, id): strict priority, FIFO, no fairness, the
  cheapest thing a Python scheduler could do and the baseline named here,
* the pure-Python fair reference from tests/native/test_dispatch.py (the
  same order as the Cython queue, written plainly).

N = 200,000 unique ids over 8 tenants and 4 priority levels, seeded; best of
5 repeats; ops/s counts each push and each pop as one op.

    python benchmarks/bench_queue.py
"""

from __future__ import annotations

import gc
import heapq
import importlib.util
import random
import time
from collections.abc import Callable
from pathlib import Path

from kernelmesh.native._dispatch import ReadyQueue

N = 200_000
TENANTS = 8
PRIORITIES = 4
REPEATS = 5
SEED = 20240601

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_FILE = ROOT / "tests" / "native" / "test_dispatch.py"


def _reference_class() -> type:
    """ReferenceReadyQueue, imported from the test file that defines it."""
    spec = importlib.util.spec_from_file_location("_bench_test_dispatch", REFERENCE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceReadyQueue


class HeapQueue:
    """Strict priority, FIFO within a priority, no tenants."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int]] = []
        self._seq = 0

    def push(self, task_id: int, tenant: str, priority: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (-priority, self._seq, task_id))

    def pop(self) -> int:
        return heapq.heappop(self._heap)[2]


def _workload() -> tuple[list[int], list[str], list[int]]:
    rng = random.Random(SEED)
    ids = rng.sample(range(1 << 40), N)
    tenant_names = [f"tenant-{i}" for i in range(TENANTS)]
    tenants = [rng.choice(tenant_names) for _ in range(N)]
    priorities = [rng.randrange(PRIORITIES) for _ in range(N)]
    return ids, tenants, priorities


def _time_once(
    make: Callable[[], object], ids: list[int], tenants: list[str], prios: list[int]
) -> float:
    queue = make()
    push, pop = queue.push, queue.pop  # type: ignore[attr-defined]
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for task_id, tenant, priority in zip(ids, tenants, prios, strict=True):
            push(task_id, tenant, priority)
        for _ in range(N):
            pop()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return 2 * N / elapsed


def run() -> dict[str, float]:
    """ops/s (best of REPEATS) for each queue, keyed by its table label."""
    ids, tenants, prios = _workload()
    queues: dict[str, Callable[[], object]] = {
        "cython ReadyQueue": ReadyQueue,
        "heapq (no fairness)": HeapQueue,
        "python fair reference": _reference_class(),
    }
    return {
        label: max(_time_once(make, ids, tenants, prios) for _ in range(REPEATS))
        for label, make in queues.items()
    }


def format_table(results: dict[str, float]) -> str:
    base = results["heapq (no fairness)"]
    width = max(map(len, results))
    return "\n".join(
        f"{label:<{width}}  {ops / 1e6:6.2f} Mops/s  ({ops / base:.2f}x heapq)"
        for label, ops in results.items()
    )


if __name__ == "__main__":
    print(
        f"push {N:,} then pop {N:,}: {TENANTS} tenants, {PRIORITIES} priorities, best of {REPEATS}"
    )
    print(format_table(run()))
