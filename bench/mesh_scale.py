"""How a mesh of node processes scales: idle cost, start time, placement, throughput at N nodes.

For each N (default 8, 16, 32, 64) this starts N node processes on loopback with
`latticaray start` (the first one makes the mesh; the next seven join through it, the rest
through those eight in turn, so no single node bootstraps everyone), then measures:

* start: seconds from the first spawn until all N printed their ready line;
* idle, over ``--idle`` seconds after ``--settle`` seconds of quiet: CPU time per node per
  second (the node process and its workers, from /proc), bytes per node per second (what the
  node process wrote through system calls, /proc/<pid>/io ``wchar``: on one host the peers talk
  over Unix sockets, which no interface counter sees), and RSS per node (the node process; its
  workers separately);
* placement: a driver (this process, an embedded node bootstrapped to the first node) places one
  task on every node in turn with a hard node affinity; most of these nodes it never met, so
  each first task includes meeting the node. Per-task latency p50/p90/max and the total;
* throughput: 2,000 small tasks with the default strategy (submitted at once, all got), tasks
  per second and how many nodes ran them.

``--peering`` passes the node's peering mode (default: the nodes' own default). Run the same N
with ``--peering full`` beside the default to compare in one sitting (``--compare full``).

    .venv/bin/python bench/mesh_scale.py                     # N = 8, 16, 32, 64
    .venv/bin/python bench/mesh_scale.py --sizes 8,16 --compare full

The last line is one JSON object with every figure, the load average, the machine and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

import latticaray as lattica  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the bench


class Node:
    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "latticaray.cli", "start", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.info: dict = {}
        self.ready_at: float | None = None

    def wait_ready(self, timeout: float) -> None:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"node {self.proc.pid} not ready after {timeout:.0f}s")
        self.info = json.loads(result[0])
        self.ready_at = time.monotonic()

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        pid = self.proc.pid
        for root in glob.glob(f"/dev/shm/latticaray-{os.getuid()}/store-{pid}-*") + glob.glob(
            os.path.join(tempfile.gettempdir(), f"latticaray-spill-{os.getuid()}", f"store-{pid}-*")
        ):
            shutil.rmtree(root, ignore_errors=True)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def idle_figures(nodes: list[Node], seconds: float) -> dict:
    pids = {n.proc.pid: _tree(n.proc.pid) for n in nodes}

    def sample() -> tuple[dict, dict]:
        cpu, wchar = {}, {}
        for root, tree in pids.items():
            total = 0
            for pid in tree:
                with contextlib.suppress(OSError, ValueError):
                    total += _cpu_ticks(pid)
            cpu[root] = total
            with contextlib.suppress(OSError):
                wchar[root] = _wchar(root)
        return cpu, wchar

    cpu0, io0 = sample()
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1, io1 = sample()
    elapsed = time.monotonic() - t0
    cpu_ms = [1000 * (cpu1[p] - cpu0[p]) / TICK / elapsed for p in cpu0]
    bytes_s = [(io1[p] - io0[p]) / elapsed for p in io0 if p in io1]
    rss_node, rss_workers = [], []
    for root, tree in pids.items():
        with contextlib.suppress(psutil.Error):
            rss_node.append(psutil.Process(root).memory_info().rss)
            rss_workers.append(
                sum(psutil.Process(p).memory_info().rss for p in tree[1:] if psutil.pid_exists(p))
            )
    return {
        "cpu_ms_per_node_per_s_mean": statistics.mean(cpu_ms),
        "cpu_ms_per_node_per_s_max": max(cpu_ms),
        "cpu_cores_total": sum(cpu_ms) / 1000,
        "bytes_per_node_per_s_mean": statistics.mean(bytes_s) if bytes_s else None,
        "bytes_per_node_per_s_max": max(bytes_s) if bytes_s else None,
        "rss_node_mb_mean": statistics.mean(rss_node) / 2**20,
        "rss_workers_mb_mean": statistics.mean(rss_workers) / 2**20,
        "window_s": elapsed,
    }


@lattica.remote(num_cpus=0.5)
def whereami():
    return lattica.get_runtime_context().node_id


@lattica.remote(num_cpus=0.5)
def small(i):
    return (i, lattica.get_runtime_context().node_id)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def one_size(n: int, peering: str | None, settle: float, idle: float, tasks: int) -> dict:
    extra = ["--num-cpus", "1", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"]
    if peering:
        extra += ["--peering", peering]
    nodes: list[Node] = []
    out: dict = {"n": n, "peering": peering or "default"}
    try:
        started = time.monotonic()
        first = Node(extra)
        nodes.append(first)
        first.wait_ready(120)
        invite = first.info["invite"]
        # the first eight join through the first; the rest through those eight, in turn
        for wave in (range(1, min(n, 8)), range(8, n)):
            for i in wave:
                via = nodes[0] if i < 8 else nodes[i % 8]
                nodes.append(
                    Node(extra + ["--bootstrap", via.info["addrs"][0], "--credential", invite])
                )
            for node in nodes[wave.start :]:
                node.wait_ready(180)
        out["start_s"] = max(node.ready_at for node in nodes) - started
        time.sleep(settle)
        out["idle"] = idle_figures(nodes, idle)
        lattica.init(bootstrap=[first.info["addrs"][0]], credential=invite, num_cpus=0)
        try:
            measure_placement(out, nodes, tasks)
        except Exception as exc:  # start and idle figures stand; say what failed
            out["error"] = repr(exc)[:500]
        finally:
            lattica.shutdown()
    finally:
        for node in nodes:
            node.stop()
    return out


def measure_placement(out: dict, nodes: list, tasks: int) -> None:
    """One task on every node in turn (hard affinity), then ``tasks`` small tasks."""
    latencies = []
    placed_on = []
    t0 = time.perf_counter()
    for node in nodes:
        strategy = lattica.NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        s = time.perf_counter()
        deadline = s + 60
        while True:  # a runtime that must first learn of the node refuses until then
            try:
                ref = whereami.options(scheduling_strategy=strategy).remote()
                placed_on.append(lattica.get(ref, timeout=60))
                break
            except lattica.TaskUnschedulableError:
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.02)
        latencies.append(time.perf_counter() - s)
    out["place_every_node"] = {
        "total_s": time.perf_counter() - t0,
        "first_task_ms_p50": 1000 * statistics.median(latencies),
        "first_task_ms_p90": 1000 * pct(latencies, 0.9),
        "first_task_ms_max": 1000 * max(latencies),
        "right_node": sum(p == n.node_id for p, n in zip(placed_on, nodes, strict=True)),
    }
    t0 = time.perf_counter()
    results = lattica.get([small.remote(i) for i in range(tasks)], timeout=600)
    took = time.perf_counter() - t0
    out["throughput"] = {
        "tasks": tasks,
        "seconds": took,
        "tasks_per_s": tasks / took,
        "nodes_used": len({r[1] for r in results}),
        "correct": [r[0] for r in results] == list(range(tasks)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--peering", default=None, help="node peering mode (default: theirs)")
    parser.add_argument("--compare", default=None, help="also run each size with this peering")
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    load_before = os.getloadavg()
    for n in sizes:
        for peering in [args.peering, *([args.compare] if args.compare else [])]:
            try:
                runs.append(one_size(n, peering, args.settle, args.idle, args.tasks))
            except Exception as exc:  # one size failing does not lose the others' figures
                runs.append({"n": n, "peering": peering or "default", "error": repr(exc)[:500]})
            print(json.dumps(runs[-1], default=str), file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    head = (
        f"{'N':>4} {'peering':>8} {'start s':>8} {'idle ms/node/s':>15} {'bytes/node/s':>13} "
        f"{'RSS MB node':>11} {'first task ms p50':>18} {'all nodes s':>11} {'tasks/s':>8}"
    )
    print(head)
    for r in runs:
        if "error" in r or "throughput" not in r:
            idle = r.get("idle") or {}
            print(
                f"{r['n']:>4} {r['peering']:>8} {r.get('start_s', float('nan')):>8.1f} "
                f"{idle.get('cpu_ms_per_node_per_s_mean', float('nan')):>15.2f}  "
                f"failed: {r.get('error')}"
            )
            continue
        idle, place, tput = r["idle"], r["place_every_node"], r["throughput"]
        print(
            f"{r['n']:>4} {r['peering']:>8} {r['start_s']:>8.1f} "
            f"{idle['cpu_ms_per_node_per_s_mean']:>15.2f} "
            f"{idle['bytes_per_node_per_s_mean'] or 0:>13.0f} {idle['rss_node_mb_mean']:>11.0f} "
            f"{place['first_task_ms_p50']:>18.1f} {place['total_s']:>11.2f} "
            f"{tput['tasks_per_s']:>8.0f}"
        )
    by_n = {(r["n"], r["peering"]): r for r in runs}
    default = args.peering or "default"
    targets = {}
    if all("throughput" in by_n.get((n, default), {}) for n in (8, 64)):
        small_idle = by_n[(8, default)]["idle"]["cpu_ms_per_node_per_s_mean"]
        big = by_n[(64, default)]
        targets = {
            "idle_64_within_1.5x_of_8": big["idle"]["cpu_ms_per_node_per_s_mean"]
            <= 1.5 * max(small_idle, 1e-9),
            "idle_64_at_most_5ms": big["idle"]["cpu_ms_per_node_per_s_mean"] <= 5.0,
            "start_64_within_30s": big["start_s"] <= 30.0,
            "first_task_p50_within_100ms": big["place_every_node"]["first_task_ms_p50"] <= 100,
        }
        print("targets:", targets)
    print(f"load average before {load_before}, after {load_after}")
    import msgpack

    print(
        json.dumps(
            {
                "bench": "mesh_scale",
                "runs": runs,
                "targets": targets,
                "load_before": load_before,
                "load_after": load_after,
                "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
                "versions": {
                    "python": platform.python_version(),
                    "msgpack": msgpack.version,
                    "psutil": psutil.__version__,
                },
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
