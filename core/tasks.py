"""The task lifecycle: validate, record, queue, run on a device, notify
watchers, cancel, and forget old records within a bounded retention."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from cachetools import LRUCache

from kernelmesh.core import metrics, ops, placement
from kernelmesh.core.devices import DeviceKind, DeviceSelector, LocalDevice, select
from kernelmesh.core.errors import (
    Code,
    InvalidArgument,
    KernelmeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violation,
)
from kernelmesh.core.tensor_store import StoredTensor, TensorStore
from kernelmesh.native.backend import LaunchError, OutOfDeviceMemory

PREFIX = "tasks/"
DEADLINE_SKEW = 0.05  # seconds

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


@dataclass(frozen=True)
class TaskFailure:
    code: Code
    message: str


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
    call: ops.ValidatedCall
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
    held_bytes: int = 0  # charged to the tenant's ledger until the task ends
    _watchers: list[asyncio.Queue] = field(default_factory=list)
    _callbacks: list[Callable[[Task], None]] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return PREFIX + self.id

    @property
    def output_metas(self) -> tuple[ops.TensorMeta, ...]:
        return self.call.outputs

    @property
    def retained_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    async def wait(self) -> None:
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


@dataclass(frozen=True)
class TaskManagerOptions:
    limits: ops.Limits = field(default_factory=ops.Limits)
    retention_tasks: int = 10_000
    retention_bytes: int = 1 << 30
    workers_per_device: int = 2
    # Tasks this small run on the event loop: a thread hop costs more than the kernel.
    inline_max_elements: int = 1 << 14


class TaskManager:
    """Owns every task of this node, from submission to retention."""

    def __init__(
        self,
        devices: Sequence[LocalDevice],
        store: TensorStore,
        options: TaskManagerOptions | None = None,
    ) -> None:
        self.devices = list(devices)
        self.store = store
        self.options = options or TaskManagerOptions()
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        # Finished tasks in finish order: retention evicts from the front.
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._queued: dict[int, Task] = {}
        self._seq = itertools.count(1)
        self._retained_bytes = 0
        self._accepting = True
        self._work: dict[LocalDevice, asyncio.Event] = {}
        self._workers: list[asyncio.Task] = []
        workers = self.options.workers_per_device * max(1, len(self.devices))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernel")
        self._capable: dict = {}  # select()'s, for this fixed list of devices
        self._calls: LRUCache[tuple, tuple[ops.ValidatedCall, placement.Work]] = LRUCache(
            maxsize=4096
        )

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        # Gauges read live values when scraped, so the task path never updates them.
        metrics.TASKS_RETAINED.set_function(lambda: len(self._tasks))
        for device in self.devices:
            metrics.child(metrics.QUEUE_DEPTH, device.name).set_function(
                lambda d=device: len(d.queue)
            )
            metrics.child(metrics.RUNNING, device.name).set_function(lambda d=device: d.running)
            self._work[device] = asyncio.Event()
            for _ in range(self.options.workers_per_device):
                self._workers.append(asyncio.create_task(self._worker(device)))

    async def shutdown(self, grace: float) -> None:
        """Stops accepting work, lets queued and running tasks finish within
        `grace` seconds, then fails what is left with UNAVAILABLE."""
        self._accepting = False
        deadline = time.monotonic() + grace
        pending = [t for t in self._tasks.values() if not t.state.terminal]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(t.wait() for t in pending)),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
        for task in list(self._tasks.values()):
            if task.state is TaskState.QUEUED:
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

    # -- submission -------------------------------------------------------

    def prepare(self, spec: TaskSpec) -> Task:
        """Validates a spec against the op catalog and picks its device,
        before anything is allocated for it."""
        if not self._accepting:
            raise Unavailable("the server is shutting down and accepts no new tasks")
        arrays: list[np.ndarray] = []
        violations: list[Violation] = []
        for i, item in enumerate(spec.inputs):
            if isinstance(item, str):
                try:
                    arrays.append(self.store.get(item, tenant=spec.tenant).array)
                except NotFound:
                    violations.append(Violation(f"inputs[{i}].ref", f"tensor {item!r} not found"))
            else:
                arrays.append(item)
        if violations:
            raise InvalidArgument(violations)
        metas = [ops.TensorMeta(dtype_name(a.dtype), a.shape) for a in arrays]
        call, work = self._validated(spec.op, metas, spec.params)
        dtype = metas[0].dtype if metas else ""
        device = select(
            self.devices,
            spec.selector,
            spec.op,
            dtype,
            shapes=[m.shape for m in call.inputs],
            params=call.params,
            work=work,
            cache=self._capable,
        )
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
            held_bytes=work.elements * (arrays[0].itemsize if arrays else 8),
        )
        return task

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
        self._record(task)
        self._enqueue(task)
        return task

    def begin(self, spec: TaskSpec, *, deadline: float | None = None) -> Task:
        """Starts a task for a waiting caller: small CPU tasks run inline, on the
        spot (a thread hop costs more than such a kernel); the rest queue."""
        task = self.prepare(spec)
        task.deadline = deadline
        self._record(task)
        if self._is_inline(task):
            self._run_inline(task)
        else:
            self._enqueue(task)
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
        )

    def _record(self, task: Task) -> None:
        # Per-tenant quotas (core.limits): unfinished tasks, and the bytes of their
        # inputs and outputs, refused before the task is queued or run.
        ledger = self.store.ledger
        ledger.admit_task(task.tenant)
        try:
            ledger.reserve(task.tenant, task.held_bytes)
        except ResourceExhausted:
            ledger.task_done(task.tenant)
            raise
        self._tasks[task.name] = task

    def _enqueue(self, task: Task) -> None:
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
        size = 100 if page_size <= 0 else min(page_size, 1000)
        below = _decode_token(page_token) if page_token else math.inf
        page: list[Task] = []
        for task in reversed(self._tasks.values()):
            if task.seq >= below or task.tenant != tenant:
                continue
            if state is not None and task.state is not state:
                continue
            if len(page) == size:
                return page, _encode_token(page[-1].seq)
            page.append(task)
        return page, ""

    async def watch(self, name: str, *, tenant: str) -> AsyncIterator[TaskEvent]:
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
        if task.state is TaskState.QUEUED:
            task.device.queue.remove(task.seq)
            self._queued.pop(task.seq, None)
        self._finish(task, state, TaskFailure(code, message))

    # -- execution --------------------------------------------------------

    async def _worker(self, device: LocalDevice) -> None:
        loop = asyncio.get_running_loop()
        work = self._work[device]
        while True:
            if not len(device.queue):
                work.clear()
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
            device.task_started()
            began = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(
                    self._pool, device.run, task.op, task.inputs, task.call.params
                )
            except Exception as exc:  # a kernel failure fails its task, never the server
                outputs = None
                failure = _kernel_failure(task, exc)
            finally:
                device.task_ended()
            if task.state.terminal:  # cancelled or shut down while running
                continue
            if outputs is None:
                self._finish(task, TaskState.FAILED, failure)
            else:
                self._complete(task, outputs, time.perf_counter() - began)

    def _run_inline(self, task: Task) -> None:
        self._start(task)
        began = time.perf_counter()
        try:
            outputs = task.device.run(task.op, task.inputs, task.call.params)
        except Exception as exc:
            self._finish(task, TaskState.FAILED, _kernel_failure(task, exc))
            return
        self._complete(task, outputs, time.perf_counter() - began)

    def _start(self, task: Task) -> None:
        task.state = TaskState.RUNNING
        task.start_time = time.time()
        metrics.TASK_QUEUE_SECONDS.observe((task.device.name,), task.start_time - task.create_time)
        if task._watchers:
            self._emit(task, f"running on {task.device.name}")

    def _complete(self, task: Task, outputs: list[np.ndarray], seconds: float) -> None:
        task.run_seconds = seconds
        metrics.TASK_RUN_SECONDS.observe((task.op, task.device.name), seconds)
        if task.keep_outputs:
            # the outputs move to the tensor store, which charges the tenant for them
            self.store.ledger.release(task.tenant, task.held_bytes)
            task.held_bytes = 0
            try:
                for out in outputs:
                    task.output_refs.append(
                        self.store.put(out, tenant=task.tenant, device=task.device.name)
                    )
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
        task.state = state
        task.error = failure
        task.end_time = time.time()
        task.inputs = None  # inputs are not needed any more; free them now
        self.store.ledger.task_done(task.tenant)
        self.store.ledger.release(task.tenant, task.held_bytes)
        metrics.TASKS.inc((task.op, state.name))
        if task._watchers:
            self._emit(task, failure.message if failure else "succeeded")
        task._done.set()
        if task._callbacks:
            callbacks, task._callbacks = task._callbacks, []
            for callback in callbacks:
                callback(task)
        self._retained_bytes += task.retained_bytes
        self._finished[task.name] = task
        opts = self.options
        if len(self._tasks) > opts.retention_tasks or self._retained_bytes > opts.retention_bytes:
            self._evict()

    def _emit(self, task: Task, message: str) -> None:
        if not task._watchers:
            return
        event = TaskEvent(task.name, task.state, time.time(), message, task)
        for queue in task._watchers:
            queue.put_nowait(event)

    def _evict(self) -> None:
        """Forgets the oldest finished tasks beyond the retention limits."""
        opts = self.options
        while self._finished and (
            len(self._tasks) > opts.retention_tasks or self._retained_bytes > opts.retention_bytes
        ):
            name, task = self._finished.popitem(last=False)
            self._tasks.pop(name, None)
            self._retained_bytes -= task.retained_bytes

    # -- device figures ---------------------------------------------------

    def queue_depth(self, device: LocalDevice) -> int:
        return len(device.queue)


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


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"below:{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "below":
            raise ValueError(kind)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            [Violation("page_token", "not a page token returned by this server")]
        ) from None


__all__ = [
    "DEFAULT_TENANT",
    "KernelmeshError",
    "Task",
    "TaskEvent",
    "TaskFailure",
    "TaskManager",
    "TaskManagerOptions",
    "TaskSpec",
    "TaskState",
]
