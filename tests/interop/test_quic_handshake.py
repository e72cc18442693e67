"""latticaray's QUIC transport against js-libp2p's QUIC (@chainsafe/libp2p-quic, a quinn/rustls
stack): the libp2p TLS handshake with peer-ID binding both ways, with the transport's datagram
sizing (path MTU probes) and congestion control in place."""

from __future__ import annotations

import asyncio
import time

from latticaray.mesh.identity import KeyPair, PeerId
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.transport.quic import QuicTransport


def _quic_addr(js_peer) -> Multiaddr:
    addr = next(a for a in js_peer.addrs if "/quic-v1" in a)
    return Multiaddr.parse(addr if "/p2p/" in addr else f"{addr}/p2p/{js_peer.peer_id}")


async def test_we_dial_the_js_peer_over_quic_and_both_ends_know_each_other(js_peer):
    key = KeyPair.generate()
    transport = QuicTransport(key)
    await transport.listen("127.0.0.1", 0)
    try:
        conn = await transport.dial(_quic_addr(js_peer), timeout=10)
        assert conn.remote_peer == PeerId.from_string(js_peer.peer_id)
        # the js end verified our client certificate: it lists the connection under our ID
        deadline = time.monotonic() + 10
        while True:
            conns = await js_peer.call("connections")
            if any(c["remotePeer"] == str(key.peer_id) for c in conns):
                break
            assert time.monotonic() < deadline, conns
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # past the handshake: path MTU probes and acks go both ways
        assert conn.is_established and not conn.is_closed
        # quinn accepts datagrams of at most 1472 bytes (its max_udp_payload_size): our
        # loopback start (16 KiB) and path MTU probes stay within it
        assert 1200 <= conn.max_datagram_size <= 1472
    finally:
        await js_peer.call("hangup", peer=str(key.peer_id))
        await transport.close()


async def test_the_js_peer_dials_us_over_quic_and_both_ends_know_each_other(js_peer):
    key = KeyPair.generate()
    inbound = []
    transport = QuicTransport(key, on_connection=inbound.append)
    addr = await transport.listen("127.0.0.1", 0)
    try:
        reply = await js_peer.call("dial", addr=str(addr.with_peer(key.peer_id)))
        assert reply["remotePeer"] == str(key.peer_id)
        deadline = time.monotonic() + 10
        while not inbound:
            assert time.monotonic() < deadline, "no inbound QUIC connection"
            await asyncio.sleep(0.01)
        # our server asked for and verified the js client's certificate
        assert inbound[0].remote_peer == PeerId.from_string(js_peer.peer_id)
        assert inbound[0].max_datagram_size <= 1472
    finally:
        await js_peer.call("hangup", peer=str(key.peer_id))
        await transport.close()
