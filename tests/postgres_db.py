"""A fresh PostgreSQL database per test, on the cluster `.ci/run` starts.

The cluster is named by `KERNELMESH_TEST_POSTGRES` (a libpq URL), or by libpq's
own PG* variables as `pg_virtualenv` exports them. Without one the PostgreSQL
cases skip, saying so; under CI (CI=true) they fail instead, so a CI machine
that lost its database cannot pass by skipping."""

from __future__ import annotations

import asyncio
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import pytest


def cluster_dsn() -> str | None:
    dsn = os.environ.get("KERNELMESH_TEST_POSTGRES")
    if dsn:
        return dsn
    if os.environ.get("PGHOST") or os.environ.get("PGPORT"):
        return "postgresql://"  # libpq's PG* variables fill in the rest
    return None


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI: {reason}")
    pytest.skip(reason)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    if not parts.netloc:
        # urlunsplit drops the "//" of a URL with no host ("postgresql:/db"), which
        # is no URL a user would pass to --store; libpq's PG* variables name the host.
        query = f"?{parts.query}" if parts.query else ""
        return f"{parts.scheme}:///{name}{query}"
    return urlunsplit(parts._replace(path="/" + name))


def _run(coro) -> None:
    """Runs a coroutine on its own loop in a thread: callers may be inside a loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _admin(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(dsn, database="postgres"), 10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def create_database() -> tuple[str, str]:
    """A new empty database: (its DSN, its name)."""
    dsn = cluster_dsn()
    if dsn is None:
        unavailable("no PostgreSQL: set KERNELMESH_TEST_POSTGRES or run under pg_virtualenv")
    name = "km_" + secrets.token_hex(6)
    try:
        _run(_admin(dsn, f"CREATE DATABASE {name}"))
    except Exception as exc:
        unavailable(f"PostgreSQL at {dsn} is not reachable: {type(exc).__name__}: {exc}")
    return with_database(dsn, name), name


def drop_database(name: str) -> None:
    dsn = cluster_dsn()
    assert dsn is not None
    _run(_admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def admin(statement: str) -> None:
    """Runs one statement on the cluster's postgres database."""
    dsn = cluster_dsn()
    assert dsn is not None
    _run(_admin(dsn, statement))
