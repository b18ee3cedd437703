"""Workflows: DAGs of kernel tasks and LLM calls, validated at submission,
run with parallel steps, journaled in the store and resumed after a restart."""

from kernelmesh.core.workflows.engine import (
    StepRun,
    StepState,
    Workflow,
    WorkflowEngine,
    WorkflowEvent,
    WorkflowOptions,
    WorkflowState,
)
from kernelmesh.core.workflows.spec import SpecError, WorkflowSpec, spec_from_dict, spec_to_dict

__all__ = [
    "SpecError",
    "StepRun",
    "StepState",
    "Workflow",
    "WorkflowEngine",
    "WorkflowEvent",
    "WorkflowOptions",
    "WorkflowSpec",
    "WorkflowState",
    "spec_from_dict",
    "spec_to_dict",
]
