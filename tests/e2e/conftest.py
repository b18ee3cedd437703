"""Fixtures for the end-to-end tests: the shared real server once it reports
SERVING, the `kernelmesh` command line, and a loopback port already taken."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kernelmesh.clients import Client

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def serve_tools(pytestconfig: pytest.Config) -> ModuleType:
    """tests/conftest.py, as pytest loaded it: `start_serve(tmp_path, *args)`
    and `stop_serve(proc)`. (`import conftest` is ambiguous when several test
    folders have a conftest.py.)"""
    root = TESTS / "conftest.py"
    for plugin in pytestconfig.pluginmanager.get_plugins():
        if (
            isinstance(plugin, ModuleType)
            and Path(getattr(plugin, "__file__", "")).resolve() == root
        ):
            return plugin
    raise LookupError(f"{root} is not loaded as a conftest")


@pytest.fixture(scope="session")
def served(serve_process):
    """The shared `kernelmesh serve` process, kernels warmed up."""
    with Client(serve_process.target, timeout=10.0) as km:
        km.wait_ready(timeout=120.0)
    return serve_process


def kernelmesh_command() -> list[str]:
    """The installed console script next to this interpreter, else `-m`."""
    script = BIN / "kernelmesh"
    if script.exists():
        return [str(script)]
    found = shutil.which("kernelmesh")
    return [found] if found else [sys.executable, "-m", "kernelmesh.clients"]


@pytest.fixture(scope="session")
def kernelmesh() -> Callable[..., subprocess.CompletedProcess]:
    """Runs `kernelmesh ARGS...` to completion and returns the finished process
    (text stdout and stderr); raises on timeout."""

    def run(
        *args: str, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*kernelmesh_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ},
            check=False,
        )

    return run


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket is bound to and listening on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
