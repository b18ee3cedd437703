"""The hop from an orchestrator to a node: one attempt of a task becomes a
`TaskService.RunTask` call on the node that holds the device, and the answer
(or the failure) comes back as the attempt's end.

Every forwarded call goes through `Forwarder.__call__`; its metadata is built
in `call_metadata` (tenant, the node key, and the task's stored trace context),
the one place to thread traces through the hop."""

from __future__ import annotations

import json
import os
import time

import grpc
import numpy as np
from google.protobuf import json_format

from kernelmesh.core import metrics
from kernelmesh.core.errors import Code, KernelmeshError
from kernelmesh.core.mesh.nodes import AttemptFailed, Node, NodeLost, RemoteDevice
from kernelmesh.core.mesh.tensors import RemoteTensor
from kernelmesh.core.ops import Limits
from kernelmesh.core.tasks import Task, TaskFailure
from kernelmesh.services import convert, tracing
from kernelmesh.services.context import TENANT_METADATA_KEY
from kernelmesh.v1 import task_pb2, task_pb2_grpc, tensor_pb2

API_KEY_ENV = "KERNELMESH_API_KEY"
# A node that answers these has not run the attempt to an end: it goes back to the queue.
_LOST_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


def call_metadata(task: Task, api_key: str | None) -> list[tuple[str, str]]:
    """`api_key`: what the node admits calls with (the token it registered with)."""
    metadata = [(TENANT_METADATA_KEY, task.tenant)]
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    if task.trace_context:
        # W3C headers (traceparent, tracestate) captured when the task was accepted.
        metadata.extend((k.lower(), str(v)) for k, v in json.loads(task.trace_context).items())
    return metadata


