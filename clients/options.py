"""How a client connects and calls: deadline, retries, tenant, API key and TLS,
turned into what gRPC takes (channel options and credentials, call metadata,
the retry policy). Both faces read the same `ClientOptions`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential_jitter

from kernelmesh.clients.errors import UnavailableError

DEFAULT_TARGET = "127.0.0.1:50051"
TENANT_METADATA_KEY = "kernelmesh-tenant"
API_KEY_ENV = "KERNELMESH_API_KEY"
MAX_MESSAGE_BYTES = 256 << 20

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ClientOptions:
    """timeout: default deadline of each call, seconds. retries: attempts on
    UNAVAILABLE (exponential backoff with jitter), 1 disables retrying.
    api_key: sent as `authorization: Bearer <key>` on every call. tls: a
    secure channel (implied by ca_bundle or a client certificate); ca_bundle:
    a PEM file of the CAs to trust instead of the system's; client_cert and
    client_key: PEM files of the client's certificate and key for mTLS."""

    timeout: float = 30.0
    retries: int = 4
    tenant: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    api_key: str | None = None
    tls: bool = False
    ca_bundle: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_bundle is not None or self.client_cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if not self.secure:
            return None
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_cert and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_bundle),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert),
        )

    def metadata(self) -> Metadata:
        """What every call carries: the tenant and the API key, when set."""
        pairs: list[tuple[str, str]] = []
        if self.tenant:
            pairs.append((TENANT_METADATA_KEY, self.tenant))
        if self.api_key:
            pairs.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(pairs)


class Connected:
    """The constructor both faces share: `Client(target, **options)` and
    `AsyncClient(target, **options)` take the same options, and each face
    opens its own transport over them in `_connect`."""

    options: ClientOptions

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        tenant: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        tls: bool = False,
        ca_bundle: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ) -> None:
        """api_key: None reads $KERNELMESH_API_KEY, "" sends none. credentials:
        ready-made channel credentials, instead of tls/ca_bundle/client_*."""
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self.options = ClientOptions(
            timeout=timeout,
            retries=retries,
            tenant=tenant,
            api_key=api_key,
            tls=tls,
            ca_bundle=ca_bundle,
            client_cert=client_cert,
            client_key=client_key,
        )
        self._connect(target, self.options, credentials)

    def _connect(
        self, target: str, options: ClientOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        raise NotImplementedError


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel_options(opts: ClientOptions) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
    ]


def retry_policy(opts: ClientOptions) -> dict[str, Any]:
    """The tenacity policy: retry only UNAVAILABLE (never a real answer),
    exponential backoff with jitter."""
    return {
        "retry": retry_if_exception(lambda e: isinstance(e, UnavailableError)),
        "stop": stop_after_attempt(max(1, opts.retries)),
        "wait": wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05),
        "reraise": True,
    }
