"""Server configuration: defaults, overridden by a YAML file, overridden by
command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kernelmesh.core.batching import BatchingOptions
from kernelmesh.core.limits import Quotas
from kernelmesh.core.ops import Limits

MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # None disables the HTTP sidecar; 0 picks a free port.
    http_port: int | None = 8080
    node_name: str = "local"
    # gRPC's own cap on one message; tensors above limits are refused earlier,
    # with INVALID_ARGUMENT naming the field.
    max_message_bytes: int = 256 * MiB
    limits: Limits = field(default_factory=Limits)
    retention_tasks: int = 10_000
    retention_bytes: int = 1024 * MiB
    tensor_store_bytes: int = 2048 * MiB
    workers_per_device: int = 2
    inline_max_elements: int = 1 << 14
    # Seconds in-flight work gets to finish after SIGTERM.
    grace_seconds: float = 30.0
    # Skip compiling kernels and measuring devices at start (tests that never run
    # kernels). Unmeasured devices are placed CPU first.
    warmup: bool = True
    # Backends to look for devices in (cpu, opencl, cuda, metal); None: all of them.
    backends: tuple[str, ...] | None = None
    # YAML file of LLM models and deployments (core/llm/config.py); None: only
    # the offline "local" embedding model, and Generate explains what to configure.
    llm_config: str | None = None
    # Directory of durable state: submitted tasks, named tensors and API keys
    # (state.sqlite, SQLite in WAL mode, big blobs in blobs/), LLM usage and spent
    # token budgets (usage.sqlite). `kernelmesh serve` defaults it to
    # $XDG_STATE_HOME/kernelmesh; None (an embedded Server) keeps state in memory.
    state_dir: str | None = None
    # Where tasks, tensors and keys are kept: "sqlite" (under state_dir), "memory",
    # or a postgresql:// URL. None: sqlite with a state_dir, else memory.
    store: str | None = None
    # Finished submitted tasks are forgotten after this many seconds (and beyond
    # retention_tasks / retention_bytes), in memory and in the store.
    retention_seconds: float = 7 * 24 * 3600.0
    # Security (issue 9): per-tenant quotas and request limits (core/limits.py).
    quotas: Quotas = field(default_factory=Quotas)
    # Require an API key on every call but health and reflection. Beyond loopback
    # the server refuses to start without it, unless insecure_open says otherwise.
    auth: bool = False
    insecure_open: bool = False
    # Seconds a key check is cached: a revocation or expiry elsewhere takes effect
    # on this server within this bound (at once for revocations made here).
    auth_cache_seconds: float = 5.0
    # Require a key for /metrics on the HTTP sidecar too.
    protect_metrics: bool = False
    # PEM files: the server's certificate chain and key (TLS), and the CA bundle
    # client certificates must chain to (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Dynamic batching (core/batching.py): the YAML `batching:` section.
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    # The mesh. "serve": all in one (nodes may still join); "orchestrator": public
    # services, devices only from nodes that join (and its own with with_node);
    # "node": runs forwarded tasks on its devices for the orchestrators in `join`.
    role: str = "serve"
    with_node: bool = False
    # Orchestrator addresses a node registers with, tried in turn ("host:port").
    join: tuple[str, ...] = ()
    # A node without a heartbeat for this long is LOST (orchestrator side).
    lease_seconds: float = 10.0
    # The address orchestrators reach this node at; default host:port of its gRPC.
    advertise: str | None = None
    # Securing the hop between orchestrators and nodes. A node: its own key (role
    # node) for RegisterNode and Heartbeat ($KERNELMESH_API_KEY when unset), and the
    # CA bundle of the orchestrators' certificates (it joins over TLS, presenting
    # tls_cert/tls_key when the orchestrator asks for a client certificate). An
    # orchestrator: the CA bundle of the nodes' certificates (forwarded calls go
    # over TLS, presenting tls_cert/tls_key to a node that asks for one).
    api_key: str | None = None
    join_ca: str | None = None
    node_ca: str | None = None


def load(path: str | Path | None = None, **overrides: object) -> ServerConfig:
    """Defaults, then the YAML file's keys, then non-None overrides."""
    values: dict[str, object] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    if isinstance(backends := values.get("backends"), str):
        values["backends"] = tuple(b.strip() for b in backends.split(",") if b.strip())
    elif isinstance(backends, list):
        values["backends"] = tuple(backends)
    if isinstance(join := values.get("join"), str):
        values["join"] = tuple(a.strip() for a in join.split(",") if a.strip())
    elif isinstance(join, list):
        values["join"] = tuple(join)
    if isinstance(values.get("limits"), dict):
        values["limits"] = Limits(**values["limits"])  # type: ignore[arg-type]
    if isinstance(values.get("quotas"), dict):
        values["quotas"] = Quotas(**values["quotas"])  # type: ignore[arg-type]
    if isinstance(values.get("batching"), dict):
        values["batching"] = BatchingOptions.from_mapping(values["batching"])  # type: ignore[arg-type]
    return ServerConfig(**values)  # type: ignore[arg-type]
