"""Fixtures of the LLM service tests: a fake upstream on loopback and an
in-process server whose gateway talks to it."""

from __future__ import annotations

import dataclasses

import pytest
from llm_setup import write_llm_config
from llm_upstream import Upstream


@pytest.fixture
async def upstream():
    async with Upstream() as up:
        yield up


@pytest.fixture
async def llm_server(server_config, tmp_path, upstream, start_server):
    path = write_llm_config(tmp_path, upstream.openai_url, upstream.ollama_url)
    return await start_server(dataclasses.replace(server_config, llm_config=str(path)))
