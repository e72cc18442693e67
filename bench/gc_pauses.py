"""GC pauses and event-loop stalls in one process holding many QUIC connections.

Each variant runs in its own child process (same parameters, variants alternated, repeated):
N MeshNodes over loopback QUIC are started, the variant's GC policy is applied (as node_main
applies it: after start-up, before connections), every pair of nodes connects (N*(N-1)/2
connections, both ends in this process), then for D seconds W concurrent loops ping random
pairs while one loop churns connections (closes a random pair's connection and dials it again,
leaving the closed connection's state as garbage). gc.callbacks time every collection; a 1 ms
ticker measures how late the loop wakes it. At the end: the time of one full collection as the
variant leaves it (what an automatic generation-2 collection costs), then the garbage hidden in
the permanent generation (found only after gc.unfreeze()) and the time of that full collection
(what gcpolicy.full_collect_and_refreeze costs).

Variants: default (CPython thresholds, nothing frozen); startup (gcpolicy.apply_startup_policy);
refreeze (startup + gcpolicy.refreeze every --refreeze-interval seconds).

    .venv/bin/python bench/gc_pauses.py                 # N = 48, D = 20 s, 2 repetitions
    .venv/bin/python bench/gc_pauses.py --nodes 32 --duration 10 --repeat 1

Per connection (both of its ends live in the process): 'objs/conn' is the tracked objects made
after start-up (what a full collection walks beyond the start-up heap) divided by the
connections; 'gc us/conn' and 'cpu us/conn' are the wall and CPU (thread) time of a full
collection with no garbage left (least of 3, right after 'full gc') divided likewise; CPU time
is the steadier figure on a loaded machine. Under refreeze, objects frozen since are neither
walked nor counted. ``--histogram K`` also prints the K most common types among those objects
(module.qualname, per connection), taken from the first repetition of each variant.

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("default", "startup", "refreeze")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class GcTimer:
    """Per-collection durations by generation, via gc.callbacks, split by a phase label."""

    def __init__(self) -> None:
        self.phase = "start"
        self.pauses: dict[str, dict[int, list[float]]] = {}
        self._t0 = 0.0

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self._t0 = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._t0) * 1000
            self.pauses.setdefault(self.phase, {}).setdefault(info["generation"], []).append(ms)

    def summary(self, phase: str) -> dict:
        by_gen = self.pauses.get(phase, {})
        return {
            f"gen{g}": {"count": len(v), "max_ms": round(max(v), 1), "total_ms": round(sum(v), 1)}
            for g, v in sorted(by_gen.items())
        }


async def _stall_ticker(stalls: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        stalls.append((loop.time() - t - 0.001) * 1000)


def _type_histogram(objects: list, exclude: set[int], per: int, top: int) -> list:
    counts: dict[str, int] = {}
    for obj in objects:
        if id(obj) not in exclude:
            cls = type(obj)
            name = f"{cls.__module__}.{cls.__qualname__}"
            counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [[name, round(n / max(1, per), 2)] for name, n in ranked]


async def child(
    variant: str,
    count: int,
    duration: float,
    workers: int,
    seed: int,
    refreeze_interval: float,
    thresholds: tuple[int, int, int] | None,
    histogram: int = 0,
) -> dict:
    from latticaray.mesh.node import MeshConfig, MeshNode
    from latticaray.runtime import gcpolicy

    timer = GcTimer()
    gc.callbacks.append(timer)
    rng = random.Random(seed)
    nodes: list = []
    refresher = None
    try:
        for _ in range(count):
            nodes.append(
                await MeshNode(
                    MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",))
                ).start()
            )
        if variant in ("startup", "refreeze"):
            gcpolicy.apply_startup_policy(thresholds or gcpolicy.DEFAULT_THRESHOLDS)
        if variant == "refreeze":
            refresher = asyncio.ensure_future(
                gcpolicy.refreeze_loop(refreeze_interval, full_every=0)
            )
        gc.collect()
        started = gc.get_objects()
        tracked_at_start = len(started)
        start_ids = {id(o) for o in started} if histogram else set()
        del started
        timer.phase = "connect"
        stalls_connect: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(_stall_ticker(stalls_connect, stop))
        t0 = time.perf_counter()
        pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
        for i in range(0, len(pairs), 16):
            await asyncio.gather(
                *(
                    nodes[a].connect(nodes[b].listen_addrs[0], timeout=30)
                    for a, b in pairs[i : i + 16]
                )
            )
        connect_s = time.perf_counter() - t0
        stop.set()
        await ticker
        connections = sum(len(n.connected_peers()) for n in nodes) // 2

        timer.phase = "steady"
        stalls: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(_stall_ticker(stalls, stop))
        ping_ms: list[float] = []
        failures = churned = 0
        deadline = time.perf_counter() + duration

        async def pinger() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                a, b = rng.sample(range(count), 2)
                t = time.perf_counter()
                try:
                    await nodes[a].ping(nodes[b].peer_id, timeout=30)
                except Exception:
                    failures += 1
                    continue
                ping_ms.append((time.perf_counter() - t) * 1000)

        async def churner() -> None:
            nonlocal churned
            while time.perf_counter() < deadline:
                a, b = rng.sample(range(count), 2)
                await nodes[a].disconnect(nodes[b].peer_id)
                await nodes[a].connect(nodes[b].listen_addrs[0], timeout=30)
                churned += 1

        await asyncio.gather(churner(), *(pinger() for _ in range(workers)))
        stop.set()
        await ticker
        timer.phase = "end"
        if refresher is not None:
            refresher.cancel()
        frozen = gc.get_freeze_count()
        t = time.perf_counter()
        gc.collect()
        full_gc_ms = (time.perf_counter() - t) * 1000
        walls, cpus = [], []
        for _ in range(3):  # the walk alone, no garbage left to free; the least of 3
            t, c = time.perf_counter(), time.thread_time()
            gc.collect()
            cpus.append((time.thread_time() - c) * 1000)
            walls.append((time.perf_counter() - t) * 1000)
        walk_ms, walk_cpu_ms = min(walls), min(cpus)
        walked = gc.get_objects()
        tracked = len(walked)
        types = _type_histogram(walked, start_ids, connections, histogram) if histogram else []
        start_ids.clear()
        del walked
        per_conn = max(1, connections)
        gc.unfreeze()
        t = time.perf_counter()
        hidden = gc.collect()
        unfrozen_gc_ms = (time.perf_counter() - t) * 1000
        return {
            "variant": variant,
            "nodes": count,
            "connections": connections,
            "connect_s": round(connect_s, 1),
            "tracked_objects": tracked,
            "frozen_objects": frozen,
            "churned_connections": churned,
            "tracked_at_start": tracked_at_start,
            "objects_per_connection": round((tracked - tracked_at_start) / per_conn, 1),
            "full_gc_ms": round(full_gc_ms, 1),
            "full_gc_walk_ms": round(walk_ms, 1),
            "full_gc_walk_cpu_ms": round(walk_cpu_ms, 1),
            "full_gc_us_per_connection": round(walk_ms * 1000 / per_conn, 1),
            "full_gc_cpu_us_per_connection": round(walk_cpu_ms * 1000 / per_conn, 1),
            "types_per_connection": types,
            "garbage_hidden_by_freeze": hidden,
            "unfrozen_full_gc_ms": round(unfrozen_gc_ms, 1),
            "connect": {
                "gc": timer.summary("connect"),
                "max_stall_ms": round(max(stalls_connect, default=0.0), 1),
            },
            "steady": {
                "gc": timer.summary("steady"),
                "pings": len(ping_ms),
                "ping_failures": failures,
                "ping_ms_p50": round(_pct(ping_ms, 0.5), 2),
                "ping_ms_p99": round(_pct(ping_ms, 0.99), 2),
                "max_stall_ms": round(max(stalls, default=0.0), 1),
                "stall_ms_p99": round(_pct(stalls, 0.99), 1),
            },
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    finally:
        if refresher is not None:
            refresher.cancel()
        for node in nodes:
            await node.stop()
        gc.callbacks.remove(timer)


def _max_pause(section: dict, gen: str) -> float:
    return section["gc"].get(gen, {}).get("max_ms", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=48)
    parser.add_argument("--duration", type=float, default=20.0, help="steady phase, seconds")
    parser.add_argument("--workers", type=int, default=16, help="concurrent ping loops")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--refreeze-interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--thresholds",
        default=None,
        help="gen0,gen1,gen2 for the policy variants (default: gcpolicy's)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--histogram",
        type=int,
        default=0,
        metavar="K",
        help="also print the K commonest types made after start-up, per connection",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    thresholds = tuple(int(t) for t in args.thresholds.split(",")) if args.thresholds else None
    if args.child:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        print(
            json.dumps(
                runner(
                    child(
                        args.child,
                        args.nodes,
                        args.duration,
                        args.workers,
                        args.seed,
                        args.refreeze_interval,
                        thresholds,
                        args.histogram,
                    )
                )
            )
        )
        return

    variants = [v for v in args.variants.split(",") if v]
    results = []
    from latticaray.runtime.gcpolicy import DEFAULT_THRESHOLDS

    print(
        f"{args.nodes} nodes in one process, full mesh over loopback QUIC; steady phase "
        f"{args.duration:g} s with {args.workers} concurrent pings and 1 churn loop; policy "
        f"thresholds {thresholds or DEFAULT_THRESHOLDS}; ms unless noted"
    )
    print(
        "walked: objects a full collection walks (not frozen); full gc: one full collection "
        "at the end; hidden: garbage found only after gc.unfreeze(), in a full collection "
        "taking 'unfrozen gc'; objs/conn, gc us/conn: per connection (both ends), objects "
        "made after start-up"
    )
    print(
        f"{'variant':>9} {'conns':>6} {'walked':>8} {'objs/conn':>9} {'gc us/conn':>10} "
        f"{'cpu us/conn':>11} "
        f"{'frozen':>8} {'conn gc2 max':>12} "
        f"{'conn stall':>10} {'gc2 n':>6} {'gc2 max':>8} {'gc1 max':>8} {'stall max':>9} "
        f"{'ping p99':>8} {'full gc':>8} {'hidden':>7} {'unfrozen gc':>11} {'rss MB':>7}"
    )
    for rep in range(args.repeat):
        for variant in variants:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                variant,
                "--nodes",
                str(args.nodes),
                "--duration",
                str(args.duration),
                "--workers",
                str(args.workers),
                "--seed",
                str(args.seed + rep),
                "--refreeze-interval",
                str(args.refreeze_interval),
            ]
            if args.thresholds:
                cmd += ["--thresholds", args.thresholds]
            if args.histogram and rep == 0:
                cmd += ["--histogram", str(args.histogram)]
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, timeout=600
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["repetition"] = rep
            results.append(r)
            s = r["steady"]
            print(
                f"{variant:>9} {r['connections']:>6} {r['tracked_objects']:>8} "
                f"{r['objects_per_connection']:>9} {r['full_gc_us_per_connection']:>10} "
                f"{r['full_gc_cpu_us_per_connection']:>11} "
                f"{r['frozen_objects']:>8} {_max_pause(r['connect'], 'gen2'):>12} "
                f"{r['connect']['max_stall_ms']:>10} "
                f"{s['gc'].get('gen2', {}).get('count', 0):>6} {_max_pause(s, 'gen2'):>8} "
                f"{_max_pause(s, 'gen1'):>8} {s['max_stall_ms']:>9} {s['ping_ms_p99']:>8} "
                f"{r['full_gc_ms']:>8} {r['garbage_hidden_by_freeze']:>7} "
                f"{r['unfrozen_full_gc_ms']:>11} {r['peak_rss_mb']:>7}",
                flush=True,
            )
    for r in results:
        if r["types_per_connection"]:
            print(
                f"commonest types made after start-up, per connection ({r['variant']}, "
                f"repetition {r['repetition']}):"
            )
            for name, n in r["types_per_connection"]:
                print(f"  {n:8.2f} {name}")
    print(
        json.dumps(
            {
                "bench": "gc_pauses",
                "nodes": args.nodes,
                "duration_s": args.duration,
                "policy_thresholds": list(thresholds) if thresholds else None,
                "workers": args.workers,
                "results": results,
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "note": "shared machine, loaded by other engineers' work",
                },
                "versions": {"python": platform.python_version()},
            }
        )
    )


if __name__ == "__main__":
    main()
