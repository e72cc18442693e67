"""Asyncio shell of the liveness detector: :class:`LivenessService` watches peers for a node.

Every ``tick`` it feeds the :class:`~latticaray.mesh.liveness.core.LivenessCore` the time of the
last bytes read on each watched peer's connections (any traffic is evidence of life, so a busy
link needs no extra keepalives), then applies the core's actions: a :class:`Probe` is a
``/latticaray/ping/1`` call bounded by ``probe_timeout``; a :class:`Redial` dials the peer by ID
through the connection manager (its direct addresses first, relayed ones last); a
:class:`LivenessChanged` goes to the callbacks registered with :meth:`LivenessService.on_change`.
Connection events of the node tell the core when a peer connects or loses its last connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..identity import PeerId
from .core import LivenessChanged, LivenessConfig, LivenessCore, PeerLiveness, Probe, Redial

__all__ = ["LivenessHost", "LivenessService"]

log = logging.getLogger(__name__)


class _Session(Protocol):
    @property
    def last_activity(self) -> float: ...


class _Connection(Protocol):
    @property
    def session(self) -> _Session: ...


class _Connections(Protocol):
    def connections(self, peer: PeerId | None = None) -> Iterable[_Connection]: ...

    async def get(self, peer: PeerId, timeout: float | None = None) -> Any: ...


class LivenessHost(Protocol):
    """What the service uses of its node (MeshNode implements it)."""

    @property
    def connections(self) -> _Connections: ...

    def on_peer_connected(self, callback: Callable[[PeerId], None]) -> None: ...

    def on_peer_disconnected(self, callback: Callable[[PeerId], None]) -> None: ...

    async def ping(self, peer_id: PeerId, timeout: float = 10.0) -> float: ...


class LivenessService:
    """Watches peers of a node (see the module docstring). ``start()`` runs it; ``stop()``."""

    def __init__(self, host: LivenessHost, config: LivenessConfig | None = None) -> None:
        self.config = config or LivenessConfig()
        self.core: LivenessCore[PeerId] = LivenessCore(self.config)
        self._host = host
        #: How often activity is sampled and the core is asked for actions.
        self.tick_interval = min(0.25, self.config.probe_interval / 4)
        self._callbacks: list[Callable[[LivenessChanged[PeerId]], None]] = []
        self._fed: dict[PeerId, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        host.on_peer_connected(self._on_connected)
        host.on_peer_disconnected(self._on_disconnected)

    # -- API -----------------------------------------------------------------------------------
    def watch(self, peer: PeerId) -> None:
        """Keep ``peer`` under watch: probe it when quiet, redial it when its connection breaks,
        report its liveness changes. Call again after :meth:`unwatch` to resume."""
        loop = self._require_loop()
        connected = any(True for _ in self._host.connections.connections(peer))
        self.core.watch(peer, loop.time(), connected=connected)

    def unwatch(self, peer: PeerId) -> None:
        self.core.unwatch(peer)
        self._fed.pop(peer, None)

    def state(self, peer: PeerId) -> PeerLiveness | None:
        """ALIVE, SUSPECT or DOWN; None for a peer not watched."""
        return self.core.state(peer)

    def phi(self, peer: PeerId) -> float:
        loop = self._require_loop()
        return self.core.phi(peer, loop.time())

    def on_change(self, callback: Callable[[LivenessChanged[PeerId]], None]) -> None:
        """``callback(change)`` for every state change of a watched peer."""
        self._callbacks.append(callback)

    def start(self) -> None:
        if self._ticker is None:
            self._loop = asyncio.get_running_loop()
            self._ticker = self._loop.create_task(self._tick_loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        self._ticker = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the shell -----------------------------------------------------------------------------
    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self._tick()
            except Exception:  # a bug here must not stop the watch of every peer
                log.exception("liveness tick failed")

    def _tick(self) -> None:
        loop = self._require_loop()
        core = self.core
        for peer in core.watched():
            latest = max(
                (c.session.last_activity for c in self._host.connections.connections(peer)),
                default=None,
            )
            if latest is not None and latest > self._fed.get(peer, float("-inf")):
                self._fed[peer] = latest
                self._report(core.heard(peer, latest))
        for action in core.tick(loop.time()):
            if isinstance(action, Probe):
                self._spawn(self._probe(action.peer))
            elif isinstance(action, Redial):
                self._spawn(self._redial(action.peer))
            else:
                self._report(action)

    async def _probe(self, peer: PeerId) -> None:
        loop = self._require_loop()
        try:
            await self._host.ping(peer, timeout=self.config.probe_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("keepalive to %s failed: %s", peer, exc)
            self.core.probe_failed(peer, loop.time())
            return
        self._report(self.core.heard(peer, loop.time()))

    async def _redial(self, peer: PeerId) -> None:
        loop = self._require_loop()
        try:
            await self._host.connections.get(peer, timeout=2 * self.config.probe_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("redial of %s failed: %s", peer, exc)
            self.core.redial_failed(peer, loop.time())
            return
        self._report(self.core.connected(peer, loop.time()))

    def _on_connected(self, peer: PeerId) -> None:
        if self._loop is not None:
            self._report(self.core.connected(peer, self._loop.time()))

    def _on_disconnected(self, peer: PeerId) -> None:
        if self._loop is not None:
            self.core.disconnected(peer, self._loop.time())

    def _report(self, change: LivenessChanged[PeerId] | None) -> None:
        if change is None:
            return
        log.info(
            "peer %s is %s (was %s; silent %.1f s, phi %.1f)",
            change.peer,
            change.state.value,
            change.previous.value,
            change.silent_for,
            change.phi,
        )
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:
                log.exception("liveness callback failed")

    def _spawn(self, coro: Any) -> None:
        task = self._require_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
