"""DashboardServer: an aiohttp app serving the dashboard page, its JSON API and ``/metrics``.

It reads a StateSource (on the node's own loop), or an async function returning snapshots
(``latticaray dashboard``, which asks a node it is attached to).

Routes (GET only):

    /                 the page (static/index.html; app.js and style.css beside it, vendored)
    /api/snapshot     the mesh as the node knows it (latticaray.observe.gather), as JSON
    /api/history      task and object counts over time, sampled every ``history_interval`` s
    /metrics          the process's Prometheus metrics (text format)
    /healthz          "ok"

It runs on the node's event loop and reads one StateSource. Concurrent snapshot requests
share one gather, and a snapshot younger than ``min_interval`` is served again, so a page left
open (or many) costs the mesh at most one state round per ``min_interval``. Every response has
a Content-Security-Policy allowing only this origin: the page cannot load anything from the
internet, and needs nothing from it. The server listens on loopback unless told otherwise; it
has no authentication, so expose it only where everyone who can reach it may see the mesh.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from latticaray.observe import metrics
from latticaray.observe.gather import MeshSnapshot, gather
from latticaray.observe.model import NodeStateName, StateSource

__all__ = ["DEFAULT_PORT", "DashboardServer", "History"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8265  # Ray's dashboard port
STATIC_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class History:
    """Counts over time (a bounded ring of samples), taken from snapshots."""

    def __init__(self, maxlen: int = 300) -> None:
        self.samples: collections.deque[dict[str, float]] = collections.deque(maxlen=maxlen)

    def add(self, snap: MeshSnapshot) -> dict[str, float]:
        reporting = [n for n in snap.nodes if not n.stale]
        sample = {
            "t": snap.taken_at,
            "nodes": float(len(reporting)),
            "unreachable": float(
                sum(1 for n in snap.nodes if n.state != NodeStateName.ALIVE.value)
            ),
            "running": float(sum(n.tasks_running for n in reporting)),
            "queued": float(sum(n.tasks_queued for n in reporting)),
            "finished": float(sum(n.tasks_finished for n in reporting)),
            "failed": float(sum(n.tasks_failed for n in reporting)),
            "actors": float(sum(n.actors for n in reporting)),
            "objects": float(sum(n.objects for n in reporting)),
            "object_bytes": float(sum(n.object_store_bytes for n in reporting)),
        }
        self.samples.append(sample)
        return sample

    def as_list(self) -> list[dict[str, float]]:
        return list(self.samples)


def _static_bytes(name: str) -> bytes:
    return resources.files("latticaray.dashboard").joinpath("static", name).read_bytes()


class DashboardServer:
    """Serves the dashboard for one StateSource on the running event loop."""

    def __init__(
        self,
        source: StateSource | None = None,
        *,
        snapshot: Callable[[], Awaitable[MeshSnapshot]] | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        history_interval: float = 2.0,
        history_len: int = 300,
        min_interval: float = 0.5,
        row_limit: int = 500,
        timeout: float = 5.0,
    ) -> None:
        if (source is None) == (snapshot is None):
            raise ValueError("give a StateSource or a snapshot function, not both or neither")
        self.source = source
        self._read = snapshot
        self.host = host
        self.port = port
        self.history_interval = history_interval
        self.min_interval = min_interval
        self.row_limit = row_limit
        self.timeout = timeout
        self.history = History(history_len)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[MeshSnapshot] | None = None
        self._last: MeshSnapshot | None = None
        self._last_at = 0.0
        self._static = {name: _static_bytes(name) for name in STATIC_FILES}
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._file)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/history", self._history)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self) -> str:
        """Listen and start sampling; returns the page's URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses  # the bound (host, port, ...) of each socket
        port = int(addresses[0][1]) if addresses else self.port
        self.port = port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}/"
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("dashboard listens on %s without authentication", self.host)
        self._sampler = asyncio.create_task(self._sample_forever())
        return self.url

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            try:
                await self._sampler
            except asyncio.CancelledError:
                pass
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- snapshots ------------------------------------------------------------------------------

    async def snapshot(self) -> MeshSnapshot:
        """A fresh snapshot, shared by concurrent callers and reused for ``min_interval``."""
        loop = asyncio.get_running_loop()
        if self._last is not None and loop.time() - self._last_at < self.min_interval:
            return self._last
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fresh())
        snap = await asyncio.shield(self._inflight)
        self._last, self._last_at = snap, loop.time()
        return snap

    async def _fresh(self) -> MeshSnapshot:
        if self._read is not None:
            return await self._read()
        assert self.source is not None
        return await gather(self.source, limit=self.row_limit, timeout=self.timeout)

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.history.add(await self.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dashboard sample failed")
            await asyncio.sleep(self.history_interval)

    # --- handlers -------------------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html")

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC_FILES[name])

    async def _snapshot(self, request: web.Request) -> web.Response:
        snap = await self.snapshot()
        body = snap.as_dict()
        body["server_time"] = time.time()
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _history(self, request: web.Request) -> web.Response:
        body = {"interval": self.history_interval, "samples": self.history.as_list()}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def static_dir() -> Path:
    """Where the vendored front end lives (for packaging checks)."""
    return Path(str(resources.files("latticaray.dashboard").joinpath("static")))
