"""Two orchestrators on one real PostgreSQL with the nodes split between them:
a node joined to X runs work submitted to Y; X is killed (-9) under load and
every task it acknowledged completes (Y claims them once their leases expire;
X's node joins Y from its --join list)."""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from mesh_procs import ready_nodes, wait_for

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e


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


def small(n: int) -> task_pb2.TaskSpec:
    a = np.full((200, 200), (n % 5) + 1, np.float32)
    msg = task_pb2.TaskSpec(op="matmul")
    for _ in range(2):
        msg.inputs.add().tensor.CopyFrom(
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())
        )
    return msg


def test_any_orchestrator_answers_for_a_task_another_one_holds(dsn, procs):
    """Y reads, lists, watches and cancels tasks X accepted and holds; a request id
    sent to X and then to Y makes one task. node-a is joined to X alone, and is
    stopped (SIGSTOP) while the tasks are submitted, so none can finish before
    the cancel."""
    x = procs.orchestrator("--store", dsn, "--lease-seconds", "3", "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", "3", "--name", "orch-y", name="y")
    node = procs.node("node-a", x.target, "--backends", "cpu")
    wait_for(lambda: ready_nodes(x.target) == {"node-a"}, what="node-a placed by X")
    node.process.send_signal(signal.SIGSTOP)

    with (
        grpc.insecure_channel(x.target) as to_x,
        grpc.insecure_channel(y.target) as to_y,
    ):
        on_x, on_y = task_pb2_grpc.TaskServiceStub(to_x), task_pb2_grpc.TaskServiceStub(to_y)
        names = [
            on_x.SubmitTask(
                task_pb2.SubmitTaskRequest(task=small(i), request_id=f"rid-{i}"), timeout=30
            ).task.name
            for i in range(24)
        ]
        # The same request id through Y: X's task, not a second one.
        again = on_y.SubmitTask(
            task_pb2.SubmitTaskRequest(task=small(3), request_id="rid-3"), timeout=30
        )
        assert again.task.name == names[3]
        with pytest.raises(grpc.RpcError) as err:
            on_y.SubmitTask(
                task_pb2.SubmitTaskRequest(task=small(4), request_id="rid-3"), timeout=30
            )
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        # Cancel through Y the last task X queued: X cancels it, it never runs.
        last = names[-1]
        reply = on_y.CancelTask(task_pb2.CancelTaskRequest(name=last), timeout=30)
        assert reply.task.name == last

        def state_on_y(name: str) -> int:
            return on_y.GetTask(task_pb2.GetTaskRequest(name=name), timeout=30).task.state

        wait_for(
            lambda: state_on_y(last) == task_pb2.TASK_STATE_CANCELLED,
            timeout=60,
            what="the task cancelled through Y",
        )
        node.process.send_signal(signal.SIGCONT)
        cancelled = on_x.GetTask(task_pb2.GetTaskRequest(name=last), timeout=30).task
        assert cancelled.state == task_pb2.TASK_STATE_CANCELLED
        assert not [a for a in cancelled.attempts if a.state == task_pb2.TASK_STATE_SUCCEEDED]

        # Y watches a task X holds to its end, outputs included.
        events = list(on_y.WatchTask(task_pb2.WatchTaskRequest(name=names[-2]), timeout=120))
        assert events[-1].state == task_pb2.TASK_STATE_SUCCEEDED
        out = events[-1].task.outputs[0]
        got = np.frombuffer(out.data, np.float32).reshape(tuple(out.shape))
        assert np.allclose(got, ((22 % 5) + 1) ** 2 * 200)

        # Y lists X's tasks, newest first, page by page.
        seen: list[str] = []
        token = ""
        while True:
            page = on_y.ListTasks(
                task_pb2.ListTasksRequest(page_size=10, page_token=token), timeout=30
            )
            seen.extend(t.name for t in page.tasks)
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(names))

        # GetTask through Y of a finished task X holds carries its outputs.
        wait_for(
            lambda: state_on_y(names[0]) == task_pb2.TASK_STATE_SUCCEEDED,
            timeout=120,
            what="the first task finished",
        )
        full = on_y.GetTask(
            task_pb2.GetTaskRequest(name=names[0], view=task_pb2.TASK_VIEW_FULL), timeout=30
        ).task
        assert full.outputs[0].data and full.attempt == 1
        with pytest.raises(grpc.RpcError) as err:
            on_y.GetTask(task_pb2.GetTaskRequest(name="tasks/" + "0" * 32), timeout=30)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    # Y learnt of the cancel and of node-a by notification, not only by polling.
    assert "cannot listen" not in y.output()


