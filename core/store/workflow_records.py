"""Workflows as the store keeps them: one row per workflow (its spec as JSON)
and one per step (state, task, outputs), with the write operations on them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WorkflowRecord:
    """`spec` is the validated workflow as JSON: steps, and inputs as the names
    of tensors kept on the server."""

    id: str
    seq: int
    tenant: str
    state: int
    spec: str
    request_id: str | None = None
    fingerprint: str | None = None
    create_time: float = 0.0
    end_time: float | None = None
    error_code: int | None = None
    error_message: str | None = None
    # Several orchestrators on one store: the one running the workflow, until
    # when (it renews), and when another one was asked to cancel it.
    owner: str | None = None
    lease_until: float | None = None
    cancel_requested: float | None = None


# The columns UpdateWorkflow may set.
WORKFLOW_UPDATABLE = frozenset(
    {"state", "end_time", "error_code", "error_message", "cancel_requested"}
)


@dataclass(slots=True)
class WorkflowStepRecord:
    workflow_id: str
    step_id: str
    state: int
    task: str = ""
    attempt: int = 0
    start_time: float | None = None
    end_time: float | None = None
    error_code: int | None = None
    error_message: str | None = None
    outputs: str = "[]"  # JSON list of tensor names
    text: str | None = None


@dataclass(frozen=True, slots=True)
class PutWorkflow:
    record: WorkflowRecord


@dataclass(frozen=True, slots=True)
class UpdateWorkflow:
    id: str
    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class PutWorkflowStep:
    record: WorkflowStepRecord


@dataclass(frozen=True, slots=True)
class DeleteWorkflow:
    id: str


WorkflowOp = PutWorkflow | UpdateWorkflow | PutWorkflowStep | DeleteWorkflow
WORKFLOW_OPS = (PutWorkflow, UpdateWorkflow, PutWorkflowStep, DeleteWorkflow)


@dataclass(slots=True)
class WorkflowSnapshot:
    """Every workflow kept, oldest first, with its steps by workflow id."""

    workflows: list[WorkflowRecord]
    steps: dict[str, list[WorkflowStepRecord]]
