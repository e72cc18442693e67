"""DHT benchmarks.

Simulated (the real sans-I/O core on a virtual network and clock, deterministic from a seed):
for N nodes, build the network with Kademlia's join procedure, store values, then measure GETs
without churn and while 20% of the nodes leave and 20% new ones join: success rate, hops per
lookup (median, p99) and messages per lookup.

Real: DhtService on M MeshNodes in this process over loopback QUIC connections; store and get
latency p50/p99 (one operation at a time, from random nodes).

    .venv/bin/python bench/dht.py            # N = 100, 1,000, 10,000 + 64 real nodes
    .venv/bin/python bench/dht.py --quick    # N = 100, 1,000 + 32 real nodes

The last line of output is one JSON object with every figure, the machine and the versions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latticaray.mesh.dht.config import DhtConfig
from latticaray.mesh.dht.records import Record
from latticaray.mesh.sim.dht import SimDht


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(
    n: int, seed: int, values: int, gets: int, join_refresh: str | int, churn_window: float = 120.0
) -> dict:
    cpu0, wall0 = time.process_time(), time.time()
    sim = SimDht(
        seed=seed,
        config=DhtConfig(request_timeout=2.0, stall_timeout=0.5),
        join_refresh=join_refresh,
    )
    sim.grow(n, join_interval=0.02)
    build_cpu = time.process_time() - cpu0
    build_messages = sim.net.stats.messages_sent
    rng = random.Random(seed)
    ids = sorted(sim.nodes)
    stored: dict[bytes, bytes] = {}
    expiration = sim.sim.now + 24 * 3600
    for i in range(values):
        pid = rng.choice(ids)
        core = sim.nodes[pid]
        record = Record.create(b"bench/%d" % i, b"value-%d" % i, expiration, sim.keypairs[pid])
        sim.run_until_done(core, core.put([record], sim.sim.now))
        stored[record.key] = record.value
    keys = sorted(stored)

    def get_phase(count: int, churn: bool) -> dict:
        results: list[tuple[bool, int | None, int]] = []
        start = sim.sim.now
        leaving: set[bytes] = set()

        def issue() -> None:
            # lookups start at nodes that stay up: a GET whose own node crashes has no outcome
            live = [p for p in sim._joined_list() if p not in leaving]
            origin = sim.nodes[rng.choice(live)]
            key = rng.choice(keys)

            def done(op) -> None:
                record = op.result.get(None)
                results.append(
                    (record is not None and record.value == stored[key], op.hops, op.messages)
                )

            sim.run_op(origin, origin.get_value(key, sim.sim.now), done)

        if churn:
            leavers = rng.sample(ids, n // 5)
            leaving.update(leavers)
            for pid in leavers:
                sim.sim.call_at(start + rng.uniform(0, churn_window), sim.leave, pid)
            for _ in range(n // 5):
                core = sim.new_node()
                sim.sim.call_at(
                    start + rng.uniform(0, churn_window), sim._join_with_random_seed, core
                )
            # lookups run throughout the churn window and after it
            for _ in range(count):
                sim.sim.call_at(start + rng.uniform(0, churn_window * 1.25), issue)
        else:
            for i in range(count):
                sim.sim.call_at(start + i * 0.01, issue)
        sim.sim.run(
            until=start + churn_window * 1.25 + 600,
            stop=lambda: (
                len(results) >= count and (not churn or sim.sim.now > start + churn_window)
            ),
        )
        ok = sum(1 for r in results if r[0])
        hops = [r[1] for r in results if r[1] is not None]
        msgs = [r[2] for r in results]
        return {
            "lookups": len(results),
            "success_rate": ok / max(1, count),
            "hops_median": statistics.median(hops) if hops else None,
            "hops_p99": _pct(hops, 0.99),
            "messages_per_lookup": statistics.mean(msgs) if msgs else None,
        }

    steady = get_phase(gets, churn=False)
    churned = get_phase(gets, churn=True)
    return {
        "nodes": n,
        "values": values,
        "join_refresh": join_refresh,
        "build_cpu_s": round(build_cpu, 1),
        "build_messages_per_join": round(build_messages / n, 1),
        "no_churn": steady,
        "churn_20_20": churned,
        "total_cpu_s": round(time.process_time() - cpu0, 1),
        "total_wall_s": round(time.time() - wall0, 1),
    }


async def real(count: int, ops: int, seed: int) -> dict:
    from latticaray.mesh.dht import DhtConfig as Cfg
    from latticaray.mesh.dht import DhtService
    from latticaray.mesh.node import MeshConfig, MeshNode

    rng = random.Random(seed)
    nodes, dhts = [], []
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            node = await MeshNode(
                MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",))
            ).start()
            nodes.append(node)
            dhts.append(DhtService(node, Cfg(request_timeout=10.0, stall_timeout=2.0)))
        seed_addr = [str(nodes[0].listen_addrs[0])]
        await dhts[0].bootstrap()
        for i in range(1, count, 8):  # join in small waves: enough concurrency, bounded load
            await asyncio.gather(*(d.bootstrap(seed_addr) for d in dhts[i : i + 8]))
        build_s = time.perf_counter() - t0
        # baseline in the same run: one DHT ping RPC between two random nodes (connected first)
        from latticaray.mesh.dht.messages import PROTOCOL_ID, encode

        ping = encode({"op": "ping"})
        ping_ms = []
        for _ in range(ops):
            a, b = rng.sample(range(count), 2)
            nodes[a].add_addrs(nodes[b].peer_id, nodes[b].listen_addrs)
            await nodes[a].call(nodes[b].peer_id, PROTOCOL_ID, ping, timeout=10)
            t = time.perf_counter()
            await nodes[a].call(nodes[b].peer_id, PROTOCOL_ID, ping, timeout=10)
            ping_ms.append((time.perf_counter() - t) * 1000)
        store_ms, get_ms, quick_ms, found, replicas = [], [], [], 0, []
        expiration = time.time() + 3600
        for i in range(ops):
            writer = rng.randrange(count)
            t = time.perf_counter()
            replicas.append(await dhts[writer].put(b"real/%d" % i, b"v%d" % i, expiration))
            store_ms.append((time.perf_counter() - t) * 1000)
            reader = rng.randrange(count)
            t = time.perf_counter()
            got = await dhts[reader].get(b"real/%d" % i)
            get_ms.append((time.perf_counter() - t) * 1000)
            found += got is not None and got.value == b"v%d" % i
            reader = rng.randrange(count)
            t = time.perf_counter()
            got = await dhts[reader].get(b"real/%d" % i, quorum=1)
            quick_ms.append((time.perf_counter() - t) * 1000)
            found += got is not None and got.value == b"v%d" % i
        return {
            "nodes": count,
            "operations": ops,
            "transport": "quic",
            "build_s": round(build_s, 1),
            "rpc_ping_ms_p50": round(_pct(ping_ms, 0.5), 2),
            "rpc_ping_ms_p99": round(_pct(ping_ms, 0.99), 2),
            "store_ms_p50": round(_pct(store_ms, 0.5), 1),
            "store_ms_p99": round(_pct(store_ms, 0.99), 1),
            "get_ms_p50": round(_pct(get_ms, 0.5), 1),
            "get_ms_p99": round(_pct(get_ms, 0.99), 1),
            "get_quorum1_ms_p50": round(_pct(quick_ms, 0.5), 1),
            "get_quorum1_ms_p99": round(_pct(quick_ms, 0.99), 1),
            "get_success_rate": found / (2 * ops),
            "replicas_median": statistics.median(replicas),
            "connections_median": statistics.median(len(n.connected_peers()) for n in nodes),
        }
    finally:
        for dht in dhts:
            await dht.close()
        for node in nodes:
            await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 100, 1,000 and 32 real nodes")
    parser.add_argument("--sizes", help="comma-separated simulated sizes (overrides the default)")
    parser.add_argument("--real-nodes", type=int, help="real loopback nodes (0 to skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--join-refresh",
        default="2",
        help="buckets a joining node refreshes after its self-lookup: the n farthest "
        "beyond its nearest neighbour, or 'all' (Kademlia's full procedure)",
    )
    args = parser.parse_args()
    join_refresh = args.join_refresh if args.join_refresh == "all" else int(args.join_refresh)
    sizes = (
        [int(s) for s in args.sizes.split(",") if s]
        if args.sizes is not None
        else ([100, 1000] if args.quick else [100, 1000, 10000])
    )
    real_nodes = args.real_nodes if args.real_nodes is not None else (32 if args.quick else 64)

    sim_results = []
    print(
        f"simulated DHT (k=20, alpha=3; one-way latency 5-50 ms; join: self-lookup + refresh of "
        f"{join_refresh} farthest buckets)"
    )
    header = (
        f"{'nodes':>7} {'phase':>10} {'GET ok':>8} {'hops p50':>9} {'hops p99':>9} "
        f"{'msgs/lookup':>12} {'join msgs':>10} {'cpu s':>7}"
    )
    print(header)
    for n in sizes:
        result = simulate(
            n,
            args.seed,
            values=min(100, n),
            gets=300 if n >= 1000 else 200,
            join_refresh=join_refresh,
        )
        sim_results.append(result)
        for phase in ("no_churn", "churn_20_20"):
            r = result[phase]
            print(
                f"{n:>7} {phase:>10} {r['success_rate']:>8.1%} {r['hops_median']:>9} "
                f"{r['hops_p99']:>9} {r['messages_per_lookup']:>12.1f} "
                f"{result['build_messages_per_join']:>10} {result['total_cpu_s']:>7}",
                flush=True,
            )

    real_result = None
    if real_nodes:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        real_result = runner(real(real_nodes, 100, args.seed))
        r = real_result
        print(
            f"\nreal DHT: {r['nodes']} nodes in one process over loopback QUIC, {r['operations']} "
            f"store+get pairs from random nodes"
        )
        print(
            f"  baseline: one DHT ping RPC p50 {r['rpc_ping_ms_p50']} ms  p99 {r['rpc_ping_ms_p99']} ms"
        )
        print(
            f"  store p50 {r['store_ms_p50']} ms  p99 {r['store_ms_p99']} ms   "
            f"get p50 {r['get_ms_p50']} ms  p99 {r['get_ms_p99']} ms   "
            f"get ok {r['get_success_rate']:.0%}  replicas {r['replicas_median']}"
        )
        print(
            f"  get with quorum=1 (stop at the first holder): p50 {r['get_quorum1_ms_p50']} ms  "
            f"p99 {r['get_quorum1_ms_p99']} ms"
        )

    import aioquic
    import cryptography
    import msgpack

    print(
        json.dumps(
            {
                "bench": "dht",
                "simulated": sim_results,
                "real": real_result,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "note": "shared machine, loaded by other engineers' work during runs",
                },
                "versions": {
                    "python": platform.python_version(),
                    "aioquic": aioquic.__version__,
                    "cryptography": cryptography.__version__,
                    "msgpack": ".".join(map(str, msgpack.version)),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
