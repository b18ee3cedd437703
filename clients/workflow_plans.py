"""Request plans of the workflow calls, written once for both faces."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from kernelmesh.clients.calls import NO_DEADLINE, Pages, Plan, Stream, call, listing, read, rpc
from kernelmesh.clients.workflow_types import (
    WorkflowEvent,
    WorkflowInfo,
    WorkflowState,
    submit_request,
)
from kernelmesh.v1 import orchestrator_pb2 as o

SUBMIT = rpc(
    "OrchestratorService", "SubmitWorkflow", o.SubmitWorkflowRequest, o.SubmitWorkflowResponse
)
GET = rpc("OrchestratorService", "GetWorkflow", o.GetWorkflowRequest, o.GetWorkflowResponse)
WATCH = rpc("OrchestratorService", "WatchWorkflow", o.WatchWorkflowRequest, o.WatchWorkflowResponse)
CANCEL = rpc(
    "OrchestratorService", "CancelWorkflow", o.CancelWorkflowRequest, o.CancelWorkflowResponse
)
LIST = rpc("OrchestratorService", "ListWorkflows", o.ListWorkflowsRequest, o.ListWorkflowsResponse)


def submit(
    spec: Mapping[str, object], inputs: Mapping[str, object] | None, request_id: str | None
) -> Plan[WorkflowInfo]:
    """One request id for every attempt: a retry after a lost reply finds the
    first workflow instead of starting a second."""
    request = submit_request(spec, inputs, request_id or str(uuid.uuid4()))
    reply = yield from call(SUBMIT, request)
    return WorkflowInfo.from_proto(reply.workflow)


def get(name: str) -> Plan[WorkflowInfo]:
    reply = yield from call(GET, o.GetWorkflowRequest(name=name))
    return WorkflowInfo.from_proto(reply.workflow)


def cancel(name: str) -> Plan[WorkflowInfo]:
    reply = yield from call(CANCEL, o.CancelWorkflowRequest(name=name))
    return WorkflowInfo.from_proto(reply.workflow)


def _workflows(reply: o.ListWorkflowsResponse) -> Iterable[WorkflowInfo]:
    return map(WorkflowInfo.from_proto, reply.workflows)


def list_workflows(
    state: WorkflowState | None, page_size: int
) -> Pages[o.ListWorkflowsRequest, o.ListWorkflowsResponse, WorkflowInfo]:
    return listing(LIST, _workflows, page_size, state=int(state or 0))


def _ended(event: WorkflowEvent) -> bool:
    return not event.step and event.state.terminal


def watch(
    name: str, timeout: float | None = None, *, end_only: bool = False
) -> Stream[o.WatchWorkflowRequest, o.WatchWorkflowResponse, WorkflowEvent]:
    """The workflow as it stands, then each transition until it ends (with
    `end_only`, only its end)."""
    deadline = NO_DEADLINE if timeout is None else timeout
    request = o.WatchWorkflowRequest(name=name, end_only=end_only)
    return Stream(WATCH, request, WorkflowEvent.from_proto, deadline, until=_ended)


def wait(name: str, timeout: float | None = None) -> Plan[WorkflowInfo]:
    """The workflow once it ends (no step transitions travel for it)."""
    events = yield from read(watch(name, timeout, end_only=True))
    final = events[-1].workflow if events else None
    if final is not None and final.state.terminal:
        return final
    return (yield from get(name))
