"""Two LLM gateways (two servers) on one PostgreSQL store draw on one token
budget: the database grants each reservation, so together they never spend
more than the budget, and once it is spent both refuse."""

from __future__ import annotations

import asyncio

from llm_helpers import chat_config, deployment, user
from postgres_db import create_database, drop_database

from kernelmesh.core.errors import ResourceExhausted
from kernelmesh.core.llm import GenerationOptions
from kernelmesh.core.store import StoreUsage
from kernelmesh.core.store.postgres import PostgresStore

CJK = "你好世界" * 50  # 200 characters, 600 UTF-8 bytes


async def test_two_gateways_on_one_postgresql_never_exceed_one_budget(upstream, make_gateway):
    budget = 5000
    config = chat_config(
        deployment("primary", upstream), tenants={"acme": {"token_budget": budget}}
    )
    dsn, name = create_database()
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    try:
        gateways = []
        for i, store in enumerate(stores):
            await store.open()
            usage = StoreUsage(store, f"orch-{i}")
            await usage.open()
            gateways.append(await make_gateway(config, store=usage))
        upstream.count_prompt_by("chars")
        upstream.stall(0.05)  # all in flight together
        options = GenerationOptions(max_tokens=12)
        results = await asyncio.gather(
            *(gateways[i % 2].generate("acme", "chat", user(CJK), options) for i in range(60)),
            return_exceptions=True,
        )
        ok = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(ok) + len(refused) == len(results)
        used = sum(r.usage.total_tokens for _, r in ok)  # type: ignore[union-attr]
        assert 0 < used <= budget
        assert {i % 2 for i, _ in ok} == {0, 1}  # both servers granted some
        for store in stores:
            await store.sync()
        spent, usage_rows = await stores[0].budget_usage()
        assert spent == {"acme": used}  # settled, every reservation swapped for its use
        assert sum(row[3] for row in usage_rows) == len(ok)
        # Sequential requests to both servers in turn until the shared budget refuses.
        # Each answer comes after its settlement is committed, so the refusal is for
        # a spent budget, never for the caller's own last request still "in flight".
        for i in range(100):
            try:
                reply = await gateways[i % 2].generate("acme", "chat", user(CJK), options)
            except ResourceExhausted as refusal:
                assert "spent, 0 reserved by requests in flight" in str(refusal), refusal
                break
            used += reply.usage.total_tokens
        else:
            raise AssertionError("the shared budget never ran out")
        assert used <= budget
        for gateway in gateways:  # both refuse now: one budget, not one each
            try:
                await gateway.generate("acme", "chat", user(CJK), options)
            except ResourceExhausted:
                continue
            raise AssertionError("a request beyond the shared budget was granted")
        for store in stores:
            await store.sync()
        spent, _ = await stores[0].budget_usage()
        assert spent == {"acme": used}
    finally:
        for store in stores:
            await store.close()
        drop_database(name)
