"""An upload the server refuses mid-stream (the tenant's byte quota) reports
RESOURCE_EXHAUSTED with RetryInfo on both faces.

grpc.aio sometimes turns such a refusal into INTERNAL "Internal error from Core"
(grpc/grpc#36066: a chunk still in flight when the server ends the call fails in
Core, and its error overwrites the server's status); clients/transport.py reads
the status the call ended with first. The race is the library's: on this machine
about one 64 MiB upload in fifteen hit it before the workaround, so the test makes
enough of them to catch it most runs, not every run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernelmesh.clients import ResourceExhaustedError
from kernelmesh.core.limits import Quotas
from kernelmesh.core.ops import Limits

MiB = 1 << 20
# 64 MiB in 4 MiB chunks: the server refuses the first, while the client sends on.
UPLOAD_ELEMENTS = 16 * MiB
UPLOADS = 40


@pytest.fixture
async def quota_server(server_config, start_server):
    config = dataclasses.replace(
        server_config,
        limits=Limits(max_elements=1 << 25, max_total_elements=1 << 26),
        quotas=Quotas(max_bytes_per_tenant=1 * MiB),
    )
    return await start_server(config)


async def test_an_upload_past_the_quota_is_resource_exhausted_with_retry_info(
    quota_server, connect
):
    face = connect(f"127.0.0.1:{quota_server.port}", timeout=30.0)
    big = np.ones(UPLOAD_ELEMENTS, np.float32)
    for _ in range(UPLOADS):
        with pytest.raises(ResourceExhaustedError) as info:
            await face.upload(big)
        assert info.value.retry_delay is not None
    assert quota_server.ledger.bytes_of("default") == 0  # no refused upload holds bytes
    small = await face.upload(np.ones(1024, np.float32))  # what fits is still stored
    await face.delete(small)
