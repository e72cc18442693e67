"""Liveness of watched peers between real nodes on loopback: keepalives, redial, down, not slow."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_rpc_support import wait_until

from latticaray.mesh.liveness import LivenessConfig, PeerLiveness
from latticaray.mesh.node import MeshConfig, MeshNode, NodeThread

TCP_ONLY = {"listen": ["/ip4/127.0.0.1/tcp/0"], "transports": ("tcp",)}
#: Fast settings so tests take seconds: probe every 0.2 s, DOWN after >= 1.5 s of silence.
FAST = LivenessConfig(
    probe_interval=0.2,
    probe_timeout=0.4,
    min_sample_interval=0.05,
    min_std=0.1,
    acceptable_pause=0.4,
    min_down_after=1.5,
    min_missed_probes=3,
    redial_initial=0.05,
    redial_max=0.5,
)


@pytest.fixture
async def watcher():
    a = await MeshNode(MeshConfig(**TCP_ONLY, liveness=FAST)).start()
    changes = []
    a.on_peer_liveness(changes.append)
    yield a, changes
    await a.stop()


@pytest.fixture
async def watched(watcher):
    """A second node that the watcher is connected to and watches."""
    a, changes = watcher
    b = await MeshNode(MeshConfig(**TCP_ONLY)).start()
    try:
        await a.connect(b.listen_addrs[0])
        a.liveness.watch(b.peer_id)
        yield a, changes, b
    finally:
        await b.stop()


async def test_a_connected_peer_stays_alive_on_keepalives(watched):
    a, changes, b = watched
    pings = []
    original = a.ping

    async def counting_ping(peer, timeout=10.0):
        pings.append(peer)
        return await original(peer, timeout)

    a.ping = counting_ping
    await asyncio.sleep(2.0)
    assert len(pings) >= 4, "a quiet peer is probed about every probe_interval"
    assert changes == []
    assert a.liveness.state(b.peer_id) is PeerLiveness.ALIVE
    assert a.liveness.phi(b.peer_id) < FAST.suspect_phi


async def test_a_broken_connection_is_redialed_and_the_peer_is_never_down(watched):
    a, changes, b = watched
    await asyncio.sleep(0.5)
    for _ in range(3):
        first = a.connection_to(b.peer_id)
        first.session.channel.abort()  # the link breaks under us
        await wait_until(lambda first=first: a.connection_to(b.peer_id) not in (None, first), 5.0)
        await asyncio.sleep(0.3)
    assert PeerLiveness.DOWN not in [c.state for c in changes]
    assert a.liveness.state(b.peer_id) is PeerLiveness.ALIVE
    # and it still works
    assert await a.ping(b.peer_id, timeout=5) >= 0


async def test_a_stopped_peer_is_reported_down_then_alive_when_it_returns(watcher):
    a, changes = watcher
    b_config = MeshConfig(**TCP_ONLY)
    b = await MeshNode(b_config).start()
    await a.connect(b.listen_addrs[0])
    a.liveness.watch(b.peer_id)
    await asyncio.sleep(0.5)
    addr = b.listen_addrs[0]
    stopped = time.monotonic()
    await b.stop()
    await wait_until(lambda: a.liveness.state(b.peer_id) is PeerLiveness.DOWN, 10.0)
    took = time.monotonic() - stopped
    assert took <= 6.0, took  # silent_for (below) counts from the last bytes heard
    down = [c for c in changes if c.state is PeerLiveness.DOWN]
    assert len(down) == 1 and down[0].silent_for >= FAST.min_down_after
    # the same peer comes back on the same port: the redials that kept going find it
    back = await MeshNode(
        MeshConfig(listen=[str(addr.without_peer())], transports=("tcp",), key=b.key)
    ).start()
    try:
        await wait_until(lambda: a.liveness.state(b.peer_id) is PeerLiveness.ALIVE, 10.0)
        assert changes[-1].state is PeerLiveness.ALIVE
    finally:
        await back.stop()


async def test_a_slow_peer_is_not_down(watcher):
    """The watched peer's event loop blocks for 1 s at a time (a slow worker): keepalives go
    unanswered meanwhile, but it is never reported DOWN."""
    a, changes = watcher

    async def block(ctx, payload):
        time.sleep(1.0)  # noqa: ASYNC251  (blocks the peer's whole loop, on purpose)
        return b"done"

    with NodeThread(MeshConfig(**TCP_ONLY)) as slow:
        slow.node.register_unary("/test/block/1", block)
        peer = await a.connect(slow.node.listen_addrs[0])
        a.liveness.watch(peer)
        for _ in range(4):
            assert await a.call(peer, "/test/block/1", b"", timeout=10) == b"done"
            await asyncio.sleep(0.2)
        assert PeerLiveness.DOWN not in [c.state for c in changes]
        assert a.liveness.state(peer) is PeerLiveness.ALIVE


async def test_unwatched_peers_are_not_probed(watcher):
    a, changes = watcher
    b = await MeshNode(MeshConfig(**TCP_ONLY)).start()
    try:
        await a.connect(b.listen_addrs[0])
        assert a.liveness.state(b.peer_id) is None
        a.liveness.watch(b.peer_id)
        a.liveness.unwatch(b.peer_id)
        await b.stop()
        await asyncio.sleep(2.0)
        assert changes == [] and a.liveness.state(b.peer_id) is None
        assert a.connection_to(b.peer_id) is None  # nobody redialed it
    finally:
        await b.stop()
