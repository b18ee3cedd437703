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
@click.option(
    "--auth", is_flag=True, help="Require API keys (always needed beyond loopback); see README."
)
@click.option(
    "--insecure-open",
    is_flag=True,
    help="Serve beyond loopback WITHOUT authentication (not recommended).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM certificate chain: serve gRPC over TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM CA bundle: require client certificates signed by it (mutual TLS).",
)
@click.option("--protect-metrics", is_flag=True, help="With --auth, /metrics needs a key too.")
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
    auth: bool,
    insecure_open: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    protect_metrics: bool,
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
            auth=auth or None,
            insecure_open=insecure_open or None,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            protect_metrics=protect_metrics or None,
        )
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    if no_http:
        import dataclasses

        cfg = dataclasses.replace(cfg, http_port=None)
    from kernelmesh.core.llm.config import LLMConfigError
    from kernelmesh.services.server import check_security

    try:
        check_security(cfg)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
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
