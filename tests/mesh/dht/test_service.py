"""DhtService over real MeshNodes on loopback QUIC: bootstrap, put/get with subkeys, providers,
find_peer, and refusal of malformed or forged input from an authenticated peer."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from latticaray.mesh.dht import DhtConfig, DhtService, Record, RecordRejected
from latticaray.mesh.dht.messages import PROTOCOL_ID, decode_response, encode
from latticaray.mesh.dht.service import ServeLimits
from latticaray.mesh.node import MeshConfig, MeshNode

QUIC_ONLY = {"listen": ["/ip4/127.0.0.1/udp/0/quic-v1"], "transports": ("quic",)}
N = 8


@pytest.fixture
async def mesh():
    nodes: list[MeshNode] = []
    dhts: list[DhtService] = []
    config = DhtConfig(k=4, request_timeout=5.0)
    try:
        for _ in range(N):
            node = await MeshNode(MeshConfig(**QUIC_ONLY)).start()
            nodes.append(node)
            dhts.append(DhtService(node, config))
        seed = [str(nodes[0].listen_addrs[0])]
        assert await dhts[0].bootstrap() == 0
        for dht in dhts[1:]:
            assert await asyncio.wait_for(dht.bootstrap(seed), 30) >= 1
        yield nodes, dhts
    finally:
        for dht in dhts:
            await dht.close()
        for node in nodes:
            await node.stop()


async def test_put_get_subkeys_and_missing(mesh):
    nodes, dhts = mesh
    exp = time.time() + 300
    stored = await dhts[1].put(b"plain", b"hello", exp)
    assert stored >= 4
    got = await dhts[6].get(b"plain")
    assert got.value == b"hello" and got.publisher == nodes[1].peer_id.to_bytes()
    # several nodes write their own subkey under one key at once: none is lost
    await asyncio.gather(
        *(
            d.put(b"capacity/cpu", b"free-%d" % i, exp, subkey=n.peer_id.to_bytes())
            for i, (n, d) in enumerate(zip(nodes, dhts))
        )
    )
    merged = await dhts[3].get(b"capacity/cpu")
    assert set(merged) == {n.peer_id.to_bytes() for n in nodes}
    assert merged[nodes[2].peer_id.to_bytes()].value == b"free-2"
    assert await dhts[5].get(b"never-written") is None
    # a newer value replaces the old one everywhere it is read
    await dhts[2].put(b"plain", b"bye", exp + 10)
    assert (await dhts[7].get(b"plain")).value == b"bye"


async def test_invalid_puts_raise_typed_errors(mesh):
    nodes, dhts = mesh
    with pytest.raises(RecordRejected) as info:
        await dhts[0].put(b"big", b"x" * (64 * 1024 + 1), time.time() + 60)
    assert info.value.reason == "oversize"
    with pytest.raises(RecordRejected) as info:
        await dhts[0].put(b"k", b"v", time.time() - 1)
    assert info.value.reason == "expired"
    with pytest.raises(RecordRejected) as info:  # another peer's capacity entry
        await dhts[0].put(
            b"capacity/gpu", b"v", time.time() + 60, subkey=nodes[1].peer_id.to_bytes()
        )
    assert info.value.reason == "unauthorized"


async def test_providers_stream_with_addresses(mesh):
    nodes, dhts = mesh
    for i in (2, 4):
        assert await dhts[i].provide(b"bafk-content") >= 1
    found = [p async for p in dhts[7].find_providers(b"bafk-content", count=5)]
    assert {p.peer_id for p in found} == {nodes[2].peer_id, nodes[4].peer_id}
    assert all(p.addrs for p in found)
    others = [p async for p in dhts[2].find_providers(b"bafk-content", count=5)]
    assert [p.peer_id for p in others] == [nodes[4].peer_id], "a node is never its own provider"
    first = None
    async for p in dhts[6].find_providers(b"bafk-content", count=1):
        first = p
        break
    assert first is not None and first.peer_id in (nodes[2].peer_id, nodes[4].peer_id)


async def test_find_peer_returns_dialable_addresses(mesh):
    nodes, dhts = mesh
    target = nodes[5]
    asker = nodes[7]
    if target.peer_id in asker.connected_peers():
        await asker.disconnect(target.peer_id)
    asker.connections.peerstore._addrs.pop(target.peer_id, None)
    addrs = await dhts[7].find_peer(target.peer_id)
    assert addrs and all(a.transport == "quic" for a in addrs if a.transport)
    peer = await asker.connect(addrs[0].with_peer(target.peer_id), timeout=10)
    assert peer == target.peer_id


async def test_malformed_and_forged_requests_are_refused(mesh):
    nodes, dhts = mesh
    victim = nodes[3].peer_id
    reply = decode_response(await nodes[0].call(victim, PROTOCOL_ID, b"\xc1garbage", timeout=5))
    assert reply["error"] == "bad_request"
    reply = decode_response(
        await nodes[0].call(
            victim, PROTOCOL_ID, msgpack.packb({"op": "find_node", "target": b"x"}), timeout=5
        )
    )
    assert reply["error"] == "bad_request" and "32 bytes" in reply["message"]
    good = Record.create(b"forge", b"v", time.time() + 60, nodes[1].key)
    forged = Record(b"forge", None, b"evil", good.expiration, good.publisher, good.signature)
    reply = decode_response(
        await nodes[0].call(
            victim, PROTOCOL_ID, encode({"op": "put_value", "records": [forged]}), timeout=5
        )
    )
    assert reply == {"results": ["bad_signature"]}
    assert await dhts[3].get(b"forge") is None
    # the node is still serving
    assert await dhts[0].put(b"after", b"ok", time.time() + 60) >= 1
    assert (await dhts[3].get(b"after")).value == b"ok"


async def test_bootstrap_keeps_only_peers_that_speak_the_dht():
    plain = await MeshNode(MeshConfig(**QUIC_ONLY)).start()  # a mesh peer without a DHT service
    server = await MeshNode(MeshConfig(**QUIC_ONLY)).start()
    joiner = await MeshNode(MeshConfig(**QUIC_ONLY)).start()
    server_dht = DhtService(server, DhtConfig(k=4))
    joiner_dht = DhtService(joiner, DhtConfig(k=4))
    try:
        await joiner.connect(plain.listen_addrs[0], timeout=10)
        await joiner.connect(server.listen_addrs[0], timeout=10)
        assert await joiner_dht.bootstrap() == 1
        assert server.peer_id.to_bytes() in joiner_dht.core.routing
        assert plain.peer_id.to_bytes() not in joiner_dht.core.routing
        assert joiner.peer_id.to_bytes() in server_dht.core.routing, "the joiner announced itself"
    finally:
        await joiner_dht.close()
        await server_dht.close()
        for node in (joiner, server, plain):
            await node.stop()


async def test_maintenance_republishes_to_nodes_that_joined_later():
    from latticaray.mesh.dht.keyspace import dht_id, record_id

    config = DhtConfig(k=3, republish_interval=0.5, request_timeout=5.0)
    nodes, dhts = [], []
    try:
        for _ in range(10):
            node = await MeshNode(MeshConfig(**QUIC_ONLY)).start()
            nodes.append(node)
            dhts.append(DhtService(node, config, maintenance_interval=0.2))
        ids = [dht_id(n.peer_id.to_bytes()) for n in nodes]

        def closest(key: bytes) -> list[int]:
            return sorted(range(10), key=lambda i: ids[i] ^ record_id(key))[:3]

        # a key whose 3 closest nodes include late joiners (nodes 4..9)
        key = next(b"kept-%d" % i for i in range(1000) if max(closest(b"kept-%d" % i)) >= 4)
        seed = [str(nodes[0].listen_addrs[0])]
        await dhts[0].bootstrap([])
        for dht in dhts[1:4]:
            await dht.bootstrap(seed)
        assert await dhts[1].put(key, b"v", time.time() + 120) >= 3
        late = [i for i in closest(key) if i >= 4]
        assert not any(dhts[i].core.records.get(key, time.time()) for i in late)
        for dht in dhts[4:]:
            await dht.bootstrap(seed)

        def held() -> bool:
            return all(dhts[i].core.records.get(key, time.time()) for i in closest(key))

        deadline = time.monotonic() + 30
        while not held():
            assert time.monotonic() < deadline, "republishing never reached the new closest nodes"
            await asyncio.sleep(0.1)
    finally:
        for dht in dhts:
            await dht.close()
        for node in nodes:
            await node.stop()


async def test_find_peer_returns_addresses_the_peer_advertises_later(mesh):
    """A relay circuit address added after start (as MeshNatService does) reaches the DHT contact that
    other nodes store and return."""
    from latticaray.mesh.identity import KeyPair
    from latticaray.mesh.multiaddr import Multiaddr

    nodes, dhts = mesh
    target, asker = nodes[6], nodes[1]
    relay = KeyPair.generate().peer_id
    circuit = Multiaddr.parse(
        f"/ip4/127.0.0.1/tcp/4002/p2p/{relay}/p2p-circuit/p2p/{target.peer_id}"
    )
    target.add_advertised_addrs([circuit])
    assert dhts[6].core.addrs[0] == str(circuit)
    # the contact travels with every request: a lookup from the target refreshes it everywhere
    await dhts[6].bootstrap(refresh=False)
    if target.peer_id in asker.connected_peers():
        await asker.disconnect(target.peer_id)
    asker.connections.peerstore._addrs.pop(target.peer_id, None)
    dhts[1].core.routing.remove(target.peer_id.to_bytes())
    addrs = await dhts[1].find_peer(target.peer_id)
    assert circuit in addrs
    assert circuit.without_peer() in asker.addrs_of(target.peer_id)


async def test_dht_requests_are_served_by_an_eager_handler(mesh):
    nodes, _dhts = mesh
    _kind, _handler, eager = nodes[0].router.lookup(PROTOCOL_ID)
    assert eager is True
    # many requests at once all get answers from the inline handler
    replies = await asyncio.gather(
        *(
            nodes[2].call(nodes[0].peer_id, PROTOCOL_ID, encode({"op": "ping"}), timeout=10)
            for _ in range(200)
        )
    )
    assert all("error" not in decode_response(r) for r in replies)


async def test_public_serving_is_rate_limited_per_peer_and_private_serving_refuses_the_public():
    """A peer that is not exempt (not a member) gets ``rate_limited`` past its burst, while an
    exempt one is served without limit; a node that does not serve the public refuses the
    request unread."""
    nodes = [await MeshNode(MeshConfig(**QUIC_ONLY)).start() for _ in range(4)]
    member = nodes[1].peer_id
    server = DhtService(
        nodes[0],
        limits=ServeLimits(per_peer_rate=0.001, per_peer_burst=5, per_ip_rate=1000.0),
        exempt=lambda peer: peer == member,
    )
    private = DhtService(nodes[3], limits=ServeLimits(public=False), exempt=lambda peer: False)
    ping = encode({"op": "ping"})
    try:
        for asker in (nodes[1], nodes[2]):
            await asker.connect(str(nodes[0].listen_addrs[0]), timeout=10)
        await nodes[2].connect(str(nodes[3].listen_addrs[0]), timeout=10)
        replies = [
            decode_response(await nodes[2].call(nodes[0].peer_id, PROTOCOL_ID, ping, timeout=5))
            for _ in range(8)
        ]
        assert ["error" not in r for r in replies] == [True] * 5 + [False] * 3
        assert replies[-1]["error"] == "rate_limited"
        for _ in range(20):  # a member is not limited
            reply = await nodes[1].call(nodes[0].peer_id, PROTOCOL_ID, ping, timeout=5)
            assert "error" not in decode_response(reply)
        assert server.core.stats["rate_limited"] == 3
        reply = decode_response(
            await nodes[2].call(nodes[3].peer_id, PROTOCOL_ID, b"\xc1not even read", timeout=5)
        )
        assert reply["error"] == "refused" and "members only" in reply["message"]
    finally:
        await server.close()
        await private.close()
        for node in nodes:
            await node.stop()
