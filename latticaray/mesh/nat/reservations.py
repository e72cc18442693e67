"""A private node's relay reservations: take them, keep them, replace them, say what to advertise.

:class:`ReservationService` is the asyncio shell of the sans-I/O :class:`AutoRelayCore` over a
:class:`~latticaray.mesh.nat.relay_client.RelayClient`:

* :meth:`reserve` takes a slot on a relay the user named (it raises if the relay refuses); with
  ``keep`` the relay is *pinned*: re-reserved whenever the reservation ends (the relay
  restarted, the path blinked), at once and then with capped exponential backoff;
* :meth:`add_candidate` offers a discovered relay and :meth:`set_needed` says whether the node
  needs relays; the core then keeps two reservations on the candidates with the lowest RTT
  (``measure_rtt``), replaces one that dies, asks ``discover`` for more candidates when short, and
  reports :class:`NoRelayFound` (kept in :attr:`no_relay`) when none can be had.

A watcher per reservation notices the end of its control stream. Every live reservation gives one
``/p2p-circuit`` address (:meth:`circuit_addresses`); ``on_change`` is called whenever that set
may have changed, so the owner can advertise it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..errors import MeshError
from ..identity import PeerId
from .addresses import circuit_address_text, endpoint_to_multiaddr_text
from .autorelay import (
    Action,
    AutoRelayConfig,
    AutoRelayCore,
    Discover,
    MeasureRtt,
    NoRelayFound,
    Release,
    Reserve,
)
from .config import RelayAddr
from .relay_client import RelayClient, RelayReservation

log = logging.getLogger(__name__)


def describe_no_relay(report: NoRelayFound) -> str:
    """What a :class:`NoRelayFound` means, for a log line or an error."""
    tried = "; ".join(f"{relay}: {why}" for relay, why in report.tried) or "none offered one"
    return (
        f"holds no relay reservation (relays tried: {tried}); peers that are not public "
        "cannot reach it. Join through a public node that serves the relay, or name a relay "
        "(--relay / nat={'relays': [...]})."
    )


class ReservationService:
    """Reservations on one or more relays, kept and replaced (see the module docstring)."""

    def __init__(
        self,
        client: RelayClient,
        me: PeerId,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        on_change: Callable[[], None],
        config: AutoRelayConfig | None = None,
        measure_rtt: Callable[[PeerId], Awaitable[float]] | None = None,
        discover: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.me = me
        self.core = AutoRelayCore(config)
        self.first: RelayAddr | None = None  # the first relay reserved on (``circuit_address``)
        self.no_relay: NoRelayFound | None = None  # the last "needed and none found" report
        self.measure_rtt = measure_rtt
        self.discover = discover
        #: told when the node needs a relay and none can be had (default: a warning)
        self.on_no_relay: Callable[[NoRelayFound], None] = self._warn_no_relay
        self._addrs: dict[str, RelayAddr] = {}
        self._spawn = spawn
        self._on_change = on_change
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # -- inputs ----------------------------------------------------------------------------
    async def reserve(self, relay_peer: PeerId, host: str, port: int, keep: bool = True) -> None:
        """Reserve a slot on a relay; with ``keep``, re-reserve (with backoff) whenever it drops."""
        reservation = await self.client.reserve(relay_peer, host, port)
        self.first = self.first or (relay_peer, host, port)
        relay_id = str(relay_peer)
        self._addrs[relay_id] = (relay_peer, host, port)
        if keep:
            now = self._loop().time()
            addr = endpoint_to_multiaddr_text((host, port), "tcp")
            self._watch(relay_id, reservation)
            self._apply(self.core.add_reserved(relay_id, addr, reservation.ttl, now))
        self._on_change()

    def add_candidate(self, relay_peer: PeerId, host: str, port: int) -> None:
        """A relay discovered among the peers; the core decides whether to reserve on it."""
        relay_id = str(relay_peer)
        self._addrs.setdefault(relay_id, (relay_peer, host, port))
        addr = endpoint_to_multiaddr_text((host, port), "tcp")
        self._apply(self.core.add_candidate(relay_id, addr, self._loop().time()))

    def set_needed(self, needed: bool) -> None:
        """Whether the node needs relays (it is not publicly reachable)."""
        self._apply(self.core.set_needed(needed, self._loop().time()))

    # -- carrying out the core's actions ---------------------------------------------------
    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, MeasureRtt):
                self._spawn(self._measure(action.relay))
            elif isinstance(action, Reserve):
                self._spawn(self._reserve(action.relay))
            elif isinstance(action, Release):
                self._spawn(self._release(action.relay))
            elif isinstance(action, Discover):
                if self.discover is not None:
                    self._spawn(self._discover(self.discover))
            elif isinstance(action, NoRelayFound):
                self.no_relay = action
                self.on_no_relay(action)
        self._schedule()

    @staticmethod
    def _warn_no_relay(report: NoRelayFound) -> None:
        log.warning("this node is not publicly reachable and %s", describe_no_relay(report))

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.core.next_timer()
        if due is not None:
            loop = self._loop()
            self._timer = loop.call_at(max(due, loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.core.tick(self._loop().time()))

    async def _measure(self, relay_id: str) -> None:
        relay_peer = self._addrs[relay_id][0]
        try:
            rtt = await self.measure_rtt(relay_peer) if self.measure_rtt is not None else 0.0
        except Exception as exc:  # whatever stops the probe, the candidate must not hang
            self._apply(self.core.on_rtt(relay_id, None, self._loop().time(), str(exc)))
            return
        self._apply(self.core.on_rtt(relay_id, rtt, self._loop().time()))

    async def _reserve(self, relay_id: str) -> None:
        relay_peer, host, port = self._addrs[relay_id]
        try:
            reservation = await self.client.reserve(relay_peer, host, port)
        except (MeshError, OSError) as exc:
            self._apply(self.core.on_failed(relay_id, str(exc), self._loop().time()))
            return
        log.info("reserved a slot on relay %s (%s:%d)", relay_peer, host, port)
        self.first = self.first or (relay_peer, host, port)
        self._watch(relay_id, reservation)
        self._apply(self.core.on_reserved(relay_id, reservation.ttl, self._loop().time()))
        self._on_change()

    async def _release(self, relay_id: str) -> None:
        await self.client.release(self._addrs[relay_id][0])
        self._on_change()

    async def _discover(self, discover: Callable[[], Awaitable[None]]) -> None:
        try:
            await discover()
        except (MeshError, OSError) as exc:
            log.info("looking for relays failed: %s", exc)

    def _watch(self, relay_id: str, reservation: RelayReservation) -> None:
        async def watch() -> None:
            await reservation.closed.wait()
            if self.client.reservations.get(relay_id) is not reservation:
                return  # replaced by a newer reservation, or released
            log.info("reservation on relay %s ended", reservation.relay_peer)
            self._apply(self.core.on_lost(relay_id, self._loop().time()))
            self._on_change()

        self._spawn(watch())

    # -- outputs ---------------------------------------------------------------------------
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
