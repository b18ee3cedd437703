"""Pipelined task streams (StreamTasks): items are read while their tasks run, at
most `window` tasks are in flight (the reader waits beyond that, which pushes back
on the sender through the transport's flow control), and answers come out as the
tasks end. The caller supplies how an item begins and how an ended task is
answered; nothing here knows the wire format.

Tiny tasks run inline: their answers are ready when `start` returns and go out
without a callback. The reader and the consumer hand answers over in a deque; a
future exists only while one side waits for the other."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TypeVar

from kernelmesh.core.tasks import Task

Item = TypeVar("Item")
Answer = TypeVar("Answer")


async def pipelined(
    items: AsyncIterable[Item],
    start: Callable[[Item], Task | Answer],
    answer: Callable[[Item, Task], Answer],
    cancel: Callable[[Task], None],
    window: int,
) -> AsyncIterator[Answer]:
    """Answers for `items` in the order their tasks end. `start` begins an item's
    task, or returns its answer at once (an item refused on its own). An error of
    the item stream itself is raised after the tasks in flight have been answered.
    However the stream ends (the consumer closes it, or is cancelled), tasks still
    in flight are cancelled with `cancel`."""
    if window < 1:
        raise ValueError("window must be >= 1")
    loop = asyncio.get_running_loop()
    ready: deque[Answer] = deque()
    in_flight: set[Task] = set()
    # Futures that exist only while their side waits: the consumer for answers,
    # the reader for room in the window.
    wake: list[asyncio.Future[None] | None] = [None]
    room: list[asyncio.Future[None] | None] = [None]
    failure: list[BaseException] = []

    def nudge(waiter: list[asyncio.Future[None] | None]) -> None:
        future = waiter[0]
        if future is not None and not future.done():
            future.set_result(None)

    def ended(item: Item, task: Task) -> None:
        if task not in in_flight:
            return  # cancelled as the stream closed: nobody reads its answer
        in_flight.discard(task)
        ready.append(answer(item, task))
        nudge(wake)
        nudge(room)

    async def read() -> None:
        try:
            async for item in items:
                while len(in_flight) >= window:
                    room[0] = waiting = loop.create_future()
                    await waiting
                    room[0] = None
                begun = start(item)
                if not isinstance(begun, Task):
                    ready.append(begun)
                elif begun.state.terminal:  # ran inline
                    ready.append(answer(item, begun))
                else:
                    in_flight.add(begun)
                    begun.add_done_callback(functools.partial(ended, item))
                    continue
                nudge(wake)
        except Exception as exc:  # the item stream itself is broken
            failure.append(exc)
        finally:
            nudge(wake)

    # Reading runs beside answering, so the next items are read and begun while
    # an answer waits for the transport.
    reader = asyncio.ensure_future(read())
    try:
        while True:
            while ready:
                yield ready.popleft()
            if reader.done() and not in_flight and not ready:
                break
            wake[0] = waiting = loop.create_future()
            await waiting
            wake[0] = None
        await reader
        if failure:
            raise failure[0]
    finally:
        reader.cancel()
        unfinished = list(in_flight)
        in_flight.clear()
        for task in unfinished:
            cancel(task)


__all__ = ["pipelined"]
