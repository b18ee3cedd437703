"""The SQLite store's state dir and files are private to the server's user: they
hold every tenant's tasks, tensors and key digests."""

from __future__ import annotations

import logging
import sqlite3
import stat
from pathlib import Path

import pytest

from kernelmesh.core.store.sqlite import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
async def opened(tmp_path):
    stores: list[SqliteStore] = []

    async def open_at(directory: Path) -> SqliteStore:
        store = SqliteStore(directory)
        await store.open()
        stores.append(store)
        return store

    yield open_at
    for store in stores:
        await store.close()


async def test_a_fresh_state_dir_is_0700_and_its_database_files_0600(opened, tmp_path, caplog):
    state = tmp_path / "new" / "state"
    with caplog.at_level(logging.WARNING):
        store = await opened(state)
    assert mode(state) == 0o700
    assert mode(store.path) == 0o600
    # WAL mode holds these open while the store is: SQLite gives them the db's mode
    for suffix in ("-wal", "-shm"):
        assert mode(Path(f"{store.path}{suffix}")) == 0o600
    store.files.write("tensors/t1", b"x" * 16)
    assert mode(state / "blobs") == 0o700
    assert not [r for r in caplog.records if "open to other users" in r.getMessage()]


async def test_an_existing_open_state_dir_is_kept_with_a_warning(opened, tmp_path, caplog):
    state = tmp_path / "chosen"
    state.mkdir()
    state.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="kernelmesh.core.store.private_paths"):
        store = await opened(state)
    assert mode(state) == 0o755  # someone chose it: not ours to change
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(state) in m and "open to other users (mode 0755)" in m for m in warned)
    assert mode(store.path) == 0o600  # the data in it is private all the same


async def test_an_existing_private_state_dir_is_not_warned_about(opened, tmp_path, caplog):
    state = tmp_path / "chosen"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    with caplog.at_level(logging.WARNING):
        await opened(state)
    assert not [r for r in caplog.records if "open to other users" in r.getMessage()]


async def test_files_an_earlier_version_left_readable_are_made_private(opened, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = sqlite3.connect(state / "state.sqlite")  # as before: 0644 under umask 022
    db.execute("CREATE TABLE old (x)")
    db.close()
    (state / "state.sqlite").chmod(0o644)
    (state / "blobs").mkdir()
    (state / "blobs").chmod(0o755)
    store = await opened(state)
    assert mode(store.path) == 0o600
    assert mode(state / "blobs") == 0o700
