"""Relayed connections inside a MeshNode's connection manager.

* :class:`CircuitAdapter`, the ``circuit`` transport: dialing
  ``<relay addr>/p2p/RELAY/p2p-circuit/p2p/PEER`` opens a circuit on the relay and an end-to-end
  TLS session inside it, so ``node.call`` works over the relay with no change for the caller;
* :func:`relayed_raw` wraps such a tunnel (dialed or accepted) as a ``RawConnection`` with
  transport name ``relay``;
* :func:`relayed_connection` / :func:`direct_connection` find a peer's live relayed or direct
  QUIC connection among the manager's.
"""

from __future__ import annotations

from ..connmgr import ConnectionManager, MeshConnection, RawConnection, TransportAdapter
from ..errors import PeerUnreachable
from ..identity import PeerId
from ..multiaddr import Multiaddr
from .relay_client import RelayClient
from .tunnel import SecureTunnel

CIRCUIT = "circuit"
RELAY_TRANSPORT_NAME = "relay"


def relayed_raw(tunnel: SecureTunnel, outbound: bool, addr: Multiaddr | None) -> RawConnection:
    return RawConnection(
        peer_id=tunnel.peer,
        channel=tunnel,
        transport=RELAY_TRANSPORT_NAME,
        remote_addr=addr,
        outbound=outbound,
        close=lambda _reason: tunnel.close(),
    )


def _live(conn: MeshConnection) -> bool:
    return not conn.closed and not conn.session.closed


def relayed_connection(manager: ConnectionManager, peer: PeerId) -> MeshConnection | None:
    """A live relayed connection to ``peer``, if any."""
    for conn in manager.connections(peer):
        if conn.transport == RELAY_TRANSPORT_NAME and _live(conn):
            return conn
    return None


def direct_connection(manager: ConnectionManager, peer: PeerId) -> MeshConnection | None:
    """A live direct QUIC connection to ``peer``, if any."""
    for conn in manager.connections(peer):
        if conn.transport == "quic" and _live(conn):
            return conn
    return None


class CircuitAdapter(TransportAdapter):
    """Dials ``/p2p-circuit`` addresses through the relay named in them (TCP relay leg)."""

    name = CIRCUIT

    def __init__(self, relay_client: RelayClient) -> None:
        self.relay_client = relay_client

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
        relay = addr.relay_addr
        if (
            target is None
            or relay is None
            or relay.host is None
            or relay.port is None
            or addr.relay_peer is None
        ):
            raise PeerUnreachable(f"circuit address {addr} names no relay or no target peer")
        tunnel = await self.relay_client.connect(
            addr.relay_peer, relay.host, relay.port, target, timeout=timeout
        )
        return relayed_raw(tunnel, True, addr)

    async def close(self) -> None:
        return None
