"""Typed views of kernelmesh.v1 messages, so users never need a _pb2 class,
and the request builders both clients share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

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
) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(
        op=op, priority=priority, keep_outputs=keep_outputs, labels=dict(labels or {})
    )
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
