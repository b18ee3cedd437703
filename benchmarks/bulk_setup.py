"""What bench_bulk.py and bench_shm.py share: a kernelmesh server and a client whose
message caps fit 256 MiB in one message, and the best-and-median timer."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402  (the server subprocesses)

GB = 1e9
BULK_MESSAGE_BYTES = 1 << 30  # the cap on both sides: 256 MiB fits in one message


def say(text: str = "") -> None:
    print(text, flush=True)


def timed(rounds: int, run: Callable[[], object]) -> tuple[float, float]:
    """(best, median) seconds over `rounds` calls."""
    seconds = []
    for _ in range(rounds):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return min(seconds), statistics.median(seconds)


def bulk_client(target: str, timeout: float):
    """A `kernelmesh.clients.Client` whose message cap fits a 256 MiB request."""
    from kernelmesh.clients import Client

    class BulkClient(Client):
        def _connect(self, target, options, credentials) -> None:
            bigger = dataclasses.replace(options, max_message_bytes=BULK_MESSAGE_BYTES)
            super()._connect(target, bigger, credentials)

    return BulkClient(target, timeout=timeout)


@contextlib.contextmanager
def servers(*kinds: str) -> Iterator[list[bench_tasks.ServerProcess]]:
    """`bench_tasks.py --serve` subprocesses of these kinds ("kernelmesh-bulk": message
    cap raised to 1 GiB), stopped on the way out."""
    running = bench_tasks.Servers()
    try:
        yield list(running.get(*kinds))
    finally:
        running.stop()
