"""The runtime over a lossy, delayed WAN (netlab; needs root): every operation completes and no
worker is reported lost, with times and MB/s beside the same run on a WAN without loss.

For each WAN setting (``--loss`` values, one fresh lab each, ``--delay-ms`` each way at the
lab's internet): pub1 runs the bootstrap/relay node, a worker runs behind hostB's cone NAT
(resource ``tagB``) and one behind hostC's symmetric NAT (``tagC``), and a driver behind hostA's
cone NAT runs, on each worker in turn: ``--tasks`` tasks, an actor with ``--calls`` ordered calls,
a ``--size-mb`` array pushed to a task there (checked by its SHA-256) and one pulled back from a
task there (checked against the same seeded array). Each operation's error, if any, is recorded
instead of stopping the run; at the end the driver's and the workers' ``peers_lost`` counters and
their logs' "is gone" lines say whether any node was ever declared lost.

    sudo .venv/bin/python bench/lossy_wan.py [--loss 0 0.5 2] [--tasks 1000] [--size-mb 200]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench"), ROOT]

from netlab_nodes import (  # noqa: E402
    lab_unavailable,
    lost_lines,
    run_facts,
    start_driver,
    start_pub1,
    start_worker,
)
from netlab_util import lab  # noqa: E402

WORKERS = {"hostB": ("tagB", "cone"), "hostC": ("tagC", "symmetric")}

DRIVER = r"""
import hashlib, json, logging, sys, time, traceback
import numpy as np
import latticaray as lattica
from latticaray.runtime import api

logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
for name in ("latticaray.runtime.remote", "latticaray.mesh.nat"):
    logging.getLogger(name).setLevel(logging.INFO)

bootstrap, credential, relay, listen, config = sys.argv[1:6]
cfg = json.loads(config)
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1, listen=[listen],
             nat={"observers": ["198.18.0.11:4701"], "relays": [relay], "lab": True})
runtime = api._runtime.mesh_runtime

def offering(tag):
    return [n["NodeID"] for n in lattica.nodes()
            if n["Alive"] and n.get("Resources", {}).get(tag)]

deadline = time.monotonic() + 90
while not all(offering(tag) for tag in cfg["tags"]):
    assert time.monotonic() < deadline, lattica.nodes()
    time.sleep(0.05)

@lattica.remote
def square(i):
    return i * i

@lattica.remote
def digest(array):
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest(), array.nbytes

@lattica.remote
def produce(n, seed):
    return np.random.default_rng(seed).integers(0, 2**63, size=n, dtype=np.uint64)

@lattica.remote
class Counter:
    def __init__(self):
        self.seen = []
    def add(self, i):
        self.seen.append(i)
        return len(self.seen)
    def log(self):
        return self.seen

def path_to(node_id):
    for peer in runtime.mesh.connected_peers():
        if str(peer) == node_id:
            conn = runtime.mesh.connection_to(peer)
            return conn.transport if conn is not None else "none"
    return "none"

