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

import pytest
from mesh_procs import Procs
from postgres_db import create_database, drop_database

BIN = Path(sys.executable).parent


def kernelmesh_command() -> list[str]:
    """The installed console script next to this interpreter, else `-m`."""
    script = BIN / "kernelmesh"
    if script.exists():
        return [str(script)]
    found = shutil.which("kernelmesh")
    return [found] if found else [sys.executable, "-m", "kernelmesh.clients"]


@pytest.fixture(scope="session")
def kernelmesh(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `kernelmesh ARGS...` to completion and returns the finished process
    (text stdout and stderr); raises on timeout. `serve`'s default state dir is
    a temporary one."""
    state_home = str(tmp_path_factory.mktemp("xdg-state"))

    def run(
        *args: str, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*kernelmesh_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, "XDG_STATE_HOME": state_home},
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


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real orchestrator and node processes for one test, stopped after it."""
    found = Procs(tmp_path)
    yield found
    found.stop_all()


@pytest.fixture
def dsn() -> Iterator[str]:
    """A URL of a fresh PostgreSQL database, dropped after the test."""
    found, name = create_database()
    if not found.startswith("postgresql://"):  # libpq's PG* variables: no host in the URL
        found = "postgresql:///" + name
    yield found
    drop_database(name)
