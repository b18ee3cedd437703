"""client.workflows on both faces against an in-process server; the LLM
example (examples/workflows/summarise.yaml) against the fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from llm_setup import write_llm_config
from llm_upstream import Upstream

from kernelmesh.clients import AsyncClient, Client, InvalidArgumentError
from kernelmesh.clients.workflow_types import StepState, WorkflowState

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"

CHAIN = {
    "steps": [
        {"id": "pos", "task": {"op": "relu", "inputs": ["${inputs.x}"]}},
        {
            "id": "double",
            "task": {"op": "add", "inputs": ["${pos.outputs[0]}", "${pos.outputs[0]}"]},
        },
    ]
}


async def test_async_face_submits_watches_and_reads_outputs(server):
    x = np.arange(-2, 3, dtype=np.float32)
    async with AsyncClient(f"127.0.0.1:{server.port}") as km:
        info = await km.workflows.submit(CHAIN, {"x": x}, request_id="same")
        again = await km.workflows.submit(CHAIN, {"x": x}, request_id="same")
        assert again.name == info.name
        events = [e async for e in km.workflows.watch(info.name)]
        assert events[-1].state is WorkflowState.SUCCEEDED
        assert {e.step for e in events if e.step_state is StepState.SUCCEEDED} <= {"pos", "double"}
        final = await km.workflows.get(info.name)
        out = await km.download(final.step("double").outputs[0])
        np.testing.assert_allclose(out, 2 * np.maximum(x, 0))
        listed = [w.name async for w in km.workflows.list(WorkflowState.SUCCEEDED)]
        assert listed == [info.name]


async def test_blocking_face_runs_a_workflow_and_reports_bad_ones(server):
    target = f"127.0.0.1:{server.port}"

    def use() -> tuple:
        with Client(target) as km:
            done = km.workflows.run(CHAIN, {"x": np.ones(3, np.float32)}, timeout=30)
            with pytest.raises(InvalidArgumentError) as info:
                km.workflows.submit(
                    {"steps": [{"id": "a", "task": {"op": "relu", "inputs": ["${a.outputs[0]}"]}}]}
                )
            return done, info.value

    done, error = await asyncio.to_thread(use)
    assert done.state is WorkflowState.SUCCEEDED
    assert done.step("double").seconds is not None
    assert any("own outputs" in v.description for v in error.violations)


@pytest.fixture
async def llm_target(server_config, tmp_path, start_server):
    async with Upstream() as upstream:
        path = write_llm_config(tmp_path, upstream.openai_url, upstream.ollama_url)
        srv = await start_server(dataclasses.replace(server_config, llm_config=str(path)))
        yield f"127.0.0.1:{srv.port}"


async def test_the_llm_example_runs_against_an_openai_upstream(llm_target):
    async with AsyncClient(llm_target) as km:
        info = await km.workflows.submit(EXAMPLES / "summarise.yaml")
        final = await km.workflows.wait(info.name, timeout=30)
    assert final.state is WorkflowState.SUCCEEDED, final.error_message
    draft = final.step("draft").text
    assert draft.startswith("echo In one sentence")
    # the second step's prompt was the first step's text
    assert final.step("shorten").text == f"echo {draft}"
