"""What durability costs SubmitTask, and how long recovery takes.

* SubmitTask throughput (acknowledged submissions per second, 64 in flight,
  tiny relu tasks) on the same in-process server with the in-memory store (the
  baseline), the SQLite store (WAL, synchronous=FULL, group commit) and, when
  a cluster is named, PostgreSQL. Runs are interleaved, best of REPEATS.
  Target: SQLite >= 0.7x the in-memory store.
* Big inputs on PostgreSQL: SubmitTask of tasks with a 1 MiB input (over the
  256 KiB inline threshold), the in-memory store as baseline, PostgreSQL with
  every blob a bytea row (the default), and PostgreSQL with big blobs as files
  under the state dir (how earlier versions kept them).
* Recovery: a journal holding 10,000 QUEUED tasks, loaded and queued again by
  a fresh TaskManager (what `kernelmesh serve` does at start).

The client runs in the same process as the server (grpc.aio), equally for
every store.

    python benchmarks/bench_store.py
    KERNELMESH_TEST_POSTGRES=postgresql://user@host/db python benchmarks/bench_store.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from kernelmesh.core import devices
from kernelmesh.core.config import ServerConfig
from kernelmesh.core.store import Store, codec, open_store
from kernelmesh.core.store.base import PutBlob, PutTask, inputs_key
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions, TaskSpec
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.services.server import Server
from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

SUBMITS = 3000
BIG_SUBMITS = 200
BIG_ELEMENTS = 1 << 18  # float32: 1 MiB
IN_FLIGHT = 64
REPEATS = 3
RECOVER = 10_000
BATCHES: dict[str, list[float]] = {}  # store -> mean queue entries per transaction, per run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _spec(elements: int = 16) -> task_pb2.TaskSpec:
    msg = task_pb2.TaskSpec(op="relu")
    t = msg.inputs.add().tensor
    t.dtype = tensor_pb2.DTYPE_FLOAT32
    t.shape.append(elements)
    t.data = np.linspace(-1, 1, elements, dtype=np.float32).tobytes()
    return msg


async def submit_rate(
    store: str,
    state_dir: str,
    *,
    elements: int = 16,
    submits: int = SUBMITS,
    blob_files: bool = False,
    label: str = "",
) -> float:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        http_port=None,
        warmup=False,
        store=store,
        state_dir=state_dir,
        backends=("cpu",),
        retention_tasks=1_000_000,
    )
    server = Server(config)
    if blob_files:
        server.state.inline_blobs = False  # type: ignore[attr-defined]
    await server.start()
    spec = _spec(elements)
    label = label or store
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            await stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec))  # warm
            window = asyncio.Semaphore(IN_FLIGHT)

            async def one(i: int) -> None:
                async with window:
                    await stub.SubmitTask(
                        task_pb2.SubmitTaskRequest(task=spec, request_id=f"{label}-{i}")
                    )

            store_ = server.state
            before = (getattr(store_, "commits", 0), getattr(store_, "committed_entries", 0))
            began = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(submits)))
            rate = submits / (time.perf_counter() - began)
            commits = getattr(store_, "commits", 0) - before[0]
            if commits:
                entries = getattr(store_, "committed_entries", 0) - before[1]
                BATCHES.setdefault(store, []).append(entries / commits)
            return rate
    finally:
        await server.stop(grace=30.0)


async def recovery_seconds(store: Store) -> float:
    """Journals RECOVER queued tasks, then times a fresh manager's recover()."""
    await store.open()
    mgr = TaskManager(devices.discover("bench", ("cpu",)), TensorStore(1 << 30))
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    ops = []
    for _ in range(RECOVER):
        spec = TaskSpec(op="relu", inputs=[x])
        task = mgr.prepare(spec)
        ops += [
            PutTask(mgr._record_of(task, spec)),
            PutBlob(inputs_key(task.id), codec.encode([x])),
        ]
    await store.write(*ops, wait=True)
    mgr._pool.shutdown()
    fresh = TaskManager(
        devices.discover("bench", ("cpu",)),
        TensorStore(1 << 30),
        TaskManagerOptions(retention_tasks=1_000_000),
        store,
    )
    await fresh.start()
    began = time.perf_counter()
    queued, _, _ = await fresh.recover()
    took = time.perf_counter() - began
    assert queued == RECOVER, queued
    await fresh.shutdown(grace=60.0)
    await store.close()
    return took


