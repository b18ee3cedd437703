"""Typed views of kernelmesh.v1 messages, so users never need a _pb2 class,
and the request builders both clients share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kernelmesh.clients import tensors
from kernelmesh.clients.shm import ShmTensor
from kernelmesh.v1 import device_pb2, task_pb2, tensor_pb2

# What `run` returns: one array, or a tuple of them for an op with several outputs.
Outputs = np.ndarray | tuple[np.ndarray, ...]


class TaskState(IntEnum):
    """kernelmesh.v1.TaskState, without its prefix."""

    UNSPECIFIED = task_pb2.TASK_STATE_UNSPECIFIED
    QUEUED = task_pb2.TASK_STATE_QUEUED
    RUNNING = task_pb2.TASK_STATE_RUNNING
    SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
    FAILED = task_pb2.TASK_STATE_FAILED
    CANCELLED = task_pb2.TASK_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        return self >= TaskState.SUCCEEDED


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    model: str
    vendor: str
    compute_units: int
    threads: int
    features: tuple[str, ...]
    memory_total_bytes: int
    memory_available_bytes: int
    utilization: float
    queue_depth: int
    supports_fp64: bool
    supports_fp16: bool = False
    driver_version: str = ""
    max_work_group_size: int = 0
    running: int = 0

    @classmethod
    def from_proto(cls, msg: device_pb2.Device) -> Device:
        kind = device_pb2.DeviceKind.Name(msg.kind).removeprefix("DEVICE_KIND_").lower()
        return cls(
            name=msg.name,
            kind=kind,
            model=msg.model,
            vendor=msg.vendor,
            compute_units=msg.compute_units,
            threads=msg.threads,
            features=tuple(msg.features),
            memory_total_bytes=msg.memory_total_bytes,
            memory_available_bytes=msg.memory_available_bytes,
            utilization=msg.status.utilization,
            queue_depth=msg.status.queue_depth,
            supports_fp64=msg.supports_fp64,
            supports_fp16=msg.supports_fp16,
            driver_version=msg.driver_version,
            max_work_group_size=msg.max_work_group_size,
            running=msg.status.running,
        )


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    required: bool
    default_json: str
    description: str


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    description: str
    num_inputs: int
    dtypes: tuple[str, ...]
    params: tuple[Param, ...]
    shape_rule: str
    devices: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: task_pb2.Op) -> Op:
        return cls(
            name=msg.name,
            kind=msg.kind,
            description=msg.description,
            num_inputs=msg.num_inputs,
            dtypes=tuple(tensors.dtype_name(d) for d in msg.dtypes),
            params=tuple(
                Param(
                    p.name,
                    task_pb2.ParamType.Name(p.type).removeprefix("PARAM_TYPE_").lower(),
                    p.required,
                    p.default_json,
                    p.description,
                )
                for p in msg.params
            ),
            shape_rule=msg.shape_rule,
            devices=tuple(msg.devices),
        )


@dataclass(frozen=True)
class TensorRef:
    """A tensor kept on the server; pass it as an input to later tasks."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    device: str

    @classmethod
    def from_proto(cls, msg: tensor_pb2.TensorRef) -> TensorRef:
        return cls(
            msg.name, tensors.dtype_name(msg.dtype), tuple(msg.shape), msg.size_bytes, msg.device
        )


# What a task takes as an input: an array, a number, or a tensor kept on the server.
Input = np.ndarray | TensorRef | ShmTensor | float | int


def _seconds(ts: Timestamp) -> float | None:
    """A timestamp as seconds since the epoch; None when unset."""
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else None


@dataclass(frozen=True)
class Attempt:
    """One run of a submitted task (kernelmesh.v1.TaskAttempt). A task that failed
    after its retries keeps every attempt with its error: the dead letter."""

    number: int
    state: TaskState  # RUNNING while it runs; then SUCCEEDED, FAILED or CANCELLED
    device: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    error_code: int  # a google.rpc.Code value; 0 when it did not fail
    error_message: str

    @classmethod
    def from_proto(cls, msg: task_pb2.TaskAttempt) -> Attempt:
        return cls(
            number=msg.number,
            state=TaskState(msg.state),
            device=msg.device,
            start_time=_seconds(msg.start_time),
            end_time=_seconds(msg.end_time),
            error_code=msg.error.code,
            error_message=msg.error.message,
        )


@dataclass(frozen=True)
class Placement:
    """Where the mesh placed a task and why (kernelmesh.v1.Placement)."""

    node: str  # "nodes/{name}"; empty for a device of the server's own process
    device: str
    reason: str

    @classmethod
    def from_proto(cls, msg: task_pb2.Placement) -> Placement:
        return cls(node=msg.node, device=msg.device, reason=msg.reason)


