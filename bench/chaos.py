"""Chaos over netlab (root): a long job while a controller kills, restarts, partitions and drops.

The lab: pub1 runs the bootstrap/relay node (never faulted); worker nodes run on pub2 and hostD
(public), hostB and hostB2 (behind natB, cone) and hostC (behind natC, symmetric), each with a
fixed host key (a restarted node comes back under the same peer id); the driver runs behind natA.
Every worker offers the resource ``w`` (tasks and actors ask for it, so they run on workers).

The job (the driver, for ``--minutes``): ``--tasks`` tasks with retries (``max_retries``) submitted
at a steady pace; ``--actors`` actors with restarts (``max_restarts=-1``) called in rounds; and
``--objects-gb`` of objects put by the driver, each replicated to ``--replicas`` workers (the object
store's replicate), re-read and checked (SHA-256) by tasks on workers while faults go on, and all
checked again at the end.

The controller, meanwhile, every ``--fault-every`` s (cycling): kill -9 a random worker node (it is
restarted ``--restart-after`` s later), partition a NAT router's WAN (natB or natC) for
``--partition-s`` s, and, for the whole run, drops 1% of packets on one link (hostD's, an nftables
``numgen random mod 100 < 1 drop`` rule in that namespace; this kernel has no netem). After a
kill, the driver measures the time until the node was declared gone (detection) and, after the
restart or heal, until a task pinned to that node ran again there (recovery).

At the end: tasks submitted/completed/lost (lost: failed after its retries), actor calls
completed vs failed with ActorDiedError (and other errors), objects verified intact, recovery
times per fault kind (p50/p99), and each node's memory (RSS of the node and its workers) after
setup and at the end.

    sudo .venv/bin/python bench/chaos.py --minutes 3      # a short run
    sudo .venv/bin/python bench/chaos.py --minutes 20     # the full job

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench"), ROOT]

from netlab_nodes import (  # noqa: E402
    LabNode,
    lab_unavailable,
    lost_lines,
    run_facts,
    start_driver,
    start_pub1,
    start_worker,
)
from netlab_util import lab  # noqa: E402

WORKER_HOSTS = ["pub2", "hostD", "hostB", "hostB2", "hostC"]
PARTITION_ROUTERS = ["natB", "natC"]
LOSSY_HOST = "hostD"

DRIVER = r"""
import hashlib, json, os, queue, random, sys, threading, time, traceback
import numpy as np
import latticaray as lattica
from latticaray.runtime import api

bootstrap, credential, relay, listen, config = sys.argv[1:6]
cfg = json.loads(config)
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1, listen=[listen],
             nat={"observers": ["198.18.0.11:4701"], "relays": [relay], "lab": True},
             log_to_driver=False)
runtime = api._runtime.mesh_runtime
T0 = time.monotonic()
out_lock = threading.Lock()

def emit(kind, **fields):
    with out_lock:
        print(json.dumps({"event": kind, "t": time.monotonic() - T0, **fields}), flush=True)

def alive_workers():
    return {n["NodeID"] for n in lattica.nodes() if n["Alive"] and n.get("Resources", {}).get("w")}

deadline = time.monotonic() + 180
while len(alive_workers()) < cfg["workers"]:
    assert time.monotonic() < deadline, lattica.nodes()
    time.sleep(0.2)

W = {"resources": {"w": 0.01}, "num_cpus": 0.5}

@lattica.remote
def square(i):
    time.sleep(cfg["task_s"])
    return i * i

@lattica.remote
def digest(array):
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()

@lattica.remote
def where():
    return lattica.get_runtime_context().node_id

@lattica.remote
class Counter:
    def __init__(self, k):
        self.k, self.n = k, 0
    def add(self):
        self.n += 1
        return self.k

# objects: put, replicate to workers, remember their digests
objects = []
exchange = runtime.exchange
rng = np.random.default_rng(11)
n_items = cfg["object_mb"] * 1024 * 1024 // 8
t_put = time.monotonic()
for k in range(cfg["objects"]):
    array = rng.integers(0, 2**63, size=n_items, dtype=np.uint64)
    ref = lattica.put(array)
    objects.append((ref, hashlib.sha256(memoryview(array).cast("B")).hexdigest()))
    del array
replicated = 0
import asyncio
workers = [p.peer_id for p in runtime.remote.membership.peers.values()
           if p.alive and p.view is not None and p.view.total.get("w")]
