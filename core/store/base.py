"""The `Store` interface: what kernelmesh keeps across restarts, and the
write operations every implementation applies in order, many per transaction.

Writes are queued and committed by one writer in batches (group commit):
`write(..., wait=True)` returns a future that resolves once the batch holding
the operations is committed, which is what SubmitTask awaits before it
replies. Writes nobody waits for (a task starting, finishing, being forgotten)
ride along in the next batch; if a batch fails they are kept and tried again,
while the waited-for ones fail at once with `StoreUnavailable` so the caller
learns that nothing was accepted."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kernelmesh.core.api_keys import ApiKeyRecord
from kernelmesh.core.errors import Unavailable
from kernelmesh.core.store.workflow_records import WorkflowOp, WorkflowSnapshot


class StoreError(Exception):
    """The store cannot be opened or used (the reason is in the message)."""


class SchemaTooNew(StoreError):
    """The state was written by a newer kernelmesh than this one."""


class StoreUnavailable(Unavailable):
    """A write or read failed: the caller gets UNAVAILABLE and may retry."""


class RequestIdTaken(Exception):
    """A shared store refused a task or a workflow: its tenant's request id is
    already another one's (committed by another orchestrator, or by this one
    before a restart)."""


@dataclass(slots=True)
class TaskRecord:
    """A task as the store keeps it. `spec` is JSON (params, selector, keep_outputs,
    retry policy); inputs and outputs are blobs keyed by the task id."""

    id: str
    seq: int
    tenant: str
    op: str
    state: int
    priority: int
    spec: str
    labels: str = "{}"
    request_id: str | None = None
    fingerprint: str | None = None
    attempt: int = 0
    device: str = ""
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    run_seconds: float | None = None
    not_before: float | None = None
    error_code: int | None = None
    error_message: str | None = None
    output_refs: str = "[]"
    output_bytes: int = 0
    trace_context: str = ""
    # Several orchestrators on a shared store: the one that holds the task, and
    # until when (renewed while it lives; past it, another claims the task).
    node: str | None = None
    lease_until: float | None = None
    # When an orchestrator other than the holder was asked to cancel the task
    # (migration 4): the holder reads it with its lease renewals and cancels.
    cancel_requested: float | None = None


# The columns UpdateTask may set.
TASK_UPDATABLE = frozenset(
    {
        "state",
        "attempt",
        "device",
        "start_time",
        "end_time",
        "run_seconds",
        "not_before",
        "error_code",
        "error_message",
        "output_refs",
        "output_bytes",
        "cancel_requested",
    }
)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    task_id: str
    number: int
    state: int
    device: str
    start_time: float | None
    end_time: float | None = None
    error_code: int | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class TensorRecord:
    name: str
    tenant: str
    device: str
    dtype: str
    shape: str  # JSON list
    nbytes: int
    create_time: float


# -- write operations -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PutTask:
    record: TaskRecord


@dataclass(frozen=True, slots=True)
class UpdateTask:
    id: str
    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class DeleteTask:
    id: str


@dataclass(frozen=True, slots=True)
class PutAttempt:
    record: AttemptRecord


@dataclass(frozen=True, slots=True)
class PutBlob:
    key: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DeleteBlob:
    key: str


@dataclass(frozen=True, slots=True)
class PutTensor:
    record: TensorRecord
    data: bytes


@dataclass(frozen=True, slots=True)
class DeleteTensor:
    name: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node of the mesh as the store keeps it; `registration` is opaque here."""

    name: str
    orchestrator: str
    address: str
    registration: str
    lease_until: float


@dataclass(frozen=True, slots=True)
class PutNode:
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class RenewNode:
    name: str
    orchestrator: str
    lease_until: float


# -- where the mesh's nodes hold named tensors (migration 6) -----------------


@dataclass(frozen=True, slots=True)
class TensorLocationRecord:
    name: str
    tenant: str
    node: str
    device: str
    dtype: str
    shape: str  # JSON list
    nbytes: int
    lost: str = ""  # why the node went; "" while it holds the tensor


@dataclass(frozen=True, slots=True)
class PutTensorLocation:
    record: TensorLocationRecord


@dataclass(frozen=True, slots=True)
class DeleteTensorLocation:
    name: str


@dataclass(frozen=True, slots=True)
class TensorsLost:
    """Every tensor `node` holds is gone with it, for `why`."""

    node: str
    why: str


TensorLocationOp = PutTensorLocation | DeleteTensorLocation | TensorsLost
TENSOR_LOCATION_OPS = (PutTensorLocation, DeleteTensorLocation, TensorsLost)


@dataclass(frozen=True, slots=True)
class PutApiKey:
    record: ApiKeyRecord


@dataclass(frozen=True, slots=True)
class RevokeApiKey:
    key_id: str
    at: float


@dataclass(frozen=True, slots=True)
class PutUsage:
    """One LLM call's usage (the llm_usage table)."""

    ts: float
    tenant: str
    model: str
    provider: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class SettleBudget:
    """Replaces a budget reservation by the tokens its call used, in one
    transaction; a reservation already charged in full (expired) changes nothing."""

    hold_id: int
    tenant: str
    used: int


