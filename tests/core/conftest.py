"""Fixtures for the core tests: a fresh PostgreSQL database, a started TaskManager."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from postgres_db import create_database, drop_database

from kernelmesh.core import devices
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions
from kernelmesh.core.tensor_store import TensorStore


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """The DSN of a fresh database, dropped after the test (a test using it is
    skipped without PostgreSQL, and fails under CI)."""
    dsn, name = create_database()
    yield dsn
    drop_database(name)


@pytest.fixture
async def manager() -> AsyncIterator[TaskManager]:
    """A started TaskManager on the test devices, one worker each, shut down after."""
    mgr = TaskManager(
        devices.discover("test"),
        TensorStore(64 << 20),
        TaskManagerOptions(workers_per_device=1, retention_tasks=50),
    )
    await mgr.start()
    try:
        yield mgr
    finally:
        await mgr.shutdown(grace=5.0)
