"""`kernelmesh serve`, plugged into the client CLI through the
`kernelmesh.cli` entry-point group."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from kernelmesh.core import config as config_module


def _common(fn):
    """Flags every server role takes: where it listens, its settings file, logs."""
    for option in reversed(
        [
            click.option(
                "--host", default=None, help="Address to bind (default 127.0.0.1, loopback only)."
            ),
            click.option(
                "--port", type=int, default=None, help="gRPC port (default 50051; 0 picks one)."
            ),
            click.option(
                "--http-port",
                type=int,
                default=None,
                help="HTTP sidecar port (default 8080; 0 picks one).",
            ),
            click.option("--no-http", is_flag=True, help="Do not start the HTTP sidecar."),
            click.option(
                "--config",
                "config_path",
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                help="YAML file of settings (see README); flags override it.",
            ),
            click.option(
                "--grace",
                "grace_seconds",
                type=float,
                default=None,
                help="Seconds to drain on SIGTERM (default 30).",
            ),
            click.option(
                "--no-warmup", is_flag=True, help="Compile kernels on first use, not at start."
            ),
            click.option("--log-level", default="INFO", show_default=True),
            click.option(
                "--log-format",
                type=click.Choice(["text", "json"]),
                default="text",
                show_default=True,
                help="json: one object per line, with the trace and span ids of the call being "
                "handled.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _security(fn):
    """Authentication and TLS, the same flags for serve, orchestrator and node."""
    for option in reversed(
        [
            click.option(
                "--auth",
                is_flag=True,
                help="Require credentials (always needed beyond loopback): API keys on serve "
                "and orchestrator; on a node, only its orchestrators' calls. See README.",
            ),
            click.option(
                "--insecure-open",
                is_flag=True,
                help="Serve beyond loopback WITHOUT authentication (not recommended).",
            ),
            click.option(
                "--tls-cert",
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                help="PEM certificate chain: serve gRPC over TLS (also this process's client "
                "certificate in the mesh's mutual TLS).",
            ),
            click.option(
                "--tls-key",
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                help="PEM private key of --tls-cert.",
            ),
            click.option(
                "--tls-client-ca",
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                help="PEM CA bundle: require client certificates signed by it (mutual TLS).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


_PROTECT_METRICS = click.option(
    "--protect-metrics", is_flag=True, help="With --auth, /metrics needs a key too."
)


@click.command()
@_common
@click.option(
    "--llm-config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML file of LLM models and deployments (see README); default: local embeddings only.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of durable state: submitted tasks, named tensors, API keys, LLM usage "
    "(default: $XDG_STATE_HOME/kernelmesh, else ~/.local/state/kernelmesh).",
)
@click.option(
    "--store",
    default=None,
    help="Where tasks, tensors and keys are kept: sqlite (default, in --state-dir), "
    "memory (lost on exit), or a postgresql://user@host/db URL.",
)
@click.option(
    "--backends",
    default=None,
    help="Comma-separated backends to use: cpu, opencl, cuda, metal (default: all available).",
)
@_security
@_PROTECT_METRICS
@click.option(
    "--batching",
    default=None,
    help="Dynamically batch small tasks of these ops (comma-separated, or 'all'); the "
    "config's batching: section sets sizes and delay (see README).",
)
def serve(**options: object) -> None:
    """Run the all-in-one server: every service on one port, every device found."""
    _run_role(role="serve", **options)


def _run_role(**overrides: object) -> None:
    """Loads the settings and runs the server in one of the mesh's roles."""
    import dataclasses

    from kernelmesh.core.llm.config import LLMConfigError
    from kernelmesh.core.store import StoreError, default_state_dir
    from kernelmesh.services import logging_setup, tracing
    from kernelmesh.services.server import check_security
    from kernelmesh.services.server import serve as run_server

    role = str(overrides["role"])
    log_format = "json" if overrides.pop("log_format") == "json" else "text"
    logging_setup.configure(str(overrides.pop("log_level")), log_format)
    # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    tracing.configure("kernelmesh" if role == "serve" else f"kernelmesh-{role}")
    for flag in ("auth", "insecure_open", "protect_metrics"):
        if flag in overrides:
            overrides[flag] = overrides[flag] or None  # unset: the config file decides
    no_http = overrides.pop("no_http")
    no_warmup = overrides.pop("no_warmup")
    batching = overrides.pop("batching", None)
    if role == "serve":
        overrides.pop("role")  # the default; a settings file may still name another
    try:
        cfg = config_module.load(
            overrides.pop("config_path"), warmup=False if no_warmup else None, **overrides
        )
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    if no_http:
        cfg = dataclasses.replace(cfg, http_port=None)
    if batching:
        names = () if batching == "all" else tuple(o.strip() for o in batching.split(",") if o)
        chosen = dataclasses.replace(cfg.batching, enabled=True, ops=names)
        try:
            chosen.check()
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        cfg = dataclasses.replace(cfg, batching=chosen)
    if role in ("serve", "orchestrator") and cfg.state_dir is None:
        # Durable by default: an orchestrator on a memory store lost every
        # acknowledged task with a restart.
        cfg = dataclasses.replace(cfg, state_dir=str(default_state_dir()))
    # Open only on loopback (README, "Security"); a node's --auth admits only the
    # orchestrators it joined.
    try:
        check_security(cfg)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(run_server(cfg))
    except StoreError as exc:
        raise click.ClickException(f"cannot open the state store: {exc}") from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    except LLMConfigError as exc:
        raise click.UsageError(f"--llm-config: {exc}") from None


