"""The live dashboard in a real headless Chromium against a real `kernelmesh
serve`: the page loads from the package alone, shows the server's devices, and
a task submitted while it is open appears in it without a reload. A screenshot
is kept in .artifacts/dashboard.png (gitignored) or $KERNELMESH_TEST_ARTIFACTS."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser_cdp import find_chromium, open_page

from kernelmesh.clients import Client

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = find_chromium()


def artifacts_dir() -> Path:
    return Path(os.environ.get("KERNELMESH_TEST_ARTIFACTS", ROOT / ".artifacts"))


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory, serve_tools):
    """A server of its own, so no task of another test is in its figures."""
    serve = serve_tools.start_serve(tmp_path_factory.mktemp("dashboard"), "--no-warmup")
    try:
        with Client(serve.target, timeout=30.0) as km:
            km.wait_ready(timeout=120)
        yield serve
    finally:
        serve_tools.stop_serve(serve)


def get(port: int, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_page_and_its_assets_are_served_from_the_package(fresh_server):
    status, content_type, html = get(fresh_server.http_port, "/ui")
    assert status == 200 and content_type.startswith("text/html")
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        assert f"/ui/{asset}".encode() in html
        status, content_type, _ = get(fresh_server.http_port, f"/ui/{asset}")
        assert status == 200 and content_type.startswith(kind)
    assert b"http://" not in html and b"https://" not in html  # no CDN


def test_snapshot_lists_the_servers_devices(fresh_server):
    _, content_type, body = get(fresh_server.http_port, "/ui/snapshot")
    assert content_type.startswith("application/json")
    snapshot = json.loads(body)
    with Client(fresh_server.target) as km:
        names = [d.name for d in km.devices()]
    assert [d["name"] for d in snapshot["devices"]] == names
    assert snapshot["ready"] is True


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_dashboard_in_chromium_shows_devices_and_a_new_task_live(fresh_server):
    with Client(fresh_server.target) as km:
        devices = sorted(d.name for d in km.devices())
    origin = f"http://127.0.0.1:{fresh_server.http_port}"

    async with open_page(f"{origin}/ui", CHROMIUM) as page:
        shown = await page.wait_for(
            "(() => { const d = [...document.querySelectorAll('[data-device]')]"
            ".map(e => e.dataset.device).sort(); return d.length ? d : null; })()"
        )
        assert shown == devices
        status = await page.evaluate("document.getElementById('status').textContent")
        assert status == "serving"
        assert not await page.evaluate("!!document.querySelector('#ops tr[data-key=transpose]')")

        # Submitted while the page is open: it must show up without a reload.
        with Client(fresh_server.target) as km:
            a = np.arange(12, dtype=np.float32).reshape(3, 4)
            np.testing.assert_array_equal(km.run("transpose", a), a.T)
        succeeded = await page.wait_for(
            "(() => { const row = document.querySelector('#ops tr[data-key=transpose]');"
            " return row ? row.children[1].textContent : null; })()"
        )
        assert succeeded == "1"
        rpc = await page.wait_for(
            "(() => { const row = document.querySelector("
            "'#rpcs tr[data-key=\"TaskService/RunTask\"]');"
            " return row ? row.children[1].textContent : null; })()"
        )
        assert int(rpc) >= 1

        shot = await page.screenshot(artifacts_dir() / "dashboard.png")
        assert shot.stat().st_size > 10_000
        assert page.console_errors == []
        assert page.requests and all(url.startswith(origin) for url in page.requests), page.requests
