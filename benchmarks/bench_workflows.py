"""Workflow overhead, each figure next to a baseline measured in the same run.

    python benchmarks/bench_workflows.py            # SQLite state (the default of serve)
    python benchmarks/bench_workflows.py --store memory
    python benchmarks/bench_workflows.py --quick

  chain   a chain of 100 tiny steps (relu on 16 float32, each on the previous
          output) as one workflow, submit to end, vs 100 sequential RunTask calls
          from a client feeding each result into the next call. Target: the
          workflow is faster (no client round trip between steps), ratio < 1.
  fanout  500 independent tiny steps in one workflow: steps per second, submit
          to end (reported; baseline: the same 500 RunTask calls one after another).

The server is a real `kernelmesh serve` subprocess on 127.0.0.1; the client
runs in this process. Each figure is the best of several rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kernelmesh.clients import Client


def start_serve(state: Path, store: str) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable, "-m", "kernelmesh.clients", "serve", "--host", "127.0.0.1",
        "--port", "0", "--no-http", "--no-warmup", "--state-dir", str(state),
    ]  # fmt: skip
    if store == "memory":
        cmd += ["--store", "memory"]
    log = state.parent / "serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"serving gRPC on [\d.]+:(\d+)", log.read_text())
        if found:
            return proc, f"127.0.0.1:{found.group(1)}"
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(log.read_text())


def chain_spec(n: int) -> dict:
    steps = [{"id": "s0", "task": {"op": "relu", "inputs": ["${inputs.x}"]}}]
    for i in range(1, n):
        steps.append(
            {"id": f"s{i}", "task": {"op": "relu", "inputs": [f"${{s{i - 1}.outputs[0]}}"]}}
        )
    return {"steps": steps}


def fan_spec(n: int) -> dict:
    return {
        "steps": [
            {"id": f"s{i}", "task": {"op": "relu", "inputs": ["${inputs.x}"]}} for i in range(n)
        ]
    }


def timed_workflow(km: Client, spec: dict, x: np.ndarray) -> float:
    began = time.perf_counter()
    info = km.workflows.submit(spec, {"x": x})
    final = km.workflows.wait(info.name, timeout=600)
    took = time.perf_counter() - began
    assert final.state.name == "SUCCEEDED", final.error_message
    return took


def timed_run_tasks(km: Client, n: int, x: np.ndarray, *, chained: bool) -> float:
    began = time.perf_counter()
    value = x
    for _ in range(n):
        out = km.run("relu", value)
        if chained:
            value = out
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 5
    chain_n, fan_n = 100, 500
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_serve(Path(tmp) / "state", args.store)
        try:
            with Client(target, timeout=600) as km:
                km.wait_ready(timeout=120)
                km.run("relu", x)  # compile and warm the path once
                timed_workflow(km, chain_spec(3), x)
                wf_chain = min(timed_workflow(km, chain_spec(chain_n), x) for _ in range(rounds))
                rpc_chain = min(
                    timed_run_tasks(km, chain_n, x, chained=True) for _ in range(rounds)
                )
                wf_fan = min(
                    timed_workflow(km, fan_spec(fan_n), x) for _ in range(max(1, rounds // 2))
                )
                rpc_fan = min(
                    timed_run_tasks(km, fan_n, x, chained=False) for _ in range(max(1, rounds // 2))
                )
        finally:
            proc.terminate()
            proc.wait(60)
    cores = os.cpu_count()
    print(f"kernelmesh workflows, store={args.store}, {cores} CPUs, best of {rounds} rounds")
    print(f"{'figure':<44}{'kernelmesh':>14}{'baseline':>14}{'ratio':>9}  target")
    print(
        f"{'chain of 100 tiny steps (s)':<44}{wf_chain:>14.4f}{rpc_chain:>14.4f}"
        f"{wf_chain / rpc_chain:>9.2f}  < 1 (baseline: 100 sequential RunTask)"
    )
    print(
        f"{'per-step overhead in a chain (ms)':<44}{wf_chain / chain_n * 1e3:>14.3f}"
        f"{rpc_chain / chain_n * 1e3:>14.3f}{wf_chain / rpc_chain:>9.2f}"
    )
    print(
        f"{'fan-out of 500 steps (steps/s)':<44}{fan_n / wf_fan:>14.0f}{fan_n / rpc_fan:>14.0f}"
        f"{(fan_n / wf_fan) / (fan_n / rpc_fan):>9.2f}  reported (baseline: 500 sequential RunTask)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