def attempts_of(dsn: str, ids: list[str]) -> dict[str, list[tuple[int, int]]]:
    """Each task's attempts as (number, state), from the store."""
    import asyncpg

    async def read() -> dict[str, list[tuple[int, int]]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT task_id, number, state FROM task_attempts WHERE task_id = ANY($1) "
                "ORDER BY task_id, number",
                ids,
            )
        finally:
            await conn.close()
        found: dict[str, list[tuple[int, int]]] = {}
        for r in rows:
            found.setdefault(r[0], []).append((r[1], r[2]))
        return found

    return asyncio.run(read())


def test_a_holder_that_stalls_past_its_lease_drops_what_it_ran(dsn, procs):
    """X stops (SIGSTOP) for longer than its lease with attempts forwarded and
    queued; Y claims X's tasks and runs them to their end. When X resumes, the
    answers to its old attempts arrive and its workers wake: it learns it no
    longer holds the tasks (its renewal, or its fenced writes refused), stops
    them and drops their results. Every task ends SUCCEEDED with one succeeded
    attempt, and X answers for them from the store."""
    lease = "2"
    x = procs.orchestrator("--store", dsn, "--lease-seconds", lease, "--name", "orch-x", name="x")
    y = procs.orchestrator("--store", dsn, "--lease-seconds", lease, "--name", "orch-y", name="y")
    a = procs.node("node-a", f"{x.target},{y.target}", "--backends", "cpu")
    b = procs.node("node-b", f"{y.target},{x.target}", "--backends", "cpu")
    for orch in (x, y):
        wait_for(
            lambda o=orch: ready_nodes(o.target) == {"node-a", "node-b"},
            what=f"both nodes placed by {orch.name}",
        )
    # The nodes stop, so X's attempts are in flight (or queued) when X stops.
    for node in (a, b):
        node.process.send_signal(signal.SIGSTOP)
    with grpc.insecure_channel(x.target) as to_x:
        on_x = task_pb2_grpc.TaskServiceStub(to_x)
        names = [
            on_x.SubmitTask(task_pb2.SubmitTaskRequest(task=small(i)), timeout=30).task.name
            for i in range(16)
        ]
    x.process.send_signal(signal.SIGSTOP)
    for node in (a, b):
        node.process.send_signal(signal.SIGCONT)
    ids = [n.removeprefix("tasks/") for n in names]

    def all_done() -> bool:
        found = states(dsn, ids)
        return len(found) == len(ids) and all(state == 3 for state, _ in found.values())

    # Y claims X's tasks once X's leases run out (and once PostgreSQL ends a
    # transaction X stopped in the middle of), and runs them.
    try:
        wait_for(all_done, timeout=180, what="Y ran X's tasks to their end")
    except AssertionError as exc:
        found = states(dsn, ids)
        raise AssertionError(
            f"{exc}\nstates: {found}\n--- Y:\n{y.output()[-4000:]}\n--- X:\n{x.output()[-4000:]}"
        ) from None
    assert "claimed" in y.output()
    x.process.send_signal(signal.SIGCONT)
    wait_for(
        lambda: "held by another orchestrator now" in x.output(),
        timeout=60,
        what="X learnt its tasks are held elsewhere",
    )
    with grpc.insecure_channel(x.target) as to_x:
        on_x = task_pb2_grpc.TaskServiceStub(to_x)

        def x_answers_from_the_store() -> bool:
            return all(
                on_x.GetTask(task_pb2.GetTaskRequest(name=name), timeout=30).task.state
                == task_pb2.TASK_STATE_SUCCEEDED
                for name in names
            )

        # X answers from the store: the run Y made, not X's own. The first tasks it
        # lets go of may be those whose fenced writes were refused; the rest go with
        # its next lease renewal, which waits for its writer to reconnect.
        wait_for(x_answers_from_the_store, timeout=60, what="X answered from the store")
    found = states(dsn, ids)
    assert all(state == 3 and ok == 1 for state, ok in found.values()), found
    attempts = attempts_of(dsn, ids)
    # X's attempts were lost with its lease: none of them counts as a success.
    assert all(runs[-1][1] == 3 for runs in attempts.values())
    assert any(len(runs) > 1 for runs in attempts.values()), attempts
