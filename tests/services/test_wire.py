"""Hand-encoded replies decode to the messages they stand for."""

from __future__ import annotations

import pytest

from kernelmesh.services import wire
from kernelmesh.v1 import task_pb2


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, (4 << 20) + 3])
def test_a_download_chunk_decodes_to_the_same_message(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = wire.download_chunk(memoryview(data))
    assert encoded == task_pb2.DownloadTensorResponse(chunk=data).SerializeToString()
    assert task_pb2.DownloadTensorResponse.FromString(encoded).chunk == data
