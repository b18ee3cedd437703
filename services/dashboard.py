"""The live dashboard on the HTTP sidecar: `/ui` serves a static page (HTML, JS
and CSS shipped in the package, no build step, no CDN), `/ui/events` pushes a
snapshot of the server every second as Server-Sent Events, `/ui/snapshot`
answers one as JSON.

A snapshot is read from what the server already keeps: the device monitor,
the task and RPC metrics (`Tally`), and the LLM usage store. Each event stream
remembers the previous snapshot's latency sums, so "recent" latency is the mean
over the last interval, not since start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from kernelmesh.core import metrics
from kernelmesh.core.device_monitor import DeviceMonitor
from kernelmesh.core.devices import LocalDevice
from kernelmesh.core.llm import metrics as llm_metrics
from kernelmesh.core.store import UsageStore
from kernelmesh.services import rpc_metrics

DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.2
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_STOPPING = web.AppKey("dashboard_stopping", asyncio.Event)


@dataclass
class Sources:
    """What a snapshot is read from."""

    node: str
    devices: list[LocalDevice]
    monitor: DeviceMonitor
    usage: UsageStore | None
    ready: Callable[[], bool]
    started_at: float


class _Recent:
    """Mean of the values observed since the previous call, per key."""

    def __init__(self) -> None:
        self._previous: dict[tuple[str, ...], tuple[int, float]] = {}
        self._last: dict[tuple[str, ...], float] = {}

    def update(self, now: dict[tuple[str, ...], tuple[int, float]]) -> dict:
        for key, (count, total) in now.items():
            before_count, before_total = self._previous.get(key, (0, 0.0))
            if count > before_count:
                self._last[key] = (total - before_total) / (count - before_count)
        self._previous = now
        return self._last


def _per_op(series: dict[tuple[str, ...], tuple[int, float]]) -> dict[str, tuple[int, float]]:
    """Sums the (op, device) series of a histogram per op."""
    out: dict[str, tuple[int, float]] = {}
    for (op, _device), (count, total) in series.items():
        c, t = out.get(op, (0, 0.0))
        out[op] = (c + count, t + total)
    return out


def _llm_requests() -> dict[tuple[str, str], int]:
    """(model, outcome) -> requests, from the gateway's Prometheus counter."""
    out: dict[tuple[str, str], int] = {}
    for family in llm_metrics.REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["model"], sample.labels["outcome"])
                out[key] = out.get(key, 0) + int(sample.value)
    return out


