"""Kademlia on the latticaray node through js-libp2p's DHT: the node's DhtService serves
``/ipfs/kad/1.0.0`` and asks foreign peers in kad messages, so js routes for latticaray nodes and
they for js. For each transport and each dial direction, three latticaray nodes that know only
the js peer: find_peer, provide / find_providers both ways, and a signed latticaray record with
subkeys put by two nodes and read by a third, through js (which stores it too, under
``/latticaray/<key>``)."""

from __future__ import annotations

import base64
import contextlib
import os
import time

import pytest

from latticaray.mesh.dht.messages import decode_records
from latticaray.mesh.dht.service import DhtService
from latticaray.mesh.identity import PeerId
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.objectstore.cid import Cid

from .test_node import js_addr, our_addr, wait_for


async def _nodes(js_peer, transport: str, direction: str, count: int = 2, bootstrap=True):
    """``count`` nodes (DHT servers) connected to the js peer only; with ``bootstrap`` they
    join the DHT through it (lookups of themselves and of every bucket), else they only know
    js (in their routing table since its identify lists the kad protocol)."""
    made = []
    js = PeerId.from_string(js_peer.peer_id)
    for _ in range(count):
        node = MeshNode(
            MeshConfig(
                listen=["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"],
                transports=("tcp", "quic"),
                same_host_fast_path=False,
            )
        )
        await node.start()
        dht = DhtService(node)
        made.append((node, dht))
        assert node.connected_peers() == []
        if direction == "we-dial":
            await node.connect(js_addr(js_peer, transport))
        else:
            await js_peer.call("dial", addr=our_addr(node, transport))
        await wait_for(lambda n=node: js in n.identify_service.peer_info)
        assert node.connected_peers() == [js]
        if bootstrap:
            await dht.bootstrap([])
        # js is in our table (identify said it serves kad) and we are in js's
        assert dht.core.routing.get(js.to_bytes()) is not None
        await wait_for_js(js_peer, node)
    return made


async def wait_for_js(js_peer, node, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not await js_peer.call("kadTableHas", peer=str(node.peer_id)):
        assert time.monotonic() < deadline, "js never added the node to its routing table"


async def _release(js_peer, made):
    for node, dht in made:
        with contextlib.suppress(Exception):
            await js_peer.call("hangup", peer=str(node.peer_id), timeout=10)
        await dht.close()
        await node.stop()


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
