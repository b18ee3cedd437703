"""The kernelmesh Python client: `Client` (blocking) and `AsyncClient` (asyncio)."""

from kernelmesh.clients.aio import AsyncClient, AsyncTaskHandle
from kernelmesh.clients.client import Client, StreamItem, TaskHandle
from kernelmesh.clients.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    KernelmeshError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from kernelmesh.clients.types import Device, Op, TaskEvent, TaskInfo, TaskState, TensorRef

__all__ = [
    "AsyncClient",
    "AsyncTaskHandle",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "Device",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "KernelmeshError",
    "NotFoundError",
    "Op",
    "ResourceExhaustedError",
    "StreamItem",
    "TaskEvent",
    "TaskHandle",
    "TaskInfo",
    "TaskState",
    "TensorRef",
    "UnavailableError",
    "UnimplementedError",
]
