"""What the workflow calls take and return: the spec (the YAML shape, as a
dict) turned into its request, and the workflow, its steps and their
transitions as plain values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kernelmesh.clients import tensors
from kernelmesh.clients.types import TensorRef
from kernelmesh.v1 import device_pb2, orchestrator_pb2, tensor_pb2


class WorkflowState(IntEnum):
    """kernelmesh.v1.WorkflowState, without its prefix."""

    RUNNING = orchestrator_pb2.WORKFLOW_STATE_RUNNING
    SUCCEEDED = orchestrator_pb2.WORKFLOW_STATE_SUCCEEDED
    FAILED = orchestrator_pb2.WORKFLOW_STATE_FAILED
    CANCELLED = orchestrator_pb2.WORKFLOW_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        return self is not WorkflowState.RUNNING


class StepState(IntEnum):
    """kernelmesh.v1.WorkflowStepState, without its prefix."""

    PENDING = orchestrator_pb2.WORKFLOW_STEP_STATE_PENDING
    RUNNING = orchestrator_pb2.WORKFLOW_STEP_STATE_RUNNING
    SUCCEEDED = orchestrator_pb2.WORKFLOW_STEP_STATE_SUCCEEDED
    FAILED = orchestrator_pb2.WORKFLOW_STEP_STATE_FAILED
    CANCELLED = orchestrator_pb2.WORKFLOW_STEP_STATE_CANCELLED
    SKIPPED = orchestrator_pb2.WORKFLOW_STEP_STATE_SKIPPED

    @property
    def terminal(self) -> bool:
        return self >= StepState.SUCCEEDED


def _seconds(ts: Timestamp) -> float | None:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else None


@dataclass(frozen=True)
class StepInfo:
    id: str
    state: StepState
    task: str
    attempt: int
    start_time: float | None
    end_time: float | None
    error_code: int
    error_message: str
    outputs: tuple[TensorRef, ...]
    text: str

    @property
    def seconds(self) -> float | None:
        if self.start_time is None or self.end_time is None:
            return None
        return self.end_time - self.start_time

    @classmethod
    def from_proto(cls, msg: orchestrator_pb2.WorkflowStepStatus) -> StepInfo:
        return cls(
            msg.id,
            StepState(msg.state or StepState.PENDING),
            msg.task,
            msg.attempt,
            _seconds(msg.start_time),
            _seconds(msg.end_time),
            msg.error.code,
            msg.error.message,
            tuple(TensorRef.from_proto(r) for r in msg.outputs),
            msg.text,
        )


@dataclass(frozen=True)
class WorkflowInfo:
    name: str
    state: WorkflowState
    steps: tuple[StepInfo, ...]
    error_code: int
    error_message: str
    create_time: float | None
    end_time: float | None

    def step(self, step_id: str) -> StepInfo:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    @classmethod
    def from_proto(cls, msg: orchestrator_pb2.Workflow) -> WorkflowInfo:
        return cls(
            msg.name,
            WorkflowState(msg.state or WorkflowState.RUNNING),
            tuple(StepInfo.from_proto(s) for s in msg.step_statuses),
            msg.error.code,
            msg.error.message,
            _seconds(msg.create_time),
            _seconds(msg.end_time),
        )


@dataclass(frozen=True)
class WorkflowEvent:
    """A step's transition (`step` set), or the workflow's (`workflow` set on
    the first event and on the workflow's own transitions)."""

    step: str
    step_state: StepState | None
    state: WorkflowState
    message: str
    seconds: float | None
    workflow: WorkflowInfo | None

    @classmethod
    def from_proto(cls, msg: orchestrator_pb2.WatchWorkflowResponse) -> WorkflowEvent:
        return cls(
            msg.step,
            StepState(msg.step_state) if msg.step_state else None,
            WorkflowState(msg.state or WorkflowState.RUNNING),
            msg.message,
            msg.step_duration.ToNanoseconds() / 1e9 if msg.HasField("step_duration") else None,
            WorkflowInfo.from_proto(msg.workflow) if msg.HasField("workflow") else None,
        )


# -- the spec ---------------------------------------------------------------------------


def load_spec(source: str | Path | Mapping[str, object]) -> Mapping[str, object]:
    """A spec from a YAML file (a Path, or a name ending .yaml/.yml/.json),
    YAML text, or a dict already."""
    if isinstance(source, Mapping):
        return source
    is_file = isinstance(source, Path) or (
        "\n" not in source and source.endswith((".yaml", ".yml", ".json"))
    )
    text = Path(source).read_text() if is_file else str(source)
    data = yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ValueError("a workflow spec is a mapping with a 'steps' list")
    return data


def _seconds_to(duration: Duration, seconds: float) -> None:
    duration.FromNanoseconds(int(float(seconds) * 1e9))


def _arg(arg: tensor_pb2.TensorArg, item: object) -> None:
    if isinstance(item, TensorRef):
        arg.ref = item.name
    elif isinstance(item, str):
        arg.ref = item
    else:
        arg.tensor.CopyFrom(tensors.to_proto(np.asarray(item)))


def step_to_proto(step: Mapping[str, Any]) -> orchestrator_pb2.WorkflowStep:
    msg = orchestrator_pb2.WorkflowStep(
        id=str(step.get("id", "")),
        depends_on=[str(d) for d in step.get("depends_on") or []],
        continue_on_failure=bool(step.get("continue_on_failure", False)),
        keep_outputs=bool(step.get("keep_outputs", False)),
    )
    task = step.get("task")
    if isinstance(task, Mapping):
        msg.task.op = str(task.get("op", ""))
        for item in task.get("inputs") or []:
            _arg(msg.task.inputs.add(), item)
        if task.get("params"):
            msg.task.params.update(dict(task["params"]))
        given = task.get("device") or {}
        device: Mapping[str, Any] = {"name": given} if isinstance(given, str) else given
        if device.get("kind"):
            msg.task.device.kind = device_pb2.DeviceKind.Value(  # type: ignore[assignment]
                f"DEVICE_KIND_{str(device['kind']).upper()}"
            )
        msg.task.device.name = str(device.get("name") or "")
        msg.task.priority = int(task.get("priority") or 0)
    llm = step.get("llm")
    if isinstance(llm, Mapping):
        msg.llm.update(dict(llm))
    retry = step.get("retry_policy")
    if isinstance(retry, Mapping):
        policy = msg.retry_policy
        if retry.get("initial_interval") is not None:
            _seconds_to(policy.initial_interval, retry["initial_interval"])
        if retry.get("maximum_interval") is not None:
            _seconds_to(policy.maximum_interval, retry["maximum_interval"])
        policy.backoff_coefficient = float(retry.get("backoff_coefficient") or 0)
        policy.maximum_attempts = int(retry.get("maximum_attempts") or 0)
        policy.non_retryable_error_types.extend(retry.get("non_retryable_error_types") or [])
    if step.get("timeout") is not None:
        _seconds_to(msg.timeout, step["timeout"])
    return msg


def submit_request(
    spec: Mapping[str, Any],
    inputs: Mapping[str, Any] | None,
    request_id: str,
) -> orchestrator_pb2.SubmitWorkflowRequest:
    request = orchestrator_pb2.SubmitWorkflowRequest(request_id=request_id)
    request.steps.extend(step_to_proto(s) for s in spec.get("steps") or [])
    for name, value in {**dict(spec.get("inputs") or {}), **dict(inputs or {})}.items():
        _arg(request.inputs[name], value)
    return request
