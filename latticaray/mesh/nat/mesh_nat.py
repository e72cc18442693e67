"""NAT traversal attached to a :class:`~latticaray.mesh.node.MeshNode`.

:class:`MeshNat` runs the NAT machinery of :class:`~latticaray.mesh.nat.host.NatNode` on the
node's own shared QUIC socket and RPC router, and plugs relayed connections into the node's
connection manager:

* a ``circuit`` transport adapter: dialing ``<relay addr>/p2p/RELAY/p2p-circuit/p2p/PEER``
  opens a circuit on the relay and an end-to-end TLS session inside it; inbound circuits are
  handed to the manager like any inbound connection (transport name ``relay``), so
  ``node.call`` works over the relay with no change for the caller;
* the node advertises what NAT traversal learns: one circuit address per live relay reservation
  and the AutoNAT-confirmed public addresses go to ``node.add_advertised_addrs`` (and are
  removed when the reservation drops or the verdict changes), so identify and the DHT's peer
  records carry them and other peers can dial a private node through its relay;
* after a relayed connection that this node dialed comes up, a DCUtR upgrade runs over it; a
  direct connection ranks above any relayed one, so it becomes primary at once on both ends and
  every new call or stream goes over it. The relayed connection then *drains*: calls and streams
  already open on it finish there (users of long-lived streams, like the runtime's task
  sessions, move them on ``on_connection_added``), and it is closed once it carries none, or
  after ``relay_drain_timeout`` at the latest. The circuit address stays in the peer store, so the
  manager re-dials through the relay if the direct path dies.

Usage::

    nat = MeshNat(node, NatNodeConfig(policy=..., serve_relay=True, relay_port=4002))
    await nat.start()                                  # after node.start()
    await nat.detect_nat(observers); await nat.check_reachability(servers)
    await nat.reserve_relay(relay_peer, host, port)    # private nodes
    nat.circuit_address()                              # advertised via identify/DHT
"""

from __future__ import annotations

import asyncio
import logging

from ..connmgr import RPC_PROTOCOL_PREAMBLE, MeshConnection, RawConnection, TransportAdapter
from ..errors import MeshError, PeerUnreachable
from ..identity import PeerId
from ..multiaddr import Multiaddr
from ..transport.quic import QuicTransport
from .addresses import Endpoint
from .host import PING_SERVICE, NatNode, NatNodeConfig, PeerLink
from .tunnel import SecureTunnel

log = logging.getLogger(__name__)

CIRCUIT = "circuit"
PATH_CHECK_TIMEOUT = 5.0
RELAY_TRANSPORT_NAME = "relay"


def _relayed_raw(tunnel: SecureTunnel, outbound: bool, addr: Multiaddr | None) -> RawConnection:
    return RawConnection(
        peer_id=tunnel.remote_peer,
        channel=tunnel,
        transport=RELAY_TRANSPORT_NAME,
        remote_addr=addr,
        outbound=outbound,
        close=lambda _reason: tunnel.close(),
    )


class CircuitAdapter(TransportAdapter):
    """Dials ``/p2p-circuit`` addresses through the relay named in them (TCP relay leg)."""

    name = CIRCUIT

    def __init__(self, nat: MeshNat) -> None:
        self.nat = nat

    def can_listen(self, addr: Multiaddr) -> bool:
        return False

    def can_dial(self, addr: Multiaddr) -> bool:
        relay = addr.relay_addr
        return (
            addr.transport == CIRCUIT
            and relay is not None
            and relay.transport == "tcp"
            and addr.relay_peer is not None
        )

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        target = expected_peer or addr.peer_id
        if target is None:
            raise PeerUnreachable(f"circuit address {addr} names no target peer")
        relay = addr.relay_addr
        tunnel = await self.nat.relay_client.connect(
            addr.relay_peer, relay.host, relay.port, target, timeout=timeout
        )
        return _relayed_raw(tunnel, True, addr)

    async def close(self) -> None:
        return None


