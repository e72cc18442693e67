"""Auto mode on loopback (no root needed): relays found through identify, two reservations on
the fastest, a dead relay replaced, circuit addresses advertised and dialed; clear errors.

On loopback nothing is behind a NAT: the relays' AutoNAT refuses to dial loopback back (default
address policy), so the verdict stays unknown and the test tells the joining node it needs relays,
as AutoNAT tells a private node; the netlab test runs the real verdicts."""

import pytest

from latticaray.mesh.nat.addresses import AddressPolicy
from latticaray.mesh.nat.config import NatConfig
from latticaray.mesh.nat.errors import NotReachable
from latticaray.mesh.nat.mesh_service import MeshNatService
from latticaray.mesh.nat.offers import AUTONAT_INFO_PROTOCOL, RELAY_HOP_PROTOCOL
from latticaray.mesh.node import MeshConfig, MeshNode

from .loopback import echo, wait_for

LOOPBACK = AddressPolicy(allow_loopback=True)


class Made:
    def __init__(self):
        self.pairs = []

    async def node(self, bootstrap=(), **nat):
        node = MeshNode(
            MeshConfig(
                listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
                transports=("quic",),
                bootstrap=[str(a) for a in bootstrap],
            )
        )
        await node.start()
        service = None
        if nat:
            service = MeshNatService(node, NatConfig(listen_host="127.0.0.1", **nat))
            await service.start()
        node.register_unary("/test/echo/1", echo)
        self.pairs.append((node, service))
        return node, service

    async def relay(self):
        return await self.node(policy=AddressPolicy(), serve_relay=True, serve_autonat=True)

    async def close(self):
        for node, service in reversed(self.pairs):
            if service is not None:
                await service.stop()
            await node.stop()


@pytest.fixture
async def made():
    m = Made()
    try:
        yield m
    finally:
        await m.close()


async def test_public_node_offers_relay_and_autonat_in_identify(made):
    relay, _ = await made.relay()
    plain, _ = await made.node()
    await plain.connect(relay.listen_addrs[0])
    info = await plain.identify(relay.peer_id)
    assert {RELAY_HOP_PROTOCOL, AUTONAT_INFO_PROTOCOL} <= set(info.protocols)
    info = await relay.identify(plain.peer_id)
    assert RELAY_HOP_PROTOCOL not in info.protocols


async def test_joining_node_finds_relays_keeps_two_and_replaces_a_dead_one(made):
    relays = [await made.relay() for _ in range(3)]
    node, nat = await made.node(
        bootstrap=[relays[0][0].listen_addrs[0]], auto=True, policy=AddressPolicy()
    )
    nat.reservations.set_needed(True)  # what AutoNAT says of a private node
    for relay, _ in relays[1:]:
        await node.connect(relay.listen_addrs[0])
    await nat.wait_reachable(10)
    await wait_for(lambda: len(nat.status()["reserved"]) == 2, what="two reservations")
    status = nat.status()
    assert len(status["relays"]) == 3 and len(status["autonat_servers"]) == 3
    held = set(status["reserved"])
    circuits = [a for a in node.advertised_addrs if a.transport == "circuit"]
    assert len(circuits) == 2

    seeker, _ = await made.node(policy=LOOPBACK, hole_punching=False)  # dials circuits
    conn = await seeker.connections.dial_addr(circuits[0], timeout=10, force_new=True)
    assert await conn.session.call("/test/echo/1", b"hi", 10) == b"hi|relay"

    dead = next(r for r in relays if str(r[0].peer_id) in held)
    await dead[1].relay_server.stop()
    spare = next(str(r[0].peer_id) for r in relays if str(r[0].peer_id) not in held)
    await wait_for(
        lambda: set(nat.status()["reserved"]) == (held - {str(dead[0].peer_id)}) | {spare},
        what="the spare relay replacing the dead one",
    )
    await wait_for(
        lambda: len([a for a in node.advertised_addrs if a.transport == "circuit"]) == 2,
        what="two circuit addresses advertised again",
    )
    assert not any(str(dead[0].peer_id) in str(a) for a in node.advertised_addrs)


async def test_a_node_that_meets_no_nat_service_says_what_it_tried(made):
    plain, _ = await made.node()
    node, nat = await made.node(bootstrap=[plain.listen_addrs[0]], auto=True)
    await wait_for(lambda: plain.peer_id in node.connected_peers(), what="bootstrap")
    with pytest.raises(NotReachable, match="offers AutoNAT") as info:
        await nat.wait_reachable(0.5)
    assert str(plain.peer_id) in str(info.value)
