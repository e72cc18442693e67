"""MeshNatService on loopback (no root needed): relayed MeshNode RPC, upgrade to direct, rendezvous."""

import asyncio

import pytest

from latticaray.mesh.identity import PeerId
from latticaray.mesh.nat import rendezvous_client, wire
from latticaray.mesh.nat.addresses import AddressPolicy
from latticaray.mesh.nat.config import NatConfig
from latticaray.mesh.nat.control import MAGIC
from latticaray.mesh.nat.errors import RendezvousRefused
from latticaray.mesh.nat.mesh_service import MeshNatService
from latticaray.mesh.node import MeshConfig, MeshNode

from .loopback import echo, wait_for

LOOPBACK = AddressPolicy(allow_loopback=True)


async def make(serve=False, punching=False, capture=False, autonat=False):
    node = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",)))
    await node.start()
    nat = MeshNatService(
        node,
        NatConfig(
            listen_host="127.0.0.1",
            policy=LOOPBACK,
            serve_relay=serve,
            serve_rendezvous=serve,
            relay_capture=capture,
            hole_punching=punching,
            serve_autonat=autonat,
        ),
    )
    await nat.start()
    node.register_unary("/test/echo/1", echo)
    return node, nat


@pytest.fixture
async def trio(request):
    punching = getattr(request, "param", False)
    made = []
    try:
        for serve in (True, False, False):
            made.append(await make(serve=serve, punching=punching, capture=serve))
        relay_node, relay_nat = made[0]
        for _, nat in made[1:]:
            await nat.reserve_relay(relay_node.peer_id, "127.0.0.1", relay_nat.relay_server.port)
        yield made
    finally:
        for node, nat in reversed(made):
            await nat.stop()
            await node.stop()


async def test_mesh_node_call_over_circuit_address(trio):
    (_relay, relay_nat), (a, _a_nat), (b, b_nat) = trio
    secret = b"loopback-secret-" * 16
    a.add_addrs(b.peer_id, [b_nat.circuit_address()])
    assert await a.call(b.peer_id, "/test/echo/1", secret, timeout=10) == secret + b"|relay"
    assert a.connection_to(b.peer_id).transport == "relay"
    # the target sees the caller authenticated end to end and can call back on the same connection
    await wait_for(lambda: b.connection_to(a.peer_id) is not None)
    assert await b.call(a.peer_id, "/test/echo/1", b"back", timeout=10) == b"back|relay"
    assert secret[:16] not in bytes(relay_nat.relay_server.captured)


@pytest.mark.parametrize("trio", [True], indirect=True)
async def test_mesh_node_upgrades_relayed_connection_to_direct(trio):
    (_relay, _), (a, a_nat), (b, b_nat) = trio
    a.add_addrs(b.peer_id, [b_nat.circuit_address()])
    assert await a.call(b.peer_id, "/test/echo/1", b"x", timeout=10) == b"x|relay"
    await wait_for(
        lambda: (
            b.peer_id in a_nat.links
            and a_nat.links[b.peer_id].upgrade_task is not None
            and a_nat.links[b.peer_id].upgrade_task.done()
        )
    )
    await wait_for(lambda: all(c.transport == "quic" for c in a.connections.connections(b.peer_id)))
    assert await a.call(b.peer_id, "/test/echo/1", b"y", timeout=10) == b"y|quic"
    assert a_nat.links[b.peer_id].metrics.upgraded_at is not None


async def test_rendezvous_register_and_discover_then_connect(trio):
    (relay, _), (a, _a_nat), (b, b_nat) = trio
    a.add_addrs(relay.peer_id, relay.listen_addrs)
    b.add_addrs(relay.peer_id, relay.listen_addrs)
    ttl = await rendezvous_client.register(
        b.call, relay.peer_id, "lab", [b_nat.circuit_address()], ttl=60
    )
    assert 0 < ttl <= 60
    found, cookie = await rendezvous_client.discover(a.call, relay.peer_id, "lab")
    assert [p.peer for p in found] == [str(b.peer_id)]
    assert (await rendezvous_client.discover(a.call, relay.peer_id, "lab", cookie=cookie))[0] == []
    peer = PeerId.from_string(found[0].peer)
    a.add_addrs(peer, list(found[0].addrs))
    assert await a.call(peer, "/test/echo/1", b"found", timeout=10) == b"found|relay"
    with pytest.raises(RendezvousRefused, match="ttl"):
        await rendezvous_client.register(
            b.call, relay.peer_id, "lab", ["/ip4/1.2.3.4/tcp/1"], ttl=1
        )
    await rendezvous_client.unregister(b.call, relay.peer_id, "lab")
    assert (await rendezvous_client.discover(a.call, relay.peer_id, "lab"))[0] == []


