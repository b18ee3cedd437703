"""Long fuzz runs against a real `kernelmesh serve` process.

Every request message of every kernelmesh.v1 service, structured from its
descriptor or mutated byte by byte from a valid request (tests/fuzz/wire.py),
sent over loopback. Prints the count of each status, cases per second and the
server's RSS before and after; exits 1 when the rule breaks: an INTERNAL or
UNKNOWN answer, a unary call past its deadline, the server gone, a traceback
in its log, or RSS more than 10% above where it started.

    .venv/bin/python benchmarks/fuzz.py                   # 10,000+ cases
    .venv/bin/python benchmarks/fuzz.py --cases 50000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
import wire  # noqa: E402


def start_server(log_path: Path) -> tuple[subprocess.Popen, int]:
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kernelmesh.clients", "serve", "--host", "127.0.0.1"),
            *("--port", "0", "--no-http", "--no-warmup", "--log-level", "WARNING"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"serving gRPC on [\d.]+:(\d+)", log_path.read_text())
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("the server did not start")


def run(channel: grpc.Channel, tally: wire.Tally, method: wire.Method, n: int) -> None:
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(wire.requests(method))
    def case(items: list[bytes]) -> None:
        code, details = wire.call(channel, method, items)
        tally.add(method, code, details, items)

    case()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="at least this many cases")
    args = parser.parse_args()
    methods = wire.methods()
    per_method = max(1, -(-args.cases // len(methods)))
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        proc, port = start_server(log_path)
        server = psutil.Process(proc.pid)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
                warm = wire.Tally()
                for method in methods:
                    run(channel, warm, method, 20)
                before = server.memory_info().rss
                tally = wire.Tally()
                began = time.perf_counter()
                for method in methods:
                    run(channel, tally, method, per_method)
                    print(f"  {method.path:<55} {tally.cases:>7} cases", flush=True)
                seconds = time.perf_counter() - began
                after = server.memory_info().rss
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        output = log_path.read_text()
    failures = warm.failures + tally.failures
    print(f"\nfuzz: {tally.cases} cases over {len(methods)} methods in {seconds:.1f} s")
    print(f"cases/s: {tally.cases / seconds:.0f}   (load average {os.getloadavg()[0]:.1f})")
    print(f"{'status':<22}{'count':>8}")
    for code, count in tally.codes.most_common():
        print(f"{code:<22}{count:>8}")
    if tally.slow:
        print(f"server streams cut by the deadline: {dict(tally.slow)}")
    growth = after / before - 1
    print(
        f"server RSS: {before / 2**20:.0f} MiB before, "
        f"{after / 2**20:.0f} MiB after ({growth:+.1%})"
    )
    broken = []
    if failures:
        broken.append(f"{len(failures)} bad answers, first: " + "\n  ".join(failures[:10]))
    if not alive:
        broken.append("the server exited")
    if "Traceback" in output:
        broken.append("the server logged a traceback:\n" + output[-3000:])
    if growth > 0.10:
        broken.append(f"RSS grew {growth:.1%} (more than 10%)")
    print("RULE: " + ("PASS" if not broken else "FAIL\n" + "\n".join(broken)))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
