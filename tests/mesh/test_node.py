"""MeshNode: connect, calls of every kind between nodes, identify/ping, events, limits, shutdown."""

import asyncio
import time

import pytest

from latticaray.mesh.errors import MeshError, PeerIdMismatch, PeerUnreachable, RpcError
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.mesh.transport.quic import QuicConfig

QUIC_ONLY = {"listen": ["/ip4/127.0.0.1/udp/0/quic-v1"], "transports": ("quic",)}


async def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def echo(ctx, payload):
    return b"echo:" + payload + b" from " + str(ctx.peer_id).encode()


async def count(ctx, payload):
    for i in range(int(payload)):
        yield str(i).encode()


@pytest.fixture
async def pair():
    a = MeshNode(MeshConfig(**QUIC_ONLY))
    b = MeshNode(MeshConfig(**QUIC_ONLY))
    await a.start()
    await b.start()
    for n in (a, b):
        n.register_unary("/test/echo/1", echo)
        n.register_server_stream("/test/count/1", count)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_connect_and_unary_call_both_ways(pair):
    a, b = pair
    assert b.listen_addrs and all(m.peer_id == b.peer_id for m in b.listen_addrs)
    peer = await a.connect(b.listen_addrs[0])
    assert peer == b.peer_id
    assert (
        await a.call(b.peer_id, "/test/echo/1", b"hi", timeout=10)
        == b"echo:hi from " + str(a.peer_id).encode()
    )
    # the callee can call back over the same connection without knowing any address
    assert (
        await b.call(a.peer_id, "/test/echo/1", b"yo", timeout=10)
        == b"echo:yo from " + str(b.peer_id).encode()
    )
    assert a.connected_peers() == [b.peer_id] and b.connected_peers() == [a.peer_id]
    assert len(a.connections.connections()) == 1


async def test_server_stream_call(pair):
    a, b = pair
    a.add_addrs(b.peer_id, b.listen_addrs)
    items = [x async for x in a.call_stream(b.peer_id, "/test/count/1", b"5", timeout=10)]
    assert items == [b"0", b"1", b"2", b"3", b"4"]


async def test_dial_by_peer_id_needs_an_address(pair):
    a, b = pair
    with pytest.raises(PeerUnreachable, match="no dialable address"):
        await a.call(b.peer_id, "/test/echo/1", b"x", timeout=5)


async def test_wrong_peer_id_in_address_is_refused(pair):
    a, b = pair
    other = KeyPair.generate().peer_id
    wrong = b.listen_addrs[0].without_peer().with_peer(other)
    with pytest.raises(PeerIdMismatch):
        await a.connect(wrong)
    assert a.connected_peers() == []


async def test_unknown_service_is_a_typed_error(pair):
    a, b = pair
    await a.connect(b.listen_addrs[0])
    with pytest.raises(RpcError) as info:
        await a.call(b.peer_id, "/nope/1", b"", timeout=5)
    assert info.value.code == "UNIMPLEMENTED"


async def test_identify_and_ping(pair):
    a, b = pair
    await a.connect(b.listen_addrs[0])
    info = await a.identify(b.peer_id)
    assert info.peer_id == b.peer_id
    assert [x.without_peer() for x in b.listen_addrs] == info.listen_addrs
    assert "/latticaray/identify/1" in info.protocols and "/test/echo/1" in info.protocols
    assert info.observed_addr == a.quic.listen_addr  # one socket: observed = our listen addr
    assert info.agent_version.startswith("latticaray/")
    assert 0 < await a.ping(b.peer_id) < 5
    # auto-identify on connect taught b our observed address too
    await wait_for(lambda: a.peer_id in b.observed_addrs(), what="auto identify")
    assert b.observed_addrs()[a.peer_id] == b.quic.listen_addr


async def test_connect_disconnect_events(pair):
    a, b = pair
    events = []
    b.on_peer_connected(lambda p: events.append(("up", p)))
    b.on_peer_disconnected(lambda p: events.append(("down", p)))
    await a.connect(b.listen_addrs[0])
    await wait_for(lambda: events, what="connect event")
    await a.disconnect(b.peer_id)
    await wait_for(lambda: len(events) == 2, what="disconnect event")
    assert events == [("up", a.peer_id), ("down", a.peer_id)]
    assert b.connected_peers() == []


