"""The `kernelmesh` command line against real server processes: demo, devices,
ops, run, graceful drain on SIGTERM, the HTTP sidecar, and a clear failure when
the port is taken."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest

from kernelmesh.clients import Client, TaskState

pytestmark = pytest.mark.e2e

GRACE = 20.0
DRAIN_PROBE_SIZE = 1200  # a matmul timed to size the long ones
DRAIN_TASK_SECONDS = 1.0  # each long matmul's kernel time
DRAIN_MAX_SIZE = 4000
DRAIN_MAX_LONG = 8
DRAIN_SMALL = 4  # tiny tasks queued behind the long ones


def test_demo_against_a_real_server_matches_numpy(served, kernelmesh):
    done = kernelmesh("demo", "--target", served.target, "--wait", "60", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all results match NumPy" in done.stdout
    with Client(served.target) as km:  # the README promises every op of the catalog
        ops_run = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
        assert {op.name for op in km.ops()} <= ops_run


def test_devices_lists_cpu0(served, kernelmesh):
    done = kernelmesh("devices", "--target", served.target)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "cpu:0"


def test_devices_reads_target_from_environment(served, kernelmesh, monkeypatch):
    monkeypatch.setenv("KERNELMESH_TARGET", served.target)
    done = kernelmesh("devices")
    assert done.returncode == 0, done.stderr
    assert "cpu:0" in done.stdout


def test_ops_lists_matmul(served, kernelmesh):
    done = kernelmesh("ops", "--target", served.target)
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if line and not line[0].isspace()]
    assert "matmul" in names


def test_run_matmul_from_npy_files_writes_numpy_answer(served, kernelmesh, tmp_path):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 30), dtype=np.float32)
    b = rng.standard_normal((30, 20), dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)

    done = kernelmesh(
        "run", "matmul", "-i", "a.npy", "-i", "b.npy", "-o", "c.npy",
        "--target", served.target, cwd=tmp_path,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCEEDED" in done.stdout and "wrote c.npy" in done.stdout
    c = np.load(tmp_path / "c.npy")
    assert c.dtype == np.float32 and c.shape == (40, 20)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)


def test_run_bad_input_exits_nonzero_with_field_and_no_traceback(served, kernelmesh, tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "b.npy", np.ones((4, 5), np.float32))
    done = kernelmesh(
        "run", "matmul", "-i", "a.npy", "-i", "b.npy", "--target", served.target, cwd=tmp_path
    )
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr
    assert "Traceback" not in done.stderr


# -- HTTP sidecar -------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def test_http_health_live_answers(served):
    status, _, body = http_get(served.http_port, "/health/live")
    assert status == 200 and json.loads(body) == {"status": "live"}


def test_http_health_ready_answers_once_serving(served):
    status, _, body = http_get(served.http_port, "/health/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}


def test_http_metrics_are_prometheus_text(served):
    with Client(served.target) as km:
        km.run("add", np.ones(4, np.float32), np.ones(4, np.float32))
    status, content_type, body = http_get(served.http_port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "# TYPE kernelmesh_tasks_total counter" in body
    assert 'kernelmesh_tasks_total{op="add",state="SUCCEEDED"}' in body


# -- port already in use ------------------------------------------------------


def _serve_expecting_failure(kernelmesh, *args: str) -> subprocess.CompletedProcess:
    try:
        return kernelmesh("serve", "--host", "127.0.0.1", "--no-warmup", *args, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"kernelmesh serve {' '.join(args)} hung instead of failing:\n{exc.output}")


def test_serve_on_grpc_port_in_use_fails_clearly(kernelmesh, busy_port):
    done = _serve_expecting_failure(kernelmesh, "--port", str(busy_port), "--http-port", "0")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output, output
    assert f"127.0.0.1:{busy_port}" in done.stderr, output


def test_serve_on_http_port_in_use_fails_clearly(kernelmesh, busy_port):
    done = _serve_expecting_failure(kernelmesh, "--port", "0", "--http-port", str(busy_port))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output, output
    assert str(busy_port) in done.stderr, output


# -- graceful drain on SIGTERM ------------------------------------------------


@dataclass
class Drain:
    returncode: int | None
    seconds: float
    output: str
    submitted: int
    queued_at_sigterm: int
    last_state_at_sigterm: TaskState
    watched: list[TaskState | str] = field(default_factory=list)


@pytest.fixture(scope="module")
def drained(tmp_path_factory, serve_tools) -> Drain:
    """A dedicated `serve --grace 20`. Long float64 matmuls (about
    DRAIN_TASK_SECONDS each) fill the CPU's workers and as many more wait; tiny
    tasks queue behind them, the last one watched; then the process gets SIGTERM.

    The long tasks hold the queue, not a flood of short ones: short tasks ran
    out faster than they were submitted (each submission commits to the journal,
    behind the 11 MiB outputs the finished ones store), and the queue was empty
    when SIGTERM came."""
    # CPU only: the tasks are sized to the CPU's speed, and must queue behind it.
    serve = serve_tools.start_serve(
        tmp_path_factory.mktemp("drain"), "--grace", str(GRACE), "--backends", "cpu"
    )
    try:
        with Client(serve.target, timeout=30.0) as km:
            km.wait_ready(timeout=120)
            rng = np.random.default_rng(5)
            probe = km.upload(rng.standard_normal((DRAIN_PROBE_SIZE, DRAIN_PROBE_SIZE)))
            # The fastest of a few runs: a first, cold run would size the tasks too small.
            one = max(min(km.run_task("matmul", probe, probe).run_seconds for _ in range(3)), 1e-3)
            scale = (DRAIN_TASK_SECONDS / one) ** (1 / 3)  # matmul time grows as n**3
            size = int(min(DRAIN_MAX_SIZE, max(DRAIN_PROBE_SIZE, DRAIN_PROBE_SIZE * scale)))
            km.delete(probe)
            # Inputs stay on the server, so submitting is far quicker than running.
            big = km.upload(rng.standard_normal((size, size)))
            handles = []
            while len(handles) < DRAIN_MAX_LONG:
                handles.append(km.submit("matmul", big, big))
                # Still queued a moment later: every worker is busy with a long one.
                if _stays(handles[-1], TaskState.QUEUED, seconds=min(0.5, DRAIN_TASK_SECONDS / 3)):
                    break
            # The running ones spent part of their run in that check. One more for
            # each running one but the first: as they end, their workers take the
            # queued long ones, so the tiny tasks still wait a whole long run.
            running = len(handles) - 1
            handles += [km.submit("matmul", big, big) for _ in range(running - 1)]
            tiny = np.arange(16.0).reshape(4, 4)
            handles += [km.submit("relu", tiny) for _ in range(DRAIN_SMALL)]
            watched: list[TaskState | str] = []
            watching = threading.Event()

            def watch() -> None:
                try:
                    for event in handles[-1].events(timeout=GRACE + 10):
                        watched.append(event.state)
                        watching.set()
                except Exception as exc:  # recorded: the tests read `watched`
                    watched.append(repr(exc))
                finally:
                    watching.set()

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            assert watching.wait(10), "WatchTask did not start"
            queued = sum(1 for _ in km.list_tasks(state=TaskState.QUEUED))
            last_state = km.get_task(handles[-1].name).state

            serve.process.send_signal(signal.SIGTERM)
            began = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.process.wait(GRACE + 10)
            seconds = time.monotonic() - began
            watcher.join(5)
        return Drain(
            returncode=serve.process.returncode,
            seconds=seconds,
            output=serve.output(),
            submitted=len(handles),
            queued_at_sigterm=queued,
            last_state_at_sigterm=last_state,
            watched=watched,
        )
    finally:
        serve_tools.stop_serve(serve, timeout=5)


def _stays(handle, state: TaskState, seconds: float) -> bool:
    """Whether the task is still in `state` after `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if handle.info().state is not state:
            return False
        time.sleep(0.02)
    return True


def test_sigterm_with_queued_tasks_exits_zero_within_grace(drained):
    assert drained.queued_at_sigterm >= 2, drained
    assert drained.returncode == 0, drained.output
    assert drained.seconds < GRACE, f"took {drained.seconds:.1f}s"


def test_sigterm_prints_draining_then_stopped(drained):
    lines = drained.output.splitlines()
    draining = next(i for i, line in enumerate(lines) if "draining" in line)
    stopped = next(i for i, line in enumerate(lines) if "stopped" in line)
    assert draining < stopped
    assert "Traceback" not in drained.output


def test_sigterm_lets_queued_tasks_finish(drained):
    assert drained.last_state_at_sigterm is TaskState.QUEUED, drained
    assert drained.watched[-1] is TaskState.SUCCEEDED, drained.watched
