"""Tasks as every orchestrator sharing one store sees them: GetTask, ListTasks,
WatchTask and CancelTask of a task another orchestrator holds (or held before
it died) answer from the store, not only from this process's memory.

The holder stays the only writer of a task's state: a cancel asked here is
recorded in the store (`cancel_requested`) and the holder acts on it at its
next lease renewal; a watch here follows the task's row, woken by the store's
change notifications where it has them, and polls otherwise."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from kernelmesh.core import listing
from kernelmesh.core.errors import InvalidArgument, NotFound, Violation
from kernelmesh.core.store.base import Store, UpdateTask

if TYPE_CHECKING:
    from kernelmesh.core.tasks import Task, TaskEvent, TaskManager, TaskState

PREFIX = "tasks/"
# A watch of a task held elsewhere reads its row at least this often.
WATCH_POLL_S = 0.5
_TOKEN_KIND = "at"


class SharedTasks:
    def __init__(self, tasks: TaskManager, store: Store, *, poll_s: float = WATCH_POLL_S) -> None:
        self.tasks = tasks
        self.store = store
        self.poll_s = poll_s
        # Task ids whose rows changed, set by the store's notifications (if any).
        self._changed: dict[str, set[asyncio.Event]] = {}

    # -- notifications --------------------------------------------------------

    def changed(self, ids: list[str]) -> None:
        """The rows of `ids` changed (a notification from another orchestrator)."""
        for task_id in ids:
            for event in self._changed.get(task_id, ()):
                event.set()

    # -- reads ------------------------------------------------------------------

    async def get(self, name: str, *, tenant: str, outputs: bool = True) -> Task:
        task_id = name.removeprefix(PREFIX)
        snap = await self.store.read_tasks([task_id], outputs=outputs)
        if not snap.tasks or snap.tasks[0].tenant != tenant or not name.startswith(PREFIX):
            raise NotFound(f"task {name!r} not found (it may have aged out of retention)")
        return self.tasks.view(snap.tasks[0], snap)

    async def list(
        self,
        *,
        tenant: str,
        state: TaskState | None,
        page_size: int,
        page_token: str,
        outputs: bool,
    ) -> tuple[list[Task], str]:
        """Newest first by creation time, across every orchestrator; a task this one
        holds is shown as it is in memory (its latest update may not be committed)."""
        size = listing.DEFAULT_PAGE if page_size <= 0 else min(page_size, listing.MAX_PAGE)
        below = _decode(page_token) if page_token else None
        snap = await self.store.list_task_records(
            tenant,
            state=int(state) if state is not None else None,
            limit=size + 1,
            below=below,
            outputs=outputs,
        )
        page: list[Task] = []
        for record in snap.tasks[:size]:
            held = self.tasks.held(record.id)
            page.append(held if held is not None else self.tasks.view(record, snap))
        token = ""
        if len(snap.tasks) > size:
            last = snap.tasks[size - 1]
            token = _encode(last.create_time, last.id)
        return page, token

    async def watch(self, name: str, *, tenant: str) -> AsyncGenerator[TaskEvent, None]:
        """The current state, then each change seen in the store until the task ends."""
        from kernelmesh.core.tasks import TaskEvent

        task = await self.get(name, tenant=tenant, outputs=False)
        wake = asyncio.Event()
        self._changed.setdefault(task.id, set()).add(wake)
        try:
            seen = (task.state, task.attempt)
            yield TaskEvent(task.name, task.state, time.time(), "current state", task)
            while not task.state.terminal:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.poll_s)
                task = await self.get(name, tenant=tenant, outputs=False)
                if task.state.terminal:
                    task = await self.get(name, tenant=tenant)  # with its outputs
                if (task.state, task.attempt) != seen:
                    seen = (task.state, task.attempt)
                    yield TaskEvent(task.name, task.state, time.time(), _message(task), task)
        finally:
            waiters = self._changed.get(task.id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._changed[task.id]

    async def follow_into(self, view: Task) -> None:
        """Watches the task of `view` (a read-only copy) until it ends, then makes
        `view` its final state and wakes whoever waits on it."""
        events = self.watch(view.name, tenant=view.tenant)
        async with contextlib.aclosing(events):
            async for event in events:
                if not event.state.terminal:
                    continue
                done = event.task
                for name in (
                    "state",
                    "error",
                    "outputs",
                    "output_refs",
                    "attempt",
                    "attempts",
                    "start_time",
                    "end_time",
                    "run_seconds",
                    "device_name",
                ):
                    setattr(view, name, getattr(done, name))
                view._follow = None
                view._done.set()
                return

    async def cancel(self, name: str, *, tenant: str) -> Task:
        """Records the request in the store; the holder cancels the task at its next
        lease renewal (or, if the holder is gone, whoever claims it next)."""
        task = await self.get(name, tenant=tenant, outputs=False)
        if not task.state.terminal:
            future = self.store.write(
                UpdateTask(task.id, {"cancel_requested": time.time()}), wait=True
            )
            if future is not None:
                await future
        return task


def _message(task: Task) -> str:
    if task.error is not None:
        return task.error.message
    if task.state.terminal:
        return "succeeded"
    return f"{task.state.name.lower()} (held by another orchestrator)"


def _encode(create_time: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_KIND}:{create_time!r}:{task_id}".encode()).decode()


def _decode(token: str) -> tuple[float, str]:
    try:
        kind, when, task_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
        if kind != _TOKEN_KIND:
            raise ValueError(kind)
        return float(when), task_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            [Violation("page_token", "not a page token returned by this server")]
        ) from None


__all__ = ["SharedTasks"]
