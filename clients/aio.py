"""The asyncio face of the Python client (grpc.aio): the same surface as
`Client`, each method running the same request plan (`plans`) on an asyncio
transport."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import grpc
import numpy as np

from kernelmesh.clients import plans, shm
from kernelmesh.clients.errors import KernelmeshError
from kernelmesh.clients.llm import AsyncLLM
from kernelmesh.clients.options import ClientOptions, Connected
from kernelmesh.clients.transport import AsyncTransport
from kernelmesh.clients.types import (
    Device,
    Input,
    Op,
    Outputs,
    RetryPolicy,
    StreamItem,
    TaskEvent,
    TaskInfo,
    TaskState,
    TensorRef,
    task_spec,
)
from kernelmesh.clients.workflows import AsyncWorkflows


class AsyncClient(Connected):
    """`async with AsyncClient(target) as km: y = await km.run("relu", x)`

    Takes the same options as `Client`."""

    def _connect(
        self, target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self._io = AsyncTransport(target, options, credentials)
        # The LLM gateway: generate, stream, embed, models.
        self.llm = AsyncLLM(self._io)
        self.workflows = AsyncWorkflows(self._io)
        self._regions: list[shm.SharedMemoryRegion] = []

    async def close(self) -> None:
        for region in self._regions:  # best effort: the server also drops unlinked ones
            with contextlib.suppress(KernelmeshError):
                await self._io.run(shm.unregister(region.name))
            region.close()
        self._regions.clear()
        await self._io.close()

    # -- shared memory (clients/shm.py; the server must be on this host) ---------

    async def shared_memory(
        self, byte_size: int, name: str | None = None
    ) -> shm.SharedMemoryRegion:
        """Creates a shared-memory region and registers it (see `Client`)."""
        region = shm.SharedMemoryRegion(byte_size, name)
        try:
            await self._io.run(shm.register(region))
        except BaseException:
            region.close()
            raise
        self._regions.append(region)
        return region

    async def unregister_shared_memory(self, region: shm.SharedMemoryRegion) -> None:
        await self._io.run(shm.unregister(region.name))
        self._regions.remove(region)
        region.close()

    async def run_into(
        self,
        op: str,
        *inputs: Input,
        outputs: Sequence[shm.ShmOutput],
        timeout: float | None = None,
        **params: object,
    ) -> Outputs:
        """`run`, with the outputs written by the server into shared memory."""
        spec = task_spec(op, inputs, params)
        found = await self._io.run(shm.run_into(spec, list(outputs), timeout))
        return found[0] if len(found) == 1 else found

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(
        self, timeout: float = 60.0, service: str = "kernelmesh.v1.TaskService"
    ) -> None:
        """Waits until the server reports SERVING (kernels warmed up)."""
        await self._io.run(plans.wait_ready(service, timeout))

    # -- catalog and devices ------------------------------------------------

    async def ops(self) -> list[Op]:
        return await self._io.run(plans.ops())

    async def devices(self) -> list[Device]:
        return await self._io.run(plans.devices())

    # -- tasks --------------------------------------------------------------

    async def run(
        self,
        op: str,
        *inputs: Input,
        device: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        **params: object,
    ) -> Outputs:
        """Runs an op and returns its output as a NumPy array (a tuple for
        several outputs). Raises a KernelmeshError subclass on failure. Inputs of
        `plans.BULK_BYTES` or more travel in chunks (UploadTensor/DownloadTensor)."""
        plan = plans.run_op(op, inputs, params, device=device, priority=priority, timeout=timeout)
        return await self._io.run(plan)

    async def run_task(
        self,
        op: str,
        *inputs: Input,
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
        return await self._io.run(plans.run_task(spec, timeout))

    async def submit(
        self,
        op: str,
        *inputs: Input,
        device: str | None = None,
        priority: int = 0,
        keep_outputs: bool = False,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        retry: RetryPolicy | None = None,
        **params: object,
    ) -> AsyncTaskHandle:
        """Queues a task and returns a handle at once. request_id (default: a
        fresh UUID) makes the submission idempotent, retries included. retry:
        how failed attempts are retried (default: the server's, 3 attempts);
        like device and the other keywords, it is never an op param."""
        spec = task_spec(
            op,
            inputs,
            params,
            device=device,
            priority=priority,
            keep_outputs=keep_outputs,
            labels=labels,
            retry=retry,
        )
        return AsyncTaskHandle(self, await self._io.run(plans.submit(spec, request_id)))

    def stream(self, items: Iterable[StreamItem]) -> AsyncIterator[tuple[int, TaskInfo]]:
        """Pipelines many tasks over one StreamTasks call; yields
        (index of the item, finished task) in completion order."""
        return self._io.stream(plans.stream_tasks(items))

    async def map(
        self, op: str, inputs: Iterable[Sequence[np.ndarray]], **params: object
    ) -> list[Outputs]:
        """Runs `op` over every tuple of inputs through one stream; results in
        input order. The first failed task raises."""
        return await self._io.run(plans.map_op(op, inputs, params))

    async def get_task(self, name: str) -> TaskInfo:
        return await self._io.run(plans.get_task(name))

    async def cancel_task(self, name: str) -> TaskInfo:
        return await self._io.run(plans.cancel_task(name))

    def list_tasks(
        self, state: TaskState | None = None, page_size: int = 100
    ) -> AsyncIterator[TaskInfo]:
        return self._io.pages(plans.list_tasks(state, page_size))

    def watch_task(self, name: str, timeout: float | None = None) -> AsyncIterator[TaskEvent]:
        return self._io.stream(plans.watch_task(name, timeout))

    # -- tensors kept on the server -----------------------------------------

    async def upload(self, array: np.ndarray) -> TensorRef:
        """Stores an array on the server in 4 MiB chunks (no message-size cap)."""
        return await self._io.run(plans.upload_tensor(array))

    async def download(self, ref: TensorRef | str) -> np.ndarray:
        return await self._io.run(plans.download_tensor(ref))

    async def delete(self, ref: TensorRef | str) -> None:
        await self._io.run(plans.delete_tensor(ref))


class AsyncTaskHandle:
    """A submitted task: await its result, follow its events, cancel it."""

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
        return await self._client._io.run(plans.wait(self.name, timeout))

    async def result(self, timeout: float | None = None) -> Outputs | tuple[TensorRef, ...]:
        """The outputs, once the task succeeds; raises if it failed or was
        cancelled."""
        return await self._client._io.run(plans.result(self.name, timeout))

    async def cancel(self) -> TaskInfo:
        return await self._client.cancel_task(self.name)


__all__ = ["AsyncClient", "AsyncTaskHandle"]
