"""A Node.js @grpc/grpc-js client (tests/e2e/node/client.js) that loads the
.proto files at run time calls a real `kernelmesh serve`; its JSON output is
checked against NumPy here."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parent / "node"
REPO = NODE_DIR.parents[2]
NODE = shutil.which("node")
NPM_CI_TIMEOUT = 300
LENGTH = 1000

if NODE is None:
    pytest.skip("node (Node.js) is not on PATH", allow_module_level=True)


def _ensure_node_modules() -> None:
    """`npm ci --prefix tests/e2e/node` when the modules are not installed."""
    needed = [NODE_DIR / "node_modules" / "@grpc" / p for p in ("grpc-js", "proto-loader")]
    if all(p.is_dir() for p in needed):
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"node is installed but npm is not, and {NODE_DIR}/node_modules is missing")
    try:
        done = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm ci --prefix {NODE_DIR} took more than {NPM_CI_TIMEOUT}s")
    if done.returncode != 0:
        pytest.fail(f"npm ci --prefix {NODE_DIR} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return (
        rng.standard_normal(LENGTH, dtype=np.float32),
        rng.standard_normal(LENGTH, dtype=np.float32),
    )


@pytest.fixture(scope="module")
def node_output(served, vectors) -> dict:
    """Runs client.js once against the shared server; returns its JSON."""
    _ensure_node_modules()
    a, b = vectors
    request = {
        "target": served.target,
        "a": base64.b64encode(a.astype("<f4").tobytes()).decode(),
        "b": base64.b64encode(b.astype("<f4").tobytes()).decode(),
        "length": LENGTH,
    }
    done = subprocess.run(
        [NODE, str(NODE_DIR / "client.js")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
        check=False,
    )
    assert done.returncode == 0, f"client.js failed:\n{done.stderr}"
    return json.loads(done.stdout)


def test_node_client_lists_the_cpu_device(node_output):
    assert {"name": "cpu:0", "kind": "DEVICE_KIND_CPU"}.items() <= node_output["devices"][0].items()
    assert node_output["devices"][0]["model"]


def test_node_client_add_of_float32_buffers_matches_numpy(node_output, vectors):
    a, b = vectors
    task = node_output["add"]
    assert task["state"] == "TASK_STATE_SUCCEEDED"
    assert task["name"].startswith("tasks/") and task["device"] == "cpu:0"
    (out,) = task["outputs"]
    assert out["dtype"] == "DTYPE_FLOAT32"
    assert [int(d) for d in out["shape"]] == [LENGTH]  # int64 arrive as strings (longs: String)
    got = np.frombuffer(base64.b64decode(out["data"]), dtype="<f4")
    np.testing.assert_array_equal(got, a + b)


def test_node_client_gets_invalid_argument_with_bad_request_details(node_output):
    invalid = node_output["invalid"]
    assert invalid["code"] == code_pb2.INVALID_ARGUMENT
    assert invalid["status_details_bin"], "no grpc-status-details-bin trailer"
    status = status_pb2.Status.FromString(base64.b64decode(invalid["status_details_bin"]))
    assert status.code == code_pb2.INVALID_ARGUMENT
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert fields == ["task.inputs[0].tensor.data"]
