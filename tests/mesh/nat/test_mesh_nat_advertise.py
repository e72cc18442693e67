"""A private node's relay circuit address reaches other peers through identify and the DHT, and
they dial it (loopback, no root needed)."""

import pytest

from latticaray.mesh.dht import DhtConfig, DhtService
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.nat.addresses import AddressPolicy
from latticaray.mesh.nat.config import NatConfig
from latticaray.mesh.nat.mesh_service import MeshNatService
from latticaray.mesh.node import MeshConfig, MeshNode

from .loopback import echo, wait_for

LOOPBACK = AddressPolicy(allow_loopback=True)


@pytest.fixture
async def mesh():
    """relay (serves relay + DHT), private (reserved on the relay), seeker; all with a DHT."""
    made = []
    try:
        for serve in (True, False, False):
            node = MeshNode(
                MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",))
            )
            await node.start()
            nat = MeshNatService(
                node,
                NatConfig(
                    listen_host="127.0.0.1", policy=LOOPBACK, serve_relay=serve, hole_punching=False
                ),
            )
            await nat.start()
            node.register_unary("/test/echo/1", echo)
            dht = DhtService(node, DhtConfig(k=4, request_timeout=5.0))
            made.append((node, nat, dht))
        yield made
    finally:
        for node, nat, dht in reversed(made):
            await dht.close()
            await nat.stop()
            await node.stop()


def circuit_of(nat, node):
    return Multiaddr.parse(nat.circuit_address())


async def test_circuit_address_is_advertised_while_the_reservation_lives(mesh):
    (relay, relay_nat, _), (private, private_nat, private_dht), _ = mesh
    await private_nat.reserve_relay(relay.peer_id, "127.0.0.1", relay_nat.relay_server.port)
    circuit = circuit_of(private_nat, private)
    assert private.advertised_addrs[0] == circuit
    assert str(circuit) in private_dht.core.addrs
    await relay_nat.relay_server.stop()
    await wait_for(
        lambda: circuit not in private.advertised_addrs, what="circuit address withdrawn"
    )
    assert str(circuit) not in private_dht.core.addrs


async def test_peer_learns_circuit_address_by_identify_and_dials_it(mesh):
    (relay, relay_nat, _), (private, private_nat, _), (seeker, _, _) = mesh
    await private_nat.reserve_relay(relay.peer_id, "127.0.0.1", relay_nat.relay_server.port)
    circuit = circuit_of(private_nat, private)
    await seeker.connect(private.listen_addrs[0])
    await seeker.identify(private.peer_id)
    assert circuit.without_peer() in seeker.addrs_of(private.peer_id)
    # the direct path goes away (as behind a NAT): the next call reaches it through the relay
    await seeker.disconnect(private.peer_id)
    for addr in seeker.addrs_of(private.peer_id):
        if addr.transport != "circuit":
            seeker.connections.peerstore.remove(private.peer_id, addr)
    assert await seeker.call(private.peer_id, "/test/echo/1", b"hi", timeout=10) == b"hi|relay"


async def test_dht_find_peer_returns_the_circuit_address_of_a_private_peer(mesh):
    (relay, relay_nat, relay_dht), (private, private_nat, private_dht), (seeker, _, seeker_dht) = (
        mesh
    )
    await private_nat.reserve_relay(relay.peer_id, "127.0.0.1", relay_nat.relay_server.port)
    circuit = circuit_of(private_nat, private)
    relay_addr = str(relay.listen_addrs[0])
    await private_dht.bootstrap([relay_addr])
    # the relay's routing table holds the private peer's contact, circuit address included
    contact = relay_dht.core.routing.get(private.peer_id.to_bytes())
    assert contact is not None and str(circuit) in contact.addrs
    await seeker_dht.bootstrap([relay_addr])
    # forget whatever the bootstrap taught the seeker, so find_peer must ask the DHT
    await seeker.disconnect(private.peer_id)
    for addr in seeker.addrs_of(private.peer_id):
        seeker.connections.peerstore.remove(private.peer_id, addr)
    seeker_dht.core.routing.remove(private.peer_id.to_bytes())
    assert seeker.addrs_of(private.peer_id) == []
    found = await seeker_dht.find_peer(private.peer_id)
    assert circuit in found
    conn = await seeker.connections.dial_addr(circuit, timeout=10, force_new=True)
    assert conn.transport == "relay" and conn.relayed
    assert await conn.session.call("/test/echo/1", b"dht", 10) == b"dht|relay"
