"""Dynamic batching through the wire: a server with the `batching:` section on
batches a stream of small matmuls from `AsyncClient.map`."""

from __future__ import annotations

import dataclasses

import numpy as np

from kernelmesh.clients.aio import AsyncClient
from kernelmesh.core.batching import BatchingOptions


async def test_map_of_small_matmuls_runs_in_batches(server_config, start_server):
    options = BatchingOptions(
        enabled=True,
        ops=("matmul",),
        preferred_batch_sizes=(8,),
        max_batch_size=8,
        max_queue_delay_us=20_000,
    )
    srv = await start_server(
        dataclasses.replace(server_config, backends=("cpu",), batching=options)
    )
    rng = np.random.default_rng(1)
    pairs = [
        (rng.standard_normal((16, 16), np.float32), rng.standard_normal((16, 16), np.float32))
        for _ in range(64)
    ]
    async with AsyncClient(f"127.0.0.1:{srv.port}", timeout=30.0) as km:
        results = await km.map("matmul", pairs)
    for (a, b), c in zip(pairs, results, strict=True):
        np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-5)
    batcher = srv.tasks._batcher
    assert batcher.tasks_batched == 64
    assert batcher.batches_run < 64  # some tasks shared a kernel call
