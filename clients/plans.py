"""Request plans: every call the clients make, written once for both faces.

Each plan builds its requests, names the steps to perform (`calls`), and
decodes the replies into the client's types; `Transport.run` (blocking) and
`AsyncTransport.run` (asyncio) perform the steps. Streams that a face hands
to the caller are described as `Stream` values, read by the transport."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from grpc_health.v1 import health_pb2

from kernelmesh.clients import tensors
from kernelmesh.clients.calls import (
    NO_DEADLINE,
    Pages,
    Plan,
    Rpc,
    Stream,
    call,
    listing,
    read,
    read_all,
    rpc,
    upload,
)
from kernelmesh.clients.errors import KernelmeshError, UnavailableError, error_for
from kernelmesh.clients.llm_types import Generation, Model, Prompt, messages, options, vectors
from kernelmesh.clients.status import code_of
from kernelmesh.clients.types import (
    Device,
    Input,
    Op,
    Outputs,
    StreamItem,
    TaskEvent,
    TaskInfo,
    TaskState,
    TensorRef,
    in_order,
    task_spec,
    unwrap,
)
from kernelmesh.v1 import device_pb2, llm_pb2, task_pb2

PAGE_SIZE = 1000

# -- the contract's methods the clients call ------------------------------------------

LIST_OPS = rpc("TaskService", "ListOps", task_pb2.ListOpsRequest, task_pb2.ListOpsResponse)
RUN_TASK = rpc("TaskService", "RunTask", task_pb2.RunTaskRequest, task_pb2.RunTaskResponse)
SUBMIT_TASK = rpc(
    "TaskService", "SubmitTask", task_pb2.SubmitTaskRequest, task_pb2.SubmitTaskResponse
)
STREAM_TASKS = rpc(
    "TaskService", "StreamTasks", task_pb2.StreamTasksRequest, task_pb2.StreamTasksResponse
)
GET_TASK = rpc("TaskService", "GetTask", task_pb2.GetTaskRequest, task_pb2.GetTaskResponse)
WATCH_TASK = rpc("TaskService", "WatchTask", task_pb2.WatchTaskRequest, task_pb2.WatchTaskResponse)
CANCEL_TASK = rpc(
    "TaskService", "CancelTask", task_pb2.CancelTaskRequest, task_pb2.CancelTaskResponse
)
LIST_TASKS = rpc("TaskService", "ListTasks", task_pb2.ListTasksRequest, task_pb2.ListTasksResponse)
UPLOAD_TENSOR = rpc(
    "TaskService", "UploadTensor", task_pb2.UploadTensorRequest, task_pb2.UploadTensorResponse
)
DOWNLOAD_TENSOR = rpc(
    "TaskService",
    "DownloadTensor",
    task_pb2.DownloadTensorRequest,
    task_pb2.DownloadTensorResponse,
)
DELETE_TENSOR = rpc(
    "TaskService", "DeleteTensor", task_pb2.DeleteTensorRequest, task_pb2.DeleteTensorResponse
)
LIST_DEVICES = rpc(
    "DeviceService", "ListDevices", device_pb2.ListDevicesRequest, device_pb2.ListDevicesResponse
)
GENERATE = rpc("LLMService", "Generate", llm_pb2.GenerateRequest, llm_pb2.GenerateResponse)
GENERATE_STREAM = rpc(
    "LLMService", "GenerateStream", llm_pb2.GenerateStreamRequest, llm_pb2.GenerateStreamResponse
)
EMBED = rpc("LLMService", "Embed", llm_pb2.EmbedRequest, llm_pb2.EmbedResponse)
LIST_MODELS = rpc("LLMService", "ListModels", llm_pb2.ListModelsRequest, llm_pb2.ListModelsResponse)
HEALTH_WATCH = Rpc(
    "/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
)

# -- health ---------------------------------------------------------------------------


def _serving(status: int) -> bool:
    return status == health_pb2.HealthCheckResponse.SERVING


def _status(reply: health_pb2.HealthCheckResponse) -> int:
    return reply.status


def wait_ready(service: str, timeout: float) -> Plan[None]:
    """Until `service` reports SERVING (waiting for the server to come up)."""
    request = health_pb2.HealthCheckRequest(service=service)
    watch = Stream(HEALTH_WATCH, request, _status, timeout, wait_for_ready=True, until=_serving)
    seen = yield from read(watch)
    if not seen or not _serving(seen[-1]):
        raise UnavailableError(f"{service} stopped before it was serving")


# -- catalog and devices --------------------------------------------------------------


def _ops(reply: task_pb2.ListOpsResponse) -> Iterable[Op]:
    return map(Op.from_proto, reply.ops)


def _devices(reply: device_pb2.ListDevicesResponse) -> Iterable[Device]:
    return map(Device.from_proto, reply.devices)


def ops() -> Plan[list[Op]]:
    return (yield from read_all(listing(LIST_OPS, _ops, PAGE_SIZE)))


def devices() -> Plan[list[Device]]:
    return (yield from read_all(listing(LIST_DEVICES, _devices, PAGE_SIZE)))


# -- tasks ----------------------------------------------------------------------------


def run_task(spec: task_pb2.TaskSpec, timeout: float | None = None) -> Plan[TaskInfo]:
    reply = yield from call(RUN_TASK, task_pb2.RunTaskRequest(task=spec), timeout)
    return TaskInfo.from_proto(reply.task)


def run(spec: task_pb2.TaskSpec, timeout: float | None = None) -> Plan[Outputs]:
    info = yield from run_task(spec, timeout)
    return unwrap(info.outputs)


# Inputs this big travel by UploadTensor (chunks) instead of inside the RunTask message,
# and the task's outputs then come back by DownloadTensor: one huge message costs
# more than a stream of 4 MiB chunks, on both sides.
BULK_BYTES = 32 << 20


def is_bulk(inputs: Sequence[object]) -> bool:
    return any(isinstance(x, np.ndarray) and x.nbytes >= BULK_BYTES for x in inputs)


def run_bulk(
    make_spec: Callable[[tuple[Input, ...], bool], task_pb2.TaskSpec],
    inputs: Sequence[Input],
    timeout: float | None = None,
) -> Plan[Outputs]:
    """`run` for big tensors: big inputs uploaded in chunks, the outputs kept on the
    server and downloaded in chunks; everything stored for it is deleted after."""
    stored: list[str] = []
    try:
        args: list[Input] = []
        for x in inputs:
            if isinstance(x, np.ndarray) and x.nbytes >= BULK_BYTES:
                ref = yield from upload_tensor(x)
                stored.append(ref.name)
                args.append(ref)
            else:
                args.append(x)
        info = yield from run_task(make_spec(tuple(args), True), timeout)
        stored.extend(r.name for r in info.output_refs)
        outputs = []
        for ref in info.output_refs:
            outputs.append((yield from download_tensor(ref)))
        return unwrap(tuple(outputs))
    finally:
        for name in stored:
            with contextlib.suppress(KernelmeshError):  # else retention removes it
                yield from delete_tensor(name)


def run_op(
    op: str,
    inputs: tuple[Input, ...],
    params: Mapping[str, object],
    *,
    device: str | None,
    priority: int,
    timeout: float | None,
) -> Plan[Outputs]:
    """`Client.run`: inputs of BULK_BYTES or more travel in chunks (`run_bulk`)."""
    if is_bulk(inputs):

        def make(args: tuple[Input, ...], keep: bool) -> task_pb2.TaskSpec:
            return task_spec(op, args, params, device=device, priority=priority, keep_outputs=keep)

        return (yield from run_bulk(make, inputs, timeout))
    spec = task_spec(op, inputs, params, device=device, priority=priority)
    return (yield from run(spec, timeout))


def submit(spec: task_pb2.TaskSpec, request_id: str | None = None) -> Plan[str]:
    """Queues a task; returns its name. One request id for every attempt, so
    a retry after a lost reply finds the first task instead of adding one."""
    request = task_pb2.SubmitTaskRequest(task=spec, request_id=request_id or str(uuid.uuid4()))
    reply = yield from call(SUBMIT_TASK, request)
    return reply.task.name


def get_task(name: str) -> Plan[TaskInfo]:
    reply = yield from call(GET_TASK, task_pb2.GetTaskRequest(name=name))
    return TaskInfo.from_proto(reply.task)


def cancel_task(name: str) -> Plan[TaskInfo]:
    reply = yield from call(CANCEL_TASK, task_pb2.CancelTaskRequest(name=name))
    return TaskInfo.from_proto(reply.task)


def _tasks(reply: task_pb2.ListTasksResponse) -> Iterable[TaskInfo]:
    return map(TaskInfo.from_proto, reply.tasks)


def list_tasks(
    state: TaskState | None, page_size: int
) -> Pages[task_pb2.ListTasksRequest, task_pb2.ListTasksResponse, TaskInfo]:
    return listing(LIST_TASKS, _tasks, page_size, state=int(state or 0))


def _event(msg: task_pb2.WatchTaskResponse) -> TaskEvent:
    task = TaskInfo.from_proto(msg.task) if msg.HasField("task") else None
    return TaskEvent(msg.name, TaskState(msg.state), msg.message, task)


def _finished(event: TaskEvent) -> bool:
    return event.state.terminal and event.task is not None


def watch_task(
    name: str, timeout: float | None = None, *, until_finished: bool = False
) -> Stream[task_pb2.WatchTaskRequest, task_pb2.WatchTaskResponse, TaskEvent]:
    """A task's events until it ends; timeout None: no deadline."""
    request = task_pb2.WatchTaskRequest(name=name)
    deadline = NO_DEADLINE if timeout is None else timeout
    until = _finished if until_finished else None
    return Stream(WATCH_TASK, request, _event, deadline, until=until)


