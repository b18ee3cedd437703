"""The task lifecycle: validate, record, queue, run on a device, notify
watchers, cancel, and forget old records within a bounded retention.

Submitted tasks are journaled: `submit_journaled` commits the task to the
`Store` before it returns, each attempt's start and end follow in later
batches, and `recover` brings them back at start (unfinished ones as a new
attempt). Tasks begun for a waiting caller (`begin`, `run`) never touch the
store: the caller holds the result."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import itertools
import json
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from cachetools import LRUCache

from kernelmesh.core import listing, metrics, ops, placement
from kernelmesh.core.batching import Batcher, BatchingOptions, batch_class
from kernelmesh.core.devices import (
    OBSERVE_FROM_S,
    DeviceKind,
    DeviceSelector,
    LocalDevice,
    SelectCache,
    expected_finish,
    select,
)
from kernelmesh.core.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    KernelmeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violation,
)
from kernelmesh.core.mesh import tensors as mesh_tensors
from kernelmesh.core.mesh.nodes import AttemptFailed, NodeLost, placeholder
from kernelmesh.core.store import Snapshot, Store, StoreUnavailable, TaskRecord, codec
from kernelmesh.core.store.base import (
    AttemptRecord,
    DeleteTask,
    Fenced,
    Op,
    PutAttempt,
    PutBlob,
    PutTask,
    RequestIdTaken,
    UpdateTask,
    inputs_key,
    outputs_key,
)
from kernelmesh.core.task_retry import DEFAULT_RETRY, RetryPolicy
from kernelmesh.core.tensor_store import StoredTensor, TensorStore
from kernelmesh.native.backend import LaunchError, OutOfDeviceMemory

if TYPE_CHECKING:
    from kernelmesh.core.mesh.shared_tasks import SharedTasks

PREFIX = "tasks/"
# Forwarded attempts in flight per remote device and worker slot: forwarding
# waits on the network, not on a core.
REMOTE_WINDOW = 32
# A task is placed again at most this many times after losing its node.
MAX_NODE_LOSSES = 3
DEADLINE_SKEW = 0.05  # seconds

log = logging.getLogger(__name__)


class _Wakeup:
    """Wakes one idle worker of a device per queued task. An asyncio.Event would
    wake them all: a node's device has 64 workers (forwarded attempts wait on the
    network), so every task woke 63 of them for nothing."""

    def __init__(self) -> None:
        self._idle: deque[asyncio.Future[None]] = deque()

    def set(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def set_all(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        # Registered before the first await: a task queued from now on wakes it.
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._idle.remove(waiter)
            raise


_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """numpy's dtype.name builds a new string each call; this caches it."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


DEFAULT_TENANT = "default"


