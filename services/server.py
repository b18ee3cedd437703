"""Assembles the all-in-one server: every kernelmesh.v1 service, health and
reflection on one gRPC port, and the HTTP sidecar on another."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import secrets
import signal
import ssl
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from kernelmesh.core import devices as device_discovery
from kernelmesh.core.api_keys import ApiKeyStore
from kernelmesh.core.auth import KeyRing
from kernelmesh.core.config import ServerConfig
from kernelmesh.core.device_monitor import DeviceMonitor
from kernelmesh.core.limits import TenantLedger
from kernelmesh.core.llm import Gateway
from kernelmesh.core.mesh.nodes import Mesh
from kernelmesh.core.mesh.shared_tasks import SharedTasks
from kernelmesh.core.mesh.tensors import TensorLocations
from kernelmesh.core.ops import Limits
from kernelmesh.core.shm import SharedMemoryRegistry
from kernelmesh.core.store import Store, StoreUsage, UsageStore, open_store
from kernelmesh.core.tasks import TaskManager, TaskManagerOptions
from kernelmesh.core.tensor_store import TensorStore
from kernelmesh.core.workflows import WorkflowEngine, WorkflowOptions
from kernelmesh.native import compile_cache, host_memory
from kernelmesh.services import dashboard, http_guard, openai_facade, sidecar, tracing
from kernelmesh.services.auth_interceptor import AuthInterceptor
from kernelmesh.services.device_servicer import DeviceServicer
from kernelmesh.services.health import HealthServicer, StoreWatch
from kernelmesh.services.keys_servicer import ApiKeyServicer
from kernelmesh.services.llm_servicer import LLMServicer
from kernelmesh.services.mesh_forward import Forwarder
from kernelmesh.services.mesh_sync import SharedMesh
from kernelmesh.services.mesh_tensors import TensorRelay
from kernelmesh.services.node_agent import NodeAgent
from kernelmesh.services.node_auth import NodeTokenInterceptor, new_token
from kernelmesh.services.orchestrator_nodes import NodeRpcs
from kernelmesh.services.request_guard import GuardedRegistrar
from kernelmesh.services.rpc_metrics import RpcMetricsInterceptor, instrument
from kernelmesh.services.shm_servicer import SharedMemoryServicer
from kernelmesh.services.task_servicer import TaskServicer
from kernelmesh.services.unimplemented import UnimplementedOrchestratorServicer
from kernelmesh.services.workflow_servicer import WorkflowServicer
from kernelmesh.v1 import (
    device_pb2,
    device_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    shm_pb2,
    shm_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

log = logging.getLogger(__name__)


class _OrchestratorRpcs(ApiKeyServicer, WorkflowServicer, UnimplementedOrchestratorServicer):
    """OrchestratorService without the mesh (a node's own server): each group of
    RPCs comes from its own servicer module (first in the bases wins); RPCs nobody
    implements stay UNIMPLEMENTED."""

    def __init__(self, keys: KeyRing, workflows: WorkflowEngine, limits: Limits) -> None:
        ApiKeyServicer.__init__(self, keys)
        WorkflowServicer.__init__(self, workflows, limits)


class OrchestratorServicer(NodeRpcs, _OrchestratorRpcs):
    """OrchestratorService of an orchestrator (or `serve`): the node RPCs
    (services/orchestrator_nodes.py) over keys and workflows."""

    def __init__(
        self, mesh: Mesh, keys: KeyRing, workflows: WorkflowEngine, limits: Limits
    ) -> None:
        NodeRpcs.__init__(self, mesh)
        _OrchestratorRpcs.__init__(self, keys, workflows, limits)


SERVICE_NAMES = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name,
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
)
# Services that answer real work today; the others report NOT_SERVING.
SERVING = SERVICE_NAMES[:3]


def host_port(host: str, port: int) -> str:
    """A gRPC address: an IPv6 literal in brackets (`::1` alone does not bind)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def check_security(config: ServerConfig) -> None:
    """Refuses settings that would expose the server: open (no auth) beyond
    loopback without an explicit --insecure-open, auth without a state dir for
    its bootstrap key, half a TLS pair."""
    if not config.auth and not config.insecure_open and not is_loopback(config.host):
        what = (
            "--auth (only its orchestrators may call it)"
            if config.role == "node"
            else "--auth (API keys)"
        )
        raise ValueError(
            f"refusing to serve {config.host} without authentication: beyond loopback "
            f"kernelmesh needs {what}, or --insecure-open to run open anyway"
        )
    if config.auth and not config.state_dir and config.role != "node":
        raise ValueError("--auth needs --state-dir: the bootstrap admin key is written there")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")


class Server:
    """One process: orchestrator-facing API plus this node's devices."""

    def __init__(self, config: ServerConfig, api_keys: ApiKeyStore | None = None) -> None:
        check_security(config)
        self.config = config
        self.port = 0
        self.http_port = 0
        self.started = False
        self.draining = False
        self._grpc: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._runner = None
        self._warmup: asyncio.Task | None = None
        self._refining: asyncio.Task | None = None
        self.store_watch: StoreWatch | None = None
        if config.role == "orchestrator" and not config.with_node:
            self.devices: list = []  # devices come from the nodes that join
        else:
            self.devices = device_discovery.discover(config.node_name, config.backends)
        store_kind = config.store or ("sqlite" if config.state_dir else "memory")
        # Opened (and migrated) in start(); a bad --store fails here.
        self.state: Store = open_store(store_kind, config.state_dir)
        # API keys live in the state store (digests only), so they survive restarts
        # and are shared by orchestrators on one PostgreSQL.
        self.api_keys: ApiKeyStore = api_keys if api_keys is not None else self.state
        self.keys = KeyRing(self.api_keys, cache_seconds=config.auth_cache_seconds)
        # A node's --auth admits only its orchestrators (services/node_auth.py): it
        # has no keys of its own to check.
        self.auth = config.auth and config.role != "node"
        self.node_token = new_token() if config.role == "node" else ""
        self.ledger = TenantLedger(config.quotas)
        self.tasks = TaskManager(
            self.devices,
            TensorStore(config.tensor_store_bytes, self.ledger),
            TaskManagerOptions(
                limits=config.limits,
                retention_tasks=config.retention_tasks,
                retention_bytes=config.retention_bytes,
                workers_per_device=config.workers_per_device,
                inline_max_elements=config.inline_max_elements,
                retention_seconds=config.retention_seconds,
                batching=config.batching,
            ),
            journal=self.state,
            tracing=tracing.task_tracing(),
        )
        # Shared-memory regions of co-located clients (README, "Shared memory").
        self.shm = SharedMemoryRegistry()
        # The mesh (orchestrator side): nodes join this server, and the same
        # TaskService forwards attempts placed on their devices.
        self.mesh: Mesh | None = None
        self.agent: NodeAgent | None = None
        self._forwarder: Forwarder | None = None
        if config.role in ("serve", "orchestrator"):
            self.tasks.park_unplaced = config.role == "orchestrator"
            self._forwarder = Forwarder(
                max_message_bytes=config.max_message_bytes,
                limits=config.limits,
                credentials=channel_credentials(config.node_ca, config),
            )
            self.mesh = Mesh(self.tasks, self._forwarder, lease_seconds=config.lease_seconds)
        self.tensor_relay: TensorRelay | None = None
        if self.mesh is not None and self._forwarder is not None and not self.devices:
            # No devices of its own: uploaded tensors are stored on the nodes and only
            # their whereabouts kept here (README, "Mesh"). serve keeps them in-process.
            locations = TensorLocations(self.state)
            self.tasks.remote_tensors = self.mesh.tensors = locations
            self.tensor_relay = TensorRelay(
                self.mesh, self._forwarder, locations, config.limits, config.quotas
            )
        self.shared: SharedMesh | None = None
        if self.mesh is not None and self.state.shared:
            # Orchestrators sharing one store: tasks are held under leases.
            owner = f"{config.node_name}-{secrets.token_hex(4)}"
            self.tasks.owner = self.mesh.owner = owner
            self.tasks.lease_seconds = config.lease_seconds
            self.mesh.store = self.state
            self.shared = SharedMesh(self.mesh, self.tasks, self.state, owner)
            # Any orchestrator answers for a task another one holds.
            self.tasks.shared_view = SharedTasks(self.tasks, self.state)
        # LLM gateway (issue 4): a bad --llm-config fails here, before any port is bound.
        # In memory without --state-dir; held here either way, so the dashboard reads it.
        # In the configured store when it is durable (shared by every orchestrator
        # on a PostgreSQL store: one budget for all of them).
        self.usage: UsageStore = (
            StoreUsage(self.state, f"{config.node_name}-{secrets.token_hex(4)}")
            if self.state.durable
            else UsageStore(
                Path(config.state_dir) / "usage.sqlite" if config.state_dir else ":memory:"
            )
        )
        self.llm = Gateway.from_file(config.llm_config, store=self.usage)
        self.workflows = WorkflowEngine(
            self.tasks, self.llm, journal=self.state, options=WorkflowOptions(limits=config.limits)
        )
        if self.shared is not None:  # workflows are held under leases too
            self.shared.workflows = self.workflows

    async def start(self) -> None:
        # The store first: a state dir or database that cannot be used stops the
        # start with its reason, before any port is bound.
        began = time.perf_counter()
        host_memory.retain_freed_memory()  # bulk tensors reuse buffers, not fresh pages
        await self.state.open()
        try:
            if isinstance(self.usage, StoreUsage):
                await self.usage.open()
                if self.config.state_dir:  # kept apart by an earlier version
                    await self.usage.import_file(Path(self.config.state_dir) / "usage.sqlite")
            await self._start(began)
        except BaseException:
            await self.state.close()
            raise

    async def _start(self, began: float) -> None:
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        # Per-RPC metrics (grpc_server_*) outermost, so they see every call's final code,
        # refusals by the key check included; then the server spans when tracing is on
        # (services/tracing.py). The key check runs before a request is read; with auth
        # off there is no auth interceptor at all.
        interceptors: list[grpc.aio.ServerInterceptor] = list(tracing.server_interceptors())
        if self.auth:
            interceptors.append(AuthInterceptor(self.keys))
        elif cfg.auth and cfg.role == "node":
            interceptors.append(NodeTokenInterceptor(self.node_token))
        # With no other interceptor, the metrics wrap each handler where it is registered
        # instead: grpc.aio's interceptor pipeline costs every call a few coroutines.
        if interceptors:
            interceptors.insert(0, RpcMetricsInterceptor())
        server = grpc.aio.server(options=options, interceptors=interceptors or None)
        # Every handler is guarded: bad bytes and bad enums are INVALID_ARGUMENT.
        guarded = GuardedRegistrar(server, outer=None if interceptors else instrument)
        task_pb2_grpc.add_TaskServiceServicer_to_server(
            TaskServicer(
                self.tasks,
                cfg.limits,
                max_reply_bytes=max(1 << 20, cfg.max_message_bytes - (1 << 20)),
                shm=self.shm,
                tensors=self.tensor_relay,
            ),
            guarded,
        )
        shm_pb2_grpc.add_SharedMemoryServiceServicer_to_server(
            SharedMemoryServicer(self.shm), guarded
        )
        monitor = DeviceMonitor(self.devices, self.mesh.devices if self.mesh else None)
        self._monitor = monitor
        device_pb2_grpc.add_DeviceServiceServicer_to_server(
            DeviceServicer(monitor, cfg.quotas), guarded
        )
        llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(self.llm), guarded)
        orchestrator = (
            OrchestratorServicer(self.mesh, self.keys, self.workflows, cfg.limits)
            if self.mesh
            else _OrchestratorRpcs(self.keys, self.workflows, cfg.limits)
        )
        orchestrator.max_reply_bytes = max(1 << 20, cfg.max_message_bytes - (1 << 20))
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(orchestrator, guarded)
        # Health and reflection: guarded too (open to callers without a key).
        health_pb2_grpc.add_HealthServicer_to_server(self._health, guarded)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (
                    *SERVICE_NAMES,
                    shm_pb2.DESCRIPTOR.services_by_name["SharedMemoryService"].full_name,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                )
            ),
            guarded,
        )
        try:
            if cfg.tls_cert:
                self.port = server.add_secure_port(
                    host_port(cfg.host, cfg.port), _tls_credentials(cfg)
                )
            else:
                self.port = server.add_insecure_port(host_port(cfg.host, cfg.port))
        except RuntimeError:  # grpcio raises rather than returning 0 on a busy port
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"could not bind gRPC to {host_port(cfg.host, cfg.port)}: the address is in use "
                "or not available (choose another with --port)"
            )
        if cfg.http_port is not None:
            app = sidecar.make_app(started=lambda: self.started, ready=self.ready)
            if not (cfg.role == "node" and cfg.auth):
                # A node with --auth answers only its orchestrators: its sidecar
                # keeps health and metrics, nothing a client could use.
                openai_facade.add_routes(app, self.llm)
                dashboard.add_routes(
                    app,
                    dashboard.Sources(
                        cfg.node_name,
                        self.devices,
                        monitor,
                        self.usage,
                        self.ready,
                        time.monotonic(),
                    ),
                )
            if self.auth:  # outermost: nothing is read for a caller without a key
                http_guard.install_auth(app, self.keys, protect_metrics=cfg.protect_metrics)
            http_guard.install(
                app,
                max_body_bytes=cfg.quotas.max_http_body_bytes,
                max_depth=cfg.quotas.max_json_depth,
                max_int_digits=cfg.quotas.max_json_int_digits,
            )
            try:
                self._runner, self.http_port = await sidecar.start(
                    app, cfg.host.strip("[]"), cfg.http_port, _https_context(cfg)
                )
            except OSError as exc:
                await server.stop(None)
                raise OSError(
                    f"could not bind the HTTP sidecar to {cfg.host}:{cfg.http_port}: "
                    f"{exc.strerror or exc} (choose another with --http-port, or --no-http)"
                ) from None
        if self.auth:
            await self.keys.bootstrap(cfg.state_dir)
        if not cfg.tls_cert and not is_loopback(cfg.host):
            log.warning(
                "serving %s without TLS: API keys and data cross the network in clear "
                "(add --tls-cert and --tls-key)",
                cfg.host,
            )
        await self.tasks.start()
        try:
            if self.tensor_relay is not None:  # before the tasks: their kept outputs
                held = await self.tensor_relay.locations.load()
                if held:
                    log.info("mesh: %d tensors held on nodes, as the store records them", held)
            queued, finished, tensors = await self.tasks.recover()
        except BaseException:
            await self.tasks.shutdown(0)
            if self._runner is not None:
                await self._runner.cleanup()
            raise
        log.info(
            "state: %s store at %s; recovered %d unfinished tasks (queued again), "
            "%d finished tasks and %d named tensors in %.2fs",
            self.state.kind,
            self.state.where,
            queued,
            finished,
            tensors,
            time.perf_counter() - began,
        )
        await self.llm.start()
        # After the tasks' recovery (a resumed step finds its task) and the gateway.
        resumed, kept = await self.workflows.recover()
        if resumed or kept:
            log.info("workflows: %d resumed, %d finished ones restored", resumed, kept)
        if self.mesh is not None:
            await self.mesh.start()
        if self.shared is not None:
            self.shared.start()
        await server.start()
        self._grpc = server
        for name in SERVICE_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._warmup = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        """Compiles (or loads from the on-disk cache) every kernel, then
        reports SERVING. Requests that arrive earlier still run."""
        if self.config.warmup:
            await asyncio.to_thread(device_discovery.prepare, self.devices)
            # figures measured in a busy moment improve once the machine is calmer
            self._refining = asyncio.create_task(device_discovery.refine_later(self.devices))
            cache = compile_cache.default_cache()
            log.info(
                "compile cache %s: %d kernels loaded, %d compiled",
                cache.directory,
                cache.hits,
                cache.misses,
            )
        for name in SERVING:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.mesh is not None:
            await self._health.set(SERVICE_NAMES[3], health_pb2.HealthCheckResponse.SERVING)
        if self.state.durable:
            serving = [*SERVING, "", *([SERVICE_NAMES[3]] if self.mesh is not None else [])]
            self.store_watch = StoreWatch(self._health, self.state, lambda: serving)
            self.store_watch.start()
        if self.config.role == "node":
            self.agent = NodeAgent(
                name=self.config.node_name,
                address=self.config.advertise or host_port(self.config.host, self.port),
                join=self.config.join,
                devices=self.devices,
                monitor=self._monitor,
                api_key=self.config.api_key,
                token=self.node_token,
                credentials=channel_credentials(self.config.join_ca, self.config),
            )
            self.agent.start()
        if self.config.warmup:
            # What exists once warm (modules, kernels, registries: some 160,000 objects)
            # lasts as long as the server. Frozen out of the cycle collector, a full
            # collection walks only what came later: under RunTask load on 2 cores its
            # pauses went from 140-300 ms to under 20 ms.
            gc.collect()
            gc.freeze()
        self.started = True
        log.info("kernelmesh ready on %s:%d", self.config.host, self.port)

    def ready(self) -> bool:
        store_ok = self.store_watch is None or self.store_watch.ok
        return self.started and not self.draining and store_ok

    async def wait_started(self) -> None:
        if self._warmup is not None:
            await self._warmup

    async def stop(self, grace: float | None = None) -> None:
        """Graceful drain: stop taking new work, let in-flight and queued work
        finish within `grace` seconds, fail what is left with UNAVAILABLE."""
        if self._grpc is None:
            return
        grace = self.config.grace_seconds if grace is None else grace
        self.draining = True
        await self._health.enter_graceful_shutdown()
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        if self._refining is not None:
            self._refining.cancel()
        if self.store_watch is not None:
            await self.store_watch.stop()
        if self.agent is not None:
            await self.agent.stop()
        if self.mesh is not None:
            await self.mesh.stop()
        if self.shared is not None:
            await self.shared.stop()
        await self.workflows.shutdown()  # running workflows resume at the next start
        await asyncio.gather(self._grpc.stop(grace), self.tasks.shutdown(grace))
        if self._forwarder is not None:
            await self._forwarder.close()
        await self.state.close()  # commits what is queued
        self.shm.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.llm.close()
        if self.usage is not None:  # the gateway closes only a store it created
            await asyncio.to_thread(self.usage.close)
        self._grpc = None

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


