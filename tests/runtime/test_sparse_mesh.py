"""Sparse peering (`peering="sparse"`): the bounded neighbourhood and what evicts a peer from it.

The driver (this process, the mesh's first node) and node processes on loopback. A node keeps
live views of at most `max_neighbours` peers; past that it evicts the least recently used one
it has no stake in and tells it (a `drop` view). An evicted peer stays a member: `nodes()` still
lists it (from the CRDT `members` collection) and work placed on it meets it again. A peer that
needs us (we are its bootstrap) goes on pushing views and is kept.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import latticaray as lattica
from latticaray.runtime import api
from latticaray.runtime.remote.membership import DROP_GRACE
from tests.runtime.meshutil import NodeProcess, alive_nodes, driver_with_nodes, wait_for


@lattica.remote
def whereami():
    return lattica.get_runtime_context().node_id


def on_loop(fn):
    """Run ``fn()`` on the driver's event loop (where the membership lives); its result."""
    runtime = api._runtime
    assert runtime is not None and runtime.loop is not None

    async def call():
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), runtime.loop).result(10)


def membership():
    runtime = api._runtime
    assert runtime is not None
    return runtime.node.remote.membership


def run_on(node_id: str) -> str:
    strategy = lattica.NodeAffinitySchedulingStrategy(node_id, soft=False)
    return lattica.get(whereami.options(scheduling_strategy=strategy).remote(), timeout=60)


def test_full_is_the_default_and_sparse_is_an_option():
    with pytest.raises(ValueError, match="peering is 'full' or 'sparse'"):
        lattica.init(_mesh=True, peering="ring")
    with pytest.raises(ValueError, match="applies to a mesh node"):
        lattica.init(peering="sparse")
    with pytest.raises(ValueError, match="option of the node"):
        lattica.init(address="unix:/nonexistent.sock", peering="sparse")
    with driver_with_nodes(0):
        assert on_loop(lambda: membership().remote.sparse) is False
    with driver_with_nodes(1, peering="sparse"):
        assert on_loop(lambda: membership().remote.sparse) is True


def test_evicted_peer_is_dropped_on_both_sides_and_met_again_when_used():
    with driver_with_nodes(1, peering="sparse") as cluster:
        a = cluster["nodes"][0]
        # B joins through A: the driver is not its bootstrap, it meets B by introduction
        b = NodeProcess(a.info["addrs"][0], cluster["invite"], extra_args=("--peering", "sparse"))
        cluster["nodes"].append(b)
        wait_for(lambda: on_loop(lambda: membership().is_alive(b.node_id)), 30, "B introduced")
        # B swapped its invite for a credential bound to it (at the driver, the only node
        # holding the mesh key): it needs nothing of the driver from now on
        wait_for(
            lambda: on_loop(lambda: membership().remote.stats["credentials_renewed"]) >= 2,
            30,
            "A and B renewed",
        )
        # A is used (what the caller, objects and refs do before they send to a peer): B is the
        # least recently used. (No task here: demand would have placement meet advertisers.)
        assert on_loop(lambda: membership().alive_peer(a.node_id)) is not None
        evicted = on_loop(lambda: membership().remote.stats["peers_evicted"])

        def shrink():
            m = membership()
            m.max_neighbours = 1
            m.trim()
            return m.alive_peers(), m.remote.stats["peers_evicted"]

        alive, now_evicted = on_loop(shrink)
        assert alive == [a.node_id]
        assert now_evicted == evicted + 1
        # B stays a member: listed from the CRDT members collection, with its resources
        wait_for(lambda: b.node_id in alive_nodes(), 30, f"B listed: {lattica.nodes()}")
        # B took the `drop` (the driver is nothing to it) and stopped pushing views: the driver
        # does not take it back as a peer that needs it (A, whose bootstrap it is, would be),
        # well past the grace for views already on their way
        deadline = time.monotonic() + 3 * DROP_GRACE
        while time.monotonic() < deadline:
            assert on_loop(lambda: membership().pinned(b.node_id)) != "it needs us"
            time.sleep(0.1)
        # work placed on B meets it again
        assert run_on(b.node_id) == b.node_id
        assert on_loop(lambda: membership().is_alive(b.node_id))


def test_a_peer_that_needs_us_is_kept():
    with driver_with_nodes(2, peering="sparse") as cluster:
        nodes = cluster["nodes"]
        wait_for(
            lambda: on_loop(lambda: len(membership().alive_peers())) == 2, 30, "both nodes met"
        )

        def shrink():
            m = membership()
            m.max_neighbours = 1
            m.trim()
            return len(m.alive_peers())

        assert on_loop(shrink) == 1
        # the driver is both nodes' bootstrap: the evicted one goes on pushing views, and is
        # taken back (held, not evicted again at once) beyond the bound
        wait_for(
            lambda: on_loop(lambda: len(membership().alive_peers())) == 2, 30, "evicted one back"
        )
        reasons = on_loop(lambda: membership().neighbourhood()["pinned"])
        assert "it needs us" in reasons.values()
        assert {run_on(n.node_id) for n in nodes} == {n.node_id for n in nodes}
