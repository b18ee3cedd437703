"""Dynamic batching of small compatible tasks (Triton's dynamic batcher).

Off unless the server config enables it. Tasks of a batchable op with the same
device, dtype, input shapes and params form one batch class; a class's queued tasks
run as one kernel call once the largest preferred batch size is reached or the
oldest has waited `max_queue_delay_us`, and the result is split back per task.
matmul batches stack its 2-D operands into one batched (B,M,K) x (B,K,N) call;
elementwise ops run once over the concatenated buffers.

Each task keeps its own lifecycle: a task cancelled while its batch forms leaves it
(`discard`); one cancelled while its batch runs has its share discarded, as any
running task's. If the batched call fails, every task of it runs again on its own,
so one task's failure fails only that task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelmesh.core import ops
from kernelmesh.core.devices import DeviceKind

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from kernelmesh.core.devices import LocalDevice
    from kernelmesh.core.tasks import Task

# Ops whose calls of one shape class can run as one call and be split back.
BATCHABLE_OPS: frozenset[str] = frozenset(
    {"matmul", "add", "sub", "mul", "div", "relu", "gelu", "exp", "scale"}
)


@dataclass(frozen=True)
class BatchingOptions:
    """The server config's `batching:` section."""

    enabled: bool = False
    # Ops batched (a subset of BATCHABLE_OPS); empty: all of them.
    ops: tuple[str, ...] = ()
    # A batch of the largest size here runs at once; after the delay, the queued tasks
    # run in batches of the preferred sizes, largest first, and the rest together.
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_batch_size: int = 32
    # How long the oldest task of a forming batch waits for more, in microseconds.
    max_queue_delay_us: int = 500
    # Tasks above this many output elements run alone (batching pays for small calls).
    max_task_elements: int = 1 << 20

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> BatchingOptions:
        if not data:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"batching: unknown settings: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        values = dict(data)
        for key in ("ops", "preferred_batch_sizes"):
            if key in values:
                values[key] = tuple(values[key])
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        bad = sorted(set(self.ops) - BATCHABLE_OPS)
        if bad:
            raise ValueError(
                f"batching.ops: {', '.join(bad)} cannot be batched "
                f"(batchable: {', '.join(sorted(BATCHABLE_OPS))})"
            )
        if self.max_batch_size < 1 or any(s < 1 for s in self.preferred_batch_sizes):
            raise ValueError("batching: batch sizes must be at least 1")
        if any(s > self.max_batch_size for s in self.preferred_batch_sizes):
            raise ValueError("batching.preferred_batch_sizes: larger than max_batch_size")
        if self.max_queue_delay_us < 0:
            raise ValueError("batching.max_queue_delay_us: must not be negative")

    @property
    def full_size(self) -> int:
        return max(self.preferred_batch_sizes, default=self.max_batch_size)


def batch_class(task: Task, options: BatchingOptions) -> tuple[Any, ...] | None:
    """The class a task batches in, or None when it runs alone."""
    op = task.op
    if op not in (options.ops or BATCHABLE_OPS) or task.elements > options.max_task_elements:
        return None
    call = task.call
    assert call is not None  # a task to run has its validated call
    metas = call.inputs
    shapes = tuple(m.shape for m in metas)
    if op == "matmul":
        if len(shapes[0]) != 2:
            return None
    elif len(shapes) == 2 and shapes[0] != shapes[1]:
        return None  # a scalar operand: concatenation would not line up
    try:
        params = tuple(sorted(call.params.items()))
        hash(params)
    except TypeError:
        return None
    return (id(task.device), op, metas[0].dtype, shapes, params)


def run_batch(
    device: LocalDevice,
    op: str,
    params: dict[str, object],
    inputs: Sequence[Sequence[np.ndarray]],
    outputs: tuple[ops.TensorMeta, ...],
) -> list[list[np.ndarray] | BaseException]:
    """Runs `len(inputs)` calls of one class as one; per call, its outputs or, where
    the batched call failed and the call alone failed too, its exception."""
    n = len(inputs)
    if op == "matmul" and device.info.kind is DeviceKind.CPU:
        # NumPy's matmul of stacks calls BLAS once per pair anyway: on the CPU the
        # pairs run one by one in this one hop, without stacking both operands (a copy
        # of every input, about half the kernel's time for 256x256) or slicing the result.
        return _each(device, op, params, inputs, outputs)
    try:
        if op == "matmul":
            a = np.stack([x[0] for x in inputs])
            b = np.stack([x[1] for x in inputs])
            out = device.run(op, [a, b], params)[0]
            return [[out[i]] for i in range(n)]
        arity = len(inputs[0])
        flat = [np.concatenate([x[j].reshape(-1) for x in inputs]) for j in range(arity)]
        out = device.run(op, flat, params)[0].reshape((n, *outputs[0].shape))
        return [[out[i]] for i in range(n)]
    except Exception:
        pass  # one bad call should not fail its neighbours: run each alone
    return _each(device, op, params, inputs, outputs)


