"""kernelmesh benchmarks: every figure next to a named baseline measured in the
same run on the same machine, as a ratio against a target.

    python benchmarks/bench_tasks.py             # full run (about 1-3 minutes)
    python benchmarks/bench_tasks.py --quick     # smoke run (well under a minute)
    python benchmarks/bench_tasks.py --only latency,stream

Sections (names for --only):

  latency  RunTask of relu on 16 float32, one caller, sequential: p50/p99 through a
           raw grpc.aio TaskServiceStub (prebuilt request) and through Client.run,
           vs a bare grpc.aio unary server (bytes in, bytes out) answering with a
           prebuilt reply of the same size as kernelmesh's.
  stream   StreamTasks throughput (relu tasks over one bidirectional stream) vs a
           bare grpc.aio bidirectional echo stream of the same message count and size.
  matmul   1024x1024 float32 matmul GFLOP/s: kernelmesh.native.cpu.run vs np.matmul;
           end to end through RunTask vs np.matmul + a bare echo of the same bytes.
  add      elementwise add GB/s on 64 Mi float32 (3 x 4 bytes per element) vs np.add.
  queue    the Cython ReadyQueue vs a heapq queue (benchmarks/bench_queue.py's run()).
  auth     RunTask p50 (as in latency) with auth on (an API key on every call) vs the
           same server with auth off, interleaved in the same run.

Process model: kernelmesh and the echo baseline each run in their own
subprocess (this script with --serve), both with asyncio's default loop on
127.0.0.1; the client runs in this process, so client and server never share
a GIL or an event loop. Nothing listens on any address but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import inspect
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
ECHO_SERVICE = "kernelmesh.bench.Echo"
ECHO_UNARY = f"/{ECHO_SERVICE}/Unary"
ECHO_STREAM = f"/{ECHO_SERVICE}/Stream"
ECHO_BIG = f"/{ECHO_SERVICE}/Big"
ECHO_BLOB = f"/{ECHO_SERVICE}/Blob"  # request: a byte count in ASCII; reply: that many bytes
MATMUL_N = 1024
MAX_MESSAGE = 256 << 20
# The same message caps on every channel and server of this script.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
SERVER_START_TIMEOUT_S = 180.0  # imports + kernel warm-up of a cold server
SERVER_MAX_LIFETIME_S = 1800.0  # a --serve child never outlives this
RPC_TIMEOUT_S = 120.0  # deadline of every benchmark call
SECTIONS = ("latency", "stream", "matmul", "add", "queue", "auth")


@dataclass(frozen=True)
class Settings:
    """Iteration counts; `--quick` shrinks them for a smoke run."""

    latency_warmup: int
    latency_rounds: int
    latency_per_round: int
    stream_tasks: int
    stream_repeats: int
    matmul_repeats: int
    matmul_e2e_repeats: int
    add_elements: int
    add_repeats: int
    auth_rounds: int = 20
    auth_per_round: int = 250


FULL = Settings(
    latency_warmup=500,
    latency_rounds=5,
    latency_per_round=1000,
    stream_tasks=20_000,
    stream_repeats=3,
    matmul_repeats=20,
    matmul_e2e_repeats=10,
    add_elements=64 << 20,
    add_repeats=10,
)
QUICK = Settings(
    latency_warmup=100,
    latency_rounds=2,
    latency_per_round=250,
    stream_tasks=2_000,
    stream_repeats=2,
    matmul_repeats=5,
    matmul_e2e_repeats=3,
    add_elements=64 << 20,
    add_repeats=3,
    auth_rounds=4,
    auth_per_round=100,
)


# -- results ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    metric: str
    ours: str
    baseline: str  # value and name of the baseline
    ratio: float | None  # kernelmesh / baseline
    target: str  # "<= 1.3x", ">= 0.60x" or "-"
    ok: bool | None  # None: reported, no target


def judged(ratio: float | None, target: str) -> bool | None:
    if ratio is None or target == "-":
        return None
    op, value = target.split()
    bound = float(value.rstrip("x"))
    return ratio <= bound if op == "<=" else ratio >= bound


def row(metric: str, ours: str, baseline: str, ratio: float | None, target: str = "-") -> Row:
    return Row(metric, ours, baseline, ratio, target, judged(ratio, target))


def say(text: str = "") -> None:
    print(text, flush=True)


def figure(label: str, *cells: str) -> None:
    """One line of a section's table: a label, then right-aligned cells."""
    say(f"  {label:44}" + "".join(f" {cell:>13}" for cell in cells))


