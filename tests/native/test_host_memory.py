"""The server keeps freed bulk buffers for reuse instead of faulting fresh pages in."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kernelmesh.native import host_memory

resource = pytest.importorskip("resource")

ROUNDS = 10
SIDE = 1024  # a 1024x1024 float32 matmul: 4 MiB per tensor


def _minor_faults_per_call(pool: ThreadPoolExecutor) -> float:
    """A RunTask's buffers: the request, a decoded input, the output (allocated by a
    kernel thread, so in another malloc arena) and the reply."""
    a = np.ones((SIDE, SIDE), np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        request = a.tobytes() + a.tobytes()
        x = np.frombuffer(request, np.float32)[: a.size].copy()
        out = pool.submit(np.multiply, x, 2).result()
        reply = out.tobytes()
        del request, x, out, reply
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / ROUNDS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    if not host_memory.retain_freed_memory():
        pytest.skip("this libc has no mallopt (not glibc)")
    assert host_memory.retain_freed_memory()  # idempotent
    with ThreadPoolExecutor(1) as pool:
        _minor_faults_per_call(pool)  # the heaps grow once to hold the buffers
        faults = _minor_faults_per_call(pool)
    # 16 MiB of fresh buffers per call is 4096 pages: glibc's defaults fault in about
    # all of them again on every call (measured: 4064)
    assert faults < 400


def test_the_environment_can_keep_glibcs_defaults(monkeypatch):
    monkeypatch.setattr(host_memory, "_done", False)
    monkeypatch.setenv(host_memory.ENV, "0")
    assert host_memory.retain_freed_memory() is False