def _tls_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    cert = Path(cfg.tls_cert).read_bytes()
    key = Path(cfg.tls_key).read_bytes()
    client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(ca: str | None, cfg: ServerConfig) -> grpc.ChannelCredentials | None:
    """TLS for the mesh's own calls (node to orchestrator, orchestrator to node):
    the peer's certificate must chain to `ca`; this process's certificate goes
    along for a peer that wants a client certificate (mutual TLS). None: plaintext."""
    if not ca:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(cfg.tls_key).read_bytes() if cfg.tls_key else None,
        certificate_chain=Path(cfg.tls_cert).read_bytes() if cfg.tls_cert else None,
    )


def _https_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The sidecar serves HTTPS with the gRPC certificate (no client certificates:
    OpenAI SDKs and probes do not carry one)."""
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return context


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully."""
    server = Server(config)
    await server.start()
    print(
        f"kernelmesh serving gRPC on {host_port(config.host, server.port)}"
        + (f", HTTP on {host_port(config.host, server.http_port)}" if server.http_port else "")
        + f"; state: {server.state.kind} at {server.state.where}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if config.role == "node":
        # A drained node leaves once its running work is done.
        await server.wait_started()
        drained = asyncio.ensure_future(server.agent.drained.wait())
        await asyncio.wait(
            (drained, asyncio.ensure_future(stop.wait())), return_when="FIRST_COMPLETED"
        )
        if drained.done():
            print("kernelmesh node drained; leaving the mesh", flush=True)
            stop.set()
    await stop.wait()
    print(f"kernelmesh draining (grace {config.grace_seconds:g}s)", flush=True)
    await server.stop()
    print("kernelmesh stopped", flush=True)
