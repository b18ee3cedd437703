"""Two orchestrators on one real PostgreSQL with the nodes split between them:
a node joined to X runs work submitted to Y; X is killed (-9) under load and
every task it acknowledged completes (Y claims them once their leases expire;
X's node joins Y from its --join list)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from mesh_procs import Procs, ready_nodes, wait_for
from postgres_db import create_database, drop_database

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e


@pytest.fixture
def dsn():
    found, name = create_database()
    if not found.startswith("postgresql://"):  # libpq's PG* variables: no host in the URL
        found = "postgresql:///" + name
    yield found
    drop_database(name)


@pytest.fixture
def procs(tmp_path):
    found = Procs(tmp_path)
    yield found
    found.stop_all()


def spec(n: int, device: str = "") -> task_pb2.TaskSpec:
    # X's share (even n) is bigger, so X still holds queued work when it dies.
    size = 320 if n % 2 == 0 else 48
    a = np.full((size, size), (n % 5) + 1, np.float32)
    msg = task_pb2.TaskSpec(op="matmul")
    for _ in range(2):
        msg.inputs.add().tensor.CopyFrom(
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())
        )
    msg.device.name = device
    msg.retry_policy.maximum_attempts = 10
    msg.retry_policy.initial_interval.FromMilliseconds(50)
    return msg


def states(dsn: str, ids: list[str]) -> dict[str, tuple[int, int]]:
    """Each task's state and how many of its attempts succeeded, from the store."""
    import asyncpg

    async def read() -> dict[str, tuple[int, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT t.id, t.state, (SELECT count(*) FROM task_attempts a "
                "WHERE a.task_id = t.id AND a.state = 3) FROM tasks t WHERE t.id = ANY($1)",
                ids,
            )
        finally:
            await conn.close()
        return {r[0]: (r[1], r[2]) for r in rows}

    return asyncio.run(read())


def test_two_orchestrators_share_nodes_and_survive_one_killed(dsn, procs):
    lease = "1.5"
    x = procs.orchestrator("--store", dsn, "--lease-seconds", lease, "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", lease, "--name", "orch-y", name="y")
    procs.node("node-a", f"{x.target},{y.target}", "--backends", "cpu")
    procs.node("node-b", f"{y.target},{x.target}", "--backends", "cpu")
    for orch in (x, y):
        wait_for(
            lambda o=orch: ready_nodes(o.target) == {"node-a", "node-b"},
            what=f"both nodes placed by {orch.name}",
        )

    with grpc.insecure_channel(y.target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        # node-a heartbeats to X, yet runs what Y was given.
        reply = stub.RunTask(task_pb2.RunTaskRequest(task=spec(1, device="node-a")), timeout=60)
        assert reply.task.device == "node-a/cpu:0"

    total = 400
    acked: dict[int, str] = {}
    lock = threading.Lock()
    killed = threading.Event()
    with (
        grpc.insecure_channel(x.target) as to_x,
        grpc.insecure_channel(y.target) as to_y,
    ):
        on_x, on_y = task_pb2_grpc.TaskServiceStub(to_x), task_pb2_grpc.TaskServiceStub(to_y)

        def submit(i: int) -> None:
            stub = on_x if i % 2 == 0 and not killed.is_set() else on_y
            try:
                reply = stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(i)), timeout=30)
            except grpc.RpcError:
                # X is gone: the client retries against the other orchestrator.
                reply = on_y.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(i)), timeout=30)
            with lock:
                acked[i] = reply.task.name.removeprefix("tasks/")
                if len(acked) == total // 3 and not killed.is_set():
                    killed.set()
                    x.kill9()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(total)))
    assert killed.is_set()
    ids = list(acked.values())

    def all_done() -> bool:
        found = states(dsn, ids)
        return len(found) == len(ids) and all(state == 3 for state, _ in found.values())

    wait_for(all_done, timeout=180, what="every acknowledged task SUCCEEDED")
    found = states(dsn, ids)
    assert all(ok == 1 for _, ok in found.values()), "a task succeeded twice"
    # X's node found Y in its join list.
    wait_for(lambda: ready_nodes(y.target) == {"node-a", "node-b"}, what="node-a joined Y")
    assert "claimed" in y.output()
