"""Path MTU discovery: the sans-I/O search (RFC 8899) and QUIC connections that use it."""

import asyncio
import os
import time

import pytest

from latticaray.mesh.identity import KeyPair
from latticaray.mesh.transport.quic import QuicConfig, QuicTransport
from latticaray.mesh.transport.quic_pmtu import PmtuSearch, PmtuState
from latticaray.mesh.transport.quic_udp import route_max_payload


def test_the_search_tries_the_ceiling_first_and_stops_once_it_is_confirmed():
    search = PmtuSearch(1350, 65507)
    assert search.next_probe(0.0) == 65507
    search.probe_sent(65507)
    assert search.next_probe(0.0) is None  # one probe in flight at a time
    assert search.probe_acked(65507) == 65507
    assert search.next_probe(0.0) is None and search.state is PmtuState.COMPLETE
    assert search.confirmed == 65507


def test_a_size_lost_max_probes_times_is_ruled_out_and_the_search_bisects():
    search = PmtuSearch(1350, 9000, max_probes=3, granularity=32)
    path_mtu = 1472  # what this path carries
    sizes = []
    for _ in range(100):  # bounded: a search converges in ~log2(ceiling / granularity) steps
        size = search.next_probe(0.0)
        if size is None:
            break
        sizes.append(size)
        search.probe_sent(size)
        if size <= path_mtu:
            search.probe_acked(size)
        else:
            search.probe_lost(size)
    assert search.state is PmtuState.COMPLETE
    assert sizes[:3] == [9000, 9000, 9000]  # retried before ruled out
    assert path_mtu - 32 <= search.confirmed <= path_mtu
    assert all(s <= 9000 for s in sizes)


def test_a_stale_or_repeated_report_changes_nothing():
    search = PmtuSearch(1350, 4000)
    search.probe_sent(search.next_probe(0.0))
    assert search.probe_acked(1200) is None  # below what is confirmed
    search.probe_lost(3000)  # not the size being tried
    assert search.in_flight == 4000 and search.confirmed == 1350


def test_the_search_runs_again_after_the_raise_interval_and_restarts_on_reset():
    search = PmtuSearch(1200, 1500, raise_interval=600.0)
    search.probe_sent(search.next_probe(0.0))
    search.probe_acked(1500)
    assert search.next_probe(1.0) is None and search.state is PmtuState.COMPLETE
    assert search.next_probe(700.0) is None  # nothing bigger than the ceiling to try
    search.reset()
    assert search.confirmed == 1200 and search.next_probe(701.0) == 1500


def test_the_peer_s_max_udp_payload_size_caps_the_search():
    search = PmtuSearch(1350, 65507)
    search.cap(1500)  # the peer's transport parameter
    assert search.next_probe(0.0) == 1500
    search.probe_sent(1500)
    search.probe_lost(1500)
    search.cap(1400)  # a smaller cap drops the size being tried
    assert search.ceiling == 1400 and search.next_probe(0.0) == 1400
    assert search.probe_acked(1500) is None  # above what the peer accepts: not adopted
    search.cap(1000)
    assert search.state is PmtuState.DISABLED and search.ceiling == 1350


def test_no_search_where_the_ceiling_is_the_base():
    search = PmtuSearch(1350, 1350)
    assert search.state is PmtuState.DISABLED and search.next_probe(0.0) is None
    with pytest.raises(ValueError):
        PmtuSearch(0, 1500)


def test_the_local_route_tells_the_ceiling():
    # loopback's MTU is 64 KiB: the largest IPv4 UDP payload fits
    assert route_max_payload(("127.0.0.1", 9)) == 65507
    assert 65000 < route_max_payload(("::1", 9)) <= 65536 - 48


async def _pair(config):
    ka, kb = KeyPair.generate(), KeyPair.generate()
    inbound = []
    a = QuicTransport(ka, config)
    b = QuicTransport(kb, config, on_connection=inbound.append)
    await a.listen("127.0.0.1", 0)
    await b.listen("127.0.0.1", 0)
    return a, b, b.listen_addr.with_peer(kb.peer_id), inbound


async def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _echo_bulk(conn, inbound, size):
    ch = conn.open_channel()
    sent = os.urandom(size)
    ch.write(sent)
    ch.close()
    await _wait_for(lambda: inbound)
    server_ch = await asyncio.wait_for(inbound[0].accept_channel(), 10)
    got = bytearray()
    while True:
        chunk = await asyncio.wait_for(server_ch.read(1 << 20), 10)
        if not chunk:
            break
        got += chunk
    assert bytes(got) == sent


async def test_a_loopback_connection_grows_from_1350_bytes_to_64_kib_datagrams():
    config = QuicConfig(max_datagram_size=1350, loopback_max_datagram_size=1350)
    a, b, addr, inbound = await _pair(config)
    try:
        conn = await a.dial(addr)
        assert conn.max_datagram_size == 1350  # the handshake ran at the base size
        await _wait_for(lambda: conn.max_datagram_size == 65507)
        await _wait_for(lambda: inbound and inbound[0].max_datagram_size == 65507)
        # STREAM frames longer than 16383 bytes (4-byte lengths) arrive intact
        await _echo_bulk(conn, inbound, 3 << 20)
    finally:
        await a.close()
        await b.close()


async def test_a_path_that_drops_large_datagrams_settles_below_them():
    config = QuicConfig(max_datagram_size=1350, loopback_max_datagram_size=1350)
    a, b, addr, inbound = await _pair(config)
    limit = 9000  # the "path" carries no datagram larger than this
    for transport in (a, b):
        udp = transport._udp
        deliver = udp._on_datagram

        def small_only(data, peer, deliver=deliver):
            if len(data) <= limit:
                deliver(data, peer)

        udp._on_datagram = small_only
    try:
        conn = await a.dial(addr)
        await _wait_for(lambda: conn._quic.pmtu.state is PmtuState.COMPLETE, timeout=30)
        assert limit - 32 <= conn.max_datagram_size <= limit
        await _echo_bulk(conn, inbound, 1 << 20)
        assert conn.is_established
    finally:
        await a.close()
        await b.close()


async def test_without_discovery_the_configured_size_stays():
    config = QuicConfig(
        max_datagram_size=1350, loopback_max_datagram_size=1350, pmtu_discovery=False
    )
    a, b, addr, inbound = await _pair(config)
    try:
        conn = await a.dial(addr)
        await _echo_bulk(conn, inbound, 1 << 20)
        assert conn.max_datagram_size == 1350
    finally:
        await a.close()
        await b.close()
