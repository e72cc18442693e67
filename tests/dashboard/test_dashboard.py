"""The dashboard server (JSON API, headers, /metrics) and its page in headless Chromium."""

import asyncio
import os
import threading
from pathlib import Path

import aiohttp
import pytest
import webdriver
from prometheus_client.parser import text_string_to_metric_families

from latticaray.dashboard import DashboardServer
from latticaray.observe import metrics
from tests.observe.statefakes import CONE, DRIVER, GONE, LOCAL, PUBLIC, SYMMETRIC, FakeSource

# `LATTICARAY_DASHBOARD_SCREENSHOT=docs/dashboard.png` keeps the screenshot (the README's)
SCREENSHOT_ENV = "LATTICARAY_DASHBOARD_SCREENSHOT"


async def test_api_serves_the_snapshot_history_metrics_and_the_page():
    source = FakeSource()
    server = DashboardServer(source, port=0, history_interval=0.05, min_interval=0.0)
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                page = await r.text()
            assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "")
            for name in ("app.js", "style.css"):
                async with http.get(url + "static/" + name) as r:
                    assert r.status == 200
                    assert "https://" not in await r.text()  # nothing fetched from elsewhere
            async with http.get(url + "static/../server.py") as r:
                assert r.status == 404
            async with http.get(url + "api/snapshot") as r:
                snap = await r.json()
            assert snap["observer"] == DRIVER
            assert {n["node_id"] for n in snap["nodes"]} == {
                DRIVER, LOCAL, PUBLIC, CONE, SYMMETRIC, GONE
            }  # fmt: skip
            assert GONE in snap["errors"]
            assert snap["transfers"][0]["bytes_total"] == 200 << 20
            deadline = asyncio.get_running_loop().time() + 10
            while len(server.history.samples) < 3:
                assert asyncio.get_running_loop().time() < deadline
                source.tick += 1
                await asyncio.sleep(0.05)
            async with http.get(url + "api/history") as r:
                history = await r.json()
            assert len(history["samples"]) >= 3
            assert history["samples"][-1]["nodes"] == 5  # five answered
            metrics.TASKS_SUBMITTED.labels("task").add(7)
            async with http.get(url + "metrics") as r:
                text = await r.text()
                assert r.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(text)}
            submitted = families["latticaray_tasks_submitted"].samples
            assert any(s.labels == {"kind": "task"} and s.value >= 7 for s in submitted)
    finally:
        await server.stop()


async def test_concurrent_requests_share_one_gather():
    source = FakeSource(delay=0.2)
    server = DashboardServer(source, port=0, history_interval=3600, min_interval=0.0)
    await server.start()
    try:
        await asyncio.sleep(0.5)  # the first history sample
        source.asked.clear()
        await asyncio.gather(*(server.snapshot() for _ in range(10)))
        assert len(source.asked) == 5  # one round to the five members, not ten
    finally:
        await server.stop()


class ThreadServer:
    """The dashboard on a loop thread of its own (the browser client blocks)."""

    def __init__(self, source):
        self.source = source
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.server = DashboardServer(self.source, port=0, history_interval=0.25, min_interval=0.1)
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def require_browser():
    if webdriver.available():
        return
    if os.environ.get("CI"):
        pytest.fail("chromium and chromedriver are missing: `make browser-deps` installs them")
    pytest.skip("no chromium here (`make browser-deps` installs Debian's chromium)")


@pytest.mark.timeout(180)
def test_dashboard_renders_the_mesh_in_headless_chromium(tmp_path):
    require_browser()
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
    source = FakeSource()
    with ThreadServer(source) as served, webdriver.Browser(height=1500) as browser:
        browser.get(served.url)
        browser.wait_for("return document.body.dataset.ready === '1'", what="first render")
        # the mesh graph: every node, and a link of each path type from the observer
        nodes = browser.execute(
            "return [...document.querySelectorAll('#mesh g.node')].map(g => g.dataset.nodeId)"
        )
        assert sorted(nodes) == sorted([DRIVER, LOCAL, PUBLIC, CONE, SYMMETRIC, GONE])
        paths = browser.execute(
            "return [...document.querySelectorAll('#mesh line.link')]"
            ".map(l => [l.dataset.dst === arguments[0] ? l.dataset.src : l.dataset.dst, l.dataset.path])",
            DRIVER,
        )
        assert dict(paths) == {
            LOCAL: "unix",
            PUBLIC: "direct",
            CONE: "punched",
            SYMMETRIC: "relayed",
        }
        styles = browser.execute(
            "return Object.fromEntries([...document.querySelectorAll('#mesh line.link')]"
            ".map(l => [l.dataset.path, getComputedStyle(l).strokeDasharray]))"
        )
        assert styles["relayed"] != styles["direct"]  # link types are drawn apart
        gone = browser.execute(
            "return document.querySelector(`#mesh g.node[data-node-id='${arguments[0]}']`)"
            ".classList.contains('state-UNREACHABLE')",
            GONE,
        )
        assert gone
        # per-node resources, actors, objects, transfers with progress
        rows = browser.execute(
            "return [...document.querySelectorAll('#nodes tbody tr')].map(r => r.innerText)"
        )
        assert len(rows) == 6 and any("relayed" in r and "74.2 ms" in r for r in rows)
        assert any("1 / 4" in r for r in rows)  # CPU used / total
        actors = browser.execute(
            "return [...document.querySelectorAll('#actors tbody tr')].map(r => r.innerText)"
        )
        assert len(actors) == 3 and any("Counter" in a and "ALIVE" in a for a in actors)
        first = float(browser.execute("return document.querySelector('#transfers progress').value"))
        assert 0 < first < 1
        source.tick += 5  # the transfer moves on, tasks finish: the page follows
        browser.wait_for(
            "return Number(document.querySelector('#transfers progress').value) > arguments[0]".replace(
                "arguments[0]", repr(first)
            ),
            what="transfer progress to move",
        )
        browser.wait_for(
            "return Number(document.body.dataset.historyPoints) >= 4",
            what="history samples",
        )
        series = browser.execute(
            "return [...document.querySelectorAll('#history path.series')].map(p => p.dataset.series)"
        )
        assert set(series) == {"running", "queued", "finished_rate", "failed"}
        problems = browser.execute("return document.getElementById('problems').innerText")
        assert "TimeoutError" in problems
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(screenshot)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000
