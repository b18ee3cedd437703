"""API keys and authorization on a real in-process server with auth on: who
gets in, what each role may call (RPC by RPC), tenant isolation, revocation,
expiry and rotation, the bootstrap key, and the open-on-loopback rule."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import stat
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import spec

from kernelmesh.clients.shm import SharedMemoryRegion
from kernelmesh.core.api_keys import MemoryApiKeyStore, Role
from kernelmesh.core.auth import BOOTSTRAP_FILE, ROLE_TABLE
from kernelmesh.core.config import ServerConfig
from kernelmesh.services.server import check_security
from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    llm_pb2,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    shm_pb2,
    shm_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

SERVICES = (task_pb2, device_pb2, llm_pb2, orchestrator_pb2, shm_pb2)
ROLE_PROTO = {
    Role.ADMIN: orchestrator_pb2.API_KEY_ROLE_ADMIN,
    Role.USER: orchestrator_pb2.API_KEY_ROLE_USER,
    Role.NODE: orchestrator_pb2.API_KEY_ROLE_NODE,
}


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@pytest.fixture
def auth_config(server_config, tmp_path) -> ServerConfig:
    return dataclasses.replace(
        server_config, auth=True, state_dir=str(tmp_path / "state"), auth_cache_seconds=0.3
    )


@pytest.fixture
async def auth_server(auth_config, start_server):
    return await start_server(auth_config)


@pytest.fixture
def admin_key(auth_server, auth_config) -> str:
    """The bootstrap admin key the first start with auth wrote."""
    return (Path(auth_config.state_dir) / BOOTSTRAP_FILE).read_text().strip()


@pytest.fixture
async def channel(auth_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as chan:
        yield chan


@pytest.fixture
def make_key(channel, admin_key):
    keys = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

    async def make(tenant: str = "team-a", role: Role = Role.USER, **fields) -> tuple[str, str]:
        reply = await keys.CreateApiKey(
            orchestrator_pb2.CreateApiKeyRequest(tenant=tenant, role=ROLE_PROTO[role], **fields),
            metadata=bearer(admin_key),
        )
        return reply.api_key.name, reply.secret

    return make


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _all_methods() -> list[tuple[str, bool, bool]]:
    return [
        (f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for module in SERVICES
        for svc in module.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    ]


async def _raw_call(channel, path: str, client_stream: bool, server_stream: bool, metadata):
    """Calls `path` with an empty request (raw bytes): the role check comes first."""
    kw = {"metadata": metadata, "timeout": 5}
    try:
        if not client_stream and not server_stream:
            await channel.unary_unary(path)(b"", **kw)
        elif not client_stream:
            call = channel.unary_stream(path)(b"", **kw)
            async for _ in call:
                call.cancel()
                break
        elif not server_stream:
            await channel.stream_unary(path)(iter([b""]), **kw)
        else:
            call = channel.stream_stream(path)(iter([]), **kw)
            async for _ in call:
                call.cancel()
                break
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# --- the role table -------------------------------------------------------


def test_the_role_table_names_every_rpc_of_every_service():
    assert set(ROLE_TABLE) == {path for path, _, _ in _all_methods()}


def test_the_role_table_follows_the_architecture():
    orch = "/kernelmesh.v1.OrchestratorService/"
    for name in ("CreateApiKey", "ListApiKeys", "RevokeApiKey", "ListNodes", "DrainNode"):
        assert ROLE_TABLE[orch + name] == {Role.ADMIN}
    assert ROLE_TABLE[orch + "RegisterNode"] == ROLE_TABLE[orch + "Heartbeat"] == {Role.NODE}
    workflow_rpcs = {path for path, _, _ in _all_methods() if "Workflow" in path}
    assert {p.rsplit("/", 1)[1] for p in workflow_rpcs} == {
        "SubmitWorkflow",
        "GetWorkflow",
        "WatchWorkflow",
        "CancelWorkflow",
        "ListWorkflows",
    }
    for path in workflow_rpcs:  # users run workflows in their own tenant; nodes do not
        assert ROLE_TABLE[path] == {Role.ADMIN, Role.USER}, path
    for path, roles in ROLE_TABLE.items():
        if "Node" not in path and "Heartbeat" not in path:
            assert Role.NODE not in roles, path  # a node key does nothing but register


async def test_every_rpc_answers_each_role_by_the_table(channel, make_key):
    secrets = {role: (await make_key(f"t-{role.value}", role))[1] for role in Role}
    for path, client_stream, server_stream in _all_methods():
        for role, secret in secrets.items():
            code = await _raw_call(channel, path, client_stream, server_stream, bearer(secret))
            if role in ROLE_TABLE[path]:
                assert code not in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ), (path, role, code)
            else:
                assert code is grpc.StatusCode.PERMISSION_DENIED, (path, role, code)
        no_key = await _raw_call(channel, path, client_stream, server_stream, [])
        assert no_key is grpc.StatusCode.UNAUTHENTICATED, path


# --- who gets in ------------------------------------------------------------


async def test_without_a_key_only_health_and_reflection_answer(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflection.ServerReflectionInfo(iter([request])):
        names = {s.name for s in answer.list_services_response.service}
        assert "kernelmesh.v1.TaskService" in names
        break
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    assert await _code(tasks.ListOps(task_pb2.ListOpsRequest())) is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "header", ["Bearer kmk_not-a-key", "Basic dXNlcjpwdw==", "Bearer", "kmk_no-scheme"]
)
async def test_unknown_or_malformed_keys_are_unauthenticated(channel, header):
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    code = await _code(
        tasks.ListOps(task_pb2.ListOpsRequest(), metadata=[("authorization", header)])
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_a_user_key_works_and_its_tenant_is_the_tasks_tenant(channel, make_key):
    _, secret = await make_key("team-a")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    reply = await tasks.RunTask(
        task_pb2.RunTaskRequest(task=spec("exp", np.ones(4, np.float32))),
        # a tenant named in metadata is ignored when auth is on
        metadata=[*bearer(secret), ("kernelmesh-tenant", "team-b")],
    )
    assert reply.task.tenant == "team-a"


# --- tenants ----------------------------------------------------------------


async def test_another_tenants_tasks_and_tensors_are_not_found(channel, make_key):
    _, a = await make_key("team-a")
    _, b = await make_key("team-b")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    task = (
        await tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(task=spec("exp", np.ones(4, np.float32))),
            metadata=bearer(a),
        )
    ).task

    async def upload():
        yield task_pb2.UploadTensorRequest(header=task_pb2.TensorHeader(dtype=1, shape=[2]))
        yield task_pb2.UploadTensorRequest(chunk=np.ones(2, np.float32).tobytes())

    tensor = (await tasks.UploadTensor(upload(), metadata=bearer(a))).tensor
    as_b = bearer(b)
    not_found = grpc.StatusCode.NOT_FOUND
    assert (
        await _code(tasks.GetTask(task_pb2.GetTaskRequest(name=task.name), metadata=as_b))
        is not_found
    )
    assert (
        await _code(tasks.CancelTask(task_pb2.CancelTaskRequest(name=task.name), metadata=as_b))
        is not_found
    )

    async def watch():
        async for _ in tasks.WatchTask(task_pb2.WatchTaskRequest(name=task.name), metadata=as_b):
            pass

    assert await _code(watch()) is not_found

    async def download():
        async for _ in tasks.DownloadTensor(
            task_pb2.DownloadTensorRequest(name=tensor.name), metadata=as_b
        ):
            pass

    assert await _code(download()) is not_found
    assert (
        await _code(
            tasks.DeleteTensor(task_pb2.DeleteTensorRequest(name=tensor.name), metadata=as_b)
        )
        is not_found
    )
    listed = await tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=as_b)
    assert task.name not in {t.name for t in listed.tasks}
    by_ref = task_pb2.TaskSpec(op="exp")
    by_ref.inputs.add(ref=tensor.name)
    code = await _code(tasks.RunTask(task_pb2.RunTaskRequest(task=by_ref), metadata=as_b))
    assert code is grpc.StatusCode.INVALID_ARGUMENT  # "tensor ... not found", as for a typo
    # the owner still sees both
    await tasks.GetTask(task_pb2.GetTaskRequest(name=task.name), metadata=bearer(a))
    await tasks.RunTask(task_pb2.RunTaskRequest(task=by_ref), metadata=bearer(a))


async def test_a_shared_memory_segment_one_key_registered_is_refused_to_another_tenant(
    channel, make_key, auth_server
):
    # The reviewer's attack: B listed /dev/shm, registered A's segment under its own
    # region name and read A's data through RunTask.
    _, a = await make_key("team-a")
    _, b = await make_key("team-b")
    shm = shm_pb2_grpc.SharedMemoryServiceStub(channel)
    segment = SharedMemoryRegion(1024)
    try:

        def register(name: str, secret: str):
            region = shm_pb2.SharedMemoryRegion(name=name, key=segment.key, byte_size=1024)
            request = shm_pb2.RegisterSharedMemoryRequest(region=region)
            return shm.RegisterSharedMemory(request, metadata=bearer(secret))

        await register("a", a)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register("b", b)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "registered by another tenant" in refused.value.details()
        assert [r.name for r in auth_server.shm.list("team-a")] == ["a"]
        assert auth_server.shm.list("team-b") == []
    finally:
        segment.close()


# --- revocation, expiry, rotation ----------------------------------------------


async def test_a_device_watch_shows_another_tenants_work_only_as_counts(channel, make_key):
    """Devices are shared: every tenant's watch sees the same device statuses,
    whose fields are counts and gauges; no task, tensor or tenant of anyone
    else's is named in them."""
    _, a = await make_key("team-a")
    _, b = await make_key("team-b")
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    submitted = [
        (
            await tasks.SubmitTask(
                task_pb2.SubmitTaskRequest(task=spec("exp", np.ones(1 << 16, np.float32))),
                metadata=bearer(a),
            )
        ).task.name
        for _ in range(8)
    ]
    devices = device_pb2_grpc.DeviceServiceStub(channel)
    listed = await devices.ListDevices(device_pb2.ListDevicesRequest(), metadata=bearer(b))
    seen = []
    call = devices.WatchDevices(device_pb2.WatchDevicesRequest(interval_ms=100), metadata=bearer(b))
    async for update in call:
        seen.append(update)
        if len(seen) == 3:
            call.cancel()
            break
    names = {s.name for update in seen for s in update.statuses}
    assert names == {d.name for d in listed.devices}
    raw = b"".join(update.SerializeToString() for update in seen)
    for secret_word in ("team-a", *submitted, *(n.split("/", 1)[1] for n in submitted)):
        assert secret_word.encode() not in raw
    assert await _code(_drain(devices.WatchDevices(device_pb2.WatchDevicesRequest()))) is (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def _drain(call) -> None:
    async for _ in call:
        pass


async def test_a_revoked_key_stops_working_at_once(channel, make_key, admin_key):
    name, secret = await make_key()
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    await tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))
    keys = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    revoked = await keys.RevokeApiKey(
        orchestrator_pb2.RevokeApiKeyRequest(name=name), metadata=bearer(admin_key)
    )
    assert revoked.api_key.HasField("revoke_time")
    code = await _code(tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret)))
    assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_a_revocation_made_elsewhere_takes_effect_within_the_cache_bound(
    channel, make_key, auth_server
):
    name, secret = await make_key()
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    await tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))  # now cached
    # another orchestrator sharing the store revokes it: this server's cache is stale
    await auth_server.api_keys.revoke_api_key(name.removeprefix("apiKeys/"), time.time())
    revoked_at = time.monotonic()
    bound = auth_server.config.auth_cache_seconds
    while await _code(tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))) is (
        grpc.StatusCode.OK
    ):
        assert time.monotonic() - revoked_at < bound + 1.0, "revocation not seen in time"
        await asyncio.sleep(0.05)


