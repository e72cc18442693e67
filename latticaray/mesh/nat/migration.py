"""Moving a mesh peer off the relay: hole-punch a relayed connection, then drain and close it.

After a relayed connection that this node dialed comes up, :class:`RelayMigration` starts a
DCUtR upgrade over it (:class:`~latticaray.mesh.nat.punch.HolePunchService`). A direct
connection ranks above any relayed one, so it becomes primary at once on both ends and every new
call or stream goes over it. The relayed connection then *drains*: once the peer answers a ping
over the direct connection (so it has registered it too), every relayed connection to the peer
(both ends may have dialed one) gets a ping (its reply is ordered after any call the peer opened
there earlier), calls and streams already open on it finish there, and it is closed once it
carries none, or after ``relay_drain_timeout`` at the latest. If the direct path dies meanwhile
the relayed connection stays: it is the peer's primary again. ``drains`` keeps one record per
drained connection (the last 32).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..connmgr import ConnectionManager, MeshConnection
from ..errors import MeshError
from ..identity import PeerId
from .circuit import direct_connection, relayed_connection
from .config import NatConfig
from .links import PeerLink
from .punch import HolePunchService
from .service import PING_SERVICE

log = logging.getLogger(__name__)

PATH_CHECK_TIMEOUT = 5.0


class RelayMigration:
    """Upgrades of relayed mesh connections and the drain of the relay (see the docstring)."""

    def __init__(
        self,
        manager: ConnectionManager,
        punch: HolePunchService,
        *,
        link: Callable[[PeerId], PeerLink],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        clock: Callable[[], float],
        config: NatConfig,
    ) -> None:
        self.manager = manager
        self.punch = punch
        self.config = config  # hole_punching: upgrade automatically; relay_drain_timeout
        self.drains: list[dict[str, Any]] = []  # one record per drained relayed connection
        self._link = link
        self._spawn = spawn
        self._clock = clock

    def on_connection_added(self, conn: MeshConnection) -> None:
        """The dialer of a relayed connection initiates the upgrade (DCUtR), whether or not the
        peer had other connections already (e.g. its own relayed dial to us)."""
        if conn.relayed and conn.outbound and self.config.hole_punching:
            self._start(conn)

    def upgrade(self, peer: PeerId) -> asyncio.Task[bool] | None:
        """Start a hole-punch upgrade of ``peer``'s relayed connection now, with this node as the
        initiator (also when the peer dialed the relay, or automatic punching is off). Returns
        the task (True once a direct path is up), the one already running, or None when there
        is a direct connection already or no relayed one."""
        relayed = relayed_connection(self.manager, peer)
        return self._start(relayed) if relayed is not None else None

    def _start(self, conn: MeshConnection) -> asyncio.Task[bool] | None:
        peer = conn.peer_id
        link = self._link(peer)
        if link.upgrade_task is not None and not link.upgrade_task.done():
            return link.upgrade_task
        if direct_connection(self.manager, peer) is not None:
            return None
        link.relayed = conn.session
        link.metrics.path = "relayed"
        link.metrics.started_at = self._clock()
        link.upgrade_task = self._spawn(self._upgrade_and_migrate(link))
        return link.upgrade_task

    async def _upgrade_and_migrate(self, link: PeerLink) -> bool:
        ok = await self.punch.upgrade(link, self._clock())
        if ok and direct_connection(self.manager, link.peer) is not None:
            self._spawn(self._retire_relayed(link.peer))
        return ok

    async def _retire_relayed(self, peer: PeerId) -> None:
        direct = direct_connection(self.manager, peer)
        if direct is None:
            return
        try:
            await direct.session.call(PING_SERVICE, b"direct", timeout=PATH_CHECK_TIMEOUT)
        except MeshError as exc:
            log.info("direct connection to %s did not answer (%s); the relay stays", peer, exc)
            self.drains.append({"peer": str(peer), "outcome": "direct path unconfirmed"})
            return
        for conn in self.manager.connections(peer):
            if conn.relayed and not conn.closed:
                self._spawn(self._drain(peer, conn))

    async def _drain(self, peer: PeerId, relayed: MeshConnection) -> None:
        started = self._clock()
        deadline = started + self.config.relay_drain_timeout
        record: dict[str, Any] = {"peer": str(peer), "outbound": relayed.outbound}
        self.drains.append(record)
        del self.drains[:-32]
        try:
            # the reply comes after every call the peer opened here before it went direct
            # (one ordered stream), so active_calls counts those too
            await relayed.session.call(PING_SERVICE, b"relay", timeout=PATH_CHECK_TIMEOUT)
        except MeshError as exc:
            log.info("relayed connection to %s did not answer before draining: %s", peer, exc)
        record["active_at_start"] = relayed.session.active_calls
        while not relayed.closed and relayed.session.active_calls > 0 and self._clock() < deadline:
            if direct_connection(self.manager, peer) is None:
                record["outcome"] = "direct path lost; relayed connection kept"
                return
            await asyncio.sleep(0.05)
        record["drain_s"] = self._clock() - started
        record["active_at_close"] = 0 if relayed.closed else relayed.session.active_calls
        record["outcome"] = (
            "closed by peer or idle reaper"
            if relayed.closed
            else ("drained" if record["active_at_close"] == 0 else "drain deadline")
        )
        if not relayed.closed:
            log.info(
                "relayed connection to %s closed after %.2f s of draining (%d calls open)",
                peer,
                record["drain_s"],
                record["active_at_close"],
            )
            await relayed.session.aclose("upgraded to a direct connection")
