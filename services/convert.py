"""Translation between kernelmesh.v1 messages and core values. Tensors decode
with numpy.frombuffer: no copy on the way in."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from kernelmesh.core import ops
from kernelmesh.core.devices import DeviceInfo, DeviceKind, DeviceSelector, DeviceStatus
from kernelmesh.core.errors import InvalidArgument, Violation
from kernelmesh.core.limits import Quotas
from kernelmesh.core.tasks import Task, TaskEvent, TaskSpec, TaskState, dtype_name
from kernelmesh.core.tensor_store import StoredTensor
from kernelmesh.v1 import device_pb2, task_pb2, tensor_pb2

DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_COMPLEX64: np.dtype("<c8"),
    tensor_pb2.DTYPE_COMPLEX128: np.dtype("<c16"),
}
NUMPY_TO_DTYPE: dict[str, int] = {dt.name: code for code, dt in DTYPE_TO_NUMPY.items()}

KIND_TO_PROTO = {
    DeviceKind.CPU: device_pb2.DEVICE_KIND_CPU,
    DeviceKind.CUDA: device_pb2.DEVICE_KIND_CUDA,
    DeviceKind.OPENCL: device_pb2.DEVICE_KIND_OPENCL,
    DeviceKind.METAL: device_pb2.DEVICE_KIND_METAL,
}
PROTO_TO_KIND = {v: k for k, v in KIND_TO_PROTO.items()}

PARAM_TYPE_TO_PROTO = {
    ops.ParamType.INT: task_pb2.PARAM_TYPE_INT,
    ops.ParamType.FLOAT: task_pb2.PARAM_TYPE_FLOAT,
    ops.ParamType.BOOL: task_pb2.PARAM_TYPE_BOOL,
    ops.ParamType.INTS: task_pb2.PARAM_TYPE_INTS,
}


def numpy_dtype(code: int, field: str) -> np.dtype:
    dtype = DTYPE_TO_NUMPY.get(code)
    if dtype is None:
        names = ", ".join(tensor_pb2.Dtype.Name(c) for c in DTYPE_TO_NUMPY)
        raise InvalidArgument([Violation(field, f"dtype must be one of {names}")])
    return dtype


DEFAULT_QUOTAS = Quotas()


def check_shape(
    shape: Iterable[int],
    dtype: np.dtype,
    field: str,
    limits: ops.Limits,
    max_dims: int = DEFAULT_QUOTAS.max_dims,
) -> int:
    """Validates a shape before anything is allocated; returns its byte size."""
    dims = list(shape)
    if len(dims) > max_dims:
        raise InvalidArgument(
            [Violation(f"{field}.shape", f"{len(dims)} dimensions; at most {max_dims}")]
        )
    if any(d < 0 for d in dims):
        raise InvalidArgument([Violation(f"{field}.shape", "dimensions must be >= 0")])
    # Zero-length dimensions are counted as 1 here: (0, 2**62) holds no element,
    # but NumPy still refuses a shape whose other dimensions overflow.
    elements = math.prod(dims)
    if math.prod(d or 1 for d in dims) > limits.max_elements:
        elements = max(elements, limits.max_elements + 1)
    if elements > limits.max_elements:
        raise InvalidArgument(
            [
                Violation(
                    f"{field}.shape",
                    f"{elements} elements exceed the limit of {limits.max_elements} per tensor; "
                    "split the work or raise the server's limits.max_elements",
                )
            ]
        )
    return elements * dtype.itemsize


def tensor_from_proto(
    msg: tensor_pb2.Tensor,
    field: str,
    limits: ops.Limits,
    max_dims: int = DEFAULT_QUOTAS.max_dims,
) -> np.ndarray:
    dtype = numpy_dtype(msg.dtype, f"{field}.dtype")
    nbytes = check_shape(msg.shape, dtype, field, limits, max_dims)
    data = msg.data  # each read of a bytes field is a fresh copy: read it once
    if len(data) != nbytes:
        raise InvalidArgument(
            [
                Violation(
                    f"{field}.data",
                    f"has {len(data)} bytes; shape {list(msg.shape)} of {dtype.name} "
                    f"needs exactly {nbytes} (elements x {dtype.itemsize}, little-endian, C order)",
                )
            ]
        )
    return np.frombuffer(data, dtype=dtype).reshape(tuple(msg.shape))


# The dtype, shape and byte size of each tensor input of one call shape.
Layout = tuple[tuple[np.dtype, tuple[int, ...], int], ...]


def plain_key(msg: task_pb2.TaskSpec) -> tuple | None:
    """The call shape of a spec of inline tensors with no params, labels, selector,
    kept outputs or shared memory: op, then each input's dtype number and shape.
    None for any other spec. Such a spec's validated form depends on this key alone,
    so the verdict can be reused (`TaskManager.begin_planned`)."""
    if (
        msg.labels
        or msg.params.fields
        or msg.keep_outputs
        or msg.device.kind
        or msg.device.name
        or msg.output_shm
    ):
        return None
    key: list[object] = [msg.op]
    for arg in msg.inputs:
        if not arg.HasField("tensor"):
            return None
        tensor = arg.tensor
        key.append(tensor.dtype)
        key.append(tuple(tensor.shape))
    return tuple(key)


def layout_of(arrays: Iterable[np.ndarray]) -> Layout:
    return tuple((a.dtype, a.shape, a.nbytes) for a in arrays)


def plain_inputs(msg: task_pb2.TaskSpec, layout: Layout) -> list[np.ndarray] | None:
    """The inputs of a spec whose `plain_key` has this layout, decoded with
    numpy.frombuffer; None when a tensor's byte count is wrong (the full decode
    then names the field)."""
    arrays = []
    for arg, (dtype, shape, nbytes) in zip(msg.inputs, layout, strict=True):
        data = arg.tensor.data  # each read of a bytes field is a fresh copy: read it once
        if len(data) != nbytes:
            return None
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(shape))
    return arrays


def tensor_to_proto(array: np.ndarray, *, with_data: bool = True) -> tensor_pb2.Tensor:
    return fill_tensor(tensor_pb2.Tensor(), array, with_data=with_data)


def fill_tensor(
    msg: tensor_pb2.Tensor, array: np.ndarray, *, with_data: bool = True
) -> tensor_pb2.Tensor:
    """Writes `array` into `msg` in place: filling a field of the reply directly saves
    copying megabytes of data once more than building a Tensor and extending."""
    code = NUMPY_TO_DTYPE.get(dtype_name(array.dtype))
    if code is None:
        raise TypeError(f"dtype {array.dtype} has no kernelmesh.v1.Dtype")
    msg.dtype = code
    msg.shape.extend(array.shape)
    if with_data:
        if array.flags.c_contiguous and array.dtype is DTYPE_TO_NUMPY[code]:
            msg.data = array.tobytes()  # a kernel's output, as a rule: one copy, no checks
        else:
            little = array.astype(DTYPE_TO_NUMPY[code], copy=False)
            msg.data = np.ascontiguousarray(little).tobytes()
    return msg


def meta_to_proto(meta: ops.TensorMeta) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=NUMPY_TO_DTYPE[meta.dtype], shape=meta.shape)


def ref_to_proto(item: StoredTensor) -> tensor_pb2.TensorRef:
    return tensor_pb2.TensorRef(
        name=item.name,
        dtype=NUMPY_TO_DTYPE[dtype_name(item.array.dtype)],
        shape=item.array.shape,
        size_bytes=item.size_bytes,
        device=item.device,
    )


_ANY_DEVICE = DeviceSelector()


def selector_from_proto(msg: device_pb2.DeviceSelector, field: str = "device") -> DeviceSelector:
    if not msg.kind and not msg.name:
        return _ANY_DEVICE  # the common case; selectors are immutable
    kind = device_kind(msg.kind, f"{field}.kind") if msg.kind else None
    return DeviceSelector(kind=kind, name=msg.name)


def device_kind(value: int, field: str) -> DeviceKind:
    """A DeviceKind from the wire; proto3 keeps unknown enum numbers, which are refused."""
    kind = PROTO_TO_KIND.get(value)
    if kind is None:
        names = ", ".join(device_pb2.DeviceKind.Name(k) for k in PROTO_TO_KIND)
        raise InvalidArgument([Violation(field, f"must be one of {names}; got {value}")])
    return kind


def params_from_proto(msg, field: str = "params") -> dict[str, object]:  # a protobuf Struct
    """The Struct as plain Python values. NaN and infinities are refused here: JSON
    has no spelling for them and no op parameter means anything by them."""
    if not msg.fields:
        return {}
    return {key: _value(value, f"{field}.{key}") for key, value in msg.fields.items()}


def _value(msg, field: str) -> object:  # a protobuf Value
    kind = msg.WhichOneof("kind")
    if kind == "number_value":
        number = msg.number_value
        if not math.isfinite(number):
            raise InvalidArgument([Violation(field, f"must be a finite number, got {number}")])
        return number
    if kind == "string_value":
        return msg.string_value
    if kind == "bool_value":
        return msg.bool_value
    if kind == "struct_value":
        return params_from_proto(msg.struct_value, field)
    if kind == "list_value":
        return [_value(v, f"{field}[{i}]") for i, v in enumerate(msg.list_value.values)]
    return None  # null_value (whatever its number) or no value at all


# google.protobuf.Duration's own range: +-10,000 years.
DURATION_MAX_SECONDS = 315_576_000_000
# The longest Durations requests may carry: a retry interval (RetryPolicy's
# initial and maximum) and a workflow step's timeout. Longer ones would park a
# failing task, QUEUED, or a step for longer than anyone watches it.
MAX_RETRY_INTERVAL_SECONDS = 86_400.0  # 1 day
MAX_STEP_TIMEOUT_SECONDS = 30 * 86_400.0  # 30 days


def duration_seconds(msg, field: str, *, maximum: float, minimum: float = 0.0) -> float:
    """A request's google.protobuf.Duration in seconds. Refused (INVALID_ARGUMENT
    naming `field`) when it is not a valid Duration (seconds within +-315,576,000,000,
    nanos within +-999,999,999 and of the same sign), or outside [minimum, maximum]:
    a huge interval or timeout would otherwise park work for ever."""
    seconds, nanos = msg.seconds, msg.nanos
    if (
        not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS
        or not -1_000_000_000 < nanos < 1_000_000_000
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument(
            [
                Violation(
                    field,
                    f"not a valid Duration (seconds={seconds}, nanos={nanos}): seconds within "
                    f"+-{DURATION_MAX_SECONDS}, nanos within +-999999999 with the sign of seconds",
                )
            ]
        )
    value = seconds + nanos / 1e9
    if not minimum <= value <= maximum:
        raise InvalidArgument(
            [Violation(field, f"{value:g}s is out of range: {minimum:g} to {maximum:g} seconds")]
        )
    return value


def spec_from_proto(
    msg: task_pb2.TaskSpec,
    *,
    tenant: str,
    limits: ops.Limits,
    field: str = "task",
    quotas: Quotas = DEFAULT_QUOTAS,
    shm: Callable[[Any, str], np.ndarray] | None = None,
) -> TaskSpec:
    """`shm` reads a shared-memory input (services/shm_servicer.py); None where the
    call does not accept them."""
    if not msg.op:
        raise InvalidArgument([Violation(f"{field}.op", "required; ListOps shows the catalog")])
    inputs: list[np.ndarray | str] = []
    violations: list[Violation] = []
    for i, arg in enumerate(msg.inputs):
        where = f"{field}.inputs[{i}]"
        source = arg.WhichOneof("source")
        try:
            if source == "tensor":
                inputs.append(
                    tensor_from_proto(arg.tensor, f"{where}.tensor", limits, quotas.max_dims)
                )
            elif source == "ref":
                inputs.append(arg.ref)
            elif source == "shm" and shm is not None:
                inputs.append(shm(arg.shm, f"{where}.shm"))
            elif source == "shm":
                violations.append(Violation(f"{where}.shm", "accepted by RunTask only"))
            else:
                violations.append(Violation(where, "set either tensor or ref"))
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(violations)
    labels = dict(msg.labels) if msg.labels else {}
    if labels:
        _check_labels(labels, f"{field}.labels", quotas)
    return TaskSpec(
        op=msg.op,
        inputs=inputs,
        params=params_from_proto(msg.params, f"{field}.params") if msg.params.fields else {},
        selector=selector_from_proto(msg.device, f"{field}.device"),
        priority=msg.priority,
        keep_outputs=msg.keep_outputs,
        labels=labels,
        tenant=tenant,
    )


def _check_labels(labels: dict[str, str], field: str, quotas: Quotas) -> None:
    if len(labels) > quotas.max_labels:
        raise InvalidArgument(
            [Violation(field, f"{len(labels)} labels; at most {quotas.max_labels}")]
        )
    for key, value in labels.items():
        if not 0 < len(key) <= quotas.max_label_key_chars:
            raise InvalidArgument(
                [Violation(field, f"label keys are 1-{quotas.max_label_key_chars} characters")]
            )
        if len(value) > quotas.max_label_value_chars:
            raise InvalidArgument(
                [
                    Violation(
                        f"{field}[{key}]",
                        f"label values are at most {quotas.max_label_value_chars} characters",
                    )
                ]
            )


def _timestamp(target, seconds: float | None) -> None:
    if seconds is not None:
        # what Timestamp.FromNanoseconds does, without its Python-level call chain
        target.seconds, target.nanos = divmod(int(seconds * 1e9), 1_000_000_000)


def task_to_proto(task: Task, *, full: bool = True) -> task_pb2.Task:
    return fill_task(task_pb2.Task(), task, full=full)


def fill_task(msg: task_pb2.Task, task: Task, *, full: bool = True) -> task_pb2.Task:
    """Writes `task` into `msg` in place: a reply's own field, so its outputs are not
    copied again from a separate message."""
    msg.name = task.name
    msg.op = task.op
    msg.state = task.state  # an IntEnum: no .value lookup
    msg.tenant = task.tenant
    if task.priority:
        msg.priority = task.priority
    msg.device = task.device_name
    if task.labels:
        msg.labels.update(task.labels)
    if task.state is TaskState.SUCCEEDED:
        if task.output_refs:
            msg.output_refs.extend(ref_to_proto(r) for r in task.output_refs)
        elif full and task.outputs:
            for output in task.outputs:
                fill_tensor(msg.outputs.add(), output)
        else:
            msg.outputs.extend(meta_to_proto(m) for m in task.output_metas)
    if task.error is not None:
        msg.error.code = int(task.error.code)
        msg.error.message = task.error.message
    _timestamp(msg.create_time, task.create_time)
    _timestamp(msg.start_time, task.start_time)
    _timestamp(msg.end_time, task.end_time)
    if task.run_seconds is not None:
        # Duration.FromNanoseconds without its Python-level calls (run time is never negative)
        duration = msg.run_duration
        duration.seconds, duration.nanos = divmod(int(task.run_seconds * 1e9), 1_000_000_000)
    if task.placement_reason:
        node, slash, _ = task.device_name.rpartition("/")
        msg.placement.node = "nodes/" + node if slash else ""
        msg.placement.device = task.device_name
        msg.placement.reason = task.placement_reason
    if task.attempt:
        msg.attempt = task.attempt
        for attempt in task.attempts:
            out = msg.attempts.add(number=attempt.number, state=int(attempt.state))
            out.device = attempt.device
            _timestamp(out.start_time, attempt.start_time)
            _timestamp(out.end_time, attempt.end_time)
            if attempt.error is not None:
                out.error.code = int(attempt.error.code)
                out.error.message = attempt.error.message
    return msg


def reply_template(task: Task) -> tuple[task_pb2.Task, tuple[tuple[np.dtype, tuple], ...]]:
    """What `fill_task` writes for every successful inline run of one call shape (op,
    state, device, placement, the outputs' dtypes and shapes), to be copied into each
    reply by `fill_planned`; and the outputs' expected dtypes and shapes."""
    msg = task_pb2.Task(op=task.op, state=TaskState.SUCCEEDED, device=task.device_name)
    if task.placement_reason:
        node, slash, _ = task.device_name.rpartition("/")
        msg.placement.node = "nodes/" + node if slash else ""
        msg.placement.device = task.device_name
        msg.placement.reason = task.placement_reason
    expected = []
    for output in task.outputs:
        out = fill_tensor(msg.outputs.add(), output, with_data=False)
        expected.append((DTYPE_TO_NUMPY[out.dtype], output.shape))  # what fill_tensor sends as is
    return msg, tuple(expected)


def fill_planned(
    msg: task_pb2.Task,
    template: tuple[task_pb2.Task, tuple[tuple[np.dtype, tuple], ...]],
    task: Task,
) -> bool:
    """`fill_task(msg, task)` for a succeeded task of the template's call shape: the
    template copied, then what differs per task. False (msg untouched) when an output
    is not the C-contiguous array of the template's dtype and shape that the wire
    holds as is; the caller then takes `fill_task`."""
    outputs = task.outputs
    constant, expected = template
    if (
        task.state is not TaskState.SUCCEEDED
        or not outputs
        or len(outputs) != len(expected)
        or task.labels
        or task.attempt
        or task.output_refs
        or task.run_seconds is None
    ):
        return False
    for output, (dtype, shape) in zip(outputs, expected, strict=True):
        if output.dtype is not dtype or output.shape != shape or not output.flags.c_contiguous:
            return False
    msg.CopyFrom(constant)
    msg.name = task.name
    msg.tenant = task.tenant
    if task.priority:
        msg.priority = task.priority
    _timestamp(msg.create_time, task.create_time)
    _timestamp(msg.start_time, task.start_time)
    _timestamp(msg.end_time, task.end_time)
    duration = msg.run_duration
    duration.seconds, duration.nanos = divmod(int(task.run_seconds * 1e9), 1_000_000_000)
    for out, output in zip(msg.outputs, outputs, strict=True):
        out.data = output.tobytes()
    return True


def event_to_proto(event: TaskEvent) -> task_pb2.WatchTaskResponse:
    msg = task_pb2.WatchTaskResponse(name=event.name, state=int(event.state), message=event.message)
    _timestamp(msg.time, event.time)
    if event.state.terminal:
        fill_task(msg.task, event.task, full=True)
    return msg


def op_to_proto(spec: ops.OpSpec, devices: list[str]) -> task_pb2.Op:
    import json

    return task_pb2.Op(
        name=spec.name,
        kind=spec.kind,
        description=spec.description,
        num_inputs=spec.num_inputs,
        dtypes=[NUMPY_TO_DTYPE[d] for d in spec.dtypes],
        params=[
            task_pb2.ParamSpec(
                name=p.name,
                type=PARAM_TYPE_TO_PROTO[p.type],
                required=p.required,
                default_json="" if p.required or p.default is None else json.dumps(p.default),
                description=p.description,
            )
            for p in spec.params
        ],
        shape_rule=spec.shape_rule,
        devices=devices,
    )


def device_to_proto(info: DeviceInfo, status: DeviceStatus) -> device_pb2.Device:
    return device_pb2.Device(
        name=info.name,
        kind=KIND_TO_PROTO[info.kind],
        model=info.model,
        vendor=info.vendor,
        driver_version=info.driver_version,
        compute_units=info.compute_units,
        threads=info.threads,
        features=info.features,
        memory_total_bytes=info.memory_total_bytes,
        memory_available_bytes=status.memory_available_bytes,
        supports_fp64=info.supports_fp64,
        supports_fp16=info.supports_fp16,
        max_work_group_size=info.max_work_group_size,
        node=info.node,
        status=status_to_proto(status),
    )


def status_to_proto(status: DeviceStatus) -> device_pb2.DeviceStatus:
    msg = device_pb2.DeviceStatus(
        name=status.name,
        utilization=status.utilization,
        memory_total_bytes=status.memory_total_bytes,
        memory_available_bytes=status.memory_available_bytes,
        queue_depth=status.queue_depth,
        running=status.running,
    )
    msg.time.GetCurrentTime()
    return msg
