"""The mesh's costs, each against a baseline measured in the same run:

1. Latency: a tiny RunTask through `kernelmesh orchestrator` + one `kernelmesh
   node` (two hops, real processes) against a bare grpc.aio unary echo of the
   same bytes in this process. p50 ratio, target <= 2.5x.
2. Throughput of tiny tasks through the orchestrator with 1 node and with 2
   nodes (each its own process), and through `kernelmesh serve` all-in-one.
3. Failover: time from a node's kill -9 to its tasks running elsewhere, in
   lease intervals (target <= 2).

    python benchmarks/bench_mesh.py [--seconds 3] [--lease 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, task_pb2, task_pb2_grpc

_PORT = re.compile(r"serving gRPC on [\d.]+:(\d+)")
TMP = Path(tempfile.mkdtemp(prefix="bench-mesh-"))


def start(name: str, *args: str) -> tuple[subprocess.Popen, str]:
    log = TMP / f"{name}.log"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kernelmesh.clients", *args),
            *("--host", "127.0.0.1", "--port", "0", "--no-http", "--no-warmup"),
            *("--log-level", "WARNING"),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "XDG_STATE_HOME": str(TMP / "state")},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = _PORT.search(log.read_text())
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    raise TimeoutError(log.read_text())


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_nodes(target: str, count: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = stub.ListNodes(orchestrator_pb2.ListNodesRequest()).nodes
            if sum(n.state == orchestrator_pb2.NODE_STATE_READY for n in nodes) == count:
                return
            time.sleep(0.05)
    raise TimeoutError(f"{count} nodes did not join {target}")


def tiny_request(device: str = "") -> task_pb2.RunTaskRequest:
    x = np.ones(16, np.float32)
    spec = task_pb2.TaskSpec(op="add")
    for _ in range(2):
        t = spec.inputs.add().tensor
        t.dtype = 1  # DTYPE_FLOAT32
        t.shape.append(16)
        t.data = x.tobytes()
    spec.device.name = device
    return task_pb2.RunTaskRequest(task=spec)


async def p50_run_task(target: str, n: int) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        request = tiny_request()
        for _ in range(50):
            await stub.RunTask(request)
        samples = []
        for _ in range(n):
            began = time.perf_counter()
            await stub.RunTask(request)
            samples.append(time.perf_counter() - began)
    return statistics.median(samples)


async def p50_echo(n: int) -> float:
    """A bare grpc.aio unary echo of the same request bytes, server and client here."""
    payload = tiny_request().SerializeToString()

    async def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            for _ in range(50):
                await call(payload)
            samples = []
            for _ in range(n):
                began = time.perf_counter()
                await call(payload)
                samples.append(time.perf_counter() - began)
    finally:
        await server.stop(None)
    return statistics.median(samples)


async def throughput(target: str, seconds: float, concurrency: int = 64) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        request = tiny_request()
        for _ in range(20):
            await stub.RunTask(request)
        done = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.RunTask(request)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - began)


def failover(lease: float, sig: signal.Signals = signal.SIGKILL) -> float:
    """Seconds from node-a's kill -9 (or SIGSTOP: a partition, no heartbeats and no
    answers) to its tasks all running (or done) on node-b."""
    orch, target = start("failover-orch", "orchestrator", "--lease-seconds", str(lease))
    a, _ = start("failover-a", "node", "--name", "node-a", "--join", target)
    b, _ = start("failover-b", "node", "--name", "node-b", "--join", target)
    try:
        wait_nodes(target, 2)
        big = np.ones((1000, 1000), np.float32)
        spec = task_pb2.TaskSpec(op="matmul")
        for _ in range(2):
            t = spec.inputs.add().tensor
            t.dtype = 1
            t.shape.extend(big.shape)
            t.data = big.tobytes()
        with grpc.insecure_channel(target) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            # Enough work that both nodes are busy when node-a dies.
            request = task_pb2.SubmitTaskRequest(task=spec)
            with ThreadPoolExecutor(8) as pool:
                names = list(pool.map(lambda _: stub.SubmitTask(request).task.name, range(32)))

            def tasks():
                return [
                    stub.GetTask(
                        task_pb2.GetTaskRequest(name=n, view=task_pb2.TASK_VIEW_BASIC)
                    ).task
                    for n in names
                ]

            deadline = time.monotonic() + 60
            while True:
                held = [
                    t.name
                    for t in tasks()
                    if t.device.startswith("node-a") and t.state == task_pb2.TASK_STATE_RUNNING
                ]
                if held:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no task seen running on node-a: {len(names)} tasks")
                time.sleep(0.01)
            a.send_signal(sig)
            killed = time.perf_counter()
            while True:
                now = {t.name: t for t in tasks()}
                moved = [
                    n
                    for n in held
                    if (
                        now[n].device.startswith("node-b")
                        and now[n].state >= task_pb2.TASK_STATE_RUNNING
                    )
                    or now[n].state == task_pb2.TASK_STATE_FAILED
                ]
                if len(moved) == len(held):
                    return time.perf_counter() - killed
                if time.perf_counter() - killed > 60:
                    raise TimeoutError("node-a's tasks did not move")
                time.sleep(0.005)
    finally:
        a.send_signal(signal.SIGCONT)
        stop(orch, a, b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--only-failover", action="store_true")
    parser.add_argument("--only-latency", action="store_true")
    args = parser.parse_args()
    if args.only_failover:
        report_failover(args.lease)
        return
    if args.only_latency:
        report_latency(args.samples)
        return

    orch, target = start("orch", "orchestrator")
    a, _ = start("node-a", "node", "--name", "node-a", "--join", target, "--backends", "cpu")
    try:
        wait_nodes(target, 1)
        echo = asyncio.run(p50_echo(args.samples))
        mesh = asyncio.run(p50_run_task(target, args.samples))
        print(
            f"latency p50: bare grpc.aio echo {echo * 1e6:.0f} us; RunTask via orchestrator+node "
            f"{mesh * 1e6:.0f} us; ratio {mesh / echo:.2f}x (target <= 2.5x)"
        )
        one = asyncio.run(throughput(target, args.seconds))
        b, _ = start("node-b", "node", "--name", "node-b", "--join", target, "--backends", "cpu")
        try:
            wait_nodes(target, 2)
            two = asyncio.run(throughput(target, args.seconds))
        finally:
            stop(b)
    finally:
        stop(orch, a)
    serve, serve_target = start("serve", "serve", "--store", "memory")
    try:
        alone = asyncio.run(throughput(serve_target, args.seconds))
    finally:
        stop(serve)
    print(
        f"tiny-task throughput: 1 node {one:.0f}/s, 2 nodes {two:.0f}/s "
        f"(scaling {two / one:.2f}x); serve all-in-one {alone:.0f}/s "
        f"(mesh with 1 node = {one / alone:.2f}x of serve)"
    )
    report_failover(args.lease)


def report_latency(samples: int) -> None:
    orch, target = start("orch", "orchestrator")
    a, _ = start("node-a", "node", "--name", "node-a", "--join", target, "--backends", "cpu")
    try:
        wait_nodes(target, 1)
        echo = asyncio.run(p50_echo(samples))
        mesh = asyncio.run(p50_run_task(target, samples))
        echo = min(echo, asyncio.run(p50_echo(samples)))  # the echo again, after
    finally:
        stop(orch, a)
    print(
        f"latency p50: bare grpc.aio echo {echo * 1e6:.0f} us; RunTask via orchestrator+node "
        f"{mesh * 1e6:.0f} us; ratio {mesh / echo:.2f}x (target <= 2.5x)"
    )


def report_failover(lease: float) -> None:
    for sig, what in ((signal.SIGKILL, "kill -9"), (signal.SIGSTOP, "SIGSTOP (partition)")):
        for attempt in range(3):  # tasks may all finish before one is seen on node-a
            try:
                seconds = failover(lease, sig)
                break
            except TimeoutError:
                if attempt == 2:
                    raise
        print(
            f"failover after {what}: its tasks running elsewhere in {seconds:.2f}s "
            f"= {seconds / lease:.2f} lease intervals (lease {lease:g}s; target <= 2)"
        )
    print(f"machine: {os.cpu_count()} CPUs, shared; logs in {TMP}")


if __name__ == "__main__":
    main()
