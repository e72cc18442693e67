"""Path MTU discovery's sans-I/O search (RFC 8899); connections using it: tests/mesh/test_quic.py."""

import pytest

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
    search.cap(1250)  # below the base: base and confirmed size come down too
    assert search.state is PmtuState.DISABLED
    assert search.ceiling == search.base == search.confirmed == 1250


def test_no_search_where_the_ceiling_is_the_base():
    search = PmtuSearch(1350, 1350)
    assert search.state is PmtuState.DISABLED and search.next_probe(0.0) is None
    with pytest.raises(ValueError):
        PmtuSearch(0, 1500)


def test_the_local_route_tells_the_ceiling():
    # loopback's MTU is 64 KiB: the largest IPv4 UDP payload fits
    assert route_max_payload(("127.0.0.1", 9)) == 65507
    assert 65000 < route_max_payload(("::1", 9)) <= 65536 - 48
