"""TCP + Noise + yamux with js-libp2p, both directions; identify and ping both ways."""

from __future__ import annotations

import asyncio
import time

from latticaray.mesh.libp2p.identify import IDENTIFY_PROTOCOL, IDENTIFY_PUSH_PROTOCOL
from latticaray.mesh.libp2p.ping import PING_PROTOCOL, PingService


async def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def test_we_dial_js_and_identify_it(host, js_peer):
    conn = await host.dial(js_peer.addr("tcp"))
    assert conn.remote_peer_text == js_peer.peer_id
    info = await host.identified(conn)
    assert info.key() is not None and info.key().peer_id_text() == js_peer.peer_id
    assert IDENTIFY_PROTOCOL in info.protocols and PING_PROTOCOL in info.protocols
    assert "/ipfs/kad/1.0.0" in info.protocols
    assert info.agent_version.startswith("js-libp2p") or "libp2p" in info.agent_version
    # js signs a peer record of its listen addresses; it verified on our side
    assert host.identify.peers[conn.remote_peer_id].record is not None
    conns = await js_peer.call("connections")
    mine = [c for c in conns if c["remotePeer"] == host.peer_id_text]
    assert mine and mine[0]["encryption"] == "/noise" and mine[0]["multiplexer"] == "/yamux/1.0.0"
    assert mine[0]["direction"] == "inbound"


async def test_js_dials_us_and_identifies_us(host, js_peer):
    addr = host.listen_multiaddrs()[0]
    result = await js_peer.call("dial", addr=addr)
    assert result["remotePeer"] == host.peer_id_text
    await _wait_for(lambda: host.connection_to(_peer_bytes(js_peer)) is not None)
    ident = await js_peer.call("identify", peer=host.peer_id_text)
    assert ident["peerId"] == host.peer_id_text
    assert IDENTIFY_PROTOCOL in ident["protocols"] and PING_PROTOCOL in ident["protocols"]
    assert IDENTIFY_PUSH_PROTOCOL in ident["protocols"]
    assert ident["agentVersion"].startswith("latticaray/")
    assert addr.split("/p2p/")[0] in ident["listenAddrs"]
    # our signed peer record verified in js and lists the same address
    assert ident["signedPeerRecord"] is not None
    assert addr.split("/p2p/")[0] in ident["signedPeerRecord"]["addresses"]
    conns = await js_peer.call("connections")
    mine = [c for c in conns if c["remotePeer"] == host.peer_id_text]
    assert mine[0]["direction"] == "outbound" and mine[0]["encryption"] == "/noise"


def _peer_bytes(js_peer):
    from latticaray.mesh.libp2p.keys import peer_id_from_text

    return peer_id_from_text(js_peer.peer_id)


async def test_we_ping_js(host, js_peer):
    conn = await host.dial(js_peer.addr("tcp"))
    rtts = await PingService.ping(conn, count=3)
    assert len(rtts) == 3 and all(0 < r < 5 for r in rtts)


async def test_js_pings_us(host, js_peer):
    rtt = await js_peer.call("ping", addr=host.listen_multiaddrs()[0])
    assert 0 <= rtt < 5000


async def test_identify_push_reaches_js(host, js_peer):
    conn = await host.dial(js_peer.addr("tcp"))
    await host.identified(conn)

    async def handler(stream):
        await stream.close()

    host.router.add("/latticaray/interop-test/1", handler)
    await host.identify.push(conn)

    async def has_protocol():
        store = await js_peer.call("peerStore", peer=host.peer_id_text)
        return "/latticaray/interop-test/1" in store["protocols"]

    deadline = time.monotonic() + 10
    while not await has_protocol():
        assert time.monotonic() < deadline, "js never saw the pushed protocol"
        await asyncio.sleep(0.05)
