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
from kernelmesh.clients.llm import (
    AsyncTextStream,
    ChatMessage,
    Generation,
    Model,
    TextStream,
    Usage,
)
from kernelmesh.clients.types import Device, Op, TaskEvent, TaskInfo, TaskState, TensorRef

__all__ = [
    "AsyncClient",
    "AsyncTaskHandle",
    "AsyncTextStream",
    "CancelledError",
    "ChatMessage",
    "Client",
    "DeadlineExceededError",
    "Device",
    "FailedPreconditionError",
    "FieldViolation",
    "Generation",
    "InternalError",
    "InvalidArgumentError",
    "KernelmeshError",
    "Model",
    "NotFoundError",
    "Op",
    "ResourceExhaustedError",
    "StreamItem",
    "TaskEvent",
    "TaskHandle",
    "TaskInfo",
    "TaskState",
    "TensorRef",
    "TextStream",
    "UnavailableError",
    "UnimplementedError",
    "Usage",
]
