"""Shows workflow transitions once the store holds them, in the order they
happened, without making the work behind them wait.

A step's result is used by its dependants at once (they run while the store
commits it), but readers (GetWorkflow, WatchWorkflow, `wait`) see a transition
only once it is committed. So whatever a client saw finished stays finished
after a kill -9, and a chain of steps costs one commit per step in the
background instead of one commit wait per step on its path.

A dependant may run on a result the store does not hold yet; if the process
dies then, both run again after the restart (neither was shown finished). The
store commits in write order, so a dependant's end is never committed without
its producer's."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kernelmesh.core.store import Store, StoreUnavailable
from kernelmesh.core.store.base import Op

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    ops: tuple[Op, ...]
    show: Callable[[], None]
    committed: bool = False


class CommitOrder:
    """`after(ops, show)`: writes `ops` and calls `show()` once they are committed,
    after every `show` given before it. Without a durable store, at once."""

    def __init__(self, journal: Store | None) -> None:
        self.journal = journal
        self._pending: deque[_Pending] = deque()
        self.stopped = False

    def after(self, ops: tuple[Op, ...], show: Callable[[], None]) -> None:
        """No ops: shown once everything before it is."""
        if self.journal is None or (not ops and not self._pending):
            show()
            return
        entry = _Pending(ops, show, committed=not ops)
        self._pending.append(entry)
        if ops:
            self._write(entry)

    def _write(self, entry: _Pending) -> None:
        assert self.journal is not None
        try:
            future = self.journal.write(*entry.ops, wait=True)
        except StoreUnavailable as exc:  # closed while shutting down: recovery redoes it
            log.warning("workflow state not journaled: %s", exc)
            return
        assert future is not None
        future.add_done_callback(functools.partial(self._settled, entry))

    def _settled(self, entry: _Pending, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            # A waited-for write that fails is not kept by the store: written again
            # (the store pauses after a failed commit), shown only once committed.
            if not self.stopped:
                log.warning("workflow state not committed, written again: %s", future.exception())
                self._write(entry)
            return
        entry.committed = True
        self._drain()

    def _drain(self) -> None:
        while self._pending and self._pending[0].committed:
            try:
                self._pending.popleft().show()
            except Exception:  # a bug in one transition must not stop the others
                log.exception("showing a workflow transition")


__all__ = ["CommitOrder"]
