"""The asyncio Python client (grpc.aio); the same surface as `Client`."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying

from kernelmesh.clients import tensors
from kernelmesh.clients.client import (
    DEFAULT_TARGET,
    TENANT_METADATA_KEY,
    ClientOptions,
    StreamItem,
    channel_options,
    retry_policy,
)
from kernelmesh.clients.errors import UnavailableError, error_for, from_rpc_error
from kernelmesh.clients.llm import AsyncLLM
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


class AsyncClient:
    """`async with AsyncClient(target) as km: y = await km.run("relu", x)`"""

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
            self._channel = grpc.aio.insecure_channel(target, options=chan_opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=chan_opts)
        self._tasks = task_pb2_grpc.TaskServiceStub(self._channel)
        self._devices = device_pb2_grpc.DeviceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = ((TENANT_METADATA_KEY, tenant),) if tenant else ()
        # The LLM gateway: generate, stream, embed, models.
        self.llm = AsyncLLM(self._channel, self._call, self._metadata, self.options.timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None = None
    ) -> T:
        async for attempt in AsyncRetrying(**retry_policy(self.options)):
            with attempt:
                try:
                    return await method(
                        request,
                        timeout=self.options.timeout if timeout is None else timeout,
                        metadata=self._metadata,
                    )
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from None
        raise AssertionError("unreachable")

    async def wait_ready(
        self, timeout: float = 60.0, service: str = "kernelmesh.v1.TaskService"
    ) -> None:
        call = self._health.Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        try:
            async for response in call:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
        raise UnavailableError(f"{service} stopped before it was serving")

    async def ops(self) -> list[Op]:
        response = await self._call(self._tasks.ListOps, task_pb2.ListOpsRequest(page_size=1000))
        return [Op.from_proto(m) for m in response.ops]

    async def devices(self) -> list[Device]:
        response = await self._call(
            self._devices.ListDevices, device_pb2.ListDevicesRequest(page_size=1000)
        )
        return [Device.from_proto(m) for m in response.devices]

    async def run(
        self,
        op: str,
        *inputs: np.ndarray | TensorRef | float | int,
        device: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        **params: object,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        spec = task_spec(op, inputs, params, device=device, priority=priority)
        response = await self._call(
            self._tasks.RunTask, task_pb2.RunTaskRequest(task=spec), timeout
        )
        return unwrap(TaskInfo.from_proto(response.task).outputs)

    async def run_task(
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
        response = await self._call(
            self._tasks.RunTask, task_pb2.RunTaskRequest(task=spec), timeout
        )
        return TaskInfo.from_proto(response.task)

    async def submit(
        self,
        op: str,
        *inputs: np.ndarray | TensorRef | float | int,
        device: str | None = None,
        priority: int = 0,
        keep_outputs: bool = False,
        labels: Mapping[str, str] | None = None,
        **params: object,
    ) -> AsyncTaskHandle:
        spec = task_spec(
            op,
            inputs,
            params,
            device=device,
            priority=priority,
            keep_outputs=keep_outputs,
            labels=labels,
        )
        response = await self._call(self._tasks.SubmitTask, task_pb2.SubmitTaskRequest(task=spec))
        return AsyncTaskHandle(self, response.task.name)

    async def stream(self, items: Iterable[StreamItem]) -> AsyncIterator[tuple[int, TaskInfo]]:
        counter = itertools.count()

        def requests():
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
            async for response in call:
                yield int(response.correlation_id), TaskInfo.from_proto(response.task)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def map(
        self, op: str, inputs: Iterable[Sequence[np.ndarray]], **params: object
    ) -> list[np.ndarray | tuple[np.ndarray, ...]]:
        """Runs `op` over every tuple of inputs through one stream; results in
        input order. The first failed task raises."""
        items = (StreamItem(op, tuple(args), params) for args in inputs)
        return in_order({index: info async for index, info in self.stream(items)})

    async def list_tasks(
        self, state: TaskState | None = None, page_size: int = 100
    ) -> AsyncIterator[TaskInfo]:
        token = ""
        while True:
            response = await self._call(
                self._tasks.ListTasks,
                task_pb2.ListTasksRequest(
                    page_size=page_size, page_token=token, state=int(state or 0)
                ),
            )
            for task in response.tasks:
                yield TaskInfo.from_proto(task)
            token = response.next_page_token
            if not token:
                return

    async def upload(self, array: np.ndarray) -> TensorRef:
        """Stores an array on the server in 1 MiB chunks (no message-size cap)."""
        try:
            response = await self._tasks.UploadTensor(
                tensors.upload_requests(array),
                timeout=self.options.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return TensorRef.from_proto(response.tensor)

    async def download(self, ref: TensorRef | str) -> np.ndarray:
        name = ref.name if isinstance(ref, TensorRef) else ref
        header = None
        chunks: list[bytes] = []
        call = self._tasks.DownloadTensor(
            task_pb2.DownloadTensorRequest(name=name),
            timeout=self.options.timeout,
            metadata=self._metadata,
        )
        try:
            async for part in call:
                if part.WhichOneof("part") == "header":
                    header = part.header
                else:
                    chunks.append(part.chunk)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        if header is None:
            raise UnavailableError(f"the download of {name} ended before its header")
        return tensors.assemble(header, chunks)

    async def delete(self, ref: TensorRef | str) -> None:
        name = ref.name if isinstance(ref, TensorRef) else ref
        await self._call(self._tasks.DeleteTensor, task_pb2.DeleteTensorRequest(name=name))

    async def get_task(self, name: str) -> TaskInfo:
        response = await self._call(self._tasks.GetTask, task_pb2.GetTaskRequest(name=name))
        return TaskInfo.from_proto(response.task)

    async def cancel_task(self, name: str) -> TaskInfo:
        response = await self._call(self._tasks.CancelTask, task_pb2.CancelTaskRequest(name=name))
        return TaskInfo.from_proto(response.task)

    async def watch_task(self, name: str, timeout: float | None = None) -> AsyncIterator[TaskEvent]:
        call = self._tasks.WatchTask(
            task_pb2.WatchTaskRequest(name=name), timeout=timeout, metadata=self._metadata
        )
        try:
            async for msg in call:
                task = TaskInfo.from_proto(msg.task) if msg.HasField("task") else None
                yield TaskEvent(msg.name, TaskState(msg.state), msg.message, task)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()


class AsyncTaskHandle:
    def __init__(self, client: AsyncClient, name: str) -> None:
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"AsyncTaskHandle({self.name!r})"

    async def info(self) -> TaskInfo:
        return await self._client.get_task(self.name)

    def events(self, timeout: float | None = None) -> AsyncIterator[TaskEvent]:
        return self._client.watch_task(self.name, timeout=timeout)

    async def wait(self, timeout: float | None = None) -> TaskInfo:
        async for event in self.events(timeout=timeout):
            if event.state.terminal and event.task is not None:
                return event.task
        return await self.info()

    async def result(self, timeout: float | None = None) -> np.ndarray | tuple[np.ndarray, ...]:
        info = await self.wait(timeout)
        if info.state is not TaskState.SUCCEEDED:
            raise error_for(code_of(info.error_code), f"{self.name}: {info.error_message}")
        return unwrap(info.outputs) if info.outputs else info.output_refs

    async def cancel(self) -> TaskInfo:
        return await self._client.cancel_task(self.name)


__all__ = ["AsyncClient", "AsyncTaskHandle"]