async def test_simultaneous_dials_converge_on_one_primary(pair):
    a, b = pair
    a.add_addrs(b.peer_id, b.listen_addrs)
    b.add_addrs(a.peer_id, a.listen_addrs)
    await asyncio.gather(a.connect(b.listen_addrs[0]), b.connect(a.listen_addrs[0]))
    await wait_for(
        lambda: len(a.connections.connections()) == 2 and len(b.connections.connections()) == 2,
        what="both connections registered",
    )
    pa, pb = a.connection_to(b.peer_id), b.connection_to(a.peer_id)
    assert pa.dialer == pb.dialer == min(a.peer_id, b.peer_id)
    # the duplicate is closed by its dialer once idle; calls keep working throughout
    await wait_for(
        lambda: len(a.connections.connections()) == 1 and len(b.connections.connections()) == 1,
        timeout=15,
        what="duplicate reaped",
    )
    assert await a.call(b.peer_id, "/test/echo/1", b"z", timeout=10)
    # the reaper's sleeping frame keeps no connection (a closed one would stay alive with all
    # its transport state)
    for node in (a, b):
        frame = node.connections._reaper.get_coro().cr_frame
        assert not [v for v in frame.f_locals.values() if type(v).__name__ == "MeshConnection"]


async def test_concurrent_calls_share_one_dial(pair):
    a, b = pair
    a.add_addrs(b.peer_id, b.listen_addrs)
    replies = await asyncio.gather(
        *[a.call(b.peer_id, "/test/echo/1", str(i).encode(), timeout=20) for i in range(200)]
    )
    assert len(replies) == 200 and replies[7].startswith(b"echo:7 ")
    assert len(a.connections.connections()) == 1


async def test_connection_limit_refuses_inbound():
    a = MeshNode(MeshConfig(**QUIC_ONLY, max_connections=1))
    b, c = MeshNode(MeshConfig(**QUIC_ONLY)), MeshNode(MeshConfig(**QUIC_ONLY))
    for n in (a, b, c):
        await n.start()
    try:
        await b.connect(a.listen_addrs[0])
        await wait_for(lambda: a.connected_peers(), what="first inbound")
        try:
            await c.connect(a.listen_addrs[0], timeout=5)
        except Exception:
            pass
        # a refuses the second peer: c sees its connection closed
        await wait_for(
            lambda: c.connected_peers() == [] and not c.quic.connections,
            what="refused connection closed",
        )
        assert a.connected_peers() == [b.peer_id]
    finally:
        for n in (a, b, c):
            await n.stop()


async def test_key_path_persists_identity(tmp_path):
    path = tmp_path / "id.key"
    n1 = MeshNode(MeshConfig(**QUIC_ONLY, key_path=str(path)))
    n2 = MeshNode(MeshConfig(**QUIC_ONLY, key_path=str(path)))
    assert n1.peer_id == n2.peer_id


async def test_dead_peer_fails_in_flight_calls_promptly():
    quic = QuicConfig(unresponsive_timeout=1.5, keepalive_interval=0.5)
    a = MeshNode(MeshConfig(**QUIC_ONLY, quic=quic))
    b = MeshNode(MeshConfig(**QUIC_ONLY, quic=quic))
    await a.start()
    await b.start()
    hang = asyncio.Event()

    async def slow(ctx, payload):
        await hang.wait()
        return b""

    b.register_unary("/test/slow/1", slow)
    try:
        await a.connect(b.listen_addrs[0])
        started = asyncio.Event()

        async def slow_started(ctx, payload):
            started.set()
            return await slow(ctx, payload)

        b.register_unary("/test/slow/2", slow_started)
        call = asyncio.ensure_future(a.call(b.peer_id, "/test/slow/2", b"", timeout=60))
        await asyncio.wait_for(started.wait(), 10)
        # b vanishes without closing anything (its socket simply stops answering)
        b.quic._udp.close()
        b.quic._udp = None
        start = time.monotonic()
        with pytest.raises(RpcError):
            await asyncio.wait_for(call, 15)
        assert time.monotonic() - start < 10
    finally:
        hang.set()
        await a.stop()
        await b.stop()


