"""The contract lints clean, layers only import downward, and generated code
is never committed."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each layer may import of kernelmesh (ARCHITECTURE.md, "The layout").
ALLOWED = {
    "native": set(),
    "core": {"native"},
    "services": {"core", "native", "v1"},
    "clients": {"v1", "clients"},
}


def _kernelmesh_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kernelmesh" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_downward(layer: str) -> None:
    offenders = {}
    for path in sorted((ROOT / layer).rglob("*.py")):
        bad = _kernelmesh_imports(path) - ALLOWED[layer] - {layer}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"upward or sideways imports: {offenders}"


def test_generated_code_is_not_committed() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    generated = [p for p in tracked if p.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", ".so"))]
    generated += [p for p in tracked if p.startswith("native/") and p.endswith((".c", ".cpp"))]
    assert generated == []


def _tracked_changes() -> str:
    """`git status` of tracked files only (untracked build outputs are ignored)."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_contract_passes_buf_lint_and_leaves_the_checkout_clean() -> None:
    """buf is installed outside the checkout (.ci/buf), so the lint step of the
    suite never rewrites the tracked proto/package-lock.json nor adds
    proto/node_modules."""
    if shutil.which("npm") is None:
        pytest.skip("npm is absent, so buf cannot be installed here")
    git = (ROOT / ".git").exists() and shutil.which("git") is not None
    before = _tracked_changes() if git else ""
    had_modules = (ROOT / "proto" / "node_modules").exists()
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "buf"), "lint"],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert had_modules or not (ROOT / "proto" / "node_modules").exists()
    if git:
        assert _tracked_changes() == before


def test_every_service_of_the_architecture_is_declared() -> None:
    from kernelmesh.v1 import device_pb2, llm_pb2, orchestrator_pb2, task_pb2

    expected = {
        (device_pb2, "DeviceService"): {"ListDevices", "GetDevice", "WatchDevices"},
        (task_pb2, "TaskService"): {
            "ListOps", "SubmitTask", "RunTask", "StreamTasks", "GetTask", "WatchTask",
            "CancelTask", "ListTasks", "UploadTensor", "DownloadTensor", "DeleteTensor",
        },
        (llm_pb2, "LLMService"): {"Generate", "GenerateStream", "Embed", "ListModels"},
        (orchestrator_pb2, "OrchestratorService"): {
            "RegisterNode", "Heartbeat", "ListNodes", "GetNode", "DrainNode", "SubmitWorkflow",
            "GetWorkflow", "WatchWorkflow", "CancelWorkflow", "ListWorkflows",
        },
    }  # fmt: skip
    for (module, service), methods in expected.items():
        declared = {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}
        assert methods <= declared, (service, methods - declared)