def timed(name, out, fn):
    t0 = time.monotonic()
    try:
        out[name] = fn()
        out[name + "_s"] = time.monotonic() - t0
    except Exception as exc:
        out[name + "_s"] = time.monotonic() - t0
        out.setdefault("errors", []).append(
            f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()

n_items = cfg["size_mb"] * 1024 * 1024 // 8
rows = {}
for tag in cfg["tags"]:
    out = rows[tag] = {"node": offering(tag)[0]}
    opts = {"resources": {tag: 0.01}}
    def tasks():
        got = lattica.get([square.options(**opts).remote(i) for i in range(cfg["tasks"])],
                          timeout=cfg["timeout"])
        assert got == [i * i for i in range(cfg["tasks"])], "wrong task results"
        return len(got)
    timed("tasks", out, tasks)
    def actor():
        counter = Counter.options(**opts).remote()
        got = lattica.get([counter.add.remote(i) for i in range(cfg["calls"])],
                          timeout=cfg["timeout"])
        assert got == list(range(1, cfg["calls"] + 1)), "actor calls out of order"
        assert lattica.get(counter.log.remote(), timeout=cfg["timeout"]) == list(range(cfg["calls"]))
        lattica.kill(counter)
        return len(got)
    timed("actor", out, actor)
    array = np.random.default_rng(1).integers(0, 2**63, size=n_items, dtype=np.uint64)
    want = hashlib.sha256(memoryview(array).cast("B")).hexdigest()
    def push():
        got, nbytes = lattica.get(digest.options(**opts).remote(array), timeout=cfg["timeout"])
        assert got == want and nbytes == array.nbytes, "the pushed array arrived changed"
        return nbytes
    timed("push", out, push)
    del array
    def pull():
        got = lattica.get(produce.options(**opts).remote(n_items, 2), timeout=cfg["timeout"])
        expect = np.random.default_rng(2).integers(0, 2**63, size=n_items, dtype=np.uint64)
        assert np.array_equal(got, expect), "the pulled array arrived changed"
        return int(got.nbytes)
    timed("pull", out, pull)
    out["path"] = path_to(out["node"])
    out["alive_at_end"] = bool(offering(tag))
stats = runtime.remote.stats
print(json.dumps({"rows": rows, "peers_lost": stats["peers_lost"],
                  "sessions_reopened": stats["sessions_reopened"],
                  "tasks_resent": stats["tasks_resent"],
                  "liveness": getattr(runtime.remote.membership, "liveness_report",
                                      lambda: None)()}), flush=True)
lattica.shutdown()
"""


def run_setting(
    prefix: str,
    delay_ms: float,
    loss_pct: float,
    tasks: int,
    calls: int,
    size_mb: int,
    timeout: float,
    hosts: tuple[str, ...] = ("hostB", "hostC"),
) -> dict:
    """One lab with this WAN; returns the driver's report plus the nodes' "is gone" lines."""
    up = ["--wan-delay-ms", str(delay_ms), "--wan-loss-pct", str(loss_pct)]
    logdir = tempfile.mkdtemp(prefix=f"lossy-{loss_pct}-")
    with lab(prefix, *up):
        nodes = []
        try:
            pub1, env = start_pub1(prefix, logdir)
            nodes.append(pub1)
            workers = {}
            for host in hosts:
                node, workers[host] = start_worker(env, host, {WORKERS[host][0]: 1})
                nodes.append(node)
            config = {
                "tags": [WORKERS[h][0] for h in hosts],
                "tasks": tasks,
                "calls": calls,
                "size_mb": size_mb,
                "timeout": timeout,
            }
            driver = start_driver(env, "hostA", DRIVER, json.dumps(config))
            nodes.append(driver)
            t0 = time.monotonic()
            out = driver.wait_output(timeout * 8 + 120)
            wall = time.monotonic() - t0
            lines = out.strip().splitlines()
            if driver.proc.returncode != 0 or not lines:
                report: dict = {"failed": True, "stderr": driver.log_tail(4000), "rows": {}}
            else:
                report = json.loads(lines[-1])
            report["wall_s"] = wall
            report["driver_log_tail"] = driver.log_tail(3000)
            report["worker_nodes"] = {h: workers[h]["node_id"] for h in hosts}
        finally:
            for node in reversed(nodes):
                node.stop()
        report["lost_lines"] = {n.host: lost_lines(n.log_text()) for n in nodes}
        report["logdir"] = logdir
        return report


def mbps(nbytes: int | None, seconds: float | None) -> float | None:
    if not nbytes or not seconds:
        return None
    return nbytes / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.5, 2.0])
    parser.add_argument("--delay-ms", type=float, default=25.0)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--prefix", default=os.environ.get("NETLAB_PREFIX", "lossy"))
    parser.add_argument(
        "--quic-backend",
        default="auto",
        help="the QUIC backend of every node (LATTICARAY_QUIC_BACKEND): auto, qh3 or aioquic",
    )
    args = parser.parse_args()
    os.environ["LATTICARAY_QUIC_BACKEND"] = args.quic_backend
    if lab_unavailable():
        return 2
    settings = []
    for loss in args.loss:
        report = run_setting(
            args.prefix, args.delay_ms, loss, args.tasks, args.calls, args.size_mb, args.timeout
        )
        settings.append({"loss_pct": loss, "delay_ms": args.delay_ms, **report})
        print(f"loss {loss}%: done in {report['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(
        f"{'loss %':>6} {'worker':>14} {'tasks':>6} {'tasks s':>8} {'actor s':>8} "
        f"{'push s':>7} {'push MB/s':>9} {'pull s':>7} {'pull MB/s':>9} {'path':>6} {'errors'}"
    )
    for s in settings:
        for host, (tag, nat) in WORKERS.items():
            r = s["rows"].get(tag)
            if r is None:
                print(f"{s['loss_pct']:>6} {host + ' ' + nat:>14} (no report: driver failed)")
                continue
            push = mbps(r.get("push"), r.get("push_s"))
            pull = mbps(r.get("pull"), r.get("pull_s"))
            print(
                f"{s['loss_pct']:>6} {host + ' ' + nat:>14} {r.get('tasks', 0):>6} "
                f"{r.get('tasks_s', 0):8.2f} {r.get('actor_s', 0):8.2f} {r.get('push_s', 0):7.1f} "
                f"{push or 0:9.1f} {r.get('pull_s', 0):7.1f} {pull or 0:9.1f} "
                f"{r.get('path', '?'):>6} {'; '.join(r.get('errors', [])) or '-'}"
            )
        lost = [line for lines in s.get("lost_lines", {}).values() for line in lines]
        print(
            f"{'':>6} peers lost: driver {s.get('peers_lost', '?')}, 'is gone' lines "
            f"{len(lost)}; task sessions reopened {s.get('sessions_reopened', '?')}"
        )
    print(
        json.dumps(
            {
                "bench": "lossy_wan",
                "settings": [
                    {k: v for k, v in s.items() if k not in ("driver_log_tail", "stderr")}
                    for s in settings
                ],
                "args": vars(args),
                **run_facts(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
