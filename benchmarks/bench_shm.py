"""Shared memory for co-located clients: a 256 MiB input through a registered
region vs the same bytes in one gRPC message, measured in the same run.

    python benchmarks/bench_shm.py            # full run
    python benchmarks/bench_shm.py --quick    # smoke run

Rows (effective GB/s = input bytes / RunTask wall time, best and median of rounds):

  shm      RunTask("sum") of 64 Mi float32 (256 MiB) named by region, offset and size;
           the server reads it in place. Target >= 10 GB/s.
  wire     the same RunTask with the bytes in the request (one message). No target.
  ceiling  np.sum over the region's own mapping, in this process: what reading the
           same shared-memory pages costs with no RPC at all (on a host that serves
           /dev/shm with 4 KiB pages this is well below ordinary memory). No target.
  kernel   np.sum of the same array in ordinary memory, in this process. No target.

kernelmesh runs in a subprocess (`bench_tasks.py --serve kernelmesh-bulk`, its message
cap raised to 1 GiB so the wire row fits); the client here, on the same host.
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
from bulk_setup import GB, bulk_client, say, servers, timed

TARGET_GBPS = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7

    x = np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32)  # 256 MiB
    nbytes = x.nbytes
    want = float(np.sum(x, dtype=np.float64))
    host = platform.processor() or platform.machine()
    say(f"shared memory, {nbytes >> 20} MiB float32 input, on {host} ({os.cpu_count()} cpus)")
    say(f"{rounds} rounds; effective GB/s = input bytes / RunTask wall time")

    with servers("kernelmesh-bulk") as (server,), bulk_client(server.target, 120.0) as km:
        region = km.shared_memory(nbytes)
        arg = region.put(x)

        def ceiling() -> object:
            return np.sum(region.array(0, x.dtype, x.shape))  # the pages the server reads

        for got in (km.run("sum", arg), km.run("sum", x)):  # warm, and check
            if not np.isclose(float(got), want, rtol=1e-3):
                raise RuntimeError(f"sum differs from NumPy's: {got} vs {want}")
        rows = [
            ("shm (RunTask, region)", timed(rounds, lambda: km.run("sum", arg)), TARGET_GBPS),
            ("wire (RunTask, one message)", timed(rounds, lambda: km.run("sum", x)), None),
            ("ceiling (np.sum, shm mapping)", timed(rounds, ceiling), None),
            ("kernel (np.sum, in process)", timed(rounds, lambda: np.sum(x)), None),
        ]

    say()
    say(f"  {'path':30} {'best GB/s':>10} {'median GB/s':>12} {'target':>8} verdict")
    for name, (best, median), target in rows:
        best_rate, median_rate = nbytes / best / GB, nbytes / median / GB
        verdict = "-" if target is None else ("PASS" if median_rate >= target else "MISS")
        mark = "-" if target is None else f">= {target:.0f}"
        say(f"  {name:30} {best_rate:10.2f} {median_rate:12.2f} {mark:>8} {verdict}")
    shm_median, wire_median, ceiling_median = rows[0][1][1], rows[1][1][1], rows[2][1][1]
    say(f"  shm / wire (median): {wire_median / shm_median:.1f}x faster")
    say(f"  shm / ceiling (median): {ceiling_median / shm_median:.2f}x of the mapping's np.sum")
    say(f"load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
