"""Kademlia on the latticaray node through js-libp2p's DHT: the node's DhtService serves
``/ipfs/kad/1.0.0`` and asks foreign peers in kad messages, so js routes for latticaray nodes and
they for js. For each transport and each dial direction, three latticaray nodes that know only
the js peer: find_peer, provide / find_providers both ways, and a signed latticaray record with
subkeys put by two nodes and read by a third, through js (which stores it too, under
``/latticaray/<key>``)."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import pytest

from latticaray.mesh.dht.config import DhtConfig
from latticaray.mesh.dht.messages import decode_records
from latticaray.mesh.dht.service import DhtService
from latticaray.mesh.identity import PeerId
from latticaray.mesh.libp2p.kad import DEFAULT_KAD_PROTOCOL, LATTICA_KAD_PROTOCOL
from latticaray.objectstore.cid import Cid

from .jspeer import JsPeer
from .test_node import drop_node, node_joined_to_js


@pytest.fixture(scope="module")
def lattica_js(js_peer):
    """A js peer whose DHT speaks Lattica's protocol ID, ``/lattica/1.0.0``, only."""
    peer = JsPeer(env={"INTEROP_KAD_PROTOCOL": LATTICA_KAD_PROTOCOL})
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def client_js(js_peer):
    """A js peer whose DHT runs in client mode (it asks, serves no one, and says so)."""
    peer = JsPeer(env={"INTEROP_KAD_CLIENT": "1"})
    try:
        yield peer
    finally:
        peer.stop()


async def _nodes(
    js_peer,
    transport: str,
    direction: str,
    count: int = 2,
    bootstrap=True,
    *,
    kad_protocol: str = DEFAULT_KAD_PROTOCOL,
    server: bool = True,
    js_server: bool = True,
):
    """``count`` nodes connected to the js peer only; with ``bootstrap`` they join the DHT
    through it (lookups of themselves and of every bucket), else they only know js. A node
    (``server``) and js (``js_server``) enter each other's routing table exactly when they are
    DHT servers, which identify tells."""
    made = []
    js = PeerId.from_string(js_peer.peer_id)
    for _ in range(count):
        node, dht = await node_joined_to_js(
            js_peer,
            transport,
            direction,
            lambda n: DhtService(n, DhtConfig(server_mode=server), kad_protocol=kad_protocol),
        )
        made.append((node, dht))
        if bootstrap:
            await dht.bootstrap([])
        # js is in our table iff identify said it serves kad
        assert (dht.core.routing.get(js.to_bytes()) is not None) is js_server
        if server:
            await wait_for_js(js_peer, node)
    return made


