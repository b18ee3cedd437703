"""Real `kernelmesh orchestrator` and `kernelmesh node` processes on loopback
for the mesh tests: start them on free ports, wait for a condition, stop them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, task_pb2, tensor_pb2

_PORT = re.compile(r"serving gRPC on [\d.]+:(\d+)")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


@dataclass
class Procs:
    tmp_path: Path
    started: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        *args: str,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        port: int = 0,
    ) -> Proc:
        log = self.tmp_path / f"{name}-{time.monotonic_ns()}.log"
        handle = log.open("w")
        cmd = [
            sys.executable,
            "-m",
            "kernelmesh.clients",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-http",
            "--no-warmup",
        ]
        process = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_path,
            env={
                **os.environ,
                "XDG_STATE_HOME": str(self.tmp_path / "xdg-state"),
                **(env or {}),
            },
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _PORT.search(log.read_text())
            if match:
                proc = Proc(name, process, int(match.group(1)), log)
                self.started.append(proc)
                return proc
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
            time.sleep(0.05)
        process.kill()
        raise TimeoutError(f"{name} did not start:\n{log.read_text()}")

    def orchestrator(
        self,
        *args: str,
        name: str = "orchestrator",
        env: dict[str, str] | None = None,
        port: int = 0,
    ) -> Proc:
        return self.start(name, "orchestrator", *args, env=env, port=port)

    def node(self, name: str, join: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.start(name, "node", "--name", name, "--join", join, *args, env=env)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGCONT)
                proc.process.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.process.wait(20)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()


def wait_for(check: Callable[[], object], timeout: float = 60.0, what: str = "") -> object:
    """Polls `check` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")


def list_nodes(target: str) -> list[orchestrator_pb2.Node]:
    with grpc.insecure_channel(target) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return list(stub.ListNodes(orchestrator_pb2.ListNodesRequest(), timeout=10).nodes)


def ready_nodes(target: str) -> set[str]:
    return {
        n.name.removeprefix("nodes/")
        for n in list_nodes(target)
        if n.state == orchestrator_pb2.NODE_STATE_READY
    }


def add_request(x: np.ndarray) -> task_pb2.RunTaskRequest:
    """RunTask of float32 `x + x`, its inputs inline."""
    spec = task_pb2.TaskSpec(op="add")
    for _ in range(2):
        spec.inputs.add().tensor.CopyFrom(
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes())
        )
    return task_pb2.RunTaskRequest(task=spec)