@dataclass(frozen=True, slots=True)
class ChargeBudget:
    """Adds `tokens` to a tenant's spent budget (spending brought over from a
    `usage.sqlite` of an earlier version)."""

    tenant: str
    tokens: int


@dataclass(frozen=True, slots=True)
class BudgetAnswer:
    """A reservation's outcome: its id (None: refused, the budget would be
    exceeded), and the tenant's spent and reserved tokens as the store saw them."""

    hold_id: int | None
    spent: int
    reserved: int


@dataclass(frozen=True, slots=True)
class Fenced:
    """Writes of one task's state by its holder (several orchestrators on one
    store): applied only if the task's row is still `node`'s and at `attempt`
    (None: any attempt) when the batch commits. Refused, they are dropped
    whole (an outputs blob and an attempt record with them) and the store's
    `fenced_out` hook is told: a holder whose lease ran out and whose tasks
    another orchestrator claimed must not write their end."""

    task_id: str
    node: str
    attempt: int | None
    ops: tuple[PutTask | UpdateTask | DeleteTask | PutAttempt | PutBlob | DeleteBlob, ...]


Op = (
    Fenced
    | PutUsage
    | SettleBudget
    | ChargeBudget
    | PutTask
    | UpdateTask
    | DeleteTask
    | PutAttempt
    | PutBlob
    | DeleteBlob
    | PutTensor
    | DeleteTensor
    | PutApiKey
    | RevokeApiKey
    | WorkflowOp
    | PutNode
    | RenewNode
    | TensorLocationOp
)


def inputs_key(task_id: str) -> str:
    return f"tasks/{task_id}/inputs"


def outputs_key(task_id: str) -> str:
    return f"tasks/{task_id}/outputs"


def tensor_key(name: str) -> str:
    return name  # "tensors/{id}"


@dataclass(slots=True)
class Snapshot:
    """Everything `load` finds at start."""

    tasks: list[TaskRecord] = field(default_factory=list)
    attempts: dict[str, list[AttemptRecord]] = field(default_factory=dict)
    tensors: list[TensorRecord] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)