async def wait_for_js(js_peer, node, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not await js_peer.call("kadTableHas", peer=str(node.peer_id)):
        assert time.monotonic() < deadline, "js never added the node to its routing table"
        await asyncio.sleep(0.05)


async def _release(js_peer, made):
    for node, dht in made:
        await dht.close()
        await drop_node(js_peer, node)


@pytest.mark.parametrize("direction", ["we-dial", "js-dials"])
@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_kad_through_js(js_peer, transport, direction):
    made = await _nodes(js_peer, transport, direction)
    made += await _nodes(js_peer, transport, direction, count=1, bootstrap=False)
    (a, dht_a), (b, dht_b), (c, dht_c) = made
    js = PeerId.from_string(js_peer.peer_id)
    try:
        # c knows only js: every lookup of c below is routed through js
        assert c.addrs_of(b.peer_id) == [] and len(dht_c.core.routing) == 1
        addrs = await dht_c.find_peer(b.peer_id)
        assert {str(x.without_peer()) for x in addrs} >= {
            str(x.without_peer()) for x in b.listen_addrs
        }
        info = await js_peer.call("kadFindPeer", peer=str(a.peer_id))
        assert info["id"] == str(a.peer_id) and info["addrs"]

        # provide / find_providers, both ways
        ours = Cid.of(b"provided by latticaray " + os.urandom(8))
        assert await dht_a.provide(bytes(ours)) >= 1
        providers = await js_peer.call("kadFindProviders", cid=str(ours), limit=1)
        assert providers[0]["id"] == str(a.peer_id)
        theirs = Cid.of(b"provided by js " + os.urandom(8))
        await js_peer.call("kadProvide", cid=str(theirs))
        found = [p async for p in dht_c.find_providers(bytes(theirs), count=1)]
        assert [p.peer_id for p in found] == [js] and found[0].addrs

        # a signed record with two subkeys (two publishers), read by a third node
        key = b"interop/" + os.urandom(6).hex().encode()
        expires = time.time() + 600
        assert await dht_a.put(key, b"from a", expires, subkey=b"a") >= 2
        assert await dht_b.put(key, b"from b", expires, subkey=b"b") >= 2
        got = await dht_c.get(key)
        assert {s: r.value for s, r in got.items()} == {b"a": b"from a", b"b": b"from b"}
        assert got[b"a"].publisher == a.peer_id.to_bytes()
        # js holds it under the latticaray namespace, and what it holds verifies
        value = base64.b64decode(await js_peer.call("kadGet", key="/latticaray/" + key.decode()))
        held = decode_records(value)
        assert held and all(r.key == key for r in held)
        for record in held:
            dht_c.core.validate(record, time.time())
    finally:
        await _release(js_peer, made)


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_lattica_protocol_id(lattica_js, transport):
    """Configured with ``/lattica/1.0.0`` (Lattica's rust nodes), the node advertises and speaks
    that protocol ID only, and everything routes through a js node that speaks it too."""
    made = await _nodes(lattica_js, transport, "we-dial", kad_protocol=LATTICA_KAD_PROTOCOL)
    made += await _nodes(
        lattica_js,
        transport,
        "js-dials",
        count=1,
        bootstrap=False,
        kad_protocol=LATTICA_KAD_PROTOCOL,
    )
    (a, dht_a), (b, _), (_, dht_c) = made
    try:
        seen = await lattica_js.call("identify", peer=str(a.peer_id))
        assert LATTICA_KAD_PROTOCOL in seen["protocols"]
        assert DEFAULT_KAD_PROTOCOL not in seen["protocols"]
        assert len(dht_c.core.routing) == 1
        addrs = await dht_c.find_peer(b.peer_id)  # c knows only js: routed through it
        assert {x.without_peer() for x in addrs} >= {x.without_peer() for x in b.listen_addrs}
        cid = Cid.of(b"lattica " + os.urandom(8))
        assert await dht_a.provide(bytes(cid)) >= 1
        found = [p async for p in dht_c.find_providers(bytes(cid), count=1)]
        assert [p.peer_id for p in found] == [a.peer_id]
        key = b"lattica/" + os.urandom(6).hex().encode()
        assert await dht_a.put(key, b"v", time.time() + 600) >= 1
        assert (await dht_c.get(key)).value == b"v"
    finally:
        await _release(lattica_js, made)


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_client_mode_both_ways(js_peer, client_js, transport):
    """libp2p's client/server rule by identify: a node in client mode does not advertise the
    kad protocol, so js keeps it out of its routing table, yet its lookups run through js; a
    js client is kept out of ours, yet we answer its queries."""
    made = await _nodes(js_peer, transport, "we-dial", count=1)
    made += await _nodes(js_peer, transport, "we-dial", count=1, bootstrap=False, server=False)
    (a, dht_a), (c, dht_c) = made
    try:
        seen = await js_peer.call("identify", peer=str(c.peer_id))
        assert DEFAULT_KAD_PROTOCOL not in seen["protocols"]
        assert not await js_peer.call("kadTableHas", peer=str(c.peer_id))
        cid = Cid.of(b"client mode " + os.urandom(8))
        assert await dht_a.provide(bytes(cid)) >= 1
        found = [p async for p in dht_c.find_providers(bytes(cid), count=1)]
        assert [p.peer_id for p in found] == [a.peer_id]
        # the node never entered a's table either (its requests said it is a client)
        assert dht_a.core.routing.get(c.peer_id.to_bytes()) is None
    finally:
        await _release(js_peer, made)

    made = await _nodes(client_js, transport, "js-dials", count=1, bootstrap=False, js_server=False)
    ((a, dht_a),) = made
    js = PeerId.from_string(client_js.peer_id)
    try:
        assert DEFAULT_KAD_PROTOCOL not in a.identify_service.peer_info[js].protocols
        cid = Cid.of(b"asked by a js client " + os.urandom(8))
        assert len(dht_a.core.routing) == 0
        assert await dht_a.provide(bytes(cid)) == 1  # no server known: held by a alone
        providers = await client_js.call("kadFindProviders", cid=str(cid), limit=1)
        assert providers[0]["id"] == str(a.peer_id)  # js asked a
        assert dht_a.core.routing.get(js.to_bytes()) is None
        assert dht_a.core.stats["requests_served"] >= 1
    finally:
        await _release(client_js, made)
