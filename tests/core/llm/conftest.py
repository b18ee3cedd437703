"""Fixtures for the gateway's tests: fake upstreams on loopback, a
hand-moved clock, and gateways that are closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from llm_helpers import FakeClock
from llm_upstream import Upstream

from kernelmesh.core.llm import Gateway, LLMConfig


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as server:
        yield server


@pytest.fixture
async def upstream2() -> AsyncIterator[Upstream]:
    async with Upstream(reply="second upstream answers") as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Builds started gateways and closes them after the test."""
    gateways: list[Gateway] = []

    async def make(config: LLMConfig, **kwargs: Any) -> Gateway:
        gateway = Gateway(config, **kwargs)
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield make
    for gateway in gateways:
        await gateway.close()