async def test_an_expired_key_is_unauthenticated(channel, make_key):
    request_expiry = orchestrator_pb2.CreateApiKeyRequest().expire_time
    # Long enough for the key's creation and first call on a loaded machine
    # (at 1 s the first call could already find it expired).
    request_expiry.FromNanoseconds(int((time.time() + 2.5) * 1e9))
    _, secret = await make_key(expire_time=request_expiry)
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    await tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))
    give_up = time.monotonic() + 10
    while await _code(tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))) is (
        grpc.StatusCode.OK
    ):
        assert time.monotonic() < give_up, "the key did not expire"
        await asyncio.sleep(0.1)


async def test_rotation_keeps_the_old_key_for_its_grace_period(channel, make_key, admin_key):
    name, old = await make_key(label="ci")
    keys = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    admin = bearer(admin_key)
    new = await keys.CreateApiKey(
        orchestrator_pb2.CreateApiKeyRequest(
            tenant="team-a", role=orchestrator_pb2.API_KEY_ROLE_USER, label="ci"
        ),
        metadata=admin,
    )
    revoked = await keys.RevokeApiKey(
        orchestrator_pb2.RevokeApiKeyRequest(name=name, grace=duration_pb2.Duration(seconds=60)),
        metadata=admin,
    )
    assert revoked.api_key.revoke_time.seconds > time.time() + 50
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    for secret in (old, new.secret):
        await tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(secret))


