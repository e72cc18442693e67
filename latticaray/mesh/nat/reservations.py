"""A private node's relay reservations: take them, keep them, say what to advertise.

:class:`ReservationService` is the asyncio shell of the sans-I/O :class:`ReservationKeeper`
over a :class:`~latticaray.mesh.nat.relay_client.RelayClient`: :meth:`reserve` takes a slot
on a relay; a keeper task notices a reservation whose control stream ended and re-reserves with
capped exponential backoff (the relay restarted, the path blinked). Every live reservation gives
one ``/p2p-circuit`` address (:meth:`circuit_addresses`); ``on_change`` is called whenever that
set may have changed, so the owner can advertise it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import MeshError
from ..identity import PeerId
from .addresses import circuit_address_text, endpoint_to_multiaddr_text
from .config import RelayAddr
from .relay import ReservationKeeper
from .relay_client import RelayClient

log = logging.getLogger(__name__)


class ReservationService:
    """Reservations on one or more relays, renewed and re-taken (see the module docstring)."""

    def __init__(
        self,
        client: RelayClient,
        me: PeerId,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        on_change: Callable[[], None],
        poll: float = 1.0,
    ) -> None:
        self.client = client
        self.me = me
        self.keeper = ReservationKeeper()
        self.first: RelayAddr | None = None  # the first relay reserved on (``circuit_address``)
        self._addrs: dict[str, RelayAddr] = {}
        self._spawn = spawn
        self._on_change = on_change
        self._poll = poll
        self._task: asyncio.Task[None] | None = None

    async def reserve(self, relay_peer: PeerId, host: str, port: int, keep: bool = True) -> None:
        """Reserve a slot on a relay; with ``keep``, re-reserve (with backoff) whenever it drops."""
        await self.client.reserve(relay_peer, host, port)
        self.first = self.first or (relay_peer, host, port)
        relay_id = str(relay_peer)
        self._addrs[relay_id] = (relay_peer, host, port)
        if keep:
            now = asyncio.get_running_loop().time()
            addr = endpoint_to_multiaddr_text((host, port), "tcp")
            self.keeper.add_relay(relay_id, addr, now)
            self.keeper.on_reserved(relay_id, self.client.reservations[relay_id].ttl, now)
            if self._task is None:
                self._task = self._spawn(self._keep())
        self._on_change()

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._poll)
            now = loop.time()
            for relay_id, state in list(self.keeper.relays.items()):
                live = self.client.reservations.get(relay_id)
                if live is not None and not live.closed.is_set():
                    continue
                if state.expires > now:  # it just dropped: try again at once
                    state.expires = 0.0
                    state.next_attempt = now
                if state.next_attempt > now:
                    continue
                relay_peer, host, port = self._addrs[relay_id]
                try:
                    await self.client.reserve(relay_peer, host, port)
                    ttl = self.client.reservations[relay_id].ttl
                    self.keeper.on_reserved(relay_id, ttl, loop.time())
                    log.info("re-reserved on relay %s", relay_peer)
                except (MeshError, OSError) as exc:
                    self.keeper.on_failed(relay_id, str(exc), loop.time())
            self._on_change()

    def circuit_addresses(self) -> list[str]:
        """One ``/p2p-circuit`` address per live reservation (what to advertise)."""
        out = []
        for relay_id, reservation in self.client.reservations.items():
            if reservation.closed.is_set():
                continue
            relay_peer, host, port = self._addrs.get(
                relay_id, (reservation.relay_peer, reservation.host, reservation.port)
            )
            out.append(self._circuit(relay_peer, host, port))
        return out

    def circuit_address(self) -> str | None:
        """The circuit address through the first relay reserved on (None before any)."""
        return self._circuit(*self.first) if self.first is not None else None

    def _circuit(self, relay_peer: PeerId, host: str, port: int) -> str:
        base = endpoint_to_multiaddr_text((host, port), "tcp")
        return circuit_address_text(base, str(relay_peer), str(self.me))
