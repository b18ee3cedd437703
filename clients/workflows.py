"""Workflows from Python: `client.workflows` (blocking) and
`async_client.workflows`.

>>> with Client() as km:
...     wf = km.workflows.submit("examples/workflows/similarity.yaml")
...     for event in km.workflows.watch(wf.name):
...         print(event.step, event.step_state, event.seconds)
...     done = km.workflows.wait(wf.name)
...     matrix = km.download(done.step("softmax").outputs[0])

A spec is the YAML shape: a path, YAML text or a dict with `steps` (and
optional `inputs`); `inputs=` adds named arrays."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

from kernelmesh.clients import workflow_plans as plans
from kernelmesh.clients.transport import AsyncTransport, Transport
from kernelmesh.clients.workflow_types import (
    StepInfo,
    StepState,
    WorkflowEvent,
    WorkflowInfo,
    WorkflowState,
    load_spec,
)

Spec = str | Path | Mapping[str, object]


class Workflows:
    def __init__(self, io: Transport) -> None:
        self._io = io

    def submit(
        self,
        spec: Spec,
        inputs: Mapping[str, object] | None = None,
        *,
        request_id: str | None = None,
    ) -> WorkflowInfo:
        return self._io.run(plans.submit(load_spec(spec), inputs, request_id))

    def run(
        self, spec: Spec, inputs: Mapping[str, object] | None = None, timeout: float | None = None
    ) -> WorkflowInfo:
        """Submits and waits for the end."""
        return self.wait(self.submit(spec, inputs).name, timeout)

    def get(self, name: str) -> WorkflowInfo:
        return self._io.run(plans.get(name))

    def cancel(self, name: str) -> WorkflowInfo:
        return self._io.run(plans.cancel(name))

    def list(
        self, state: WorkflowState | None = None, page_size: int = 100
    ) -> Iterator[WorkflowInfo]:
        """Newest first, a page at a time as they are read."""
        return self._io.pages(plans.list_workflows(state, page_size))

    def watch(self, name: str, timeout: float | None = None) -> Iterator[WorkflowEvent]:
        return self._io.stream(plans.watch(name, timeout))

    def wait(self, name: str, timeout: float | None = None) -> WorkflowInfo:
        return self._io.run(plans.wait(name, timeout))


class AsyncWorkflows:
    def __init__(self, io: AsyncTransport) -> None:
        self._io = io

    async def submit(
        self,
        spec: Spec,
        inputs: Mapping[str, object] | None = None,
        *,
        request_id: str | None = None,
    ) -> WorkflowInfo:
        return await self._io.run(plans.submit(load_spec(spec), inputs, request_id))

    async def run(
        self, spec: Spec, inputs: Mapping[str, object] | None = None, timeout: float | None = None
    ) -> WorkflowInfo:
        return await self.wait((await self.submit(spec, inputs)).name, timeout)

    async def get(self, name: str) -> WorkflowInfo:
        return await self._io.run(plans.get(name))

    async def cancel(self, name: str) -> WorkflowInfo:
        return await self._io.run(plans.cancel(name))

    def list(
        self, state: WorkflowState | None = None, page_size: int = 100
    ) -> AsyncIterator[WorkflowInfo]:
        return self._io.pages(plans.list_workflows(state, page_size))

    def watch(self, name: str, timeout: float | None = None) -> AsyncIterator[WorkflowEvent]:
        return self._io.stream(plans.watch(name, timeout))

    async def wait(self, name: str, timeout: float | None = None) -> WorkflowInfo:
        return await self._io.run(plans.wait(name, timeout))


__all__ = [
    "AsyncWorkflows",
    "StepInfo",
    "StepState",
    "WorkflowEvent",
    "WorkflowInfo",
    "WorkflowState",
    "Workflows",
]
