"""The blocking face of the Python client: each method runs one request plan
(`plans`) on a blocking transport."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from kernelmesh.clients import plans, shm
from kernelmesh.clients.errors import KernelmeshError
from kernelmesh.clients.llm import LLM
from kernelmesh.clients.options import (
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    TENANT_METADATA_KEY,
    ClientOptions,
    Connected,
    channel_options,
    retry_policy,
)
from kernelmesh.clients.transport import Transport
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
from kernelmesh.clients.workflows import Workflows


class Client(Connected):
    """Talks to a kernelmesh endpoint.

    >>> with Client("127.0.0.1:50051") as km:
    ...     c = km.run("matmul", a, b)

    api_key defaults to $KERNELMESH_API_KEY; tls, ca_bundle, client_cert and
    client_key make a TLS (or mTLS) channel (see `ClientOptions`)."""

    def _connect(
        self, target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self._io = Transport(target, options, credentials)
        # The LLM gateway: generate, stream, embed, models.
        self.llm = LLM(self._io)
        self.workflows = Workflows(self._io)
        self._regions: list[shm.SharedMemoryRegion] = []

    def close(self) -> None:
        for region in self._regions:  # best effort: the server also drops unlinked ones
            with contextlib.suppress(KernelmeshError):
                self._io.run(shm.unregister(region.name))
            region.close()
        self._regions.clear()
        self._io.close()

    # -- shared memory (clients/shm.py; the server must be on this host) ---------

    def shared_memory(self, byte_size: int, name: str | None = None) -> shm.SharedMemoryRegion:
        """Creates a shared-memory region and registers it; unregistered and removed
        by `close` (or `unregister_shared_memory`)."""
        region = shm.SharedMemoryRegion(byte_size, name)
        try:
            self._io.run(shm.register(region))
        except BaseException:
            region.close()
            raise
        self._regions.append(region)
        return region

    def unregister_shared_memory(self, region: shm.SharedMemoryRegion) -> None:
        self._io.run(shm.unregister(region.name))
        self._regions.remove(region)
        region.close()

    def run_into(
        self,
        op: str,
        *inputs: Input,
        outputs: Sequence[shm.ShmOutput],
        timeout: float | None = None,
        **params: object,
    ) -> Outputs:
        """`run`, with the outputs written by the server into shared memory; returns
        views of them there."""
        spec = task_spec(op, inputs, params)
        found = self._io.run(shm.run_into(spec, list(outputs), timeout))
        return found[0] if len(found) == 1 else found

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60.0, service: str = "kernelmesh.v1.TaskService") -> None:
        """Blocks until the server reports SERVING (kernels warmed up)."""
        self._io.run(plans.wait_ready(service, timeout))

    # -- catalog and devices ------------------------------------------------

    def ops(self) -> list[Op]:
        return self._io.run(plans.ops())

    def devices(self) -> list[Device]:
        return self._io.run(plans.devices())

    # -- tasks --------------------------------------------------------------

    def run(
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
        return self._io.run(plan)

    def run_task(
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
        return self._io.run(plans.run_task(spec, timeout))

    def submit(
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
    ) -> TaskHandle:
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
        return TaskHandle(self, self._io.run(plans.submit(spec, request_id)))

    def stream(self, items: Iterable[StreamItem]) -> Iterator[tuple[int, TaskInfo]]:
        """Pipelines many tasks over one StreamTasks call; yields
        (index of the item, finished task) in completion order."""
        return self._io.stream(plans.stream_tasks(items))

    def map(
        self, op: str, inputs: Iterable[Sequence[np.ndarray]], **params: object
    ) -> list[Outputs]:
        """Runs `op` over every tuple of inputs through one stream; results in
        input order. The first failed task raises."""
        return self._io.run(plans.map_op(op, inputs, params))

    def get_task(self, name: str) -> TaskInfo:
        return self._io.run(plans.get_task(name))

    def cancel_task(self, name: str) -> TaskInfo:
        return self._io.run(plans.cancel_task(name))

    def list_tasks(
        self, state: TaskState | None = None, page_size: int = 100
    ) -> Iterator[TaskInfo]:
        return self._io.pages(plans.list_tasks(state, page_size))

    def watch_task(self, name: str, timeout: float | None = None) -> Iterator[TaskEvent]:
        return self._io.stream(plans.watch_task(name, timeout))

    # -- tensors kept on the server -----------------------------------------

    def upload(self, array: np.ndarray) -> TensorRef:
        """Stores an array on the server in 4 MiB chunks (no message-size cap)."""
        return self._io.run(plans.upload_tensor(array))

    def download(self, ref: TensorRef | str) -> np.ndarray:
        return self._io.run(plans.download_tensor(ref))

    def delete(self, ref: TensorRef | str) -> None:
        self._io.run(plans.delete_tensor(ref))


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
        return self._client._io.run(plans.wait(self.name, timeout))

    def result(self, timeout: float | None = None) -> Outputs | tuple[TensorRef, ...]:
        """The outputs, once the task succeeds; raises if it failed or was
        cancelled."""
        return self._client._io.run(plans.result(self.name, timeout))

    def cancel(self) -> TaskInfo:
        return self._client.cancel_task(self.name)


__all__ = [
    "DEFAULT_TARGET",
    "MAX_MESSAGE_BYTES",
    "TENANT_METADATA_KEY",
    "Client",
    "ClientOptions",
    "KernelmeshError",
    "StreamItem",
    "TaskHandle",
    "channel_options",
    "retry_policy",
]
