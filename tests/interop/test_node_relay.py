"""Circuit relay v2 end to end between the product's MeshNode and js-libp2p, both roles.

The session's js peer (``js_peer``) is a js-libp2p relay server; a second js peer (``js_peer2``,
one per module) is the client or the target a test needs. Relayed connections carry a whole
libp2p connection (multistream, Noise, yamux) over a hop/stop stream, so identify and ping
over them prove the upgrade ran over the relayed bytes in both directions.
"""

from __future__ import annotations

import asyncio

import pytest

from latticaray.mesh.libp2p.relay import RelayLimit
from latticaray.mesh.nat.libp2p_relay import Libp2pRelayConfig, Libp2pRelayService
from latticaray.mesh.node import MeshConfig, MeshNode

from .jspeer import JsPeer, JsPeerError


@pytest.fixture(scope="module")
def js_peer2(js_peer):
    """A second js-libp2p peer (client or target of a circuit through the first)."""
    peer = JsPeer()
    try:
        yield peer
    finally:
        peer.stop()


async def _until(predicate, timeout: float = 10.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _tcp_node() -> MeshNode:
    node = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], transports=("tcp",)))
    return await node.start()


async def _hang_up(peers, *nodes) -> None:
    for js in peers:
        for n in nodes:
            await js.call("hangup", peer=str(n.peer_id), timeout=10)


async def _relayed_connection_to(js: JsPeer, peer: str, via=None):
    """js's relayed connection to ``peer`` (through the relay ``via`` if given), or None."""
    for conn in await js.call("connections"):
        if conn["remotePeer"] == peer and "/p2p-circuit" in conn["remoteAddr"]:
            if via is None or f"/p2p/{via}/p2p-circuit" in conn["remoteAddr"]:
                return conn
    return None


async def test_js_dials_our_node_through_a_js_relay(node, js_peer, js_peer2):
    reservation = await node.circuits.reserve(js_peer.addr("tcp"))
    assert str(reservation.relay) == js_peer.peer_id
    assert reservation.limit is not None and reservation.limit.duration > 0  # js: limited relay
    assert reservation.circuit_addr in node.advertised_addrs
    circuit = str(reservation.circuit_addr)
    try:
        rtt = await js_peer2.call("ping", addr=circuit)
        assert rtt >= 0
        conn = await _relayed_connection_to(js_peer2, str(node.peer_id))
        assert conn is not None and conn["encryption"] == "/noise"
        assert conn["multiplexer"] == "/yamux/1.0.0" and conn["limited"]
        info = await js_peer2.call("identify", peer=str(node.peer_id))
        assert info["peerId"] == str(node.peer_id)
        assert info["agentVersion"].startswith("latticaray/")
        assert "/ipfs/ping/1.0.0" in info["protocols"]
        ours = node.connection_to(node.connections.connected_peers()[0])
        relayed = [c for c in node.connections.connections() if c.transport == "relay"]
        assert relayed and ours is not None
        assert str(relayed[0].peer_id) == js_peer2.peer_id and not relayed[0].outbound
    finally:
        await _hang_up([js_peer2], node)


async def test_our_node_dials_a_js_peer_through_a_js_relay(node, js_peer, js_peer2):
    addrs = await js_peer2.call("reserve", addr=js_peer.addr("tcp"))
    circuit = next(a for a in addrs if js_peer.peer_id in a)
    target = f"{circuit}/p2p/{js_peer2.peer_id}" if js_peer2.peer_id not in circuit else circuit
    try:
        peer = await node.connect(target, timeout=15)
        assert str(peer) == js_peer2.peer_id
        conn = node.connection_to(peer)
        assert conn is not None and conn.transport == "relay" and conn.outbound
        assert conn.remote_addr is not None and conn.remote_addr.relay_peer is not None
        assert await node.ping(peer) >= 0
        info = await node.identify(peer)
        assert info.agent_version and "js-libp2p" in info.agent_version
        assert "/libp2p/circuit/relay/0.2.0/stop" in info.protocols
        seen = await _relayed_connection_to(js_peer2, str(node.peer_id))
        assert seen is not None and seen["direction"] == "inbound"
    finally:
        await _hang_up([js_peer2], node)


@pytest.fixture
async def relay():
    """A MeshNode serving circuit relay v2 (hop) to anyone, with the public limits."""
    node = await _tcp_node()
    service = Libp2pRelayService(node)
    service.start()
    try:
        yield node, service
    finally:
        await service.stop()
        await node.stop()


