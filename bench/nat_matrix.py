"""NAT traversal matrix on real kernel NATs (needs root and ../shared/netlab).

Brings up the netlab, runs a relay/bootstrap node on pub1 and a node on each of hostA, hostB
(cone NATs), hostC (symmetric NAT), hostD (public, stateful firewall) and pub2 (public), and for
every ordered pair measures: connected, final path, time to first RPC, time to direct upgrade,
and unary RPC QPS over the final path. The matrix runs once through real MeshNodes (MeshNatService: the
connection manager dials direct QUIC or the /p2p-circuit address) and once through NatHost (the
same NAT code with its own session table); then 20 birthday-probing attempts cone <-> symmetric,
a relayed-only baseline, the matrix with natB as a port-remapping cone, and with natA symmetric
(symmetric-symmetric pairs hostA <-> hostC). First, the zero-flag join time: hostA, hostB and
hostC joining with only pub1's address (auto mode) against the same joins with observers and a
relay given by hand, alternated run by run (--join-runs, --join-only).
The last line is one JSON object with every figure.

Usage: sudo .venv/bin/python bench/nat_matrix.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "mesh", "nat"))

from labnodes import IPS, AutoLab, LabMesh, MeshLab  # noqa: E402
from netlab_util import lab, netlab_available  # noqa: E402

from latticaray.mesh.nat.service import PING_SERVICE  # noqa: E402

NODES = ["hostA", "hostB", "hostC", "hostD", "pub2"]
PRIVATE = ["hostA", "hostB", "hostC", "hostD"]
QPS_SECONDS = 1.0
QPS_CONCURRENCY = 16


async def measure_pair(node, peer, direct_addrs, relay, qps_seconds: float, upgrade_timeout: float):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    row = {"connected": False, "path": "none", "first_rpc_s": None, "upgrade_s": None, "qps": 0.0}
    try:
        link = await node.connect(peer, direct_addrs, relay)
        await node.call(peer, PING_SERVICE, b"first", timeout=10)
    except Exception as exc:  # a failed pair is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return row
    row["connected"] = True
    row["first_rpc_s"] = loop.time() - t0
    if link.upgrade_task is not None:
        try:
            await asyncio.wait_for(asyncio.shield(link.upgrade_task), upgrade_timeout)
        except (TimeoutError, Exception):
            pass
    if link.metrics.upgraded_at is not None:
        row["upgrade_s"] = link.metrics.upgraded_at - t0
    row["path"] = link.path
    row["punch_attempts"] = link.metrics.punch_attempts
    await measure_qps(node, peer, qps_seconds, row)
    row["path_after_qps"] = link.path
    return row


async def measure_qps(node, peer, qps_seconds: float, row: dict) -> None:
    """Pings in flight from QPS_CONCURRENCY callers for ``qps_seconds``; sets ``row["qps"]``."""
    loop = asyncio.get_running_loop()
    count = 0
    end = loop.time() + qps_seconds
    payload = b"q" * 64

    async def worker():
        nonlocal count
        while loop.time() < end:
            await node.call(peer, PING_SERVICE, payload, timeout=10)
            count += 1

    started = loop.time()
    try:
        await asyncio.gather(*(worker() for _ in range(QPS_CONCURRENCY)))
    except Exception as exc:
        row["error"] = f"qps: {type(exc).__name__}: {exc}"[:200]
    row["qps"] = count / max(1e-9, loop.time() - started)


async def measure_pair_mesh(node, nat, peer, addrs, qps_seconds: float, upgrade_timeout: float):
    """The same figures through a real MeshNode: ``node.call`` picks the connection."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    row = {"connected": False, "path": "none", "first_rpc_s": None, "upgrade_s": None, "qps": 0.0}
    node.add_addrs(peer, addrs)
    try:
        await node.call(peer, PING_SERVICE, b"first", timeout=15)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return row
    row["connected"] = True
    row["first_rpc_s"] = loop.time() - t0
    link = nat.links.get(peer)
    if link is not None and link.upgrade_task is not None:
        try:
            await asyncio.wait_for(asyncio.shield(link.upgrade_task), upgrade_timeout)
        except (TimeoutError, Exception):
            pass
    conn = node.connection_to(peer)
    transport = conn.transport if conn is not None else "none"
    if link is not None and link.metrics.path not in ("none", "relayed") and transport == "quic":
        row["path"] = link.metrics.path
    else:
        row["path"] = {"quic": "direct", "relay": "relayed"}.get(transport, transport)
    if link is not None:
        row["punch_attempts"] = link.metrics.punch_attempts
        if link.metrics.upgraded_at is not None:
            row["upgrade_s"] = link.metrics.upgraded_at - t0
    await measure_qps(node, peer, qps_seconds, row)
    return row


