"""`kernelmesh serve`, plugged into the client CLI through the
`kernelmesh.cli` entry-point group."""

from __future__ import annotations

import asyncio
import logging

import click

from kernelmesh.core import config as config_module


@click.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1, loopback only).")
@click.option("--port", type=int, default=None, help="gRPC port (default 50051; 0 picks one).")
@click.option(
    "--http-port", type=int, default=None, help="HTTP sidecar port (default 8080; 0 picks one)."
)
@click.option("--no-http", is_flag=True, help="Do not start the HTTP sidecar.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML file of settings (see README); flags override it.",
)
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
    help="Directory for durable state (LLM usage and budgets); default: in memory.",
)
@click.option(
    "--backends",
    default=None,
    help="Comma-separated backends to use: cpu, opencl, cuda, metal (default: all available).",
)
@click.option("--grace", type=float, default=None, help="Seconds to drain on SIGTERM (default 30).")
@click.option("--no-warmup", is_flag=True, help="Compile kernels on first use, not at start.")
@click.option("--log-level", default="INFO", show_default=True)
def serve(
    host: str | None,
    port: int | None,
    http_port: int | None,
    no_http: bool,
    config_path: str | None,
    llm_config: str | None,
    state_dir: str | None,
    backends: str | None,
    grace: float | None,
    no_warmup: bool,
    log_level: str,
) -> None:
    """Run the all-in-one server: every service on one port, every device found."""
    from kernelmesh.services.server import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_module.load(
            config_path,
            host=host,
            port=port,
            http_port=http_port,
            grace_seconds=grace,
            llm_config=llm_config,
            backends=backends,
            state_dir=state_dir,
            warmup=False if no_warmup else None,
        )
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    if no_http:
        import dataclasses

        cfg = dataclasses.replace(cfg, http_port=None)
    from kernelmesh.core.llm.config import LLMConfigError

    try:
        asyncio.run(run_server(cfg))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    except LLMConfigError as exc:
        raise click.UsageError(f"--llm-config: {exc}") from None


@click.group()
def cache() -> None:
    """The on-disk cache of compiled kernels (OpenCL, CUDA, Metal)."""


@cache.command("info")
def cache_info() -> None:
    """Where the cache is and what it holds, per backend."""
    from kernelmesh.native.compile_cache import default_cache

    info = default_cache().info()
    click.echo(f"directory: {info.directory}")
    click.echo(f"entries:   {info.entries} ({info.bytes / (1 << 20):.1f} MiB)")
    for backend, usage in info.backends.items():
        click.echo(f"  {backend:<8} {usage.entries:>5} entries  {usage.bytes / (1 << 20):8.1f} MiB")


@cache.command("clear")
def cache_clear() -> None:
    """Removes every compiled kernel; the next start compiles them again."""
    from kernelmesh.native.compile_cache import default_cache

    cache = default_cache()
    removed = cache.clear()
    click.echo(f"removed {removed} compiled kernels from {cache.directory}")


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

    if jobs is not None:
        os.environ["KERNELMESH_COMPILE_JOBS"] = str(jobs)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    began = time.perf_counter()
    wanted = [b.strip() for b in backends.split(",")] if backends else None
    try:
        found = device_discovery.discover("warmup", wanted)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    device_discovery.prepare(found)
    names = ", ".join(d.name for d in found)
    click.echo(f"compiled the kernels of {names} in {time.perf_counter() - began:.1f}s")
