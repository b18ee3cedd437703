"""API key records and the storage seam they are kept behind.

The secret itself is never stored: only its SHA-256 digest, so a leaked
store cannot be replayed as credentials. Durable implementations live with
the rest of the state (the `Store`); `MemoryApiKeyStore` serves
`--store memory` and unit tests of the auth rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    NODE = "node"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str  # public id; the resource name is f"apiKeys/{key_id}"
    digest: bytes  # SHA-256 of the secret
    tenant: str
    role: Role
    label: str
    created_at: float  # unix seconds
    expires_at: float | None = None
    revoked_at: float | None = None

    def active_at(self, now: float) -> bool:
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at


class ApiKeyStore(Protocol):
    async def put_api_key(self, record: ApiKeyRecord) -> None: ...

    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None: ...

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key (of one tenant when given), oldest first."""
        ...

    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None:
        """Set revoked_at to `at` unless the key is already revoked earlier;
        returns the updated record, or None for an unknown id."""
        ...


class MemoryApiKeyStore:
    def __init__(self) -> None:
        self._by_id: dict[str, ApiKeyRecord] = {}
        self._lock = asyncio.Lock()

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        async with self._lock:
            self._by_id[record.key_id] = record

    async def get_api_key_by_digest(self, digest: bytes) -> ApiKeyRecord | None:
        return next((r for r in self._by_id.values() if r.digest == digest), None)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return self._by_id.get(key_id)

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        records = sorted(self._by_id.values(), key=lambda r: (r.created_at, r.key_id))
        return [r for r in records if tenant is None or r.tenant == tenant]

    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None:
        async with self._lock:
            record = self._by_id.get(key_id)
            if record is None:
                return None
            if record.revoked_at is None or record.revoked_at > at:
                record = replace(record, revoked_at=at)
                self._by_id[key_id] = record
            return record
