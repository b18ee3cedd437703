"""The examples in examples/workflows/ through `kernelmesh workflow run`
against a real server: their outputs match NumPy's answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kernelmesh.clients import Client

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "workflows"


def test_similarity_example_rows_are_softmaxed_similarities(served, kernelmesh, tmp_path):
    done = kernelmesh(
        "workflow", "run", str(EXAMPLES / "similarity.yaml"),
        "--target", served.target, "--out", str(tmp_path), "--plain",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "softmax: SUCCEEDED" in done.stdout
    probs = np.load(tmp_path / "softmax.npy")
    assert probs.shape == (4, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    texts = yaml.safe_load((EXAMPLES / "similarity.yaml").read_text())["steps"][0]["llm"]
    with Client(served.target) as km:
        vectors = km.llm.embed(texts["embed"]["inputs"], model="local")
    sim = vectors @ vectors.T
    expected = np.exp(sim - sim.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def test_fan_in_example_matches_numpy(served, kernelmesh, tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "make_inputs.py"), str(tmp_path)], check=True)
    args = []
    for name in ("image", "kernel", "a", "b"):
        args += ["--input", f"{name}={tmp_path / (name + '.npy')}"]
    done = kernelmesh(
        "workflow", "run", str(EXAMPLES / "fan_in.yaml"), *args,
        "--target", served.target, "--out", str(tmp_path / "out"), "--plain",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    total = np.load(tmp_path / "out" / "total.npy")
    np.testing.assert_allclose(total, (a @ b + b @ a).sum(), rtol=1e-3)


def test_a_bad_example_fails_at_submit_with_each_problem(served, kernelmesh, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "steps": [
                    {"id": "a", "task": {"op": "relu", "inputs": ["${b.outputs[0]}"]}},
                    {"id": "b", "task": {"op": "relu", "inputs": ["${a.outputs[0]}"]}},
                ]
            }
        )
    )
    done = kernelmesh("workflow", "run", str(bad), "--target", served.target)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "cycle: " in done.stderr
    assert "Traceback" not in done.stderr


def test_list_get_and_cancel_commands(served, kernelmesh):
    with Client(served.target) as km:
        info = km.workflows.submit(
            {"steps": [{"id": "one", "task": {"op": "relu", "inputs": [np.ones(3, np.float32)]}}]}
        )
        km.workflows.wait(info.name, timeout=60)
    listed = kernelmesh("workflow", "list", "--target", served.target)
    assert info.name in listed.stdout
    got = kernelmesh("workflow", "get", info.name, "--target", served.target)
    assert got.returncode == 0 and "SUCCEEDED" in got.stdout
    cancelled = kernelmesh("workflow", "cancel", info.name, "--target", served.target)
    assert cancelled.returncode == 0 and "SUCCEEDED" in cancelled.stdout, "a finished one stays"
