"""Accelerator backends through real `kernelmesh serve` processes: the devices the
CLI lists, a task pinned to OpenCL, and the compile cache hit on restart."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from kernelmesh.clients import Client
from kernelmesh.native import compile_cache, opencl

pytestmark = pytest.mark.e2e

_reason = opencl.available()
needs_opencl = pytest.mark.skipif(_reason is not None, reason=f"no OpenCL device: {_reason}")


@needs_opencl
def test_devices_lists_the_cpu_and_the_opencl_device(served, kernelmesh):
    done = kernelmesh("devices", "--target", served.target)
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert names[0] == "cpu:0" and "opencl:0" in names


@needs_opencl
def test_the_python_client_runs_on_opencl_when_asked(served):
    a = np.random.default_rng(5).standard_normal((64, 48), dtype=np.float32)
    with Client(served.target) as km:
        task = km.run_task("matmul", a, a.T.copy(), device="opencl")
    assert task.device == "opencl:0"
    np.testing.assert_allclose(task.outputs[0], a @ a.T, rtol=1e-4, atol=1e-4)


@needs_opencl
def test_a_restart_compiles_no_kernel(serve_tools, tmp_path):
    # Start from a copy of this machine's cache, so the test does not pay a cold
    # compile of every program; the first start fills in whatever is missing.
    cache = tmp_path / "kernels"
    source = compile_cache.default_directory()
    if source.is_dir():
        shutil.copytree(source, cache)
    env = {"KERNELMESH_CACHE_DIR": str(cache)}
    counts = re.compile(r"compile cache .*: (\d+) kernels loaded, (\d+) compiled")
    seen = []
    for _ in range(2):
        serve = serve_tools.start_serve(tmp_path, "--backends", "cpu,opencl", env=env)
        try:
            with Client(serve.target, timeout=10.0) as km:
                km.wait_ready(timeout=240.0)
        finally:
            serve_tools.stop_serve(serve)
        match = counts.search(serve.output())
        assert match, serve.output()
        seen.append((int(match.group(1)), int(match.group(2))))
    loaded, compiled = seen[1]
    assert compiled == 0 and loaded > 0, seen