@dataclass(frozen=True)
class RetryPolicy:
    """How a submitted task is retried when an attempt fails (Temporal's
    RetryPolicy, kernelmesh.v1.RetryPolicy): the delay before attempt n+1 is
    min(initial_interval * backoff_coefficient^(n-1), maximum_interval). Times
    are in seconds; None (or 0) leaves a field to the server's default, and the
    server checks the policy (a bad one is InvalidArgumentError)."""

    initial_interval: float | None = None  # server default: 1 s
    backoff_coefficient: float = 0.0  # at least 1; 0: 2.0
    maximum_interval: float | None = None  # None: 100 x initial_interval
    maximum_attempts: int = 0  # attempts in all, the first included; 0: 3, 1: never retry
    # google.rpc.Code names (e.g. "INTERNAL") that end the task at once; these
    # never retry anyway: INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED,
    # CANCELLED, DEADLINE_EXCEEDED.
    non_retryable_error_types: tuple[str, ...] = ()

    def to_proto(self) -> task_pb2.RetryPolicy:
        msg = task_pb2.RetryPolicy(
            backoff_coefficient=self.backoff_coefficient,
            maximum_attempts=self.maximum_attempts,
            non_retryable_error_types=list(self.non_retryable_error_types),
        )
        if self.initial_interval is not None:
            msg.initial_interval.CopyFrom(_duration(self.initial_interval))
        if self.maximum_interval is not None:
            msg.maximum_interval.CopyFrom(_duration(self.maximum_interval))
        return msg


def _duration(seconds: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


@dataclass(frozen=True)
class TaskInfo:
    name: str
    op: str
    state: TaskState
    device: str
    tenant: str
    outputs: tuple[np.ndarray, ...]
    output_refs: tuple[TensorRef, ...]
    error_code: int
    error_message: str
    run_seconds: float
    labels: Mapping[str, str] = field(default_factory=dict)
    # The current attempt's number (1 for the first run; 0 before it starts) and
    # every attempt of a submitted task, oldest first, each with its error.
    attempt: int = 0
    attempts: tuple[Attempt, ...] = ()
    # Where the task was placed and why; None before it is placed.
    placement: Placement | None = None

    @classmethod
    def from_proto(cls, msg: task_pb2.Task) -> TaskInfo:
        return cls(
            name=msg.name,
            op=msg.op,
            state=TaskState(msg.state),
            device=msg.device,
            tenant=msg.tenant,
            outputs=_outputs(msg),
            output_refs=tuple(TensorRef.from_proto(r) for r in msg.output_refs),
            error_code=msg.error.code,
            error_message=msg.error.message,
            run_seconds=msg.run_duration.ToNanoseconds() / 1e9,
            labels=dict(msg.labels),
            attempt=msg.attempt,
            attempts=tuple(Attempt.from_proto(a) for a in msg.attempts),
            placement=Placement.from_proto(msg.placement) if msg.HasField("placement") else None,
        )


@dataclass(frozen=True)
class StreamItem:
    """One input of `Client.stream`: an op, its inputs and params."""

    op: str
    inputs: tuple[Input, ...]
    params: Mapping[str, object] | None = None
    device: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class TaskEvent:
    name: str
    state: TaskState
    message: str
    task: TaskInfo | None


def _empty(t: tensor_pb2.Tensor) -> bool:
    return any(d == 0 for d in t.shape)


def _outputs(msg: task_pb2.Task) -> tuple[np.ndarray, ...]:
    """The outputs that carry data (not those described by dtype and shape only)."""
    found = []
    for t in msg.outputs:
        data = t.data  # read once: each read of a bytes field is a copy
        if data or _empty(t):
            found.append(tensors.from_proto(t, data))
    return tuple(found)


def task_spec(
    op: str,
    inputs: tuple[Input, ...],
    params: Mapping[str, object],
    *,
    device: str | None = None,
    priority: int = 0,
    keep_outputs: bool = False,
    labels: Mapping[str, str] | None = None,
    retry: RetryPolicy | None = None,
) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(
        op=op, priority=priority, keep_outputs=keep_outputs, labels=dict(labels or {})
    )
    if retry is not None:
        spec.retry_policy.CopyFrom(retry.to_proto())
    for item in inputs:
        if isinstance(item, TensorRef):
            spec.inputs.add(ref=item.name)
        elif isinstance(item, ShmTensor):
            spec.inputs.add(shm=item.to_proto())
        else:
            tensors.fill(spec.inputs.add().tensor, item)
    if params:
        spec.params.CopyFrom(_struct(params))
    if device:
        spec.device.CopyFrom(selector(device))
    return spec


def selector(device: str) -> device_pb2.DeviceSelector:
    """ "cpu" or "opencl" picks a kind; "cpu:0" pins one device; "any" is empty.
    In a mesh, "node-a/cpu:0" pins a device of a node and "nodes/node-a" any of its
    devices."""
    if device in ("", "any"):
        return device_pb2.DeviceSelector()
    if device.startswith("nodes/") and len(device) > len("nodes/"):
        return device_pb2.DeviceSelector(name=device.removeprefix("nodes/"))
    if ":" in device:
        return device_pb2.DeviceSelector(name=device)
    kind = "DEVICE_KIND_" + device.upper()
    try:
        device_pb2.DeviceKind.Value(kind)
    except ValueError:
        raise ValueError(
            f"unknown device kind {device!r}; use cpu, cuda, opencl or metal"
        ) from None
    return device_pb2.DeviceSelector(kind=kind)


def _struct(params: Mapping[str, object]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    values: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    struct.update(values)
    return struct


def unwrap(outputs: tuple[np.ndarray, ...]) -> Outputs:
    return outputs[0] if len(outputs) == 1 else outputs


def in_order(results: Mapping[int, TaskInfo]) -> list[Outputs]:
    """Stream results by input index; the first failed task raises."""
    from kernelmesh.clients.errors import error_for
    from kernelmesh.clients.status import code_of

    out = []
    for index in range(len(results)):
        info = results[index]
        if info.state is not TaskState.SUCCEEDED:
            raise error_for(code_of(info.error_code), f"item {index}: {info.error_message}")
        out.append(unwrap(info.outputs))
    return out
