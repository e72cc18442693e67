"""libp2p streams on the mesh node: multistream-select on every stream, the RPC session on a
lazily negotiated ``/latticaray/rpc/1`` stream, a protocol router for the rest, and peers of
every libp2p key type (Ed25519, RSA, secp256k1, ECDSA) registered like any other."""

from __future__ import annotations

import asyncio
import time

import pytest

from latticaray.mesh.adapters import RPC_PROTOCOL
from latticaray.mesh.identity import PeerId
from latticaray.mesh.libp2p.errors import ProtocolNotSupported
from latticaray.mesh.libp2p.host import Libp2pHost
from latticaray.mesh.libp2p.identify import IDENTIFY_PROTOCOL
from latticaray.mesh.libp2p.keys import KeyType, PrivateKey
from latticaray.mesh.libp2p.ping import PING_PROTOCOL, PingService
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.mesh.quicstreams import QuicMuxedConnection
from latticaray.mesh.transport.quic import QuicTransport

ECHO = "/test/stream-echo/1"


def config(transport: str) -> MeshConfig:
    listen = {"quic": "/ip4/127.0.0.1/udp/0/quic-v1", "tcp": "/ip4/127.0.0.1/tcp/0"}
    return MeshConfig(listen=[listen[transport]], transports=(transport,))


async def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def echo_stream(stream):
    data = await stream.read_message(1024)
    await stream.write_message(b"echo:" + (data or b""))
    await stream.close()


async def echo_rpc(ctx, payload):
    return b"rpc:" + payload


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_latticaray_peers_are_native_and_open_libp2p_streams_too(transport):
    a, b = MeshNode(config(transport)), MeshNode(config(transport))
    for n in (a, b):
        n.register_unary("/test/echo/1", echo_rpc)
        n.register_stream(ECHO, echo_stream)
        await n.start()
    try:
        peer = await a.connect(b.listen_addrs[0])
        # the first call rides with the lazy proposal: no round trip before it
        assert await a.call(peer, "/test/echo/1", b"x", timeout=10) == b"rpc:x"
        conn = a.connection_to(peer)
        assert conn.transport == transport and conn.native is True
        await wait_for(lambda: b.connection_to(a.peer_id) is not None)
        assert b.connection_to(a.peer_id).native is True
        # native identify between latticaray peers, advertising both protocol sets
        info = await a.identify(peer)
        assert "/test/echo/1" in info.protocols and ECHO in info.protocols
        assert IDENTIFY_PROTOCOL in info.protocols and PING_PROTOCOL in info.protocols
        assert ECHO in a.libp2p_protocols() and RPC_PROTOCOL in a.libp2p_protocols()
        # a libp2p stream beside the RPC session, either way
        for x, y in ((a, b), (b, a)):
            stream = await x.open_stream(y.peer_id, [ECHO], timeout=10)
            await stream.write_message(b"hi")
            assert await stream.read_message(1024) == b"echo:hi"
            await stream.close()
        with pytest.raises(ProtocolNotSupported):
            await a.open_stream(peer, ["/not/here/1"], timeout=10)
        assert await a.call(peer, "/test/echo/1", b"y", timeout=10) == b"rpc:y"
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("key_type", [KeyType.RSA, KeyType.SECP256K1, KeyType.ECDSA])
async def test_foreign_key_types_over_tcp_are_first_class(key_type):
    node = MeshNode(config("tcp"))
    await node.start()
    host = Libp2pHost(PrivateKey.generate(key_type))
    await host.listen()
    try:
        conn = await host.dial(node.listen_addrs[0])
        info = await host.identified(conn)
        assert RPC_PROTOCOL in info.protocols
        peer = PeerId.from_key(host.identity.public_key)
        await wait_for(lambda: node.connection_to(peer) is not None)
        mine = node.connection_to(peer)
        assert mine.native is False and mine.peer_id.key_type is key_type
        assert node.connected_peers() == [peer]
        # the node identifies and pings it over libp2p, and can dial it back by peer ID
        await wait_for(lambda: peer in node.identify_service.peer_info)
        assert 0 <= await node.ping(peer) < 5
        await node.disconnect(peer)
        assert node.connected_peers() == []
        assert await node.connect(host.listen_multiaddrs()[0]) == peer
        assert node.connection_to(peer).outbound
    finally:
        await host.close()
        await node.stop()


class _Identity:
    """A host identity of another key type, as the QUIC transport uses one."""

    def __init__(self, key_type: KeyType) -> None:
        self._key = PrivateKey.generate(key_type)
        self.peer_id = PeerId.from_key(self._key.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


@pytest.mark.parametrize("key_type", [KeyType.RSA, KeyType.ECDSA])
async def test_foreign_key_types_over_quic_are_first_class(key_type):
    node = MeshNode(config("quic"))
    await node.start()
    identity = _Identity(key_type)
    foreign = QuicTransport(identity)
    await foreign.listen("127.0.0.1", 0)
    try:
        quic = await foreign.dial(node.listen_addrs[0])
        muxer = QuicMuxedConnection(quic)
        # the foreign peer's first stream (a ping) registers it
        assert len(await PingService.ping(muxer, count=2)) == 2
        await wait_for(lambda: node.connection_to(identity.peer_id) is not None)
        mine = node.connection_to(identity.peer_id)
        assert mine.native is False and mine.transport == "quic"
        assert mine.peer_id.key == identity.peer_id.key  # the key from its certificate
    finally:
        await foreign.close()
        await node.stop()