def best_and_median(work: float, seconds: list[float]) -> tuple[float, float]:
    """Rates (work per second) of the fastest and the median run."""
    return work / min(seconds), work / float(np.median(seconds))


# -- messages -------------------------------------------------------------------


def relu_input() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(16).astype(np.float32)


def tensor_msg(array: np.ndarray) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=array.shape, data=array.astype("<f4").tobytes()
    )


def task_spec(op: str, *arrays: np.ndarray) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(op=op)
    for array in arrays:
        spec.inputs.add(tensor=tensor_msg(array))
    return spec


def representative_task(output: np.ndarray, op: str = "relu") -> task_pb2.Task:
    """A finished task shaped like kernelmesh's answer (name, timestamps, one
    inline output), so the echo baseline carries the same bytes."""
    task = task_pb2.Task(
        name="tasks/" + "0123456789abcdef" * 2,
        op=op,
        state=task_pb2.TASK_STATE_SUCCEEDED,
        tenant="default",
        device="cpu:0",
    )
    task.outputs.append(tensor_msg(output))
    now = time.time_ns()
    task.create_time.FromNanoseconds(now)
    task.start_time.FromNanoseconds(now + 10_000)
    task.end_time.FromNanoseconds(now + 20_000)
    task.run_duration.FromNanoseconds(9_876)
    return task


def echo_replies() -> tuple[bytes, bytes, bytes]:
    """The echo server's prebuilt replies: unary and stream (a relu on 16
    float32), and big (a 1024x1024 float32 matmul)."""
    task = representative_task(np.maximum(relu_input(), 0))
    unary = task_pb2.RunTaskResponse(task=task).SerializeToString()
    stream = task_pb2.StreamTasksResponse(correlation_id="19999", task=task).SerializeToString()
    product = np.zeros((MATMUL_N, MATMUL_N), np.float32)
    big = task_pb2.RunTaskResponse(task=representative_task(product, "matmul"))
    return unary, stream, big.SerializeToString()


# -- the servers (subprocesses: this script with --serve KIND) ------------------


def echo_handler() -> grpc.GenericRpcHandler:
    """A bare grpc.aio servicer, bytes in and bytes out: no protobuf, no work."""
    unary_reply, stream_reply, big_reply = echo_replies()

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return unary_reply

    async def big(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return big_reply

    blobs: dict[int, bytes] = {}  # built on first ask: only bench_bulk asks

    async def blob(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        size = int(request)
        if size not in blobs:
            blobs.clear()
            blobs[size] = np.random.default_rng(0).bytes(size)
        return blobs[size]

    async def stream(request_iterator, context: grpc.aio.ServicerContext):
        async for _ in request_iterator:
            yield stream_reply

    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Big": grpc.unary_unary_rpc_method_handler(big),
            "Blob": grpc.unary_unary_rpc_method_handler(blob),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


class ProtoEcho(task_pb2_grpc.TaskServiceServicer):
    """A generated-stub TaskService whose RunTask parses the request and returns a
    prebuilt reply: what gRPC and protobuf cost in Python, before any kernelmesh work."""

    def __init__(self) -> None:
        self.reply = task_pb2.RunTaskResponse.FromString(echo_replies()[0])

    async def RunTask(self, request, context):
        return self.reply


async def serve(kind: str) -> None:
    """Serves until SIGTERM, the parent's exit or SERVER_MAX_LIFETIME_S."""
    parent = os.getppid()
    extra = ""
    state = None
    if kind.startswith("kernelmesh"):
        import tempfile

        from kernelmesh.core.batching import BatchingOptions
        from kernelmesh.core.config import ServerConfig
        from kernelmesh.services.server import Server

        # kernelmesh-batched: dynamic batching on for matmul (bench_peers.py)
        batching = BatchingOptions(enabled=kind.endswith("-batched"), ops=("matmul",))
        # kernelmesh-bulk: room for a 256 MiB tensor in one message (bench_shm.py)
        message = (1 << 30) if kind.endswith("-bulk") else ServerConfig.max_message_bytes
        config = ServerConfig(
            host=HOST, port=0, http_port=None, batching=batching, max_message_bytes=message
        )
        if kind == "kernelmesh-auth":
            # Auth needs a state dir for the bootstrap key's file, but the store stays
            # in memory as in the auth-off server: the row measures the key check, not
            # SQLite.
            state = tempfile.mkdtemp(prefix="kernelmesh-bench-")
            config = dataclasses.replace(config, auth=True, state_dir=state, store="memory")
            extra = f" {Path(state) / 'bootstrap-admin.key'}"  # the key's file, not the key
        km = Server(config)
        await km.start()
        await km.wait_started()  # kernels compiled and warm
        port = km.port

        async def stop() -> None:
            await km.stop(grace=1.0)

    else:
        server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
        if kind == "proto":
            task_pb2_grpc.add_TaskServiceServicer_to_server(ProtoEcho(), server)
        else:
            server.add_generic_rpc_handlers((echo_handler(),))
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()

        async def stop() -> None:
            await server.stop(1.0)

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"PORT {port}{extra}", flush=True)
    for _ in range(int(SERVER_MAX_LIFETIME_S / 0.5)):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)
        if done.is_set() or os.getppid() != parent:
            break
    await stop()
    if state is not None:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


