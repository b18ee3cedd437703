"""Replies written as protobuf wire bytes by hand, where building the message
costs more than the bytes it carries (see request_guard.PRE_ENCODED_REPLIES)."""

from __future__ import annotations

# protobuf's own varint encoder (pure Python in every implementation); tests
# check the bytes against SerializeToString, so a change to it is caught
from google.protobuf.internal.encoder import _VarintBytes

from kernelmesh.v1 import task_pb2

_CHUNK_FIELD = task_pb2.DownloadTensorResponse.DESCRIPTOR.fields_by_name["chunk"].number
_CHUNK_TAG = bytes([(_CHUNK_FIELD << 3) | 2])  # length-delimited


def download_chunk(data: memoryview) -> bytes:
    """`DownloadTensorResponse(chunk=data)` encoded, in one copy of `data`."""
    return b"".join((_CHUNK_TAG, _VarintBytes(len(data)), data))
