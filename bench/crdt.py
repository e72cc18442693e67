"""Cluster-state CRDT replication at 1,000 simulated nodes: rounds and bytes to converge.

Runs the production sans-I/O state cores (``latticaray.state``) on the discrete-event simulator
(``latticaray.mesh.sim``): 20 ms one-way latency, gossip flush every 0.1 s (atoms pushed to 2
random peers, announced to 6 more), anti-entropy (digest trie) with one random peer every
1 s. Every replica starts with the same
1,000-entry ``members`` collection (one signed entry per node), installed without traffic.

Scenarios:
  A  one write, whole network connected: time, gossip rounds and bytes until all 1,000 hold it;
     baseline in the same run: eager push only (to 8 peers, no announcements).
  B  50/50 partition, one write on one side, heal: anti-entropy rounds and bytes per round until
     all 1,000 replicas have identical digests.
  C  50/50 partition, 10 writes on each side, heal: same measures.
  D  idle, in sync: bytes per node per anti-entropy round.
Reference (computed in the same run): a full-state exchange, i.e. one replica's whole state sent
once per node per round.

Usage: python bench/crdt.py [--nodes 1000] [--seed 1]
The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import cryptography
import msgpack

from latticaray.state.atoms import encode_atom, encode_value, sign_atom
from latticaray.state.members import MEMBERS
from latticaray.state.simulation import SimCluster


def member_value(index: int, cpu_free: float = 8.0) -> bytes:
    return encode_value(
        {
            "addrs": [f"/ip4/10.{index // 250}.{index % 250}.1/udp/4001/quic-v1"],
            "reachability": "public",
            "resources_total": {"CPU": 8.0, "GPU": 1.0},
            "resources_available": {"CPU": cpu_free, "GPU": 1.0},
            "labels": {"zone": f"z{index % 4}"},
        }
    )


def build(nodes: int, seed: int) -> tuple[SimCluster, int]:
    cluster = SimCluster(nodes, seed=seed)
    atoms = []
    for index, pid in enumerate(cluster.ids):
        core = cluster.cores[pid]
        hlc = core.replica.next_hlc()
        atoms.append(
            sign_atom(core.replica.key_pair, MEMBERS, str(pid), "", hlc, member_value(index))
        )
    cluster.preload(atoms)
    state_bytes = sum(len(msgpack.packb(encode_atom(a), use_bin_type=True)) for a in atoms)
    return cluster, state_bytes


def write(cluster: SimCluster, index: int, cpu_free: float):
    pid = cluster.ids[index]
    core = cluster.cores[pid]
    atom = core.replica.write(MEMBERS, str(pid), "", msgpack.unpackb(member_value(index, cpu_free)))
    cluster.after_write(pid)
    return atom


def spread_one_write(cluster: SimCluster, index: int, cpu_free: float):
    n = len(cluster.ids)
    before_bytes, before_msgs = cluster.net.stats.bytes_sent, cluster.net.stats.messages_sent
    atom = write(cluster, index, cpu_free)
    spread = cluster.run_until(
        lambda: cluster.count_having(atom.slot, atom) == n, timeout=10, check_every=0.01
    )
    sent = cluster.net.stats.bytes_sent - before_bytes
    messages = cluster.net.stats.messages_sent - before_msgs
    cluster.run_until(cluster.converged, timeout=5)
    return spread, sent, messages


def measure_heal(cluster: SimCluster, writes_per_side: tuple[int, int], interval: float) -> dict:
    n = len(cluster.ids)
    left, right = set(cluster.ids[: n // 2]), set(cluster.ids[n // 2 :])
    cluster.net.partition([left, right])
    written = []
    for k in range(writes_per_side[0]):
        written.append(write(cluster, 1 + k, 7.0 - k * 0.1))
    for k in range(writes_per_side[1]):
        written.append(write(cluster, n // 2 + 1 + k, 6.0 - k * 0.1))
    cluster.run_until(lambda: False, timeout=4 * interval)  # spread inside each side
    inside = min(cluster.count_having(a.slot, a) for a in written)
    cluster.net.heal()
    per_round: list[int] = []
    rounds = elapsed = None
    start = cluster.sim.now
    step = 0.05
    for round_index in range(1, 31):
        before = cluster.net.stats.bytes_sent
        round_end = start + round_index * interval
        while cluster.sim.now < round_end - 1e-9:
            cluster.sim.run(until=min(round_end, cluster.sim.now + step))
            if elapsed is None and cluster.converged():
                elapsed = cluster.sim.now - start
        per_round.append(cluster.net.stats.bytes_sent - before)
        if elapsed is not None:
            rounds = round_index
            break
    return {
        "writes": writes_per_side,
        "holders_before_heal": inside,
        "rounds_to_converge": rounds,
        "seconds_to_converge": elapsed,
        "bytes_per_round": per_round,
        "max_bytes_per_node_round": max(per_round) / n if per_round else None,
        "all_hold_every_write": all(cluster.count_having(a.slot, a) == n for a in written),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    n = args.nodes
    wall_start = time.perf_counter()

    cluster, state_bytes = build(n, args.seed)
    gossip_interval = cluster.config.gossip_interval
    ae_interval = cluster.config.anti_entropy_interval
    cluster.run_until(lambda: False, timeout=2 * ae_interval)
    assert cluster.converged(), "preloaded replicas should agree"

    # D: idle in-sync traffic
    before = cluster.net.stats.bytes_sent
    cluster.run_until(lambda: False, timeout=3 * ae_interval)
    idle_per_node_round = (cluster.net.stats.bytes_sent - before) / (3 * n)

    # A: one write, connected (default gossip: eager + lazy), then the eager-only baseline
    spread, a_bytes, a_msgs = spread_one_write(cluster, 0, 7.5)
    config = cluster.config  # shared by every replica
    eager, lazy = config.fanout, config.lazy_fanout
    config.fanout, config.lazy_fanout = eager + lazy, 0
    base_spread, base_bytes, base_msgs = spread_one_write(cluster, 2, 7.4)
    config.fanout, config.lazy_fanout = eager, lazy

    # B and C: partition, heal
    b = measure_heal(cluster, (1, 0), ae_interval)
    cluster.run_until(lambda: False, timeout=2 * ae_interval)
    c = measure_heal(cluster, (10, 10), ae_interval)

    full_state_round = state_bytes * n
    wall = time.perf_counter() - wall_start

    rows = [
        ("nodes", n, ""),
        ("state (members entries / bytes)", f"{n} / {state_bytes}", "every replica"),
        (
            "A: one write -> all nodes",
            f"{spread:.2f} s" if spread is not None else "not reached",
            f"{math.ceil(spread / gossip_interval) if spread else '-'} gossip rounds of "
            f"{gossip_interval} s",
        ),
        (
            "A: traffic for that write",
            f"{a_bytes} B, {a_msgs} msgs",
            f"{a_bytes / n:.0f} B/node (push {eager} + announce {lazy})",
        ),
        (
            "A baseline: eager push only",
            f"{base_spread:.2f} s" if base_spread else "not reached",
            f"{base_bytes / n:.0f} B/node (push to {eager + lazy})",
        ),
        (
            "B: heal, 1 write -> converged",
            f"{b['rounds_to_converge']} AE rounds ({b['seconds_to_converge']:.2f} s)",
            f"round = {ae_interval} s; target <= 3",
        ),
        (
            "B: bytes per round (max, per node)",
            f"{b['max_bytes_per_node_round']:.0f} B",
            f"full-state baseline {state_bytes} B/node",
        ),
        (
            "C: heal, 10+10 writes -> converged",
            f"{c['rounds_to_converge']} AE rounds ({c['seconds_to_converge']:.2f} s)",
            "",
        ),
        (
            "C: bytes per round (max, per node)",
            f"{c['max_bytes_per_node_round']:.0f} B",
            f"full-state baseline {state_bytes} B/node",
        ),
        ("D: idle in-sync traffic", f"{idle_per_node_round:.0f} B/node/round", ""),
        ("simulator wall time", f"{wall:.1f} s", f"{cluster.sim.events_processed} events"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':<28}  note")
    print("-" * (width + 50))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value!s:<28}  {note}")

    figures = {
        "bench": "crdt",
        "nodes": n,
        "seed": args.seed,
        "latency_s": 0.02,
        "gossip_interval_s": gossip_interval,
        "fanout": cluster.config.fanout,
        "anti_entropy_interval_s": ae_interval,
        "state_slots": n,
        "state_bytes": state_bytes,
        "single_write_spread_s": spread,
        "single_write_gossip_rounds": math.ceil(spread / gossip_interval) if spread else None,
        "single_write_bytes": a_bytes,
        "single_write_messages": a_msgs,
        "lazy_fanout": lazy,
        "baseline_eager_only_spread_s": base_spread,
        "baseline_eager_only_bytes": base_bytes,
        "baseline_eager_only_messages": base_msgs,
        "heal_target_met": bool(b["rounds_to_converge"] and b["rounds_to_converge"] <= 3),
        "heal_single_write_rounds": b["rounds_to_converge"],
        "heal_single_write_seconds": b["seconds_to_converge"],
        "heal_single_write_bytes_per_round": b["bytes_per_round"],
        "heal_single_write_max_bytes_per_node_round": b["max_bytes_per_node_round"],
        "heal_single_write_holders_before_heal": b["holders_before_heal"],
        "heal_20_writes_rounds": c["rounds_to_converge"],
        "heal_20_writes_seconds": c["seconds_to_converge"],
        "heal_20_writes_bytes_per_round": c["bytes_per_round"],
        "heal_20_writes_max_bytes_per_node_round": c["max_bytes_per_node_round"],
        "idle_bytes_per_node_round": idle_per_node_round,
        "baseline_full_state_bytes_per_round": full_state_round,
        "all_converged": bool(b["all_hold_every_write"] and c["all_hold_every_write"]),
        "sim_wall_s": round(wall, 2),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {
            "python": sys.version.split()[0],
            "msgpack": ".".join(map(str, msgpack.version)),
            "cryptography": cryptography.__version__,
        },
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
