"""Fixtures for the core tests: a fresh PostgreSQL database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postgres_db import create_database, drop_database


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """The DSN of a fresh database, dropped after the test (a test using it is
    skipped without PostgreSQL, and fails under CI)."""
    dsn, name = create_database()
    yield dsn
    drop_database(name)
