"""NAT traversal attached to a :class:`~latticaray.mesh.node.MeshNode`: :class:`MeshNatService`.

The :class:`~latticaray.mesh.nat.service.NatService` on the node's own shared QUIC socket and RPC
router, with the node's connection manager as the owner of every connection:

* relayed circuits, dialed (the ``circuit`` transport, :mod:`.circuit`) or accepted, are
  connections of the manager like any other (transport name ``relay``);
* hole punching dials its direct QUIC connections through the manager (or, for the birthday
  hard side, on an extra socket and registers them with it), and :class:`.migration.RelayMigration`
  upgrades relayed connections and drains the relay afterwards;
* the node advertises what NAT traversal learns: one circuit address per live relay reservation
  and the AutoNAT-confirmed public addresses go to ``node.add_advertised_addrs`` (and are
  removed when the reservation drops or the verdict changes), so identify and the DHT's peer
  records carry them and other peers can dial a private node through its relay. The circuit
  address stays in the peer store, so the manager re-dials through the relay if a direct path
  dies;
* in auto mode (``NatConfig(auto=True)``, :class:`.auto.AutoMode`) the node needs no observers
  or relays: it finds AutoNAT servers and relays among the peers it meets, keeps two
  reservations and reports what it found (:meth:`MeshNatService.status`,
  :meth:`MeshNatService.wait_reachable`).

Usage::

    nat = MeshNatService(node, NatConfig(policy=..., serve_relay=True, relay_port=4002))
    await nat.start()                                  # after node.start()
    await nat.detect_nat(observers); await nat.check_reachability(servers)
    await nat.reserve_relay(relay_peer, host, port)    # private nodes
    nat.circuit_address()                              # advertised via identify/DHT
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..connmgr import MeshConnection, QuicAdapter
from ..errors import MeshError, PeerUnreachable
from ..identity import PeerId
from ..multiaddr import Multiaddr
from ..transport.quic import QuicConn, QuicTransport
from .addresses import Endpoint
from .auto import AutoMode, ProviderDht
from .circuit import CircuitAdapter, direct_connection, relayed_raw
from .config import NatConfig, parse_relay_addr
from .libp2p_relay import Libp2pCircuitAdapter, Libp2pRelayConfig, Libp2pRelayService
from .links import PeerLink
from .migration import RelayMigration
from .offers import RELAY_PROVIDER_KEY
from .service import NatService
from .tunnel import SecureTunnel

if TYPE_CHECKING:
    from ..node import MeshNode

log = logging.getLogger(__name__)


class MeshNatService(NatService):
    """NAT traversal for one MeshNode (see the module docstring)."""

    def __init__(
        self,
        node: MeshNode,
        config: NatConfig | None = None,
        *,
        is_member: Callable[[PeerId], bool] | None = None,
    ) -> None:
        if node.quic is None or node.quic.local_address is None:
            raise RuntimeError("MeshNatService needs a started MeshNode that listens on QUIC")
        config = config or NatConfig()
        super().__init__(node.key, config, transport=node.quic, router=node.router)
        self.node = node
        #: the mesh's members (full relay limits); others get the public ones, if any
        self.is_member = is_member or (lambda _peer: False)
        #: the libp2p relay (hop) beside the mesh's own, when ``serve_relay``
        self.libp2p_relay: Libp2pRelayService | None = None
        self._advertised: set[str] = set()
        self.migration = RelayMigration(
            node.connections,
            self.punch,
            link=self.link,
            spawn=self.spawn,
            clock=lambda: self.loop.time(),
            config=config,
        )
        self.auto: AutoMode | None = None
        self.dht: ProviderDht | None = None
        if config.auto:
            self.auto = AutoMode(
                node, self.reachability, self.reservations, config.policy, spawn=self.spawn
            )

    async def start(self) -> None:
        await super().start()
        native = CircuitAdapter(self.relay_client)
        circuits = self.node.connections.adapters.get(native.name)
        if isinstance(circuits, Libp2pCircuitAdapter):  # one circuit transport: ours, then hop
            circuits.native = native
        else:
            self.node.connections.register_transport(native)
        if self.config.serve_relay:
            self.libp2p_relay = Libp2pRelayService(
                self.node,
                Libp2pRelayConfig(self.config.relay_config, public=self.config.public_relay),
                is_member=self.is_member,
            )
            self.libp2p_relay.start()
        self.node.connections.on_connection_added(self.migration.on_connection_added)
        if self.auto is not None:
            self.auto.start()
            for text in self.config.relays:  # hand-given relays stay: pinned beside found ones
                self.spawn(self._reserve_given(text))

    async def _reserve_given(self, text: str) -> None:
        relay_peer, host, port = parse_relay_addr(text)
        try:
            await self.reserve_relay(relay_peer, host, port)
        except (MeshError, OSError) as exc:
            log.warning("reservation on the given relay %s failed: %s", text, exc)

    def attach_dht(self, dht: ProviderDht) -> None:
        """Use ``dht`` (a ``DhtService`` of this node): a node serving the relay provides
        :data:`~.offers.RELAY_PROVIDER_KEY`; in auto mode the node looks for relays there when
        short of them and announces its new addresses."""
        self.dht = dht
        if self.auto is not None:
            self.auto.attach_dht(dht)
        if self.relay_server is not None:
            self.spawn(self._provide_relay(dht))

    async def _provide_relay(self, dht: ProviderDht) -> None:
        try:
            await dht.provide(RELAY_PROVIDER_KEY)
        except (MeshError, OSError) as exc:  # the DHT re-provides it periodically
            log.info("announcing the relay service in the DHT failed: %s", exc)

    def status(self) -> dict[str, Any]:
        """What NAT traversal found: reachability, NAT type, relays, circuit addresses."""
        if self.auto is not None:
            return self.auto.status()
        return {
            "reachability": self.autonat_client.reachability().value,
            "nat_type": self.reachability.nat_type.value,
            "public_addrs": self.public_addresses(),
            "circuit_addrs": self.circuit_addresses(),
        }

    async def wait_reachable(self, timeout: float) -> None:
        """Auto mode: wait until the node is public or holds a relay reservation; raises
        :class:`~.errors.NotReachable` saying what was tried."""
        if self.auto is None:
            raise RuntimeError("wait_reachable needs auto mode (NatConfig(auto=True))")
        await self.auto.wait_reachable(timeout)

    async def stop(self) -> None:
        if self.libp2p_relay is not None:
            await self.libp2p_relay.stop()
        await super().stop()
        if self._advertised:
            self.node.remove_advertised_addrs(sorted(self._advertised))
            self._advertised = set()

    @property
    def drains(self) -> list[dict[str, Any]]:
        """One record per relayed connection drained after an upgrade (the last 32)."""
        return self.migration.drains

    def upgrade(self, peer: PeerId) -> asyncio.Task[bool] | None:
        """Start a hole-punch upgrade of ``peer``'s relayed connection now (see
        :meth:`RelayMigration.upgrade`)."""
        return self.migration.upgrade(peer)

    # -- advertising through the node ------------------------------------------------------
    def addresses_changed(self) -> None:
        wanted = set(self.circuit_addresses()) | set(self.public_addresses())
        gone = self._advertised - wanted
        new = wanted - self._advertised
        if gone:
            self.node.remove_advertised_addrs(sorted(gone))
        if new:
            try:
                self.node.add_advertised_addrs(sorted(new))
            except MeshError as exc:
                log.warning("cannot advertise %s: %s", sorted(new), exc)
                new = set()
        self._advertised = (self._advertised - gone) | new
        if self.auto is not None:
            self.auto.decide()
            if gone or new:
                self.auto.announce()

    # -- connections through the manager ---------------------------------------------------
    async def on_relayed_incoming(self, tunnel: SecureTunnel) -> None:
        self.node.connections.accept_inbound(relayed_raw(tunnel, False, None))

    def on_quic(self, conn: QuicConn) -> None:
        return None  # the node's QUIC adapter accepts inbound connections

    def direct_up(self, link: PeerLink) -> bool:
        return direct_connection(self.node.connections, link.peer) is not None

    async def await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            conn = direct_connection(self.node.connections, link.peer)
            if conn is not None:
                self._mark_direct(link, conn)
                addr = conn.remote_addr
                if addr is None or addr.host is None or addr.port is None:
                    return ("?", 0)
                return (addr.host, addr.port)
            await asyncio.sleep(0.02)
        return None

    def _mark_direct(self, link: PeerLink, conn: MeshConnection) -> None:
        now = self.loop.time()
        path = link.pending_path or "direct"
        link.direct, link.direct_path = conn.session, path
        link.metrics.path = path
        conn.session.count_as("punched")  # its bytes, as the state API names its path
        if link.metrics.upgraded_at is None:
            link.metrics.upgraded_at = now
        link.metrics.record(now, f"direct:{path}")
        link.direct_ready.set()

    async def dial_direct(
        self,
        peer: PeerId,
        addr: Endpoint,
        path: str,
        transport: QuicTransport | None = None,
        timeout: float | None = None,
    ) -> PeerLink:
        timeout = timeout or self.config.direct_dial_timeout
        target = Multiaddr.parse(f"/ip4/{addr[0]}/udp/{addr[1]}/quic-v1/p2p/{peer}")
        manager = self.node.connections
        if transport is None or transport is self.transport:
            conn = await manager.dial_addr(target, timeout, force_new=True)
        else:
            # a socket of our own (birthday punching): dialed and accepted like the node's own
            adapter = QuicAdapter(transport, manager.accept_inbound, streams=manager.streams)
            conn = manager.add_connection(await adapter.dial(target, peer, timeout))
        if conn.closed or conn.session.closed:
            raise PeerUnreachable(f"direct connection to {peer} closed as soon as it opened")
        link = self.link(peer)
        link.pending_path = path
        self._mark_direct(link, conn)
        return link
