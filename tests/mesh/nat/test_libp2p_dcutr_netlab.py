"""DCUtR on the libp2p wire between two of our MeshNodes behind real kernel NATs (netlab).

Our relay (circuit relay v2) on pub1; one node in hostA behind natA, one in hostB behind natB
(cone NATs: each keeps the source port of the node's QUIC socket). B reserves on the relay, A
dials B through it; B (having accepted the relayed connection) starts DCUtR; after SYNC both
dial the other's natted QUIC address from their listening sockets, so each side's Initials open
its own NAT for the other's, and a direct QUIC connection carries a ping. Each node advertises
its NAT's mapping by hand (what AutoNAT would confirm), like ``tests/interop/test_dcutr_netlab.py``
does with js.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from latticaray.mesh.libp2p.dcutr import DcutrRole
from latticaray.mesh.nat.libp2p_relay import Libp2pRelayService
from latticaray.mesh.node import MeshConfig, MeshNode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from netlab_util import NamespaceLoop

pytestmark = pytest.mark.netlab

PORT = 4201
HOSTS = {"pub1": "198.18.0.11", "hostA": "198.19.1.10", "hostB": "198.19.2.10"}
WAN = {"hostA": "198.18.0.101", "hostB": "198.18.0.102"}


async def _start(ip: str) -> MeshNode:
    node = MeshNode(MeshConfig(listen=[f"/ip4/{ip}/udp/{PORT}/quic-v1"], transports=("quic",)))
    return await node.start()


async def _direct_to(node: MeshNode, peer, timeout: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        done = [u for u in node.circuits.dcutr.upgrades if u.direct]
        for conn in node.connections.connections(peer):
            if conn.transport == "quic" and done:
                return conn, done[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no direct connection: upgrades {node.circuits.dcutr.upgrades}")


def test_dcutr_between_our_nodes_behind_two_cone_nats(nat_lab):
    prefix, _ = nat_lab
    loops = {host: NamespaceLoop(prefix, host) for host in HOSTS}
    nodes: dict[str, MeshNode] = {}
    service: Libp2pRelayService | None = None
    try:
        for host, ip in HOSTS.items():
            nodes[host] = loops[host].run(_start(ip))

        async def serve():
            relay = Libp2pRelayService(nodes["pub1"])
            relay.start()
            return relay

        service = loops["pub1"].run(serve())
        for host in ("hostA", "hostB"):
            nodes[host].add_advertised_addrs([f"/ip4/{WAN[host]}/udp/{PORT}/quic-v1"])
        a, b = nodes["hostA"], nodes["hostB"]
        relay_addr = nodes["pub1"].listen_addrs[0]
        reservation = loops["hostB"].run(b.circuits.reserve(relay_addr))
        peer_b = loops["hostA"].run(a.connect(reservation.circuit_addr, timeout=15))
        assert peer_b == b.peer_id
        conn, upgrade = loops["hostB"].run(_direct_to(b, a.peer_id))
        assert upgrade.role is DcutrRole.INITIATOR and upgrade.rtt is not None
        assert str(conn.remote_addr).startswith(f"/ip4/{WAN['hostA']}/udp/{PORT}/quic-v1")
        conn_a, upgrade_a = loops["hostA"].run(_direct_to(a, b.peer_id))
        assert upgrade_a.role is DcutrRole.RESPONDER
        assert str(conn_a.remote_addr).startswith(f"/ip4/{WAN['hostB']}/udp/{PORT}/quic-v1")

        async def ping_direct(node: MeshNode, peer):
            primary = node.connection_to(peer)
            assert primary is not None and primary.transport == "quic"
            return await node.ping(peer)

        assert loops["hostA"].run(ping_direct(a, b.peer_id)) >= 0
        assert loops["hostB"].run(ping_direct(b, a.peer_id)) >= 0
    finally:
        if service is not None:
            loops["pub1"].run(service.stop())
        for host, node in nodes.items():
            loops[host].run(node.stop())
        for loop in loops.values():
            loop.stop()
