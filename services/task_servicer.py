"""TaskService: translates kernelmesh.v1 messages to core task calls and back."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from kernelmesh.core import ops
from kernelmesh.core.catalog import devices_for
from kernelmesh.core.errors import InvalidArgument, KernelmeshError, ResourceExhausted, Violation
from kernelmesh.core.idempotency import check_request_id
from kernelmesh.core.shm import SharedMemoryRegistry
from kernelmesh.core.task_stream import pipelined
from kernelmesh.core.tasks import (
    InlinePlan,
    Task,
    TaskEvent,
    TaskManager,
    TaskState,
    fingerprint_of,
)
from kernelmesh.core.uploads import TensorUpload
from kernelmesh.services import convert, paging, request_guard, shm_servicer, wire
from kernelmesh.services.context import deadline_of, tenant_of
from kernelmesh.services.retry_convert import retry_from_proto
from kernelmesh.services.status import rpc, status_of, stream_rpc, to_status
from kernelmesh.v1 import task_pb2, task_pb2_grpc

if TYPE_CHECKING:
    from kernelmesh.services.mesh_tensors import TensorRelay

# Tasks of one StreamTasks call in flight at once; the reader waits beyond this,
# which pushes back on the client through gRPC flow control.
STREAM_WINDOW = 256
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 4 << 20
# A WatchTask event carries the task's outputs up to this many bytes. Larger ones would
# break clients with gRPC's usual 4 MiB receive limit (grpcurl, most SDK defaults); the
# event then says where to read them instead.
WATCH_OUTPUTS_MAX_BYTES = 1 << 20
# Call shapes whose inline plan is kept (convert.plain_key); all are forgotten when full.
MAX_PLANS = 1024


class _Shape:
    """A call shape that ran inline: its inputs' layout, its plan, and the reply
    template of its first planned success (`convert.reply_template`)."""

    __slots__ = ("layout", "plan", "reply")

    def __init__(self, layout: convert.Layout, plan: InlinePlan) -> None:
        self.layout = layout
        self.plan = plan
        self.reply: tuple[task_pb2.Task, tuple] | None = None


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        tasks: TaskManager,
        limits: ops.Limits,
        max_reply_bytes: int = 64 << 20,
        shm: SharedMemoryRegistry | None = None,
        tensors: TensorRelay | None = None,
    ) -> None:
        self.tasks = tasks
        # An orchestrator without devices: tensors are stored on nodes (the mesh).
        self.tensors = tensors
        self.limits = limits
        self.quotas = tasks.store.ledger.quotas
        # A List reply is cut to fit this (the server's max message size, less room
        # for framing); the page token continues after the last task that fit.
        self.max_reply_bytes = max_reply_bytes
        self.shm = shm
        # plain_key -> the layout, plan and reply template of a call shape that ran
        # inline before
        self._plans: dict[tuple, _Shape] = {}

    def _spec(self, msg: task_pb2.TaskSpec, context: grpc.aio.ServicerContext):
        return convert.spec_from_proto(
            msg, tenant=tenant_of(context), limits=self.limits, quotas=self.quotas
        )

    @rpc
    async def ListOps(
        self, request: task_pb2.ListOpsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListOpsResponse:
        catalog = ops.list_ops()
        start, size = paging.page_bounds(request.page_token, request.page_size, len(catalog))
        page = catalog[start : start + size]
        ops_msgs = [
            convert.op_to_proto(spec, devices_for(spec, self.tasks.devices)) for spec in page
        ]
        token = paging.next_token(start, size, len(catalog))
        return task_pb2.ListOpsResponse(ops=ops_msgs, next_page_token=token)

    @rpc
    async def SubmitTask(
        self, request: task_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.SubmitTaskResponse:
        """Journals the task before replying (group commit with the submissions
        arriving together); request_id makes a retry return the first task."""
        spec = self._spec(request.task, context)
        spec.retry = retry_from_proto(request.task)
        fingerprint = ""
        if request.request_id:
            check_request_id(request.request_id)
            fingerprint = fingerprint_of(request.task.SerializeToString(deterministic=True))
        with qualified(request.task):
            task = await self.tasks.submit_journaled(
                spec,
                request_id=request.request_id,
                fingerprint=fingerprint,
            )
        response = task_pb2.SubmitTaskResponse()
        convert.fill_task(response.task, task)
        return response

    def _begin(
        self, msg: task_pb2.TaskSpec, key: tuple | None, tenant: str, deadline: float | None
    ) -> tuple[Task, _Shape | None]:
        """`TaskManager.begin` for a waiting caller, and the call shape's cache entry
        when the task ran by its plan. A call shape that ran inline before (plain
        tensors of the same dtypes and shapes) reuses its plan: no second validation
        or placement, and no TaskSpec."""
        known = self._plans.get(key) if key is not None else None
        if known is not None:
            inputs = convert.plain_inputs(msg, known.layout)
            if inputs is not None:
                task = self.tasks.begin_planned(
                    known.plan, inputs, tenant=tenant, priority=msg.priority, deadline=deadline
                )
                if task is not None:
                    return task, known
        spec = convert.spec_from_proto(msg, tenant=tenant, limits=self.limits, quotas=self.quotas)
        with qualified(msg):
            task = self.tasks.begin(spec, deadline=deadline)
        if key is not None:
            plan = self.tasks.inline_plan(spec, task)
            if plan is not None:
                if len(self._plans) >= MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = _Shape(convert.layout_of(spec.inputs), plan)  # type: ignore[arg-type]
        return task, None

    def _fill(self, msg: task_pb2.Task, task: Task, shape: _Shape | None) -> None:
        """`convert.fill_task(msg, task)`; a task that ran by its call shape's plan is
        written from that shape's reply template (made from its first such task)."""
        if shape is not None and task.state is TaskState.SUCCEEDED:
            if shape.reply is None and task.outputs:
                shape.reply = convert.reply_template(task)
            if shape.reply is not None and convert.fill_planned(msg, shape.reply, task):
                return
        convert.fill_task(msg, task)

    @rpc
    async def RunTask(
        self, request: task_pb2.RunTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.RunTaskResponse:
        msg = request.task
        key = convert.plain_key(msg)  # None when it uses shm
        if key is None and self.shm is not None and (msg.output_shm or _has_shm_input(msg)):
            return await self._run_with_shm(msg, context)
        task, shape = self._begin(msg, key, tenant_of(context), deadline_of(context))
        if not task.state.terminal:  # an inline task has ended already
            task = await self.tasks.wait(task)
        if task.state is not TaskState.SUCCEEDED:
            await context.abort_with_status(_task_failure_status(task))
        response = task_pb2.RunTaskResponse()
        self._fill(response.task, task, shape)
        return response

    async def _run_with_shm(
        self, msg: task_pb2.TaskSpec, context: grpc.aio.ServicerContext
    ) -> task_pb2.RunTaskResponse:
        """RunTask with inputs read from, or outputs written to, shared memory."""
        tenant = tenant_of(context)
        shm = self.shm
        assert shm is not None
        resolve = shm_servicer.input_resolver(shm, context, tenant)
        spec = convert.spec_from_proto(
            msg, tenant=tenant, limits=self.limits, quotas=self.quotas, shm=resolve
        )
        if msg.output_shm:
            shm_servicer.require_local(context)
        with qualified(msg):
            task = self.tasks.prepare(spec)
            shm_servicer.check_outputs(shm, tenant, msg, task)
            task = self.tasks.begin_prepared(task, deadline=deadline_of(context))
        task = await self.tasks.wait(task)
        if task.state is not TaskState.SUCCEEDED:
            await context.abort_with_status(_task_failure_status(task))
        response = task_pb2.RunTaskResponse()
        if msg.output_shm:
            shm_servicer.write_outputs(shm, tenant, msg, task, response.task)
        else:
            convert.fill_task(response.task, task)
        return response

    async def StreamTasks(
        self,
        request_iterator: AsyncIterator[task_pb2.StreamTasksRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[task_pb2.StreamTasksResponse]:
        """Reads requests while tasks run; yields each result as it finishes
        (core.task_stream: the window of tasks in flight, and their cancellation
        when the call ends)."""
        try:
            tenant = tenant_of(context)
        except KernelmeshError as exc:
            await context.abort_with_status(status_of(exc))
        deadline = deadline_of(context)  # the call's: the same for every item
        shapes: dict[Task, _Shape] = {}  # planned tasks until answered -> their shape

        def start(req: task_pb2.StreamTasksRequest) -> Task | task_pb2.StreamTasksResponse:
            msg = req.task
            try:
                task, shape = self._begin(msg, convert.plain_key(msg), tenant, deadline)
                if shape is not None:  # ran by its plan, so it is answered at once
                    shapes[task] = shape
                return task
            except KernelmeshError as exc:  # one bad request fails its own item; the stream goes on
                return _rejected(req.correlation_id, exc)

        def answer(req: task_pb2.StreamTasksRequest, task: Task) -> task_pb2.StreamTasksResponse:
            response = task_pb2.StreamTasksResponse(correlation_id=req.correlation_id)
            self._fill(response.task, task, shapes.pop(task, None))
            return response

        def cancel(task: Task) -> None:
            # the client went away or the call ended: its unfinished work stops
            self.tasks.cancel(task.name, tenant=tenant)

        results = pipelined(request_iterator, start, answer, cancel, STREAM_WINDOW)
        try:
            async for response in results:
                yield response
        except KernelmeshError as exc:  # the request stream itself is broken
            await context.abort_with_status(status_of(exc))
        finally:
            await results.aclose()

    @rpc
    async def GetTask(
        self, request: task_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.GetTaskResponse:
        _require_name(request.name)
        task = await self.tasks.find(request.name, tenant=tenant_of(context))
        full = request.view != task_pb2.TASK_VIEW_BASIC
        response = task_pb2.GetTaskResponse()
        convert.fill_task(response.task, task, full=full)
        return response

    @stream_rpc
    async def WatchTask(
        self, request: task_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        _require_name(request.name)
        async for event in self.tasks.follow(request.name, tenant=tenant_of(context)):
            yield _event_message(event)

    @rpc
    async def CancelTask(
        self, request: task_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.CancelTaskResponse:
        task = await self.tasks.cancel_anywhere(request.name, tenant=tenant_of(context))
        return task_pb2.CancelTaskResponse(task=convert.task_to_proto(task, full=False))

    @rpc
    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        state = _task_state(request.state) if request.state else None
        tenant = tenant_of(context)
        full = request.view == task_pb2.TASK_VIEW_FULL
        tasks, token = await self.tasks.find_all(
            tenant=tenant,
            state=state,
            page_size=request.page_size,
            page_token=request.page_token,
            full=full,
        )
        response = task_pb2.ListTasksResponse()
        size = 0
        for i, task in enumerate(tasks):
            msg = convert.task_to_proto(task, full=full)
            size += msg.ByteSize() + 16  # the field's tag and length prefix, generously
            if size > self.max_reply_bytes:
                if i == 0:
                    raise ResourceExhausted(
                        f"{task.name} alone is larger than a reply may be "
                        f"({self.max_reply_bytes} bytes); list with view BASIC, or read "
                        "it with GetTask",
                        retry_after=0.0,
                    )
                # the same page cut to the i tasks that fit, and its token
                _, token = await self.tasks.find_all(
                    tenant=tenant, state=state, page_size=i, page_token=request.page_token
                )
                break
            response.tasks.append(msg)
        response.next_page_token = token
        return response

    @rpc
    async def UploadTensor(
        self,
        request_iterator: AsyncIterator[task_pb2.UploadTensorRequest],
        context: grpc.aio.ServicerContext,
    ) -> task_pb2.UploadTensorResponse:
        tenant = tenant_of(context)
        if self.tensors is not None:
            return await self.tensors.upload(request_iterator, tenant, context)
        upload: TensorUpload | None = None
        max_chunk = self.quotas.max_upload_chunk_bytes
        try:
            # context.read(), not the request iterator: grpc.aio's iterator keeps
            # the last message (and its chunk) alive while it awaits the next one,
            # so every open upload held a chunk on top of the bytes it is charged for.
            while (req := request_guard.checked(await context.read())) is not grpc.aio.EOF:
                part = req.WhichOneof("part")
                if upload is None:
                    if part != "header":
                        raise InvalidArgument(
                            [Violation("header", "the first message must be a header")]
                        )
                    header = req.header
                    dtype = convert.numpy_dtype(header.dtype, "header.dtype")
                    nbytes = convert.check_shape(
                        header.shape, dtype, "header", self.limits, self.quotas.max_dims
                    )
                    upload = TensorUpload(
                        self.tasks.store,
                        tenant=tenant,
                        dtype=dtype,
                        shape=tuple(header.shape),
                        nbytes=nbytes,
                    )
                elif part == "chunk":
                    # ByteSize first: a chunk far too large is refused before it is copied
                    if req.ByteSize() > max_chunk + 16:
                        raise _chunk_too_large(max_chunk)
                    chunk = req.chunk  # each read of a bytes field is a fresh copy
                    del req  # the message, and its own copy of the bytes, go now
                    if len(chunk) > max_chunk:
                        raise _chunk_too_large(max_chunk)
                    upload.add(chunk)  # copied straight into the tensor's buffer
                    del chunk
                else:
                    raise InvalidArgument(
                        [Violation("header", "only the first message is a header")]
                    )
                req = None
            if upload is None:
                raise InvalidArgument([Violation("header", "the stream was empty")])
            item = upload.finish()
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        if self.tasks.journal is not None:
            await self.tasks.journal.sync()  # the tensor survives a crash once acknowledged
        return task_pb2.UploadTensorResponse(tensor=convert.ref_to_proto(item))

    @stream_rpc
    async def DownloadTensor(
        self, request: task_pb2.DownloadTensorRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[task_pb2.DownloadTensorResponse | bytes]:
        tenant = tenant_of(context)
        if self.tensors is not None and await self.tensors.holds(request.name, tenant):
            async for part in self.tensors.download(request, tenant, context):
                yield part
            return
        item = self.tasks.store.get(request.name, tenant=tenant)
        if request.chunk_size < 0:
            raise InvalidArgument([Violation("chunk_size", "must be >= 0")])
        size = min(request.chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
        yield task_pb2.DownloadTensorResponse(header=convert.ref_to_proto(item))
        view = memoryview(np.ascontiguousarray(item.array)).cast("B")
        for start in range(0, len(view), size):
            # encoded here (the guard passes bytes through): a protobuf message of
            # 4 MiB is built and serialized at under 1 GB/s
            yield wire.download_chunk(view[start : start + size])

    @rpc
    async def DeleteTensor(
        self, request: task_pb2.DeleteTensorRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.DeleteTensorResponse:
        tenant = tenant_of(context)
        if self.tensors is not None and await self.tensors.holds(request.name, tenant):
            await self.tensors.delete(request.name, tenant, context)
            return task_pb2.DeleteTensorResponse()
        self.tasks.store.delete(request.name, tenant=tenant)
        return task_pb2.DeleteTensorResponse()


@contextlib.contextmanager
def qualified(msg: task_pb2.TaskSpec) -> Iterator[None]:
    """Rewrites core's field paths ("inputs[1].shape") to the request's
    ("task.inputs[1].tensor.shape"), so every violation names a real field."""
    try:
        yield
    except InvalidArgument as exc:
        raise InvalidArgument(
            [Violation(_qualify(v.field, msg), v.description) for v in exc.violations]
        ) from None


_INPUT_FIELD = re.compile(r"^inputs\[(\d+)\]\.(shape|dtype)$")


def _qualify(field: str, msg: task_pb2.TaskSpec) -> str:
    if field.startswith("task."):
        return field
    match = _INPUT_FIELD.match(field)
    if match:
        index = int(match.group(1))
        source = msg.inputs[index].WhichOneof("source") if index < len(msg.inputs) else None
        if source == "ref":
            return f"task.inputs[{index}].ref"
        if source == "shm":
            return f"task.inputs[{index}].shm.{match.group(2)}"
        return f"task.inputs[{index}].tensor.{match.group(2)}"
    return f"task.{field}"


def _require_name(name: str) -> None:
    if not name:
        raise InvalidArgument([Violation("name", "required: the task's name, e.g. tasks/42")])


def _event_message(event: TaskEvent) -> task_pb2.WatchTaskResponse:
    """The event; a terminal one carries the task, with its outputs when they are small."""
    task = event.task
    big = (
        event.state is TaskState.SUCCEEDED
        and not task.output_refs
        and task.retained_bytes > WATCH_OUTPUTS_MAX_BYTES
    )
    if not big:
        return convert.event_to_proto(event)
    note = (
        f"outputs ({task.retained_bytes:,} bytes) are not sent in events above "
        f"{WATCH_OUTPUTS_MAX_BYTES:,} bytes: read them with GetTask "
        f'{{"name": "{task.name}", "view": "TASK_VIEW_FULL"}} (grpcurl: -max-msg-sz), '
        'or submit with "keep_outputs": true and read them with DownloadTensor'
    )
    message = f"{event.message}; {note}" if event.message else note
    msg = task_pb2.WatchTaskResponse(name=event.name, state=int(event.state), message=message)
    msg.time.FromNanoseconds(int(event.time * 1e9))
    return msg  # no task: see WatchTaskResponse in task.proto


def _task_state(value: int) -> TaskState:
    try:
        return TaskState(value)
    except ValueError:
        names = ", ".join(task_pb2.TaskState.Name(s.value) for s in TaskState)
        raise InvalidArgument(
            [Violation("state", f"must be one of {names}; got {value}")]
        ) from None


def _task_failure_status(task: Task) -> grpc.Status:
    error = task.error
    assert error is not None
    return to_status(
        int(error.code),
        f"{task.name}: {error.message}",
        reason=f"TASK_{task.state.name}",
        metadata={"task": task.name},
    )


def _rejected(correlation_id: str, exc: KernelmeshError) -> task_pb2.StreamTasksResponse:
    msg = task_pb2.Task(state=task_pb2.TASK_STATE_FAILED)
    msg.error.code = int(exc.code)
    msg.error.message = exc.message
    return task_pb2.StreamTasksResponse(correlation_id=correlation_id, task=msg)


__all__ = ["TaskServicer"]


def _chunk_too_large(max_chunk: int) -> InvalidArgument:
    return InvalidArgument(
        [
            Violation(
                "chunk",
                f"chunks are at most {max_chunk} bytes (the server's "
                "quotas.max_upload_chunk_bytes); send smaller ones",
            )
        ]
    )


def _has_shm_input(msg: task_pb2.TaskSpec) -> bool:
    return any(arg.WhichOneof("source") == "shm" for arg in msg.inputs)
