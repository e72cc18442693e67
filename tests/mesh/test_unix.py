"""Same-host Unix socket transport: file modes, mutual Ed25519 challenge-response, refusals."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from test_tcp import kill_peer_mid_stream

from latticaray.mesh.errors import HandshakeError, PeerIdMismatch, PeerUnreachable
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.rpc import RpcRouter, RpcSession
from latticaray.mesh.transport import unix as unix_mod
from latticaray.mesh.transport.unix import UnixTransport


@pytest.fixture
async def server(tmp_path):
    key = KeyPair.generate()
    inbound: asyncio.Queue = asyncio.Queue()
    transport = UnixTransport(key, run_dir=str(tmp_path / "run"), handshake_timeout=2.0)
    addr = await transport.listen(on_channel=inbound.put_nowait)
    yield transport, addr, inbound
    await transport.close()


async def test_listen_uses_private_socket_and_authenticates_both_sides(server, tmp_path):
    srv, addr, inbound = server
    path = addr.unix_path
    assert path == srv.path and path.startswith(str(tmp_path / "run"))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    client_key = KeyPair.generate()
    client = UnixTransport(client_key, run_dir=str(tmp_path / "run"))
    try:
        channel = await client.dial(path, srv.peer_id)
        accepted = await asyncio.wait_for(inbound.get(), 5)
        assert channel.remote_peer == srv.peer_id
        assert accepted.remote_peer == client_key.peer_id
        assert channel.transport == "unix" and str(channel.remote_addr) == str(addr)
        router = RpcRouter()

        async def echo(ctx, payload):
            return payload[::-1] + ctx.transport.encode()

        router.register_unary("echo", echo)
        caller, callee = RpcSession(channel, RpcRouter()), RpcSession(accepted, router)
        assert await caller.call("echo", b"abc", timeout=5) == b"cbaunix"
        replies = await asyncio.gather(
            *(caller.call("echo", b"x" * 300_000, timeout=30) for _ in range(20))
        )
        assert all(len(r) == 300_004 for r in replies)
        await caller.aclose()
        await asyncio.wait_for(callee.wait_closed(), 5)
    finally:
        await client.close()
    await srv.close()
    assert not os.path.exists(path)


async def test_wrong_peer_id_is_refused(server, tmp_path):
    srv, addr, _inbound = server
    client = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))
    try:
        with pytest.raises(PeerIdMismatch):
            await client.dial(addr.unix_path, KeyPair.generate().peer_id)
        assert (await client.dial(addr.unix_path, srv.peer_id)).remote_peer == srv.peer_id
    finally:
        await client.close()


async def test_bad_client_signature_and_garbage_are_refused(server):
    _srv, addr, inbound = server
    # garbage instead of the hello
    reader, writer = await asyncio.open_unix_connection(addr.unix_path)
    writer.write(b"GET / HTTP/1.1\r\n" * 8)
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    # a client claiming Alice's key but unable to sign with it
    alice, mallory = KeyPair.generate(), KeyPair.generate()
    reader, writer = await asyncio.open_unix_connection(addr.unix_path)
    client_nonce = os.urandom(32)
    alice_pk = alice.peer_id.public_key_protobuf
    writer.write(unix_mod.MAGIC + client_nonce + alice_pk)
    reply = await asyncio.wait_for(reader.readexactly(unix_mod.REPLY_LEN), 5)
    transcript = unix_mod.auth_transcript(client_nonce, reply[:32], alice_pk, reply[32:68])
    writer.write(mallory.sign(b"client:" + transcript))
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    # reflecting the server's own signature back (role label differs) is refused too
    reader, writer = await asyncio.open_unix_connection(addr.unix_path)
    writer.write(unix_mod.MAGIC + client_nonce + alice_pk)
    reply = await asyncio.wait_for(reader.readexactly(unix_mod.REPLY_LEN), 5)
    writer.write(reply[68:])
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    assert inbound.empty()


async def test_impostor_server_is_refused(tmp_path):
    """A server that presents Bob's public key without Bob's private key cannot sign."""
    bob, mallory = KeyPair.generate(), KeyPair.generate()
    path = str(tmp_path / "impostor.sock")

    async def impostor(reader, writer):
        hello = await reader.readexactly(unix_mod.HELLO_LEN)
        server_nonce = os.urandom(32)
        bob_pk = bob.peer_id.public_key_protobuf
        transcript = unix_mod.auth_transcript(hello[4:36], server_nonce, hello[36:], bob_pk)
        writer.write(server_nonce + bob_pk + mallory.sign(b"server:" + transcript))
        await writer.drain()
        await reader.read(100)
        writer.close()

    fake = await asyncio.start_unix_server(impostor, path)
    client = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))
    try:
        with pytest.raises(HandshakeError, match="failed to prove"):
            await client.dial(path, bob.peer_id, timeout=5)
    finally:
        fake.close()
        await client.close()


async def test_silent_client_dropped_and_missing_socket_unreachable(tmp_path):
    transport = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path), handshake_timeout=0.5)
    addr = await transport.listen(on_channel=lambda ch: None)
    try:
        reader, writer = await asyncio.open_unix_connection(addr.unix_path)
        assert await asyncio.wait_for(reader.read(1), 10) == b""
        writer.close()
        with pytest.raises(PeerUnreachable):
            await transport.dial(str(tmp_path / "nobody.sock"), timeout=5)
    finally:
        await transport.close()


async def test_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    transport = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))
    with pytest.raises(FileExistsError):
        await transport.listen(str(path))
    assert path.read_text() == "keep me"


async def test_peer_killed_mid_stream_fails_the_call_promptly(tmp_path):
    client = UnixTransport(KeyPair.generate(), run_dir=str(tmp_path))

    async def dial(addr_text):
        return await client.dial(Multiaddr.parse(addr_text).unix_path)

    dial.run_dir = str(tmp_path)
    try:
        await kill_peer_mid_stream("unix", dial)
    finally:
        await client.close()
