"""Fuzzing kernelmesh over the wire: hypothesis strategies for every request
message of every kernelmesh.v1 service (built from the descriptors, plus
byte-level mutations of valid requests), and a runner that sends them to a
real server with raw gRPC calls and classifies the outcome.

Shared by tests/fuzz/test_fuzz.py (a CI-sized run) and benchmarks/fuzz.py
(long runs). The rule: no INTERNAL, no UNKNOWN, no hang (a unary call past
its deadline), no crash (UNAVAILABLE, or the process gone)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from kernelmesh.core.ops import CATALOG
from kernelmesh.v1 import (
    device_pb2,
    llm_pb2,
    orchestrator_pb2,
    shm_pb2,
    task_pb2,
    tensor_pb2,
)

# every kernelmesh.v1 service, and the standard ones every server carries
FILES = (task_pb2, device_pb2, llm_pb2, orchestrator_pb2, shm_pb2, health_pb2, reflection_pb2)
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CALL_TIMEOUT = 10.0  # seconds: a unary answer later than this is a hang
# Watches run forever (WatchDevices sends one status per interval, up to a minute
# apart): their first answer is read, then the call is cancelled.
STREAM_ITEMS = 1


@dataclass(frozen=True)
class Method:
    path: str  # "/kernelmesh.v1.TaskService/RunTask"
    descriptor: MethodDescriptor

    @property
    def client_streaming(self) -> bool:
        return self.descriptor.client_streaming

    @property
    def server_streaming(self) -> bool:
        return self.descriptor.server_streaming

    @property
    def request(self) -> Descriptor:
        return self.descriptor.input_type


def methods() -> list[Method]:
    found = []
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                found.append(Method(f"/{service.full_name}/{m.name}", m))
    return found


# --- structured messages from descriptors ---------------------------------

_INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, 99, 1 << 20, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
_INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 3, 1 << 32, 1 << 62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
_UINT32 = st.integers(0, 2**32 - 1)
_UINT64 = st.integers(0, 2**64 - 1)
_DOUBLE = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e308, -1e308, float("nan"), float("inf"), 2.0**63]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            "matmul",
            "add",
            "sum",
            "conv2d",
            "fft",
            "tasks/x",
            "tensors/x",
            "apiKeys/x",
            "cpu:0",
            "local",
            "default",
            "offset:1",
            "x" * 5000,
        ]
    ),
    st.text(max_size=40),
)
_BYTES = st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=512))

_SCALARS = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_DOUBLE: _DOUBLE,
    FieldDescriptor.TYPE_FLOAT: _DOUBLE,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: _TEXT,
    FieldDescriptor.TYPE_BYTES: _BYTES,
}
MAX_DEPTH = 4


def _repeated(f: FieldDescriptor) -> bool:
    if hasattr(f, "is_repeated"):
        return bool(f.is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED


def _enum_values(f: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in f.enum_type.values]
    return st.one_of(st.sampled_from(known), st.integers(-3, 12), st.just(2**31 - 1))


@st.composite
def message(draw: st.DrawFn, desc: Descriptor, depth: int = 0):
    """A message of type `desc` with a random subset of fields set to random,
    often hostile, values."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        # a value this field's Python type refuses (e.g. 1e308 into a float) is left out
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            _fill(draw, msg, f, depth)
    return msg


def _value(draw: st.DrawFn, f: FieldDescriptor, depth: int):
    if f.type == FieldDescriptor.TYPE_ENUM:
        return draw(_enum_values(f))
    return draw(_SCALARS[f.type])


def _fill(draw: st.DrawFn, msg, f: FieldDescriptor, depth: int) -> None:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= MAX_DEPTH:
            return
        sub = f.message_type
        if sub.GetOptions().map_entry:
            key_f, value_f = sub.fields_by_name["key"], sub.fields_by_name["value"]
            target = getattr(msg, f.name)
            for _ in range(draw(st.integers(0, 3))):
                key = _value(draw, key_f, depth)
                if value_f.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(draw(message(value_f.message_type, depth + 1)))
                else:
                    target[key] = _value(draw, value_f, depth)
            return
        if _repeated(f):
            container = getattr(msg, f.name)
            for _ in range(draw(st.integers(0, 3))):
                container.add().CopyFrom(draw(message(sub, depth + 1)))
        else:
            getattr(msg, f.name).CopyFrom(draw(message(sub, depth + 1)))
        return
    if _repeated(f):
        count = draw(st.integers(0, 6))
        getattr(msg, f.name).extend([_value(draw, f, depth) for _ in range(count)])
    else:
        setattr(msg, f.name, _value(draw, f, depth))


