"""API keys: minting, digesting, checking (briefly cached), rotation, and the
one table of which role may call which RPC.

Secrets are 256 random bits, shown once; only their SHA-256 digest is kept
(`core.api_keys.ApiKeyStore`). A bearer token that is not shaped like our keys
(`kmk_` and 43 base64url characters) is refused before anything else: no
hashing, no store read, no cache entry, so a flood of junk tokens costs nothing
but the refusal. A check is cached for `cache_seconds`, keyed by the secret's
digest, so a call with a key seen recently costs a format check, one SHA-256 of
47 bytes, one dictionary lookup and one clock read: no store round trip. A
revocation made on this server drops its cache entries at once, one
made elsewhere (another orchestrator sharing the store) takes effect within
`cache_seconds`. An entry never outlives the key's expiry or a revocation
already scheduled (rotation's grace), so those apply to the second."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kernelmesh.core.api_keys import ApiKeyRecord, ApiKeyStore, Role
from kernelmesh.core.errors import Code, InvalidArgument, KernelmeshError, NotFound, Violation

log = logging.getLogger(__name__)

SECRET_PREFIX = "kmk_"
KEY_PREFIX = "apiKeys/"
BOOTSTRAP_FILE = "bootstrap-admin.key"
MAX_LABEL_CHARS = 256
# Cached key checks (one per distinct well-formed secret seen within the bound).
MAX_CACHED_CHECKS = 10_000
# What `new_secret` makes: the prefix and 32 bytes in unpadded base64url, whose
# last character carries 4 bits (its 2 low bits are zero).
# One pattern for the whole header, spelled as leniently as `bearer_secret` reads it:
# this runs on every call.
_BEARER_KEY_RE = re.compile(
    rf"\s*(?i:bearer) \s*({re.escape(SECRET_PREFIX)}[A-Za-z0-9_-]{{42}}[AEIMQUYcgkosw048])\s*"
)
SECRET_CHARS = len(SECRET_PREFIX) + 43
# "Bearer " and the secret, with room for the spacing bearer_secret tolerates.
_MAX_HEADER_CHARS = 2 * SECRET_CHARS


class Unauthenticated(KernelmeshError):
    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(KernelmeshError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


# --- the role table -------------------------------------------------------

_USERS = frozenset({Role.ADMIN, Role.USER})
_ADMIN = frozenset({Role.ADMIN})
_NODE = frozenset({Role.NODE})

# Every RPC of every kernelmesh.v1 service, and the roles that may call it. A
# method missing here is refused to everyone (tests check the table is complete).
ROLE_TABLE: dict[str, frozenset[Role]] = {
    **{
        f"/kernelmesh.v1.TaskService/{m}": _USERS
        for m in (
            "ListOps",
            "SubmitTask",
            "RunTask",
            "StreamTasks",
            "GetTask",
            "WatchTask",
            "CancelTask",
            "ListTasks",
            "UploadTensor",
            "DownloadTensor",
            "DeleteTensor",
        )
    },
    **{
        f"/kernelmesh.v1.DeviceService/{m}": _USERS
        for m in ("ListDevices", "GetDevice", "WatchDevices")
    },
    **{
        f"/kernelmesh.v1.LLMService/{m}": _USERS
        for m in ("Generate", "GenerateStream", "Embed", "ListModels")
    },
    # shared-memory regions of a co-located client, in its own tenant
    **{
        f"/kernelmesh.v1.SharedMemoryService/{m}": _USERS
        for m in ("RegisterSharedMemory", "UnregisterSharedMemory", "ListSharedMemory")
    },
    # a node registers and keeps its lease; nothing else
    "/kernelmesh.v1.OrchestratorService/RegisterNode": _NODE,
    "/kernelmesh.v1.OrchestratorService/Heartbeat": _NODE,
    **{
        f"/kernelmesh.v1.OrchestratorService/{m}": _ADMIN
        for m in (
            "ListNodes",
            "GetNode",
            "DrainNode",
            "CreateApiKey",
            "ListApiKeys",
            "RevokeApiKey",
        )
    },
    **{
        f"/kernelmesh.v1.OrchestratorService/{m}": _USERS
        for m in (
            "SubmitWorkflow",
            "GetWorkflow",
            "WatchWorkflow",
            "CancelWorkflow",
            "ListWorkflows",
        )
    },
}

# Open to anyone, key or not: probes and `grpcurl list/describe`.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def may_call(role: Role, method: str) -> bool:
    return role in ROLE_TABLE.get(method, ())


# --- secrets --------------------------------------------------------------


def new_secret() -> str:
    """256 random bits, URL-safe, with a prefix that secret scanners can match."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return SECRET_PREFIX + raw


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def bearer_secret(header: str | None) -> str | None:
    """The key of an `authorization: Bearer <key>` value, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def key_secret(header: str | None) -> str | None:
    """The secret of an `authorization: Bearer <key>` value when it has exactly the
    shape of a kernelmesh key, else None. Nothing is hashed or looked up for
    anything else."""
    if not header or len(header) > _MAX_HEADER_CHARS:
        return None
    found = _BEARER_KEY_RE.fullmatch(header)
    return found[1] if found else None


@dataclass(frozen=True)
class Principal:
    """Who a call runs as: the key's id, tenant and role."""

    key_id: str
    tenant: str
    role: Role


