"""kill -9 of a real `kernelmesh serve`, restarted on the same state: every
acknowledged SubmitTask reaches SUCCEEDED exactly once (one succeeded attempt
in its records), on SQLite and on PostgreSQL; faults at start exit non-zero
with the reason."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from postgres_db import create_database, drop_database

from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.e2e

TASKS = 500
HEAVY = 12  # the last ids: big matmuls, so the second kill finds tasks running
BIG = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
MAX_ATTEMPTS = 20  # several kills may each take an attempt from a task


@pytest.fixture(params=["sqlite", "postgresql"])
def store_args(request, tmp_path: Path):
    args = ["--state-dir", str(tmp_path / "state"), "--no-warmup"]
    if request.param == "sqlite":
        yield args
        return
    dsn, name = create_database()
    yield [*args, "--store", dsn]
    drop_database(name)


def start(serve_tools, tmp_path: Path, args: list[str]):
    return serve_tools.start_serve(tmp_path, *args)


def kill9(proc) -> None:
    proc.process.send_signal(signal.SIGKILL)
    proc.process.wait(30)


def spec(i: int) -> task_pb2.TaskSpec:
    """Small matmuls, every tenth a bigger one, and HEAVY big ones at the end."""
    n = 1500 if i >= TASKS - HEAVY else 160 if i % 10 == 0 else 24
    a = np.full((n, n), (i % 7) + 1, np.float32)
    msg = task_pb2.TaskSpec(op="matmul")
    for _ in range(2):
        t = msg.inputs.add().tensor
        t.dtype = tensor_pb2.DTYPE_FLOAT32
        t.shape.extend(a.shape)
        t.data = a.tobytes()
    msg.retry_policy.maximum_attempts = MAX_ATTEMPTS
    msg.retry_policy.initial_interval.FromMilliseconds(50)
    return msg


def submit_all(
    target: str,
    request_ids: list[str],
    acked: dict[str, str],
    kill_at: tuple[int, Callable[[], None]] | None = None,
) -> None:
    """Submits concurrently; records request_id -> task name for every ack. With
    `kill_at=(n, kill)`, calls `kill` as the n-th ack arrives, while other
    submissions are in flight (some committed, not yet acknowledged)."""
    lock = threading.Lock()
    with grpc.insecure_channel(target, options=BIG) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)

        def one(i: int) -> None:
            rid = request_ids[i]
            if rid in acked:
                return
            try:
                reply = stub.SubmitTask(
                    task_pb2.SubmitTaskRequest(task=spec(i), request_id=rid), timeout=30
                )
            except grpc.RpcError:
                return  # not acknowledged: the client would retry with the same id
            with lock:
                acked[rid] = reply.task.name
                if kill_at is not None and len(acked) == kill_at[0]:
                    kill_at[1]()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(len(request_ids))))


def wait_all_terminal(target: str, names: list[str], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target, options=BIG) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        done: dict[str, task_pb2.Task] = {}
        while time.monotonic() < deadline:
            for name in names:
                if name in done:
                    continue
                task = stub.GetTask(
                    task_pb2.GetTaskRequest(name=name, view=task_pb2.TASK_VIEW_FULL), timeout=30
                ).task
                if task.state >= task_pb2.TASK_STATE_SUCCEEDED:
                    done[name] = task
            if len(done) == len(names):
                return done
            time.sleep(0.2)
    raise AssertionError(f"{len(names) - len(done)} tasks did not finish in {timeout}s")


def test_every_acknowledged_task_succeeds_exactly_once_across_kill_9(
    serve_tools, tmp_path, store_args
):
    seed = int(os.environ.get("KERNELMESH_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    request_ids = [str(uuid.uuid4()) for _ in range(TASKS)]
    acked: dict[str, str] = {}

    # 1. kill -9 during submission.
    server = start(serve_tools, tmp_path, store_args)
    first_kill = rng.randrange(50, 300)
    submit_all(server.target, request_ids, acked, kill_at=(first_kill, lambda: kill9(server)))
    assert first_kill <= len(acked) < TASKS, f"seed {seed}"

    # 2. restart, resubmit everything (acked ids must not make a second task), and
    #    kill -9 again as the last acknowledgements arrive: the tasks just accepted
    #    (the big matmuls come last) are queued or running then. Waiting for one to
    #    be seen running lost the race to the kernels on a fast machine.
    server = start(serve_tools, tmp_path, store_args)
    again: dict[str, str] = {}
    submit_all(server.target, request_ids, again, kill_at=(TASKS - 2, lambda: kill9(server)))
    if server.process.poll() is None:  # never left running behind the test
        kill9(server)
        raise AssertionError(f"only {len(again)} resubmissions acknowledged (seed {seed})")
    for rid, name in again.items():
        if rid in acked:
            assert acked[rid] == name, f"request {rid} made a second task (seed {seed})"
    acked.update(again)

    # 3. restart once more: resubmit what was never acknowledged, and everything
    #    acknowledged finishes.
    server = start(serve_tools, tmp_path, store_args)
    try:
        # Retried as a client would on UNAVAILABLE. On a shared (PostgreSQL) store
        # the restarted server is a new lease holder: a request id whose task the
        # dead one committed answers with that task (read from the store) before
        # its lease ends and the task is claimed here.
        last: dict[str, str] = {}
        give_up = time.monotonic() + 90
        while len(last) < TASKS and time.monotonic() < give_up:
            submit_all(server.target, request_ids, last)
            if len(last) < TASKS:
                time.sleep(0.5)
        for rid, name in acked.items():
            assert last[rid] == name, f"request {rid} made a second task (seed {seed})"
        acked.update(last)
        names = sorted(set(acked.values()))
        assert len(names) == TASKS, f"seed {seed}"
        done = wait_all_terminal(server.target, names)
        # Unfinished tasks came back at start (SQLite), or were claimed once the dead
        # holder's lease ended (PostgreSQL, shared by orchestrators: after the
        # resubmissions, which a store read answers at once).
        log = server.output()
        back = sum(int(n) for n in re.findall(r"recovered (\d+) unfinished", log))
        back += sum(int(n) for n in re.findall(r"claimed (\d+) unfinished", log))
        assert back > 0, f"nothing was left running: {log[-2000:]}"
        failed = [n for n, t in done.items() if t.state != task_pb2.TASK_STATE_SUCCEEDED]
        assert not failed, f"seed {seed}: {done[failed[0]]}"
        for task in done.values():
            for lost in task.attempts[:-1]:
                assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
                assert "lost" in lost.error.message
        for name, task in done.items():
            succeeded = [a for a in task.attempts if a.state == task_pb2.TASK_STATE_SUCCEEDED]
            assert len(succeeded) == 1, f"seed {seed}: {name} attempts {task.attempts}"
            assert task.attempts[-1].number == task.attempt
        # Results are right, not only present.
        for i in rng.sample(range(TASKS), 20):
            out = done[acked[request_ids[i]]].outputs[0]
            n = out.shape[0]
            got = np.frombuffer(out.data, np.float32).reshape(n, n)
            assert np.allclose(got, ((i % 7) + 1) ** 2 * n), f"seed {seed}"
        with grpc.insecure_channel(server.target, options=BIG) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            listed = stub.ListTasks(task_pb2.ListTasksRequest(page_size=1000)).tasks
            assert len(listed) == TASKS
    finally:
        serve_tools.stop_serve(server)


def test_reusing_a_request_id_for_another_task_is_invalid_argument(serve_tools, tmp_path):
    server = start(serve_tools, tmp_path, ["--state-dir", str(tmp_path / "s"), "--no-warmup"])
    try:
        with grpc.insecure_channel(server.target, options=BIG) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(1), request_id="same"))
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(2), request_id="same"))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "request_id" in err.value.details()
            bad = spec(3)
            bad.retry_policy.non_retryable_error_types.append("NOT_A_CODE")
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitTask(task_pb2.SubmitTaskRequest(task=bad))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "non_retryable_error_types[0]" in err.value.details()
    finally:
        serve_tools.stop_serve(server)


def serve_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kernelmesh.clients", "serve", "--port", "0", "--no-http", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")},
        check=False,
    )


def test_a_corrupt_state_dir_stops_the_start_with_the_reason(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite").write_bytes(json_format.MessageToJson(spec(1)).encode() * 10)
    done = serve_exit(tmp_path, "--state-dir", str(state), "--no-warmup")
    assert done.returncode != 0
    assert "state.sqlite" in done.stderr and "corrupt" in done.stderr


def test_postgres_down_at_start_stops_the_start_with_the_reason(tmp_path):
    done = serve_exit(tmp_path, "--store", "postgresql://km:pw@127.0.0.1:1/none", "--no-warmup")
    assert done.returncode != 0
    assert "cannot reach PostgreSQL" in done.stderr and "pw" not in done.stderr


def health_of(channel: grpc.Channel, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def wait_health(channel: grpc.Channel, status: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while health_of(channel) != status:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_postgres_dropping_mid_run_answers_unavailable_then_recovers(serve_tools, tmp_path):
    """No silent fallback to memory: while PostgreSQL refuses connections
    SubmitTask is UNAVAILABLE and readiness (grpc.health.v1) is NOT_SERVING;
    once it is back, submissions are accepted and journaled again, and SERVING."""
    from grpc_health.v1 import health_pb2
    from postgres_db import admin

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )

    dsn, name = create_database()
    args = ["--state-dir", str(tmp_path / "state"), "--no-warmup", "--store", dsn]
    server = start(serve_tools, tmp_path, args)
    try:
        with grpc.insecure_channel(server.target, options=BIG) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(1)), timeout=30)
            wait_health(channel, serving, "never SERVING with the database up")
            admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(2)), timeout=30)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "PostgreSQL" in err.value.details()
            wait_health(channel, not_serving, "still SERVING with the database refusing")
            task_service = "kernelmesh.v1.TaskService"
            assert health_of(channel, task_service) == not_serving
            admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            wait_health(channel, serving, "not SERVING again once the database was back")
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.SubmitTask(task_pb2.SubmitTaskRequest(task=spec(3)), timeout=30)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "PostgreSQL came back, the server did not"
                    time.sleep(0.2)
    finally:
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        serve_tools.stop_serve(server)
        drop_database(name)
