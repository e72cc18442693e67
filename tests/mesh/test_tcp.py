"""TCP + TLS 1.3 transport: mutual authentication, refusals, deadlines, backpressure, RPC on top."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from latticaray.mesh.errors import ConnectionClosed, HandshakeError, PeerIdMismatch, PeerUnreachable
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.rpc import RpcRouter, RpcSession
from latticaray.mesh.tls import (
    AUTH_NONCE_LEN,
    AUTH_PROOF_LEN,
    client_ssl_context,
    make_auth_proof,
    make_certified_key,
)
from latticaray.mesh.transport.tcp import TcpTransport


@pytest.fixture
async def server():
    key = KeyPair.generate()
    inbound: asyncio.Queue = asyncio.Queue()
    transport = TcpTransport(key, handshake_timeout=2.0)
    addr = await transport.listen("127.0.0.1", 0, inbound.put_nowait)
    yield transport, addr, inbound
    await transport.close()


async def test_dial_authenticates_both_sides(server):
    srv, addr, inbound = server
    client_key = KeyPair.generate()
    client = TcpTransport(client_key)
    try:
        channel = await client.dial("127.0.0.1", addr.port, srv.peer_id)
        accepted = await asyncio.wait_for(inbound.get(), 5)
        assert channel.remote_peer == srv.peer_id
        assert channel.local_peer == client_key.peer_id
        assert accepted.remote_peer == client_key.peer_id
        assert accepted.remote_addr.host == "127.0.0.1"
        assert str(channel.remote_addr) == f"/ip4/127.0.0.1/tcp/{addr.port}"
        assert channel.transport == "tcp"
        channel.write(b"ping")
        assert await accepted.read_exactly(4) == b"ping"
        accepted.write(b"pong")
        await accepted.drain()
        assert await channel.read_exactly(4) == b"pong"
        channel.close()
        assert await accepted.read(10) == b""
    finally:
        await client.close()


async def test_rpc_over_tcp(server):
    srv, addr, inbound = server
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload + str(ctx.peer_id).encode()[:4] + ctx.transport.encode()

    async def chunks(ctx, payload):
        for _ in range(int(payload)):
            yield b"c" * 100_000

    router.register_unary("echo", echo)
    router.register_server_stream("chunks", chunks)
    client = TcpTransport(KeyPair.generate())
    try:
        channel = await client.dial("127.0.0.1", addr.port, srv.peer_id)
        accepted = await asyncio.wait_for(inbound.get(), 5)
        caller, callee = RpcSession(channel, RpcRouter()), RpcSession(accepted, router)
        assert await caller.call("echo", b"x", timeout=5) == b"x12D3tcp"
        total = 0
        async for chunk in caller.call_stream("chunks", b"50", timeout=10):
            total += len(chunk)
        assert total == 5_000_000
        replies = await asyncio.gather(
            *(caller.call("echo", bytes([i % 256]), timeout=20) for i in range(1000))
        )
        assert replies[7] == b"\x0712D3tcp"
        await caller.aclose()
        await asyncio.wait_for(callee.wait_closed(), 5)
    finally:
        await client.close()


async def test_wrong_peer_id_is_refused(server):
    srv, addr, _inbound = server
    client = TcpTransport(KeyPair.generate())
    someone_else = KeyPair.generate().peer_id
    try:
        with pytest.raises(PeerIdMismatch) as info:
            await client.dial("127.0.0.1", addr.port, someone_else)
        assert info.value.actual == srv.peer_id and info.value.expected == someone_else
        # the listener keeps working
        channel = await client.dial("127.0.0.1", addr.port, srv.peer_id)
        assert channel.remote_peer == srv.peer_id
    finally:
        await client.close()


async def _raw_tls(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl_context(KeyPair.generate()), server_hostname="127.0.0.1"
    )
    cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, cert


async def test_bad_or_replayed_client_proof_is_refused(server):
    _srv, addr, inbound = server
    mallory = KeyPair.generate()
    # 1. garbage proof
    reader, writer, cert = await _raw_tls(addr.port)
    await reader.readexactly(AUTH_NONCE_LEN)
    writer.write(b"\x01" + b"\0" * (AUTH_PROOF_LEN - 1))
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    # 2. a proof made for another certificate (what a man in the middle would relay)
    reader, writer, cert = await _raw_tls(addr.port)
    nonce = await reader.readexactly(AUTH_NONCE_LEN)
    other_cert = make_certified_key(KeyPair.generate()).certificate_der
    writer.write(make_auth_proof(mallory, other_cert, nonce))
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    # 3. a proof replayed from an earlier session (old nonce)
    reader, writer, cert = await _raw_tls(addr.port)
    nonce = await reader.readexactly(AUTH_NONCE_LEN)
    good = make_auth_proof(mallory, cert, nonce)
    writer.write(good)
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"\x00"
    accepted = await asyncio.wait_for(inbound.get(), 5)
    assert accepted.remote_peer == mallory.peer_id
    writer.close()
    reader, writer, _cert2 = await _raw_tls(addr.port)
    await reader.readexactly(AUTH_NONCE_LEN)
    writer.write(good)
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    assert inbound.empty()


async def test_silent_client_is_dropped_at_the_handshake_deadline():
    transport = TcpTransport(KeyPair.generate(), handshake_timeout=0.5)
    addr = await transport.listen("127.0.0.1", 0, lambda ch: None)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", addr.port)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 10) == b""  # server gives up: EOF
        assert time.monotonic() - t0 < 8
        writer.close()
        # TLS done but no proof sent: also dropped
        reader, writer, _ = await _raw_tls(addr.port)
        await reader.readexactly(AUTH_NONCE_LEN)
        assert await asyncio.wait_for(reader.read(1), 8) == b""
        writer.close()
    finally:
        await transport.close()


async def test_dial_nobody_is_peer_unreachable():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = TcpTransport(KeyPair.generate())
    with pytest.raises(PeerUnreachable):
        await client.dial("127.0.0.1", port, timeout=5)
    await client.close()


async def test_not_a_tls_server_fails_the_handshake():
    async def speak_garbage(reader, writer):
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" * 10)
        await writer.drain()
        writer.close()

    plain = await asyncio.start_server(speak_garbage, "127.0.0.1", 0)
    port = plain.sockets[0].getsockname()[1]
    client = TcpTransport(KeyPair.generate())
    try:
        with pytest.raises((PeerUnreachable, HandshakeError)):
            await client.dial("127.0.0.1", port, timeout=5)
    finally:
        plain.close()
        await client.close()


async def test_outbound_socket_can_share_the_listen_port(server):
    srv, addr, inbound = server
    me = TcpTransport(KeyPair.generate())
    my_addr = await me.listen("127.0.0.1", 0, lambda ch: None)
    try:
        channel = await me.dial("127.0.0.1", addr.port, srv.peer_id, local_port=my_addr.port)
        accepted = await asyncio.wait_for(inbound.get(), 5)
        # the server observed our listen port as the source port
        assert accepted.remote_addr.port == my_addr.port
        assert channel.remote_peer == srv.peer_id
    finally:
        await me.close()


async def test_write_backpressure_when_peer_does_not_read(server):
    srv, addr, inbound = server
    client = TcpTransport(KeyPair.generate(), write_high_water=256 * 1024)
    try:
        channel = await client.dial("127.0.0.1", addr.port, srv.peer_id)
        accepted = await asyncio.wait_for(inbound.get(), 5)
        chunk = b"w" * 65536
        written = 0
        blocked = False
        for _ in range(4096):  # up to 256 MiB; must block long before
            channel.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(channel.drain(), 0.5)
            except TimeoutError:
                blocked = True
                break
        assert blocked, "drain never blocked although the peer reads nothing"
        print(
            f"\ntcp: drain blocked after {written / 1e6:.1f} MB; receiver holds "
            f"{accepted.receive_buffered / 1e6:.1f} MB"
        )
        assert written < 64 * 1024 * 1024
        assert accepted.receive_buffered <= accepted._read_high_water + 4 * 1024 * 1024
        # the reader resumes and everything arrives
        drained = asyncio.ensure_future(channel.drain())
        received = 0
        while received < written:
            data = await asyncio.wait_for(accepted.read(1 << 20), 10)
            assert data
            received += len(data)
        await asyncio.wait_for(drained, 10)
    finally:
        await client.close()


PEER_SCRIPT = r"""
import asyncio, sys
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.rpc import RpcRouter, RpcSession
from latticaray.mesh.transport.tcp import TcpTransport
from latticaray.mesh.transport.unix import UnixTransport

