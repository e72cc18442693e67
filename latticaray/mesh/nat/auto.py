"""The NAT service's auto mode: reachability and relays from the peers a node meets, no flags.

libp2p AutoNAT + AutoRelay style, for a node that joins with nothing but bootstrap addresses.
:class:`AutoMode` watches every peer the node identifies (identify lists the services a peer
offers, :mod:`.offers`):

* a peer offering AutoNAT (reached over direct QUIC) becomes an observer and AutoNAT server:
  each new one triggers a round (NAT type from the observed mappings, then dial-back checks,
  confirmations from ``min(2, servers)`` servers), and the servers met so far are re-checked on
  the AutoNAT schedule;
* a peer offering the relay is asked its relay port (:class:`~.offers.RelayHop`) and becomes a
  relay candidate of the :class:`~.reservations.ReservationService`, which keeps two
  reservations on the fastest (by ping RTT) while the node needs relays, replaces a relay that
  dies, and, short of candidates, looks for DHT providers of the relay service;
* the node needs relays when AutoNAT finds it private, or, before the verdict, as soon as the
  NAT type shows it is behind a NAT; once public it releases them and says so in the log.

When a DHT is attached (:meth:`attach_dht`) the node also announces its new addresses (a DHT
self-lookup carries its contact, circuit addresses included, to its closest peers). What the
mode found is in :meth:`status`; :meth:`wait_reachable` waits until the node is public or holds
a relay reservation, and otherwise raises :class:`~.errors.NotReachable` saying what it tried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import MeshError
from ..identify import IdentifyInfo
from ..identity import PeerId
from .addresses import AddressPolicy, Endpoint
from .autonat import Reachability
from .autorelay import NoRelayFound
from .errors import NatError, NotReachable
from .nattype import NatType
from .offers import AUTONAT_INFO_PROTOCOL, RELAY_HOP_PROTOCOL, RELAY_PROVIDER_KEY, RelayHop
from .reachability import ReachabilityService
from .reservations import ReservationService, describe_no_relay

if TYPE_CHECKING:
    from ..node import MeshNode

log = logging.getLogger(__name__)

OFFER_TIMEOUT = 5.0
DISCOVER_COUNT = 8


class ProviderDht(Protocol):
    """What auto mode uses of a DHT (``latticaray.mesh.dht.DhtService`` has it)."""

    async def provide(self, cid: bytes) -> int: ...

    def find_providers(self, cid: bytes, count: int = ...) -> AsyncIterator[Any]: ...

    async def bootstrap(self, addrs: list[Any] | None = ..., refresh: bool = ...) -> int: ...


class AutoMode:
    """Finds AutoNAT servers and relays among the peers met (see the module docstring)."""

    def __init__(
        self,
        node: MeshNode,
        reachability: ReachabilityService,
        reservations: ReservationService,
        policy: AddressPolicy,
        *,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.node = node
        self.reachability = reachability
        self.reservations = reservations
        self.policy = policy
        self.servers: dict[PeerId, Endpoint] = {}  # AutoNAT servers met, at their QUIC endpoint
        self.relays: dict[PeerId, tuple[str, int]] = {}  # relays met, at their TCP endpoint
        self.offer_errors: dict[PeerId, str] = {}
        self.dht: ProviderDht | None = None
        self.verdict = Reachability.UNKNOWN
        self._spawn = spawn
        self._round: asyncio.Task[Any] | None = None
        self._round_again = False
        self._announce: asyncio.Task[Any] | None = None
        self._announce_again = False
        self._settled = asyncio.Event()
        reservations.measure_rtt = node.ping
        reservations.discover = self.discover_relays
        reservations.on_no_relay = self._no_relay

    def start(self) -> None:
        """Listen to identify; peers identified before the NAT service started count too."""
        identify = self.node.identify_service
        identify.on_identified(self.on_identified)
        for info in list(identify.peer_info.values()):
            self.on_identified(info)

    def attach_dht(self, dht: ProviderDht) -> None:
        self.dht = dht

    # -- peers met -------------------------------------------------------------------------
    def on_identified(self, info: IdentifyInfo) -> None:
        peer = info.peer_id
        offers = set(info.protocols)
        if AUTONAT_INFO_PROTOCOL in offers and peer not in self.servers:
            endpoint = self._quic_endpoint(peer, info)
            if endpoint is not None:
                self.servers[peer] = endpoint
                log.info("AutoNAT server found: %s at %s:%d", peer, *endpoint)
                self._start_round()
        if RELAY_HOP_PROTOCOL in offers and peer not in self.relays:
            self._spawn(self._learn_relay(peer))

    def _direct_host(self, peer: PeerId, transport: str | None = None) -> Endpoint | None:
        """Where this node reaches ``peer`` over a direct (not relayed) connection."""
        for conn in self.node.connections.connections(peer):
            addr = conn.remote_addr
            if conn.closed or conn.relayed or addr is None or addr.host is None:
                continue
            if transport is None or conn.transport == transport:
                return (addr.host, addr.port or 0)
        return None

    def _quic_endpoint(self, peer: PeerId, info: IdentifyInfo) -> Endpoint | None:
        direct = self._direct_host(peer, "quic")
        if direct is not None:
            return direct
        for addr in info.listen_addrs:  # e.g. met over TCP: its advertised public QUIC address
            if addr.transport == "quic" and addr.host and addr.port:
                if self.policy.is_public(addr.host):
                    return (addr.host, addr.port)
        return None

    async def _learn_relay(self, peer: PeerId) -> None:
        try:
            hop = RelayHop.decode(
                await self.node.call(peer, RELAY_HOP_PROTOCOL, b"", timeout=OFFER_TIMEOUT)
            )
        except (MeshError, NatError, OSError) as exc:
            self.offer_errors[peer] = f"relay offer: {exc}"
            log.info("peer %s offers the relay but did not say where: %s", peer, exc)
            return
        direct = self._direct_host(peer)
        if direct is None:
            self.offer_errors[peer] = "relay offer: no direct connection to the relay"
            return
        self.relays[peer] = (direct[0], hop.port)
        log.info("relay found: %s at %s:%d", peer, direct[0], hop.port)
        self.reservations.add_candidate(peer, direct[0], hop.port)

    async def discover_relays(self) -> None:
        """Short of relays: connect to DHT providers of the relay service (identify then offers
        their relay like any peer's)."""
        if self.dht is None:
            return
        async for provider in self.dht.find_providers(RELAY_PROVIDER_KEY, count=DISCOVER_COUNT):
            peer = provider.peer_id
            if peer in self.relays or peer == self.node.peer_id:
                continue
            for addr in provider.addrs:
                try:
                    await self.node.connect(addr.with_peer(peer), timeout=OFFER_TIMEOUT)
                    break
                except (MeshError, OSError) as exc:
                    self.offer_errors[peer] = f"relay provider unreachable at {addr}: {exc}"

    # -- reachability rounds ---------------------------------------------------------------
    def _start_round(self) -> None:
        if self._round is not None and not self._round.done():
            self._round_again = True
            return
        self._round = self._spawn(self._rounds())

    async def _rounds(self) -> None:
        self._round_again = True
        while self._round_again:
            self._round_again = False
            try:
                await self._round_once()
            except (MeshError, OSError) as exc:
                log.info("reachability round failed: %s", exc)
        self.reachability.start_maintenance(lambda: list(self.servers.values()))

    async def _round_once(self) -> None:
        servers = list(self.servers.values())
        self.reachability.client.config.min_confirmations = max(1, min(2, len(servers)))
        report = await self.reachability.detect_nat(servers)
        if report.nat_type in (NatType.ENDPOINT_INDEPENDENT, NatType.ENDPOINT_DEPENDENT):
            self.reservations.set_needed(True)  # behind a NAT: no need to wait for AutoNAT
        await self.reachability.check_reachability(servers)
        self.decide()

    def decide(self) -> None:
        """Apply the current AutoNAT verdict: need relays or not; say when it changes."""
        reach = self.reachability.client.reachability()
        nat = self.reachability.nat_type
        if reach is Reachability.PUBLIC:
            needed = False
        elif reach is Reachability.PRIVATE:
            needed = True
        else:
            needed = self.reservations.core.needed or nat not in (NatType.UNKNOWN, NatType.NO_NAT)
        if reach is not self.verdict:
            self.verdict = reach
            if reach is Reachability.PUBLIC:
                addrs = ", ".join(self.reachability.public_addresses())
                log.info("this node is publicly reachable at %s", addrs)
            elif reach is Reachability.PRIVATE:
                log.info("this node is not publicly reachable (NAT: %s)", nat.value)
        if needed != self.reservations.core.needed:
            self.reservations.set_needed(needed)
        if reach is Reachability.PUBLIC or self.reservations.core.reserved():
            self._settled.set()
        else:
            self._settled.clear()

    def _no_relay(self, report: NoRelayFound) -> None:
        log.warning("%s: this node %s", self._situation(), describe_no_relay(report))

    def _situation(self) -> str:
        nat = self.reachability.nat_type
        if nat is NatType.ENDPOINT_DEPENDENT:
            return "behind an endpoint-dependent (symmetric) NAT, so hole punching needs a relay"
        if nat is NatType.ENDPOINT_INDEPENDENT:
            return "behind an endpoint-independent (cone) NAT"
        return f"not publicly reachable (AutoNAT: {self.verdict.value}, NAT type: {nat.value})"

    # -- announcing ------------------------------------------------------------------------
    def announce(self) -> None:
        """Our advertised addresses changed: carry our DHT contact to our closest peers."""
        if self.dht is None:
            return
        if self._announce is not None and not self._announce.done():
            self._announce_again = True
            return
        self._announce = self._spawn(self._announce_loop(self.dht))

    async def _announce_loop(self, dht: ProviderDht) -> None:
        self._announce_again = True
        while self._announce_again:
            self._announce_again = False
            try:
                await dht.bootstrap([], refresh=False)
            except (MeshError, OSError) as exc:
                log.info("announcing our new addresses in the DHT failed: %s", exc)

    # -- what it found ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        core = self.reservations.core
        report = self.reservations.no_relay
        return {
            "reachability": self.reachability.client.reachability().value,
            "nat_type": self.reachability.nat_type.value,
            "public_addrs": self.reachability.public_addresses(),
            "autonat_servers": {str(p): f"{h}:{port}" for p, (h, port) in self.servers.items()},
            "relays": {str(p): f"{h}:{port}" for p, (h, port) in self.relays.items()},
            "reserved": [c.relay for c in core.reserved()],
            "circuit_addrs": self.reservations.circuit_addresses(),
            "needs_relay": core.needed,
            "no_relay": describe_no_relay(report) if report is not None else None,
            "errors": {str(p): e for p, e in self.offer_errors.items()},
        }

    async def wait_reachable(self, timeout: float) -> None:
        """Return once the node is public or holds a relay reservation; else raise
        :class:`NotReachable` after ``timeout`` seconds, with what was found and tried."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except TimeoutError:
            raise NotReachable(self._explain(timeout)) from None

    def _explain(self, timeout: float) -> str:
        met = [str(p) for p in self.node.connected_peers()]
        if not self.servers:
            return (
                f"no reachability after {timeout:.0f} s: none of the {len(met)} peers met "
                f"({', '.join(met) or 'none: is the bootstrap address reachable?'}) offers "
                "AutoNAT; join through a public node that serves it, or name observers"
            )
        report = self.reservations.no_relay
        relays = describe_no_relay(report) if report else "holds no relay reservation yet"
        return f"{self._situation()} and, after {timeout:.0f} s, {relays}"
