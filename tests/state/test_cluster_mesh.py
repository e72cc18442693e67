"""StateService on real MeshNodes (QUIC over loopback): partition, write both sides, heal, converge.

The partition stops traffic between two groups at each node's boundary: cross-group connections
are closed, cross-group calls are refused before dialing, and cross-group requests that still
arrive are rejected. Everything else is the production path: QUIC, mutual TLS, RPC, the state
service, member addresses learned from the CRDT and dialed through the peer store.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from latticaray.mesh.errors import PeerUnreachable, RpcError
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.state import ReplicationConfig
from latticaray.state.service import StateService
from latticaray.state.simulation import deterministic_key

FAST = ReplicationConfig(gossip_interval=0.05, anti_entropy_interval=0.3)


class Firewall:
    def __init__(self) -> None:
        self.blocked: set[frozenset] = set()

    def allows(self, a, b) -> bool:
        return frozenset((a, b)) not in self.blocked


class PartitionableNode:
    """A MeshNode seen through a firewall that can cut it off from a set of peers."""

    def __init__(self, node: MeshNode, firewall: Firewall) -> None:
        self._node, self._firewall = node, firewall
        self.key, self.peer_id = node.key, node.peer_id

    @property
    def listen_addrs(self):
        return self._node.listen_addrs

    def add_addrs(self, peer_id, addrs) -> None:
        self._node.add_addrs(peer_id, addrs)

    def connected_peers(self):
        return [p for p in self._node.connected_peers() if self._firewall.allows(self.peer_id, p)]

    def register_unary(self, service, handler) -> None:
        async def guarded(ctx, payload):
            if not self._firewall.allows(self.peer_id, ctx.peer_id):
                raise RpcError("UNAVAILABLE", "partitioned")
            return await handler(ctx, payload)

        self._node.register_unary(service, guarded)

    def unregister(self, service) -> None:
        self._node.unregister(service)

    async def call(self, peer_id, service, payload, timeout=None):
        if not self._firewall.allows(self.peer_id, peer_id):
            raise PeerUnreachable(f"{peer_id.short()} is across the partition")
        return await self._node.call(peer_id, service, payload, timeout=timeout)


async def wait_for(predicate, timeout: float = 60.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.timeout(110)
async def test_six_mesh_nodes_partition_write_both_sides_heal_and_converge(record_property):
    firewall = Firewall()
    nodes: list[MeshNode] = []
    states: list[StateService] = []
    try:
        for i in range(6):
            config = MeshConfig(
                listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
                key=deterministic_key(21, i),
                same_host_fast_path=False,
                transports=("quic",),
                bootstrap=[nodes[0].listen_addrs[0]] if nodes else [],
            )
            node = MeshNode(config)
            await node.start()
            nodes.append(node)
        for node in nodes:
            state = StateService(
                PartitionableNode(node, firewall),
                config=FAST,
                heartbeat_interval=0.5,
                call_timeout=3.0,
            )
            await state.start()
            states.append(state)
        # every node learns every other from the members CRDT (only node 0 was dialed directly)
        await wait_for(lambda: all(len(s.members.alive()) == 6 for s in states))
        left, right = nodes[:3], nodes[3:]
        firewall.blocked = {frozenset((a.peer_id, b.peer_id)) for a in left for b in right}
        for a in left:
            for b in right:
                await a.disconnect(b.peer_id)
        # write on both sides, including a conflicting named-actor claim and a shared LWW key
        for s in states:
            s.lww_map("config")
        states[0].jobs.submit("job-left")
        states[0].lww_map("config").set("mode", "left")
        states[1].actors.claim("svc", "actor-left")
        await asyncio.sleep(0.05)
        states[4].jobs.submit("job-right")
        states[4].actors.claim("svc", "actor-right")
        states[5].lww_map("config").set("mode", "right")
        lost = []
        states[4].actors.on_claim_lost(lambda name, mine, winner: lost.append((name, winner)))
        await wait_for(
            lambda: (
                all(s.jobs.get("job-left") for s in states[:3])
                and all(s.jobs.get("job-right") for s in states[3:])
            )
        )
        assert all(s.jobs.get("job-right") is None for s in states[:3])
        assert all(s.actors.get("svc").actor_id == "actor-right" for s in states[3:])
        firewall.blocked = set()
        healed = time.monotonic()

        def converged() -> bool:
            digests = {s.core.store.node(0, 0) for s in states}
            return len(digests) == 1 and all(
                s.jobs.get("job-left") and s.jobs.get("job-right") for s in states
            )

        # heartbeats keep changing the state, so "converged" is a moment where all digests agree
        await wait_for(converged)
        elapsed = time.monotonic() - healed
        record_property("state_converge_after_heal_s", round(elapsed, 3))
        print(f"\n6 QUIC mesh nodes converged {elapsed:.2f} s after the heal")
        assert {s.actors.get("svc").actor_id for s in states} == {"actor-left"}
        assert len({s.lww_map("config").get("mode") for s in states}) == 1
        await wait_for(lambda: lost == [("svc", lost[0][1])] if lost else False, timeout=10)
        assert lost[0][1].actor_id == "actor-left"
    finally:
        for s in states:
            await s.stop()
        for node in nodes:
            await node.stop()
