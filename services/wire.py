"""Replies written as protobuf wire bytes by hand, where building the message
costs more than the bytes it carries (see request_guard.PRE_ENCODED_REPLIES)."""

from __future__ import annotations

from kernelmesh.v1 import task_pb2

_CHUNK_FIELD = task_pb2.DownloadTensorResponse.DESCRIPTOR.fields_by_name["chunk"].number
_CHUNK_TAG = bytes([(_CHUNK_FIELD << 3) | 2])  # length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def download_chunk(data: memoryview) -> bytes:
    """`DownloadTensorResponse(chunk=data)` encoded, in one copy of `data`."""
    return b"".join((_CHUNK_TAG, _varint(len(data)), data))