async def test_list_api_keys_never_returns_secrets(channel, make_key, admin_key):
    _, secret = await make_key("team-a", label="ci")
    keys = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    reply = await keys.ListApiKeys(
        orchestrator_pb2.ListApiKeysRequest(), metadata=bearer(admin_key)
    )
    assert {k.tenant for k in reply.api_keys} >= {"default", "team-a"}
    wire = reply.SerializeToString()
    assert secret.encode() not in wire and admin_key.encode() not in wire
    only_a = await keys.ListApiKeys(
        orchestrator_pb2.ListApiKeysRequest(tenant="team-a"), metadata=bearer(admin_key)
    )
    assert [k.label for k in only_a.api_keys] == ["ci"]


async def test_bad_key_requests_are_invalid_argument(channel, admin_key):
    keys = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    admin = bearer(admin_key)
    past = orchestrator_pb2.CreateApiKeyRequest(tenant="t", role=2)
    past.expire_time.FromNanoseconds(int((time.time() - 10) * 1e9))
    for request in (
        orchestrator_pb2.CreateApiKeyRequest(tenant="t"),  # no role
        orchestrator_pb2.CreateApiKeyRequest(tenant="not a tenant!", role=2),
        orchestrator_pb2.CreateApiKeyRequest(tenant="t", role=2, label="x" * 1000),
        past,
    ):
        code = await _code(keys.CreateApiKey(request, metadata=admin))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, request
    code = await _code(
        keys.RevokeApiKey(orchestrator_pb2.RevokeApiKeyRequest(name="apiKeys/nope"), metadata=admin)
    )
    assert code is grpc.StatusCode.NOT_FOUND


