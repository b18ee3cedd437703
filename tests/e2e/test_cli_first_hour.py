"""The `kernelmesh` command as a new user meets it, through real subprocesses:
no server running, a server that comes up late, a device kind that does not
exist, a file that is not .npy, an op name with a typo, where the target comes
from, the caches, and progress on big inputs."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from kernelmesh.clients.cli import UPLOAD_ABOVE_BYTES

pytestmark = pytest.mark.e2e

CLIENT_COMMANDS = (
    ("devices",),
    ("ops",),
    ("run",),
    ("demo",),
    ("llm", "chat"),
    ("llm", "models"),
    ("llm", "embed"),
    ("task", "get"),
    ("task", "list"),
    ("workflow", "run"),
    ("workflow", "list"),
    ("nodes",),
    ("drain",),
)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [("demo",), ("devices",), ("run", "relu")])
def test_no_server_fails_fast_with_where_and_what_to_do(kernelmesh, command):
    target = f"127.0.0.1:{free_port()}"
    began = time.monotonic()
    done = kernelmesh(*command, "--target", target, "--wait", "2", timeout=60)
    seconds = time.monotonic() - began

    assert done.returncode == 1
    assert seconds < 20, f"took {seconds:.1f}s"
    assert f"waiting for kernelmesh at {target}" in done.stderr
    assert f"no kernelmesh server answered at {target}" in done.stderr
    assert "kernelmesh serve" in done.stderr
    assert "Traceback" not in done.stderr


def test_default_wait_is_a_few_seconds(kernelmesh):
    began = time.monotonic()
    done = kernelmesh("devices", "--target", f"127.0.0.1:{free_port()}", timeout=60)
    assert done.returncode == 1
    assert time.monotonic() - began < 20


def test_waits_for_a_server_that_starts_later(kernelmesh, serve_tools, tmp_path):
    port = free_port()
    result: dict[str, subprocess.CompletedProcess] = {}
    waiter = threading.Thread(
        target=lambda: result.setdefault(
            "done",
            kernelmesh("devices", "--target", f"127.0.0.1:{port}", "--wait", "90", timeout=150),
        )
    )
    waiter.start()
    serve = serve_tools.start_serve(tmp_path, "--port", str(port), "--no-warmup")
    try:
        waiter.join(timeout=150)
    finally:
        serve_tools.stop_serve(serve)
    done = result["done"]
    assert done.returncode == 0, done.stderr
    assert f"waiting for kernelmesh at 127.0.0.1:{port}" in done.stderr
    assert done.stdout.split()[0] == "cpu:0"


def test_unknown_device_kind_is_a_usage_error_without_traceback(kernelmesh, tmp_path):
    np.save(tmp_path / "x.npy", np.ones(4, np.float32))
    done = kernelmesh("run", "relu", "-i", "x.npy", "-d", "gpu", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown device kind 'gpu'" in done.stderr
    assert "cpu, cuda, opencl or metal" in done.stderr
    assert "Traceback" not in done.stderr


def test_input_that_is_not_npy_is_a_usage_error_without_traceback(kernelmesh, tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n")
    done = kernelmesh("run", "relu", "-i", "x.csv", cwd=tmp_path)
    assert done.returncode == 2
    assert "x.csv is not a NumPy .npy file" in done.stderr
    assert "numpy.save" in done.stderr
    assert "Traceback" not in done.stderr


def test_npz_input_says_to_save_arrays_one_by_one(kernelmesh, tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    done = kernelmesh("run", "relu", "-i", "x.npz", cwd=tmp_path)
    assert done.returncode == 2
    assert ".npz archive" in done.stderr and "Traceback" not in done.stderr


def test_server_error_is_printed_once_with_a_suggestion(served, kernelmesh, tmp_path):
    np.save(tmp_path / "x.npy", np.ones(4, np.float32))
    done = kernelmesh("run", "rleu", "-i", "x.npy", "--target", served.target, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("is unknown") == 1, done.stderr
    assert "INVALID_ARGUMENT" in done.stderr
    assert "task.op:" in done.stderr
    assert "did you mean 'relu'" in done.stderr


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=" ".join)
def test_every_client_command_documents_its_environment(kernelmesh, command):
    done = kernelmesh(*command, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # click wraps lines anywhere
    assert "KERNELMESH_TARGET" in text
    assert "--wait" in text


def test_top_level_help_names_the_target_variable(kernelmesh):
    done = kernelmesh("--help")
    assert "KERNELMESH_TARGET" in done.stdout


def test_cache_info_shows_numbas_cache_too(tmp_path):
    env = {
        "KERNELMESH_CACHE_DIR": str(tmp_path / "kernels"),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "kernelmesh.clients", "cache", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    numba_line = next(line for line in done.stdout.splitlines() if line.startswith("numba:"))
    assert str(tmp_path / "numba") in numba_line
    assert "0 kernels" in " ".join(done.stdout.split())


def test_run_with_a_big_input_says_what_it_sends_and_receives(served, kernelmesh, tmp_path):
    x = np.linspace(-1, 1, UPLOAD_ABOVE_BYTES // 4 + 1024, dtype=np.float32)
    np.save(tmp_path / "big.npy", x)
    done = kernelmesh(
        "run", "relu", "-i", "big.npy", "-o", "out.npy", "--target", served.target,
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "uploading big.npy (32.0 MiB)" in done.stderr
    assert "received 32.0 MiB of result" in done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.maximum(x, 0))


def test_result_of_a_submitted_task_too_big_for_an_event_still_arrives(served):
    """The last WatchTask event leaves out outputs over 1 MiB; the client's
    handle then reads them with GetTask."""
    from kernelmesh.clients import Client

    x = np.linspace(-1, 1, 1 << 19, dtype=np.float32).reshape(512, 1024)  # 2 MiB
    with Client(served.target) as km:
        handle = km.submit("relu", x)
        events = list(handle.events(timeout=60))
        assert events[-1].task is None and "GetTask" in events[-1].message
        np.testing.assert_array_equal(handle.result(timeout=60), np.maximum(x, 0))
