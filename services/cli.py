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
@click.option("--grace", type=float, default=None, help="Seconds to drain on SIGTERM (default 30).")
@click.option("--no-warmup", is_flag=True, help="Compile kernels on first use, not at start.")
@click.option("--log-level", default="INFO", show_default=True)
def serve(
    host: str | None,
    port: int | None,
    http_port: int | None,
    no_http: bool,
    config_path: str | None,
    grace: float | None,
    no_warmup: bool,
    log_level: str,
) -> None:
    """Run the all-in-one server: every service on one port, CPU device."""
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
            warmup=False if no_warmup else None,
        )
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    if no_http:
        import dataclasses

        cfg = dataclasses.replace(cfg, http_port=None)
    try:
        asyncio.run(run_server(cfg))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
