"""QUIC transport: mutual libp2p authentication, one shared socket, channels, backpressure, liveness.

The behaviour every QUIC library must give runs over both backends (the ``backend`` fixture: qh3
and aioquic), and across them (a client of one, a server of the other); what only one backend
has (aioquic's stream scan and path MTU search, qh3's server-side client authentication and
stream limit) is tested for that one."""

import asyncio
import collections
import os
import socket
import subprocess
import sys
import time

import aioquic
import pytest
import qh3
from aioquic import tls as aioquic_tls

from latticaray.mesh.errors import ConnectionClosed, HandshakeError, PeerIdMismatch, PeerUnreachable
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.transport.quic import QuicConfig, QuicTransport
from latticaray.mesh.transport.quic_aioquic import check_aioquic_version
from latticaray.mesh.transport.quic_loader import BACKENDS, load_backend
from latticaray.mesh.transport.quic_qh3 import check_qh3_version
from latticaray.mesh.transport.quic_udp import UdpSocket


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each QUIC library the transport drives."""
    return request.param


def qcfg(backend: str, **kwargs) -> QuicConfig:
    return QuicConfig(backend=backend, **kwargs)


async def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Endpoint:
    def __init__(self, config=None):
        self.key = KeyPair.generate()
        self.conns = []
        self.transport = QuicTransport(self.key, config, on_connection=self.conns.append)

    async def __aenter__(self):
        await self.transport.listen("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        await self.transport.close()

    @property
    def addr(self):
        return self.transport.listen_addr.with_peer(self.key.peer_id)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_aioquic_overrides_refuse_any_other_aioquic_version():
    with pytest.raises(ImportError, match=r"aioquic==1\.7\.2"):
        check_aioquic_version("1.8.0")
    check_aioquic_version(aioquic.__version__)  # the installed one is the pinned one
    # the aioquic backend does not load on top of another aioquic release
    proc = _run(
        "import aioquic; aioquic.__version__ = '9.9.9'\n"
        "from latticaray.mesh.transport.quic_loader import load_backend\n"
        "load_backend('aioquic')"
    )
    assert proc.returncode != 0
    assert "aioquic 9.9.9 is installed" in proc.stderr and "aioquic==1.7.2" in proc.stderr


def test_the_qh3_overrides_refuse_any_other_qh3_version_and_auto_falls_back_to_aioquic():
    with pytest.raises(ImportError, match=r"qh3==2\.1\.0"):
        check_qh3_version("2.2.0")
    check_qh3_version(qh3.__version__)
    code = (
        "import qh3; qh3.__version__ = '9.9.9'\n"
        "from latticaray.mesh.transport.quic_loader import load_backend\n"
        "print(load_backend('auto').name)\n"
        "load_backend('qh3')"
    )
    proc = _run(code)
    assert proc.returncode != 0 and proc.stdout.strip() == "aioquic"
    assert "qh3 9.9.9 is installed" in proc.stderr and "qh3==2.1.0" in proc.stderr
    assert load_backend("auto").name == "qh3"  # qh3 is the default where it is installed
    with pytest.raises(ValueError, match="unknown QUIC backend"):
        load_backend("quiche")


def test_aioquic_pinned_private_client_cert_flag_exists():
    # mutual auth relies on this private flag of aioquic 1.7.2; fail loudly if it goes away
    assert aioquic.__version__ == "1.7.2"
    ctx = aioquic_tls.Context(is_client=False)
    assert ctx._request_client_certificate is False


async def test_mutual_authentication_and_shared_socket(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        assert conn.remote_peer == b.key.peer_id
        await wait_for(lambda: b.conns, what="inbound connection")
        inbound = b.conns[0]
        # the server really received and verified the client's certificate
        assert inbound.remote_peer == a.key.peer_id
        # the server observes the client at the client's listen socket (one socket per node)
        assert inbound.remote_addr == a.transport.listen_addr
        assert a.conns == [conn]
        # loopback path: large datagrams (16 KiB, then what path MTU discovery finds); an RTT
        # sample exists after the handshake
        assert conn.max_datagram_size >= 16384 and 0 < conn.rtt < 5


async def test_dialing_the_wrong_peer_id_raises_peer_id_mismatch(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        someone_else = KeyPair.generate().peer_id
        with pytest.raises(PeerIdMismatch) as info:
            await a.transport.dial(b.transport.listen_addr.with_peer(someone_else))
        assert info.value.expected == someone_else and info.value.actual == b.key.peer_id
        assert a.transport.connections == []


async def test_dial_to_nobody_fails_with_peer_unreachable(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        addr = b.addr
        await b.transport.close()
        with pytest.raises(PeerUnreachable):
            await a.transport.dial(addr, timeout=1.0)


async def test_channel_round_trip_both_directions_and_fin(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        payload = os.urandom(300_000)
        ch.write(payload)
        await ch.drain()
        await wait_for(lambda: b.conns, what="inbound")
        server_ch = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        assert server_ch.remote_peer == a.key.peer_id
        got = bytearray()
        while len(got) < len(payload):
            got += await asyncio.wait_for(server_ch.read(65536), 10)
        assert bytes(got) == payload
        server_ch.write(b"pong")
        server_ch.close()
        assert await asyncio.wait_for(ch.read(100), 10) == b"pong"
        assert await asyncio.wait_for(ch.read(100), 10) == b""
        ch.close()


async def test_write_backpressure_bounds_memory_when_the_reader_stalls(backend):
    window, high = 256 * 1024, 256 * 1024
    cfg = qcfg(
        backend,
        stream_receive_window=window,
        connection_receive_window=window,
        write_high_water=high,
    )
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        block = os.urandom(16384)
        written = 0
        blocked = False
        sent = bytearray()
        for _ in range(400):  # up to 6.5 MB if nothing pushes back
            ch.write(block)
            sent += block
            written += len(block)
            try:
                await asyncio.wait_for(ch.drain(), 0.5)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"drain never blocked after {written} bytes with a stalled reader"
        await wait_for(lambda: b.conns, what="inbound")
        server_ch = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        # measured: what the stalled side holds is bounded by its window, the writer by high water
        assert server_ch.receive_buffered <= window
        assert ch.send_buffered <= high + len(block) + window
        assert written <= window + high + 2 * len(block) + window
        print(
            f"\nstalled reader: writer blocked after {written} B; receiver buffered "
            f"{server_ch.receive_buffered} B, sender buffered {ch.send_buffered} B"
        )
        # resume reading: everything arrives intact and the writer unblocks
        got = bytearray()
        reader = asyncio.ensure_future(_read_exactly(server_ch, len(sent) + 10 * len(block), got))
        await asyncio.wait_for(ch.drain(), 10)
        for _ in range(10):
            ch.write(block)
            sent += block
            await asyncio.wait_for(ch.drain(), 10)
        await asyncio.wait_for(reader, 20)
        assert bytes(got) == bytes(sent)


async def read_to_end(ch) -> bytes:
    got = bytearray()
    while chunk := await asyncio.wait_for(ch.read(1 << 20), 10):
        got += chunk
    return bytes(got)


async def _read_exactly(ch, n, out):
    while len(out) < n:
        data = await ch.read(1 << 20)
        assert data, "unexpected end of stream"
        out += data


async def test_peer_gone_mid_stream_fails_the_channel_promptly(backend):
    cfg = qcfg(backend, unresponsive_timeout=1.5, keepalive_interval=0.5)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        ch.write(b"x" * 1000)
        await ch.drain()
        await wait_for(lambda: b.conns, what="inbound")
        # the peer vanishes without a word (like a killed process): its socket just stops
        b.transport._udp.close()
        b.transport._udp = None
        start = time.monotonic()
        ch.write(b"more")
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ch.read(100), 10)
        assert time.monotonic() - start < 8
        assert conn.is_closed


async def test_graceful_close_is_seen_by_the_peer(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: b.conns, what="inbound")
        conn.close("bye")
        await asyncio.wait_for(b.conns[0].wait_closed(), 10)
        assert "bye" in b.conns[0].close_reason


async def test_send_raw_and_unknown_datagrams_use_the_listen_socket(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        seen = []
        b.transport.unknown_datagram_handler = lambda data, addr: seen.append((data, addr))
        a.transport.send_raw(b.transport.local_address, b"punch!")
        await wait_for(lambda: seen, what="raw datagram")
        assert seen[0] == (b"punch!", a.transport.local_address)


@pytest.mark.parametrize("batched", [True, False], ids=["recvmmsg", "recvfrom"])
async def test_datagrams_waiting_together_are_read_in_one_wake_up(batched):
    """The receive path drains the socket (up to receive_batch, in recvmmsg calls of up to 32
    where qh3's batched I/O serves) per readiness callback, so a burst costs one loop
    iteration and one transmit, not one per datagram."""
    cfg = QuicConfig(receive_batch=16, batched_io=batched)
    async with Endpoint(cfg) as a, Endpoint():
        assert a.transport._udp.batched == batched
        loop = asyncio.get_running_loop()
        seen, marks = [], []

        def handler(data, addr):
            if not seen:  # runs after this wake-up's reads, before the next wake-up's
                loop.call_soon(lambda: marks.append(len(seen)))
            seen.append(data)

        a.transport.unknown_datagram_handler = handler
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(40):  # queued in a's socket before its loop looks at it
                sender.sendto(b"burst %d" % i, a.transport.local_address)
            await wait_for(lambda: len(seen) == 40, what="40 datagrams")
        finally:
            sender.close()
        assert seen == [b"burst %d" % i for i in range(40)]
        if batched:  # whole recvmmsg calls until the budget is spent
            assert 16 <= marks[0] < 40, marks
        else:
            assert marks == [16]


async def test_a_read_of_one_connections_datagrams_reaches_it_whole_and_mixed_reads_one_by_one():
    """A socket read that is a run of 1-RTT datagrams from one address to one connection is
    routed as one piece (no Python call per datagram); a read that mixes addresses, unknown
    connection IDs or long headers goes datagram by datagram, unknown ones to the handler."""
    async with Endpoint() as a, Endpoint() as b:
        conn = await a.transport.dial(b.addr)
        cid = next(iter(conn.cids))
        whole, single, unknown = [], [], []
        conn.datagrams_received = lambda datas, addr: whole.append((list(datas), addr))
        conn.datagram_received = lambda data, addr: single.append((data, addr))
        a.transport.unknown_datagram_handler = lambda data, addr: unknown.append(data)
        peer = ("127.0.0.1", 9)
        run = [bytes([0x40 | i]) + cid + b"x" * 40 for i in range(5)]
        a.transport._datagrams_received([(d, peer) for d in run])
        assert whole == [(run, peer)] and not single
        whole.clear()
        stranger = b"\x41" + b"\x00" * 8 + b"y" * 40  # no connection has this ID
        other = ("127.0.0.2", 9)
        a.transport._datagrams_received(
            [(run[0], peer), (stranger, peer), (run[1], other), (run[2], peer)]
        )
        assert not whole
        assert single == [(run[0], peer), (run[1], other), (run[2], peer)]
        assert unknown == [stranger]


class _RecordingSocket:
    def __init__(self):
        self.calls = []

    def sendmsg(self, buffers, ancdata, flags, addr):
        ((_level, _kind, size),) = ancdata
        self.calls.append(("gso", int.from_bytes(size, "little"), len(b"".join(buffers)), addr))

    def sendto(self, data, addr):
        self.calls.append(("one", len(data), addr))


def test_runs_of_equal_size_datagrams_go_out_as_one_gso_send():
    sock = _RecordingSocket()
    udp = UdpSocket.send_only(sock)  # no event loop needed: only the send path
    x, y = ("198.18.0.1", 1), ("198.18.0.2", 2)
    udp.send_many(
        [(b"a" * 1350, x)] * 3
        + [(b"b" * 90, x)]  # a run; the short one ends it
        + [(b"c" * 1350, x)]
        + [(b"d" * 1350, y)] * 2  # new address: new run
        + [(b"e" * 50, y), (b"f" * 1350, y)]  # a longer one after a short one: alone
        + [(b"g" * 16384, x)] * 5
    )  # at most ~64 KB per send
    assert sock.calls == [
        ("gso", 1350, 3 * 1350 + 90, x),
        ("one", 1350, x),
        ("gso", 1350, 2 * 1350 + 50, y),
        ("one", 1350, y),
        ("gso", 16384, 3 * 16384, x),
        ("gso", 16384, 2 * 16384, x),
    ]
    assert udp.gso_sends == 4


async def test_bulk_transfer_uses_gso_and_arrives_intact(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        sent = os.urandom(4 << 20)
        ch.write(sent)
        await wait_for(lambda: b.conns, what="inbound")
        server_ch = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        got = bytearray()
        await asyncio.wait_for(_read_exactly(server_ch, len(sent), got), 30)
        assert bytes(got) == sent
        assert a.transport._udp.gso_sends > 0


async def test_garbage_datagrams_do_not_hurt_the_node(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        for size in (0, 1, 5, 40, 1200, 1500):
            a.transport.send_raw(b.transport.local_address, os.urandom(size))
        # a forged Initial-looking packet with random content
        a.transport.send_raw(
            b.transport.local_address, b"\xc0\x00\x00\x00\x01\x08" + os.urandom(1300)
        )
        conn = await a.transport.dial(b.addr)
        assert conn.remote_peer == b.key.peer_id


async def test_unauthenticated_client_is_refused(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        # a client without a libp2p extension in its certificate
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        from latticaray.mesh.tls import CertifiedKey

        k = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(k.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .sign(k, hashes.SHA256())
        )
        a.transport._certified = CertifiedKey(cert, k, a.key.peer_id)
        try:
            await a.transport.dial(b.addr, timeout=3)
        except (HandshakeError, PeerUnreachable):
            pass
        # the server refused and forgot the connection
        await wait_for(lambda: not b.transport.connections, what="refused connection dropped")
        assert b.conns == []


async def test_streams_beyond_the_accept_backlog_are_refused(backend):
    async with (
        Endpoint(qcfg(backend, accept_backlog=2)) as a,
        Endpoint(qcfg(backend, accept_backlog=2)) as b,
    ):
        conn = await a.transport.dial(b.addr)
        channels = [conn.open_channel() for _ in range(5)]
        for ch in channels:
            ch.write(b"hello")
        await wait_for(lambda: b.conns and len(b.conns[0]._accept_queue) == 2, what="backlog")
        refused = 0
        for ch in channels[2:]:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ch.read(10), 10)
            refused += 1
        assert refused == 3
        accepted = await asyncio.wait_for(b.conns[0].accept_channel(), 5)
        assert await accepted.read(10) == b"hello"
        assert not conn.is_closed  # the connection itself survives


async def test_graceful_close_delivers_data_written_before_it(backend):
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        payload = os.urandom(1_000_000)
        ch.write(payload)
        ch.close()
        conn.close("done")  # right away: data must still arrive before CONNECTION_CLOSE
        await wait_for(lambda: b.conns, what="inbound")
        server_ch = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        assert await read_to_end(server_ch) == payload
        await asyncio.wait_for(conn.wait_closed(), 10)


async def test_stateless_retry_validates_client_addresses_under_handshake_load(backend):
    # threshold 0: every new client must complete a Retry round trip first
    async with (
        Endpoint(qcfg(backend)) as a,
        Endpoint(qcfg(backend, retry_when_pending_handshakes=0)) as b,
    ):
        conn = await a.transport.dial(b.addr)
        assert conn.remote_peer == b.key.peer_id
        assert b.transport.stats["retries_sent"] == 1
        await wait_for(lambda: b.conns, what="inbound after retry")
        assert b.conns[0].remote_peer == a.key.peer_id
        # a forged Initial carrying a bogus token counts as one without a token (RFC 9000
        # 8.1.3: it may be another server's NEW_TOKEN token): under this load it gets a
        # stateless Retry, and no state
        before = len(b.transport.connections)
        fake = b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x08" + os.urandom(8)
        a.transport.send_raw(
            b.transport.local_address,
            fake + b"\x10" + os.urandom(16) + b"\x44\xd0" + os.urandom(1300),
        )
        await wait_for(lambda: b.transport.stats["retry_token_invalid"] == 1, what="bad token")
        await wait_for(lambda: b.transport.stats["retries_sent"] == 2, what="retry")
        assert len(b.transport.connections) == before


def test_datagram_size_is_chosen_per_path():
    cfg = QuicConfig()
    assert cfg.datagram_size_for("127.0.0.1") == 16384
    assert cfg.datagram_size_for("::1") == 16384
    assert cfg.datagram_size_for("198.18.0.5") == 1350
    assert QuicConfig(loopback_max_datagram_size=65000).datagram_size_for("127.0.0.1") == 16384
    assert QuicConfig(max_datagram_size=500).datagram_size_for("198.18.0.5") == 1200


def _record_long_header_datagrams(transport, into: list) -> None:
    """Keep a copy of every long-header (Initial/Handshake) datagram the transport sends."""
    send_many = transport._udp.send_many

    def recording(datagrams):
        into.extend(data for data, _ in datagrams if data[0] & 0x80)
        send_many(datagrams)

    transport._udp.send_many = recording


async def test_handshake_state_is_released_and_late_handshake_packets_are_dropped(caplog):
    async with Endpoint(qcfg("aioquic")) as a, Endpoint(qcfg("aioquic")) as b:
        sent_by_a, sent_by_b = [], []
        _record_long_header_datagrams(a.transport, sent_by_a)
        _record_long_header_datagrams(b.transport, sent_by_b)
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: b.conns, what="inbound connection")
        inbound = b.conns[0]
        quics = (conn._quic, inbound._quic)
        await wait_for(lambda: all(q._handshake_confirmed for q in quics), what="confirmed")
        assert sent_by_a and sent_by_b
        epochs = aioquic_tls.Epoch
        for quic in quics:
            # the spent Initial/Handshake state is gone; both connections share the stand-ins
            assert set(quic._crypto_streams) == {epochs.ONE_RTT}
            assert quic._spaces[epochs.HANDSHAKE] is quics[0]._spaces[epochs.INITIAL]
            assert quic._cryptos[epochs.HANDSHAKE] is quics[0]._cryptos[epochs.INITIAL]
            assert quic._loss.spaces == [quic._spaces[epochs.ONE_RTT]]
            # no per-connection key-logging callbacks
            pair = quic._cryptos[epochs.ONE_RTT]
            assert pair.recv._setup_cb is pair.send._teardown_cb
            # TLS keeps no handshake-only state (ephemeral keys, transcript) nor the checked
            # peer certificate
            assert quic.tls.key_schedule is None and quic.tls._ec_private_keys is None
            assert quic.peer_certificate() is None
        # a retransmitted Initial/Handshake datagram arriving late finds no key and is dropped
        for data in sent_by_a:
            a.transport.send_raw(b.transport.local_address, data)
        for data in sent_by_b:
            b.transport.send_raw(a.transport.local_address, data)
        ch = conn.open_channel()
        ch.write(b"after replay")
        server_ch = await asyncio.wait_for(inbound.accept_channel(), 10)
        assert await asyncio.wait_for(server_ch.read(100), 10) == b"after replay"
        server_ch.write(b"ok")
        assert await asyncio.wait_for(ch.read(100), 10) == b"ok"
        assert conn.is_established and inbound.is_established
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        # closing still discards the live epoch (aioquic asserts its space is still tracked)
        conn.abort("done")
        await asyncio.wait_for(inbound.wait_closed(), 10)


async def test_finished_streams_cost_no_memory_and_their_late_data_is_discarded(backend):
    """Hundreds of streams over one connection leave no per-stream record behind; data that
    arrives late for a finished stream is dropped (and credited back to the peer), and a stream
    the peer skipped over (opened implicitly, its data later) is still accepted when its data
    comes."""
    async with Endpoint(qcfg(backend)) as a, Endpoint(qcfg(backend)) as b:
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: b.conns, what="inbound")
        server = b.conns[0]
        for i in range(300):
            ch = conn.open_channel()
            ch.write(b"ping %d" % i)
            ch.close()
            accepted = await asyncio.wait_for(server.accept_channel(), 10)
            assert await asyncio.wait_for(accepted.read(100), 10) == b"ping %d" % i
            accepted.write(b"pong")
            accepted.close()
            assert await asyncio.wait_for(ch.read(100), 10) == b"pong"
            assert await asyncio.wait_for(ch.read(100), 10) == b""
        await wait_for(lambda: not server._channels and not conn._channels, what="channels freed")
        assert server._peer_streams.max_bidi == 4 * 299 and not server._peer_streams.gaps

        discarded = []
        discard = server._quic.discard_stream_data
        server._quic.discard_stream_data = lambda sid, n: (
            discarded.append((sid, n)),
            discard(sid, n),
        )
        data = server._quic.events.stream_data  # the backend's StreamDataReceived
        server._on_stream_data(data(b"late", False, 4 * 17))
        assert not server._accept_queue and discarded == [(4 * 17, 4)]

        # the peer's next two streams arrive out of order: 4*302 first, then 4*300 and 4*301
        server._on_stream_data(data(b"c", False, 4 * 302))
        assert server._peer_streams.gaps == {4 * 300, 4 * 301}
        server._on_stream_data(data(b"a", False, 4 * 300))
        server._on_stream_data(data(b"b", False, 4 * 301))
        assert [ch.stream_id for ch in server._accept_queue] == [4 * 302, 4 * 300, 4 * 301]
        assert not server._peer_streams.gaps


async def test_many_streams_in_flight_cost_a_few_stream_visits_per_packet():
    """aioquic visits every open stream for every packet it builds; the transport visits only
    streams with something to send and stops at a full packet. 100 streams of 64 KiB each way
    at 1350 B datagrams arrive intact, with a bounded number of stream visits per packet."""
    cfg = qcfg(
        "aioquic",
        max_datagram_size=1350,
        loopback_max_datagram_size=1350,
        pmtu_discovery=False,
        max_streams=128,
        accept_backlog=128,
    )
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: b.conns, what="inbound")
        visits = collections.Counter()
        for quic in (conn._quic, b.conns[0]._quic):
            write = quic._write_stream_frame

            def counting(*args, write=write, **kwargs):
                visits["frames"] += 1
                return write(*args, **kwargs)

            quic._write_stream_frame = counting
        packets_before = conn._quic._packet_number + b.conns[0]._quic._packet_number

        async def echo_server():
            async def echo(ch):
                ch.write(await read_to_end(ch))
                ch.close()

            tasks = []
            for _ in range(100):
                tasks.append(asyncio.ensure_future(echo(await b.conns[0].accept_channel())))
            await asyncio.gather(*tasks)

        server = asyncio.ensure_future(echo_server())
        payloads = [os.urandom(64 * 1024) for _ in range(100)]
        channels = []
        for payload in payloads:
            ch = conn.open_channel()
            ch.write(payload)
            ch.close()
            channels.append(ch)

        replies = await asyncio.wait_for(asyncio.gather(*(read_to_end(ch) for ch in channels)), 60)
        await asyncio.wait_for(server, 10)
        assert replies == payloads
        packets = conn._quic._packet_number + b.conns[0]._quic._packet_number - packets_before
        # ~2 x 100 x 64 KiB / 1350 B = ~9,700 data packets; aioquic's scan: ~50 visits each
        assert packets > 9000 and visits["frames"] < 3 * packets, (visits, packets)


async def test_a_stream_held_by_its_own_window_goes_on_when_the_reader_reads(backend):
    # the stream's window (256 KiB) runs out long before the connection's (16 MiB)
    cfg = qcfg(backend, stream_receive_window=256 * 1024, write_high_water=256 * 1024)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        sent = os.urandom(3 << 20)
        await wait_for(lambda: b.conns, what="inbound")

        async def write_all():
            for i in range(0, len(sent), 64 * 1024):
                ch.write(sent[i : i + 64 * 1024])
                await ch.drain()

        writer = asyncio.ensure_future(write_all())
        server_ch = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        got = bytearray()
        await asyncio.wait_for(_read_exactly(server_ch, len(sent), got), 30)
        await asyncio.wait_for(writer, 10)
        assert bytes(got) == sent


async def _send_and_check(conn, inbound, size):
    ch = conn.open_channel()
    sent = os.urandom(size)
    ch.write(sent)
    ch.close()
    server_ch = await asyncio.wait_for(inbound.accept_channel(), 10)
    assert await read_to_end(server_ch) == sent


_START_AT_1350 = {"max_datagram_size": 1350, "loopback_max_datagram_size": 1350}
_AIOQUIC_AT_1350 = {"backend": "aioquic", **_START_AT_1350}


async def test_path_mtu_discovery_grows_a_loopback_connection_to_64_kib_datagrams():
    async with Endpoint(QuicConfig(**_AIOQUIC_AT_1350)) as a, Endpoint(qcfg("aioquic")) as b:
        conn = await a.transport.dial(b.addr)
        assert conn.max_datagram_size == 1350  # the handshake ran at the base size
        await wait_for(lambda: conn.max_datagram_size == 65507, what="PMTU probe acked")
        await wait_for(lambda: b.conns, what="inbound")
        # STREAM frames longer than 16383 bytes (4-byte lengths) arrive intact
        await _send_and_check(conn, b.conns[0], 3 << 20)


async def test_a_path_that_drops_large_datagrams_settles_below_them():
    from latticaray.mesh.transport.quic_pmtu import PmtuState

    limit = 9000  # the "path" carries no datagram larger than this
    cfg = QuicConfig(**_AIOQUIC_AT_1350)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        for transport in (a.transport, b.transport):
            udp = transport._udp
            deliver = udp._on_datagram

            def small_only(data, peer, deliver=deliver):
                if len(data) <= limit:
                    deliver(data, peer)

            udp._on_datagram = small_only
        conn = await a.transport.dial(b.addr)
        await wait_for(
            lambda: conn._quic.pmtu.state is PmtuState.COMPLETE, timeout=30, what="search done"
        )
        assert limit - 32 <= conn.max_datagram_size <= limit
        await wait_for(lambda: b.conns, what="inbound")
        await _send_and_check(conn, b.conns[0], 1 << 20)
        assert conn.is_established


async def test_without_path_mtu_discovery_the_configured_size_stays(backend):
    cfg = qcfg(backend, pmtu_discovery=False, **_START_AT_1350)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: b.conns, what="inbound")
        await _send_and_check(conn, b.conns[0], 1 << 20)
        assert conn.max_datagram_size == 1350


# -- across backends ---------------------------------------------------------------------------
@pytest.mark.parametrize("client, server", [("qh3", "aioquic"), ("aioquic", "qh3")])
@pytest.mark.parametrize("start", [1350, 16384])
async def test_a_client_of_one_backend_and_a_server_of_the_other_authenticate_both_ways(
    client, server, start, caplog
):
    """aioquic pads its Initial datagrams with zero bytes after the packet; a qh3 server must
    count them toward the anti-amplification budget (it raised "packet builder capacity
    exhausted" on every transmit when it counted the packet alone)."""
    sizes = {"max_datagram_size": start, "loopback_max_datagram_size": start}
    async with Endpoint(qcfg(client, **sizes)) as a, Endpoint(qcfg(server, **sizes)) as b:
        conn = await a.transport.dial(b.addr)
        assert conn.remote_peer == b.key.peer_id
        await wait_for(lambda: b.conns, what="inbound connection")
        inbound = b.conns[0]
        assert inbound.remote_peer == a.key.peer_id
        ch = conn.open_channel()
        up = os.urandom(2 << 20)
        ch.write(up)
        ch.close()
        server_ch = await asyncio.wait_for(inbound.accept_channel(), 10)
        assert await read_to_end(server_ch) == up
        down = os.urandom(2 << 20)
        server_ch.write(down)
        server_ch.close()
        assert await read_to_end(ch) == down
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.records


# -- qh3 ---------------------------------------------------------------------------------------
def _qh3_pair(client_certified):
    """A plain qh3 client (its own TLS, certificate as given) and the transport's qh3 server."""
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection
    from qh3.tls import load_pem_private_key, load_pem_x509_certificates

    from latticaray.mesh.tls import make_certified_key
    from latticaray.mesh.transport.quic_qh3 import BACKEND

    cfg = qcfg("qh3")
    server_conf = BACKEND.configuration(
        is_client=False,
        max_datagram_size=1350,
        certified=make_certified_key(KeyPair.generate()),
        config=cfg,
    )
    client_conf = QuicConfiguration(is_client=True, alpn_protocols=["libp2p"], verify_mode=0)
    if client_certified is not None:
        cert, key = client_certified
        client_conf.certificate = load_pem_x509_certificates(cert.certificate_pem())[0]
        client_conf.private_key = load_pem_private_key(key.private_key_pem())
    client = QuicConnection(configuration=client_conf)
    server = BACKEND.connection(
        configuration=server_conf,
        config=cfg,
        original_dcid=client.original_destination_connection_id,
        retry_scid=None,
        pmtu=None,
    )
    return client, server


def _pump(client, server, rounds=20):
    """Exchange datagrams in memory until both sides are quiet; the server's events."""
    at = time.monotonic()
    client.connect(("127.0.0.1", 2), now=at)
    events = []
    for _ in range(rounds):
        moved = 0
        for src, dst, addr in ((client, server, ("127.0.0.1", 1)), (server, client, None)):
            for data, _ in src.datagrams_to_send(now=at):
                dst.receive_datagram(data, addr or ("127.0.0.1", 2), now=at)
                moved += 1
        while (event := server.next_event()) is not None:
            events.append(event)
        if not moved:
            break
    for _ in range(3):  # past the closing period: a refused handshake ends with an event
        at += 5.0
        server.handle_timer(now=at)
        while (event := server.next_event()) is not None:
            events.append(event)
    return events


def _handshake_result(events):
    kinds = {type(e).__name__: e for e in events}
    return kinds.get("HandshakeCompleted"), kinds.get("ConnectionTerminated")


def test_a_qh3_server_requires_the_clients_certificate():
    client, server = _qh3_pair(None)  # a client with no certificate answers with an empty one
    done, closed = _handshake_result(_pump(client, server))
    assert done is None and closed is not None
    assert closed.error_code == 0x100 + 116, closed  # TLS alert certificate_required
    assert server.peer_certificate_der() is None


def test_a_qh3_server_checks_that_the_client_holds_its_certificates_key():
    from latticaray.mesh.tls import make_certified_key

    mine, someone_else = (
        make_certified_key(KeyPair.generate()),
        make_certified_key(KeyPair.generate()),
    )
    client, server = _qh3_pair((someone_else, mine))  # another's certificate, our key
    done, closed = _handshake_result(_pump(client, server))
    assert done is None and closed is not None
    assert closed.error_code == 0x100 + 51, closed  # TLS alert decrypt_error: bad signature
    client, server = _qh3_pair((mine, mine))
    done, closed = _handshake_result(_pump(client, server))
    assert done is not None and closed is None
    assert server.peer_certificate_der() == mine.certificate_der


async def test_qh3_refuses_a_stream_past_the_peers_limit_and_the_connection_survives():
    async with Endpoint(qcfg("qh3")) as a, Endpoint(qcfg("qh3")) as b:
        conn = await a.transport.dial(b.addr)
        channels = [conn.open_channel() for _ in range(100)]  # qh3 allows 100 at once
        with pytest.raises(ConnectionClosed, match="cannot open a QUIC stream"):
            conn.open_channel()
        channels[0].write(b"still here")
        await wait_for(lambda: b.conns, what="inbound")
        accepted = await asyncio.wait_for(b.conns[0].accept_channel(), 10)
        assert await asyncio.wait_for(accepted.read(100), 10) == b"still here"
        assert conn.is_established and not conn.is_closed


async def test_qh3_clients_probe_to_1472_and_servers_keep_large_loopback_datagrams():
    async with (
        Endpoint(QuicConfig(backend="qh3", **_START_AT_1350)) as a,
        Endpoint(qcfg("qh3")) as b,
    ):
        conn = await a.transport.dial(b.addr)
        await wait_for(lambda: conn.max_datagram_size == 1472, what="PMTU probe acked")
        await wait_for(lambda: b.conns, what="inbound")
        # the server's loopback start (16 KiB) is not capped by the client's 1472-byte limit
        assert b.conns[0].max_datagram_size == 16384
        await _send_and_check(conn, b.conns[0], 1 << 20)


def drop_every(endpoint, n: int) -> None:
    """``endpoint``'s socket drops every ``n``-th datagram it receives (deterministic loss)."""
    udp = endpoint.transport._udp
    deliver, seen = udp._on_datagram, [0]

    def lossy(data, peer):
        seen[0] += 1
        if seen[0] % n:
            deliver(data, peer)

    udp._on_datagram = lossy


async def test_without_copies_a_lossy_path_makes_later_connections_to_that_host_use_aioquic():
    """qh3's CUBIC collapses on a path with random loss; with datagram copies switched off, the
    transport (backend "auto") marks a host whose qh3 connection lost packets, and connects to
    it with aioquic's loss-tolerant controller from then on."""
    cfg = QuicConfig(lossy_min_losses=5, loss_redundancy=False, **_START_AT_1350)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        drop_every(b, 50)  # b's socket drops every 50th datagram: 2 % of a's packets
        conn = await a.transport.dial(b.addr)
        assert conn.backend == "qh3"
        await wait_for(lambda: b.conns, what="inbound")
        await _send_and_check(conn, b.conns[0], 4 << 20)  # arrives intact despite the loss
        await wait_for(lambda: a.transport.stats["lossy_paths"] == 1, what="path marked lossy")
        again = await a.transport.dial(b.addr)
        assert again.backend == "aioquic" and again.remote_peer == b.key.peer_id
        await wait_for(lambda: len(b.conns) == 2, what="second inbound")
        await _send_and_check(again, b.conns[1], 1 << 20)


async def test_a_qh3_connection_on_a_lossy_path_sends_its_datagrams_twice():
    """qh3's CUBIC shrinks its window at every loss; on a path with random loss the
    connection sends each 1-RTT datagram twice (and right after the next one), so a datagram
    the path drops still arrives and the core stops seeing losses."""
    cfg = QuicConfig(backend="qh3", pace_loopback=True, pmtu_discovery=False, **_START_AT_1350)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        drop_every(b, 50)  # b's socket drops every 50th datagram: 2 % of a's packets
        conn = await a.transport.dial(b.addr)
        redundancy = conn._quic.redundancy
        assert conn.backend == "qh3" and redundancy is not None and not redundancy.on
        await wait_for(lambda: b.conns, what="inbound")
        await _send_and_check(conn, b.conns[0], 2 << 20)
        assert redundancy.on and redundancy.turned_on == 1
        lost_when_on = conn.loss_stats()[0]
        copies = redundancy.copies_sent
        await _send_and_check(conn, b.conns[0], 8 << 20)  # intact, as every copy is
        assert redundancy.copies_sent - copies > (8 << 20) // 1350
        assert conn.loss_stats()[0] - lost_when_on <= 2  # ~130 of its datagrams were dropped
        # the host is marked lossy: the next connection to it sends copies from the start
        await wait_for(lambda: a.transport.stats["lossy_paths"] == 1, what="path marked lossy")
        again = await a.transport.dial(b.addr)
        assert again.backend == "qh3" and again.conceals_loss()
        await wait_for(lambda: len(b.conns) == 2, what="second inbound")
        await _send_and_check(again, b.conns[1], 4 << 20)
        assert again.loss_stats()[0] <= 5  # of ~60 dropped (handshake datagrams go once)


async def test_loopback_and_switched_off_qh3_connections_never_send_copies():
    async with Endpoint(qcfg("qh3")) as a, Endpoint(qcfg("qh3", loss_redundancy=False)) as b:
        conn = await a.transport.dial(b.addr)
        assert conn._quic.redundancy is None  # a loopback path is not paced: no random loss
        await wait_for(lambda: b.conns, what="inbound")
        assert b.conns[0]._quic.redundancy is None
    cfg = qcfg("qh3", pace_loopback=True, loss_redundancy=False)
    async with Endpoint(cfg) as a, Endpoint(cfg) as b:
        assert (await a.transport.dial(b.addr))._quic.redundancy is None


async def test_a_write_after_qh3_closed_its_connection_raises_connection_closed():
    """qh3 refuses frames once its connection is closing (aioquic ignores them); the channel
    reports that as ConnectionClosed, what the RPC layer expects of a dead channel."""
    async with Endpoint(qcfg("qh3")) as a, Endpoint(qcfg("qh3")) as b:
        conn = await a.transport.dial(b.addr)
        ch = conn.open_channel()
        ch.write(b"before")
        conn._quic.close(
            error_code=0, reason_phrase="gone"
        )  # the library closed, the shell not yet
        with pytest.raises(ConnectionClosed, match="connection is closed"):
            ch.write(b"after")
        conn.tick(time.monotonic() + 60)  # keepalive on a closed library: no exception either
