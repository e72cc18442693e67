"""latticaray runtime demo: a real workload on an embedded local mesh, narrated.

Starts this process as the mesh's first node (embedded, with worker processes), joins extra node
processes with an invite credential, then runs tasks (a Monte Carlo estimate of pi spread over
the nodes), an actor (a running histogram fed by tasks), a streaming generator, and a large array
put once and read by CID from a task on another node.
Run: `python examples/runtime_demo.py [--nodes 1]`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import numpy as np

import latticaray as lattica


@lattica.remote
def sample_pi(seed: int, n: int) -> tuple[int, str]:
    rng = random.Random(seed)
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return inside, lattica.get_runtime_context().node_id


@lattica.remote
class Histogram:
    def __init__(self, bins: int):
        self.counts = [0] * bins

    def add(self, values: list[float]) -> int:
        for v in values:
            self.counts[min(int(v * len(self.counts)), len(self.counts) - 1)] += 1
        return sum(self.counts)

    def counts_now(self) -> list[int]:
        return self.counts


@lattica.remote
def feed(hist, seed: int, n: int) -> int:
    rng = random.Random(seed)
    return lattica.get(hist.add.remote([rng.random() for _ in range(n)]))


@lattica.remote
def column_means_by_cid(cid: str) -> tuple[list[float], str]:
    matrix = lattica.get(cid)
    return matrix.mean(axis=0)[:3].round(4).tolist(), lattica.get_runtime_context().node_id


@lattica.remote
def countdown(n: int):
    for i in range(n, 0, -1):
        time.sleep(0.05)
        yield i


def start_node(bootstrap: str, invite: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latticaray.runtime.node_main",
            "--bootstrap",
            bootstrap,
            "--credential",
            invite,
            "--num-cpus",
            "1",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    info = json.loads(proc.stdout.readline())
    return proc, info["node_id"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1, help="extra node processes to start")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    lattica.init(_mesh=True, num_cpus=1, listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
    me = lattica.mesh_info()
    print(f"[init] embedded node {me['node_id'][:20]}... up in {time.perf_counter() - t0:.2f} s")
    procs = []
    try:
        invite = lattica.invite()
        print(f"[mesh] invite credential: {invite[:40]}...")
        for _ in range(args.nodes):
            proc, node_id = start_node(me["address"][0], invite)
            procs.append(proc)
            print(f"[mesh] node {node_id[:20]}... joined (pid {proc.pid})")
        deadline = time.monotonic() + 30
        while len([n for n in lattica.nodes() if n["Alive"] and n["Resources"]]) < 1 + args.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError("extra nodes did not become visible")
            time.sleep(0.05)
        print(f"[mesh] cluster resources: {lattica.cluster_resources()}")

        t = time.perf_counter()
        samples, per_task = 40, 20_000
        results = lattica.get(
            [
                sample_pi.options(scheduling_strategy="SPREAD").remote(s, per_task)
                for s in range(samples)
            ]
        )
        inside = sum(r[0] for r in results)
        by_node: dict[str, int] = {}
        for _, node in results:
            by_node[node[:12]] = by_node.get(node[:12], 0) + 1
        print(
            f"[tasks] pi ~= {4 * inside / (samples * per_task):.4f} from {samples} tasks in "
            f"{time.perf_counter() - t:.2f} s; tasks per node: {by_node}"
        )

        hist = Histogram.remote(10)
        totals = lattica.get([feed.remote(hist, s, 1000) for s in range(8)])
        print(
            f"[actor] histogram fed by 8 tasks: {max(totals)} values, "
            f"bins {lattica.get(hist.counts_now.remote())}"
        )

        items = [lattica.get(ref) for ref in countdown.remote(5)]
        print(f"[stream] generator yielded {items}")

        matrix = np.random.default_rng(0).random((2000, 500))
        ref = lattica.put(matrix)
        print(f"[object] put a {matrix.nbytes / 1e6:.1f} MB array; its CID is {ref.cid}")
        far = [n["NodeID"] for n in lattica.nodes() if n["NodeID"] != me["node_id"] and n["Alive"]]
        strategy = lattica.NodeAffinitySchedulingStrategy(far[0]) if far else None
        means, node = lattica.get(
            column_means_by_cid.options(scheduling_strategy=strategy).remote(ref.cid)
        )
        print(
            f"[object] node {node[:12]}... fetched it by CID; column means {means} "
            f"(local: {matrix.mean(axis=0)[:3].round(4).tolist()})"
        )

        try:
            lattica.get(sample_pi.remote(0, None))
        except lattica.TaskError as err:
            print(
                f"[errors] a failing task re-raised {err.cause_type} with its remote traceback "
                f"({len(err.remote_traceback.splitlines())} lines)"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)
        lattica.shutdown()
    print("[done] all nodes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
