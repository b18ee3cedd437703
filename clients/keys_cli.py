"""`kernelmesh keys create|list|revoke|rotate`: API key management over
OrchestratorService, with an admin key from KERNELMESH_API_KEY (or --api-key).
Plugged into the `kernelmesh` command through the `kernelmesh.cli` entry-point
group."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from kernelmesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
ROLES = {
    "admin": orchestrator_pb2.API_KEY_ROLE_ADMIN,
    "user": orchestrator_pb2.API_KEY_ROLE_USER,
    "node": orchestrator_pb2.API_KEY_ROLE_NODE,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
Metadata = list[tuple[str, str]]
_F = TypeVar("_F", bound=Callable[..., Any])
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '30d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise click.BadParameter(f"{text!r}: a duration such as 90s, 15m, 12h or 30d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@contextmanager
def _stub(
    target: str, api_key: str | None, ca_bundle: str | None
) -> Iterator[tuple[orchestrator_pb2_grpc.OrchestratorServiceStub, Metadata]]:
    if not api_key:
        raise click.UsageError("an admin key is needed: set KERNELMESH_API_KEY or --api-key")
    if ca_bundle:
        with open(ca_bundle, "rb") as handle:
            credentials = grpc.ssl_channel_credentials(handle.read())
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        yield (
            orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
            [("authorization", f"Bearer {api_key}")],
        )


def _call(method: Callable[..., Any], request: Message, metadata: Metadata) -> Any:
    """The stub's reply (the generated stubs are untyped), or exit 1 with the status."""
    try:
        return method(request, metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        click.echo(f"error: {exc.code().name}: {exc.details()}", err=True)
        sys.exit(1)


def _when(ts: timestamp_pb2.Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts.seconds)) + "Z"


def _show(key: orchestrator_pb2.ApiKey) -> str:
    return (
        f"{key.name:<26} {key.tenant:<16} {ROLE_NAMES.get(key.role, '?'):<6} "
        f"created {_when(key.create_time, key.HasField('create_time'))}  "
        f"expires {_when(key.expire_time, key.HasField('expire_time'))}  "
        f"revoked {_when(key.revoke_time, key.HasField('revoke_time'))}  {key.label}"
    )


def _connection(func: _F) -> _F:
    func = click.option(
        "--ca-bundle",
        type=click.Path(exists=True, dir_okay=False),
        envvar="KERNELMESH_CA_BUNDLE",
        default=None,
        help="PEM CA bundle for a TLS server.",
    )(func)
    func = click.option(
        "--api-key", envvar="KERNELMESH_API_KEY", default=None, help="An admin key."
    )(func)
    return click.option(
        "--target",
        "-t",
        default=DEFAULT_TARGET,
        show_default=True,
        envvar="KERNELMESH_TARGET",
        help="host:port of a kernelmesh server.",
    )(func)


@click.group()
def keys() -> None:
    """API keys: create, list, revoke, rotate (needs an admin key)."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for.")
@click.option("--role", type=click.Choice(sorted(ROLES)), default="user", show_default=True)
@click.option("--label", default="", help="Who or what holds the key.")
@click.option("--expires-in", default=None, help="e.g. 30d; default: never expires.")
@_connection
def create(
    tenant: str,
    role: str,
    label: str,
    expires_in: str | None,
    target: str,
    api_key: str | None,
    ca_bundle: str | None,
) -> None:
    """Create a key; its secret is printed once, on stdout alone."""
    request = orchestrator_pb2.CreateApiKeyRequest(tenant=tenant, role=ROLES[role], label=label)
    if expires_in:
        request.expire_time.FromNanoseconds(int((time.time() + parse_duration(expires_in)) * 1e9))
    with _stub(target, api_key, ca_bundle) as (stub, metadata):
        reply = _call(stub.CreateApiKey, request, metadata)
    click.echo(_show(reply.api_key), err=True)
    click.echo(reply.secret)


def _all_keys(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, metadata: Metadata, tenant: str
) -> list[orchestrator_pb2.ApiKey]:
    found: list[orchestrator_pb2.ApiKey] = []
    token = ""
    while True:
        reply = _call(
            stub.ListApiKeys,
            orchestrator_pb2.ListApiKeysRequest(page_size=1000, page_token=token, tenant=tenant),
            metadata,
        )
        found += reply.api_keys
        token = reply.next_page_token
        if not token:
            return found


@keys.command("list")
@click.option("--tenant", default="", help="Only this tenant's keys.")
@_connection
def list_keys(tenant: str, target: str, api_key: str | None, ca_bundle: str | None) -> None:
    """List keys (never their secrets)."""
    with _stub(target, api_key, ca_bundle) as (stub, metadata):
        for key in _all_keys(stub, metadata, tenant):
            click.echo(_show(key))


@keys.command("revoke")
@click.argument("name")
@click.option("--grace", default=None, help="Revoke this long from now (e.g. 1h); default: now.")
@_connection
def revoke(
    name: str, grace: str | None, target: str, api_key: str | None, ca_bundle: str | None
) -> None:
    """Revoke a key by name (apiKeys/ID)."""
    request = orchestrator_pb2.RevokeApiKeyRequest(name=name)
    if grace:
        request.grace.CopyFrom(_duration(parse_duration(grace)))
    with _stub(target, api_key, ca_bundle) as (stub, metadata):
        reply = _call(stub.RevokeApiKey, request, metadata)
    click.echo(_show(reply.api_key))


@keys.command("rotate")
@click.argument("name")
@click.option("--grace", default="1h", show_default=True, help="How long the old key still works.")
@_connection
def rotate(name: str, grace: str, target: str, api_key: str | None, ca_bundle: str | None) -> None:
    """Create a key like NAME (tenant, role, label, expiry), then revoke NAME
    after the grace period. The new secret is printed once, on stdout alone."""
    seconds = parse_duration(grace)
    with _stub(target, api_key, ca_bundle) as (stub, metadata):
        old = next((k for k in _all_keys(stub, metadata, "") if k.name == name), None)
        if old is None:
            click.echo(f"error: NOT_FOUND: API key {name} not found", err=True)
            sys.exit(1)
        request = orchestrator_pb2.CreateApiKeyRequest(
            tenant=old.tenant, role=old.role, label=old.label
        )
        if old.HasField("expire_time"):
            request.expire_time.CopyFrom(old.expire_time)
        created = _call(stub.CreateApiKey, request, metadata)
        revoked = _call(
            stub.RevokeApiKey,
            orchestrator_pb2.RevokeApiKeyRequest(name=name, grace=_duration(seconds)),
            metadata,
        )
    click.echo(_show(created.api_key), err=True)
    click.echo(_show(revoked.api_key), err=True)
    click.echo(created.secret)


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


__all__ = ["keys", "parse_duration"]