class ServerProcess:
    """One --serve child; `port` once it is listening (and, for kernelmesh,
    warmed up)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", kind],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def wait_listening(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        reader = threading.Thread(
            target=lambda: lines.put(self.proc.stdout.readline()), daemon=True
        )
        reader.start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.kind} server did not start in {timeout:.0f}s") from None
        if not line.startswith("PORT "):
            raise RuntimeError(
                f"the {self.kind} server failed to start (exit {self.proc.poll()}): {line!r}"
            )
        self.port = int(line.split()[1])
        self.extra = line.split()[2:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Servers:
    """Starts the kernelmesh and echo servers on first use, side by side."""

    def __init__(self) -> None:
        self._procs: dict[str, ServerProcess] = {}

    def get(self, *kinds: str) -> list[ServerProcess]:
        fresh = [ServerProcess(k) for k in kinds if k not in self._procs]
        for proc in fresh:
            self._procs[proc.kind] = proc
        for proc in fresh:
            proc.wait_listening()
        return [self._procs[k] for k in kinds]

    def stop(self) -> None:
        for proc in self._procs.values():
            proc.stop()


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)


# -- 1. RunTask latency ---------------------------------------------------------


async def timed_calls(call: Callable, n: int) -> list[float]:
    samples = [0.0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        began = clock()
        await call()
        samples[i] = (clock() - began) / 1e3  # microseconds
    return samples


def timed_sync(call: Callable, n: int) -> list[float]:
    samples = [0.0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        began = clock()
        call()
        samples[i] = (clock() - began) / 1e3
    return samples


def pcts(samples: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(samples), [50, 99])
    return float(p50), float(p99)


async def bench_latency(settings: Settings, servers: Servers) -> list[Row]:
    from kernelmesh.clients import Client

    km, echo, proto = servers.get("kernelmesh", "echo", "proto")
    x = relu_input()
    want = np.maximum(x, 0)
    request = task_pb2.RunTaskRequest(task=task_spec("relu", x))

    async with (
        channel(km.target) as km_chan,
        channel(echo.target) as echo_chan,
        channel(proto.target) as proto_chan,
    ):
        stub = task_pb2_grpc.TaskServiceStub(km_chan)
        proto_stub = task_pb2_grpc.TaskServiceStub(proto_chan)
        # The echo client parses the same reply type, so client-side protobuf
        # work is the same on both sides and the ratio isolates the server.
        echo_call = echo_chan.unary_unary(
            ECHO_UNARY,
            request_serializer=task_pb2.RunTaskRequest.SerializeToString,
            response_deserializer=task_pb2.RunTaskResponse.FromString,
        )
        first = await stub.RunTask(request, timeout=RPC_TIMEOUT_S)
        got = np.frombuffer(first.task.outputs[0].data, np.float32)
        if first.task.state != task_pb2.TASK_STATE_SUCCEEDED or not np.array_equal(got, want):
            raise RuntimeError(f"RunTask relu gave a wrong answer: {first.task}")
        echo_first = await echo_call(request, timeout=RPC_TIMEOUT_S)
        say(
            f"  payload bytes: request {request.ByteSize()}, kernelmesh reply "
            f"{first.ByteSize()}, echo reply {echo_first.ByteSize()}"
        )

        with Client(km.target, timeout=RPC_TIMEOUT_S, retries=1) as client:
            if not np.array_equal(client.run("relu", x), want):
                raise RuntimeError("Client.run relu gave a wrong answer")

            def km_raw():
                return stub.RunTask(request, timeout=RPC_TIMEOUT_S)

            def echo_raw():
                return echo_call(request, timeout=RPC_TIMEOUT_S)

            def km_client():
                return client.run("relu", x)

            def proto_raw():
                return proto_stub.RunTask(request, timeout=RPC_TIMEOUT_S)

            n = settings.latency_warmup
            await timed_calls(echo_raw, n)
            await timed_calls(proto_raw, n)
            await timed_calls(km_raw, n)
            timed_sync(km_client, n)  # blocks this loop; nothing else runs on it

            samples: dict[str, list[float]] = {"echo": [], "proto": [], "raw": [], "client": []}
            per = settings.latency_per_round
            began = time.perf_counter()
            # Interleaved rounds, so background load hits every path alike.
            for _ in range(settings.latency_rounds):
                samples["echo"] += await timed_calls(echo_raw, per)
                samples["proto"] += await timed_calls(proto_raw, per)
                samples["raw"] += await timed_calls(km_raw, per)
                samples["client"] += timed_sync(km_client, per)
            elapsed = time.perf_counter() - began

    total = settings.latency_rounds * per
    say(
        f"  {total} sequential calls per path in {settings.latency_rounds} interleaved rounds "
        f"(after {settings.latency_warmup} warm-up calls each), {elapsed:.1f}s"
    )
    e50, e99 = pcts(samples["echo"])
    p50, p99 = pcts(samples["proto"])
    r50, r99 = pcts(samples["raw"])
    c50, c99 = pcts(samples["client"])
    figure("path", "p50 us", "p99 us")
    figure("bare grpc.aio unary echo (bytes)", f"{e50:.1f}", f"{e99:.1f}")
    figure("generated TaskService, prebuilt reply", f"{p50:.1f}", f"{p99:.1f}")
    figure("kernelmesh RunTask, raw TaskServiceStub", f"{r50:.1f}", f"{r99:.1f}")
    figure("kernelmesh RunTask, Client.run (sync)", f"{c50:.1f}", f"{c99:.1f}")
    say(f"  server-side cost over the echo (p50): {r50 - e50:.1f} us per call, of which")
    say(f"    gRPC servicer dispatch + protobuf:   {p50 - e50:.1f} us")
    say(f"    kernelmesh (validate, place, run):   {r50 - p50:.1f} us")
    say(f"  Client.run over the raw stub (p50):   {c50 - r50:.1f} us per call")
    base = "bare aio unary echo"
    return [
        row(
            "RunTask relu16 p50 (raw stub)",
            f"{r50:.0f} us",
            f"{e50:.0f} us {base}",
            r50 / e50,
            "<= 1.3x",
        ),
        row("RunTask relu16 p99 (raw stub)", f"{r99:.0f} us", f"{e99:.0f} us {base}", r99 / e99),
        row("protobuf TaskService p50", f"{p50:.0f} us", f"{e50:.0f} us {base}", p50 / e50),
        row("RunTask relu16 p50 (Client.run)", f"{c50:.0f} us", f"{e50:.0f} us {base}", c50 / e50),
        row("RunTask relu16 p99 (Client.run)", f"{c99:.0f} us", f"{e99:.0f} us {base}", c99 / e99),
    ]


# -- 2. StreamTasks throughput --------------------------------------------------


async def one_stream(call, requests: list, check: Callable | None) -> tuple[float, int]:
    """Writes every request as fast as flow control allows while reading the
    answers; returns (seconds, answers that failed the check)."""
    began = time.perf_counter()

    async def write() -> None:
        for request in requests:
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    bad = got = 0
    try:
        for _ in range(len(requests) + 1):  # bounded: one answer per request, then EOF
            answer = await call.read()
            if answer is grpc.aio.EOF:
                break
            got += 1
            if check is not None and not check(answer):
                bad += 1
        await writer
    finally:
        writer.cancel()
    seconds = time.perf_counter() - began
    if got != len(requests):
        raise RuntimeError(f"stream returned {got} answers for {len(requests)} requests")
    return seconds, bad


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def busy_stream(call, requests: list, check: Callable | None, server: ServerProcess):
    """`one_stream`, plus the CPU share (1.0 = one core) the client and the
    server used meanwhile, to show which side limits the rate."""
    client0, server0 = cpu_seconds(os.getpid()), cpu_seconds(server.proc.pid)
    seconds, bad = await one_stream(call, requests, check)
    client = (cpu_seconds(os.getpid()) - client0) / seconds
    return seconds, bad, client, (cpu_seconds(server.proc.pid) - server0) / seconds


async def bench_stream(settings: Settings, servers: Servers) -> list[Row]:
    km, echo = servers.get("kernelmesh", "echo")
    spec = task_spec("relu", relu_input())
    n = settings.stream_tasks
    requests = [task_pb2.StreamTasksRequest(correlation_id=str(i), task=spec) for i in range(n)]
    warm = requests[: min(n, 1000)]
    succeeded = task_pb2.TASK_STATE_SUCCEEDED

    def ok(answer: task_pb2.StreamTasksResponse) -> bool:
        return answer.task.state == succeeded

    async with channel(km.target) as km_chan, channel(echo.target) as echo_chan:
        stub = task_pb2_grpc.TaskServiceStub(km_chan)
        echo_stream = echo_chan.stream_stream(
            ECHO_STREAM,
            request_serializer=task_pb2.StreamTasksRequest.SerializeToString,
            response_deserializer=task_pb2.StreamTasksResponse.FromString,
        )

        def km_call():
            return stub.StreamTasks(timeout=RPC_TIMEOUT_S)

        def echo_call():
            return echo_stream(timeout=RPC_TIMEOUT_S)

        await one_stream(echo_call(), warm, None)
        _, bad = await one_stream(km_call(), warm, ok)
        if bad:
            raise RuntimeError(f"{bad} of {len(warm)} StreamTasks relu tasks did not succeed")
        km_times, echo_times = [], []
        km_cpu, echo_cpu = [], []
        for _ in range(settings.stream_repeats):  # interleaved repeats
            seconds, _, client, server = await busy_stream(echo_call(), requests, None, echo)
            echo_times.append(seconds)
            echo_cpu.append((client, server))
            seconds, bad, client, server = await busy_stream(km_call(), requests, ok, km)
            if bad:
                raise RuntimeError(f"{bad} of {n} StreamTasks relu tasks did not succeed")
            km_times.append(seconds)
            km_cpu.append((client, server))

    km_best, km_median = best_and_median(n, km_times)
    echo_best, echo_median = best_and_median(n, echo_times)
    say(
        f"  {n} relu16 tasks over one bidirectional stream, best of {settings.stream_repeats} "
        f"interleaved repeats (after a {len(warm)}-message warm-up each)"
    )
    say("  baseline: a bare grpc.aio bidirectional echo stream, same message count and sizes")
    figure("path", "best /s", "median /s", "client CPU", "server CPU")
    for label, best, median, cpu in (
        ("bare grpc.aio bidi echo stream", echo_best, echo_median, echo_cpu),
        ("kernelmesh StreamTasks, raw stub", km_best, km_median, km_cpu),
    ):
        client, server = (float(np.median([c[i] for c in cpu])) for i in (0, 1))
        figure(label, f"{best:.0f}", f"{median:.0f}", f"{client:.0%}", f"{server:.0%}")
    say("  (CPU: median share of one core while streaming; 2 cores in all)")
    say(f"  server-side cost over the echo: {1e6 / km_best - 1e6 / echo_best:.1f} us per task")
    return [
        row(
            "StreamTasks relu16 throughput",
            f"{km_best:.0f} tasks/s",
            f"{echo_best:.0f} msg/s bidi echo stream",
            km_best / echo_best,
            ">= 0.60x",
        )
    ]


# -- 3. matmul --------------------------------------------------------------------


_kernels_warm = False


def warm_up_kernels() -> None:
    """`cpu.warmup()` once (compiles, or loads from Numba's cache, every kernel)."""
    global _kernels_warm
    if not _kernels_warm:
        from kernelmesh.native import cpu

        began = time.perf_counter()
        cpu.warmup()
        say(f"  kernelmesh.native.cpu.warmup(): {time.perf_counter() - began:.1f}s (not timed)")
        _kernels_warm = True


def validated_params(op: str, *arrays: np.ndarray) -> dict[str, object]:
    """The params the server would hand the kernel (defaults filled in)."""
    from kernelmesh.core import ops

    metas = [ops.TensorMeta(a.dtype.name, a.shape) for a in arrays]
    # No size limits here: this times the kernel alone (a 64 Mi add is over the
    # server's default per-task limit of 128 Mi elements, inputs plus output).
    unlimited = ops.Limits(max_elements=1 << 62, max_total_elements=1 << 62)
    return dict(ops.validate(op, metas, {}, unlimited).params)


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Times each function `repeats` times, alternating which goes first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            began = time.perf_counter()
            result = fns[name]()
            times[name].append(time.perf_counter() - began)
            del result
    return times


async def bench_matmul(settings: Settings, servers: Servers) -> list[Row]:
    from kernelmesh.native import cpu

    n = MATMUL_N
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    params = validated_params("matmul", a, b)
    warm_up_kernels()
    want = np.matmul(a, b)
    got = cpu.run("matmul", [a, b], params)[0]
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    if got.shape != want.shape or got.dtype != np.float32 or err > 1e-4:
        raise RuntimeError(f"cpu matmul is wrong: {got.dtype}{got.shape}, max rel err {err:.2e}")
    flops = 2.0 * n**3
    times = best_times(
        {"ours": lambda: cpu.run("matmul", [a, b], params), "numpy": lambda: np.matmul(a, b)},
        settings.matmul_repeats,
    )
    ours, ours_median = best_and_median(flops / 1e9, times["ours"])
    numpy, numpy_median = best_and_median(flops / 1e9, times["numpy"])
    say(
        f"  {n}x{n} float32, {flops / 1e9:.2f} GFLOP per call, best of "
        f"{settings.matmul_repeats} alternating runs (max rel err vs numpy {err:.1e})"
    )
    figure("path", "best GFLOP/s", "median")
    figure("np.matmul", f"{numpy:.1f}", f"{numpy_median:.1f}")
    figure("kernelmesh.native.cpu.run(matmul)", f"{ours:.1f}", f"{ours_median:.1f}")
    rows = [
        row(
            "matmul 1024 f32 kernel",
            f"{ours:.1f} GFLOP/s",
            f"{numpy:.1f} GFLOP/s np.matmul",
            ours / numpy,
            ">= 0.90x",
        ),
    ]

    # End to end: raw stub, prebuilt request (4 MiB per input and output),
    # against np.matmul plus a bare echo of the same bytes.
    km, echo = servers.get("kernelmesh", "echo")
    request = task_pb2.RunTaskRequest(task=task_spec("matmul", a, b))
    async with channel(km.target) as km_chan, channel(echo.target) as echo_chan:
        stub = task_pb2_grpc.TaskServiceStub(km_chan)
        echo_call = echo_chan.unary_unary(
            ECHO_BIG,
            request_serializer=task_pb2.RunTaskRequest.SerializeToString,
            response_deserializer=task_pb2.RunTaskResponse.FromString,
        )
        answer = await stub.RunTask(request, timeout=RPC_TIMEOUT_S)
        out = np.frombuffer(answer.task.outputs[0].data, np.float32).reshape(n, n)
        if float(np.max(np.abs(out - want)) / np.max(np.abs(want))) > 1e-4:
            raise RuntimeError("RunTask matmul gave a wrong answer")
        await echo_call(request, timeout=RPC_TIMEOUT_S)
        e2e: list[float] = []
        wire: list[float] = []
        kernel_ms: list[float] = []
        for _ in range(settings.matmul_e2e_repeats):
            began = time.perf_counter()
            answer = await stub.RunTask(request, timeout=RPC_TIMEOUT_S)
            e2e.append(time.perf_counter() - began)
            kernel_ms.append(answer.task.run_duration.ToNanoseconds() / 1e6)
            began = time.perf_counter()
            await echo_call(request, timeout=RPC_TIMEOUT_S)
            wire.append(time.perf_counter() - began)
    best, median = best_and_median(flops / 1e9, e2e)
    composite = flops / (min(times["numpy"]) + min(wire)) / 1e9
    figure("kernelmesh RunTask end to end, raw stub", f"{best:.1f}", f"{median:.1f}")
    figure("np.matmul + bare aio echo of the same bytes", f"{composite:.1f}")
    say(
        f"  end to end, best of {settings.matmul_e2e_repeats} alternating calls: RunTask "
        f"{min(e2e) * 1e3:.1f} ms (server kernel time {min(kernel_ms):.1f} ms); echo of "
        f"{request.ByteSize() >> 20} MiB in, {answer.ByteSize() >> 20} MiB out "
        f"{min(wire) * 1e3:.1f} ms; np.matmul {min(times['numpy']) * 1e3:.1f} ms"
    )
    say(f"  RunTask end to end / np.matmul alone: {best / numpy:.2f}x")
    rows.append(
        row(
            "matmul 1024 f32 via RunTask",
            f"{best:.1f} GFLOP/s",
            f"{composite:.1f} GFLOP/s np.matmul+echo",
            best / composite,
            ">= 0.80x",
        )
    )
    return rows


# -- 4. elementwise add ---------------------------------------------------------


async def bench_add(settings: Settings, servers: Servers) -> list[Row]:
    from kernelmesh.native import cpu

    n = settings.add_elements
    rng = np.random.default_rng(2)
    a = rng.random(n, dtype=np.float32)
    b = rng.random(n, dtype=np.float32)
    params = validated_params("add", a, b)
    warm_up_kernels()
    got = cpu.run("add", [a, b], params)[0]
    sample = slice(0, n, 4099)
    if (
        got.shape != a.shape
        or got.dtype != np.float32
        or not np.array_equal(got[sample], (a + b)[sample])
    ):
        raise RuntimeError(f"cpu add is wrong: {got.dtype}{got.shape}")
    del got
    nbytes = 3 * 4 * n  # two reads, one write
    times = best_times(
        {"ours": lambda: cpu.run("add", [a, b], params), "numpy": lambda: np.add(a, b)},
        settings.add_repeats,
    )
    ours, ours_median = best_and_median(nbytes / 1e9, times["ours"])
    numpy, numpy_median = best_and_median(nbytes / 1e9, times["numpy"])
    say(
        f"  {n >> 20} Mi float32 elements, {nbytes / 1e9:.2f} GB moved per call (3 x 4 x n), "
        f"best of {settings.add_repeats} alternating runs, outputs allocated by each call"
    )
    figure("path", "best GB/s", "median")
    figure("np.add(a, b)", f"{numpy:.2f}", f"{numpy_median:.2f}")
    figure("kernelmesh.native.cpu.run(add)", f"{ours:.2f}", f"{ours_median:.2f}")
    return [
        row(
            "add 64Mi f32 kernel",
            f"{ours:.2f} GB/s",
            f"{numpy:.2f} GB/s np.add",
            ours / numpy,
            ">= 0.80x",
        )
    ]


# -- 5. ready queue -----------------------------------------------------------------


async def bench_queue(settings: Settings, servers: Servers) -> list[Row]:
    path = HERE / "bench_queue.py"
    if not path.exists():
        say(f"  {path.name} is not there yet: nothing to measure")
        return [row("ReadyQueue ops/s", "n/a", "heapq queue: n/a", None, ">= 1.0x")]
    spec = importlib.util.spec_from_file_location("kernelmesh_bench_queue", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = {}
    if "quick" in inspect.signature(module.run).parameters:
        kwargs["quick"] = settings is QUICK
    elif settings is QUICK and isinstance(getattr(module, "REPEATS", None), int):
        module.REPEATS = 1  # smoke run: one repeat instead of best of several
    figures: dict[str, float] = module.run(**kwargs)
    how = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    repeats = getattr(module, "REPEATS", None)
    say(f"  {path.name}: run({how})" + (f", best of {repeats} repeats" if repeats else ""))
    if all(hasattr(module, k) for k in ("N", "TENANTS", "PRIORITIES")):
        say(
            f"  push {module.N:,} ids then pop them all, {module.TENANTS} tenants, "
            f"{module.PRIORITIES} priorities; each push and each pop is one op"
        )
    figure("queue", "ops/s")
    for name, value in figures.items():
        figure(name, f"{value:,.0f}")
    ours = next((k for k in figures if "cython" in k.lower()), None)
    base = next((k for k in figures if "heapq" in k.lower()), None)
    if ours is None or base is None:
        say("  (no 'cython' and 'heapq' figures to compare)")
        return [row("ReadyQueue ops/s", "n/a", "heapq queue: n/a", None)]
    return [
        row(
            "ReadyQueue ops/s",
            f"{figures[ours]:,.0f} ops/s",
            f"{figures[base]:,.0f} ops/s {base}",
            figures[ours] / figures[base],
            ">= 1.0x",
        )
    ]


async def bench_auth(settings: Settings, servers: Servers) -> list[Row]:
    """RunTask p50 with an API key checked on every call vs no auth at all: the
    same server code, auth on in one process and off in the other."""
    km, km_auth = servers.get("kernelmesh", "kernelmesh-auth")
    secret = Path(km_auth.extra[0]).read_text().strip()
    metadata = (("authorization", f"Bearer {secret}"),)
    x = relu_input()
    request = task_pb2.RunTaskRequest(task=task_spec("relu", x))
    async with channel(km.target) as open_chan, channel(km_auth.target) as auth_chan:
        open_stub = task_pb2_grpc.TaskServiceStub(open_chan)
        auth_stub = task_pb2_grpc.TaskServiceStub(auth_chan)

        def off():
            return open_stub.RunTask(request, timeout=RPC_TIMEOUT_S)

        def on():
            return auth_stub.RunTask(request, timeout=RPC_TIMEOUT_S, metadata=metadata)

        reply = await on()
        if reply.task.state != task_pb2.TASK_STATE_SUCCEEDED:
            raise RuntimeError(f"RunTask with auth failed: {reply.task}")
        n = settings.latency_warmup
        await timed_calls(off, n)
        await timed_calls(on, n)
        samples: dict[str, list[float]] = {"off": [], "on": []}
        # Many short rounds, each an off batch next to an on batch in alternating
        # order: load drift lands on both sides of a round alike, and the median of
        # the rounds' p50 ratios is what is judged (the spread shows the noise).
        ratios = []
        for i in range(settings.auth_rounds):
            batch = {}
            for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
                batch[side] = await timed_calls(
                    off if side == "off" else on, settings.auth_per_round
                )
                samples[side] += batch[side]
            ratios.append(float(np.median(batch["on"]) / np.median(batch["off"])))
    o50, o99 = pcts(samples["off"])
    a50, a99 = pcts(samples["on"])
    ratio = float(np.median(ratios))
    figure("path", "p50 us", "p99 us")
    figure("kernelmesh RunTask, auth off", f"{o50:.1f}", f"{o99:.1f}")
    figure("kernelmesh RunTask, auth on (key)", f"{a50:.1f}", f"{a99:.1f}")
    say(f"  auth's cost (p50 of all calls): {a50 - o50:.1f} us per call, {a50 / o50:.3f}x")
    say(
        f"  per-round p50 ratio over {len(ratios)} rounds: median {ratio:.3f}x, "
        f"quartiles {np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f}, "
        f"range {min(ratios):.3f}-{max(ratios):.3f}"
    )
    return [
        row(
            "RunTask relu16 p50, auth on (median of rounds)",
            f"{a50:.0f} us",
            f"{o50:.0f} us auth off",
            ratio,
            "<= 1.05x",
        ),
        row("RunTask relu16 p99, auth on", f"{a99:.0f} us", f"{o99:.0f} us auth off", a99 / o99),
    ]


BENCHES = {
    "latency": ("1. RunTask latency, relu on 16 float32, one caller", bench_latency),
    "stream": ("2. StreamTasks throughput, relu on 16 float32", bench_stream),
    "matmul": ("3. matmul 1024x1024 float32", bench_matmul),
    "add": ("4. elementwise add, 64 Mi float32", bench_add),
    "queue": ("5. ReadyQueue (Cython) vs heapq", bench_queue),
    "auth": ("6. RunTask latency with auth on vs off", bench_auth),
}


# -- driver ---------------------------------------------------------------------------


def summary(rows: list[Row]) -> None:
    header = ("metric", "kernelmesh", "baseline", "ratio", "target", "")
    table = [
        (
            r.metric,
            r.ours,
            r.baseline,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target,
            {True: "PASS", False: "MISS", None: "info" if r.target == "-" else "n/a"}[r.ok],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *table)) for i in range(len(header))]
    say("== summary (ratio = kernelmesh / baseline)")
    for line in (header, *table):
        say("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def machine() -> str:
    import numba

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"grpcio {grpc.__version__}; load average {load}"
    )


async def main_async(settings: Settings, only: list[str]) -> list[Row]:
    servers = Servers()
    rows: list[Row] = []
    try:
        for name in only:
            title, bench = BENCHES[name]
            say(f"== {title}")
            began = time.perf_counter()
            try:
                rows += await bench(settings, servers)
            except Exception as exc:  # one broken section never hides the others
                say(f"  FAILED: {type(exc).__name__}: {exc}")
                rows.append(Row(f"{name}: error", "-", "-", None, "-", False))
            say(f"  ({time.perf_counter() - began:.1f}s)")
            say()
    finally:
        servers.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME[,NAME]",
        help=f"run only these sections: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--serve",
        choices=(
            "kernelmesh",
            "kernelmesh-auth",
            "kernelmesh-batched",
            "kernelmesh-bulk",
            "echo",
            "proto",
        ),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    say(f"kernelmesh benchmarks ({'quick' if args.quick else 'full'} run): {machine()}")
    say("each server runs in its own subprocess on 127.0.0.1; the client runs here")
    say()
    rows = asyncio.run(main_async(settings, only))
    summary(rows)
    say(
        f"total {time.perf_counter() - began:.1f}s; load average now "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    return 1 if any(r.metric.endswith(": error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