# --- valid requests, the seeds of byte-level mutation ---------------------


def _tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    dtypes = {"float32": 1, "float64": 2, "int32": 3, "int64": 4, "complex64": 5}
    return tensor_pb2.Tensor(
        dtype=dtypes[array.dtype.name], shape=array.shape, data=array.tobytes()
    )


def _spec(op: str, *arrays: np.ndarray, **params: object) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(op=op, labels={"k": "v"})
    for a in arrays:
        spec.inputs.add(tensor=_tensor(a))
    if params:
        s = struct_pb2.Struct()
        s.update(params)
        spec.params.CopyFrom(s)
    return spec


def _valid_specs() -> list[task_pb2.TaskSpec]:
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    return [
        _spec("matmul", m, m.T.copy()),
        _spec("add", m, m),
        _spec("sum", m, axis=1, keepdims=True),
        _spec("softmax", m),
        _spec(
            "conv2d",
            np.ones((1, 1, 4, 4), np.float32),
            np.ones((1, 1, 2, 2), np.float32),
            stride=[1, 2],
            padding=1,
        ),
        _spec("fft", np.ones(8, np.float32)),
        _spec("transpose", m),
        _spec("scale", m, factor=2.0),
    ]


def seeds(method: Method) -> list[list[bytes]]:
    """Valid requests (each a list of stream items; one item for unary calls)."""
    name = method.descriptor.name
    cls = message_factory.GetMessageClass(method.request)
    specs = _valid_specs()
    out: list[list] = []
    if name in ("RunTask", "SubmitTask"):
        out = [[cls(task=s)] for s in specs]
    elif name == "StreamTasks":
        out = [[cls(correlation_id=str(i), task=s) for i, s in enumerate(specs[:3])]]
    elif name == "UploadTensor":
        data = np.ones(6, np.float32).tobytes()
        out = [
            [
                cls(header=task_pb2.TensorHeader(dtype=1, shape=[2, 3])),
                cls(chunk=data[:12]),
                cls(chunk=data[12:]),
            ]
        ]
    elif name in ("Generate", "GenerateStream"):
        out = [[cls(model="local", messages=[llm_pb2.ChatMessage(role=2, content="hi")])]]
    elif name == "Embed":
        out = [[cls(model="local", inputs=["hello", "world"])]]
    elif name == "CreateApiKey":
        out = [[cls(tenant="t", role=2, label="fuzz")]]
    elif name == "WatchDevices":
        out = [[cls(names=["cpu:0"], interval_ms=100)]]
    else:
        out = [[cls()]]
        fields = method.request.fields_by_name
        if "page_size" in fields:
            out.append([cls(page_size=2, page_token="")])
        if "name" in fields:
            out.append([cls(name="tasks/0123456789abcdef")])
    return [[m.SerializeToString() for m in items] for items in out]


# Numbers at and past the ends of int64 and float64, and the shapes a param of
# the catalog could take: each is set as a declared param of a valid call.
_EXTREME_NUMBERS = [
    2**63,
    -(2**63),
    2**63 - 1,
    2**62,
    -(2**62),
    2**53 + 1,
    1e300,
    -1e300,
    1e308,
    5e-324,
    0,
    -1,
    0.5,
]
_EXTREME_PARAM = st.one_of(
    st.sampled_from(_EXTREME_NUMBERS),
    st.lists(st.sampled_from(_EXTREME_NUMBERS), min_size=0, max_size=3),
    st.sampled_from([True, "1", None]),
)