# --- bootstrap, restart, the loopback rule ---------------------------------------


async def test_the_bootstrap_admin_key_is_a_0600_file_named_but_not_logged(
    server_config, tmp_path, start_server, caplog
):
    config = dataclasses.replace(server_config, auth=True, state_dir=str(tmp_path / "s"))
    with caplog.at_level(logging.INFO):
        await start_server(config)
    path = tmp_path / "s" / BOOTSTRAP_FILE
    secret = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret.startswith("kmk_") and len(secret) >= 4 + 43  # 256 bits, base64url
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(path) in logged
    assert secret not in logged


async def test_keys_survive_a_restart(server_config, tmp_path, start_server):
    """Keys live in the state store: a key made before a restart works after it."""
    config = dataclasses.replace(server_config, auth=True, state_dir=str(tmp_path / "s"))
    first = await start_server(config)
    assert not isinstance(first.api_keys, MemoryApiKeyStore)
    admin = (tmp_path / "s" / BOOTSTRAP_FILE).read_text().strip()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as chan:
        created = await orchestrator_pb2_grpc.OrchestratorServiceStub(chan).CreateApiKey(
            orchestrator_pb2.CreateApiKeyRequest(tenant="t", role=2), metadata=bearer(admin)
        )
    await first.stop(grace=1.0)
    second = await start_server(config)
    assert (tmp_path / "s" / BOOTSTRAP_FILE).read_text().strip() == admin  # not minted again
    async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as chan:
        tasks = task_pb2_grpc.TaskServiceStub(chan)
        await tasks.ListOps(task_pb2.ListOpsRequest(), metadata=bearer(created.secret))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_serving_beyond_loopback_needs_auth_or_insecure_open(host):
    with pytest.raises(ValueError, match="--auth"):
        check_security(ServerConfig(host=host))
    check_security(ServerConfig(host=host, insecure_open=True))
    check_security(ServerConfig(host=host, auth=True, state_dir="/tmp/x"))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_may_run_open(host):
    check_security(ServerConfig(host=host))


def test_auth_needs_a_state_dir_for_its_bootstrap_key():
    with pytest.raises(ValueError, match="--state-dir"):
        check_security(ServerConfig(auth=True))


async def test_llm_calls_are_billed_to_the_keys_tenant(channel, make_key, auth_server):
    from kernelmesh.v1 import llm_pb2_grpc

    _, secret = await make_key("team-llm")
    seen: list[str] = []
    original = auth_server.llm.embed

    async def spy(tenant, model, inputs, **kwargs):
        seen.append(tenant)
        return await original(tenant, model, inputs, **kwargs)

    auth_server.llm.embed = spy
    llm = llm_pb2_grpc.LLMServiceStub(channel)
    await llm.Embed(
        llm_pb2.EmbedRequest(model="local", inputs=["hi"]),
        metadata=[*bearer(secret), ("kernelmesh-tenant", "someone-else")],
    )
    assert seen == ["team-llm"]


async def test_without_a_key_nothing_sent_is_decoded(channel, caplog):
    # undecodable bytes: INVALID_ARGUMENT to a caller with a key, but a caller
    # without one is refused before the request is read at all
    raw = channel.unary_unary("/kernelmesh.v1.TaskService/GetTask")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\x0a\x02\xff\xfe")
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    stream = channel.stream_unary("/kernelmesh.v1.TaskService/UploadTensor")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream(iter([b"\xff" * 64, b"\x00" * (1 << 20)]))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert not [r for r in caplog.records if r.exc_info]