async def test_js_reaches_js_and_our_node_through_our_relay(relay, js_peer, js_peer2):
    node, service = relay
    relay_addr = str(node.listen_addrs[0])
    target = await _tcp_node()
    try:
        addrs = await js_peer2.call("reserve", addr=relay_addr)
        assert any(str(node.peer_id) in a for a in addrs)
        assert js_peer2.peer_id in {str(p) for p in _reserved(service)}
        circuit = f"{relay_addr}/p2p-circuit/p2p/{js_peer2.peer_id}"
        assert await js_peer.call("ping", addr=circuit, force=True) >= 0
        conn = await _relayed_connection_to(js_peer, js_peer2.peer_id)
        assert conn is not None and conn["limited"]  # our relay gave a non-member its limit
        assert service.bytes_relayed > 0
        # a node of ours behind the same relay
        reservation = await target.circuits.reserve(relay_addr)
        assert await js_peer.call("ping", addr=str(reservation.circuit_addr)) >= 0
        info = await js_peer.call("identify", peer=str(target.peer_id))
        assert info["agentVersion"].startswith("latticaray/")
    finally:
        await _hang_up([js_peer, js_peer2], node, target)
        await target.stop()


def _reserved(service: Libp2pRelayService):
    return list(service.core.reservations)


async def test_connect_without_reservation_is_refused_by_our_relay(relay, js_peer):
    node, service = relay
    nobody = MeshNode().peer_id
    circuit = f"{node.listen_addrs[0]}/p2p-circuit/p2p/{nobody}"
    try:
        with pytest.raises(JsPeerError, match="NO_RESERVATION"):
            await js_peer.call("dial", addr=circuit)
        assert service.core.refusals.get("NO_RESERVATION") == 1
    finally:
        await _hang_up([js_peer], node)


async def test_a_members_only_relay_refuses_a_js_reservation(js_peer2):
    node = await _tcp_node()
    service = Libp2pRelayService(node, Libp2pRelayConfig(public=False))
    service.start()
    try:
        with pytest.raises(JsPeerError):
            await js_peer2.call("reserve", addr=str(node.listen_addrs[0]))
        assert not service.core.reservations
    finally:
        await _hang_up([js_peer2], node)
        await service.stop()
        await node.stop()


async def test_our_relay_closes_a_js_circuit_at_its_duration_limit(js_peer, js_peer2):
    node = await _tcp_node()
    config = Libp2pRelayConfig(public_limit=RelayLimit(duration=2, data=1 << 20))
    service = Libp2pRelayService(node, config)
    service.start()
    relay_addr = str(node.listen_addrs[0])
    try:
        await js_peer2.call("reserve", addr=relay_addr)
        circuit = f"{relay_addr}/p2p-circuit/p2p/{js_peer2.peer_id}"
        assert await js_peer.call("ping", addr=circuit, force=True) >= 0
        # the circuit through this relay (not one left by an earlier test through another)
        assert await _relayed_connection_to(js_peer, js_peer2.peer_id, via=node.peer_id)

        async def gone():
            return await _relayed_connection_to(js_peer, js_peer2.peer_id, via=node.peer_id) is None

        await _until(gone, timeout=10, what="the relayed connection to close")
        assert any("duration limit" in line for line in service.closed_circuits)
    finally:
        await _hang_up([js_peer, js_peer2], node)
        await service.stop()
        await node.stop()


async def test_our_relay_closes_a_js_circuit_at_its_data_limit(js_peer):
    """A js peer pings our node through our relay until the circuit's data limit (each way)
    is reached: the relay resets it in the middle of a ping."""
    node = await _tcp_node()
    limit = RelayLimit(duration=120, data=16 * 1024)
    service = Libp2pRelayService(node, Libp2pRelayConfig(public_limit=limit))
    service.start()
    # a target with no listener: reachable through the relay only (js would dial a direct
    # address it learnt by identify rather than keep using a limited connection)
    target = await MeshNode(MeshConfig(listen=[], transports=("tcp",))).start()
    target.circuits.dcutr.enabled = False
    try:
        reservation = await target.circuits.reserve(node.listen_addrs[0])
        result = await js_peer.call("pingMany", addr=str(reservation.circuit_addr), count=1000)
        assert result["error"] is not None and 0 < result["done"] < 1000, result
        assert any("data limit of 16384 bytes" in line for line in service.closed_circuits), (
            result,
            service.closed_circuits,
            service.bytes_relayed,
        )
        assert service.bytes_relayed <= 2 * 16 * 1024
    finally:
        await _hang_up([js_peer], node, target)
        await service.stop()
        await node.stop()
        await target.stop()