def run_pair_mesh(lab: MeshLab, src: str, dst: str, qps_seconds: float) -> dict:
    a, b = lab.nodes[src], lab.nodes[dst]

    async def forget(node, nat, peer):
        nat.links.pop(peer, None)
        await node.disconnect(peer)

    lab.loops[src].run(forget(a, lab.nats[src], b.peer_id), 20)
    lab.loops[dst].run(forget(b, lab.nats[dst], a.peer_id), 20)
    addrs = []
    if dst in IPS:
        addrs.append(f"/ip4/{IPS[dst]}/udp/{lab.quic_port}/quic-v1/p2p/{b.peer_id}")
    if lab.nats[dst].circuit_address():
        addrs.append(lab.circuit_addr(dst))
    return lab.loops[src].run(
        measure_pair_mesh(a, lab.nats[src], b.peer_id, addrs, qps_seconds, 20.0), 90
    )


def run_matrix_mesh(prefix: str, up_args: list[str], qps_seconds: float, label: str) -> dict:
    with lab(prefix, *up_args):
        mesh = MeshLab(prefix, NODES, quic_port=4001, relay_port=4002)
        try:
            mesh.start()
            discovery = mesh.discover_and_reserve()
            nat = {
                h: {
                    "nat_type": r.nat_type.value,
                    "reachability": reach.value,
                    "mapped": [f"{ip}:{port}" for ip, port in r.mapped],
                }
                for h, (r, reach) in discovery.items()
            }
            rows = {
                f"{s}->{d}": run_pair_mesh(mesh, s, d, qps_seconds)
                for s, d in itertools.permutations(NODES, 2)
            }
            return {
                "label": label,
                "stack": "MeshNode+MeshNatService",
                "up_args": up_args,
                "nat": nat,
                "pairs": rows,
            }
        finally:
            mesh.stop()


def run_pair(mesh: LabMesh, src: str, dst: str, qps_seconds: float, punching: bool = True) -> dict:
    a, b = mesh.nodes[src], mesh.nodes[dst]
    mesh.loops[src].run(a.disconnect(b.peer_id), 20)
    mesh.loops[dst].run(b.disconnect(a.peer_id), 20)
    a.config.hole_punching = punching
    try:
        return mesh.loops[src].run(
            measure_pair(
                a, b.peer_id, mesh.direct_addrs(dst), mesh.relay_tuple(), qps_seconds, 20.0
            ),
            90,
        )
    finally:
        a.config.hole_punching = True


def run_matrix(prefix: str, up_args: list[str], qps_seconds: float, label: str, extra=None) -> dict:
    with lab(prefix, *up_args):
        mesh = LabMesh(prefix, NODES, quic_port=4001, relay_port=4002)
        try:
            mesh.start()
            discovery = mesh.discover()
            mesh.reserve_all(PRIVATE)
            nat = {
                h: {
                    "nat_type": r.nat_type.value,
                    "reachability": reach.value,
                    "mapped": [f"{ip}:{port}" for ip, port in r.mapped],
                }
                for h, (r, reach) in discovery.items()
            }
            rows = {}
            for src, dst in itertools.permutations(NODES, 2):
                rows[f"{src}->{dst}"] = run_pair(mesh, src, dst, qps_seconds)
            result = {
                "label": label,
                "stack": "NatHost",
                "up_args": up_args,
                "nat": nat,
                "pairs": rows,
            }
            if extra is not None:
                result.update(extra(mesh))
            return result
        finally:
            mesh.stop()


