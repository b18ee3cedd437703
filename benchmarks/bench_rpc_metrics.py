"""What the per-RPC metrics interceptor (services/rpc_metrics.py) costs a call.

    python benchmarks/bench_rpc_metrics.py            # about 30 s
    python benchmarks/bench_rpc_metrics.py --calls 500

Two servers, each in its own subprocess: the generated TaskService whose RunTask
returns a prebuilt reply (bench_tasks.py's "proto" baseline: gRPC and protobuf,
no kernelmesh work), one bare and one with RpcMetricsInterceptor. A grpc.aio
client here calls each in interleaved rounds; the figure is the p50 latency
with the interceptor against the bare server's, measured in the same run.
Target: the interceptor adds at most 5% (or 25 us) to the p50 of this, the
cheapest RPC there is; RunTask's real p50 is several times larger.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tasks

from kernelmesh.v1 import task_pb2, task_pb2_grpc

HOST = "127.0.0.1"


async def serve(with_metrics: bool) -> None:
    interceptors = []
    if with_metrics:
        from kernelmesh.services.rpc_metrics import RpcMetricsInterceptor

        interceptors = [RpcMetricsInterceptor()]
    server = grpc.aio.server(options=bench_tasks.GRPC_OPTIONS, interceptors=interceptors)
    task_pb2_grpc.add_TaskServiceServicer_to_server(bench_tasks.ProtoEcho(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"PORT {port}", flush=True)
    parent = os.getppid()
    for _ in range(1200):  # 10 minutes at most
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
        if done.is_set() or os.getppid() != parent:
            break
    await server.stop(1.0)


def start(with_metrics: bool) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, __file__, "--serve", "metrics" if with_metrics else "bare"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"server failed to start: {line!r}")
    return proc, f"{HOST}:{line.split()[1]}"


async def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    request = task_pb2.RunTaskRequest(task=bench_tasks.task_spec("relu", bench_tasks.relu_input()))
    servers = {"bare": start(False), "with grpc_server_* metrics": start(True)}
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        channels = {
            name: grpc.aio.insecure_channel(target, options=bench_tasks.GRPC_OPTIONS)
            for name, (_, target) in servers.items()
        }
        stubs = {name: task_pb2_grpc.TaskServiceStub(ch) for name, ch in channels.items()}
        for stub in stubs.values():  # warm-up: connections, handler caches
            for _ in range(200):
                await stub.RunTask(request)
        for _ in range(rounds):
            for name, stub in stubs.items():
                samples[name] += await bench_tasks.timed_calls(
                    lambda stub=stub: stub.RunTask(request), calls
                )
        for ch in channels.values():
            await ch.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(15)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per round and server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", choices=("bare", "metrics"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve == "metrics"))
        return 0
    began = time.perf_counter()
    samples = asyncio.run(measure(args.calls, args.rounds))
    print(f"unary RunTask (prebuilt reply), {args.rounds} x {args.calls} calls per server")
    print(f"  {'server':<30} {'p50 us':>9} {'p99 us':>9}")
    figures = {}
    for name, values in samples.items():
        p50, p99 = np.percentile(values, [50, 99])
        figures[name] = p50
        print(f"  {name:<30} {p50:>9.1f} {p99:>9.1f}")
    bare, ours = figures["bare"], figures["with grpc_server_* metrics"]
    ratio, added = ours / bare, ours - bare
    verdict = "PASS" if ratio <= 1.05 or added <= 25 else "MISS"
    print(
        f"ratio (with metrics / bare, p50): {ratio:.3f}x, {added:+.1f} us per call; "
        f"target <= 1.05x or <= 25 us: {verdict}"
    )
    print(f"total {time.perf_counter() - began:.1f}s; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