for ref, _ in objects:
    random.shuffle(workers)
    try:  # the object store's replication: each of these peers fetches and pins a copy
        peers = asyncio.run_coroutine_threadsafe(
            exchange.replicate(ref.cid, cfg["replicas"], timeout=300.0, candidates=workers),
            api._runtime.loop).result(400)
        replicated += len(peers)
    except Exception as exc:
        emit("replicate_failed", error=repr(exc)[:300])
emit("objects_ready", objects=len(objects), replicas=replicated,
     seconds=time.monotonic() - t_put)

stop = threading.Event()
counts = {"tasks_submitted": 0, "tasks_completed": 0, "tasks_lost": 0, "tasks_wrong": 0,
          "actor_calls": 0, "actor_ok": 0, "actor_died": 0, "actor_other": 0,
          "verify_ok": 0, "verify_bad": 0, "verify_failed": 0}
errors = []

def note_error(what, exc):
    if len(errors) < 50:
        errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")

def tasks_loop():
    pending = {}
    total, i = cfg["tasks"], 0
    pace = cfg["job_s"] / max(total, 1)
    next_at = time.monotonic()
    while i < total or pending:
        while i < total and len(pending) < cfg["inflight"] and time.monotonic() >= next_at:
            ref = square.options(max_retries=cfg["max_retries"], **W).remote(i)
            pending[ref] = i
            counts["tasks_submitted"] += 1
            i += 1
            next_at += pace
        if not pending:
            time.sleep(min(0.05, max(0.0, next_at - time.monotonic())))
            continue
        ready, _ = lattica.wait(list(pending), num_returns=1, timeout=0.2)
        for ref in ready:
            k = pending.pop(ref)
            try:
                value = lattica.get(ref, timeout=60)
                if value == k * k:
                    counts["tasks_completed"] += 1
                else:
                    counts["tasks_wrong"] += 1
            except Exception as exc:
                counts["tasks_lost"] += 1
                note_error(f"task {k}", exc)

def actors_loop():
    actors = [Counter.options(max_restarts=-1, resources={"w": 1}, num_cpus=0).remote(k)
              for k in range(cfg["actors"])]
    while not stop.is_set():
        refs = [(k, a.add.remote()) for k, a in enumerate(actors)]
        for k, ref in refs:
            counts["actor_calls"] += 1
            try:
                value = lattica.get(ref, timeout=120)
                counts["actor_ok" if value == k else "actor_other"] += 1
            except lattica.ActorDiedError as exc:
                counts["actor_died"] += 1
                note_error(f"actor {k}", exc)
            except Exception as exc:
                counts["actor_other"] += 1
                note_error(f"actor {k}", exc)
        stop.wait(cfg["actor_round_s"])

def verify(ref, want):
    try:
        got = lattica.get(digest.options(max_retries=3, **W).remote(ref), timeout=600)
        counts["verify_ok" if got == want else "verify_bad"] += 1
    except Exception as exc:
        counts["verify_failed"] += 1
        note_error("verify", exc)

def objects_loop():
    k = 0
    while not stop.is_set() and objects:
        verify(*objects[k % len(objects)])
        k += 1
        stop.wait(cfg["verify_every_s"])

def probe(node, kind, since):
    # kill: time until the driver saw the node gone; restart/heal: until a task pinned there ran
    strategy = lattica.NodeAffinitySchedulingStrategy(node, soft=False)
    deadline = time.monotonic() + 300
    if kind == "killed":
        while time.monotonic() < deadline:
            alive = {n["NodeID"]: n["Alive"] for n in lattica.nodes()}
            if not alive.get(node, False):
                emit("detected", node=node, seconds=time.monotonic() - since)
                return
            time.sleep(0.1)
        emit("detected", node=node, seconds=None)
        return
    while time.monotonic() < deadline:
        try:
            if lattica.get(where.options(scheduling_strategy=strategy, **W).remote(),
                           timeout=10) == node:
                emit("recovered", node=node, fault=kind, seconds=time.monotonic() - since)
                return
        except Exception:
            time.sleep(0.2)
    emit("recovered", node=node, fault=kind, seconds=None)

def control_loop():
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("stop"):
            return
        threading.Thread(target=probe, args=(message["node"], message["kind"], time.monotonic()),
                         daemon=True).start()

