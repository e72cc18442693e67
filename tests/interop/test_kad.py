"""Kademlia (/ipfs/kad/1.0.0) between our client/server over TCP+Noise+yamux and js-libp2p's DHT."""

from __future__ import annotations

import asyncio
import base64
import os
import time

from latticaray.mesh.libp2p.host import Libp2pHost
from latticaray.mesh.libp2p.kad import (
    KadClient,
    KadMessage,
    KadPeer,
    KadRecord,
    KadServer,
    MessageType,
)
from latticaray.mesh.libp2p.keys import peer_id_from_text
from latticaray.objectstore.cid import Cid

from .jspeer import connected_host, release


async def _eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.05)


def _with_kad(h):
    h.kad = KadServer(h.router)


async def _kad_host(js_peer):
    """A host with a kad server, connected to js and in js's routing table."""
    return await connected_host(js_peer, _with_kad)


def _get_providers(cid: Cid) -> KadMessage:
    return KadMessage(MessageType.GET_PROVIDERS, _multihash(cid))


def _multihash(cid: Cid) -> bytes:
    return bytes([cid.hash_code, len(cid.digest)]) + cid.digest


async def test_find_node_through_js_returns_the_other_host(js_peer):
    a, conn_a = await _kad_host(js_peer)
    b, _ = await _kad_host(js_peer)
    try:
        client = KadClient()

        async def b_known():
            peers = await client.find_node(conn_a, b.peer_id)
            return [p for p in peers if p.peer_id == b.peer_id]

        found = await _eventually(b_known)
        addrs = {bytes(x) for x in found[0].addrs}
        assert set(b.listen_addrs()) <= addrs
        # and js finds b for itself through its routing table
        info = await js_peer.call("kadFindPeer", peer=b.peer_id_text)
        assert info["id"] == b.peer_id_text
    finally:
        await release(a, js_peer)
        await release(b, js_peer)


async def test_we_put_js_gets_and_js_puts_we_get(js_peer):
    h, conn = await _kad_host(js_peer)
    try:
        client = KadClient()
        key = b"/latticaray/put-" + os.urandom(6).hex().encode()
        await client.put_value(conn, key, b"value from python")
        got = await js_peer.call("kadGet", key=key.decode())
        assert base64.b64decode(got) == b"value from python"

        key2 = "/latticaray/js-" + os.urandom(6).hex()
        await js_peer.call("kadPut", key=key2, value=base64.b64encode(b"from js").decode())
        record, _ = await client.get_value(conn, key2.encode())
        assert record is not None and record.value == b"from js"
    finally:
        await release(h, js_peer)


async def test_js_gets_a_record_only_our_server_holds(js_peer):
    h, _ = await _kad_host(js_peer)
    try:
        kad = h.kad
        key = b"/latticaray/ours-" + os.urandom(6).hex().encode()
        kad.records[key] = KadRecord(key, b"held by python")
        await _eventually(lambda: js_peer.call("kadTableHas", peer=h.peer_id_text))
        got = await js_peer.call("kadGet", key=key.decode())
        assert base64.b64decode(got) == b"held by python"
    finally:
        await release(h, js_peer)


async def test_providers_both_ways(js_peer):
    h, conn = await _kad_host(js_peer)
    try:
        client = KadClient()
        cid = Cid.of(b"provided by python " + os.urandom(8))
        me = KadPeer(h.peer_id, tuple(h.listen_addrs()))
        await client.add_provider(conn, _multihash(cid), me)
        providers = await _eventually(
            lambda: js_peer.call("kadFindProviders", cid=str(cid), limit=1)
        )
        assert providers[0]["id"] == h.peer_id_text

        # our own GET_PROVIDERS to js finds us as the provider we announced
        found, _ = await client.get_providers(conn, _multihash(cid))
        assert [p.peer_id for p in found] == [h.peer_id]
        assert set(found[0].addrs) >= set(h.listen_addrs())

        # js announces a CID: its ADD_PROVIDER reaches our server (we are in its table)
        await _eventually(lambda: js_peer.call("kadTableHas", peer=h.peer_id_text))
        cid2 = Cid.of(b"provided by js " + os.urandom(8))
        await js_peer.call("kadProvide", cid=str(cid2))
        js_id = peer_id_from_text(js_peer.peer_id)

        async def js_provides():
            return list(h.kad.answer(js_id, _get_providers(cid2)).provider_peers)

        providers = await _eventually(js_provides)
        assert providers[0].peer_id == js_id and providers[0].addrs
    finally:
        await release(h, js_peer)


async def test_lattica_protocol_id_between_python_hosts():
    a, b = Libp2pHost(), Libp2pHost()
    server = KadServer(b.router, protocol="/lattica/1.0.0")
    await b.listen()
    try:
        conn = await a.dial(b.listen_multiaddrs()[0])
        info = await a.identified(conn)
        assert "/lattica/1.0.0" in info.protocols and "/ipfs/kad/1.0.0" not in info.protocols
        client = KadClient("/lattica/1.0.0")
        await client.put_value(conn, b"/lattica/k", b"v")
        assert server.records[b"/lattica/k"].value == b"v"
        record, _ = await client.get_value(conn, b"/lattica/k")
        assert record is not None and record.value == b"v"
    finally:
        await a.close()
        await b.close()
