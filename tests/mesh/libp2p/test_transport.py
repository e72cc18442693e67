"""The asyncio libp2p TCP transport between Python hosts: upgrade, streams, identify, ping."""

from __future__ import annotations

import asyncio

import pytest

from latticaray.mesh.errors import PeerIdMismatch
from latticaray.mesh.libp2p.errors import ProtocolNotSupported, StreamReset
from latticaray.mesh.libp2p.host import Libp2pHost
from latticaray.mesh.libp2p.keys import KeyType, PrivateKey
from latticaray.mesh.libp2p.ping import PingService
from latticaray.mesh.libp2p.tcp import Libp2pTcpTransport
from latticaray.mesh.libp2p.yamux import INITIAL_WINDOW


@pytest.fixture
async def pair():
    a, b = Libp2pHost(), Libp2pHost()
    await b.listen()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _echo(stream):
    while chunk := await stream.read():
        await stream.write(chunk)
    await stream.close()


async def test_echo_stream_large_payload(pair):
    a, b = pair
    b.router.add("/echo/1", _echo)
    conn = await a.dial(b.listen_multiaddrs()[0])
    stream = await conn.open_stream(["/missing/1", "/echo/1"])
    assert stream.protocol == "/echo/1"
    payload = bytes(range(256)) * 8192  # 2 MiB, several windows
    writer = asyncio.ensure_future(stream.write(payload))
    got = bytearray()
    while len(got) < len(payload):
        got += await stream.read(1 << 20)
    await writer
    await stream.close_write()
    assert await stream.read() == b""
    assert bytes(got) == payload


async def test_lazy_stream_and_unsupported_protocol(pair):
    a, b = pair
    b.router.add("/echo/1", _echo)
    conn = await a.dial(b.listen_multiaddrs()[0])
    lazy = await conn.open_stream("/echo/1", lazy=True)
    await lazy.write(b"ping")
    assert await lazy.read() == b"ping"
    with pytest.raises(ProtocolNotSupported):
        await conn.open_stream("/nobody/1")
    lazy_bad = await conn.open_stream("/nobody/1", lazy=True)
    await lazy_bad.write(b"x")
    with pytest.raises(ProtocolNotSupported):
        await lazy_bad.read()


@pytest.mark.parametrize("key_type", [KeyType.SECP256K1, KeyType.ECDSA, KeyType.RSA])
async def test_identify_and_ping_with_foreign_key_types(key_type):
    a, b = Libp2pHost(PrivateKey.generate(key_type)), Libp2pHost()
    await b.listen()
    try:
        conn = await a.dial(b.listen_multiaddrs()[0])
        info = await a.identified(conn)
        assert info.key() == b.identity.public_key
        assert "/ipfs/ping/1.0.0" in info.protocols
        # b verified a's identity (a foreign key type) in Noise and in identify
        back = b.connection_to(a.peer_id)
        assert back is not None and back.remote_key == a.identity.public_key
        assert back.mesh_peer_id.key == a.identity.public_key
        assert back.mesh_peer_id.to_bytes() == a.peer_id
        theirs = await b.identified(back)
        assert theirs.key() == a.identity.public_key
        assert b.identify.peers[a.peer_id].record is None  # a listens nowhere: no record
        rtts = await PingService.ping(conn, count=2)
        assert len(rtts) == 2
    finally:
        await a.close()
        await b.close()


async def test_dialing_the_wrong_peer_id_fails(pair):
    a, b = pair
    wrong = PrivateKey.generate().public_key.peer_id_bytes()
    with pytest.raises(PeerIdMismatch):
        await a.tcp.dial("127.0.0.1", b.tcp.listen_port, peer_id=wrong)
    assert not a.connections


async def test_a_silent_peer_times_out_the_handshake():
    async def silent(reader, writer):
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = Libp2pTcpTransport(PrivateKey.generate(), handshake_timeout=0.5)
    try:
        with pytest.raises(TimeoutError):
            await t.dial("127.0.0.1", port)
    finally:
        server.close()
        await t.close()


async def test_reset_reaches_the_reader_and_writer_waits_for_window(pair):
    a, b = pair
    opened: asyncio.Queue = asyncio.Queue()

    async def hold(stream):
        await opened.put(stream)
        await asyncio.sleep(30)

    b.router.add("/hold/1", hold)
    conn = await a.dial(b.listen_multiaddrs()[0])
    stream = await conn.open_stream("/hold/1")
    # the peer never reads: one window goes out, then the writer waits and times out
    with pytest.raises(TimeoutError):
        await stream.write(b"x" * (INITIAL_WINDOW + 1), timeout=0.5)
    theirs = await asyncio.wait_for(opened.get(), 5)
    theirs.reset()
    with pytest.raises(StreamReset):
        for _ in range(100):
            await stream.read(timeout=5)
    with pytest.raises(StreamReset):
        await stream.write(b"more")


async def test_connection_close_ends_streams(pair):
    a, b = pair
    b.router.add("/echo/1", _echo)
    conn = await a.dial(b.listen_multiaddrs()[0])
    stream = await conn.open_stream("/echo/1")
    peer_conn = b.connection_to(a.peer_id)
    await peer_conn.close()
    await asyncio.wait_for(conn.wait_closed(), 5)
    with pytest.raises(StreamReset):
        await stream.read(timeout=1)
    assert conn.is_closed