class Snapshots:
    """Builds snapshots; one instance per event stream (it keeps the recent means)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self._task_latency = _Recent()
        self._rpc_latency = _Recent()

    def snapshot(self) -> dict:
        src = self.sources
        devices = []
        for device in src.devices:
            status = src.monitor.status(device)
            info = device.info
            devices.append(
                {
                    "name": info.name,
                    "kind": info.kind.name.lower(),
                    "model": info.model,
                    "utilization": round(status.utilization, 4),
                    "memory_total_bytes": status.memory_total_bytes,
                    "memory_available_bytes": status.memory_available_bytes,
                    "queue_depth": status.queue_depth,
                    "running": status.running,
                }
            )
        return {
            "time": time.time(),
            "node": src.node,
            "ready": src.ready(),
            "uptime_s": round(time.monotonic() - src.started_at, 1),
            "devices": devices,
            "queued": sum(d["queue_depth"] for d in devices),
            "running": sum(d["running"] for d in devices),
            "ops": self._ops(),
            "rpcs": self._rpcs(),
            "llm": self._llm(),
        }

    def _ops(self) -> list[dict]:
        by_state: dict[str, dict[str, int]] = {}
        for (op, state), (count, _) in metrics.TASKS.counts().items():
            by_state.setdefault(op, {})[state] = count
        latency = _per_op(metrics.TASK_RUN_SECONDS.counts())
        recent = self._task_latency.update({(op,): value for op, value in latency.items()})
        rows = []
        for op in sorted(by_state.keys() | latency.keys()):
            count, total = latency.get(op, (0, 0.0))
            rows.append(
                {
                    "op": op,
                    **{state.lower(): by_state.get(op, {}).get(state, 0) for state in _TERMINAL},
                    "mean_ms": round(total / count * 1e3, 3) if count else None,
                    "recent_ms": round(recent[(op,)] * 1e3, 3) if (op,) in recent else None,
                }
            )
        return rows

    def _rpcs(self) -> list[dict]:
        handled: dict[tuple[str, str], dict[str, int]] = {}
        for (_type, service, method, code), (count, _) in rpc_metrics.HANDLED.counts().items():
            handled.setdefault((service, method), {})[code] = count
        timing = {
            (service, method): value
            for (_type, service, method), value in rpc_metrics.HANDLING_SECONDS.counts().items()
        }
        recent = self._rpc_latency.update(timing)
        rows = []
        for service, method in sorted(handled):
            codes = handled[(service, method)]
            count, total = timing.get((service, method), (0, 0.0))
            rows.append(
                {
                    "service": service.rpartition(".")[2],
                    "method": method,
                    "calls": sum(codes.values()),
                    # a client ending a stream (Watch*) is CANCELLED: no error of the server
                    "errors": sum(n for c, n in codes.items() if c not in ("OK", "CANCELLED")),
                    "codes": codes,
                    "mean_ms": round(total / count * 1e3, 3) if count else None,
                    "recent_ms": (
                        round(recent[(service, method)] * 1e3, 3)
                        if (service, method) in recent
                        else None
                    ),
                }
            )
        return rows

    def _llm(self) -> dict:
        usage = []
        store = self.sources.usage
        if store is not None:
            for tenant in sorted(store.spent_tokens()):
                for record in store.summary(tenant):
                    usage.append(
                        {
                            "tenant": record.tenant,
                            "model": record.model,
                            "provider": record.provider,
                            "requests": record.requests,
                            "prompt_tokens": record.prompt_tokens,
                            "completion_tokens": record.completion_tokens,
                            "cost": round(record.cost, 6),
                        }
                    )
        requests = [
            {"model": model, "outcome": outcome, "requests": n}
            for (model, outcome), n in sorted(_llm_requests().items())
        ]
        return {"usage": usage, "requests": requests}


def _static(name: str) -> bytes:
    return (resources.files("kernelmesh.services") / "static" / name).read_bytes()


def add_routes(app: web.Application, sources: Sources) -> None:
    """`/` and `/ui` (the page), `/ui/<file>`, `/ui/events` (SSE), `/ui/snapshot`."""
    app[_STOPPING] = asyncio.Event()

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=_static("dashboard.html"), content_type="text/html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=STATIC_FILES[name])

    async def snapshot(_: web.Request) -> web.Response:
        return web.json_response(Snapshots(sources).snapshot())

    async def events(request: web.Request) -> web.StreamResponse:
        try:
            interval = float(request.query.get("interval", DEFAULT_INTERVAL_S))
        except ValueError:
            raise web.HTTPBadRequest(text="interval: seconds, e.g. 1 or 0.5") from None
        interval = max(interval, MIN_INTERVAL_S)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        snapshots = Snapshots(sources)
        stopping = request.app[_STOPPING]
        # retry: how soon the browser reconnects after the server restarts
        await response.write(b"retry: 2000\n\n")
        with contextlib.suppress(ConnectionResetError):
            while not stopping.is_set():
                data = json.dumps(snapshots.snapshot(), separators=(",", ":"))
                await response.write(f"event: snapshot\ndata: {data}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), interval)
        return response

    async def stop_streams(app: web.Application) -> None:
        # Open event streams would otherwise hold the sidecar's shutdown for its timeout.
        app[_STOPPING].set()

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound("/ui")

    app.on_shutdown.append(stop_streams)
    app.router.add_get("/", root)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/events", events)
    app.router.add_get("/ui/snapshot", snapshot)
    app.router.add_get("/ui/{name}", static)


__all__ = ["Snapshots", "Sources", "add_routes"]