@click.command()
@_common
@click.option(
    "--store",
    default=None,
    help="Where tasks, workflows, tensor locations and keys are kept: sqlite (default, in "
    "--state-dir), memory (lost on exit), or a postgresql:// URL shared by orchestrators.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory of durable state: the SQLite store, LLM usage "
    "(default: $XDG_STATE_HOME/kernelmesh, else ~/.local/state/kernelmesh).",
)
@click.option(
    "--lease-seconds",
    type=float,
    default=None,
    help="A node silent this long is LOST and its attempts run elsewhere (default 10).",
)
@click.option("--with-node", is_flag=True, help="Also run tasks on this process's own devices.")
@click.option("--backends", default=None, help="With --with-node: the backends to use.")
@click.option(
    "--name",
    "node_name",
    default=None,
    help="This orchestrator's name (default: local): it labels this process as a lease "
    "holder on a shared store (the name plus a random suffix) and, with --with-node, "
    "names the node of its own devices.",
)
@_security
@_PROTECT_METRICS
@click.option(
    "--node-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM CA bundle of the nodes' certificates: forward to nodes over TLS (presenting "
    "--tls-cert to nodes that require a client certificate).",
)
def orchestrator(**options: object) -> None:
    """Run an orchestrator: the public services; nodes join it and run the work."""
    _run_role(role="orchestrator", **options)


@click.command()
@_common
@click.option(
    "--join",
    required=True,
    help="Orchestrator addresses, HOST:PORT[,HOST:PORT...], tried in turn.",
)
@click.option("--name", "node_name", required=True, help="This node's name, unique in the mesh.")
@click.option(
    "--advertise",
    default=None,
    help="host:port orchestrators reach this node at (default --host:--port).",
)
@click.option("--backends", default=None, help="Backends to use: cpu, opencl, cuda, metal.")
@_security
@click.option(
    "--api-key",
    envvar="KERNELMESH_API_KEY",
    default=None,
    help="This node's key (role node) for joining an orchestrator that runs with --auth "
    "[env KERNELMESH_API_KEY].",
)
@click.option(
    "--join-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM CA bundle of the orchestrators' certificates: join over TLS (presenting "
    "--tls-cert to orchestrators that require a client certificate).",
)
def node(**options: object) -> None:
    """Run a node: joins the orchestrators and runs the tasks they forward."""
    _run_role(role="node", store="memory", **options)


@click.group()
def cache() -> None:
    """The on-disk caches of compiled kernels: kernelmesh's (OpenCL, CUDA, Metal) and
    Numba's (the CPU kernels)."""


@cache.command("info")
def cache_info() -> None:
    """Where the caches are and what they hold, per backend."""
    from kernelmesh.native.compile_cache import default_cache

    info = default_cache().info()
    click.echo(f"directory: {info.directory}")
    click.echo(f"entries:   {info.entries} ({info.bytes / (1 << 20):.1f} MiB)")
    for backend, usage in info.backends.items():
        click.echo(f"  {backend:<8} {usage.entries:>5} entries  {usage.bytes / (1 << 20):8.1f} MiB")
    directory, files = numba_cache()
    size = sum(f.stat().st_size for f in files)
    kernels = sum(1 for f in files if f.suffix == ".nbi")
    click.echo(f"numba:     {directory} (CPU kernels; $NUMBA_CACHE_DIR moves it)")
    click.echo(f"  cpu      {kernels:>5} kernels  {size / (1 << 20):8.1f} MiB")


def numba_cache() -> tuple[Path, list[Path]]:
    """Numba's cache directory for the CPU backend, and the backend's files in it
    (an index .nbi per kernel, a .nbc per compiled signature)."""
    import numba

    from kernelmesh.native import cpu

    kernel = next(v for v in vars(cpu).values() if isinstance(v, numba.core.dispatcher.Dispatcher))
    directory = Path(kernel._cache._cache_path)  # Numba has no public accessor
    stem = Path(cpu.__file__).stem + "."
    files = [
        f
        for f in (directory.iterdir() if directory.is_dir() else ())
        if f.name.startswith(stem) and f.suffix in (".nbi", ".nbc")
    ]
    return directory, files


@cache.command("clear")
@click.option("--numba", is_flag=True, help="Also remove Numba's cache of the CPU kernels.")
def cache_clear(numba: bool) -> None:
    """Removes every compiled kernel; the next start compiles them again."""
    from kernelmesh.native.compile_cache import default_cache

    cache = default_cache()
    removed = cache.clear()
    click.echo(f"removed {removed} compiled kernels from {cache.directory}")
    if numba:
        directory, files = numba_cache()
        for f in files:
            f.unlink(missing_ok=True)
        click.echo(f"removed {len(files)} Numba cache files from {directory}")


@click.command()
@click.option(
    "--backends",
    default=None,
    help="Comma-separated backends to compile for (default: all available).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Processes compiling the CPU kernels at once (default: half the cores).",
)
@click.option("--log-level", default="INFO", show_default=True)
def warmup(backends: str | None, jobs: int | None, log_level: str) -> None:
    """Compile every kernel ahead of time (Numba's cache for the CPU, the compile cache
    for OpenCL, CUDA and Metal), so the first `kernelmesh serve` only loads them. Run it
    after installing, as part of an image build, or in CI."""
    import os
    import time

    from kernelmesh.core import devices as device_discovery
    from kernelmesh.services import logging_setup

    if jobs is not None:
        os.environ["KERNELMESH_COMPILE_JOBS"] = str(jobs)
    logging_setup.configure(log_level, "text")
    began = time.perf_counter()
    wanted = [b.strip() for b in backends.split(",")] if backends else None
    try:
        found = device_discovery.discover("warmup", wanted)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    device_discovery.prepare(found)
    names = ", ".join(d.name for d in found)
    click.echo(f"compiled the kernels of {names} in {time.perf_counter() - began:.1f}s")