class TaskState(IntEnum):
    """Values match kernelmesh.v1.TaskState."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def terminal(self) -> bool:
        return self >= TaskState.SUCCEEDED


@dataclass(slots=True)
class TaskSpec:
    """What to run. An input is an array or the name of a stored tensor."""

    op: str
    inputs: Sequence[np.ndarray | str]
    params: Mapping[str, object] = field(default_factory=dict)
    selector: DeviceSelector = field(default_factory=DeviceSelector)
    priority: int = 0
    keep_outputs: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    tenant: str = DEFAULT_TENANT
    # Submitted tasks only; None means DEFAULT_RETRY.
    retry: RetryPolicy | None = None


@dataclass(frozen=True)
class TaskFailure:
    code: Code | int
    message: str


@dataclass(slots=True)
class Attempt:
    """One run of a submitted task."""

    number: int
    state: TaskState
    device: str
    start_time: float | None
    end_time: float | None = None
    error: TaskFailure | None = None


@dataclass(eq=False, slots=True)
class Task:
    id: str
    seq: int
    op: str
    tenant: str
    priority: int
    labels: dict[str, str]
    keep_outputs: bool
    device: LocalDevice
    call: ops.ValidatedCall | None  # None for a finished task restored from the store
    inputs: list[np.ndarray] | None
    state: TaskState = TaskState.QUEUED
    outputs: list[np.ndarray] = field(default_factory=list)
    output_refs: list[StoredTensor] = field(default_factory=list)
    error: TaskFailure | None = None
    create_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    run_seconds: float | None = None
    deadline: float | None = None  # time.monotonic() based
    elements: int = 0  # of inputs and outputs together
    device_name: str = ""
    # Journaled (submitted) tasks: the store holds them, they retry, they have attempts.
    journaled: bool = False
    request_id: str | None = None
    fingerprint: str | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    attempt: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    # The mesh: what the task asked for (to place it again when its node is lost),
    # why it went where it did, and a fencing count of dispatches (every task,
    # journaled or not, so a late answer from an earlier dispatch is dropped).
    selector: DeviceSelector = field(default_factory=DeviceSelector)
    placement_reason: str = ""
    dispatch: int = 0
    node_losses: int = 0
    # W3C trace context of the submitting call (a JSON object of carrier headers),
    # kept with the task and sent along with each forwarded attempt.
    trace_context: str = ""
    # Inputs that name tensors held on nodes (core/mesh/tensors.py), by position.
    remote_inputs: dict[int, mesh_tensors.RemoteTensor] | None = None
    # Kept outputs a node stores (the forwarder asked it to keep them): their
    # location is recorded instead of the bytes coming back.
    remote_outputs: list[mesh_tensors.RemoteTensor] | None = None
    _forward: asyncio.Future[list[np.ndarray]] | None = None
    _retry_handle: asyncio.TimerHandle | None = None
    held_bytes: int = 0  # charged to the tenant's ledger until the task ends
    pinned: tuple[str, ...] = ()  # named tensors read (TensorStore.pin) until it ends
    _watchers: list[asyncio.Queue[TaskEvent]] = field(default_factory=list)
    _callbacks: list[Callable[[Task], None]] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    # A view of a task another orchestrator holds: follows it in the store until
    # it ends, for a caller that waits on it (a resumed workflow step).
    _follow: Callable[[Task], Awaitable[None]] | None = None
    # Several orchestrators on one store: another one claimed the task after this
    # one's lease ran out. Nothing here writes it or counts its result any more.
    relinquished: bool = False

    @property
    def name(self) -> str:
        return PREFIX + self.id

    @property
    def output_metas(self) -> tuple[ops.TensorMeta, ...]:
        if self.call is None:
            return tuple(ops.TensorMeta(dtype_name(o.dtype), o.shape) for o in self.outputs)
        return self.call.outputs

    @property
    def retained_bytes(self) -> int:
        outputs = self.outputs
        if len(outputs) == 1:  # the usual case, counted on every finish and eviction
            return outputs[0].nbytes
        return sum(o.nbytes for o in outputs)

    async def wait(self) -> None:
        if self._follow is not None and not self._done.is_set():
            await self._follow(self)
        await self._done.wait()

    def add_done_callback(self, callback: Callable[[Task], None]) -> None:
        """Calls `callback(task)` once the task ends (at once if it has)."""
        if self.state.terminal:
            callback(self)
        else:
            self._callbacks.append(callback)


@dataclass(frozen=True)
class TaskEvent:
    name: str
    state: TaskState
    time: float
    message: str
    task: Task


@dataclass(frozen=True, slots=True)
class InlinePlan:
    """What `prepare` decided for one call shape of plain tensors (no params, labels
    or selector) that runs inline: the catalog's verdict, the capable devices and the
    held bytes. A waiting caller repeating that shape (`begin_planned`) skips the
    validation and placement it would only redo; a plan made before the devices
    changed is refused."""

    op: str
    call: ops.ValidatedCall
    work: placement.Work
    device: LocalDevice
    able: tuple[LocalDevice, ...]  # capable, not refusing this call: select()'s choice
    dtype: str
    held_bytes: int
    reason: str
    generation: int
    # the device's run for exactly this call shape, its per-call checks done once
    # (`Device.planned`); None: the device's own `run` (a device that wraps it)
    runner: Callable[[Sequence[np.ndarray]], builtins.list[np.ndarray]] | None = None


@dataclass(frozen=True)
class TaskManagerOptions:
    limits: ops.Limits = field(default_factory=ops.Limits)
    retention_tasks: int = 10_000
    retention_bytes: int = 1 << 30
    workers_per_device: int = 2
    # Tasks this small run on the event loop: a thread hop costs more than the kernel.
    inline_max_elements: int = 1 << 14
    # Finished tasks are forgotten (in memory and in the store) after this long.
    retention_seconds: float = 7 * 24 * 3600.0
    # Dynamic batching of small compatible tasks (core/batching.py); off by default.
    batching: BatchingOptions = field(default_factory=BatchingOptions)


class TaskTracing(Protocol):
    """Traces submitted tasks (services/tracing.py); absent when tracing is off."""

    def capture(self) -> str: ...

    def run(self, task: Task) -> contextlib.AbstractContextManager[None]: ...


_UNTRACED = contextlib.nullcontext()
_ANY_DEVICE = DeviceSelector()


class TaskManager:
    """Owns every task of this node, from submission to retention."""

    def __init__(
        self,
        devices: Sequence[LocalDevice],
        store: TensorStore,
        options: TaskManagerOptions | None = None,
        journal: Store | None = None,
        tracing: TaskTracing | None = None,
    ) -> None:
        self.devices = list(devices)
        self.tracing = tracing
        self.store = store
        # Where submitted tasks are journaled; None (or a store that keeps nothing
        # past the process): submitted tasks live in memory only, at no cost.
        self.journal = journal if journal is not None and journal.durable else None
        store.journal = self.journal
        if self.journal is not None:
            # A shared store refused the writes of tasks another orchestrator holds.
            self.journal.fenced_out = self._fenced_out
        # Submitted tasks by (tenant, request_id): AIP-155 idempotency.
        self._requests: dict[tuple[str, str], Task] = {}
        # Journal commits not yet acknowledged, by task id (a duplicate waits on it).
        self._committing: dict[str, asyncio.Future[None]] = {}
        self.options = options or TaskManagerOptions()
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        # Finished tasks in finish order: retention evicts from the front.
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._queued: dict[int, Task] = {}
        self._seq = itertools.count(1)
        self._retained_bytes = 0
        self._accepting = True
        self._work: dict[LocalDevice, _Wakeup] = {}
        self._workers: list[asyncio.Task[None]] = []
        workers = self.options.workers_per_device * max(1, len(self.devices))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernel")
        self._capable: SelectCache = {}  # select()'s, cleared when the devices change
        self._generation = 0  # of the device list: InlinePlans of an older one are stale
        # The mesh: tasks whose node was lost with no other device able to run
        # them yet; placed again when a node joins. Only an orchestrator parks.
        self.park_unplaced = False
        # An orchestrator's record of the tensors its nodes hold: a task's input may
        # name one (it is validated from the record and forwarded near it).
        self.remote_tensors: mesh_tensors.TensorLocations | None = None
        # Several orchestrators on one shared store: the tasks this one accepted are
        # its own (`owner`) under a lease it renews; an expired one is claimed by
        # another (`adopt`). None: the only process on its store.
        self.owner: str | None = None
        self.lease_seconds = 10.0
        # With a shared store: reads, watches and cancels of tasks held elsewhere
        # (core.mesh.shared_tasks.SharedTasks; set by the server).
        self.shared_view: SharedTasks | None = None
        self._following: set[asyncio.Future[None]] = set()
        self._unplaced: dict[int, Task] = {}
        self._calls: LRUCache[tuple[Any, ...], tuple[ops.ValidatedCall, placement.Work]] = LRUCache(
            maxsize=4096
        )
        self._batcher = (
            Batcher(self.options.batching, self._pool, self._batch_start, self._batch_done)
            if self.options.batching.enabled
            else None
        )

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        # Gauges read live values when scraped, so the task path never updates them.
        metrics.TASKS_RETAINED.set_function(lambda: len(self._tasks))
        for device in self.devices:
            # (mypy cannot type a lambda whose default binds the loop's device)
            metrics.child(metrics.QUEUE_DEPTH, device.name).set_function(
                lambda d=device: len(d.queue)  # type: ignore[misc]
            )
            metrics.child(metrics.RUNNING, device.name).set_function(lambda d=device: d.running)  # type: ignore[misc]
            self._work[device] = _Wakeup()
            for _ in range(self.options.workers_per_device):
                self._workers.append(asyncio.create_task(self._worker(device)))
        # cancelled and awaited with the workers at shutdown
        self._workers.append(asyncio.create_task(self._expire_by_age(), name="task-retention"))

    async def _expire_by_age(self) -> None:
        """Forgets finished tasks past the retention age on an idle server too (a
        finishing task checks the limits, but none may finish for days)."""
        every = min(60.0, max(0.05, self.options.retention_seconds / 10))
        while True:
            await asyncio.sleep(every)
            if self._oldest_expired(time.time()):
                try:
                    self._evict()
                except Exception as exc:  # the store is closing: the next sweep retries
                    log.warning("forgetting expired tasks: %s", exc)

    async def shutdown(self, grace: float) -> None:
        """Stops accepting work, lets queued and running tasks finish within
        `grace` seconds, then fails what is left with UNAVAILABLE (journaled tasks
        stay in the store for the next start)."""
        self._accepting = False
        deadline = time.monotonic() + grace
        # A retry due after the grace cannot finish within it: not worth waiting for.
        retry_by = asyncio.get_running_loop().time() + grace
        # Nor is a task parked until a node that can run it joins.
        pending = [
            t
            for t in self._tasks.values()
            if not t.state.terminal
            and (t._retry_handle is None or t._retry_handle.when() <= retry_by)
            and t.seq not in self._unplaced
        ]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(t.wait() for t in pending)),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
        resumable = self.journal is not None
        for task in list(self._tasks.values()):
            if task.journaled and resumable:
                # Journaled tasks stay QUEUED or RUNNING in the store: the next
                # start runs them (a running one as a new attempt).
                if task._retry_handle is not None:
                    task._retry_handle.cancel()
                if self._batcher is not None:
                    self._batcher.discard(task)
                if task.state is TaskState.QUEUED and task.seq in self._queued:
                    task.device.queue.remove(task.seq)
                    self._queued.pop(task.seq, None)
                continue
            if task.state is TaskState.QUEUED:
                if task._retry_handle is not None:
                    task._retry_handle.cancel()
                task.device.queue.remove(task.seq)
                self._queued.pop(task.seq, None)
                self._finish(
                    task,
                    TaskState.FAILED,
                    TaskFailure(Code.UNAVAILABLE, "the server shut down before the task ran"),
                )
            elif task.state is TaskState.RUNNING:
                self._finish(
                    task,
                    TaskState.FAILED,
                    TaskFailure(Code.UNAVAILABLE, "the server shut down before the task finished"),
                )
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- recovery ---------------------------------------------------------

    async def recover(self) -> tuple[int, int, int]:
        """Loads the journal (after `start`, before serving): named tensors,
        finished tasks within retention, and unfinished tasks, queued again as
        a new attempt (a RUNNING one's attempt died with the process). Returns
        (tasks queued again, finished tasks restored, named tensors restored)."""
        if self.journal is None:
            return 0, 0, 0
        snap = await self.journal.load()
        tensors = self.store.restore(snap.tensors, snap.blobs)
        top = max((r.seq for r in snap.tasks), default=0)
        self._seq = itertools.count(max(top + 1, next(self._seq)))
        horizon = time.time() - self.options.retention_seconds
        queued = finished = 0
        for record in snap.tasks:
            attempts = [_attempt_of(a) for a in snap.attempts.get(record.id, [])]
            if TaskState(record.state).terminal:
                if (record.end_time or 0.0) < horizon:
                    self._journal(DeleteTask(record.id))
                    continue
                self._restore_finished(record, attempts, snap)
                finished += 1
            elif self.owner:
                # A shared store: unfinished tasks are claimed (SKIP LOCKED) once their
                # holder's lease has run out, by whichever orchestrator sweeps first.
                continue
            else:
                self._restore_unfinished(record, attempts, snap)
                queued += 1
        if self._finished:
            self._evict()
        return queued, finished, tensors

    def adopt(self, snap: Snapshot) -> int:
        """Runs the unfinished tasks claimed from an orchestrator whose lease ran
        out, as `recover` does after a restart (a RUNNING one's attempt is lost)."""
        for record in snap.tasks:
            held = self.held(record.id)
            if held is not None:
                if held.attempt == record.attempt and not held.relinquished:
                    continue  # this process's own, its lease renewed late: still its run
                # Another orchestrator ran it meanwhile (and died): the copy here is stale.
                self.relinquish([record.id], follow=False)
            record.seq = next(self._seq)  # this process's numbering; ids stay
            attempts = [_attempt_of(a) for a in snap.attempts.get(record.id, [])]
            self._restore_unfinished(record, attempts, snap)
            if record.cancel_requested is not None:
                self.cancel_held([record.id])
        return len(snap.tasks)

    def held(self, task_id: str) -> Task | None:
        """The task if this process holds it in memory."""
        return self._tasks.get(PREFIX + task_id)

    def leased(self) -> builtins.list[str]:
        """The ids of the unfinished journaled tasks this process holds (whose
        leases it renews)."""
        return [
            t.id
            for t in self._tasks.values()
            if t.journaled and not t.state.terminal and not t.relinquished
        ]

    def relinquish(self, ids: Sequence[str], *, follow: bool = True) -> int:
        """Another orchestrator holds these tasks now (it claimed them once this
        one's lease ran out): their attempts here stop (a queued one never runs, a
        forwarded one is cancelled on its node, a running kernel's result is
        dropped), nothing more of them is written, and they are forgotten here, so
        reads go to the store. Whoever waits on one here follows it there."""
        done = 0
        for task_id in ids:
            task = self.held(task_id)
            if task is None or task.relinquished:
                continue
            task.relinquished = True
            done += 1
            if task._retry_handle is not None:
                task._retry_handle.cancel()
                task._retry_handle = None
            if task.state is TaskState.QUEUED:
                if self._queued.pop(task.seq, None) is not None:
                    task.device.queue.remove(task.seq)
                if self._batcher is not None:
                    self._batcher.discard(task)
                self._unplaced.pop(task.seq, None)
            if task._forward is not None:
                task._forward.cancel()
            self._tasks.pop(task.name, None)
            if self._finished.pop(task.name, None) is not None:
                self._retained_bytes -= task.retained_bytes
            else:
                self._unadmit(task)
            self._forget_request(task)
            metrics.TASKS_RELINQUISHED.inc(())
            if follow and self.shared_view is not None and not task._done.is_set():
                task._follow = self.shared_view.follow_into  # for a later wait()
                if task._watchers or task._callbacks:
                    following = asyncio.ensure_future(self._follow_relinquished(task))
                    self._following.add(following)
                    following.add_done_callback(self._following.discard)
        if done:
            log.warning(
                "%d tasks are held by another orchestrator now (this one's lease on them "
                "ran out): their attempts here are stopped and their results dropped",
                done,
            )
        return done

    def _fenced_out(self, ids: builtins.list[str]) -> None:
        self.relinquish(ids)

    async def _follow_relinquished(self, task: Task) -> None:
        """Whoever waits on or watches a relinquished task here sees how it ends
        where it runs now."""
        assert self.shared_view is not None
        try:
            await self.shared_view.follow_into(task)
        except Exception as exc:  # the store is down: they learn nothing more here
            log.warning("following relinquished task %s: %s", task.name, exc)
            return
        if task._watchers:
            self._emit(task, task.error.message if task.error else "succeeded")
        if task._callbacks:
            callbacks, task._callbacks = task._callbacks, []
            for callback in callbacks:
                callback(task)

    def cancel_held(self, ids: Sequence[str]) -> int:
        """Cancels the tasks held here that another orchestrator was asked to cancel."""
        done = 0
        for task_id in ids:
            task = self.held(task_id)
            if task is not None and not task.state.terminal:
                self._abort(task, TaskState.CANCELLED, Code.CANCELLED, "cancelled by request")
                done += 1
        return done

    def view(self, record: TaskRecord, snap: Snapshot) -> Task:
        """A read-only Task for a record another orchestrator holds (or held): what
        GetTask and ListTasks show of it. Nothing here refers to it afterwards."""
        attempts = [_attempt_of(a) for a in snap.attempts.get(record.id, [])]
        spec = json.loads(record.spec)
        task = self._restored(
            record, attempts, self._device_named(record.device), None, spec, register=False
        )
        task.state = TaskState(record.state)
        blob = snap.blobs.get(outputs_key(record.id))
        if task.state is TaskState.SUCCEEDED and blob is not None:
            task.outputs = [o for o in codec.decode(blob) if isinstance(o, np.ndarray)]
        if record.error_code is not None:
            task.error = TaskFailure(_code(record.error_code), record.error_message or "")
        for ref in json.loads(record.output_refs):
            # Named tensors this process has (restored at start); others live with
            # the orchestrator that made them.
            with contextlib.suppress(NotFound):
                task.output_refs.append(self.kept_ref(ref, record.tenant))
        task.start_time = record.start_time
        task.end_time = record.end_time
        task.run_seconds = record.run_seconds
        if task.state.terminal:
            task._done.set()
        elif self.shared_view is not None:
            task._follow = self.shared_view.follow_into
        return task

    # -- reads that look past this process (several orchestrators, one store) --

    async def find(self, name: str, *, tenant: str) -> Task:
        """`get`, or the task from the shared store if another orchestrator holds it."""
        try:
            return self.get(name, tenant=tenant)
        except NotFound:
            if self.shared_view is None:
                raise
        return await self.shared_view.get(name, tenant=tenant)

    async def find_all(
        self,
        *,
        tenant: str,
        state: TaskState | None = None,
        page_size: int = 0,
        page_token: str = "",
        full: bool = False,
    ) -> tuple[list[Task], str]:
        """`list`, across every orchestrator sharing the store when there are several."""
        if self.shared_view is None:
            return self.list(tenant=tenant, state=state, page_size=page_size, page_token=page_token)
        return await self.shared_view.list(
            tenant=tenant, state=state, page_size=page_size, page_token=page_token, outputs=full
        )

    async def follow(self, name: str, *, tenant: str) -> AsyncIterator[TaskEvent]:
        """`watch`, or a watch of the task's row if another orchestrator holds it."""
        try:
            self.get(name, tenant=tenant)
        except NotFound:
            if self.shared_view is None:
                raise
            events = self.shared_view.watch(name, tenant=tenant)
        else:
            events = self.watch(name, tenant=tenant)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def cancel_anywhere(self, name: str, *, tenant: str) -> Task:
        """`cancel`, or a cancel request recorded for the orchestrator holding it."""
        try:
            return self.cancel(name, tenant=tenant)
        except NotFound:
            if self.shared_view is None:
                raise
        return await self.shared_view.cancel(name, tenant=tenant)

    def _device_named(self, name: str) -> LocalDevice:
        for device in self.devices:
            if device.name == name:
                return device
        if not self.devices:  # an orchestrator before any node joined
            return placeholder(name)
        return self.devices[0]  # a finished task's device that is gone: name kept apart

    def _restore_finished(
        self,
        record: TaskRecord,
        attempts: list[Attempt],
        snap: Snapshot,
        failure: TaskFailure | None = None,
    ) -> Task:
        state = TaskState.FAILED if failure else TaskState(record.state)
        outputs: list[np.ndarray] = []
        blob = snap.blobs.get(outputs_key(record.id))
        if state is TaskState.SUCCEEDED and blob is not None:
            outputs = [o for o in codec.decode(blob) if isinstance(o, np.ndarray)]
        refs = []
        for name in json.loads(record.output_refs):
            with contextlib.suppress(NotFound):
                refs.append(self.kept_ref(name, record.tenant))
        if failure is None and record.error_code is not None:
            failure = TaskFailure(_code(record.error_code), record.error_message or "")
        task = self._restored(
            record, attempts, self._device_named(record.device), None, json.loads(record.spec)
        )
        task.state = state
        task.error = failure
        task.outputs = outputs
        task.output_refs = refs
        task.start_time = record.start_time
        task.end_time = record.end_time or time.time()
        task.run_seconds = record.run_seconds
        task._done.set()
        self._record(task)
        self._finished[task.name] = task
        self._retained_bytes += task.retained_bytes
        return task

    def _restore_unfinished(
        self, record: TaskRecord, attempts: list[Attempt], snap: Snapshot
    ) -> None:
        lost = attempts[-1] if attempts and attempts[-1].state is TaskState.RUNNING else None
        if lost is not None:
            lost.state = TaskState.FAILED
            lost.end_time = time.time()
            lost.error = TaskFailure(
                Code.UNAVAILABLE, "attempt lost: the server stopped while it ran"
            )
            self._journal_held(
                record.id, record.attempt, PutAttempt(_attempt_record(record.id, lost))
            )
        data = json.loads(record.spec)
        labels = json.loads(record.labels)
        retry = RetryPolicy.from_json(data["retry"])
        try:
            blob = snap.blobs.get(inputs_key(record.id))
            if blob is None:
                raise InvalidArgument([Violation("inputs", "the journal lost the inputs")])
            kind = data.get("kind")
            spec = TaskSpec(
                op=record.op,
                inputs=codec.decode(blob),
                params=data["params"],
                selector=DeviceSelector(
                    kind=DeviceKind(kind) if kind else None, name=data.get("device", "")
                ),
                priority=record.priority,
                keep_outputs=bool(data.get("keep_outputs")),
                labels=labels,
                tenant=record.tenant,
                retry=retry,
            )
            # An orchestrator restarts (or claims tasks) before its nodes have
            # joined: a task no device present can run waits for one (parked by
            # `_enqueue`), where failing it lost work that was acknowledged.
            # (a gone device named as its last one: `_enqueue` places the task anew)
            stand_in = placeholder(record.device) if self.park_unplaced else None
            prepared = self.prepare(spec, stand_in=stand_in)
        except KernelmeshError as exc:
            failure = TaskFailure(exc.code, f"could not be resumed after a restart: {exc.message}")
            task = self._restore_finished(record, attempts, snap, failure)
            self._journal_end(task)
            return
        task = self._restored(record, attempts, prepared.device, prepared.call, data)
        task.inputs = prepared.inputs
        # Inputs held on nodes go by reference, as when first submitted: without
        # this, a claimed or recovered task sent their placeholders (zeros).
        task.remote_inputs = prepared.remote_inputs
        task.elements = prepared.elements
        task.held_bytes = prepared.held_bytes
        task.pinned = prepared.pinned
        task.retry = retry
        self._admit(task, enforce=False)
        wall = data.get("deadline")
        if wall is not None:
            task.deadline = time.monotonic() + (wall - time.time())
        self._record(task)
        if lost is not None and (
            task.attempt >= retry.maximum_attempts or not retry.retryable(int(Code.UNAVAILABLE))
        ):
            self._finish(task, TaskState.FAILED, lost.error)  # the dead letter
            return
        if record.state != TaskState.QUEUED:
            self._journal_held(
                task.id, task.attempt, UpdateTask(task.id, {"state": int(TaskState.QUEUED)})
            )
        delay = (record.not_before or 0.0) - time.time()
        if delay > 0:
            task._retry_handle = asyncio.get_running_loop().call_later(delay, self._requeue, task)
        else:
            self._enqueue(task)

    def _restored(
        self,
        record: TaskRecord,
        attempts: list[Attempt],
        device: LocalDevice,
        call: ops.ValidatedCall | None,
        spec: dict[str, Any],
        *,
        register: bool = True,
    ) -> Task:
        task = Task(
            id=record.id,
            seq=record.seq,
            op=record.op,
            tenant=record.tenant,
            priority=record.priority,
            labels=json.loads(record.labels),
            keep_outputs=bool(spec.get("keep_outputs")),
            device=device,
            call=call,
            inputs=None,
            create_time=record.create_time,
            device_name=record.device or device.name,
            journaled=True,
            request_id=record.request_id,
            fingerprint=record.fingerprint,
            attempt=record.attempt,
            attempts=attempts,
            trace_context=record.trace_context,
        )
        if record.request_id and register:
            self._requests[(record.tenant, record.request_id)] = task
        return task

    # -- submission -------------------------------------------------------

    def prepare(self, spec: TaskSpec, *, stand_in: LocalDevice | None = None) -> Task:
        """Validates a spec against the op catalog and picks its device,
        before anything is allocated for it. `stand_in`: a gone device the task
        gets when no device present can run it (a task restored or claimed
        before the nodes that run it have joined); it is placed when enqueued,
        or parked until a node joins."""
        if not self._accepting:
            raise Unavailable("the server is shutting down and accepts no new tasks")
        arrays: list[np.ndarray] = []
        violations: list[Violation] = []
        remote: dict[int, mesh_tensors.RemoteTensor] | None = None
        named: list[str] = []  # the tensor store charges for these
        for i, item in enumerate(spec.inputs):
            if isinstance(item, str):
                try:
                    arrays.append(self.store.get(item, tenant=spec.tenant).array)
                    named.append(item)
                except NotFound:
                    held = self._remote_input(item, spec.tenant)
                    if held is None:
                        violations.append(
                            Violation(f"inputs[{i}].ref", f"tensor {item!r} not found")
                        )
                        continue
                    held.check_held()  # FAILED_PRECONDITION naming it, its node gone
                    remote = remote or {}
                    remote[i] = held
                    arrays.append(held.placeholder())  # the node charges for it
            else:
                arrays.append(item)
        if violations:
            raise InvalidArgument(violations)
        metas = [ops.TensorMeta(dtype_name(a.dtype), a.shape) for a in arrays]
        call, work = self._validated(spec.op, metas, spec.params)
        dtype = metas[0].dtype if metas else ""
        try:
            device = select(
                self.devices,
                spec.selector,
                spec.op,
                dtype,
                shapes=[m.shape for m in call.inputs],
                params=call.params,
                work=work,
                cache=self._capable,
                near=mesh_tensors.near(remote) if remote else None,
            )
        except FailedPrecondition:
            # Only the devices present now fall short (a malformed selector is
            # INVALID_ARGUMENT and still raises): a node that joins may run it.
            if stand_in is None:
                raise
            device = stand_in
        task = Task(
            # 128 random bits: unique across processes and restarts, and a tenth of
            # uuid4's cost (no system call per task)
            id=f"{random.getrandbits(128):032x}",
            seq=next(self._seq),
            op=spec.op,
            tenant=spec.tenant,
            priority=spec.priority,
            labels=dict(spec.labels),
            keep_outputs=spec.keep_outputs,
            device=device,
            call=call,
            inputs=arrays,
            elements=work.elements,
            device_name=device.name,
            held_bytes=_held_bytes(work.elements, arrays, spec.inputs),
            pinned=tuple(named),
            selector=spec.selector,
            remote_inputs=remote,
        )
        if remote:
            if not getattr(device, "remote", False):
                raise FailedPrecondition(
                    f"inputs name tensors held on nodes, and {device.name} is this process's "
                    "own device: name a node's device, or upload the tensors to this process"
                )
            task.placement_reason = _near_reason(remote, device)
        elif device is stand_in:
            task.placement_reason = "no device present can run it"
        elif len(self.devices) > 1:
            task.placement_reason = self._reason(spec.selector, spec.op, dtype)
        return task

    def _remote_ref(self, item: mesh_tensors.RemoteTensor) -> StoredTensor:
        """A kept output a node holds, as a reference: its location recorded, its
        array a stand-in of its dtype and shape that holds no memory."""
        if self.remote_tensors is not None:
            self.remote_tensors.add(item)
        return StoredTensor(
            item.name, item.tenant, f"{item.node}/{item.device}", item.placeholder()
        )

    def kept_ref(self, name: str, tenant: str) -> StoredTensor:
        """A task's kept output by name, here or (recorded) on a node."""
        try:
            return self.store.get(name, tenant=tenant).hollow()
        except NotFound:
            held = self._remote_input(name, tenant)
            if held is None:
                raise
            return StoredTensor(name, tenant, f"{held.node}/{held.device}", held.placeholder())

    def _remote_input(self, name: str, tenant: str) -> mesh_tensors.RemoteTensor | None:
        if self.remote_tensors is None:
            return None
        return self.remote_tensors.find(name, tenant)

    def _reason(self, selector: DeviceSelector, op: str, dtype: str) -> str:
        capable = self._capable.get((selector, op, dtype)) or ()
        if selector.name:
            return f"the selector names {selector.name!r}"
        if len(capable) == 1:
            return f"the only device that runs {op} on {dtype}"
        return f"earliest expected finish of {len(capable)} capable devices"

    # -- the mesh: devices that come and go -------------------------------

    def add_devices(self, devices: Sequence[LocalDevice]) -> None:
        """Devices of a node that joined: placed from now on."""
        self.devices.extend(devices)
        self._capable.clear()
        self._generation += 1
        for device in devices:
            self._work[device] = _Wakeup()
            window = REMOTE_WINDOW if getattr(device, "remote", False) else 1
            for _ in range(self.options.workers_per_device * window):
                self._workers.append(asyncio.create_task(self._worker(device)))
        self._workers = [w for w in self._workers if not w.done()]
        parked, self._unplaced = self._unplaced, {}
        for task in parked.values():
            self._enqueue(task)

    def remove_devices(self, devices: Sequence[LocalDevice]) -> None:
        """Devices of a node that is lost or draining: no new work; what was queued
        for them is placed again. Running attempts are the caller's to end."""
        gone = set(devices)
        self.devices = [d for d in self.devices if d not in gone]
        self._capable.clear()
        self._generation += 1
        for device in devices:
            device.gone = True  # type: ignore[attr-defined]  # a node's device
            for seq in device.queue.drain():
                task = self._queued.pop(seq, None)
                if task is not None:
                    self._enqueue(task)
            event = self._work.get(device)
            if event is not None:
                event.set_all()  # its workers see it is gone and end

    def _replace(self, task: Task) -> bool:
        """Places a task again (its device left); False if it was parked or failed."""
        call = task.call
        dtype = call.inputs[0].dtype if call is not None and call.inputs else ""
        try:
            device = select(
                self.devices,
                task.selector,
                task.op,
                dtype,
                shapes=[m.shape for m in call.inputs] if call is not None else (),
                params=call.params if call is not None else None,
                work=placement.work_of(call) if call is not None else None,
                cache=self._capable,
                near=mesh_tensors.near(task.remote_inputs) if task.remote_inputs else None,
            )
        except KernelmeshError as exc:
            if self.park_unplaced and self._accepting:
                self._unplaced[task.seq] = task
                self._emit(task, f"waiting for a node that can run it ({exc.message})")
                if task.deadline is not None:
                    # No worker pops a parked task, so none would see its deadline pass.
                    asyncio.get_running_loop().call_later(
                        max(0.0, task.deadline - time.monotonic()), self._parked_too_long, task
                    )
                return False
            self._finish(task, TaskState.FAILED, TaskFailure(Code.UNAVAILABLE, exc.message))
            return False
        metrics.REDISPATCHED.inc(())
        task.device = device
        task.device_name = device.name
        if task.remote_inputs:
            task.placement_reason = f"placed again: {_near_reason(task.remote_inputs, device)}"
        else:
            task.placement_reason = f"placed again: {task.placement_reason or 'its device left'}"
        if task.journaled:
            self._journal_held(task.id, task.attempt, UpdateTask(task.id, {"device": device.name}))
        return True

    def _parked_too_long(self, task: Task) -> None:
        if self._unplaced.get(task.seq) is task and not task.state.terminal:
            self._abort(
                task,
                TaskState.FAILED,
                Code.DEADLINE_EXCEEDED,
                "deadline exceeded while waiting for a node that can run it",
            )

    def _node_lost(self, task: Task, device: LocalDevice, message: str) -> None:
        """The node running an attempt is gone: the attempt failed, and the task goes
        back to the queue as a new attempt (up to MAX_NODE_LOSSES times)."""
        if task.relinquished:
            return
        failure = TaskFailure(Code.UNAVAILABLE, message)
        task.node_losses += 1
        if task.node_losses > MAX_NODE_LOSSES:
            self._finish(task, TaskState.FAILED, failure)
            return
        ended = self._end_attempt(task, TaskState.FAILED, failure)
        task.state = TaskState.QUEUED
        task.placement_reason = f"{device.name} was lost"
        if task.journaled:
            self._journal_held(
                task.id,
                task.attempt,
                UpdateTask(task.id, {"state": int(TaskState.QUEUED)}),
                *([PutAttempt(_attempt_record(task.id, ended))] if ended else []),
            )
        self._enqueue(task)

    def _validated(
        self, op: str, metas: list[ops.TensorMeta], params: Mapping[str, object]
    ) -> tuple[ops.ValidatedCall, placement.Work]:
        """The catalog's verdict on a call, and the work it does. Callers repeat the
        same shapes and params (a training loop, a stream of tiles), so verdicts are
        cached; a refusal is never cached and is computed afresh each time."""
        try:
            key = (op, tuple((m.dtype, m.shape) for m in metas), _frozen(params))
        except TypeError:  # an unhashable param value: validate will name it
            key = None
        found = self._calls.get(key) if key is not None else None
        if found is not None:
            return found
        try:
            call = ops.validate(op, metas, params, self.options.limits)
        except ops.OpValidationError as exc:
            raise InvalidArgument(
                [Violation(v.field, v.description) for v in exc.violations]
            ) from None
        found = (call, placement.work_of(call))
        if key is not None:
            self._calls[key] = found
        return found

    def submit(self, spec: TaskSpec, *, deadline: float | None = None) -> Task:
        """Records a task and queues it on its device; returns at once."""
        task = self.prepare(spec)
        task.deadline = deadline
        self._admit(task)
        self._record(task)
        self._enqueue(task)
        return task

    async def submit_journaled(
        self,
        spec: TaskSpec,
        *,
        request_id: str = "",
        fingerprint: str = "",
        deadline: float | None = None,
        await_commit: bool = True,
        inline: bool = False,
    ) -> Task:
        """Records a task, commits it to the journal, then queues it: once this
        returns, the task survives a crash. The same `request_id` from the same
        tenant returns the first task (waiting for its commit if it is still
        under way); with a different `fingerprint` it is INVALID_ARGUMENT.
        `await_commit=False` queues the commit without waiting for it (retried
        until it commits, like the task's later updates, which follow it in
        order): for a caller that resubmits with the same request_id after a
        crash itself, a workflow step. `inline`: a tiny CPU task with nothing
        queued ahead of it on its device runs on the spot, as `begin` runs one (a
        chain of workflow steps would otherwise pay a thread hop per step)."""
        if request_id:
            first = self._requests.get((spec.tenant, request_id))
            if first is not None:
                return await self._same_request(first, fingerprint)
        task = self.prepare(spec)
        task.deadline = deadline
        task.journaled = True
        task.request_id = request_id or None
        task.fingerprint = fingerprint or None
        task.retry = spec.retry or DEFAULT_RETRY
        if self.tracing is not None:
            task.trace_context = self.tracing.capture()
        self._admit(task)  # before the commit: a refused task must not survive a restart
        if request_id:
            self._requests[(spec.tenant, request_id)] = task
        if self.journal is not None:
            future = self.journal.write(
                PutTask(self._record_of(task, spec)),
                PutBlob(inputs_key(task.id), codec.encode(list(spec.inputs))),
                wait=await_commit,
            )
            if future is not None:
                self._committing[task.id] = future
                try:
                    await future
                except RequestIdTaken:
                    self._forget_request(task)
                    self._unadmit(task)
                    return await self._taken(spec.tenant, request_id, fingerprint)
                except BaseException:
                    self._forget_request(task)
                    self._unadmit(task)
                    raise
                finally:
                    self._committing.pop(task.id, None)
        self._record(task)
        if (
            inline
            and self._is_inline(task)
            and not len(task.device.queue)
            and (task.deadline is None or time.monotonic() < task.deadline)
        ):
            self._run_inline(task)
        else:
            self._enqueue(task)
        return task

    def _forget_request(self, task: Task) -> None:
        """Drops the request id's entry if it is still this task's: a task claimed
        meanwhile under the same id (from a dead orchestrator) keeps its entry.
        Popping it unconditionally lost the claimed task's entry, and every later
        retry of that request id was refused by the store as a duplicate."""
        key = (task.tenant, task.request_id or "")
        if task.request_id and self._requests.get(key) is task:
            del self._requests[key]

    async def _taken(self, tenant: str, request_id: str, fingerprint: str) -> Task:
        """A shared store already holds a task with this request id (another
        orchestrator's, or a dead one's not yet claimed): that task is the answer."""
        first = self._requests.get((tenant, request_id))
        if first is not None:  # claimed by this process while the commit failed
            return await self._same_request(first, fingerprint)
        assert self.journal is not None
        snap = await self.journal.find_request(tenant, request_id)
        if not snap.tasks:  # forgotten (retention) between the refusal and this read
            raise StoreUnavailable(
                f"request_id {request_id!r} was taken and released meanwhile; retry"
            )
        return await self._same_request(self.view(snap.tasks[0], snap), fingerprint)

    async def _same_request(self, first: Task, fingerprint: str) -> Task:
        if (first.fingerprint or "") != fingerprint:
            raise InvalidArgument(
                [
                    Violation(
                        "request_id",
                        f"already used for a different task ({first.name}); "
                        "a retry must send the same task, a new task a new request_id",
                    )
                ]
            )
        pending = self._committing.get(first.id)
        if pending is not None:
            await asyncio.shield(pending)
        return first

    def _record_of(self, task: Task, spec: TaskSpec) -> TaskRecord:
        selector = spec.selector
        return TaskRecord(
            id=task.id,
            seq=task.seq,
            tenant=task.tenant,
            op=task.op,
            state=int(TaskState.QUEUED),
            priority=task.priority,
            spec=json.dumps(
                {
                    "params": dict(spec.params),
                    "kind": selector.kind.value if selector.kind is not None else None,
                    "device": selector.name,
                    "keep_outputs": spec.keep_outputs,
                    "retry": task.retry.to_json(),
                    "deadline": _wall_deadline(task.deadline),
                },
                separators=(",", ":"),
            ),
            labels=json.dumps(task.labels, separators=(",", ":")),
            request_id=task.request_id,
            fingerprint=task.fingerprint,
            attempt=0,
            device=task.device_name,
            node=self.owner,
            lease_until=time.time() + self.lease_seconds if self.owner else None,
            create_time=task.create_time,
            trace_context=task.trace_context,
        )

    def _journal(self, *ops_: Op) -> None:
        """Queues updates of a journaled task for the next commit; nobody waits."""
        if self.journal is None:
            return
        try:
            self.journal.write(*ops_)
        except StoreUnavailable as exc:  # closed while shutting down: recovery redoes it
            log.warning("not journaled: %s", exc)

    def _journal_held(self, task_id: str, attempt: int | None, *ops_: Any) -> None:
        """Queues writes of a task this process holds: on a shared store, fenced
        (applied only while the task's row is still this holder's, at `attempt`)."""
        if self.owner:
            self._journal(Fenced(task_id, self.owner, attempt, tuple(ops_)))
        else:
            self._journal(*ops_)

    def begin(self, spec: TaskSpec, *, deadline: float | None = None) -> Task:
        """Starts a task for a waiting caller: small CPU tasks run inline, on the
        spot (a thread hop costs more than such a kernel); the rest queue."""
        return self.begin_prepared(self.prepare(spec), deadline=deadline)

    def begin_prepared(self, task: Task, *, deadline: float | None = None) -> Task:
        """`begin` for a task from `prepare` (a caller that checks the validated call
        first, e.g. shared-memory outputs against their room)."""
        task.deadline = deadline
        self._admit(task)
        self._record(task)
        if self._is_inline(task):
            self._run_inline(task)
        else:
            if self.tracing is not None:
                # its run (forwarded to a node, say) is a span of the caller's trace
                task.trace_context = self.tracing.capture()
            self._enqueue(task)
        return task

    def inline_plan(self, spec: TaskSpec, task: Task) -> InlinePlan | None:
        """The plan of a task `begin` ran inline for `spec`, to begin the same call
        shape again with `begin_planned`; None where the spec is not one of plain
        tensors with default params, labels and selector, or the task did not run inline."""
        if (
            spec.params
            or spec.labels
            or spec.keep_outputs
            or spec.selector != _ANY_DEVICE
            or any(isinstance(item, str) for item in spec.inputs)
            or task.call is None
            or not self._is_inline(task)
        ):
            return None
        call = task.call
        dtype = call.inputs[0].dtype if call.inputs else ""
        capable = self._capable.get((spec.selector, spec.op, dtype)) or ()
        shapes = [m.shape for m in call.inputs]
        # A device's refusal depends on the call alone, so it holds for the plan's life.
        able = tuple(d for d in capable if d.refusal(spec.op, shapes, call.params) is None)
        if task.device not in able or any(getattr(d, "remote", False) for d in able):
            return None  # remote devices take turns (select): no fixed plan for those
        return InlinePlan(
            op=task.op,
            call=call,
            work=placement.work_of(call),
            device=task.device,
            able=able,
            dtype=dtype,
            held_bytes=task.held_bytes,
            reason=task.placement_reason,
            generation=self._generation,
            runner=_planned_runner(task.device, call, shapes),
        )

    def begin_planned(
        self,
        plan: InlinePlan,
        inputs: list[np.ndarray],
        *,
        tenant: str,
        priority: int = 0,
        deadline: float | None = None,
    ) -> Task | None:
        """`begin` of inputs of exactly the plan's dtypes and shapes: the task is
        recorded and run inline as `begin` would. None when the plan is stale or the
        task would now go elsewhere: the caller then takes `begin`."""
        if plan.generation != self._generation:
            return None
        if not self._accepting:
            raise Unavailable("the server is shutting down and accepts no new tasks")
        device = plan.device
        if len(plan.able) > 1 and not _first_to_finish(device, plan.able, plan.work):
            return None
        task = Task(
            id=f"{random.getrandbits(128):032x}",
            seq=next(self._seq),
            op=plan.op,
            tenant=tenant,
            priority=priority,
            labels={},
            keep_outputs=False,
            device=device,
            call=plan.call,
            inputs=inputs,
            elements=plan.work.elements,
            device_name=device.name,
            held_bytes=plan.held_bytes,
            selector=_ANY_DEVICE,
            placement_reason=plan.reason,
            deadline=deadline,
        )
        self._admit(task)
        self._tasks[task.name] = task
        self._run_planned(task, plan)
        return task

    async def wait(self, task: Task) -> Task:
        """Waits for a task begun for this caller. At its deadline the task
        fails with DEADLINE_EXCEEDED; if the caller goes away it is cancelled."""
        if task.state.terminal:
            return task
        try:
            if task.deadline is None:
                await task.wait()
            else:
                await asyncio.wait_for(task.wait(), max(0.0, task.deadline - time.monotonic()))
        except TimeoutError:
            self._abort(task, TaskState.FAILED, Code.DEADLINE_EXCEEDED, "deadline exceeded")
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller's deadline passes, often
            # before our own timer fires: report that as the deadline it was.
            # The server learns the deadline as a relative timeout on arrival, so
            # its copy runs a little later than the caller's: allow for that skew.
            if task.deadline is not None and time.monotonic() >= task.deadline - DEADLINE_SKEW:
                self._abort(task, TaskState.FAILED, Code.DEADLINE_EXCEEDED, "deadline exceeded")
            else:
                self._abort(task, TaskState.CANCELLED, Code.CANCELLED, "the caller cancelled")
            raise
        return task

    async def run(self, spec: TaskSpec, *, deadline: float | None = None) -> Task:
        """Runs a task to its end (see `begin` and `wait`)."""
        return await self.wait(self.begin(spec, deadline=deadline))

    def _is_inline(self, task: Task) -> bool:
        return (
            task.elements <= self.options.inline_max_elements
            and task.device.info.kind is DeviceKind.CPU
            and (self._batcher is None or batch_class(task, self._batcher.options) is None)
            and not getattr(task.device, "remote", False)
        )

    def _admit(self, task: Task, *, enforce: bool = True) -> None:
        """Per-tenant quotas (core.limits): unfinished tasks, and the bytes of their
        inputs (but named tensors, which the tensor store charges) and outputs,
        refused before the task is journaled, queued or run. `_finish` gives them
        back. A task recovered after a restart was admitted before it, so it is
        only counted."""
        self.store.ledger.admit(task.tenant, task.held_bytes, enforce=enforce)
        if task.pinned:
            self.store.pin(task.pinned)

    def _unadmit(self, task: Task) -> None:
        self.store.ledger.done(task.tenant, task.held_bytes)
        if task.pinned:
            self.store.unpin(task.tenant, task.pinned)

    def _record(self, task: Task) -> None:
        self._tasks[task.name] = task

    def _enqueue(self, task: Task) -> None:
        if getattr(task.device, "gone", False) and not self._replace(task):
            return
        if (
            self._batcher is not None
            and not getattr(task.device, "remote", False)
            and self._batcher.add(task)
        ):
            self._emit(task, "queued for a batch")
            return
        self._queued[task.seq] = task
        task.device.queue.push(task.seq, task.tenant, task.priority)
        self._emit(task, "queued")
        self._work[task.device].set()

    # -- reads ------------------------------------------------------------

    def get(self, name: str, *, tenant: str) -> Task:
        task = self._tasks.get(name)
        # Another tenant's task is reported exactly like a missing one.
        if task is None or task.tenant != tenant:
            raise NotFound(f"task {name!r} not found (it may have aged out of retention)")
        return task

    def list(
        self,
        *,
        tenant: str,
        state: TaskState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Task], str]:
        """Newest first. The token is the sequence number to continue below."""
        return listing.newest_first(
            self._tasks.values(),
            tenant=tenant,
            state=state,
            page_size=page_size,
            page_token=page_token,
        )

    async def watch(self, name: str, *, tenant: str) -> AsyncGenerator[TaskEvent, None]:
        """The current state, then every change until the task ends."""
        task = self.get(name, tenant=tenant)
        queue: asyncio.Queue[TaskEvent] = asyncio.Queue()
        task._watchers.append(queue)
        try:
            event = TaskEvent(task.name, task.state, time.time(), "current state", task)
            while True:
                yield event
                if event.state.terminal:
                    return
                event = await queue.get()
        finally:
            task._watchers.remove(queue)

    # -- cancellation -----------------------------------------------------

    def cancel(self, name: str, *, tenant: str) -> Task:
        """Cancels a task. A queued task never runs; a running kernel cannot be
        preempted, so its result is discarded when it returns. Cancelling a
        finished task changes nothing."""
        task = self.get(name, tenant=tenant)
        self._abort(task, TaskState.CANCELLED, Code.CANCELLED, "cancelled by request")
        return task

    def _abort(self, task: Task, state: TaskState, code: Code, message: str) -> None:
        if task.state.terminal:
            return
        if task._retry_handle is not None:
            task._retry_handle.cancel()
            task._retry_handle = None
        if task.state is TaskState.QUEUED:
            task.device.queue.remove(task.seq)
            self._queued.pop(task.seq, None)
            if self._batcher is not None:
                self._batcher.discard(task)
            self._unplaced.pop(task.seq, None)
        if task._forward is not None:
            task._forward.cancel()  # the forwarded call is cancelled on its node too
        self._finish(task, state, TaskFailure(code, message))

    # -- execution --------------------------------------------------------

    async def _worker(self, device: LocalDevice) -> None:
        loop = asyncio.get_running_loop()
        work = self._work[device]
        remote = getattr(device, "remote", False)
        while True:
            outputs = None  # an idle worker must not hold on to its last task's outputs
            if remote and device.gone:  # type: ignore[attr-defined]
                return
            if not len(device.queue):
                await work.wait()
                continue
            task = self._queued.pop(device.queue.pop())
            if task.deadline is not None and time.monotonic() > task.deadline:
                self._finish(
                    task,
                    TaskState.FAILED,
                    TaskFailure(Code.DEADLINE_EXCEEDED, "deadline exceeded while queued"),
                )
                continue
            self._start(task)
            if remote:
                # The attempt's span: the node's RunTask becomes its child (the
                # forwarded call's channel carries the trace context).
                with self._traced(task):
                    await self._forward(task, device)
                continue
            attempt = task.attempt
            call = task.call
            assert call is not None and task.inputs is not None  # a queued task has both
            device.task_started()
            began = time.perf_counter()
            try:
                with self._traced(task):
                    outputs = await loop.run_in_executor(
                        self._pool,
                        device.run,
                        task.op,
                        task.inputs,
                        call.params,
                        call.outputs,
                    )
            except Exception as exc:  # a kernel failure fails its task, never the server
                outputs = None
                failure = _kernel_failure(task, exc)
            finally:
                device.task_ended()
            # Cancelled or shut down while running, or (fencing) no longer this attempt.
            if task.state.terminal or task.attempt != attempt:
                continue
            if outputs is None:
                self._fail(task, failure)
            else:
                seconds = time.perf_counter() - began
                if seconds >= OBSERVE_FROM_S and task.call is not None:
                    device.observe(task.call, seconds)
                self._complete(task, outputs, seconds)

    def _traced(self, task: Task) -> contextlib.AbstractContextManager[None]:
        """The attempt's span, in its submitter's trace (nothing when untraced)."""
        if self.tracing is None or not task.trace_context:
            return _UNTRACED
        return self.tracing.run(task)

    def _batch_start(self, task: Task) -> bool:
        """A task's batch is about to run: False if it may not run with it."""
        if task.state is not TaskState.QUEUED:
            return False
        if task.deadline is not None and time.monotonic() > task.deadline:
            self._finish(
                task,
                TaskState.FAILED,
                TaskFailure(Code.DEADLINE_EXCEEDED, "deadline exceeded while queued"),
            )
            return False
        self._start(task)
        return True

    def _batch_done(
        self,
        task: Task,
        attempt: int,
        result: builtins.list[np.ndarray] | BaseException,
        seconds: float,
    ) -> None:
        if task.state.terminal or task.attempt != attempt:
            return  # cancelled while its batch ran, or (fencing) no longer this attempt
        if isinstance(result, BaseException):
            self._fail(task, _kernel_failure(task, result))  # type: ignore[arg-type]
        else:
            self._complete(task, result, seconds)

    async def _forward(self, task: Task, device: LocalDevice) -> None:
        """Runs one attempt on another node. Its answer counts only if the task is
        still on this dispatch (fencing); a lost node sends the task back to the queue."""
        task.dispatch += 1
        dispatch = task.dispatch
        node = device.node  # type: ignore[attr-defined]
        forward = asyncio.ensure_future(device.forward(task))  # type: ignore[attr-defined]
        task._forward = forward
        node.inflight.add(forward)
        device.task_started()
        began = time.perf_counter()
        failure: TaskFailure | None = None
        lost: str | None = None
        outputs: builtins.list[np.ndarray] = []  # read only once the attempt succeeded
        try:
            await asyncio.wait((forward,))
        finally:
            device.task_ended()
            node.inflight.discard(forward)
            if task._forward is forward:
                task._forward = None
        if task.state.terminal or task.dispatch != dispatch:
            return  # cancelled, or a late answer from an attempt that was replaced
        if forward.cancelled():
            lost = f"{device.name} was lost while running attempt: {device.lost_reason}"  # type: ignore[attr-defined]
        else:
            exc = forward.exception()
            if exc is None:
                outputs = forward.result()
            elif isinstance(exc, NodeLost):
                lost = str(exc)
            elif isinstance(exc, AttemptFailed):
                failure = exc.failure
            else:
                failure = TaskFailure(Code.INTERNAL, f"forwarding to {device.name}: {exc!r}")
        if lost is not None:
            # A node that cannot be reached takes no more work now, not at its lease's
            # end; if it is alive after all, its next heartbeat is refused and it joins again.
            node.mesh.unreachable(node, lost)
            self._node_lost(task, device, lost)
        elif failure is not None:
            self._fail(task, failure)
        else:
            self._complete(task, outputs, time.perf_counter() - began)

    def _run_inline(
        self,
        task: Task,
        runner: Callable[[Sequence[np.ndarray]], builtins.list[np.ndarray]] | None = None,
    ) -> None:
        self._start(task)
        began = time.perf_counter()
        call = task.call
        assert call is not None and task.inputs is not None  # a task that runs has both
        try:
            if runner is not None:
                outputs = runner(task.inputs)
            else:
                outputs = task.device.run(task.op, task.inputs, call.params, call.outputs)
        except Exception as exc:
            self._fail(task, _kernel_failure(task, exc))  # a submitted task retries
            return
        seconds = time.perf_counter() - began
        if seconds >= OBSERVE_FROM_S and task.call is not None:
            task.device.observe(task.call, seconds)
        self._complete(task, outputs, seconds)

    def _run_planned(self, task: Task, plan: InlinePlan) -> None:
        """`_run_inline` of a task `begin_planned` just made: nothing else has seen it
        (not journaled, no kept outputs, watchers or callbacks), so its start and its
        success are the few writes `_start`, `_complete` and `_finish` make for such a
        task, without their checks. A failure takes the usual path (`_fail`)."""
        device = task.device
        task.state = TaskState.RUNNING
        task.start_time = start = time.time()
        metrics.TASK_QUEUE_SECONDS.observe((device.name,), start - task.create_time)
        runner = plan.runner
        began = time.perf_counter()
        try:
            if runner is not None:
                outputs = runner(task.inputs)  # type: ignore[arg-type]
            else:
                call = plan.call
                outputs = device.run(task.op, task.inputs, call.params, call.outputs)  # type: ignore[arg-type]
        except Exception as exc:
            self._fail(task, _kernel_failure(task, exc))
            return
        seconds = time.perf_counter() - began
        if seconds >= OBSERVE_FROM_S:
            device.observe(plan.call, seconds)
        task.run_seconds = seconds
        metrics.TASK_RUN_SECONDS.observe((task.op, device.name), seconds)
        task.outputs = outputs
        task.state = TaskState.SUCCEEDED
        task.end_time = end = time.time()
        task.inputs = None
        self._unadmit(task)
        metrics.TASKS.inc((task.op, "SUCCEEDED"))
        task._done.set()
        self._retain(task, end)

    def _start(self, task: Task) -> None:
        task.state = TaskState.RUNNING
        task.start_time = time.time()
        metrics.TASK_QUEUE_SECONDS.observe((task.device.name,), task.start_time - task.create_time)
        if task.journaled:
            task.attempt += 1
            attempt = Attempt(task.attempt, TaskState.RUNNING, task.device_name, task.start_time)
            task.attempts.append(attempt)
            self._journal_held(
                task.id,
                task.attempt - 1,  # the row's attempt until this write
                UpdateTask(
                    task.id,
                    {
                        "state": int(TaskState.RUNNING),
                        "attempt": task.attempt,
                        "device": task.device_name,
                        "start_time": task.start_time,
                        "not_before": None,
                    },
                ),
                PutAttempt(_attempt_record(task.id, attempt)),
            )
        if task._watchers:
            self._emit(task, f"running on {task.device.name}")

    def _fail(self, task: Task, failure: TaskFailure) -> None:
        """An attempt failed: a journaled task retries by its policy, else it ends."""
        if task.relinquished:
            return  # another orchestrator runs it now
        policy = task.retry
        if (
            task.journaled
            and policy.retryable(int(failure.code))
            and task.attempt < policy.maximum_attempts
        ):
            self._retry_later(task, failure)
        else:
            self._finish(task, TaskState.FAILED, failure)

    def _retry_later(self, task: Task, failure: TaskFailure) -> None:
        ended = self._end_attempt(task, TaskState.FAILED, failure)
        delay = task.retry.delay(task.attempt)
        task.state = TaskState.QUEUED
        self._journal_held(
            task.id,
            task.attempt,
            UpdateTask(
                task.id, {"state": int(TaskState.QUEUED), "not_before": time.time() + delay}
            ),
            *([PutAttempt(_attempt_record(task.id, ended))] if ended else []),
        )
        self._emit(
            task, f"attempt {task.attempt} failed ({failure.message}); retrying in {delay:g}s"
        )
        task._retry_handle = asyncio.get_running_loop().call_later(delay, self._requeue, task)

    def _requeue(self, task: Task) -> None:
        # Also while draining: a graceful stop lets queued work, retries included, finish.
        task._retry_handle = None
        if task.state is TaskState.QUEUED:
            self._enqueue(task)

    @staticmethod
    def _end_attempt(task: Task, state: TaskState, failure: TaskFailure | None) -> Attempt | None:
        if not task.attempts or task.attempts[-1].state is not TaskState.RUNNING:
            return None
        attempt = task.attempts[-1]
        attempt.state = state
        attempt.end_time = time.time()
        attempt.error = failure
        return attempt

    def _complete(self, task: Task, outputs: builtins.list[np.ndarray], seconds: float) -> None:
        if task.relinquished:
            return  # another orchestrator runs it now: this result is dropped
        task.run_seconds = seconds
        metrics.TASK_RUN_SECONDS.observe((task.op, task.device.name), seconds)
        if task.keep_outputs and task.remote_outputs is not None:
            # kept on the node that produced them (it charges the tenant there)
            self.store.ledger.release(task.tenant, task.held_bytes)
            task.held_bytes = 0
            task.output_refs = [self._remote_ref(r) for r in task.remote_outputs]
        elif task.keep_outputs:
            # the outputs move to the tensor store, which charges the tenant for them
            self.store.ledger.release(task.tenant, task.held_bytes)
            task.held_bytes = 0
            try:
                for out in outputs:
                    stored = self.store.put(out, tenant=task.tenant, device=task.device.name)
                    task.output_refs.append(stored.hollow())
            except ResourceExhausted as exc:
                for ref in task.output_refs:
                    self.store.delete(ref.name, tenant=task.tenant)
                task.output_refs.clear()
                self._finish(
                    task, TaskState.FAILED, TaskFailure(Code.RESOURCE_EXHAUSTED, exc.message)
                )
                return
        else:
            task.outputs = outputs
        self._finish(task, TaskState.SUCCEEDED, None)

    def _finish(self, task: Task, state: TaskState, failure: TaskFailure | None) -> None:
        if task.relinquished:
            return
        task.state = state
        task.error = failure
        task.end_time = time.time()
        task.inputs = None  # inputs are not needed any more; free them now
        if task.journaled:
            self._journal_end(task)
        self._unadmit(task)
        metrics.TASKS.inc((task.op, state.name))
        if task._watchers:
            self._emit(task, failure.message if failure else "succeeded")
        task._done.set()
        if task._callbacks:
            callbacks, task._callbacks = task._callbacks, []
            for callback in callbacks:
                callback(task)
        self._retain(task, task.end_time)

    def _retain(self, task: Task, end_time: float) -> None:
        """Keeps a finished task (GetTask, ListTasks) within the retention limits."""
        if task.outputs:
            self._retained_bytes += task.retained_bytes
        self._finished[task.name] = task
        opts = self.options
        if (
            len(self._tasks) > opts.retention_tasks
            or self._retained_bytes > opts.retention_bytes
            or self._oldest_expired(end_time)
        ):
            self._evict()

    def _journal_end(self, task: Task) -> None:
        ended = self._end_attempt(task, task.state, task.error)
        error = task.error
        ops_: list[Op] = []
        if task.state is TaskState.SUCCEEDED and task.outputs:
            ops_.append(PutBlob(outputs_key(task.id), codec.encode(task.outputs)))
        ops_.append(
            UpdateTask(
                task.id,
                {
                    "state": int(task.state),
                    "end_time": task.end_time,
                    "run_seconds": task.run_seconds,
                    "error_code": int(error.code) if error else None,
                    "error_message": error.message if error else None,
                    "output_refs": json.dumps([r.name for r in task.output_refs]),
                    "output_bytes": task.retained_bytes,
                    "not_before": None,
                },
            )
        )
        if ended is not None:
            ops_.append(PutAttempt(_attempt_record(task.id, ended)))
        # Fenced: a holder whose lease ran out must not write the end of a task
        # another orchestrator claimed (and may have run) meanwhile.
        self._journal_held(task.id, task.attempt, *ops_)

    def _oldest_expired(self, now: float) -> bool:
        if not self._finished:
            return False
        oldest = next(iter(self._finished.values()))
        return (oldest.end_time or 0.0) < now - self.options.retention_seconds

    def _emit(self, task: Task, message: str) -> None:
        if not task._watchers:
            return
        event = TaskEvent(task.name, task.state, time.time(), message, task)
        for queue in task._watchers:
            queue.put_nowait(event)

    def _evict(self) -> None:
        """Forgets the oldest finished tasks beyond the retention limits."""
        opts = self.options
        cutoff = time.time() - opts.retention_seconds
        finished = self._finished
        while finished:
            oldest = next(iter(finished.values()))
            if not (
                len(self._tasks) > opts.retention_tasks
                or self._retained_bytes > opts.retention_bytes
                or (oldest.end_time or 0.0) < cutoff
            ):
                break
            name, task = finished.popitem(last=False)
            self._tasks.pop(name, None)
            self._retained_bytes -= task.retained_bytes
            if task.journaled:
                self._journal_held(task.id, None, DeleteTask(task.id))
                if task.request_id:
                    self._requests.pop((task.tenant, task.request_id), None)

    # -- device figures ---------------------------------------------------

    def queue_depth(self, device: LocalDevice) -> int:
        return len(device.queue)


def _held_bytes(
    elements: int, arrays: Sequence[np.ndarray], inputs: Sequence[np.ndarray | str]
) -> int:
    """What a task is charged while unfinished: its inputs and outputs, but not
    the named tensors it reads (the tensor store or their node charges those)."""
    total = elements * (arrays[0].itemsize if arrays else 8)
    named = sum(a.nbytes for a, item in zip(arrays, inputs, strict=True) if isinstance(item, str))
    return max(0, total - named)


def _first_to_finish(
    device: LocalDevice, able: Sequence[LocalDevice], work: placement.Work
) -> bool:
    """Whether select() would pick `device` among `able`: the earliest expected finish,
    the first in order among equals (as min() picks)."""
    mine = expected_finish(device, work)
    before = True
    for other in able:
        if other is device:
            before = False
        elif (
            (expected_finish(other, work) <= mine)
            if before
            else (expected_finish(other, work) < mine)
        ):
            return False
    return True


def _planned_runner(
    device: LocalDevice, call: ops.ValidatedCall, shapes: Sequence[tuple[int, ...]]
) -> Callable[[Sequence[np.ndarray]], builtins.list[np.ndarray]] | None:
    """The backend's run of this one call shape (`Device.planned`), for a device whose
    `run` is its backend's; None where it is not (a wrapped or fake device), or where
    the backend refuses the call (`run` then raises as it would have)."""
    if type(device).run is not LocalDevice.run or "run" in getattr(device, "__dict__", {}):
        return None
    planned = getattr(device.backend, "planned", None)
    if planned is None or not call.inputs:
        return None
    try:
        runner: Callable[[Sequence[np.ndarray]], builtins.list[np.ndarray]] = planned(
            call.op.name, shapes, call.inputs[0].dtype, call.params, call.outputs
        )
    except ValueError:
        return None
    return runner


def _attempt_record(task_id: str, attempt: Attempt) -> AttemptRecord:
    error = attempt.error
    return AttemptRecord(
        task_id=task_id,
        number=attempt.number,
        state=int(attempt.state),
        device=attempt.device,
        start_time=attempt.start_time,
        end_time=attempt.end_time,
        error_code=int(error.code) if error else None,
        error_message=error.message if error else None,
    )


def _attempt_of(record: AttemptRecord) -> Attempt:
    error = None
    if record.error_code is not None:
        error = TaskFailure(_code(record.error_code), record.error_message or "")
    return Attempt(
        number=record.number,
        state=TaskState(record.state),
        device=record.device,
        start_time=record.start_time,
        end_time=record.end_time,
        error=error,
    )


def _code(value: int) -> Code | int:
    try:
        return Code(value)
    except ValueError:
        return value


def _wall_deadline(deadline: float | None) -> float | None:
    """A monotonic deadline as wall-clock time, which means something after a restart."""
    return None if deadline is None else time.time() + (deadline - time.monotonic())


def fingerprint_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _near_reason(remote: Mapping[int, mesh_tensors.RemoteTensor], device: LocalDevice) -> str:
    """Why a task with stored inputs went where it did: to the node holding them,
    or elsewhere with them moved there."""
    node = device.info.node
    here = sorted({t.name for t in remote.values() if t.node == node})
    away = sorted({f"{t.name} (from {t.node})" for t in remote.values() if t.node != node})
    parts = []
    if here:
        parts.append(f"node {node} holds the input {', '.join(here)}")
    if away:
        parts.append(f"moves the input {', '.join(away)}")
    return "; ".join(parts)


def _frozen(value: object) -> object:
    """A hashable stand-in for a params value. The type is part of it: True, 1 and
    1.0 hash alike, but the catalog accepts them for different params."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return (type(value).__name__, value)


def _kernel_failure(task: Task, exc: Exception) -> TaskFailure:
    where = f"{task.op} failed on {task.device.name}"
    if isinstance(exc, OutOfDeviceMemory):
        return TaskFailure(Code.RESOURCE_EXHAUSTED, f"{where}: {exc}")
    if isinstance(exc, LaunchError):
        return TaskFailure(Code.UNAVAILABLE, f"{where}: {exc}")
    return TaskFailure(Code.INTERNAL, f"{where}: {type(exc).__name__}: {exc}")


__all__ = [
    "DEFAULT_TENANT",
    "Attempt",
    "KernelmeshError",
    "Task",
    "TaskEvent",
    "TaskFailure",
    "TaskManager",
    "TaskManagerOptions",
    "TaskSpec",
    "TaskState",
]