async def big_inputs(pg_store, tmp: str) -> None:
    kinds = {
        "memory": lambda: "memory",
        "postgresql, blobs as bytea": pg_store,
        "postgresql, blobs as files": pg_store,
    }
    best = dict.fromkeys(kinds, 0.0)
    for r in range(REPEATS):
        for kind, make in kinds.items():
            rate = await submit_rate(
                make(),
                os.path.join(tmp, f"big-{r}-{len(kind)}"),
                elements=BIG_ELEMENTS,
                submits=BIG_SUBMITS,
                blob_files=kind.endswith("files"),
                label=f"big-{kind}",
            )
            best[kind] = max(best[kind], rate)
    base = best["memory"]
    print(f"SubmitTask, {BIG_SUBMITS} tasks with a 1 MiB input, best of {REPEATS}:")
    for kind, rate in best.items():
        name = f"{kind} (baseline)" if kind == "memory" else kind
        print(f"  {name:28s} {rate:8.0f} submits/s   {rate / base:.2f}x")


async def main() -> None:
    from postgres_db import cluster_dsn, drop_database, with_database

    dsn = cluster_dsn()
    pg_names: list[str] = []

    def pg_store() -> str:
        import secrets

        from postgres_db import _admin, _run

        name = "km_bench_" + secrets.token_hex(4)
        _run(_admin(dsn, f"CREATE DATABASE {name}"))
        pg_names.append(name)
        return with_database(dsn, name)

    kinds = ["memory", "sqlite"] + (["postgresql"] if dsn else [])
    best: dict[str, float] = dict.fromkeys(kinds, 0.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(REPEATS):
                for kind in kinds:
                    store = pg_store() if kind == "postgresql" else kind
                    rate = await submit_rate(store, os.path.join(tmp, f"{kind}-{r}"))
                    best[kind] = max(best[kind], rate)
            base = best["memory"]
            print(f"SubmitTask, {SUBMITS} tiny tasks, {IN_FLIGHT} in flight, best of {REPEATS}:")
            print(f"  memory store (baseline)   {base:8.0f} submits/s   1.00x")
            print(
                f"  sqlite (WAL, FULL sync)   {best['sqlite']:8.0f} submits/s   "
                f"{best['sqlite'] / base:.2f}x  (target >= 0.70x)"
            )
            if "postgresql" in best:
                print(
                    f"  postgresql (local)        {best['postgresql']:8.0f} submits/s   "
                    f"{best['postgresql'] / base:.2f}x"
                )
            else:
                print(
                    "  postgresql: no cluster named (KERNELMESH_TEST_POSTGRES / PG*), not measured"
                )
            if dsn:
                await big_inputs(pg_store, tmp)
            for kind in kinds:
                means = [m for k, v in BATCHES.items() if k.startswith(kind[:8]) for m in v]
                if means:
                    print(
                        f"  group commit ({kind}): {sum(means) / len(means):.1f} journal "
                        "entries per transaction (submissions and task updates together)"
                    )
            print(f"Recovery of {RECOVER} queued tasks at start:")
            took = await recovery_seconds(open_store("sqlite", os.path.join(tmp, "recover")))
            print(f"  sqlite      {took:6.2f} s  ({RECOVER / took:8.0f} tasks/s)")
            if dsn:
                took = await recovery_seconds(open_store(pg_store(), tmp))
                print(f"  postgresql  {took:6.2f} s  ({RECOVER / took:8.0f} tasks/s)")
    finally:
        for name in pg_names:
            drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())