def wait(name: str, timeout: float | None = None) -> Plan[TaskInfo]:
    """The task once it ends: its final event, or a read if the watch closed first."""
    events = yield from read(watch_task(name, timeout, until_finished=True))
    final = events[-1].task if events else None
    if final is not None and final.state.terminal:
        return final
    return (yield from get_task(name))


def result(name: str, timeout: float | None = None) -> Plan[Outputs | tuple[TensorRef, ...]]:
    """The task's outputs (or output refs) once it succeeds; raises if it failed."""
    info = yield from wait(name, timeout)
    if info.state is not TaskState.SUCCEEDED:
        raise error_for(code_of(info.error_code), f"{name}: {info.error_message}")
    return unwrap(info.outputs) if info.outputs else info.output_refs


def _stream_requests(items: Iterable[StreamItem]) -> Iterator[task_pb2.StreamTasksRequest]:
    for index, item in zip(itertools.count(), items, strict=False):
        spec = task_spec(
            item.op, item.inputs, item.params or {}, device=item.device, priority=item.priority
        )
        yield task_pb2.StreamTasksRequest(correlation_id=str(index), task=spec)


def _stream_result(reply: task_pb2.StreamTasksResponse) -> tuple[int, TaskInfo]:
    return int(reply.correlation_id), TaskInfo.from_proto(reply.task)