class MeshNat(NatNode):
    """NAT traversal for one MeshNode (see the module docstring)."""

    def __init__(self, node, config: NatNodeConfig | None = None) -> None:
        if node.quic is None or node.quic.local_address is None:
            raise RuntimeError("MeshNat needs a started MeshNode that listens on QUIC")
        super().__init__(node.key, config, transport=node.quic, router=node.router)
        self.node = node
        self._advertised: set[str] = set()
        self.drains: list[dict] = []  # one record per drained relayed connection

    async def start(self) -> None:
        await super().start()
        self.node.connections.register_transport(CircuitAdapter(self))
        self.node.connections.on_connection_added(self._on_connection_added)

    async def stop(self) -> None:
        await super().stop()
        self._withdraw_advertised()

    # -- advertising through the node ------------------------------------------------------
    def _addresses_changed(self) -> None:
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

    def _withdraw_advertised(self) -> None:
        if self._advertised:
            self.node.remove_advertised_addrs(sorted(self._advertised))
            self._advertised = set()

    # -- relayed connections into the manager ----------------------------------------------
    async def _on_relayed_incoming(self, tunnel: SecureTunnel) -> None:
        self.node.connections.accept_inbound(_relayed_raw(tunnel, False, None))

    def _relayed_connection(self, peer: PeerId) -> MeshConnection | None:
        for conn in self.node.connections.connections(peer):
            if (
                conn.transport == RELAY_TRANSPORT_NAME
                and not conn.closed
                and not conn.session.closed
            ):
                return conn
        return None

    def _direct_connection(self, peer: PeerId) -> MeshConnection | None:
        for conn in self.node.connections.connections(peer):
            if conn.transport == "quic" and not conn.closed and not conn.session.closed:
                return conn
        return None

    def _on_connection_added(self, conn: MeshConnection) -> None:
        """The dialer of a relayed connection initiates the upgrade (DCUtR), whether or not the
        peer had other connections already (e.g. its own relayed dial to us)."""
        if conn.relayed and conn.outbound and self.config.hole_punching:
            self._start_upgrade(conn)

    def upgrade(self, peer: PeerId) -> asyncio.Task | None:
        """Start a hole-punch upgrade of ``peer``'s relayed connection now, with this node as the
        initiator (also when the peer dialed the relay, or automatic punching is off). Returns
        the task (True once a direct path is up), the one already running, or None when there
        is a direct connection already or no relayed one."""
        relayed = self._relayed_connection(peer)
        return self._start_upgrade(relayed) if relayed is not None else None

    def _start_upgrade(self, conn: MeshConnection) -> asyncio.Task | None:
        peer = conn.peer_id
        link = self._link(peer)
        if link.upgrade_task is not None and not link.upgrade_task.done():
            return link.upgrade_task
        if self._direct_connection(peer) is not None:
            return None
        link.relayed = conn.session
        link.metrics.path = "relayed"
        link.metrics.started_at = self._loop.time()
        link.upgrade_task = self._spawn(self._upgrade_and_migrate(link, conn))
        return link.upgrade_task

    async def _upgrade_and_migrate(self, link: PeerLink, relayed: MeshConnection) -> bool:
        ok = await self._upgrade(link, self._loop.time())
        if ok and self._direct_connection(link.peer) is not None:
            self._spawn(self._retire_relayed(link.peer))
        return ok

    async def _retire_relayed(self, peer: PeerId) -> None:
        """Once the peer answers over the direct connection (so it has registered it too and
        opens new calls there), every relayed connection to it drains; both ends may have
        dialed the relay."""
        direct = self._direct_connection(peer)
        if direct is None:
            return
        try:
            await direct.session.call(PING_SERVICE, b"direct", timeout=PATH_CHECK_TIMEOUT)
        except MeshError as exc:
            log.info("direct connection to %s did not answer (%s); the relay stays", peer, exc)
            self.drains.append({"peer": str(peer), "outcome": "direct path unconfirmed"})
            return
        for conn in self.node.connections.connections(peer):
            if conn.relayed and not conn.closed:
                self._spawn(self._drain(peer, conn))

    async def _drain(self, peer: PeerId, relayed: MeshConnection) -> None:
        """Let the calls and streams open on ``relayed`` finish (new ones go direct), then close
        it; at ``relay_drain_timeout`` it closes with whatever is still open. If the direct path
        dies meanwhile the relayed connection stays: it is the peer's primary again."""
        loop = self._loop
        started = loop.time()
        deadline = started + self.config.relay_drain_timeout
        record = {"peer": str(peer), "outbound": relayed.outbound}
        self.drains.append(record)
        del self.drains[:-32]
        try:
            # the reply comes after every call the peer opened here before it went direct
            # (one ordered stream), so active_calls counts those too
            await relayed.session.call(PING_SERVICE, b"relay", timeout=PATH_CHECK_TIMEOUT)
        except MeshError as exc:
            log.info("relayed connection to %s did not answer before draining: %s", peer, exc)
        record["active_at_start"] = relayed.session.active_calls
        while not relayed.closed and relayed.session.active_calls > 0 and loop.time() < deadline:
            if self._direct_connection(peer) is None:
                record["outcome"] = "direct path lost; relayed connection kept"
                return
            await asyncio.sleep(0.05)
        record["drain_s"] = loop.time() - started
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

    # -- direct paths through the manager ---------------------------------------------------
    def _direct_up(self, link: PeerLink) -> bool:
        return self._direct_connection(link.peer) is not None

    async def _await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None:
        deadline = self._loop.time() + timeout
        while self._loop.time() < deadline:
            conn = self._direct_connection(link.peer)
            if conn is not None:
                self._mark_direct(link, conn)
                addr = conn.remote_addr
                return (addr.host, addr.port) if addr is not None else ("?", 0)
            await asyncio.sleep(0.02)
        return None

    def _mark_direct(self, link: PeerLink, conn: MeshConnection) -> None:
        now = self._loop.time()
        path = link.pending_path or "direct"
        link.direct, link.direct_path = conn.session, path
        link.metrics.path = path
        if link.metrics.upgraded_at is None:
            link.metrics.upgraded_at = now
        link.metrics.record(now, f"direct:{path}")
        link.direct_ready.set()

    async def _dial_direct(
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
            quic_conn = await transport.dial(
                (addr[0], addr[1]), expected_peer=peer, timeout=timeout
            )
            channel = quic_conn.open_channel()
            channel.write(RPC_PROTOCOL_PREAMBLE)
            raw = RawConnection(
                peer_id=quic_conn.remote_peer,
                channel=channel,
                transport="quic",
                remote_addr=quic_conn.remote_addr,
                outbound=True,
                close=quic_conn.close,
                on_close=lambda cb, c=quic_conn: c.on_close(lambda _c: cb()),
            )
            conn = manager.add_connection(raw)
        if conn.closed or conn.session.closed:
            raise PeerUnreachable(f"direct connection to {peer} closed as soon as it opened")
        link = self._link(peer)
        link.pending_path = path
        self._mark_direct(link, conn)
        return link

    def _on_quic(self, conn) -> None:
        return None  # the node's QUIC adapter accepts inbound connections
