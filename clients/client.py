"""The synchronous Python client."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from kernelmesh.clients import tensors
from kernelmesh.clients.errors import KernelmeshError, UnavailableError, error_for, from_rpc_error
from kernelmesh.clients.llm import LLM
from kernelmesh.clients.status import code_of
from kernelmesh.clients.types import (
    Device,
    Op,
    TaskEvent,
    TaskInfo,
    TaskState,
    TensorRef,
    in_order,
    task_spec,
    unwrap,
)
from kernelmesh.v1 import device_pb2, device_pb2_grpc, task_pb2, task_pb2_grpc

T = TypeVar("T")
DEFAULT_TARGET = "127.0.0.1:50051"
TENANT_METADATA_KEY = "kernelmesh-tenant"
MAX_MESSAGE_BYTES = 256 << 20


@dataclass(frozen=True)
class ClientOptions:
    """timeout: default deadline of each call, seconds. retries: attempts on
    UNAVAILABLE (exponential backoff with jitter), 1 disables retrying."""

    timeout: float = 30.0
    retries: int = 4
    tenant: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES


def channel_options(opts: ClientOptions) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
    ]


def retry_policy(opts: ClientOptions) -> dict[str, Any]:
    """The tenacity policy: retry only UNAVAILABLE (never a real answer),
    exponential backoff with jitter."""
    return {
        "retry": retry_if_exception(lambda e: isinstance(e, UnavailableError)),
        "stop": stop_after_attempt(max(1, opts.retries)),
        "wait": wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        "reraise": True,
    }


@dataclass(frozen=True)
class StreamItem:
    """One input of `Client.stream`: an op, its inputs and params."""

    op: str
    inputs: tuple[np.ndarray | TensorRef | float | int, ...]
    params: Mapping[str, object] | None = None
    device: str | None = None
    priority: int = 0


class Client:
    """Talks to a kernelmesh endpoint.

    >>> with Client("127.0.0.1:50051") as km:
    ...     c = km.run("matmul", a, b)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        tenant: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.options = ClientOptions(timeout=timeout, retries=retries, tenant=tenant)
        chan_opts = channel_options(self.options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=chan_opts)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=chan_opts)
        self._tasks = task_pb2_grpc.TaskServiceStub(self._channel)
        self._devices = device_pb2_grpc.DeviceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = ((TENANT_METADATA_KEY, tenant),) if tenant else ()
        self._retrying = retry(**retry_policy(self.options))
        # The LLM gateway: generate, stream, embed, models.
        self.llm = LLM(self._channel, self._call, self._metadata, self.options.timeout)

    # -- plumbing -----------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        @self._retrying
        def attempt() -> T:
            try:
                return method(
                    request,
                    timeout=self.options.timeout if timeout is None else timeout,
                    metadata=self._metadata,
                )
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None

        return attempt()

    def wait_ready(self, timeout: float = 60.0, service: str = "kernelmesh.v1.TaskService") -> None:
        """Blocks until the server reports SERVING (kernels warmed up)."""
        responses = self._health.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        try:
            for response in responses:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            responses.cancel()
        raise UnavailableError(f"{service} stopped before it was serving")

    # -- catalog and devices ------------------------------------------------

    def ops(self) -> list[Op]:
        return [
            Op.from_proto(m)
            for m in self._pages(self._tasks.ListOps, task_pb2.ListOpsRequest, "ops")
        ]

    def devices(self) -> list[Device]:
        return [
            Device.from_proto(m)
            for m in self._pages(
                self._devices.ListDevices, device_pb2.ListDevicesRequest, "devices"
            )
        ]

    def _pages(self, method, request_type, field: str) -> Iterator[Any]:
        token = ""
        while True:
            response = self._call(method, request_type(page_size=1000, page_token=token))
            yield from getattr(response, field)
            token = response.next_page_token
            if not token:
                return

    # -- tasks --------------------------------------------------------------

    def run(
        self,
        op: str,
        *inputs: np.ndarray | TensorRef | float | int,
        device: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        **params: object,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Runs an op and returns its output as a NumPy array (a tuple for
        several outputs). Raises a KernelmeshError subclass on failure."""
        spec = task_spec(op, inputs, params, device=device, priority=priority)
        response = self._call(self._tasks.RunTask, task_pb2.RunTaskRequest(task=spec), timeout)
        return unwrap(TaskInfo.from_proto(response.task).outputs)

    def run_task(
        self,
        op: str,
        *inputs: np.ndarray | TensorRef | float | int,
        device: str | None = None,
        priority: int = 0,
        keep_outputs: bool = False,
        timeout: float | None = None,
        **params: object,
    ) -> TaskInfo:
        """Like `run`, but returns the whole task record (device, timings, refs)."""
        spec = task_spec(
            op, inputs, params, device=device, priority=priority, keep_outputs=keep_outputs
        )
        response = self._call(self._tasks.RunTask, task_pb2.RunTaskRequest(task=spec), timeout)
        return TaskInfo.from_proto(response.task)

    def submit(
        self,
        op: str,
        *inputs: np.ndarray | TensorRef | float | int,
        device: str | None = None,
        priority: int = 0,
        keep_outputs: bool = False,
        labels: Mapping[str, str] | None = None,
        **params: object,
    ) -> TaskHandle:
        """Queues a task and returns a handle at once."""
        spec = task_spec(
            op,
            inputs,
            params,
            device=device,
            priority=priority,
            keep_outputs=keep_outputs,
            labels=labels,
        )
        response = self._call(self._tasks.SubmitTask, task_pb2.SubmitTaskRequest(task=spec))
        return TaskHandle(self, response.task.name)

    def stream(self, items: Iterable[StreamItem]) -> Iterator[tuple[int, TaskInfo]]:
        """Pipelines many tasks over one StreamTasks call; yields
        (index of the item, finished task) in completion order."""
        counter = itertools.count()

        def requests() -> Iterator[task_pb2.StreamTasksRequest]:
            for item in items:
                yield task_pb2.StreamTasksRequest(
                    correlation_id=str(next(counter)),
                    task=task_spec(
                        item.op,
                        item.inputs,
                        item.params or {},
                        device=item.device,
                        priority=item.priority,
                    ),
                )

        call = self._tasks.StreamTasks(requests(), metadata=self._metadata)
        try:
            for response in call:
                yield int(response.correlation_id), TaskInfo.from_proto(response.task)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def map(
        self, op: str, inputs: Iterable[Sequence[np.ndarray]], **params: object
    ) -> list[np.ndarray | tuple[np.ndarray, ...]]:
        """Runs `op` over every tuple of inputs through one stream; results in
        input order. The first failed task raises."""
        return in_order(dict(self.stream(StreamItem(op, tuple(args), params) for args in inputs)))

    def get_task(self, name: str) -> TaskInfo:
        response = self._call(self._tasks.GetTask, task_pb2.GetTaskRequest(name=name))
        return TaskInfo.from_proto(response.task)

    def cancel_task(self, name: str) -> TaskInfo:
        response = self._call(self._tasks.CancelTask, task_pb2.CancelTaskRequest(name=name))
        return TaskInfo.from_proto(response.task)

    def list_tasks(
        self, state: TaskState | None = None, page_size: int = 100
    ) -> Iterator[TaskInfo]:
        token = ""
        while True:
            response = self._call(
                self._tasks.ListTasks,
                task_pb2.ListTasksRequest(
                    page_size=page_size, page_token=token, state=int(state or 0)
                ),
            )
            yield from (TaskInfo.from_proto(t) for t in response.tasks)
            token = response.next_page_token
            if not token:
                return

    def watch_task(self, name: str, timeout: float | None = None) -> Iterator[TaskEvent]:
        call = self._tasks.WatchTask(
            task_pb2.WatchTaskRequest(name=name), timeout=timeout, metadata=self._metadata
        )
        try:
            for msg in call:
                task = TaskInfo.from_proto(msg.task) if msg.HasField("task") else None
                yield TaskEvent(msg.name, TaskState(msg.state), msg.message, task)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    # -- tensors kept on the server -----------------------------------------

    def upload(self, array: np.ndarray) -> TensorRef:
        """Stores an array on the server in 1 MiB chunks (no message-size cap)."""
        try:
            response = self._tasks.UploadTensor(
                tensors.upload_requests(array),
                timeout=self.options.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return TensorRef.from_proto(response.tensor)

    def download(self, ref: TensorRef | str) -> np.ndarray:
        name = ref.name if isinstance(ref, TensorRef) else ref
        header = None
        chunks: list[bytes] = []
        try:
            for part in self._tasks.DownloadTensor(
                task_pb2.DownloadTensorRequest(name=name),
                timeout=self.options.timeout,
                metadata=self._metadata,
            ):
                if part.WhichOneof("part") == "header":
                    header = part.header
                else:
                    chunks.append(part.chunk)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if header is None:
            raise UnavailableError(f"the download of {name} ended before its header")
        return tensors.assemble(header, chunks)

    def delete(self, ref: TensorRef | str) -> None:
        name = ref.name if isinstance(ref, TensorRef) else ref
        self._call(self._tasks.DeleteTensor, task_pb2.DeleteTensorRequest(name=name))


class TaskHandle:
    """A submitted task: wait for its result, follow its events, cancel it."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"TaskHandle({self.name!r})"

    def info(self) -> TaskInfo:
        return self._client.get_task(self.name)

    def events(self, timeout: float | None = None) -> Iterator[TaskEvent]:
        return self._client.watch_task(self.name, timeout=timeout)

    def wait(self, timeout: float | None = None) -> TaskInfo:
        for event in self.events(timeout=timeout):
            if event.state.terminal and event.task is not None:
                return event.task
        return self.info()

    def result(self, timeout: float | None = None) -> np.ndarray | tuple[np.ndarray, ...]:
        """The outputs, once the task succeeds; raises if it failed or was
        cancelled."""
        info = self.wait(timeout)
        if info.state is not TaskState.SUCCEEDED:
            raise error_for(code_of(info.error_code), f"{self.name}: {info.error_message}")
        return unwrap(info.outputs) if info.outputs else info.output_refs

    def cancel(self) -> TaskInfo:
        return self._client.cancel_task(self.name)


__all__ = ["Client", "ClientOptions", "KernelmeshError", "StreamItem", "TaskHandle"]
