"""Shared memory for co-located clients: a 256 MiB input through a registered
region vs the same bytes in one gRPC message, measured in the same run.

    python benchmarks/bench_shm.py            # full run
    python benchmarks/bench_shm.py --quick    # smoke run

Rows (effective GB/s = input bytes / RunTask wall time, best and median of rounds):

  shm      RunTask("sum") of 64 Mi float32 (256 MiB) named by region, offset and size;
           the server reads it in place. Target >= 10 GB/s.
  wire     the same RunTask with the bytes in the request (one message). No target.
  kernel   np.sum of the same array in this process: what the op alone costs, the
           ceiling for the shm row. No target.

kernelmesh runs in a subprocess (`bench_tasks.py --serve kernelmesh-bulk`, its message
cap raised to 1 GiB so the wire row fits); the client here, on the same host.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402  (the kernelmesh server subprocess)

GB = 1e9
TARGET_GBPS = 10.0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7

    from kernelmesh.clients import Client

    class BulkClient(Client):
        """A client whose message cap fits the wire row's 256 MiB request."""

        def _connect(self, target, options, credentials) -> None:
            bigger = dataclasses.replace(options, max_message_bytes=1 << 30)
            super()._connect(target, bigger, credentials)

    x = np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32)  # 256 MiB
    nbytes = x.nbytes
    want = float(np.sum(x, dtype=np.float64))
    host = platform.processor() or platform.machine()
    say(f"shared memory, {nbytes >> 20} MiB float32 input, on {host} ({os.cpu_count()} cpus)")
    say(f"{rounds} rounds; effective GB/s = input bytes / RunTask wall time")

    servers = bench_tasks.Servers()
    try:
        (server,) = servers.get("kernelmesh-bulk")
        with BulkClient(server.target, timeout=120.0) as km:
            region = km.shared_memory(nbytes)
            arg = region.put(x)
            for got in (km.run("sum", arg), km.run("sum", x)):  # warm, and check
                if not np.isclose(float(got), want, rtol=1e-3):
                    raise RuntimeError(f"sum differs from NumPy's: {got} vs {want}")
            rows = [
                ("shm (RunTask, region)", timed(rounds, lambda: km.run("sum", arg)), TARGET_GBPS),
                ("wire (RunTask, one message)", timed(rounds, lambda: km.run("sum", x)), None),
                ("kernel (np.sum, in process)", timed(rounds, lambda: np.sum(x)), None),
            ]
    finally:
        servers.stop()

    say()
    say(f"  {'path':30} {'best GB/s':>10} {'median GB/s':>12} {'target':>8} verdict")
    for name, (best, median), target in rows:
        best_rate, median_rate = nbytes / best / GB, nbytes / median / GB
        verdict = "-" if target is None else ("PASS" if median_rate >= target else "MISS")
        mark = "-" if target is None else f">= {target:.0f}"
        say(f"  {name:30} {best_rate:10.2f} {median_rate:12.2f} {mark:>8} {verdict}")
    shm_median, wire_median = rows[0][1][1], rows[1][1][1]
    say(f"  shm / wire (median): {wire_median / shm_median:.1f}x faster")
    say(f"load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
