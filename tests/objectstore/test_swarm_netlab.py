"""Swarming across netlab namespaces with shaped uplinks: a seed on pub1 and four fetchers on one
LAN behind a cone NAT (they dial the seed out through the NAT and reach each other on the LAN), every
host's uplink limited by ``tc tbf``. The fetchers must get most of the object from each other."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netlab_util import NamespaceLoop, lab, netlab_available

from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.objectstore.exchange import ObjectExchange

PREFIX = "h3st"
HOSTS = {
    "pub1": "198.18.0.11",
    "hostA": "198.19.1.10",
    "hostA2": "198.19.1.11",
    "hostA3": "198.19.1.12",
    "hostA4": "198.19.1.13",
}
RATE_MBIT = 40

reason = netlab_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


def _shape(host: str) -> None:
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            f"{PREFIX}-{host}",
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            f"{RATE_MBIT}mbit",
            "burst",
            "64kb",
            "latency",
            "50ms",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_fetchers_behind_a_nat_swarm_over_shaped_links(make_store):
    with lab(PREFIX, "--lan-hosts", "4"):
        for host in HOSTS:
            _shape(host)
        loops = {host: NamespaceLoop(PREFIX, host) for host in HOSTS}
        nodes, exchanges = {}, {}
        try:
            for host, ip in HOSTS.items():

                async def start(host=host, ip=ip):
                    node = MeshNode(MeshConfig(listen=[f"/ip4/{ip}/tcp/0"], transports=("tcp",)))
                    await node.start()
                    exchange = ObjectExchange(node, None, make_store(host, chunk_size=256 * 1024))
                    await exchange.start()
                    return node, exchange

                nodes[host], exchanges[host] = loops[host].run(start(), 30)
            fetchers = [h for h in HOSTS if h != "pub1"]
            for i, host in enumerate(fetchers):  # the seed and the fetchers before it
                targets = [nodes["pub1"].listen_addrs[0]] + [
                    nodes[h].listen_addrs[0] for h in fetchers[:i]
                ]

                async def connect(host=host, targets=targets):
                    for addr in targets:
                        await nodes[host].connect(Multiaddr.parse(str(addr)))

                loops[host].run(connect(), 30)
            value = np.random.default_rng(4).integers(0, 255, 16 << 20, dtype=np.uint8)
            cid = exchanges["pub1"].store.put(value)
            futures = [loops[h].submit(exchanges[h].fetch(cid, timeout=120)) for h in fetchers]
            assert [f.result(150) for f in futures] == [cid] * len(fetchers)
            for host in fetchers:
                np.testing.assert_array_equal(exchanges[host].store.get(cid), value)
            sent = {
                h: sum(ledger.sent for ledger in exchanges[h].ledgers.peers.values()) for h in HOSTS
            }
            total = sum(sent.values())
            assert total >= len(fetchers) * value.nbytes
            # without swarming the seed would send everything (share 1.0); the ideal is 1/4
            assert sent["pub1"] / total < 0.5, sent
            assert all(sent[h] > 0 for h in fetchers), sent
        finally:
            for host, exchange in exchanges.items():
                loops[host].run(exchange.stop(), 30)
            for host, node in nodes.items():
                loops[host].run(node.stop(), 30)
            for loop in loops.values():
                loop.stop()
