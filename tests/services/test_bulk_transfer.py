"""Big tensors travel in chunks: `run` uploads inputs of plans.BULK_BYTES or more
(UploadTensor), downloads the outputs (DownloadTensor), and deletes both after,
also when the task fails."""

from __future__ import annotations

import numpy as np
import pytest

from kernelmesh.clients import InvalidArgumentError, plans
from kernelmesh.clients.aio import AsyncClient


@pytest.fixture
def small_bulk(monkeypatch):
    monkeypatch.setattr(plans, "BULK_BYTES", 4096)


async def test_big_inputs_and_outputs_go_in_chunks_and_are_deleted(server, small_bulk):
    store = server.tasks.store
    a = np.random.default_rng(2).standard_normal((300, 300)).astype(np.float32)  # 360 KB
    b = np.eye(300, dtype=np.float32)
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30.0) as km:
        c = await km.run("matmul", a, b)
        np.testing.assert_allclose(c, a, rtol=1e-6)
        assert c.flags.writeable and c.dtype == np.float32
        small = await km.run("relu", np.ones(8, np.float32))  # below the threshold
        np.testing.assert_array_equal(small, np.ones(8, np.float32))
        assert len(store) == 0 and store.used_bytes == 0
        with pytest.raises(InvalidArgumentError):
            await km.run("matmul", a, np.ones((7, 3), np.float32))  # K differs
    assert len(store) == 0 and store.used_bytes == 0


def test_chunks_reassemble_the_array_exactly():
    from kernelmesh.clients import tensors
    from kernelmesh.v1 import task_pb2, tensor_pb2

    x = np.arange(10_000, dtype=np.int64).reshape(100, 100)
    requests = list(tensors.upload_requests(x, chunk_bytes=3000))
    # the chunks come encoded already: they must decode as the messages they stand for
    decoded = [task_pb2.UploadTensorRequest.FromString(r) for r in requests[1:]]
    header, chunks = requests[0].header, [r.chunk for r in decoded]
    assert len(chunks) == -(-x.nbytes // 3000)
    ref = tensor_pb2.TensorRef(dtype=header.dtype, shape=header.shape)
    np.testing.assert_array_equal(tensors.assemble(ref, chunks), x)
    with pytest.raises(ValueError, match="header says"):
        tensors.assemble(ref, chunks[:-1])
