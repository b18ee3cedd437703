"""NumPy arrays to and from kernelmesh.v1 tensors, on the client side."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# protobuf's own varint encoder (pure Python in every implementation); a test
# checks the bytes against SerializeToString, so a change to it is caught
from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]

from kernelmesh.v1 import task_pb2, tensor_pb2

_TO_NUMPY: dict[tensor_pb2.Dtype, np.dtype[Any]] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_COMPLEX64: np.dtype("<c8"),
    tensor_pb2.DTYPE_COMPLEX128: np.dtype("<c16"),
}
_FROM_NUMPY = {dt.name: code for code, dt in _TO_NUMPY.items()}


def to_proto(array: np.ndarray | float | int) -> tensor_pb2.Tensor:
    return fill(tensor_pb2.Tensor(), array)


def fill(msg: tensor_pb2.Tensor, array: np.ndarray | float | int) -> tensor_pb2.Tensor:
    """Writes `array` into `msg` in place (a request's own field: no second copy of
    the bytes from a separate message)."""
    array = np.asarray(array)
    code = _FROM_NUMPY.get(array.dtype.name)
    if code is None:
        supported = ", ".join(sorted(_FROM_NUMPY))
        raise TypeError(f"dtype {array.dtype} is not supported; use one of {supported}")
    msg.dtype = code
    msg.shape.extend(array.shape)
    msg.data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return msg


def from_proto(msg: tensor_pb2.Tensor, data: bytes | None = None) -> np.ndarray:
    """A writable array (a copy: protobuf bytes are immutable). `data`: the message's
    bytes if the caller has read them already (every read of the field is a copy)."""
    dtype = _TO_NUMPY[msg.dtype]
    raw = msg.data if data is None else data
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(msg.shape)).copy()


def dtype_name(code: tensor_pb2.Dtype) -> str:
    return _TO_NUMPY[code].name if code in _TO_NUMPY else "unspecified"


# The server's largest download chunk: per-message overhead, not copying, bounds a
# chunked transfer, so fewer, bigger messages move more bytes per second.
CHUNK_BYTES = 4 << 20


_CHUNK_TAG = bytes(
    [(task_pb2.UploadTensorRequest.DESCRIPTOR.fields_by_name["chunk"].number << 3) | 2]
)


def upload_requests(
    array: np.ndarray, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[task_pb2.UploadTensorRequest | bytes]:
    """The UploadTensor stream for an array: a header, then chunks cut straight from
    the array's memory, each already encoded as an UploadTensorRequest (one copy per
    chunk; none of the whole): building and serializing a 4 MiB message runs at
    under 1 GB/s, a copy at 8. UPLOAD_TENSOR's serializer passes bytes through."""
    array = np.asarray(array)
    code = _FROM_NUMPY.get(array.dtype.name)
    if code is None:
        to_proto(array)  # raises the unsupported-dtype error
        raise AssertionError("unreachable: to_proto refused the dtype")
    yield task_pb2.UploadTensorRequest(header=task_pb2.TensorHeader(dtype=code, shape=array.shape))
    flat = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).reshape(-1)
    data = memoryview(flat.view(np.uint8).data)
    for start in range(0, len(data), chunk_bytes):
        part = data[start : start + chunk_bytes]
        yield b"".join((_CHUNK_TAG, _VarintBytes(len(part)), part))


def assemble(header: tensor_pb2.TensorRef, chunks: list[bytes]) -> np.ndarray:
    """The array of a DownloadTensor stream."""
    dtype = _TO_NUMPY[header.dtype]
    out = np.empty(tuple(header.shape), dtype)
    flat = out.reshape(-1).view(np.uint8)
    at = 0
    for chunk in chunks:  # straight into the array: no joined copy of the whole
        flat[at : at + len(chunk)] = np.frombuffer(chunk, np.uint8)
        at += len(chunk)
    if at != flat.size:
        raise ValueError(f"the download has {at} bytes; its header says {flat.size}")
    return out
