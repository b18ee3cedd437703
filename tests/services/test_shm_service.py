"""Shared memory for co-located clients: tensors named by region, offset and size,
tenant-scoped and size-checked, dropped on unregister or when the client goes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kernelmesh.clients import FailedPreconditionError, InvalidArgumentError
from kernelmesh.clients import shm as shm_plans
from kernelmesh.clients.aio import AsyncClient
from kernelmesh.clients.shm import SharedMemoryRegion
from kernelmesh.services.shm_servicer import is_local_peer


@pytest.fixture
async def km(server):
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30.0) as client:
        yield client


def fields(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


async def test_inputs_and_outputs_pass_through_a_region(km, server):
    x = np.linspace(-4, 4, 1 << 16, dtype=np.float32).reshape(256, 256)
    region = await km.shared_memory(3 * x.nbytes)
    arg = region.put(x)
    y = await km.run("relu", arg)  # input from the region, output on the wire
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    out = region.output(x.nbytes, x.nbytes)
    z = await km.run_into("scale", arg, outputs=[out], factor=2.0)
    np.testing.assert_array_equal(z, x * 2)
    np.testing.assert_array_equal(region.array(x.nbytes, np.float32, x.shape), x * 2)
    # a matmul with one operand in shared memory and one inline
    b = np.eye(256, dtype=np.float32)
    np.testing.assert_allclose(await km.run("matmul", arg, b), x, rtol=1e-6)
    assert [r.name for r in server.shm.list("default")] == [region.name]


async def test_a_segment_smaller_than_registered_is_invalid_argument(km, server):
    region = SharedMemoryRegion(4096)
    try:
        region.byte_size = 8192  # claims more than the segment holds
        with pytest.raises(InvalidArgumentError) as exc:
            await km._io.run(shm_plans.register(region))
        assert "region.byte_size" in fields(exc)
        assert "exceed segment" in fields(exc)["region.byte_size"]
    finally:
        region.close()
    assert server.shm.list("default") == []


async def test_a_tensor_beyond_its_region_is_invalid_argument_naming_the_field(km):
    region = await km.shared_memory(1024)
    inside = region.put(np.ones(64, np.float32))  # 256 bytes at 0
    too_far = region.tensor(896, np.float32, (64,))  # 256 bytes at 896: 128 past the end
    with pytest.raises(InvalidArgumentError) as exc:
        await km.run("relu", too_far)
    assert "task.inputs[0].shm.byte_size" in fields(exc)
    small = region.output(512, 128)  # room for 32 floats, the output has 64
    with pytest.raises(InvalidArgumentError) as exc:
        await km.run_into("relu", inside, outputs=[small])
    assert "needs 256 bytes" in fields(exc)["task.output_shm[0].byte_size"]


async def test_regions_are_tenant_scoped(server, km):
    region = await km.shared_memory(1024)
    arg = region.put(np.ones(4, np.float32))
    async with AsyncClient(f"127.0.0.1:{server.port}", tenant="other") as other:
        with pytest.raises(InvalidArgumentError) as exc:
            await other.run("relu", arg)
    assert "is not registered" in fields(exc)["task.inputs[0].shm.region"]


async def test_a_segment_the_server_cannot_open_is_failed_precondition(km):
    region = SharedMemoryRegion(1024)
    region.close()  # unlinked: the server, like a remote host, cannot open it
    with pytest.raises(FailedPreconditionError, match="cannot be opened on the server's host"):
        await km._io.run(shm_plans.register(region))


NOT_AVAILABLE = "is not owned by the calling process's user or is registered by another tenant"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root can give a segment to another user (os.fchown); CI runs as root",
)
async def test_a_segment_of_another_user_is_failed_precondition(km, server):
    # The reviewer's attack: a server running as root mapped any user's segment
    # (PostgreSQL's own, another tenant's) for whoever named it.
    region = SharedMemoryRegion(1024)
    try:
        os.fchown(region.segment._fd, 65534, -1)  # nobody's now, as another user's would be
        with pytest.raises(FailedPreconditionError) as exc:
            await km._io.run(shm_plans.register(region))
        assert NOT_AVAILABLE in str(exc.value)
        assert region.key in str(exc.value)
    finally:
        region.close()
    assert server.shm.list("default") == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="only root can run a client as another user (os.setuid); CI runs as root",
)
async def test_a_client_of_another_user_maps_its_own_segments_and_not_the_servers(server):
    # The server (root here) tells the caller's user from its connection: a client
    # running as nobody registers its own segment, and not one of root's.
    root_owned = SharedMemoryRegion(1024)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("shm_other_user.py")),
            f"127.0.0.1:{server.port}",
            root_owned.key,
            "65534",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd="/",
        )
        out, _ = await asyncio.wait_for(child.communicate(), 60)
    finally:
        root_owned.close()
    lines = out.decode().splitlines()
    assert child.returncode == 0, out.decode()
    own = next(line.split() for line in lines if line.startswith("own "))
    assert own[2] == "OK", lines
    foreign = next(line for line in lines if line.startswith("foreign "))
    assert "FAILED_PRECONDITION" in foreign and NOT_AVAILABLE in foreign, lines
    assert server.shm.list("default") == []  # its segment was unlinked when it ended


async def test_a_segment_another_tenant_registered_is_refused_to_every_other_tenant(km, server):
    region = await km.shared_memory(1024)  # tenant "default"
    region.put(np.arange(4, dtype=np.float32))
    stolen = SharedMemoryRegion.__new__(SharedMemoryRegion)  # the same segment, B's name
    stolen.segment, stolen.name, stolen.byte_size = region.segment, "mine-now", 1024
    async with AsyncClient(f"127.0.0.1:{server.port}", tenant="other") as other:
        with pytest.raises(FailedPreconditionError) as exc:
            await other._io.run(shm_plans.register(stolen))
        assert NOT_AVAILABLE in str(exc.value)
        assert server.shm.list("other") == []
        # the owning tenant may map it again under another name
        await km._io.run(shm_plans.register(stolen))
        assert sorted(r.name for r in server.shm.list("default")) == sorted(
            ["mine-now", region.name]
        )
        # once its tenant lets it go, the segment's user may register it elsewhere
        await km._io.run(shm_plans.unregister("mine-now"))
        await km._io.run(shm_plans.unregister(region.name))  # the segment stays
        await other._io.run(shm_plans.register(stolen))
        assert [r.name for r in server.shm.list("other")] == ["mine-now"]
        await other._io.run(shm_plans.unregister("mine-now"))


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
async def test_a_client_over_ipv6_loopback_maps_its_segment(server_config, start_server):
    # gRPC names such a peer "ipv6:%5B::1%5D:port"; its socket is in /proc/net/tcp6
    server = await start_server(dataclasses.replace(server_config, host="[::1]", http_port=None))
    async with AsyncClient(f"[::1]:{server.port}", timeout=30.0) as km:
        region = await km.shared_memory(1024)
        x = np.arange(-2, 2, dtype=np.float32)
        np.testing.assert_array_equal(await km.run("relu", region.put(x)), np.maximum(x, 0))


def test_only_loopback_and_unix_peers_count_as_local():
    assert is_local_peer("ipv4:127.0.0.1:5000")
    assert is_local_peer("ipv6:[::1]:5000")
    assert is_local_peer("ipv6:[::ffff:127.0.0.1]:5000")
    assert is_local_peer("ipv6:%5B::1%5D:5000")  # as newer gRPC writes it
    assert is_local_peer("unix:/tmp/km.sock")
    assert not is_local_peer("ipv4:10.1.2.3:5000")
    assert not is_local_peer("ipv6:[2001:db8::1]:5000")
    assert not is_local_peer("")


async def test_unregistered_explicitly_on_close_and_when_the_segment_goes(server):
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as client:
        kept = await client.shared_memory(1024)
        dropped = await client.shared_memory(1024)
        await client.unregister_shared_memory(dropped)
        assert [r.name for r in server.shm.list("default")] == [kept.name]
    assert server.shm.list("default") == []  # close unregistered it
    # a client that never says goodbye: its segment is unlinked when it ends
    orphan = SharedMemoryRegion(1024)
    async with AsyncClient(target) as client:
        await client._io.run(shm_plans.register(orphan))
    assert [r.name for r in server.shm.list("default")] == [orphan.name]
    orphan.close()
    # The server sees the connection end in its own time: up to 10 s on a loaded
    # machine (100 polls of 10 ms gave it about one second).
    give_up = time.monotonic() + 10
    while server.shm.list("default") and time.monotonic() < give_up:
        await asyncio.sleep(0.01)
    assert server.shm.list("default") == []
