"""The HTTP sidecar: Kubernetes-style health probes and Prometheus metrics."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def make_app(*, started: Callable[[], bool], ready: Callable[[], bool]) -> web.Application:
    """`started`: warm-up finished. `ready`: started and not draining."""

    async def live(_: web.Request) -> web.Response:
        # Answering at all proves the event loop is responsive.
        return web.json_response({"status": "live"})

    async def startup(_: web.Request) -> web.Response:
        ok = started()
        return web.json_response(
            {"status": "started" if ok else "starting"}, status=200 if ok else 503
        )

    async def readiness(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response(
            {"status": "ready" if ok else "not ready"}, status=200 if ok else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # Chat requests with long contexts run to megabytes; aiohttp refuses bodies over 1 MiB.
    app = web.Application(client_max_size=32 << 20)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/startup", startup)
    app.router.add_get("/health/ready", readiness)
    app.router.add_get("/metrics", metrics)
    return app


async def start(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Starts serving (HTTPS with `ssl_context`); returns the runner and the bound
    port (port 0 picks one)."""
    # handler_cancellation: a client that disconnects cancels its handler, so
    # an abandoned LLM request closes its upstream request too (aiohttp >= 3.9
    # no longer cancels by default).
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # aiohttp exposes no public accessor
    return runner, bound
