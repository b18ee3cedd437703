"""A real headless Chromium driven over the Chrome DevTools Protocol (a
WebSocket on loopback, through aiohttp): open a page, evaluate JavaScript,
record the page's network requests, take a screenshot. No browser download,
no driver package: Debian's `chromium` and the protocol are enough."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1366,900",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self._ws = ws
        self._session = session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Network.requestWillBeSent":
                self.requests.append(data["params"]["request"]["url"])
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(data["params"]["exceptionDetails"]))

    async def send(self, method: str, params: dict | None = None, *, session: bool = True) -> Any:
        ident = next(self._ids) + 1_000_000  # apart from the browser-level ids
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        await self._ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Polls `expression` until it is truthy (bounded); returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{expression} stayed {value!r} for {timeout}s")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.asynccontextmanager
async def open_page(url: str, chromium: str) -> AsyncIterator[Page]:
    """Starts Chromium with a throwaway profile, opens `url`, yields the page."""
    with tempfile.TemporaryDirectory(prefix="km-chromium-") as tmp:
        profile, log = Path(tmp) / "profile", Path(tmp) / "chromium.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            endpoint = await _endpoint(proc, profile, log, 60.0)
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(endpoint, max_msg_size=64 << 20) as ws,
            ):
                await ws.send_str(
                    json.dumps(
                        {"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}
                    )
                )
                target = await _reply(ws, 1)
                await ws.send_str(
                    json.dumps(
                        {
                            "id": 2,
                            "method": "Target.attachToTarget",
                            "params": {"targetId": target["targetId"], "flatten": True},
                        }
                    )
                )
                attached = await _reply(ws, 2)
                page = Page(ws, attached["sessionId"])
                await page.send("Network.enable")
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                await page.send("Page.navigate", {"url": url})
                try:
                    yield page
                finally:
                    page._reader.cancel()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _endpoint(proc: subprocess.Popen, profile: Path, log: Path, timeout: float) -> str:
    """Chromium writes its DevTools port and path to DevToolsActivePort once it listens."""
    deadline = time.monotonic() + timeout
    active = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if active.exists():
            lines = active.read_text().split()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    raise RuntimeError("chromium did not open its DevTools endpoint:\n" + log.read_text())


async def _reply(ws: aiohttp.ClientWebSocketResponse, ident: int) -> dict:
    async with asyncio.timeout(30):
        async for message in ws:
            data = json.loads(message.data)
            if data.get("id") == ident:
                if "error" in data:
                    raise RuntimeError(str(data["error"]))
                return data["result"]
    raise RuntimeError("chromium closed the DevTools connection")
