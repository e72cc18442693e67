"""The asyncio driver (StateService) over an in-process stand-in for the mesh node's RPC.

These exercise the driver's own logic (dispatch, replies fed back, timers, heartbeats, peer
refresh, snapshots, error mapping). The real-QUIC mesh test is test_cluster_mesh.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from latticaray.mesh.errors import PeerUnreachable, RpcError
from latticaray.state import ReplicationConfig
from latticaray.state.replication import PROTOCOL_ID
from latticaray.state.service import StateService
from latticaray.state.simulation import deterministic_key

FAST = ReplicationConfig(gossip_interval=0.02, anti_entropy_interval=0.2)


class _Ctx:
    def __init__(self, peer_id) -> None:
        self.peer_id = peer_id


class InProcessHub:
    """Routes unary calls between stand-in nodes; ``blocked`` pairs model a partition."""

    def __init__(self) -> None:
        self.nodes: dict = {}
        self.blocked: set[frozenset] = set()

    def partition(self, left, right) -> None:
        self.blocked = {frozenset((a, b)) for a in left for b in right}

    def heal(self) -> None:
        self.blocked = set()


class InProcessNode:
    def __init__(self, hub: InProcessHub, index: int) -> None:
        self.key = deterministic_key(11, index)
        self.peer_id = self.key.peer_id
        self.listen_addrs = [f"/ip4/127.0.0.1/tcp/{4000 + index}/p2p/{self.peer_id}"]
        self.hub = hub
        self.handlers = {}
        hub.nodes[self.peer_id] = self

    def register_unary(self, service, handler) -> None:
        self.handlers[service] = handler

    def unregister(self, service) -> None:
        self.handlers.pop(service, None)

    def connected_peers(self):
        return [
            p
            for p in self.hub.nodes
            if p != self.peer_id and frozenset((p, self.peer_id)) not in self.hub.blocked
        ]

    async def call(self, peer_id, service, payload, timeout=5.0):
        target = self.hub.nodes.get(peer_id)
        if target is None or frozenset((peer_id, self.peer_id)) in self.hub.blocked:
            raise PeerUnreachable(f"{peer_id} unreachable")
        handler = target.handlers.get(service)
        if handler is None:
            raise RpcError("UNIMPLEMENTED", service)
        async with asyncio.timeout(timeout):
            return await handler(_Ctx(self.peer_id), payload)


async def wait_for(predicate, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_driver_replicates_partitions_heals_and_converges():
    hub = InProcessHub()
    nodes = [InProcessNode(hub, i) for i in range(6)]
    states = [StateService(n, config=FAST, heartbeat_interval=0.5) for n in nodes]
    for s in states:
        await s.start()
    try:
        await wait_for(lambda: all(len(s.members.alive()) == 6 for s in states))
        left, right = [n.peer_id for n in nodes[:3]], [n.peer_id for n in nodes[3:]]
        hub.partition(left, right)
        states[0].jobs.submit("job-left")
        states[5].jobs.submit("job-right")
        states[1].actors.claim("svc", "a-left")
        await asyncio.sleep(0.05)
        states[4].actors.claim("svc", "a-right")
        await wait_for(lambda: all(s.jobs.get("job-left") for s in states[:3]))
        await wait_for(lambda: all(s.jobs.get("job-right") for s in states[3:]))
        assert all(s.jobs.get("job-right") is None for s in states[:3])
        hub.heal()
        await wait_for(
            lambda: all(s.jobs.get("job-left") and s.jobs.get("job-right") for s in states)
        )
        await wait_for(lambda: len({s.actors.get("svc").actor_id for s in states}) == 1)
        assert states[0].actors.get("svc").actor_id == "a-left"
    finally:
        for s in states:
            await s.stop()


async def test_driver_maps_bad_input_and_non_members_to_rpc_errors():
    hub = InProcessHub()
    a, b = InProcessNode(hub, 0), InProcessNode(hub, 1)
    state = StateService(a, config=FAST, is_member=lambda peer: peer == a.peer_id)
    await state.start()
    try:
        with pytest.raises(RpcError) as info:
            await b.call(a.peer_id, PROTOCOL_ID, b"\x93\x01\x02\x03")
        assert info.value.code == "PERMISSION_DENIED"
    finally:
        await state.stop()
    state = StateService(a, config=FAST)
    await state.start()
    try:
        with pytest.raises(RpcError) as info:
            await b.call(a.peer_id, PROTOCOL_ID, b"\xc1garbage")
        assert info.value.code == "INVALID_ARGUMENT"
    finally:
        await state.stop()


async def test_restart_from_snapshot_resumes_without_full_resync(tmp_path):
    hub = InProcessHub()
    nodes = [InProcessNode(hub, i) for i in range(3)]
    paths = [str(tmp_path / f"state-{i}.snap") for i in range(3)]
    states = [StateService(n, config=FAST, snapshot_path=p) for n, p in zip(nodes, paths)]
    for s in states:
        await s.start()
    try:
        for i in range(20):
            states[i % 3].lww_map("kv").set(f"k{i}", i)
        for s in states[1:]:
            s.lww_map("kv")
        await wait_for(lambda: all(len(s.lww_map("kv").keys()) == 20 for s in states))
        await states[2].stop()
        restarted = StateService(nodes[2], config=FAST, snapshot_path=paths[2])
        restarted.lww_map("kv")
        await restarted.start()
        states[2] = restarted
        assert restarted.snapshot_load.loaded >= 23  # 20 keys + 3 member entries
        assert len(restarted.lww_map("kv").keys()) == 20  # before any anti-entropy ran
        sent_before = sum(s.replica.stats.bytes_sent["aer"] for s in states[:2])
        await restarted.anti_entropy_with(nodes[0].peer_id)
        sent = sum(s.replica.stats.bytes_sent["aer"] for s in states[:2]) - sent_before
        assert sent < 2000, sent  # a digest exchange, not the state
    finally:
        for s in states:
            await s.stop()
