"""Bulk tensors: 256 MiB through kernelmesh's chunked UploadTensor / DownloadTensor
against one gRPC message carrying the same bytes, measured in the same run.

    python benchmarks/bench_bulk.py            # full run
    python benchmarks/bench_bulk.py --quick    # smoke run

Rows (GB/s = bytes / wall time, best and median of the rounds; the upload rounds
alternate with the baseline's, so a slow spell of a shared machine hits both):

  upload     `Client.upload` (UploadTensor, 4 MiB chunks, stored on the server) vs
             one unary call of a bare grpc.aio server (`bench_tasks.py --serve echo`)
             whose request is the same 256 MiB. Target: chunked >= 1.5x one message.
  download   `Client.download` of the stored tensor (DownloadTensor chunks, reassembled
             into one array) vs one unary reply of the bare server carrying the same
             number of bytes. Target: chunked >= 1.5x one message.

Both servers run in subprocesses (`bench_tasks.py --serve`); the client here.
"""

from __future__ import annotations

import argparse
import os
import platform

import bench_tasks
import grpc
import numpy as np
from bulk_setup import GB, bulk_client, say, servers, timed

TARGET = 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 5

    x = np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32)  # 256 MiB
    payload = x.tobytes()
    nbytes = x.nbytes
    host = platform.processor() or platform.machine()
    say(f"bulk tensors, {nbytes >> 20} MiB, on {host} ({os.cpu_count()} cpus); {rounds} rounds")

    with (
        servers("kernelmesh-bulk", "echo") as (km_server, echo),
        bulk_client(km_server.target, timeout=300.0) as km,
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

        # alternating, so a slow spell of a shared machine hits both paths alike
        one_times: list[float] = []
        chunked_times: list[float] = []
        for _ in range(rounds):
            one_times.append(timed(1, lambda: unary(payload, timeout=300.0))[0])
            chunked_times.append(timed(1, chunked_upload)[0])
        one_message = min(one_times), float(np.median(one_times))
        chunked = min(chunked_times), float(np.median(chunked_times))
        blob = channel.unary_unary(bench_tasks.ECHO_BLOB)
        size = str(nbytes).encode()
        blob(size, timeout=300.0)  # warm: the server builds the reply once
        ref = km.upload(x)
        one_down_times: list[float] = []
        down_times: list[float] = []
        for _ in range(rounds):
            one_down_times.append(timed(1, lambda: blob(size, timeout=300.0))[0])
            down_times.append(timed(1, lambda: km.download(ref))[0])
        km.delete(ref)
        one_down = min(one_down_times), float(np.median(one_down_times))
        download = min(down_times), float(np.median(down_times))

    say()
    say(f"  {'path':44} {'best GB/s':>10} {'median GB/s':>12}")
    for name, (best, median) in (
        ("one request, bare grpc.aio unary (baseline)", one_message),
        ("chunked UploadTensor (Client.upload)", chunked),
        ("one reply, bare grpc.aio unary (baseline)", one_down),
        ("chunked DownloadTensor (Client.download)", download),
    ):
        say(f"  {name:44} {nbytes / best / GB:10.2f} {nbytes / median / GB:12.2f}")
    for what, baseline, ours in (
        ("upload", one_message, chunked),
        ("download", one_down, download),
    ):
        ratio_best = baseline[0] / ours[0]
        ratio_median = baseline[1] / ours[1]
        verdict = "PASS" if min(ratio_best, ratio_median) >= TARGET else "MISS"
        say(
            f"  {what} chunked / one message: {ratio_best:.2f}x best,"
            f" {ratio_median:.2f}x median; target >= {TARGET}x {verdict}"
        )
    say(f"load average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
