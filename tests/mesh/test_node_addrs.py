"""Advertised addresses, undialable addresses and the choice of a peer's primary connection."""

import asyncio

import pytest
from test_rpc_support import memory_pipe

from latticaray.mesh.adapters import RawConnection, TransportAdapter
from latticaray.mesh.connmgr import ConnectionManager
from latticaray.mesh.errors import MultiaddrError, PeerIdMismatch, PeerUnreachable
from latticaray.mesh.identify import IDENTIFY_PROTOCOL, IdentifyInfo
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.mesh.paths import is_dialable_addr, path_rank
from latticaray.mesh.peerstore import PeerStore
from latticaray.mesh.rpc import RpcRouter

QUIC_ONLY = {"listen": ["/ip4/127.0.0.1/udp/0/quic-v1"], "transports": ("quic",)}
ME = KeyPair.generate().peer_id
RELAY = KeyPair.generate().peer_id
OTHER = KeyPair.generate().peer_id


@pytest.mark.parametrize(
    "text, dialable",
    [
        ("/ip4/127.0.0.1/udp/4001/quic-v1", True),
        ("/ip4/0.0.0.0/udp/4001/quic-v1", False),
        ("/ip6/::/tcp/4001", False),
        ("/ip4/127.0.0.1/tcp/0", False),
        (f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit", True),
        (f"/ip4/0.0.0.0/tcp/4002/p2p/{RELAY}/p2p-circuit", False),
    ],
)
def test_is_dialable_addr(text, dialable):
    assert is_dialable_addr(Multiaddr.parse(text)) is dialable


def test_peer_store_drops_unspecified_addresses_and_normalises_circuits():
    store = PeerStore()
    store.add(
        ME,
        [
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip6/::/udp/4001/quic-v1",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
    )
    assert store.get(ME) == [] and ME not in store.peers()
    circuit = f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit"
    store.add(ME, [f"{circuit}/p2p/{ME}", "/ip4/127.0.0.1/udp/4001/quic-v1", circuit])
    assert store.get(ME) == [
        Multiaddr.parse(circuit),
        Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1"),
    ]
    # a circuit address that reaches someone else is not an address of ME; what was known stays
    with pytest.raises(PeerIdMismatch):
        store.add(ME, [f"{circuit}/p2p/{OTHER}"])
    assert len(store.get(ME)) == 2
    store.remove(ME, f"{circuit}/p2p/{ME}")
    assert store.get(ME) == [Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1")]


def test_path_rank_puts_relayed_connections_last():
    assert (
        path_rank("unix")
        < path_rank("tcp")
        < path_rank("quic")
        < path_rank("webrtc")
        < path_rank("relay")
    )


async def test_advertised_addrs_add_and_remove():
    node = MeshNode(MeshConfig(**QUIC_ONLY))
    await node.start()
    try:
        changes = []
        node.on_addrs_changed(lambda: changes.append(list(node.advertised_addrs)))
        assert node.advertised_addrs == node.listen_addrs
        circuit = f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit/p2p/{node.peer_id}"
        node.add_advertised_addrs([circuit, circuit])
        assert node.advertised_addrs == [Multiaddr.parse(circuit)] + node.listen_addrs
        node.add_advertised_addrs([circuit])  # no change, no event
        assert len(changes) == 1
        with pytest.raises(MultiaddrError, match="unspecified"):
            node.add_advertised_addrs(["/ip4/0.0.0.0/udp/4001/quic-v1"])
        with pytest.raises(PeerIdMismatch):
            node.add_advertised_addrs(
                [f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit/p2p/{OTHER}"]
            )
        node.remove_advertised_addrs([circuit])
        assert node.advertised_addrs == node.listen_addrs
        assert len(changes) == 2
    finally:
        await node.stop()


@pytest.fixture
async def pair():
    a = MeshNode(MeshConfig(**QUIC_ONLY))
    b = MeshNode(MeshConfig(**QUIC_ONLY))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_identify_never_advertises_nor_stores_unspecified_addresses(pair):
    a, b = pair
    circuit = f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit/p2p/{b.peer_id}"
    b.add_advertised_addrs([circuit])
    await a.connect(b.listen_addrs[0])
    info = await a.identify(b.peer_id)
    assert Multiaddr.parse(circuit).without_peer() in info.listen_addrs
    assert all(is_dialable_addr(x) for x in info.listen_addrs)
    assert Multiaddr.parse(circuit).without_peer() in a.addrs_of(b.peer_id)

    # a peer (an older or a hostile one) that does advertise wildcards: they are dropped
    async def sloppy_identify(ctx, payload):
        return IdentifyInfo(
            peer_id=b.peer_id,
            listen_addrs=[
                Multiaddr.parse("/ip4/0.0.0.0/udp/4001/quic-v1"),
                Multiaddr.parse("/ip6/::/udp/4001/quic-v1"),
                b.listen_addrs[0].without_peer(),
            ],
        ).encode()

    b.unregister(IDENTIFY_PROTOCOL)
    b.register_unary(IDENTIFY_PROTOCOL, sloppy_identify)
    info = await a.identify(b.peer_id)
    assert info.listen_addrs == [b.listen_addrs[0].without_peer()]
    assert all(is_dialable_addr(x) for x in a.addrs_of(b.peer_id))


async def test_unspecified_addresses_are_never_dialed(pair):
    a, b = pair
    port = b.listen_addrs[0].port
    a.add_addrs(b.peer_id, [f"/ip4/0.0.0.0/udp/{port}/quic-v1"])
    with pytest.raises(PeerUnreachable, match="no dialable address"):
        await a.call(b.peer_id, "/latticaray/ping/1", b"x" * 32, timeout=5)
    with pytest.raises(PeerUnreachable, match="not dialable"):
        await a.connect(f"/ip4/0.0.0.0/udp/{port}/quic-v1/p2p/{b.peer_id}")
    assert a.connections.connections(b.peer_id) == []


async def test_dial_addr_force_new_dials_even_when_connected(pair):
    a, b = pair
    first = await a.connections.dial_addr(b.listen_addrs[0])
    again = await a.connections.dial_addr(b.listen_addrs[0])
    assert again is first
    fresh = await a.connections.dial_addr(b.listen_addrs[0], force_new=True)
    assert fresh is not first and fresh.transport == "quic"
    assert len(a.connections.connections(b.peer_id)) == 2
    with pytest.raises(PeerUnreachable, match="ourselves"):
        await a.connections.dial_addr(a.listen_addrs[0], force_new=True)


class _NoDial(TransportAdapter):
    name = "circuit"

    async def dial(self, addr, expected_peer, timeout):
        raise PeerUnreachable("test adapter does not dial")

    async def close(self):
        return None


def _raw(channel, peer, transport, outbound):
    return RawConnection(
        peer_id=peer,
        channel=channel,
        transport=transport,
        remote_addr=None,
        outbound=outbound,
        close=lambda _reason: channel.close(),
    )


@pytest.mark.parametrize("relayed_dialer_is_smaller", [True, False])
async def test_primary_prefers_a_direct_connection_over_a_relayed_one(relayed_dialer_is_smaller):
    left, right = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    local, remote = (left, right) if left < right else (right, left)
    manager = ConnectionManager(local, RpcRouter())
    manager.register_transport(_NoDial())
    assert manager.transport_preference[-1] == "circuit" and "circuit" in manager.adapters
    relay_end, relay_far = memory_pipe()
    direct_end, direct_far = memory_pipe()
    try:
        # the relayed connection comes first and is dialed by whoever would win a tie
        relayed = manager.add_connection(
            _raw(relay_end, remote, "relay", outbound=relayed_dialer_is_smaller)
        )
        assert relayed.relayed and manager.primary(remote) is relayed
        direct = manager.add_connection(
            _raw(direct_end, remote, "quic", outbound=not relayed_dialer_is_smaller)
        )
        assert not direct.relayed
        assert manager.primary(remote) is direct
        # the relay stays a working fallback until the direct path dies
        direct.close("direct path lost")
        await asyncio.wait_for(direct.session.wait_closed(), 5)
        assert manager.primary(remote) is relayed
    finally:
        await manager.close()
        for channel in (relay_far, direct_far):
            channel.close()


async def test_add_connection_refuses_ourselves():
    me = KeyPair.generate().peer_id
    manager = ConnectionManager(me, RpcRouter())
    end, far = memory_pipe()
    with pytest.raises(PeerUnreachable, match="ourselves"):
        manager.add_connection(_raw(end, me, "quic", outbound=True))
    far.close()
    await manager.close()


def test_dial_schedule_races_the_relay_only_without_a_public_direct_address():
    from latticaray.mesh.paths import dial_schedule

    lan = Multiaddr.parse("/ip4/198.19.1.10/udp/4001/quic-v1")
    lan2 = Multiaddr.parse("/ip4/10.1.2.3/tcp/4001")
    local = Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1")
    circuit = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4002/p2p/{RELAY}/p2p-circuit")
    assert dial_schedule([circuit, lan, lan2]) == ([lan, circuit, lan2], {0})
    assert dial_schedule([lan, local, circuit]) == ([lan, local, circuit], set())
    assert dial_schedule([lan, lan2]) == ([lan, lan2], set())
    assert dial_schedule([circuit]) == ([circuit], set())


class _HangingDirect(TransportAdapter):
    """A direct transport whose dials never complete (and send nothing anywhere)."""

    name = "quic"

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def dial(self, addr, expected_peer, timeout):
        try:
            await asyncio.sleep(3600)
        finally:
            self.cancelled.set()

    async def close(self):
        return None


class _PipeCircuit(TransportAdapter):
    """A circuit transport that 'connects' over an in-memory pipe."""

    name = "circuit"

    def __init__(self, remote):
        self.remote = remote
        self.far_ends = []

    async def dial(self, addr, expected_peer, timeout):
        end, far = memory_pipe()
        self.far_ends.append(far)
        return _raw(end, self.remote, "relay", outbound=True)

    async def close(self):
        for far in self.far_ends:
            far.close()


async def test_private_only_peer_is_reached_through_the_relay_without_waiting():
    me, remote = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    manager = ConnectionManager(
        me, RpcRouter(), transport_preference=("quic",), happy_eyeballs_delay=30.0
    )
    direct = _HangingDirect()
    manager.add_adapter(direct)
    manager.register_transport(_PipeCircuit(remote))
    manager.peerstore.add(
        remote,
        ["/ip4/198.19.1.10/udp/4001/quic-v1", f"/ip4/198.18.0.11/tcp/4002/p2p/{RELAY}/p2p-circuit"],
    )
    try:
        # without the race this would wait the 30 s happy-eyeballs delay (and time out here)
        conn = await asyncio.wait_for(manager.get(remote, timeout=60), 10)
        assert conn.transport == "relay"
        await asyncio.wait_for(direct.cancelled.wait(), 5)  # the direct attempt is abandoned
    finally:
        await manager.close()
