"""Part 3 of bench/objects.py: one seed, 1/2/4/8 fetchers of the same object at once.

Two settings, measured in the same run:

* loopback: every node a process on 127.0.0.1. On a small machine this is CPU-bound (each fetcher
  receives, decrypts, hashes and stores the whole object), so it says little about swarming.
* netlab (root): the seed on ``pub1`` (public), the fetchers on ``hostA``..``hostA8``, one LAN behind
  a cone NAT (they dial the seed out through the NAT; LAN peers reach each other directly). Every
  host's uplink (its ``eth0`` egress) is shaped by ``tc tbf rate R``, so the seed's uplink is what
  limits one fetch, as on a real network. R is chosen low enough that the node processes stay well
  under the machine's CPU; the CPU they used is measured and printed next to each figure.

Per fetcher count: completion time of all fetchers, the fastest one, the seed's share of the block
bytes uploaded (the nodes' ledgers, and the kernel's eth0 tx counters on netlab), block bytes sent
over bytes needed (above 1.0: blocks sent twice), CPU of the node processes (cores, i.e. CPU seconds
over wall seconds) and of the whole machine (busy fraction of all cores, other jobs included).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

MB = 1_000_000
LAN_HOSTS = ["hostA"] + [f"hostA{i}" for i in range(2, 9)]
LAN_IP = {host: f"198.19.1.{10 + i}" for i, host in enumerate(LAN_HOSTS)}
SEED_NODE, SEED_IP = "pub1", "198.18.0.11"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _tx_bytes(netns: str | None) -> int | None:
    if netns is None:
        return None
    name = os.path.basename(netns)
    out = subprocess.run(
        ["ip", "netns", "exec", name, "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout) if out.returncode == 0 else None


def run_swarm(
    make_node: Callable,
    size: int,
    counts: list[int],
    seed_at: tuple,
    fetchers_at: list[tuple],
    timeout: float = 3600,
) -> dict:
    """One seed at ``seed_at`` = (netns path | None, listen ip), ``count`` fetchers at the first
    ``count`` of ``fetchers_at``; ``make_node(netns, ip)`` starts a node process (bench/objects.py)."""
    results: dict = {}
    for count in counts:
        seed = make_node(*seed_at)
        fetchers = [make_node(*at) for at in fetchers_at[:count]]
        nodes = [seed] + fetchers
        try:
            cid = seed.ask("put", (size, 2))
            seed_addrs = seed.ask("info")
            addrs = [f.ask("info") for f in fetchers]
            for i, f in enumerate(fetchers):  # each fetcher knows the seed and the earlier fetchers
                f.ask("connect", seed_addrs + [a for other in addrs[:i] for a in other[:1]])
            tx0 = [_tx_bytes(at[0]) for at in [seed_at] + fetchers_at[:count]]
            cpu0 = [_cpu_seconds(n.process.pid) for n in nodes]
            busy0, total0 = _machine_busy()
            start = time.perf_counter()
            for f in fetchers:
                f.conn.send(("fetch", cid))
            times = []
            for f in fetchers:
                if not f.conn.poll(max(1.0, timeout - (time.perf_counter() - start))):
                    raise TimeoutError(f"swarm fetch of {count} did not finish in {timeout} s")
                reply = f.conn.recv()
                if not isinstance(reply, float):
                    raise RuntimeError(f"fetch failed: {reply!r}")
                times.append(reply)
            wall = time.perf_counter() - start
            cpu = [_cpu_seconds(n.process.pid) - c for n, c in zip(nodes, cpu0)]
            busy1, total1 = _machine_busy()
            tx1 = [_tx_bytes(at[0]) for at in [seed_at] + fetchers_at[:count]]
            seed_sent = seed.ask("uploaded")
            peers_sent = sum(f.ask("uploaded") for f in fetchers)
            row = {
                "s": round(wall, 3),
                "fastest_s": round(min(times), 3),
                "seed_upload_share": round(seed_sent / max(1, seed_sent + peers_sent), 3),
                # block bytes sent over bytes needed: above 1.0, blocks were sent twice
                "sent_over_needed": round((seed_sent + peers_sent) / (count * size), 3),
                "nodes_cpu_cores": round(sum(cpu) / wall, 2),
                "busiest_node_cpu_cores": round(max(cpu) / wall, 2),
                "machine_busy_frac": round((busy1 - busy0) / max(1, total1 - total0), 2),
            }
            if None not in tx0 and None not in tx1:
                sent = [b - a for a, b in zip(tx0, tx1)]
                row["seed_eth0_tx_share"] = round(sent[0] / max(1, sum(sent)), 3)
                row["seed_eth0_tx_MB"] = round(sent[0] / MB, 1)
            results[f"{count}_peers"] = row
        finally:
            for node in nodes:
                node.stop()
    if 1 in counts:
        one = results["1_peers"]["s"]
        for count in counts:
            results[f"{count}_peers"]["over_1_peer"] = round(
                results[f"{count}_peers"]["s"] / one, 2
            )
    return results


def shape_uplinks(prefix: str, nodes: list[str], rate_mbit: float) -> None:
    """``tc tbf`` on each node's eth0 egress: ``rate_mbit`` Mbit/s, a burst of 5 ms worth (at least
    64 KB), packets waiting more than 50 ms dropped (TCP then backs off, as on a real bottleneck)."""
    burst = max(64_000, int(rate_mbit * 1e6 / 8 * 0.005))
    for node in nodes:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                f"{prefix}-{node}",
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                f"{rate_mbit}mbit",
                "burst",
                str(burst),
                "latency",
                "50ms",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )


def bench_swarm_netlab(
    make_node: Callable,
    size: int,
    counts: list[int],
    rate_mbit: float,
    netlab_script: str,
    prefix: str = "h3s",
) -> dict:
    if os.geteuid() != 0 or not os.access(netlab_script, os.X_OK):
        return {"skipped": "needs root and the netlab script"}
    hosts = LAN_HOSTS[: max(counts)]
    env = dict(os.environ, NETLAB_PREFIX=prefix)

    def run(*args):
        return subprocess.run(
            [netlab_script, "--prefix", prefix, *args],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    run("up", "--force", "--lan-hosts", str(len(hosts)))
    try:
        shape_uplinks(prefix, [SEED_NODE] + hosts, rate_mbit)
        ns = lambda node: f"/run/netns/{prefix}-{node}"  # noqa: E731
        results = run_swarm(
            make_node, size, counts, (ns(SEED_NODE), SEED_IP), [(ns(h), LAN_IP[h]) for h in hosts]
        )
        results["uplink_Mbps"] = rate_mbit
        results["uplink_MBps"] = round(rate_mbit / 8, 2)
        results["ideal_1_peer_s"] = round(size / (rate_mbit * 1e6 / 8), 1)
        return results
    finally:
        subprocess.run(
            [netlab_script, "--prefix", prefix, "down"], env=env, capture_output=True, timeout=120
        )


def bench_swarm_loopback(make_node: Callable, size: int, counts: list[int]) -> dict:
    return run_swarm(
        make_node, size, counts, (None, "127.0.0.1"), [(None, "127.0.0.1")] * max(counts)
    )


def rows(figures: dict, label: str) -> list[tuple[str, object]]:
    out = []
    for key, value in figures.items():
        if isinstance(value, dict):
            key = key.replace("_", " ")
            out.append(
                (
                    f"{label} {key}: time (s) / x 1 peer",
                    f"{value['s']} / {value.get('over_1_peer', '-')}",
                )
            )
            share = f"{value['seed_upload_share']}"
            if "seed_eth0_tx_share" in value:
                share += f" (eth0 {value['seed_eth0_tx_share']})"
            out.append((f"{label} {key}: seed share of upload", share))
            out.append((f"{label} {key}: sent / needed", value["sent_over_needed"]))
            out.append(
                (
                    f"{label} {key}: CPU cores all/max, box",
                    f"{value['nodes_cpu_cores']} / {value['busiest_node_cpu_cores']}, "
                    f"{int(value['machine_busy_frac'] * 100)}%",
                )
            )
        else:
            out.append((f"{label} {key}", value))
    return out