@dataclass(frozen=True)
class CreatedKey:
    record: ApiKeyRecord
    secret: str  # shown once, never stored


def _principal(record: ApiKeyRecord) -> Principal:
    return Principal(record.key_id, record.tenant, record.role)


class KeyRing:
    """Key management and checks over an `ApiKeyStore`."""

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.clock = clock
        # the secret's SHA-256 digest -> (its principal, or None for a key that does
        # not authenticate, so a repeated wrong key is no store read; the clock time
        # the entry is good until). Keyed by the digest, not the header: every
        # spelling of one key shares an entry, and an entry holds 32 bytes of key,
        # whatever the caller sent.
        self._checked: dict[bytes, tuple[Principal | None, float]] = {}
        self._forgotten = 0  # bumped by forget(): a check begun before it is not cached
        self._lock = threading.Lock()

    # -- checks --------------------------------------------------------------

    def cached(self, header: str) -> Principal | None:
        """The principal of an `authorization` value checked recently, or None
        (malformed, not checked, not valid, or the entry is old): then call
        `check`. The interceptor's whole cost for a known key."""
        secret = key_secret(header)
        if secret is None:
            return None
        entry = self._checked.get(digest(secret))
        if entry is not None and entry[1] > self.clock():
            return entry[0]
        return None

    async def check(self, header: str | None) -> Principal:
        """The principal of an `authorization: Bearer <key>` value; UNAUTHENTICATED
        for a missing, unknown, expired or revoked key (the message does not say
        which of the last three)."""
        if not isinstance(header, str) or not header:
            raise Unauthenticated(
                "an API key is required: send metadata 'authorization: Bearer <key>'"
            )
        secret = key_secret(header)
        if secret is None:
            if len(header) > _MAX_HEADER_CHARS or bearer_secret(header) is not None:
                raise Unauthenticated(
                    f"the API key is not valid: kernelmesh keys are {SECRET_PREFIX!r} "
                    "and 43 base64url characters"
                )
            raise Unauthenticated(
                "an API key is required: send metadata 'authorization: Bearer <key>'"
            )
        key = digest(secret)
        entry = self._checked.get(key)
        if entry is None or entry[1] <= self.clock():
            forgotten = self._forgotten
            record = await self.store.get_api_key_by_digest(key)
            entry = self._entry(record)
            if forgotten == self._forgotten:  # else a revocation raced this read
                self._remember(key, entry)
        if entry[0] is None:
            raise Unauthenticated("the API key is not valid (unknown, expired or revoked)")
        return entry[0]

    async def authenticate(self, secret: str | None) -> Principal:
        """`check` for a bare secret (no `Bearer` scheme)."""
        return await self.check(f"Bearer {secret}" if secret else None)

    def _entry(self, record: ApiKeyRecord | None) -> tuple[Principal | None, float]:
        now = self.clock()
        until = now + self.cache_seconds
        if record is None or not record.active_at(now):
            return None, until
        for end in (record.expires_at, record.revoked_at):
            if end is not None and end < until:
                until = end
        return _principal(record), until

    def _remember(self, key: bytes, entry: tuple[Principal | None, float]) -> None:
        with self._lock:
            if len(self._checked) >= MAX_CACHED_CHECKS:
                # Old entries first; a flood of distinct wrong keys then drops the oldest
                # half (dicts keep insertion order), so the cache stays bounded.
                now = self.clock()
                kept = {k: e for k, e in self._checked.items() if e[1] > now}
                if len(kept) >= MAX_CACHED_CHECKS:
                    kept = dict(list(kept.items())[MAX_CACHED_CHECKS // 2 :])
                self._checked = kept
            self._checked[key] = entry

    def authorize(self, principal: Principal, method: str) -> None:
        if not may_call(principal.role, method):
            raise PermissionDenied(
                f"a {principal.role.value} key may not call {method.rsplit('/', 1)[-1]}"
            )

    def forget(self, record: ApiKeyRecord) -> None:
        """Drops the cached check of `record`'s secret."""
        with self._lock:
            self._forgotten += 1
            self._checked.pop(record.digest, None)

    # -- management ------------------------------------------------------------

    async def create(
        self,
        *,
        tenant: str,
        role: Role,
        label: str = "",
        expires_at: float | None = None,
    ) -> CreatedKey:
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidArgument([Violation("label", f"at most {MAX_LABEL_CHARS} characters")])
        now = self.clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument([Violation("expire_time", "must be in the future")])
        secret = new_secret()
        record = ApiKeyRecord(
            key_id=secrets.token_hex(8),
            digest=digest(secret),
            tenant=tenant,
            role=role,
            label=label,
            created_at=now,
            expires_at=expires_at,
        )
        await self.store.put_api_key(record)
        self.forget(record)  # a cached "unknown" for this digest is stale now
        return CreatedKey(record, secret)

    async def revoke(self, key_id: str, *, grace: float = 0.0) -> ApiKeyRecord:
        """Revokes a key now, or `grace` seconds from now (rotation: the old key
        keeps working while callers move to the new one)."""
        if grace < 0:
            raise InvalidArgument([Violation("grace", "must be >= 0")])
        record = await self.store.revoke_api_key(key_id, self.clock() + grace)
        if record is None:
            raise NotFound(f"API key {KEY_PREFIX}{key_id[:64]} not found")
        self.forget(record)
        return record

    async def rotate(self, key_id: str, *, grace: float) -> tuple[CreatedKey, ApiKeyRecord]:
        """A new key of the same tenant, role, label and expiry; the old one is
        revoked after `grace` seconds."""
        old = await self.store.get_api_key(key_id)
        if old is None:
            raise NotFound(f"API key {KEY_PREFIX}{key_id[:64]} not found")
        created = await self.create(
            tenant=old.tenant, role=old.role, label=old.label, expires_at=old.expires_at
        )
        return created, await self.revoke(key_id, grace=grace)

    async def bootstrap(self, state_dir: str | Path, tenant: str = "default") -> Path | None:
        """On a store with no active admin key, mints one and writes it to a 0600
        file in `state_dir` (replacing a stale one). Returns the file's path when a
        key was written, None when an admin key exists already."""
        now = self.clock()
        if any(r.role is Role.ADMIN and r.active_at(now) for r in await self.store.list_api_keys()):
            return None
        created = await self.create(tenant=tenant, role=Role.ADMIN, label="bootstrap admin")
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # private if made here
        path = directory / BOOTSTRAP_FILE
        temporary = directory / f".{BOOTSTRAP_FILE}.{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(created.secret + "\n")
        os.replace(temporary, path)
        log.warning(
            "auth: no admin key existed; a bootstrap admin key (%s%s, tenant %r) was written "
            "to %s (mode 0600). Create your own keys with it, then revoke it.",
            KEY_PREFIX,
            created.record.key_id,
            tenant,
            path,
        )
        return path


__all__ = [
    "OPEN_PREFIXES",
    "ROLE_TABLE",
    "CreatedKey",
    "KeyRing",
    "PermissionDenied",
    "Principal",
    "Unauthenticated",
    "bearer_secret",
    "digest",
    "is_open",
    "key_secret",
    "may_call",
    "new_secret",
]
