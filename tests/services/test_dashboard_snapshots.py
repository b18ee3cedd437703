"""The dashboard's data on an in-process server: the snapshot's figures, the
Server-Sent Events stream, and a shutdown that open streams do not hold up."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
from helpers import spec

from kernelmesh.v1 import llm_pb2, llm_pb2_grpc, task_pb2, task_pb2_grpc


async def snapshot(server) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.http_port}/ui/snapshot") as response,
    ):
        assert response.status == 200
        return await response.json()


async def test_snapshot_counts_a_task_by_op_and_state(server, channel):
    before = {r["op"]: r for r in (await snapshot(server))["ops"]}
    tasks = task_pb2_grpc.TaskServiceStub(channel)
    await tasks.RunTask(task_pb2.RunTaskRequest(task=spec("exp", np.zeros(8, np.float32))))
    after = {r["op"]: r for r in (await snapshot(server))["ops"]}
    assert after["exp"]["succeeded"] == before.get("exp", {}).get("succeeded", 0) + 1
    assert after["exp"]["mean_ms"] is not None


async def test_snapshot_shows_llm_usage_per_tenant_and_model(server, channel):
    llm = llm_pb2_grpc.LLMServiceStub(channel)
    await llm.Embed(
        llm_pb2.EmbedRequest(inputs=["a cat", "a kitten"]),
        metadata=(("kernelmesh-tenant", "team-dash"),),
    )
    usage = (await snapshot(server))["llm"]["usage"]
    rows = [r for r in usage if r["tenant"] == "team-dash"]
    assert rows and rows[0]["model"] and rows[0]["requests"] == 1


async def test_event_stream_pushes_snapshots_and_shutdown_is_not_held(server):
    url = f"http://127.0.0.1:{server.http_port}/ui/events?interval=0.2"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        seen = []
        async with asyncio.timeout(20):
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == 2:
                        break
        assert [d["name"] for d in seen[0]["devices"]] == [d.name for d in server.devices]
        assert seen[1]["time"] > seen[0]["time"]

        began = time.monotonic()
        await server.stop(grace=1.0)  # with this stream still open
        assert time.monotonic() - began < 10