class Store(ABC):
    """One durable home for the state of a kernelmesh server."""

    kind: str = ""
    # False for the in-memory store: nothing it holds outlives the process.
    durable: bool = True

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the state lives, for logs and errors (no secrets)."""

    @abstractmethod
    async def open(self) -> None:
        """Connects, creates or migrates the schema. Raises StoreError."""

    @abstractmethod
    async def close(self) -> None:
        """Commits what is queued, then releases everything."""

    @abstractmethod
    async def load(self) -> Snapshot:
        """Every task, attempt, named tensor and blob kept."""

    @abstractmethod
    def write(self, *ops: Op, wait: bool = False) -> asyncio.Future[None] | None:
        """Queues operations for the next commit, in order. With `wait`, returns a
        future that resolves when they are committed (or fails with
        StoreUnavailable); without, they are retried until they commit."""

    async def sync(self) -> None:
        """Returns once everything queued so far is committed."""
        future = self.write(wait=True)
        if future is not None:
            await future

    async def probe(self, timeout: float) -> str | None:
        """None if the store can commit; else why not (for readiness). A store
        that is merely slow is healthy: the probe does not wait behind queued
        commits unless the last one failed (then an empty commit must go through)."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands
        # as its inner await finishes, and a stopping server then waits forever.
        try:
            async with asyncio.timeout(timeout):
                reason = await self.ping()
                if reason is None and getattr(self, "last_error", None):
                    await self.sync()
        except StoreUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        return reason or getattr(self, "last_error", None)

    async def ping(self) -> str | None:
        """A cheap check that the store is there (not queued behind the writer)."""
        return None

    # -- workflows (kernelmesh.core.workflows) -------------------------------

    @abstractmethod
    async def load_workflows(self) -> WorkflowSnapshot:
        """Every workflow kept, oldest first, with its steps."""

    # Workflows on a store several orchestrators share (PostgreSQL): held under a
    # lease like tasks. The other stores keep each workflow with its one process.

    async def read_workflows(self, ids: Sequence[str]) -> WorkflowSnapshot:
        """The workflows named (those still kept), with their steps."""
        return WorkflowSnapshot([], {})

    async def find_workflow_request(self, tenant: str, request_id: str) -> WorkflowSnapshot:
        """The workflow holding the tenant's request id, as `read_workflows` has it."""
        return WorkflowSnapshot([], {})

    async def list_workflow_records(
        self, tenant: str, *, state: int | None, limit: int, below: tuple[float, str] | None
    ) -> WorkflowSnapshot:
        """Up to `limit` of the tenant's workflows, newest first by (create_time,
        id), those strictly below `below` when given, with their steps."""
        return WorkflowSnapshot([], {})

    async def renew_workflow_leases(
        self, owner: str, until: float, ids: Sequence[str] = ()
    ) -> list[str]:
        """Extends the lease of every running workflow `owner` holds; returns those
        of `ids` it no longer holds (claimed by another orchestrator, or gone)."""
        return []

    async def claim_expired_workflows(
        self, owner: str, until: float, now: float, limit: int = 100
    ) -> WorkflowSnapshot:
        """Takes up to `limit` running workflows whose holder's lease ran out before
        `now` (one sweeper at a time, as `claim_expired_tasks`): they are `owner`'s
        until `until`. Returns them with their steps."""
        return WorkflowSnapshot([], {})

    async def workflow_cancel_requests(self, owner: str) -> list[str]:
        """The running workflows `owner` holds that another orchestrator was asked
        to cancel."""
        return []

    # -- the mesh: claims shared by several orchestrators ----------------------
    # Only a store several processes share (PostgreSQL) claims; the others keep
    # every task with the one process that accepted it.
    shared: bool = False

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node record (of every orchestrator sharing the store)."""
        return []

    # Called (on the event loop) with the ids of tasks whose Fenced writes were
    # refused: another orchestrator holds them now.
    fenced_out: Callable[[list[str]], None] | None = None

    async def renew_task_leases(
        self, owner: str, until: float, ids: Sequence[str] = ()
    ) -> list[str]:
        """Extends the lease of every unfinished task `owner` holds, and returns
        those of `ids` that `owner` no longer holds (another orchestrator claimed
        them after `owner`'s lease ran out, or their row is gone): their attempts
        here must stop and their results be dropped."""
        return []

    async def claim_expired_tasks(
        self, owner: str, until: float, now: float, limit: int = 100
    ) -> Snapshot:
        """Takes up to `limit` unfinished tasks whose holder's lease ran out before
        `now` (rows locked by another claimer are skipped): they are `owner`'s until
        `until`. Returns them with their attempts and input blobs."""
        return Snapshot()

    async def try_sweeper_lock(self) -> bool:
        """True if this process is the one sweeper among those sharing the store."""
        return True

    async def listen(self, callback: Callable[[str, list[str]], None]) -> bool:
        """Change notifications from the other processes sharing the store:
        `callback(kind, ids)` with kind "t" (tasks changed state), "c" (cancels
        asked) or "n" (a node record written). False: none (callers poll)."""
        return False

    async def release_task_leases(self, owner: str, ids: list[str]) -> None:
        """Ends `owner`'s leases on `ids` at once (claimed, then not adopted), so
        the next sweep claims them again."""
        return None

    async def cancel_requests(self, owner: str) -> list[str]:
        """The unfinished tasks `owner` holds that another orchestrator was asked
        to cancel."""
        return []

    # -- reads of tasks other orchestrators hold (shared stores only) ---------

    async def read_tasks(self, ids: list[str], *, outputs: bool = True) -> Snapshot:
        """The tasks named, with their attempts (and output blobs with `outputs`)."""
        return Snapshot()

    async def find_request(self, tenant: str, request_id: str) -> Snapshot:
        """The task holding the tenant's request id, as `read_tasks` returns it."""
        return Snapshot()

    async def list_task_records(
        self,
        tenant: str,
        *,
        state: int | None,
        limit: int,
        below: tuple[float, str] | None,
        outputs: bool = False,
    ) -> Snapshot:
        """Up to `limit` of the tenant's tasks, newest first by (create_time, id),
        those strictly below `below` when given, with their attempts."""
        return Snapshot()

    # -- LLM token budgets (kernelmesh.core.store.usage.StoreUsage) -----------

    @abstractmethod
    async def reserve_budget(
        self, tenant: str, tokens: int, budget: int, owner: str, expires: float, now: float
    ) -> BudgetAnswer:
        """Atomically (serialized per tenant across every process on the store)
        charges the tenant's expired reservations as spent, then reserves
        `tokens` until `expires` if spent + reserved + tokens <= budget.
        Committed before it returns."""

    @abstractmethod
    async def budget_usage(
        self,
    ) -> tuple[dict[str, int], list[tuple[str, str, str, int, int, int, float]]]:
        """Tokens spent per tenant (reservations not counted), and usage totals as
        (tenant, model, provider, requests, prompt, completion, cost)."""

    # -- where the mesh's nodes hold named tensors ------------------------------

    async def tensor_locations(self, name: str | None = None) -> list[TensorLocationRecord]:
        """Every tensor location record, or the one of `name` (none or one)."""
        return []

    # -- API keys (kernelmesh.core.api_keys.ApiKeyStore) --------------------

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        future = self.write(PutApiKey(record), wait=True)
        if future is not None:
            await future

    @abstractmethod
    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None: ...

    @abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    @abstractmethod
    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key (of one tenant when given), oldest first."""

    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None:
        """Sets revoked_at to `at` unless the key is already revoked earlier;
        returns the updated record, or None for an unknown id."""
        future = self.write(RevokeApiKey(key_id, at), wait=True)
        if future is not None:
            await future
        return await self.get_api_key(key_id)
