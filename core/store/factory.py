"""Which store a server runs on, from `--store` and `--state-dir`."""

from __future__ import annotations

import os
from pathlib import Path

from kernelmesh.core.store.base import Store, StoreError


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/kernelmesh`, else `~/.local/state/kernelmesh` (the XDG
    base directory spec's default for state)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kernelmesh"


def open_store(url: str | None, state_dir: str | Path | None) -> Store:
    """`sqlite` (default: `<state_dir>/state.sqlite`), `memory`, or a
    `postgresql://` URL (every blob in the database; `<state_dir>/blobs` is only
    read, for blobs an earlier version wrote there). The store is returned unopened."""
    kind = (url or "sqlite").strip()
    if kind == "sqlite":
        from kernelmesh.core.store.sqlite import SqliteStore

        if state_dir is None:
            raise StoreError("the sqlite store needs a state dir (--state-dir)")
        return SqliteStore(state_dir)
    if kind == "memory":
        from kernelmesh.core.store.memory import MemoryStore

        return MemoryStore()
    if kind.startswith(("postgresql://", "postgres://")):
        from kernelmesh.core.store.postgres import PostgresStore

        return PostgresStore(kind, blob_dir=Path(state_dir) / "blobs" if state_dir else None)
    raise StoreError(
        f"unknown store {kind!r}: use sqlite (the default), memory, or a postgresql:// URL"
    )