threads = [threading.Thread(target=f, daemon=True) for f in (actors_loop, objects_loop)]
for t in threads:
    t.start()
threading.Thread(target=control_loop, daemon=True).start()
emit("job_started")
tasks_loop()
stop.set()
for t in threads:
    t.join(600)
final = {"ok": 0, "bad": 0, "failed": 0}
before = dict(counts)
for ref, want in objects:
    verify(ref, want)
final = {k: counts["verify_" + k] - before["verify_" + k] for k in ("ok", "bad", "failed")}
emit("done", counts=counts, final_verify=final, errors=errors,
     liveness=runtime.remote.membership.liveness_report(),
     stats={k: v for k, v in runtime.remote.stats.items()})
lattica.shutdown()
"""


def nft(prefix: str, host: str, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", f"{prefix}-{host}", "nft", "-f", "-"],
        input=script,
        text=True,
        check=True,
        timeout=30,
    )


def nft_delete(prefix: str, host: str, table: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", f"{prefix}-{host}", "nft", "delete", "table", "inet", table],
        capture_output=True,
        timeout=30,
    )


def partition(prefix: str, router: str) -> None:
    """Drop everything crossing the router's WAN interface (both ways, the router's own too)."""
    nft(
        prefix,
        router,
        "table inet chaos_partition {\n"
        "  chain cut_forward { type filter hook forward priority -200; policy accept;\n"
        '    iifname "wan" drop\n    oifname "wan" drop\n  }\n'
        "  chain cut_input { type filter hook input priority -200; policy accept;\n"
        '    iifname "wan" drop\n  }\n'
        "  chain cut_output { type filter hook output priority -200; policy accept;\n"
        '    oifname "wan" drop\n  }\n'
        "}\n",
    )


def heal(prefix: str, router: str) -> None:
    nft_delete(prefix, router, "chaos_partition")


def lossy_link(prefix: str, host: str, pct: int = 1) -> None:
    """Drop pct% of the packets into and out of ``host``."""
    nft(
        prefix,
        host,
        "table inet chaos_loss {\n"
        "  chain inp { type filter hook input priority -200; policy accept;\n"
        f"    numgen random mod 100 < {pct} drop\n  }}\n"
        "  chain outp { type filter hook output priority -200; policy accept;\n"
        f"    numgen random mod 100 < {pct} drop\n  }}\n"
        "}\n",
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


class Chaos:
    """The lab, its node processes and the fault controller."""

    def __init__(self, args: argparse.Namespace, logdir: str):
        self.args = args
        self.prefix = args.prefix
        self.logdir = logdir
        self.rng = random.Random(args.seed)
        self.env: dict = {}
        self.nodes: dict[str, LabNode] = {}  # host -> its current node process
        self.node_ids: dict[str, str] = {}
        self.retired: list[LabNode] = []  # killed incarnations
        self.events: list[dict] = []  # from the driver
        self.faults: list[dict] = []
        self.memory_before: dict[str, float | None] = {}
        self.driver: LabNode | None = None
        self._restarts = 0
        self._restarts_due: list[tuple[float, str, dict, float]] = []

    def start_worker(self, host: str) -> None:
        self._restarts += 1
        node, info = start_worker(
            self.env,
            host,
            {"w": 100},
            cpus=2,
            name=f"{host}-{self._restarts}",
            key_path=os.path.join(self.logdir, f"{host}.key"),
        )
        self.nodes[host] = node
        self.node_ids[host] = info["node_id"]

    def read_driver(self) -> None:
        assert self.driver is not None and self.driver.proc.stdout is not None
        for raw in self.driver.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("{"):
                continue
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue

    def tell_driver(self, message: dict) -> None:
        assert self.driver is not None and self.driver.proc.stdin is not None
        try:
            self.driver.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.driver.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def driver_done(self) -> bool:
        return any(e.get("event") == "done" for e in self.events)

    def run(self) -> dict:
        a = self.args
        pub1, self.env = start_pub1(self.prefix, self.logdir)
        self.nodes["pub1"] = pub1
        for host in WORKER_HOSTS:
            self.start_worker(host)
        scale = a.minutes / 20.0
        config = {
            "workers": len(WORKER_HOSTS),
            "tasks": a.tasks or max(100, round(10_000 * scale)),
            "actors": a.actors or max(10, round(50 * scale)),
            "objects": a.objects or max(4, round(40 * scale)),
            "object_mb": a.object_mb,
            "replicas": a.replicas,
            "job_s": a.minutes * 60.0,
            "inflight": 200,
            "max_retries": 10,
            "task_s": 0.02,
            "actor_round_s": 2.0,
            "verify_every_s": 5.0,
        }
        # the driver reads fault notices on its stdin
        self.driver = start_driver(self.env, "hostA", DRIVER, json.dumps(config), stdin=True)
        reader = threading.Thread(target=self.read_driver, daemon=True)
        reader.start()
        deadline = time.monotonic() + 900
        while not any(e.get("event") == "job_started" for e in self.events):
            if time.monotonic() > deadline or not self.driver.alive():
                raise RuntimeError(f"the driver did not start its job: {self.driver.log_tail()}")
            time.sleep(0.5)
        for host, node in self.nodes.items():
            self.memory_before[host] = node.rss_mb()
        lossy_link(self.prefix, LOSSY_HOST, 1)
        job_started = time.monotonic()
        kinds = ["kill", "partition"]
        k = 0
        next_fault = job_started + a.fault_every / 2
        while time.monotonic() - job_started < a.minutes * 60.0 and not self.driver_done():
            if not self.driver.alive():
                break
            self.restart_due()
            if time.monotonic() >= next_fault:
                try:
                    self.fault(kinds[k % len(kinds)])
                except (
                    OSError,
                    subprocess.SubprocessError,
                ) as exc:  # a fault that could not be made
                    self.faults.append({"kind": kinds[k % len(kinds)], "error": str(exc)[:300]})
                k += 1
                next_fault = time.monotonic() + a.fault_every
            time.sleep(0.5)
        wait_end = time.monotonic() + 1800
        while not self.driver_done() and self.driver.alive() and time.monotonic() < wait_end:
            self.restart_due()
            time.sleep(1.0)
        time.sleep(2.0)
        memory_after = {host: node.rss_mb() for host, node in self.nodes.items()}
        return {"config": config, "memory_after": memory_after}

    def restart_due(self) -> None:
        """Restart the killed nodes whose time has come (in the main thread)."""
        for item in [r for r in self._restarts_due if r[0] <= time.monotonic()]:
            self._restarts_due.remove(item)
            _, host, record, started = item
            self.start_worker(host)
            record["restarted_after"] = time.monotonic() - started
            self.tell_driver({"kind": "restarted", "node": self.node_ids[host]})

    def fault(self, kind: str) -> None:
        a = self.args
        started = time.monotonic()
        if kind == "kill":
            host = self.rng.choice(WORKER_HOSTS)
            node_id = self.node_ids[host]
            old = self.nodes[host]
            old.kill9()
            self.retired.append(old)
            self.tell_driver({"kind": "killed", "node": node_id})
            record = {"kind": "kill", "host": host, "node": node_id, "at": started}
            self.faults.append(record)

            # restarted by the main thread (restart_due): a node started from a thread that then
            # ends would be killed with it (PR_SET_PDEATHSIG follows the creating thread)
            self._restarts_due.append((started + a.restart_after, host, record, started))
        else:
            router = self.rng.choice(PARTITION_ROUTERS)
            hosts = [h for h in WORKER_HOSTS if h.startswith("host" + router[-1])]
            partition(self.prefix, router)
            record = {"kind": "partition", "router": router, "hosts": hosts, "at": started}
            self.faults.append(record)

            def later() -> None:
                time.sleep(a.partition_s)
                heal(self.prefix, router)
                for host in hosts:
                    self.tell_driver({"kind": "healed", "node": self.node_ids[host]})

            threading.Thread(target=later, daemon=True).start()

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()
        for node in [*self.nodes.values(), *self.retired]:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=0, help="default 10,000 x minutes/20")
    parser.add_argument("--actors", type=int, default=0, help="default 50 x minutes/20")
    parser.add_argument("--objects", type=int, default=0, help="default 40 x minutes/20")
    parser.add_argument("--object-mb", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--fault-every", type=float, default=45.0)
    parser.add_argument("--restart-after", type=float, default=12.0)
    parser.add_argument("--partition-s", type=float, default=30.0)
    parser.add_argument("--wan-delay-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefix", default=os.environ.get("NETLAB_PREFIX", "chaos"))
    args = parser.parse_args()
    if lab_unavailable():
        return 2
    logdir = tempfile.mkdtemp(prefix="chaos-")
    wall = time.monotonic()
    with lab(args.prefix, "--lan-hosts", "2", "--wan-delay-ms", str(args.wan_delay_ms)):
        chaos = Chaos(args, logdir)
        try:
            result = chaos.run()
        finally:
            chaos.stop()
    report = summarize(chaos, result, time.monotonic() - wall, logdir)
    print_table(report)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def summarize(chaos: Chaos, result: dict, wall: float, logdir: str) -> dict:
    done = next((e for e in chaos.events if e.get("event") == "done"), None)
    detected = [e["seconds"] for e in chaos.events if e.get("event") == "detected"]
    recovered: dict[str, list] = {"restarted": [], "healed": []}
    for e in chaos.events:
        if e.get("event") == "recovered":
            recovered.setdefault(e["fault"], []).append(e["seconds"])

    def times(values: list) -> dict:
        ok = [v for v in values if v is not None]
        return {
            "n": len(values),
            "never": len(values) - len(ok),
            "p50": percentile(ok, 50),
            "p99": percentile(ok, 99),
            "max": max(ok) if ok else None,
        }

    lost = {}
    for node in [*chaos.nodes.values(), *chaos.retired]:
        lines = lost_lines(node.log_text())
        if lines:
            lost[os.path.basename(node.log_path)] = len(lines)
    counts = done["counts"] if done else {}
    report = {
        "bench": "chaos",
        "ok": bool(done) and counts.get("tasks_lost", 1) == 0 and counts.get("verify_bad", 1) == 0,
        "wall_s": wall,
        "config": result["config"],
        "counts": counts,
        "final_verify": done["final_verify"] if done else None,
        "errors": done["errors"] if done else [],
        "faults": [{k: v for k, v in f.items() if k != "at"} for f in chaos.faults],
        "detect_s": times(detected),
        "recover_after_restart_s": times(recovered["restarted"]),
        "recover_after_heal_s": times(recovered["healed"]),
        "memory_mb_before": chaos.memory_before,
        "memory_mb_after": result["memory_after"],
        "is_gone_lines": lost,
        "driver_liveness": done["liveness"] if done else None,
        "driver_stats": done["stats"] if done else None,
        "logdir": logdir,
        **run_facts(),
    }
    if done is None:
        report["driver_log_tail"] = chaos.driver.log_tail(3000) if chaos.driver else ""
    return report


def print_table(r: dict) -> None:
    c = r["counts"]
    print(f"chaos: {r['config']['job_s'] / 60:.1f} min job, wall {r['wall_s'] / 60:.1f} min")
    print(
        f"  tasks      submitted {c.get('tasks_submitted')}, completed {c.get('tasks_completed')},"
        f" lost {c.get('tasks_lost')}, wrong {c.get('tasks_wrong')}"
    )
    print(
        f"  actors     calls {c.get('actor_calls')}, completed {c.get('actor_ok')}, "
        f"ActorDiedError {c.get('actor_died')}, other errors {c.get('actor_other')}"
    )
    print(
        f"  objects    verified intact {c.get('verify_ok')}, corrupted {c.get('verify_bad')}, "
        f"unreadable {c.get('verify_failed')}; at the end {r['final_verify']}"
    )
    kinds = [f["kind"] for f in r["faults"]]
    print(
        f"  faults     {kinds.count('kill')} kill -9 + restart, {kinds.count('partition')} "
        f"WAN partitions, 1% loss on {LOSSY_HOST} throughout"
    )
    for name in ("detect_s", "recover_after_restart_s", "recover_after_heal_s"):
        t = r[name]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"  {name:24} n={t['n']} p50={fmt(t['p50'])} p99={fmt(t['p99'])} "
            f"max={fmt(t['max'])} never={t['never']}"
        )
    print(
        "  memory MB  "
        + ", ".join(
            f"{h}: {r['memory_mb_before'].get(h) or 0:.0f} -> {r['memory_mb_after'].get(h) or 0:.0f}"
            for h in r["memory_mb_after"]
        )
    )
    if r["errors"]:
        print("  first errors: " + "; ".join(r["errors"][:5]))


if __name__ == "__main__":
    sys.exit(main())
