"""Auth on the HTTP sidecar and the OpenAI facade (the official `openai` SDK
with a kernelmesh key), and the `kernelmesh keys` commands."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import grpc
import openai
import pytest
from click.testing import CliRunner

from kernelmesh.clients.keys_cli import keys as keys_command
from kernelmesh.core.auth import BOOTSTRAP_FILE
from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, task_pb2, task_pb2_grpc


async def _server(server_config, tmp_path, start_server, **changes):
    config = dataclasses.replace(
        server_config, auth=True, state_dir=str(tmp_path / "state"), **changes
    )
    server = await start_server(config)
    admin = (tmp_path / "state" / BOOTSTRAP_FILE).read_text().strip()
    return server, admin


async def _user_key(server, admin: str, tenant: str = "team-a", role: int = 2) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        reply = await orchestrator_pb2_grpc.OrchestratorServiceStub(chan).CreateApiKey(
            orchestrator_pb2.CreateApiKeyRequest(tenant=tenant, role=role),
            metadata=[("authorization", f"Bearer {admin}")],
        )
    return reply.secret


async def test_the_openai_sdk_works_with_a_kernelmesh_key(server_config, tmp_path, start_server):
    server, admin = await _server(server_config, tmp_path, start_server)
    secret = await _user_key(server, admin)
    base = f"http://127.0.0.1:{server.http_port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=secret, max_retries=0) as client:
        result = await client.embeddings.create(model="local", input=["hello", "world"])
        assert len(result.data) == 2
        models = await client.models.list()
        assert any(m.id == "local" for m in models.data)
    async with openai.AsyncOpenAI(base_url=base, api_key="kmk_wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="local", input="hello")


async def test_http_without_a_key_gets_only_probes_and_metrics(
    server_config, tmp_path, start_server
):
    server, admin = await _server(server_config, tmp_path, start_server)
    node = await _user_key(server, admin, role=3)
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/health/live", "/health/startup", "/metrics"):
            async with session.get(base + path) as r:
                assert r.status == 200, path
        async with session.get(base + "/v1/models") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Bearer"
        async with session.get(
            base + "/v1/models", headers={"Authorization": f"Bearer {node}"}
        ) as r:
            assert r.status == 403  # a node key is for RegisterNode and Heartbeat only


async def test_metrics_can_be_protected(server_config, tmp_path, start_server):
    server, admin = await _server(server_config, tmp_path, start_server, protect_metrics=True)
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            assert r.status == 401
        async with session.get(url, headers={"Authorization": f"Bearer {admin}"}) as r:
            assert r.status == 200


async def test_the_dashboards_data_is_for_admin_keys_only(server_config, tmp_path, start_server):
    """A snapshot holds every tenant's LLM usage (tenant, model, tokens, cost):
    with auth on, a user key must not read another tenant's from it."""
    server, admin = await _server(server_config, tmp_path, start_server)
    team_a = await _user_key(server, admin, tenant="team-a")
    team_b = await _user_key(server, admin, tenant="team-b")
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/v1/embeddings",
            json={"model": "local", "input": "hi"},
            headers={"Authorization": f"Bearer {team_a}"},
        ) as r:
            assert r.status == 200
        async with session.get(
            base + "/ui/snapshot", headers={"Authorization": f"Bearer {admin}"}
        ) as r:
            assert r.status == 200
            assert "team-a" in {u["tenant"] for u in (await r.json())["llm"]["usage"]}
        for path in ("/ui/snapshot", "/ui/events"):
            async with session.get(base + path, headers={"Authorization": f"Bearer {team_b}"}) as r:
                assert r.status == 403, path
                assert "team-a" not in await r.text()
            async with session.get(base + path) as r:
                assert r.status == 401, path


async def test_the_http_tenant_is_the_keys_tenant(server_config, tmp_path, start_server):
    """A tenant header cannot override the key: team-a's key spends team-a's budget."""
    server, admin = await _server(server_config, tmp_path, start_server)
    secret = await _user_key(server, admin, tenant="team-a")
    seen: list[str] = []
    original = server.llm.embed

    async def spy(tenant, model, inputs):
        seen.append(tenant)
        return await original(tenant, model, inputs)

    server.llm.embed = spy
    url = f"http://127.0.0.1:{server.http_port}/v1/embeddings"
    headers = {"Authorization": f"Bearer {secret}", "X-Kernelmesh-Tenant": "team-b"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"model": "local", "input": "hi"}, headers=headers) as r,
    ):
        assert r.status == 200
    assert seen == ["team-a"]


async def test_keys_cli_create_list_rotate_revoke(server_config, tmp_path, start_server):
    server, admin = await _server(server_config, tmp_path, start_server)
    env = {"KERNELMESH_API_KEY": admin, "KERNELMESH_TARGET": f"127.0.0.1:{server.port}"}
    runner = CliRunner()

    def run(*args: str):
        return asyncio.to_thread(runner.invoke, keys_command, list(args), env=env)

    created = await run("create", "--tenant", "team-c", "--label", "ci", "--expires-in", "1d")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("kmk_")
    listed = await run("list", "--tenant", "team-c")
    assert listed.exit_code == 0 and "team-c" in listed.output and secret not in listed.output
    name = listed.output.split()[0]
    assert name.startswith("apiKeys/")

    rotated = await run("rotate", name, "--grace", "1h")
    assert rotated.exit_code == 0, rotated.output
    new_secret = rotated.stdout.strip().splitlines()[-1]
    assert new_secret.startswith("kmk_") and new_secret != secret

    async def works(key: str) -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
            try:
                await task_pb2_grpc.TaskServiceStub(chan).ListOps(
                    task_pb2.ListOpsRequest(), metadata=[("authorization", f"Bearer {key}")]
                )
            except grpc.aio.AioRpcError as err:
                assert err.code() is grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

    assert await works(secret) and await works(new_secret)  # the old one has its grace hour
    revoked = await run("revoke", name)
    assert revoked.exit_code == 0, revoked.output
    assert not await works(secret)
    assert await works(new_secret)

    refused = await asyncio.to_thread(
        runner.invoke, keys_command, ["list"], env={**env, "KERNELMESH_API_KEY": new_secret}
    )
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output


def test_the_keys_cli_needs_a_key():
    result = CliRunner().invoke(keys_command, ["list"], env={"KERNELMESH_API_KEY": ""})
    assert result.exit_code != 0 and "KERNELMESH_API_KEY" in result.output