@st.composite
def extreme_params(draw: st.DrawFn) -> task_pb2.TaskSpec:
    """A valid call (of an op with params) whose declared params are set to
    extreme numbers: int64's ends, 1e300, lists of them."""
    spec = task_pb2.TaskSpec()
    spec.CopyFrom(draw(st.sampled_from([s for s in _valid_specs() if CATALOG[s.op].params])))
    declared = [p.name for p in CATALOG[spec.op].params]
    names = draw(st.lists(st.sampled_from(declared), min_size=1, unique=True))
    spec.params.update({name: draw(_EXTREME_PARAM) for name in names})
    return spec


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few byte-level edits: flips, inserts, deletes, truncation,
    a varint blown up, a length prefix lied about."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "varint", "dup"]))
        at = draw(st.integers(0, max(0, len(buf))))
        if op == "flip" and buf:
            i = min(at, len(buf) - 1)
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[min(at, len(buf) - 1)] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12]))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[at:]
        elif op == "varint":
            buf[at:at] = b"\xff" * draw(st.integers(1, 11))
        elif op == "dup" and buf:
            end = min(len(buf), at + draw(st.integers(1, 32)))
            buf[at:at] = buf[at:end]
    return bytes(buf)


def extreme_requests(method: Method) -> st.SearchStrategy[list[bytes]]:
    """`extreme_params` calls, as what RunTask, SubmitTask or StreamTasks sends."""
    cls = message_factory.GetMessageClass(method.request)
    if method.descriptor.name == "StreamTasks":
        return extreme_params().map(lambda s: [cls(correlation_id="x", task=s).SerializeToString()])
    return extreme_params().map(lambda s: [cls(task=s).SerializeToString()])


def requests(method: Method) -> st.SearchStrategy[list[bytes]]:
    """What one fuzz case sends to `method`: a list of serialized stream items."""
    structured = message(method.request).map(lambda m: m.SerializeToString())
    count = (1, 3) if method.client_streaming else (1, 1)
    structured_items = st.lists(structured, min_size=count[0], max_size=count[1])
    seed_lists = seeds(method)

    @st.composite
    def mutated_items(draw: st.DrawFn) -> list[bytes]:
        items = list(draw(st.sampled_from(seed_lists)))
        i = draw(st.integers(0, len(items) - 1))
        items[i] = draw(mutated(items[i]))
        return items

    strategies = [structured_items, mutated_items(), st.sampled_from(seed_lists)]
    if method.descriptor.name in ("RunTask", "SubmitTask", "StreamTasks"):
        strategies.append(extreme_requests(method))
    return st.one_of(*strategies)


# --- sending ---------------------------------------------------------------


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    slow: Counter[str] = field(default_factory=Counter)  # deadlines met by streams
    failures: list[str] = field(default_factory=list)
    cases: int = 0

    def add(self, method: Method, code: grpc.StatusCode, details: str, sent: list[bytes]) -> None:
        self.cases += 1
        self.codes[code.name] += 1
        hang = code is grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            self.slow[method.path] += 1
        if code in BAD_CODES or hang or code is grpc.StatusCode.UNAVAILABLE:
            self.failures.append(
                f"{method.path} -> {code.name}: {details[:300]} (sent {sent!r:.300})"
            )


def call(
    channel: grpc.Channel,
    method: Method,
    items: list[bytes],
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    """Sends raw request bytes; returns the call's status code and details."""
    path = method.path
    kw = {"timeout": CALL_TIMEOUT, "metadata": metadata}
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(path)(items[0], **kw)
        elif not method.client_streaming:
            _drain(channel.unary_stream(path)(items[0], **kw))
        elif not method.server_streaming:
            channel.stream_unary(path)(iter(items), **kw)
        else:
            stream = channel.stream_stream(path)(iter(items), **kw)
            failed = _drain(stream, items_have_status=path.endswith("/StreamTasks"))
            if failed is not None:
                return failed
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _drain(stream: Iterator, items_have_status: bool = False) -> tuple[grpc.StatusCode, str] | None:
    """Reads the stream's first items. With `items_have_status` (StreamTasks: one
    bad item fails alone, the call itself stays OK), an item failed INTERNAL or
    UNKNOWN is returned as the call's outcome."""
    for i, raw in enumerate(stream):
        if items_have_status:
            error = task_pb2.StreamTasksResponse.FromString(raw).task.error
            code = _CODES.get(error.code)
            if code in BAD_CODES:
                stream.cancel()
                return code, f"a StreamTasks item: {error.message}"
        if i + 1 >= STREAM_ITEMS:
            stream.cancel()  # a watch would go on forever; what came is enough
            return None
    return None


__all__ = [
    "BAD_CODES",
    "Method",
    "Tally",
    "call",
    "extreme_params",
    "extreme_requests",
    "methods",
    "requests",
    "seeds",
]