@pytest.mark.parametrize(
    "transports, listen, expected",
    [
        (("tcp",), ["/ip4/127.0.0.1/tcp/0"], "tcp"),
        (("tcp", "quic"), ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"], "tcp"),
        (("quic", "tcp"), ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"], "quic"),
    ],
)
async def test_dial_by_peer_id_follows_transport_preference(transports, listen, expected):
    a = MeshNode(MeshConfig(listen=listen, transports=transports))
    b = MeshNode(MeshConfig(listen=listen, transports=transports))
    await a.start()
    await b.start()
    b.register_unary("/test/echo/1", echo)
    try:
        a.add_addrs(b.peer_id, b.listen_addrs)
        assert (await a.call(b.peer_id, "/test/echo/1", b"t", timeout=10)).startswith(b"echo:t")
        assert a.connection_to(b.peer_id).transport == expected
        await wait_for(lambda: b.connection_to(a.peer_id) is not None, what="inbound side")
        assert b.connection_to(a.peer_id).transport == expected
        # identify over this transport reports the observed address
        info = await a.identify(b.peer_id)
        assert info.observed_addr is not None and info.observed_addr.transport == expected
    finally:
        await a.stop()
        await b.stop()


async def test_happy_eyeballs_falls_back_to_a_working_address():
    a = MeshNode(MeshConfig(**QUIC_ONLY, happy_eyeballs_delay=0.1, dial_timeout=5))
    b = MeshNode(MeshConfig(**QUIC_ONLY))
    await a.start()
    await b.start()
    try:
        dead = Multiaddr.parse("/ip4/127.0.0.1/udp/9/quic-v1")  # nobody answers there
        a.add_addrs(b.peer_id, b.listen_addrs)
        a.add_addrs(b.peer_id, [dead])  # most recent first: tried first
        assert a.addrs_of(b.peer_id)[0] == dead
        start = time.monotonic()
        assert await a.ping(b.peer_id, timeout=10) >= 0
        assert time.monotonic() - start < 5
    finally:
        await a.stop()
        await b.stop()


async def test_default_node_prefers_the_same_host_unix_path(tmp_path):
    cfg = lambda: MeshConfig(unix_options={"run_dir": str(tmp_path)})  # noqa: E731
    a, b = MeshNode(cfg()), MeshNode(cfg())
    await a.start()
    await b.start()
    try:
        assert {x.transport for x in b.listen_addrs} == {"quic", "tcp", "unix"}
        a.add_addrs(b.peer_id, b.listen_addrs)
        assert await a.ping(b.peer_id, timeout=10) >= 0
        assert a.connection_to(b.peer_id).transport == "unix"
    finally:
        await a.stop()
        await b.stop()
    assert not list(tmp_path.glob("*.sock")), "unix sockets left behind"


def test_node_thread_for_synchronous_code():
    from latticaray.mesh.node import NodeThread

    with (
        NodeThread(MeshConfig(**QUIC_ONLY)) as server,
        NodeThread(MeshConfig(**QUIC_ONLY)) as client,
    ):
        server.node.register_unary("/test/echo/1", echo)
        peer = client.run(client.node.connect(server.node.listen_addrs[0]), 20)
        assert peer == server.node.peer_id
        assert client.run(
            client.node.call(peer, "/test/echo/1", b"sync", timeout=10), 20
        ).startswith(b"echo:sync")
    assert not server._thread.is_alive() and not client._thread.is_alive()


async def test_idempotent_calls_retry_once_on_a_new_connection(pair):
    a, b = pair
    calls = []

    async def flaky(ctx, payload):
        calls.append(ctx.session)
        if len(calls) in (1, 2):
            ctx.session.channel.abort()  # the connection dies before the reply
            await asyncio.sleep(10)
        return b"done"

    b.register_unary("/test/flaky/1", flaky)
    a.add_addrs(b.peer_id, b.listen_addrs)
    with pytest.raises(RpcError):
        await a.call(b.peer_id, "/test/flaky/1", b"", timeout=10)
    assert await a.call(b.peer_id, "/test/flaky/1", b"", timeout=10, idempotent=True) == b"done"
    assert len(calls) == 3 and calls[1] is not calls[2]


async def test_streams_that_negotiate_nothing_get_the_connection_dropped(pair):
    """A QUIC peer whose streams are not multistream-select (garbage), or propose only
    protocols the node lacks (answered ``na``), never gets registered, and its connection is
    closed once the preamble deadline passes; the node keeps serving others."""
    from latticaray.mesh.libp2p.multistream import encode_message
    from latticaray.mesh.transport.quic import QuicTransport

    a, b = pair
    rogue = QuicTransport(KeyPair.generate())
    await rogue.listen("127.0.0.1", 0)
    try:
        conn = await rogue.dial(b.listen_addrs[0])
        garbage = conn.open_channel()
        garbage.write(b"\x11/not-latticaray/1" + b"\x00" * 100)
        unknown = conn.open_channel()
        unknown.write(encode_message("/multistream/1.0.0") + encode_message("/not-here/1"))
        answer = b""
        while b"na\n" not in answer:
            chunk = await asyncio.wait_for(unknown.read(1024), 10)
            assert chunk, "stream closed without an answer"
            answer += chunk
        assert answer.startswith(encode_message("/multistream/1.0.0"))
        await asyncio.wait_for(conn.wait_closed(), 15)
        assert b.connected_peers() == []
    finally:
        await rogue.close()
    await a.connect(b.listen_addrs[0])
    assert (await a.call(b.peer_id, "/test/echo/1", b"ok", timeout=10)).startswith(b"echo:ok")


def test_wildcard_listen_addresses_expand_to_interface_addresses():
    from latticaray.mesh.paths import expand_unspecified, interface_addresses

    bound = [
        Multiaddr.parse("/ip4/0.0.0.0/udp/4001/quic-v1"),
        Multiaddr.parse("/ip6/::/tcp/4002"),
        Multiaddr.parse("/ip4/127.0.0.1/tcp/5"),
    ]
    hosts = ["127.0.0.1", "192.168.1.7", "::1", "fe80::1", "2001:db8::5", "garbage"]
    assert [str(a) for a in expand_unspecified(bound, hosts)] == [
        "/ip4/127.0.0.1/udp/4001/quic-v1",
        "/ip4/192.168.1.7/udp/4001/quic-v1",
        "/ip6/::1/tcp/4002",
        "/ip6/2001:db8::5/tcp/4002",
        "/ip4/127.0.0.1/tcp/5",
    ]
    assert "127.0.0.1" in interface_addresses()


async def test_client_stream_and_bidi_calls_through_the_node(pair):
    a, b = pair

    async def total(ctx, requests):
        n = 0
        async for message in requests:
            n += int(message)
        return str(n).encode()

    async def upper(ctx, requests):
        async for message in requests:
            yield message.upper()

    b.register_client_stream("/test/sum/1", total)
    b.register_bidi("/test/upper/1", upper)
    a.add_addrs(b.peer_id, b.listen_addrs)
    call = await a.open_client_stream(b.peer_id, "/test/sum/1", timeout=10)
    for i in range(10):
        await call.send(str(i).encode())
    call.end()
    assert await call.result() == b"45"
    bidi = await a.open_bidi(b.peer_id, "/test/upper/1", timeout=10)
    replies = []
    for word in (b"mesh", b"quic"):
        await bidi.send(word)
        replies.append(await bidi.__anext__())
    bidi.end()
    assert replies == [b"MESH", b"QUIC"]
    assert [r async for r in bidi] == []


async def test_peers_on_one_host_move_to_the_unix_path_after_identify(tmp_path):
    cfg = lambda: MeshConfig(unix_options={"run_dir": str(tmp_path)})  # noqa: E731
    a, b = MeshNode(cfg()), MeshNode(cfg())
    await a.start()
    await b.start()
    b.register_unary("/test/echo/1", echo)
    try:
        quic_addr = next(x for x in b.listen_addrs if x.transport == "quic")
        await a.connect(quic_addr)  # explicit QUIC address, like a bootstrap entry
        await wait_for(
            lambda: (
                a.connection_to(b.peer_id).transport == "unix"
                and b.connection_to(a.peer_id).transport == "unix"
            ),
            what="upgrade to unix",
        )
        assert (await a.call(b.peer_id, "/test/echo/1", b"u", timeout=10)).startswith(b"echo:u")
        # the QUIC connection is closed once idle, on both ends
        await wait_for(
            lambda: len(a.connections.connections()) == 1 and len(b.connections.connections()) == 1,
            timeout=15,
            what="old path closed",
        )
    finally:
        await a.stop()
        await b.stop()


async def test_a_blocked_peer_is_disconnected_never_dialed_and_its_connections_closed(pair):
    a, b = pair
    await a.connect(b.listen_addrs[0])
    await a.block(b.peer_id, "revoked")
    await wait_for(lambda: b.peer_id not in a.connected_peers(), what="a to drop b")
    assert a.connections.blocked(b.peer_id) == "revoked"
    # a dials nothing to it, by address or by peer id
    with pytest.raises(PeerUnreachable, match="blocked: revoked"):
        await a.connect(b.listen_addrs[0])
    with pytest.raises(PeerUnreachable, match="blocked"):
        await a.call(b.peer_id, "/test/echo/1", b"hi", timeout=5)
    # b's own dial completes its handshake, then a closes the connection as it registers
    with pytest.raises((MeshError, ConnectionError, OSError)):
        await b.connect(a.listen_addrs[0])
        await b.call(a.peer_id, "/test/echo/1", b"hi", timeout=5)
    await wait_for(lambda: b.peer_id not in a.connected_peers(), what="a to refuse b again")
    a.unblock(b.peer_id)
    await a.connect(b.listen_addrs[0])
    assert await a.call(b.peer_id, "/test/echo/1", b"hi", timeout=10)
