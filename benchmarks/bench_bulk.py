"""Bulk tensors: 256 MiB through kernelmesh's chunked UploadTensor / DownloadTensor
against one gRPC message carrying the same bytes, measured in the same run.

    python benchmarks/bench_bulk.py            # full run
    python benchmarks/bench_bulk.py --quick    # smoke run

Rows (GB/s = bytes / wall time, best and median of the rounds):

  upload     `Client.upload` (UploadTensor, 1 MiB chunks, stored on the server) vs
             one unary call of a bare grpc.aio server (`bench_tasks.py --serve echo`)
             whose request is the same 256 MiB. Target: chunked >= 1.5x one message.
  download   `Client.download` of the stored tensor (DownloadTensor chunks, reassembled
             into one array). No baseline (for information).

Both servers run in subprocesses (`bench_tasks.py --serve`); the client here.
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

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tasks  # noqa: E402  (the server subprocesses)

GB = 1e9
TARGET = 1.5


def say(text: str = "") -> None:
    print(text, flush=True)


def timed(rounds: int, run: Callable[[], object]) -> tuple[float, float]:
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
    rounds = 3 if args.quick else 5

    from kernelmesh.clients import Client

    class BulkClient(Client):
        def _connect(self, target, options, credentials) -> None:
            bigger = dataclasses.replace(options, max_message_bytes=1 << 30)
            super()._connect(target, bigger, credentials)

    x = np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32)  # 256 MiB
    payload = x.tobytes()
    nbytes = x.nbytes
    host = platform.processor() or platform.machine()
    say(f"bulk tensors, {nbytes >> 20} MiB, on {host} ({os.cpu_count()} cpus); {rounds} rounds")

    servers = bench_tasks.Servers()
    try:
        km_server, echo = servers.get("kernelmesh-bulk", "echo")
        with (
            BulkClient(km_server.target, timeout=300.0) as km,
            grpc.insecure_channel(echo.target, options=bench_tasks.GRPC_OPTIONS) as channel,
        ):
            unary = channel.unary_unary(bench_tasks.ECHO_UNARY)
            ref = km.upload(x)
            if not np.array_equal(km.download(ref), x):
                raise RuntimeError("the download differs from the upload")
            km.delete(ref)
            unary(payload, timeout=300.0)  # warm

            def chunked_upload() -> None:
                km.delete(km.upload(x))

            one_message = timed(rounds, lambda: unary(payload, timeout=300.0))
            chunked = timed(rounds, chunked_upload)
            ref = km.upload(x)
            download = timed(rounds, lambda: km.download(ref))
            km.delete(ref)
    finally:
        servers.stop()

    say()
    say(f"  {'path':44} {'best GB/s':>10} {'median GB/s':>12}")
    for name, (best, median) in (
        ("one message, bare grpc.aio unary (baseline)", one_message),
        ("chunked UploadTensor (Client.upload)", chunked),
        ("chunked DownloadTensor (Client.download)", download),
    ):
        say(f"  {name:44} {nbytes / best / GB:10.2f} {nbytes / median / GB:12.2f}")
    ratio_best = one_message[0] / chunked[0]
    ratio_median = one_message[1] / chunked[1]
    verdict = "PASS" if min(ratio_best, ratio_median) >= TARGET else "MISS"
    say(
        f"  upload chunked / one message: {ratio_best:.2f}x best, {ratio_median:.2f}x median;"
        f" target >= {TARGET}x {verdict}"
    )
    say(f"load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
