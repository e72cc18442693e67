"""Demo: start a 3-node local mesh (3 OS processes on loopback) and run RPC across all pairs.

Run with ``make demo-mesh`` (or ``.venv/bin/python examples/mesh_demo.py``). What it shows:

1. ``latticaray up``: three node processes, each with its own Ed25519 identity, listening on QUIC,
   TCP+TLS and a same-host Unix socket; nodes 1 and 2 bootstrap to node 0.
2. Every node calls every other node (ping + echo RPC over mutually authenticated connections),
   dialing by peer ID: the connection manager picks the transport.
3. A driver node in this process calls each node too, then runs identify to show what a peer
   learns about another (listen addresses, observed address, protocols).
4. ``latticaray down`` stops the processes it started.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from latticaray.cli import ECHO_PROTOCOL, mesh_down, mesh_status, mesh_up
from latticaray.mesh.identity import PeerId
from latticaray.mesh.node import MeshConfig, MeshNode


async def drive(state: dict) -> int:
    failures = 0
    driver = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",)))
    await driver.start()
    try:
        print(f"\n3. driver node {driver.peer_id} (in this process) calls each node over QUIC:")
        for n in state["nodes"]:
            peer = PeerId.from_string(n["peer_id"])
            driver.add_addrs(peer, n["listen"])
            start = time.perf_counter()
            reply = await driver.call(peer, ECHO_PROTOCOL, b"hello node%d" % n["index"], timeout=10)
            ms = (time.perf_counter() - start) * 1000
            print(f"   node{n['index']} echoed {reply!r} in {ms:.1f} ms")
            failures += reply != b"hello node%d" % n["index"]
        info = await driver.identify(PeerId.from_string(state["nodes"][0]["peer_id"]))
        print("   identify(node0):")
        print(
            f"     agent {info.agent_version}, {len(info.protocols)} protocols: "
            f"{', '.join(info.protocols)}"
        )
        for addr in info.listen_addrs:
            print(f"     listens on {addr}")
        print(
            f"     sees the driver at {info.observed_addr} (the driver's one UDP socket: "
            f"{driver.quic.listen_addr})"
        )
    finally:
        await driver.stop()
    return failures


def main() -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="latticaray-demo-"))
    print(f"1. starting a 3-node local mesh (run dir {run_dir})")
    failures = 0
    try:
        state = mesh_up(3, run_dir)
        for n in state["nodes"]:
            print(f"   node{n['index']}  pid {n['pid']}  {n['peer_id']}")
            for addr in n["listen"]:
                print(f"       {addr}")
        print("\n2. every node pings and calls echo on every other node (dial by peer ID):")
        state, report = mesh_status(run_dir, check=True)
        for n in state["nodes"]:
            entry = report.get(n["index"], {})
            if "error" in entry:
                failures += 1
                print(f"   node{n['index']}: ERROR {entry['error']}")
            for peer, result in sorted(entry.get("ping", {}).items()):
                target = next(o["index"] for o in state["nodes"] if o["peer_id"] == peer)
                if result.get("ok"):
                    print(
                        f"   node{n['index']} -> node{target}: ok over {result['transport']:4}, "
                        f"ping rtt {result['rtt_ms']:.2f} ms"
                    )
                else:
                    failures += 1
                    print(f"   node{n['index']} -> node{target}: FAILED {result.get('error')}")
        failures += asyncio.run(drive(state))
    finally:
        stopped = mesh_down(run_dir)
        print(f"\n4. latticaray down: stopped {len(stopped)} node processes {stopped}")
    print("\ndemo " + ("OK" if failures == 0 else f"had {failures} failures"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