def stream_tasks(
    items: Iterable[StreamItem],
) -> Stream[task_pb2.StreamTasksRequest, task_pb2.StreamTasksResponse, tuple[int, TaskInfo]]:
    """Every item over one StreamTasks call: (index of the item, finished task)."""
    return Stream(STREAM_TASKS, _stream_requests(items), _stream_result, NO_DEADLINE)


def map_op(
    op: str, inputs: Iterable[Sequence[np.ndarray]], params: Mapping[str, object]
) -> Plan[list[Outputs]]:
    """`op` over every tuple of inputs through one stream; results in input
    order. The first failed task raises."""
    items = (StreamItem(op, tuple(args), params) for args in inputs)
    done = yield from read(stream_tasks(items))
    return in_order(dict(done))


# -- tensors kept on the server -------------------------------------------------------


def upload_tensor(array: np.ndarray) -> Plan[TensorRef]:
    """An array stored on the server, sent in chunks of tensors.CHUNK_BYTES."""
    reply = yield from upload(UPLOAD_TENSOR, tensors.upload_requests(array))
    return TensorRef.from_proto(reply.tensor)


def _part(reply: task_pb2.DownloadTensorResponse) -> task_pb2.DownloadTensorResponse:
    return reply


def download_tensor(ref: TensorRef | str) -> Plan[np.ndarray]:
    name = ref.name if isinstance(ref, TensorRef) else ref
    request = task_pb2.DownloadTensorRequest(name=name, chunk_size=tensors.CHUNK_BYTES)
    parts = yield from read(Stream(DOWNLOAD_TENSOR, request, _part))
    headers = [p.header for p in parts if p.WhichOneof("part") == "header"]
    if not headers:
        raise UnavailableError(f"the download of {name} ended before its header")
    chunks = [p.chunk for p in parts if p.WhichOneof("part") == "chunk"]
    return tensors.assemble(headers[0], chunks)


def delete_tensor(ref: TensorRef | str) -> Plan[None]:
    name = ref.name if isinstance(ref, TensorRef) else ref
    yield from call(DELETE_TENSOR, task_pb2.DeleteTensorRequest(name=name))


# -- the LLM gateway ------------------------------------------------------------------


def generate_request(
    prompt: Prompt,
    model: str,
    system: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int,
    stop: str | Sequence[str],
    seed: int | None,
) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        model=model,
        messages=messages(prompt, system),
        options=options(temperature, top_p, max_tokens, stop, seed),
    )


def generate(request: llm_pb2.GenerateRequest, timeout: float | None) -> Plan[Generation]:
    # No client-side retry: the gateway has already retried and failed over,
    # and retrying here would multiply upstream calls and charges.
    reply = yield from call(GENERATE, request, timeout, retry=False)
    return Generation.from_proto(reply)


def _chunk(reply: llm_pb2.GenerateStreamResponse) -> llm_pb2.GenerateStreamResponse:
    return reply


Chunks = Stream[
    llm_pb2.GenerateStreamRequest, llm_pb2.GenerateStreamResponse, llm_pb2.GenerateStreamResponse
]


def generate_stream(request: llm_pb2.GenerateRequest, timeout: float | None) -> Chunks:
    """A completion's chunks; timeout None: the client's default deadline."""
    streamed = llm_pb2.GenerateStreamRequest(
        model=request.model, messages=request.messages, options=request.options
    )
    return Stream(GENERATE_STREAM, streamed, _chunk, timeout)


def embed(texts: str | Sequence[str], model: str, timeout: float | None) -> Plan[np.ndarray]:
    """A single string counts as a list of one."""
    inputs = [texts] if isinstance(texts, str) else list(texts)
    reply = yield from call(EMBED, llm_pb2.EmbedRequest(model=model, inputs=inputs), timeout)
    return vectors(reply)


def _models(reply: llm_pb2.ListModelsResponse) -> Iterable[Model]:
    return map(Model.from_proto, reply.models)


def models() -> Plan[list[Model]]:
    return (yield from read_all(listing(LIST_MODELS, _models, PAGE_SIZE)))
