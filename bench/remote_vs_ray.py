"""Calls that cross nodes: latticaray's two node processes against Ray's two-node cluster.

Ray's own multi-node-on-one-machine cluster (``ray.cluster_utils.Cluster``: a head node the driver
connects to, plus one worker node) against two latticaray node processes (the driver attaches to
the first over its Unix socket, as Ray's driver attaches to its head node). Every task and actor
is pinned to the *second* node, so every call crosses from one node to the other:

* first call latency (a fresh remote function's first round trip, worker start included);
* tasks sync (one at a time) and async (many in flight);
* actor calls sync and async on an actor hosted by the second node;
* a 100 MB argument put by the driver and summed by a task on the second node (MB/s);
* a 100 MB result made on the second node and fetched by the driver (MB/s).

latticaray runs twice: between its nodes over the same-host Unix path (what two processes on one
machine use; store objects move between the nodes' stores as hard links, runtime/remote/
samehost.py) and over QUIC (``--no-same-host-path`` on both nodes: what two machines use,
objects as Bitswap blocks). Both clusters stay on loopback (Ray: ``node_ip_address`` 127.0.0.1
with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). The load average is recorded with the figures.
Ray runs in its own virtualenv (``.venv-ray``, made by ``make ray-venv``, or ``--ray-python``)
in the same sitting, alternating with latticaray, ``--rounds`` times. Prints a table and, last, one JSON line.

    .venv/bin/python bench/remote_vs_ray.py [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20
ROWS = [
    ("first call latency (ms)", "first_ms", "lower"),
    ("tasks sync (/s)", "tasks_sync", "higher"),
    ("tasks async (/s)", "tasks_async", "higher"),
    ("actor calls sync (/s)", "actor_sync", "higher"),
    ("actor calls async (/s)", "actor_async", "higher"),
    ("100 MB argument to the remote node (MB/s)", "arg_mbps", "higher"),
    ("100 MB result from the remote node (MB/s)", "result_mbps", "higher"),
]


def _rate(fn, n: int) -> float:
    started = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - started)


def _measure(api, remote_fn, actor_cls, pin, sizes) -> dict:
    """The rows, with ``api`` the ray or latticaray module; ``pin`` gives options that place a
    task or actor on the second node."""
    import numpy as np

    n_sync, n_async, big = sizes
    out = {}

    def fresh():
        def first():
            return 1

        return remote_fn(first).options(**pin)

    started = time.perf_counter()
    assert api.get(fresh().remote()) == 1
    out["first_ms"] = (time.perf_counter() - started) * 1e3

    def noop():
        return None

    task = remote_fn(noop).options(**pin)
    api.get([task.remote() for _ in range(50)])  # warm

    def sync(n):
        for _ in range(n):
            api.get(task.remote())

    def asyncs(n):
        api.get([task.remote() for _ in range(n)])

    out["tasks_sync"] = _rate(sync, n_sync)
    out["tasks_async"] = _rate(asyncs, n_async)

    actor = actor_cls.options(**pin).remote()
    api.get([actor.ping.remote() for _ in range(50)])

    def actor_sync(n):
        for _ in range(n):
            api.get(actor.ping.remote())

    def actor_async(n):
        api.get([actor.ping.remote() for _ in range(n)])

    out["actor_sync"] = _rate(actor_sync, n_sync)
    out["actor_async"] = _rate(actor_async, n_async)

    def total(x):
        return float(x[:: 1 << 16].sum())

    def make(n):
        import numpy as np

        return np.ones(n, dtype=np.uint8)

    summer = remote_fn(total).options(**pin)
    maker = remote_fn(make).options(**pin)
    api.get(summer.remote(np.ones(1 << 20, dtype=np.uint8)))  # warm both workers
    api.get(maker.remote(1 << 20))
    arg_rates, result_rates = [], []
    for fill in range(3):
        data = np.full(big, fill + 1, dtype=np.uint8)
        started = time.perf_counter()
        ref = api.put(data)
        api.get(summer.remote(ref))
        arg_rates.append(big / MB / (time.perf_counter() - started))
        del ref, data
        started = time.perf_counter()
        value = api.get(maker.remote(big))
        result_rates.append(big / MB / (time.perf_counter() - started))
        assert len(value) == big
        del value
    out["arg_mbps"] = statistics.median(arg_rates)
    out["result_mbps"] = statistics.median(result_rates)
    return out


# --------------------------------------------------------------------------------------- Ray
def ray_side(sizes) -> dict:
    # loopback only: with this off, Ray resolves "localhost" to 127.0.0.1 rather than to this
    # machine's outward address (the bench must never leave loopback)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **local}
    )
    cluster.add_node(num_cpus=2, resources={"remote": 1000}, **local)
    ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:

        @ray.remote
        class Pinger:
            def ping(self):
                return None

        def remote_fn(fn):
            return ray.remote(fn)

        return _measure(ray, remote_fn, Pinger, {"resources": {"remote": 0.001}}, sizes)
    finally:
        ray.shutdown()
        cluster.shutdown()


# -------------------------------------------------------------------------------- latticaray
def latticaray_side(sizes, same_host_path: bool) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests", "runtime"))
    from meshutil import NodeProcess

    import latticaray as lattica

    extra = () if same_host_path else ("--no-same-host-path",)
    with tempfile.TemporaryDirectory() as run_dir:
        first = NodeProcess(
            None, None, num_cpus=1, extra_args=("--driver-socket", f"{run_dir}/a.sock", *extra)
        )
        second = None
        try:
            second = NodeProcess(
                first.info["addrs"][0],
                first.info["invite"],
                num_cpus=2,
                extra_args=("--resources", json.dumps({"remote": 1000}), *extra),
            )
            lattica.init(address=first.info["driver_address"])
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if any(
                        n.get("NodeID") == second.node_id and n.get("Alive")
                        for n in lattica.nodes()
                    ):
                        break
                    time.sleep(0.05)

                @lattica.remote
                class Pinger:
                    def ping(self):
                        return None

                return _measure(
                    lattica, lattica.remote, Pinger, {"resources": {"remote": 0.001}}, sizes
                )
            finally:
                lattica.shutdown()
        finally:
            if second is not None:
                second.stop()
            first.stop()


def _child(kind: str, sizes) -> dict:
    """Run one side in a fresh process (each side gets a clean interpreter and cluster)."""
    if kind == "ray":
        python = RAY_PYTHON
    else:
        python = sys.executable
    cmd = [python, os.path.abspath(__file__), "--child", kind, "--sizes", json.dumps(sizes)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} side failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


RAY_PYTHON = os.environ.get(
    "LATTICARAY_RAY_PYTHON", os.path.join(ROOT, ".venv-ray", "bin", "python")
)


def main() -> int:
    global RAY_PYTHON
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--ray-python", default=RAY_PYTHON)
    parser.add_argument("--child", choices=["ray", "unix", "quic"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sizes = json.loads(args.sizes)
        if args.child == "ray":
            result = ray_side(sizes)
        else:
            result = latticaray_side(sizes, same_host_path=args.child == "unix")
        print(json.dumps(result))
        return 0
    RAY_PYTHON = args.ray_python
    sizes = [200, 2000, 100 * MB] if not args.quick else [50, 300, 16 * MB]
    have_ray = os.path.exists(RAY_PYTHON)
    kinds = (["ray"] if have_ray else []) + ["unix", "quic"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            load = os.getloadavg()[0]
            results[kind].append(dict(_child(kind, sizes), load_before=load))

    def med(kind, key):
        return statistics.median(r[key] for r in results[kind]) if results.get(kind) else None

    header = f"{'row':44} {'Ray':>10} {'lattica unix':>13} {'ratio':>6} {'lattica QUIC':>13} {'ratio':>6}"
    print(header)
    figures = {}
    for label, key, better in ROWS:
        ray = med("ray", key)
        row = {"ray": ray}
        cells = []
        for kind in ("unix", "quic"):
            value = med(kind, key)
            ratio = None
            if ray and value:
                ratio = ray / value if better == "lower" else value / ray
            row[kind] = value
            row[f"{kind}_ratio"] = ratio
            cells.append(f"{value:>13,.1f} {('-' if ratio is None else f'{ratio:.2f}x'):>6}")
        figures[key] = row
        print(f"{label:44} {('-' if ray is None else f'{ray:,.1f}'):>10} {' '.join(cells)}")
    loads = {k: [round(r["load_before"], 2) for r in results[k]] for k in kinds}
    print(f"load average (1 min) before each run: {loads}")
    from importlib.metadata import version

    versions = {"python": platform.python_version(), "latticaray": version("latticaray")}
    if have_ray:
        versions["ray"] = subprocess.run(
            [RAY_PYTHON, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True
        ).stdout.strip()
    print(
        json.dumps(
            {
                "remote_vs_ray": figures,
                "rounds": args.rounds,
                "sizes": sizes,
                "raw": results,
                "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()},
                "versions": versions,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
