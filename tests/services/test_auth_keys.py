"""core.auth without gRPC: key checks, the cache and its bounds, rotation and
the bootstrap key, against the ApiKeyStore protocol (MemoryApiKeyStore)."""

from __future__ import annotations

import asyncio
import stat

import pytest

from kernelmesh.core import auth
from kernelmesh.core.api_keys import MemoryApiKeyStore, Role
from kernelmesh.core.auth import (
    BOOTSTRAP_FILE,
    KeyRing,
    PermissionDenied,
    Unauthenticated,
    bearer_secret,
    digest,
    key_secret,
    new_secret,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryApiKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def get_api_key_by_digest(self, key: bytes):
        self.lookups += 1
        return await super().get_api_key_by_digest(key)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def ring(store, clock) -> KeyRing:
    return KeyRing(store, cache_seconds=5.0, clock=clock)


async def test_a_created_key_authenticates_as_its_tenant_and_role(ring, store):
    created = await ring.create(tenant="t1", role=Role.USER, label="ci")
    principal = await ring.authenticate(created.secret)
    assert (principal.tenant, principal.role) == ("t1", Role.USER)
    stored = await store.get_api_key(created.record.key_id)
    assert stored.digest == digest(created.secret)  # only the digest is kept
    assert created.secret not in repr(stored)


async def test_secrets_are_256_bit_and_distinct(ring):
    secrets = {(await ring.create(tenant="t", role=Role.USER)).secret for _ in range(50)}
    assert len(secrets) == 50
    assert all(s.startswith("kmk_") and len(s) == 4 + 43 for s in secrets)


def well_formed_wrong_key() -> str:
    return new_secret()  # the shape of a key, but no key of the store


@pytest.mark.parametrize("secret", [None, "", "kmk_unknown", well_formed_wrong_key()])
async def test_missing_or_unknown_keys_are_unauthenticated(ring, secret):
    with pytest.raises(Unauthenticated):
        await ring.authenticate(secret)


async def test_checks_are_cached_so_calls_cost_no_store_round_trip(ring, store):
    created = await ring.create(tenant="t", role=Role.USER)
    for _ in range(100):
        await ring.authenticate(created.secret)
    assert store.lookups == 1
    wrong = well_formed_wrong_key()
    for _ in range(100):  # unknown keys are cached too: a flood costs one read each
        with pytest.raises(Unauthenticated):
            await ring.authenticate(wrong)
    assert store.lookups == 2


async def test_a_cached_check_is_keyed_by_the_digest_and_ends_with_the_bound(ring, store, clock):
    created = await ring.create(tenant="t", role=Role.USER)
    header = f"Bearer {created.secret}"
    assert ring.cached(header) is None  # never checked: the caller goes to check()
    principal = await ring.check(header)
    assert ring.cached(header) is principal  # the interceptor's whole cost for this key
    assert ring.cached(f"bearer  {created.secret} ") is principal  # another spelling: same key
    assert await ring.check(f"bearer  {created.secret} ") == principal
    assert store.lookups == 1
    assert list(ring._checked) == [digest(created.secret)]
    clock.now += 5.0
    assert ring.cached(header) is None
    assert await ring.check(header) == principal
    assert store.lookups == 2


MALFORMED = [
    "kmk_wrong",  # too short
    "kmk_" + "A" * 44,  # too long
    "kmk_" + "A" * 42 + "B",  # 43 characters, but not 32 bytes' worth (2 low bits set)
    "kmk_" + "A" * 42 + "=",  # padding, or any character outside base64url
    "kmk_" + "A" * 20 + "+/" + "A" * 21,  # standard base64, not base64url
    "xyz_" + "A" * 43,  # another prefix
    "kmk_" + "a" * 7000,  # the reviewer's 7,000-character tokens
]


@pytest.mark.parametrize("token", MALFORMED)
async def test_a_token_not_shaped_like_a_key_costs_no_store_read_and_no_cache_entry(
    ring, store, token
):
    header = f"Bearer {token}"
    assert key_secret(header) is None
    assert ring.cached(header) is None
    with pytest.raises(Unauthenticated, match="not valid"):
        await ring.check(header)
    assert store.lookups == 0
    assert ring._checked == {}


async def test_a_flood_of_distinct_overlong_tokens_reads_and_keeps_nothing(ring, store):
    for i in range(10_000):
        with pytest.raises(Unauthenticated):
            await ring.check(f"Bearer kmk_{i:07d}{'x' * 7000}")
    assert store.lookups == 0
    assert ring._checked == {}


def test_the_key_shape_is_what_new_secret_makes():
    for _ in range(200):  # every last character new_secret can end with, most likely
        secret = new_secret()
        assert key_secret(f"Bearer {secret}") == secret


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", b"Bearer kmk_x"])
async def test_headers_without_a_bearer_key_are_unauthenticated_without_a_store_read(
    ring, store, header
):
    with pytest.raises(Unauthenticated, match="required"):
        await ring.check(header)
    assert store.lookups == 0


async def test_the_cache_stays_bounded_under_a_flood_of_distinct_wrong_keys(ring, monkeypatch):
    monkeypatch.setattr(auth, "MAX_CACHED_CHECKS", 50)
    created = await ring.create(tenant="t", role=Role.USER)
    for _ in range(500):
        with pytest.raises(Unauthenticated):
            await ring.authenticate(well_formed_wrong_key())
        assert len(ring._checked) <= 50
    assert await ring.authenticate(created.secret)


async def test_a_revocation_racing_a_check_is_not_cached_over(ring, store):
    created = await ring.create(tenant="t", role=Role.USER)
    release = asyncio.Event()
    read = store.get_api_key_by_digest

    async def slow_read(key: bytes):
        record = await read(key)  # the key is still active when read
        await release.wait()
        return record

    store.get_api_key_by_digest = slow_read
    checking = asyncio.create_task(ring.authenticate(created.secret))
    await asyncio.sleep(0)  # the check is now waiting on its read
    await ring.revoke(created.record.key_id)
    release.set()
    await checking  # answered from what it read before the revocation
    store.get_api_key_by_digest = read
    with pytest.raises(Unauthenticated):  # but that answer was not cached
        await ring.authenticate(created.secret)


async def test_a_revocation_elsewhere_is_seen_after_the_cache_bound(ring, store, clock):
    created = await ring.create(tenant="t", role=Role.USER)
    await ring.authenticate(created.secret)
    await store.revoke_api_key(created.record.key_id, clock.now)  # another orchestrator
    clock.now += 4.9
    await ring.authenticate(created.secret)  # still cached, within the bound
    clock.now += 0.2
    with pytest.raises(Unauthenticated):
        await ring.authenticate(created.secret)


async def test_a_revocation_here_is_seen_at_once(ring):
    created = await ring.create(tenant="t", role=Role.USER)
    await ring.authenticate(created.secret)
    await ring.revoke(created.record.key_id)
    with pytest.raises(Unauthenticated):
        await ring.authenticate(created.secret)


async def test_expiry_is_checked_on_every_call_even_when_cached(ring, clock):
    created = await ring.create(tenant="t", role=Role.USER, expires_at=clock.now + 1)
    await ring.authenticate(created.secret)
    clock.now += 1
    with pytest.raises(Unauthenticated):
        await ring.authenticate(created.secret)


async def test_rotation_revokes_the_old_key_after_the_grace(ring, clock):
    old = await ring.create(tenant="t", role=Role.NODE, label="node-1")
    new, revoked = await ring.rotate(old.record.key_id, grace=60)
    assert (new.record.tenant, new.record.role, new.record.label) == ("t", Role.NODE, "node-1")
    assert revoked.revoked_at == clock.now + 60
    await ring.authenticate(old.secret)
    clock.now += 61
    with pytest.raises(Unauthenticated):
        await ring.authenticate(old.secret)
    await ring.authenticate(new.secret)


def test_roles_are_checked_against_the_table(ring):
    from kernelmesh.core.auth import Principal

    user = Principal("k", "t", Role.USER)
    ring.authorize(user, "/kernelmesh.v1.TaskService/RunTask")
    with pytest.raises(PermissionDenied):
        ring.authorize(user, "/kernelmesh.v1.OrchestratorService/CreateApiKey")
    with pytest.raises(PermissionDenied):  # not in the table: nobody
        ring.authorize(Principal("k", "t", Role.ADMIN), "/kernelmesh.v1.TaskService/Nope")


@pytest.mark.parametrize(
    ("header", "secret"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("", None), (None, None)],
)
def test_bearer_header_parsing(header, secret):
    assert bearer_secret(header) == secret


async def test_bootstrap_writes_one_0600_key_only_when_no_admin_exists(ring, tmp_path):
    path = await ring.bootstrap(tmp_path)
    assert path == tmp_path / BOOTSTRAP_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = await ring.authenticate(path.read_text().strip())
    assert principal.role is Role.ADMIN
    assert await ring.bootstrap(tmp_path) is None  # an admin exists: nothing written
    assert [p.name for p in tmp_path.iterdir()] == [BOOTSTRAP_FILE]