async def test_reservation_is_renewed_after_the_relay_restarts(trio):
    (_relay, relay_nat), (a, _a_nat), (b, b_nat) = trio
    server = relay_nat.relay_server
    port = server.port
    await server.stop()
    await wait_for(lambda: all(r.closed.is_set() for r in b_nat.relay_client.reservations.values()))
    assert b_nat.circuit_addresses() == []
    server.port = port  # the relay comes back on the same address
    await server.start()
    await wait_for(lambda: len(b_nat.circuit_addresses()) == 1, timeout=15)
    a.add_addrs(b.peer_id, [b_nat.circuit_address()])
    assert await a.call(b.peer_id, "/test/echo/1", b"again", timeout=10) == b"again|relay"


async def test_alternate_observer_port_answers_observations_only():
    server_node, server = await make(autonat=True)
    client_node, client = await make()
    try:
        alt_port = server.control.alt_observer_port
        assert alt_port not in (0, server.reachability.local_endpoint[1])
        main = server.reachability.local_endpoint
        mapped = await client.reachability.observe(main)
        assert client.reachability.alternate_observers() == {main: (main[0], alt_port)}
        assert await client.reachability.observe((main[0], alt_port), alternate=True) == mapped
        assert list(client.reachability.mapped) == [
            main
        ]  # the alternate mapping is never advertised
        assert client.reachability.detector.report(asyncio.get_running_loop().time()).observers == 2
        rejected = server.stats.get("control_rejected", 0)
        # anything but obs_req on the alternate port is dropped (it must not act as AutoNAT)
        client.transport.send_raw((main[0], alt_port), MAGIC + wire.encode("dial", id=1))
        await wait_for(lambda: server.stats.get("control_rejected", 0) == rejected + 1)
    finally:
        for node, nat in ((client_node, client), (server_node, server)):
            await nat.stop()
            await node.stop()


async def test_upgrade_drains_the_relay_calls_in_flight_finish_there():
    """A call open on the relayed connection when the direct path comes up completes over the
    relay; new calls go direct; the relayed connection closes once it is idle."""
    made = []
    try:
        for serve, punching in ((True, False), (False, False), (False, True)):
            made.append(await make(serve=serve, punching=punching))
        (relay, relay_nat), (a, a_nat), (b, b_nat) = made
        for _, nat in made[1:]:
            await nat.reserve_relay(relay.peer_id, "127.0.0.1", relay_nat.relay_server.port)
        started, release = asyncio.Event(), asyncio.Event()

        async def held(ctx, payload):
            started.set()
            await asyncio.wait_for(release.wait(), 20)
            return b"held|" + ctx.transport.encode()

        b.register_unary("/test/held/1", held)
        a.add_addrs(b.peer_id, [b_nat.circuit_address()])
        in_flight = asyncio.ensure_future(a.call(b.peer_id, "/test/held/1", b"", timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        assert a.connection_to(b.peer_id).transport == "relay"
        upgrade = a_nat.upgrade(b.peer_id)  # a's automatic punching is off
        assert upgrade is not None and await asyncio.wait_for(upgrade, 20) is True
        assert await a.call(b.peer_id, "/test/echo/1", b"new", timeout=10) == b"new|quic"

        def relayed():
            return [c for c in a.connections.connections(b.peer_id) if c.relayed and not c.closed]

        await wait_for(lambda: a_nat.drains and "active_at_start" in a_nat.drains[-1])
        assert relayed() and not in_flight.done()  # still open: the held call is on it
        assert a_nat.drains[-1]["active_at_start"] >= 1
        release.set()
        assert await asyncio.wait_for(in_flight, 10) == b"held|relay"
        await wait_for(lambda: not relayed())
        assert a_nat.drains[-1]["outcome"] == "drained", a_nat.drains
        assert a_nat.drains[-1]["active_at_close"] == 0
    finally:
        for node, nat in reversed(made):
            await nat.stop()
            await node.stop()