def birthday_trials(mesh: LabMesh, attempts: int) -> dict:
    wins, times = 0, []
    outcomes = []
    for i in range(attempts):
        src, dst = ("hostA", "hostC") if i % 2 == 0 else ("hostC", "hostA")
        row = run_pair(mesh, src, dst, 0.0)
        outcomes.append(row["path"])
        if row["path"] == "birthday":
            wins += 1
            times.append(row["upgrade_s"])
    return {
        "birthday": {
            "attempts": attempts,
            "direct": wins,
            "rate": wins / attempts,
            "outcomes": outcomes,
            "median_upgrade_s": sorted(times)[len(times) // 2] if times else None,
        }
    }


def relay_baseline(mesh: LabMesh) -> dict:
    return {
        "relay_baseline_hostA_hostB": run_pair(mesh, "hostA", "hostB", QPS_SECONDS, punching=False)
    }


def tcp_punch_pairs(mesh: LabMesh, qps_seconds: float) -> dict:
    """The cone/firewall pairs again with TCP simultaneous open instead of UDP spraying."""
    hosts = ("hostA", "hostB", "hostD")
    for host in hosts:
        mesh.nodes[host].config.punch_protocol = "tcp"
        mesh.nodes[host].config.tcp_port = 4003
    try:
        rows = {
            f"{s}->{d}": run_pair(mesh, s, d, qps_seconds)
            for s, d in itertools.permutations(hosts, 2)
        }
    finally:
        for host in hosts:
            mesh.nodes[host].config.punch_protocol = "quic"
    return {"tcp_punch": rows}


def join_times(prefix: str, runs: int) -> dict:
    """Time from a node's start until it can be reached (holds a relay reservation), per
    private host, ``runs`` times each way, alternated: zero-flag (auto mode, only pub1's address)
    and the baseline with observers and a relay given by hand (auto_configure)."""
    os.environ["LATTICARAY_LAB"] = "1"
    samples: dict[str, list[float]] = {"zero_flag": [], "given": []}
    errors: list[str] = []
    with lab(prefix):
        for i in range(2 * runs):
            mode = "zero_flag" if i % 2 == 0 else "given"
            auto = AutoLab(
                prefix,
                ["pub2", "hostA", "hostB", "hostC"],
                quic_port=4901 + i % 2 * 10,
                relay_port=4902 + i % 2 * 10,
                given=mode == "given",
            )
            try:
                auto.start()
                samples[mode] += list(auto.join_s.values())
            except Exception as exc:  # a failed join is a result, not a crash
                errors.append(f"{mode} run {i // 2}: {type(exc).__name__}: {exc}"[:200])
            finally:
                auto.stop()

    def pct(values: list[float], q: float) -> float | None:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "join": {
            mode: {"n": len(v), "p50_s": pct(v, 0.5), "p90_s": pct(v, 0.9), "max_s": pct(v, 1.0)}
            for mode, v in samples.items()
        }
        | {"errors": errors, "runs": runs}
    }


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_matrix(result: dict) -> None:
    up = " ".join(result["up_args"]) or "(defaults)"
    print(f"\n== {result['label']}  [{result['stack']}]  (netlab up {up})")
    print(f"{'node':8} {'NAT type':22} {'reachability':12} mapped")
    for host, info in result["nat"].items():
        print(
            f"{host:8} {info['nat_type']:22} {info['reachability']:12} {', '.join(info['mapped'])}"
        )
    print(
        f"\n{'pair':16} {'conn':5} {'path':11} {'1st RPC s':>9} {'upgrade s':>9} {'tries':>5} {'QPS':>8}"
    )
    for pair, row in result["pairs"].items():
        print(
            f"{pair:16} {'yes' if row['connected'] else 'NO':5} {row['path']:11} "
            f"{fmt(row['first_rpc_s'], '.3f'):>9} {fmt(row['upgrade_s'], '.3f'):>9} "
            f"{row.get('punch_attempts', 0):>5} {row['qps']:8.0f}"
            + (f"  ! {row['error']}" if row.get("error") else "")
        )