async def main(kind, where):
    router = RpcRouter()
    async def drip(ctx, payload):
        while True:
            yield b"d" * 1000
            await asyncio.sleep(0.005)
    router.register_server_stream("drip", drip)
    sessions = []
    key = KeyPair.generate()
    if kind == "tcp":
        t = TcpTransport(key)
        addr = await t.listen("127.0.0.1", 0, lambda ch: sessions.append(RpcSession(ch, router)))
    else:
        t = UnixTransport(key, run_dir=where)
        addr = await t.listen(on_channel=lambda ch: sessions.append(RpcSession(ch, router)))
    print(key.peer_id, addr, flush=True)
    await asyncio.sleep(120)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def kill_peer_mid_stream(kind: str, dial) -> None:
    """Spawn a peer process, stream from it, SIGKILL it; the stream must fail promptly."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT, kind, dial.run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line, proc.stderr.read()
        peer_text, addr_text = line.split()
        channel = await dial(addr_text)
        assert str(channel.remote_peer) == peer_text
        session = RpcSession(channel, RpcRouter())
        stream = session.call_stream("drip", b"", timeout=60)
        for _ in range(5):
            assert await asyncio.wait_for(stream.__anext__(), 10) == b"d" * 1000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(ConnectionClosed):
            for _ in range(100_000):
                await stream.__anext__()
        elapsed = loop.time() - t0
        assert elapsed < 5.0, f"stream failed only after {elapsed:.1f} s"
        await session.aclose()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


async def test_peer_killed_mid_stream_fails_the_call_promptly(tmp_path):
    client = TcpTransport(KeyPair.generate())

    async def dial(addr_text):
        port = int(addr_text.rsplit("/", 1)[1])
        return await client.dial("127.0.0.1", port)

    dial.run_dir = str(tmp_path)
    try:
        await kill_peer_mid_stream("tcp", dial)
    finally:
        await client.close()


def test_tcp_and_unix_rpc_under_uvloop(tmp_path):
    """Nodes run on uvloop: its SSL and Unix socket implementations must work the same."""
    import uvloop

    from latticaray.mesh.transport.unix import UnixTransport

    async def scenario():
        router = RpcRouter()

        async def echo(ctx, payload):
            return payload

        async def chunks(ctx, payload):
            for _ in range(20):
                yield b"u" * 300_000

        router.register_unary("echo", echo, eager=True)
        router.register_server_stream("chunks", chunks)
        results = {}
        for name in ("tcp", "unix"):
            inbound: asyncio.Queue = asyncio.Queue()
            if name == "tcp":
                server, client = TcpTransport(KeyPair.generate()), TcpTransport(KeyPair.generate())
                addr = await server.listen("127.0.0.1", 0, inbound.put_nowait)
                channel = await client.dial("127.0.0.1", addr.port, server.peer_id)
            else:
                server = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))
                client = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))
                addr = await server.listen(on_channel=inbound.put_nowait)
                channel = await client.dial(addr.unix_path, server.peer_id)
            try:
                accepted = await asyncio.wait_for(inbound.get(), 5)
                caller, callee = RpcSession(channel, RpcRouter()), RpcSession(accepted, router)
                payloads = [bytes([i % 256]) * (i * 100) for i in range(500)]
                replies = await asyncio.gather(
                    *(caller.call("echo", p, timeout=30) for p in payloads)
                )
                assert replies == payloads
                total = 0
                async for chunk in caller.call_stream("chunks", b"", timeout=30):
                    total += len(chunk)
                results[name] = total
                await caller.aclose()
                await asyncio.wait_for(callee.wait_closed(), 5)
            finally:
                await client.close()
                await server.close()
        return results

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(asyncio.wait_for(scenario(), 60))
    assert results == {"tcp": 6_000_000, "unix": 6_000_000}
