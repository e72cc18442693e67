"""Routing table invariants under arbitrary sequences of observations, failures and pings."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.dht.keyspace import Contact, bucket_index, dht_id
from latticaray.mesh.dht.routing import RoutingTable

K = 4  # small buckets so that they fill up under hypothesis-sized inputs


def _contact(i: int) -> Contact:
    return Contact(b"peer-%d" % i)


def _check_invariants(table: RoutingTable, local_id: int) -> None:
    contents = table.bucket_contents()
    seen: set[bytes] = set()
    for index, contacts in contents.items():
        assert len(contacts) <= table.k
        for c in contacts:
            assert bucket_index(local_id, c.node_id) == index
            assert c.peer_id not in seen
            assert c.node_id != local_id
            seen.add(c.peer_id)
    assert len(table) == len(seen)
    for index, repl in table.replacement_contents().items():
        assert len(repl) <= table.replacement_size
        for c in repl:
            assert bucket_index(local_id, c.node_id) == index
            assert c.peer_id not in seen, "a contact is both live and a replacement"


actions = st.lists(
    st.tuples(
        st.sampled_from(["observe", "fail", "ping_ok", "ping_dead", "remove"]), st.integers(0, 200)
    ),
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(actions=actions, local=st.integers(0, 10_000), target=st.integers(0, 400))
def test_invariants_hold_and_closest_is_exact(actions, local, target):
    local_pid = b"local-%d" % local
    local_id = dht_id(local_pid)
    table = RoutingTable(local_id, k=K, replacement_size=3, max_failures=2, ping_interval=0.0)
    now = 0.0
    for action, i in actions:
        now += 1.0
        c = _contact(i)
        if action == "observe":
            to_ping = table.observe(c, now)
            if to_ping is not None:
                assert to_ping.peer_id in table
        elif action == "fail":
            table.failed(c.peer_id, now)
        elif action == "ping_ok":
            table.ping_result(c.peer_id, True, now)
        elif action == "ping_dead":
            table.ping_result(c.peer_id, False, now)
            assert c.peer_id not in table
        else:
            table.remove(c.peer_id)
            assert c.peer_id not in table
        _check_invariants(table, local_id)
    target_id = dht_id(b"target-%d" % target)
    everything = table.contacts()
    for count in (1, K, 3 * K, 1000):
        expected = sorted(everything, key=lambda c: c.node_id ^ target_id)[:count]
        assert table.closest(target_id, count) == expected
    expected_self = sorted(everything, key=lambda c: c.node_id ^ local_id)[:K]
    assert table.closest(local_id, K) == expected_self


def test_full_bucket_keeps_live_contacts_and_replaces_dead_ones():
    local_id = 0
    table = RoutingTable(local_id, k=2, replacement_size=2, ping_interval=0.0)
    # three contacts that all land in the same (top) bucket
    same = [c for c in (Contact(b"p%d" % i) for i in range(200)) if c.node_id >> 255][:3]
    a, b, c = same
    assert table.observe(a, 1.0) is None and table.observe(b, 2.0) is None
    to_ping = table.observe(c, 3.0)
    assert to_ping == a, "the least recently seen entry is pinged"
    assert c.peer_id not in table and table.replacement_contents()[255] == [c]
    table.ping_result(a.peer_id, True, 4.0)
    assert a.peer_id in table and c.peer_id not in table
    assert table.bucket_contents()[255] == [b, a], "a pinged-alive entry becomes most recent"
    assert table.observe(c, 5.0) == b
    table.ping_result(b.peer_id, False, 6.0)
    assert table.bucket_contents()[255] == [a, c], "a dead entry gives way to the replacement"


def test_failures_evict_after_threshold_and_refresh_targets_the_bucket():
    table = RoutingTable(0, k=20, max_failures=2, refresh_interval=10.0)
    c = Contact(b"x")
    table.observe(c, 0.0)
    assert table.failed(c.peer_id, 1.0) is False
    assert table.failed(c.peer_id, 2.0) is True
    assert c.peer_id not in table
    table.observe(c, 3.0)
    index = bucket_index(0, c.node_id)
    assert table.stale_buckets(5.0) == []
    assert table.stale_buckets(11.0) == [index]
    table.touch(c.node_id, 11.0)
    assert table.stale_buckets(12.0) == []
    rng = random.Random(1)
    for i in (0, 1, 7, 200, 255):
        assert bucket_index(0, table.random_id_in_bucket(i, rng)) == i