def _each(
    device: LocalDevice,
    op: str,
    params: dict[str, object],
    inputs: Sequence[Sequence[np.ndarray]],
    outputs: tuple[ops.TensorMeta, ...],
) -> list[list[np.ndarray] | BaseException]:
    """Each call of a batch alone: its outputs, or its own exception."""
    results: list[list[np.ndarray] | BaseException] = []
    for x in inputs:
        try:
            results.append(device.run(op, x, params, outputs))
        except Exception as exc:
            results.append(exc)
    return results


@dataclass
class _Forming:
    tasks: list[Task] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


# (task, attempt at start, outputs or exception, seconds)
BatchDone = Callable[["Task", int, "list[np.ndarray] | BaseException", float], None]


class Batcher:
    """Forms batches per class and runs each on the executor.

    `start(task) -> bool` marks a task running (False: it may not run, e.g. its
    deadline passed, and the caller has ended it); `done` receives each task's share."""

    def __init__(
        self,
        options: BatchingOptions,
        executor: Executor,
        start: Callable[[Task], bool],
        done: BatchDone,
    ) -> None:
        self.options = options
        self._executor = executor
        self._start = start
        self._done = done
        self._forming: dict[tuple[Any, ...], _Forming] = {}
        self._where: dict[int, tuple[Any, ...]] = {}  # task seq -> its class, while forming
        self._running: set[asyncio.Task[None]] = set()
        self.batches_run = 0
        self.tasks_batched = 0

    def add(self, task: Task) -> bool:
        """Queues a task for a batch; False if it does not batch (it runs alone)."""
        key = batch_class(task, self.options)
        if key is None:
            return False
        forming = self._forming.get(key)
        if forming is None:
            forming = self._forming[key] = _Forming()
        forming.tasks.append(task)
        self._where[task.seq] = key
        if len(forming.tasks) >= self.options.full_size:
            self._flush(key, whole=False)
        elif forming.timer is None:
            delay = self.options.max_queue_delay_us / 1e6
            forming.timer = asyncio.get_running_loop().call_later(delay, self._flush, key, True)
        return True

    def discard(self, task: Task) -> bool:
        """Takes a task out of its forming batch (cancelled, or shut down)."""
        key = self._where.pop(task.seq, None)
        if key is None:
            return False
        forming = self._forming[key]
        forming.tasks.remove(task)
        if not forming.tasks:
            if forming.timer is not None:
                forming.timer.cancel()
            del self._forming[key]
        return True

    def forming(self) -> int:
        """Tasks waiting in forming batches."""
        return len(self._where)

    def _flush(self, key: tuple[Any, ...], whole: bool) -> None:
        forming = self._forming.get(key)
        if forming is None:
            return
        if forming.timer is not None:
            forming.timer.cancel()
            forming.timer = None
        tasks = forming.tasks
        sizes = sorted(self.options.preferred_batch_sizes, reverse=True)
        full = self.options.full_size
        while len(tasks) >= full or (whole and tasks):
            size = next((s for s in sizes if s <= len(tasks)), None)
            if size is None:
                size = min(len(tasks), self.options.max_batch_size)
            batch, tasks = tasks[:size], tasks[size:]
            for task in batch:
                self._where.pop(task.seq, None)
            running = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(running)
            running.add_done_callback(self._running.discard)
        forming.tasks = tasks
        if not tasks:
            del self._forming[key]
        elif forming.timer is None:
            delay = self.options.max_queue_delay_us / 1e6
            forming.timer = asyncio.get_running_loop().call_later(delay, self._flush, key, True)

    async def _run(self, batch: list[Task]) -> None:
        started = [t for t in batch if self._start(t)]
        if not started:
            return
        first = started[0]
        device = first.device
        attempts = [t.attempt for t in started]
        inputs = [t.inputs for t in started if t.inputs is not None]  # a started task has them
        call = first.call
        assert call is not None
        device.task_started()
        began = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                run_batch,
                device,
                first.op,
                call.params,
                inputs,
                call.outputs,
            )
        except Exception as exc:  # the executor itself failed (shut down)
            results = [exc] * len(started)
        finally:
            device.task_ended()
        seconds = time.perf_counter() - began
        self.batches_run += 1
        self.tasks_batched += len(started)
        for task, attempt, result in zip(started, attempts, results, strict=True):
            self._done(task, attempt, result, seconds)
