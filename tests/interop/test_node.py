"""The latticaray node (MeshNode) with js-libp2p: {js dials us, we dial js} x {QUIC, TCP+Noise+
yamux} x {identify, ping}. The node speaks libp2p on every stream: js opens ``/ipfs/id/1.0.0``
and ``/ipfs/ping/1.0.0`` on it like on any libp2p peer, and the node identifies and pings js with
libp2p's protocols because js answers ``na`` to ``/latticaray/rpc/1``."""

from __future__ import annotations

import asyncio
import time

import pytest

from latticaray.mesh.adapters import RPC_PROTOCOL
from latticaray.mesh.errors import RpcUnimplemented
from latticaray.mesh.identity import PeerId
from latticaray.mesh.libp2p.identify import IDENTIFY_PROTOCOL, IDENTIFY_PUSH_PROTOCOL
from latticaray.mesh.libp2p.ping import PING_PROTOCOL

TRANSPORTS = {"quic": "/quic-v1", "tcp": "/tcp/"}
JS_ENCRYPTION = {"quic": ("native", "quic"), "tcp": ("/noise", "/yamux/1.0.0")}


async def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


def our_addr(node, transport: str) -> str:
    return str(next(a for a in node.listen_addrs if TRANSPORTS[transport] in str(a)))


def js_addr(js_peer, transport: str) -> str:
    addr = next(a for a in js_peer.addrs if TRANSPORTS[transport] in a)
    return addr if "/p2p/" in addr else f"{addr}/p2p/{js_peer.peer_id}"


async def node_joined_to_js(js_peer, transport: str, direction: str, setup=None):
    """A started node (QUIC and TCP on loopback, no same-host path) connected to the js peer,
    dialed by ``direction`` ("we-dial" or "js-dials"), identified by the node; ``setup(node)``
    runs between start and connect (services registered before identify). Stop it with
    :func:`drop_node`."""
    from latticaray.mesh.node import MeshConfig, MeshNode

    node = MeshNode(
        MeshConfig(
            listen=["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"],
            transports=("tcp", "quic"),
            same_host_fast_path=False,
        )
    )
    await node.start()
    extra = setup(node) if setup is not None else None
    js = PeerId.from_string(js_peer.peer_id)
    assert node.connected_peers() == []
    if direction == "we-dial":
        await node.connect(js_addr(js_peer, transport))
    else:
        await js_peer.call("dial", addr=our_addr(node, transport))
    await wait_for(lambda: js in node.identify_service.peer_info)
    assert node.connected_peers() == [js]
    return node, extra


async def drop_node(js_peer, node) -> None:
    """js hangs up on the node (and forgets it), then the node stops."""
    try:
        await js_peer.call("hangup", peer=str(node.peer_id), timeout=10)
    finally:
        await node.stop()


async def js_dials(node, js_peer, transport: str):
    """js dials the node; returns the node's connection to js once registered."""
    result = await js_peer.call("dial", addr=our_addr(node, transport))
    assert result["remotePeer"] == str(node.peer_id)
    js = PeerId.from_string(js_peer.peer_id)
    await wait_for(lambda: node.connection_to(js) is not None)
    conn = node.connection_to(js)
    assert conn.transport == transport and not conn.outbound and conn.native is False
    return conn


async def we_dial(node, js_peer, transport: str):
    js = await node.connect(js_addr(js_peer, transport))
    assert js == PeerId.from_string(js_peer.peer_id)
    conn = node.connection_to(js)
    assert conn.transport == transport and conn.outbound
    # js answered na to /latticaray/rpc/1: a foreign peer, its connection kept
    assert await conn.wait_native() is False and not conn.closed
    return conn


async def check_js_sees(node, js_peer, transport: str, direction: str):
    conns = await js_peer.call("connections")
    mine = [c for c in conns if c["remotePeer"] == str(node.peer_id)]
    assert mine, conns
    assert (mine[0]["encryption"], mine[0]["multiplexer"]) == JS_ENCRYPTION[transport]
    assert mine[0]["direction"] == direction


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_js_dials_us_identifies_and_pings(node, js_peer, transport):
    await js_dials(node, js_peer, transport)
    await check_js_sees(node, js_peer, transport, "outbound")
    ident = await js_peer.call("identify", peer=str(node.peer_id))
    assert ident["peerId"] == str(node.peer_id)
    assert ident["agentVersion"].startswith("latticaray/")
    # both protocol sets: libp2p's streams and the native RPC stream
    for proto in (IDENTIFY_PROTOCOL, IDENTIFY_PUSH_PROTOCOL, PING_PROTOCOL, RPC_PROTOCOL):
        assert proto in ident["protocols"]
    listen = {str(a.without_peer()) for a in node.listen_addrs}
    assert listen <= set(ident["listenAddrs"])
    assert listen <= set(ident["signedPeerRecord"]["addresses"])
    assert TRANSPORTS[transport] in ident["observedAddr"] or ident["observedAddr"].endswith(
        TRANSPORTS[transport].rstrip("/")
    )
    rtt = await js_peer.call("ping", addr=our_addr(node, transport))
    assert rtt >= 0
    # and the node identified js on its own (libp2p identify, js is foreign)
    js = PeerId.from_string(js_peer.peer_id)
    await wait_for(lambda: js in node.identify_service.peer_info)
    info = node.identify_service.peer_info[js]
    assert "/ipfs/kad/1.0.0" in info.protocols and info.agent_version.startswith("js-libp2p")


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_we_dial_js_identify_and_ping_it(node, js_peer, transport):
    conn = await we_dial(node, js_peer, transport)
    await check_js_sees(node, js_peer, transport, "inbound")
    info = await node.identify(conn.peer_id)
    assert info.peer_id == conn.peer_id
    assert info.agent_version.startswith("js-libp2p")
    assert IDENTIFY_PROTOCOL in info.protocols and PING_PROTOCOL in info.protocols
    # js's listen addresses went to the peer store; our observed address came back
    assert set(node.addrs_of(conn.peer_id)) >= set(info.listen_addrs) and info.listen_addrs
    assert node.observed_addrs()[conn.peer_id].transport == transport
    assert 0 <= await node.ping(conn.peer_id) < 5
    # an RPC call to a foreign peer fails at once, saying why
    with pytest.raises(RpcUnimplemented, match=RPC_PROTOCOL):
        await node.call(conn.peer_id, "/latticaray/identify/1", b"", timeout=5)
    assert not conn.closed
    # js learned our protocols by identifying us
    store = await js_peer.call("peerStore", peer=str(node.peer_id))
    assert RPC_PROTOCOL in store["protocols"] and IDENTIFY_PROTOCOL in store["protocols"]