async def _quic_node(**kw) -> MeshNode:
    node = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",), **kw))
    return await node.start()


async def test_js_dials_our_node_through_a_js_relay_over_quic(js_peer2):
    """Both relay legs QUIC: our node reserves on the js relay over QUIC, a js peer dials the
    circuit over QUIC to the relay and pings and identifies our node through it."""
    # a js relay listening on QUIC only: no TCP connection to it can carry the circuit
    js_relay = JsPeer(env={"INTEROP_LISTEN": "/ip4/127.0.0.1/udp/0/quic-v1"})
    node = await _quic_node()
    node.circuits.dcutr.enabled = False  # keep the relayed path (loopback would go direct)
    try:
        reservation = await node.circuits.reserve(js_relay.addr("quic-v1"))
        assert "/quic-v1/" in str(reservation.circuit_addr)
        relay_conn = node.connection_to(reservation.relay)
        assert relay_conn is not None and relay_conn.transport == "quic"
        assert await js_peer2.call("ping", addr=str(reservation.circuit_addr)) >= 0
        conn = await _relayed_connection_to(js_peer2, str(node.peer_id))
        assert conn is not None and "/quic-v1/" in conn["remoteAddr"] and conn["limited"]
        legs = [
            c["remoteAddr"]
            for c in await js_peer2.call("connections")
            if c["remotePeer"] == js_relay.peer_id and "/p2p-circuit" not in c["remoteAddr"]
        ]
        assert legs and all("/quic-v1" in a for a in legs), legs
        assert conn["encryption"] == "/noise" and conn["multiplexer"] == "/yamux/1.0.0"
        info = await js_peer2.call("identify", peer=str(node.peer_id))
        assert info["agentVersion"].startswith("latticaray/")
    finally:
        try:
            await _hang_up([js_peer2], node)
        finally:
            js_relay.stop()
            await node.stop()


async def test_our_relay_over_quic_both_roles_with_js(js_peer2):
    """Our relay on QUIC only: a js peer reserves on it over QUIC and our node dials that js
    peer through it over QUIC; our node reserves over QUIC and the js peer reaches it.

    Runs after ``test_js_dials_our_node_through_a_js_relay_over_quic`` on purpose: there the
    js peer's QUIC client got NEW_TOKEN tokens from the js relay (quinn keeps two per server
    name, and libp2p uses one name for every peer), and it offers them to our relay. Our QUIC
    endpoint takes a token it cannot validate as no token (RFC 9000 8.1.3); it used to drop
    the Initial, so the js peer's next two QUIC dials to any of our nodes timed out."""
    relay = await _quic_node()
    service = Libp2pRelayService(relay)
    service.start()
    ours = await _quic_node()
    ours.circuits.dcutr.enabled = False
    relay_addr = str(relay.listen_addrs[0])
    assert relay.quic is not None
    try:
        addrs = await js_peer2.call("reserve", addr=relay_addr)
        assert relay.quic.stats["retry_token_invalid"] >= 1, relay.quic.stats  # a foreign token
        assert any(str(relay.peer_id) in a and "/quic-v1/" in a for a in addrs), addrs
        peer = await ours.connect(f"{relay_addr}/p2p-circuit/p2p/{js_peer2.peer_id}", timeout=15)
        conn = ours.connection_to(peer)
        assert conn is not None and conn.transport == "relay"
        assert await ours.ping(peer) >= 0
        reservation = await ours.circuits.reserve(relay_addr)
        await _hang_up([js_peer2], ours)
        assert await js_peer2.call("ping", addr=str(reservation.circuit_addr)) >= 0
        seen = await _relayed_connection_to(js_peer2, str(ours.peer_id))
        assert seen is not None and "/quic-v1/" in seen["remoteAddr"]
        assert service.bytes_relayed > 0
    finally:
        await _hang_up([js_peer2], relay, ours)
        await service.stop()
        await ours.stop()
        await relay.stop()