class Forwarder:
    """One channel per node address, reused by every attempt sent there."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        limits: Limits,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        # Presented to a node that registered without a token of its own.
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.credentials = credentials
        self.limits = limits
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A failed attempt is the task's to retry (its policy, another node),
            # not gRPC's: no retry buffering on every call.
            ("grpc.enable_retries", 0),
        ]
        self._stubs: dict[str, tuple[grpc.aio.Channel, task_pb2_grpc.TaskServiceStub]] = {}

    def stub(self, node: Node) -> task_pb2_grpc.TaskServiceStub:
        """The TaskService of a node, on the channel kept for its address."""
        return self._stub(node.address)

    def metadata(self, node: Node, tenant: str) -> list[tuple[str, str]]:
        metadata = [(TENANT_METADATA_KEY, tenant)]
        credential = node.token or self.api_key
        if credential:
            metadata.append(("authorization", f"Bearer {credential}"))
        return metadata

    async def fetch(self, item: RemoteTensor, node: Node | None, timeout: float | None) -> bytes:
        """A stored tensor's bytes, downloaded from the node that holds it."""
        if node is None:
            raise AttemptFailed(
                TaskFailure(
                    Code.FAILED_PRECONDITION,
                    f"tensor {item.name} is held by node {item.node}, which is not in the mesh",
                )
            )
        data = bytearray()
        try:
            call = self._stub(node.address).DownloadTensor(
                task_pb2.DownloadTensorRequest(name=item.name),
                metadata=self.metadata(node, item.tenant),
                timeout=timeout,
            )
            async for part in call:
                if part.WhichOneof("part") == "chunk":
                    data += part.chunk
        except grpc.aio.AioRpcError as exc:
            raise AttemptFailed(
                TaskFailure(
                    Code.FAILED_PRECONDITION,
                    f"tensor {item.name} could not be read from node {item.node}: "
                    f"{exc.code().name} {exc.details()}",
                )
            ) from None
        return bytes(data)

    def _stub(self, address: str) -> task_pb2_grpc.TaskServiceStub:
        found = self._stubs.get(address)
        if found is None:
            channel = tracing.aio_channel(
                address, credentials=self.credentials, options=self._options
            )
            found = self._stubs[address] = (channel, task_pb2_grpc.TaskServiceStub(channel))
        return found[1]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close(None)
        self._stubs.clear()

    async def __call__(self, device: RemoteDevice, task: Task) -> list[np.ndarray]:
        assert device.node is not None and task.call is not None and task.inputs is not None
        node = device.node
        # Filled in place: RunTaskRequest(task=spec) would copy every input's bytes again.
        request = task_pb2.RunTaskRequest()
        spec = request.task
        spec.op = task.op
        spec.priority = task.priority
        spec.device.name = device.local_name
        if task.call.params:
            json_format.ParseDict(dict(task.call.params), spec.params)
        timeout = None
        if task.deadline is not None:
            timeout = max(0.001, task.deadline - time.monotonic())
        remote = task.remote_inputs
        for i, array in enumerate(task.inputs):
            held = remote.get(i) if remote else None
            if held is None:
                _fill_input(spec.inputs.add().tensor, array)
                continue
            try:
                held.check_held()
            except KernelmeshError as exc:
                raise AttemptFailed(TaskFailure(exc.code, exc.message)) from None
            if held.node == node.name:
                spec.inputs.add().ref = held.name  # already there
                continue
            # Placed away from its input: the bytes move through this orchestrator.
            data = await self.fetch(held, node.mesh.nodes.get(held.node), timeout)
            metrics.TENSOR_MOVES.inc(())
            tensor = spec.inputs.add().tensor
            tensor.dtype = convert.NUMPY_TO_DTYPE[held.dtype]
            tensor.shape.extend(held.shape)
            tensor.data = data
        # An orchestrator that keeps its tensors on the nodes: kept outputs stay
        # on the node that produced them, recorded where they are.
        keep = task.keep_outputs and node.mesh.tensors is not None
        spec.keep_outputs = keep
        try:
            response = await self._stub(node.address).RunTask(
                request,
                timeout=timeout,
                metadata=call_metadata(task, node.token or self.api_key),
                wait_for_ready=False,
            )
        except grpc.aio.AioRpcError as exc:
            where = f"node {node.name} ({node.address})"
            if exc.code() in _LOST_CODES:
                raise NodeLost(f"{where} is unreachable: {exc.details()}") from None
            raise AttemptFailed(
                TaskFailure(_code(exc.code()), f"on {device.name}: {exc.details()}")
            ) from None
        if keep:
            return self._kept(device, task, response.task)
        return self._checked(device, task, response.task)

    def _kept(self, device: RemoteDevice, task: Task, msg: task_pb2.Task) -> list[np.ndarray]:
        """Outputs the node kept: each must be what the op promised. Returns
        stand-ins; `task.remote_outputs` says where the tensors are."""
        assert device.node is not None
        expected = task.call.outputs if task.call is not None else ()
        problem = None
        kept: list[RemoteTensor] = []
        if len(msg.output_refs) != len(expected):
            problem = f"{len(msg.output_refs)} kept outputs where the op gives {len(expected)}"
        for i, (ref, meta) in enumerate(zip(msg.output_refs, expected, strict=False)):
            dtype = convert.DTYPE_TO_NUMPY.get(ref.dtype)
            if dtype is None or dtype.name != meta.dtype or tuple(ref.shape) != meta.shape:
                problem = f"kept output {i} is {ref.dtype}{list(ref.shape)}, expected " + (
                    f"{meta.dtype}{list(meta.shape)}"
                )
                break
            kept.append(
                RemoteTensor(
                    name=ref.name,
                    tenant=task.tenant,
                    node=device.node.name,
                    device=ref.device,
                    dtype=meta.dtype,
                    shape=meta.shape,
                )
            )
        if problem is not None:
            metrics.RESULTS_REFUSED.inc(())
            raise AttemptFailed(
                TaskFailure(
                    Code.INTERNAL, f"result refused: node {device.node.name} returned {problem}"
                )
            )
        task.remote_outputs = kept
        return [k.placeholder() for k in kept]

    def _checked(self, device: RemoteDevice, task: Task, msg: task_pb2.Task) -> list[np.ndarray]:
        """The node's outputs, if they are what the op promised; a node that answers
        with another shape or dtype has its result refused."""
        expected = task.call.outputs if task.call is not None else ()
        problem = None
        outputs: list[np.ndarray] = []
        if len(msg.outputs) != len(expected):
            problem = f"{len(msg.outputs)} outputs where the op gives {len(expected)}"
        else:
            # The op's validated call says what each output must be: compared as
            # they come, without validating them afresh (the shapes are known).
            for i, (out, meta) in enumerate(zip(msg.outputs, expected, strict=True)):
                shape = tuple(out.shape)
                if out.dtype != convert.NUMPY_TO_DTYPE.get(meta.dtype) or shape != meta.shape:
                    dtype = convert.DTYPE_TO_NUMPY.get(out.dtype)
                    got = dtype.name if dtype is not None else f"dtype {out.dtype}"
                    problem = (
                        f"output {i} is {got}{list(shape)}, expected {meta.dtype}{list(meta.shape)}"
                    )
                    break
                dtype = convert.DTYPE_TO_NUMPY[out.dtype]
                data = out.data  # a fresh copy per read: read once
                if len(data) != meta.size * dtype.itemsize:
                    problem = f"output {i} has {len(data)} bytes for {meta.dtype}{list(shape)}"
                    break
                outputs.append(np.frombuffer(data, dtype).reshape(shape))
        if problem is not None:
            metrics.RESULTS_REFUSED.inc(())
            raise AttemptFailed(
                TaskFailure(
                    Code.INTERNAL, f"result refused: node {device.node.name} returned {problem}"
                )
            )
        return outputs


# kernelmesh.v1.Dtype of each numpy dtype as the wire carries it (dtype.name is slow).
_WIRE_CODES = {dtype: code for code, dtype in convert.DTYPE_TO_NUMPY.items()}


def _fill_input(msg: tensor_pb2.Tensor, array: np.ndarray) -> None:
    """An input tensor as the caller sent it: an array decoded from a request
    (numpy.frombuffer over the bytes gRPC handed us) goes out as those very bytes,
    without `tobytes()` copying them first."""
    wire = array.base
    while isinstance(wire, np.ndarray):
        wire = wire.base
    code = _WIRE_CODES.get(array.dtype)  # native byte order only: the wire's is little-endian
    if (
        type(wire) is bytes
        and code is not None
        and array.flags.c_contiguous
        and len(wire) == array.nbytes
    ):
        msg.dtype = code
        msg.shape.extend(array.shape)
        msg.data = wire
    else:
        convert.fill_tensor(msg, array)


def _code(code: grpc.StatusCode) -> Code | int:
    value = code.value[0]
    try:
        return Code(value)
    except ValueError:
        return value
