"""The fuzz suite, CI-sized: every request message of every kernelmesh.v1
service, structured from its descriptor or mutated byte by byte from a valid
request, sent to a real `kernelmesh serve` process. No answer may be INTERNAL
or UNKNOWN, no unary call may hang, the server must not crash, log a traceback
or keep the memory (RSS back within 10%). benchmarks/fuzz.py runs the same for
longer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import wire

pytestmark = pytest.mark.e2e

# Cases per method: 35 methods x 100 = about 3,500 cases (KERNELMESH_FUZZ_CASES overrides).
CASES_PER_METHOD = int(os.environ.get("KERNELMESH_FUZZ_CASES", "100"))
WARMUP_PER_METHOD = 15


def run_cases(
    channel: grpc.Channel,
    tally: wire.Tally,
    method: wire.Method,
    n: int,
    keys: list[tuple[tuple[str, str], ...]] | None = None,
    strategy: st.SearchStrategy[list[bytes]] | None = None,
) -> None:
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(wire.requests(method) if strategy is None else strategy, st.sampled_from(keys or [()]))
    def case(items: list[bytes], metadata: tuple[tuple[str, str], ...]) -> None:
        code, details = wire.call(channel, method, items, metadata)
        tally.add(method, code, details, items)

    case()


def test_no_request_gets_internal_unknown_a_hang_or_a_crash(tmp_path, serve_tools):
    proc = serve_tools.start_serve(tmp_path, "--no-warmup")
    try:
        server = psutil.Process(proc.process.pid)
        methods = wire.methods()
        assert len(methods) >= 35  # every RPC of the four services, health, reflection
        with grpc.insecure_channel(proc.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            warm = wire.Tally()
            for method in methods:  # fills caches and pools before memory is measured
                run_cases(channel, warm, method, WARMUP_PER_METHOD)
            before = server.memory_info().rss
            tally = wire.Tally()
            began = time.monotonic()
            for method in methods:
                run_cases(channel, tally, method, CASES_PER_METHOD)
            seconds = time.monotonic() - began
            after = server.memory_info().rss
        failures = warm.failures + tally.failures
        print(
            f"\nfuzz: {tally.cases} cases in {seconds:.1f}s ({tally.cases / seconds:.0f}/s); "
            f"{dict(tally.codes.most_common())}; deadlines {dict(tally.slow)}; "
            f"RSS {before >> 20} -> {after >> 20} MiB"
        )
        assert not failures, "\n".join(failures[:20])
        assert proc.process.poll() is None, "the server exited"
        assert after <= before * 1.10, f"RSS grew from {before >> 20} to {after >> 20} MiB"
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        serve_tools.stop_serve(proc)


def test_extreme_params_never_get_internal_or_unknown(tmp_path, serve_tools):
    """Valid calls with each declared param set to int64's ends, 1e300 and lists of
    them (a conv2d stride of 1e300 once reached the kernel and came back INTERNAL)."""
    proc = serve_tools.start_serve(tmp_path, "--no-warmup")
    try:
        chosen = [m for m in wire.methods() if m.path.startswith("/kernelmesh.v1.TaskService/")]
        chosen = [
            m for m in chosen if m.descriptor.name in ("RunTask", "SubmitTask", "StreamTasks")
        ]
        assert len(chosen) == 3
        with grpc.insecure_channel(proc.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            tally = wire.Tally()
            for method in chosen:
                run_cases(
                    channel, tally, method, CASES_PER_METHOD, strategy=wire.extreme_requests(method)
                )
        print(f"\nextreme params: {tally.cases} cases; {dict(tally.codes.most_common())}")
        assert not tally.failures, "\n".join(tally.failures[:20])
        assert tally.codes["INVALID_ARGUMENT"] > 0
        assert proc.process.poll() is None, "the server exited"
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        serve_tools.stop_serve(proc)


def test_with_auth_on_no_request_gets_internal_unknown_or_a_hang(tmp_path, serve_tools):
    """The same rule through the auth interceptor: a valid admin or user key, a
    key that does not exist, a malformed header, or none."""
    state = tmp_path / "state"
    proc = serve_tools.start_serve(tmp_path, "--no-warmup", "--auth", "--state-dir", str(state))
    try:
        admin = (state / "bootstrap-admin.key").read_text().strip()
        keys = [
            (("authorization", f"Bearer {admin}"),),
            (("authorization", "Bearer kmk_" + "A" * 43),),
            (("authorization", "Basic Zm9vOmJhcg=="),),
            (("authorization", "Bearer"),),
            (),
        ]
        with grpc.insecure_channel(proc.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            tally = wire.Tally()
            for method in wire.methods():
                run_cases(channel, tally, method, max(10, CASES_PER_METHOD // 5), keys)
        print(f"\nfuzz with auth: {tally.cases} cases; {dict(tally.codes.most_common())}")
        assert not tally.failures, "\n".join(tally.failures[:20])
        assert tally.codes["UNAUTHENTICATED"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0
        assert proc.process.poll() is None, "the server exited"
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        serve_tools.stop_serve(proc)
