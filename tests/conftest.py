"""Shared fixtures: an in-process server on a loopback port, and a real
`kernelmesh serve` process for end-to-end tests."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from kernelmesh.core.config import ServerConfig
from kernelmesh.core.ops import Limits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server_config() -> ServerConfig:
    """Loopback, free ports, no kernel warm-up (kernels compile on first use
    and Numba's on-disk cache makes that fast after the first run)."""
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        http_port=0,
        warmup=False,
        grace_seconds=5.0,
        limits=Limits(max_elements=1 << 22, max_total_elements=1 << 24),
    )


@pytest.fixture
async def start_server() -> AsyncIterator:
    """Starts in-process servers from configs; each is stopped after the test."""
    from kernelmesh.services.server import Server

    started: list[Server] = []

    async def start(config: ServerConfig) -> Server:
        srv = Server(config)
        await srv.start()
        started.append(srv)
        await srv.wait_started()
        return srv

    yield start
    for srv in started:
        await srv.stop(grace=1.0)


@pytest.fixture
async def server(server_config: ServerConfig, start_server):
    return await start_server(server_config)


@pytest.fixture
async def channel(server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@dataclass
class ServeProcess:
    process: subprocess.Popen
    port: int
    http_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()


def start_serve(
    tmp_path: Path, *extra: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> ServeProcess:
    """Starts `kernelmesh serve` on free loopback ports and waits until it
    reports the ports it bound."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    handle = log.open("w")
    cmd = [
        sys.executable,
        "-m",
        "kernelmesh.clients",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        # Durable state goes to the test's own directory unless --state-dir says otherwise.
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg-state"), **(env or {})},
    )
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"serving gRPC on [\d.]+:(\d+), HTTP on [\d.]+:(\d+)")
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text())
        if match:
            return ServeProcess(proc, int(match.group(1)), int(match.group(2)), log)
        if proc.poll() is not None:
            raise RuntimeError(
                f"kernelmesh serve exited with {proc.returncode}:\n{log.read_text()}"
            )
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"kernelmesh serve did not start:\n{log.read_text()}")


def stop_serve(serve: ServeProcess, timeout: float = 30.0) -> int:
    if serve.process.poll() is None:
        serve.process.send_signal(signal.SIGTERM)
        try:
            serve.process.wait(timeout)
        except subprocess.TimeoutExpired:
            serve.process.kill()
            serve.process.wait()
    return serve.process.returncode


@pytest.fixture(scope="session")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One real server process shared by the client and e2e tests."""
    proc = start_serve(tmp_path_factory.mktemp("serve"))
    try:
        yield proc
    finally:
        stop_serve(proc)


@pytest.fixture(scope="session")
def served(serve_process):
    """The shared `kernelmesh serve` process, kernels warmed up."""
    from kernelmesh.clients import Client

    with Client(serve_process.target, timeout=10.0) as km:
        km.wait_ready(timeout=120.0)
    return serve_process


@pytest.fixture(scope="session")
def serve_tools() -> SimpleNamespace:
    """`start_serve(tmp_path, *args)` and `stop_serve(proc)` for tests in other
    folders (`import conftest` is ambiguous when several folders have one)."""
    return SimpleNamespace(start_serve=start_serve, stop_serve=stop_serve)


def replace(config: ServerConfig, **changes: object) -> ServerConfig:
    return dataclasses.replace(config, **changes)