def machine_and_versions() -> dict:
    import aioquic
    import cryptography

    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {
            "python": platform.python_version(),
            "aioquic": aioquic.__version__,
            "cryptography": cryptography.__version__,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="shorter QPS windows, 6 birthday tries"
    )
    parser.add_argument("--prefix", default=f"lrb{os.getpid() % 100000}")
    parser.add_argument(
        "--join-runs", type=int, default=10, help="join-time runs per mode (0: skip)"
    )
    parser.add_argument("--join-only", action="store_true", help="only the zero-flag join times")
    args = parser.parse_args()
    # aioquic logs late packets of connections closed between pairs; they are expected here
    import logging

    logging.getLogger("quic").setLevel(logging.CRITICAL)
    reason = netlab_available()
    if reason is not None:
        print(f"nat_matrix: cannot run: {reason}")
        print(json.dumps({"skipped": reason}))
        return 0
    qps_seconds = 0.3 if args.quick else QPS_SECONDS
    attempts = 6 if args.quick else 20
    started = time.time()
    join = join_times(args.prefix, args.join_runs)["join"] if args.join_runs else None
    if join is not None:
        print("\njoin time (start -> holds a relay reservation), hostA/hostB/hostC, s:")
        for mode in ("zero_flag", "given"):
            j = join[mode]
            print(
                f"  {mode:10} n={j['n']:3}  p50 {fmt(j['p50_s'], '.2f')}  "
                f"p90 {fmt(j['p90_s'], '.2f')}  max {fmt(j['max_s'], '.2f')}"
            )
        for error in join["errors"]:
            print(f"  ! {error}")
    if args.join_only:
        print(json.dumps({"bench": "nat_matrix", "join": join, **machine_and_versions()}))
        return 0
    runs = [
        run_matrix_mesh(
            args.prefix, [], qps_seconds, "default lab (natA, natB cone; natC symmetric)"
        ),
        run_matrix(
            args.prefix,
            [],
            qps_seconds,
            "default lab (natA, natB cone; natC symmetric)",
            extra=lambda m: {
                **birthday_trials(m, attempts),
                **relay_baseline(m),
                **tcp_punch_pairs(m, qps_seconds),
            },
        ),
        run_matrix_mesh(
            args.prefix,
            ["--nat", "natB=cone-remap"],
            qps_seconds,
            "natB = cone-remap (port-translating cone)",
        ),
        run_matrix_mesh(
            args.prefix,
            ["--nat", "natA=symmetric"],
            qps_seconds,
            "natA = symmetric (symmetric-symmetric pairs hostA<->hostC)",
        ),
    ]
    for result in runs:
        print_matrix(result)
    base = runs[1]
    bday = base["birthday"]
    print(
        f"\nbirthday probing cone<->symmetric: {bday['direct']}/{bday['attempts']} direct "
        f"({bday['rate']:.0%}), median upgrade {fmt(bday['median_upgrade_s'], '.3f')} s"
    )
    print("\nTCP simultaneous open (punch protocol tcp), cone and firewall hosts:")
    for pair, row in base["tcp_punch"].items():
        print(
            f"  {pair:16} {'yes' if row['connected'] else 'NO':4} {row['path']:12} "
            f"upgrade {fmt(row['upgrade_s'], '.3f')} s  {row['qps']:.0f} QPS"
            + (f"  ! {row['error']}" if row.get("error") else "")
        )
    rb = base["relay_baseline_hostA_hostB"]
    ab = base["pairs"]["hostA->hostB"]
    print(
        f"baseline hostA->hostB relayed (punching off): {rb['qps']:.0f} QPS; "
        f"punched direct: {ab['qps']:.0f} QPS"
    )
    all_pairs = [row for r in runs for row in r["pairs"].values()]
    connected = sum(1 for row in all_pairs if row["connected"])
    print(
        f"connected pairs: {connected}/{len(all_pairs)}; wall time {time.time() - started:.0f} s "
        "(machine shared with other engineers' jobs: QPS and timings are noisy)"
    )
    summary = {
        "bench": "nat_matrix",
        "connected": connected,
        "pairs": len(all_pairs),
        "runs": runs,
        "birthday_rate": bday["rate"],
        "join": join,
        **machine_and_versions(),
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
