"""Limits that hold before anything is allocated: bytes and queued tasks per
tenant, and the size of what one request may carry.

The defaults keep a single server within a 24 GiB machine: tensors the node
stores (2 GiB, `tensor_store_bytes`), finished outputs it retains (1 GiB,
`retention_bytes`), and what tenants hold in queued inputs and pending
outputs together (12 GiB in all, 4 GiB per tenant) stay under 16 GiB, leaving
the rest for gRPC buffers (256 MiB per message), kernels' scratch space and
the interpreter."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from kernelmesh.core.errors import ResourceExhausted

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Quotas:
    # Bytes one tenant may hold at once: stored tensors, inputs of its unfinished
    # tasks and the outputs they will produce.
    max_bytes_per_tenant: int = 4 * GiB
    # The same, summed over every tenant (tenants are free to invent while auth is off).
    max_bytes_total: int = 12 * GiB
    # Unfinished (queued or running) tasks of one tenant.
    max_tasks_per_tenant: int = 10_000
    # Labels of one task: how many, and the length of each key and value.
    max_labels: int = 64
    max_label_key_chars: int = 63
    max_label_value_chars: int = 256
    # Dimensions of one tensor (NumPy itself stops at 32 or 64).
    max_dims: int = 16
    # Names in a filter (WatchDevices.names and the like).
    max_filter_names: int = 256
    # Bytes of one UploadTensor chunk (the Python client sends 4 MiB ones): a
    # chunk is held once more while it is copied in, so this bounds that extra.
    max_upload_chunk_bytes: int = 4 * MiB
    # HTTP sidecar and OpenAI facade: the largest JSON body (413 past it), its
    # deepest nesting and longest integer (400 past them).
    max_http_body_bytes: int = 32 * MiB
    max_json_depth: int = 64
    max_json_int_digits: int = 64
    # Seconds a caller refused for a full quota is told to wait.
    retry_after_seconds: float = 1.0


def quote(value: object, limit: int = 96) -> str:
    """`repr(value)`, cut to `limit` characters: error messages that echo input
    stay small, so a huge name cannot blow up the status trailer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class TenantLedger:
    """What each tenant holds, checked before anything is allocated for it.

    `reserve` refuses with RESOURCE_EXHAUSTED (and a retry delay) when the
    tenant, or the server as a whole, would go past its quota; `release` gives
    bytes back. Thread-safe: the tensor store is written from kernel threads."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self._bytes: Counter[str] = Counter()
        self._total = 0
        self._tasks: Counter[str] = Counter()
        self._lock = threading.Lock()

    def bytes_of(self, tenant: str) -> int:
        return self._bytes[tenant]

    @property
    def total_bytes(self) -> int:
        return self._total

    def tasks_of(self, tenant: str) -> int:
        return self._tasks[tenant]

    def reserve(self, tenant: str, nbytes: int, *, enforce: bool = True) -> None:
        """`enforce=False` only counts: what a restart brings back was admitted
        before it, and must be released like anything else."""
        if nbytes <= 0:
            return
        with self._lock:
            held = self._bytes[tenant]
            if enforce:
                self._check_bytes(tenant, held, nbytes)
            self._bytes[tenant] = held + nbytes
            self._total += nbytes

    def _check_bytes(self, tenant: str, held: int, nbytes: int) -> None:
        q = self.quotas
        if held + nbytes > q.max_bytes_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} holds {held} bytes of its {q.max_bytes_per_tenant}; "
                f"{nbytes} more were asked for (finish or cancel tasks, delete tensors)",
                retry_after=q.retry_after_seconds,
            )
        if self._total + nbytes > q.max_bytes_total:
            raise ResourceExhausted(
                f"the server holds {self._total} bytes of its {q.max_bytes_total} for "
                f"all tenants; {nbytes} more were asked for",
                retry_after=q.retry_after_seconds,
            )

    def release(self, tenant: str, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self._count_down(self._bytes, tenant, nbytes)
            self._total -= nbytes

    def admit_task(self, tenant: str, *, enforce: bool = True) -> None:
        with self._lock:
            count = self._tasks[tenant]
            if enforce:
                self._check_tasks(tenant, count)
            self._tasks[tenant] = count + 1

    def _check_tasks(self, tenant: str, count: int) -> None:
        if count >= self.quotas.max_tasks_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {count} unfinished tasks, its limit; "
                "wait for some to finish",
                retry_after=self.quotas.retry_after_seconds,
            )

    def admit(self, tenant: str, nbytes: int, *, enforce: bool = True) -> None:
        """`admit_task` and `reserve(nbytes)` under one lock: a task and the bytes it
        holds are counted together, or (RESOURCE_EXHAUSTED) neither is. `done` gives
        both back. One lock instead of two: this runs on every task."""
        with self._lock:
            # .get: Counter's lookup of a missing key (an idle tenant) is Python code
            count = self._tasks.get(tenant, 0)
            held = self._bytes.get(tenant, 0) if nbytes > 0 else 0
            if enforce:
                self._check_tasks(tenant, count)
                if nbytes > 0:
                    self._check_bytes(tenant, held, nbytes)
            self._tasks[tenant] = count + 1
            if nbytes > 0:
                self._bytes[tenant] = held + nbytes
                self._total += nbytes

    def done(self, tenant: str, nbytes: int) -> None:
        """`task_done` and `release(nbytes)` under one lock."""
        with self._lock:
            self._count_down(self._tasks, tenant, 1)
            if nbytes > 0:
                self._count_down(self._bytes, tenant, nbytes)
                self._total -= nbytes

    @staticmethod
    def _count_down(counter: Counter[str], tenant: str, amount: int) -> None:
        left = counter.get(tenant, 0) - amount
        if left > 0:
            counter[tenant] = left
        else:
            # no state left behind for idle tenants (dict.pop: Counter's own __del__
            # item is Python code, on every tiny task's end)
            counter.pop(tenant, None)

    def task_done(self, tenant: str) -> None:
        with self._lock:
            self._count_down(self._tasks, tenant, 1)


__all__ = ["Quotas", "TenantLedger", "quote"]
