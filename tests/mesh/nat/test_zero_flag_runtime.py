"""The zero-flag join on real kernel NATs (netlab): nobody is told an observer or a relay.

pub1 runs the mesh's first node with `--serve-relay` (a public node offering relay and AutoNAT);
workers inside hostB (cone NAT) and hostC (symmetric NAT) are started with only `--bootstrap` and
`--credential`; a driver inside hostA (cone NAT) calls only
`lattica.init(bootstrap=[pub1], credential=...)`. Every process has `LATTICARAY_LAB=1` in its
environment — the one marker that makes the lab's 198.18.0.0/15 count as public, so each runs
exactly the code a laptop on the internet runs: it listens on every interface, learns its
reachability with AutoNAT from the peers it meets, finds the relay among them, reserves it and
hole-punches. The driver then runs tasks and an actor on both workers, sends a 200 MB array each
way, sees the workers' print lines, and reads the path to each worker from the state API.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from netlab_nodes import PUB1, LabNode  # noqa: E402

pytestmark = pytest.mark.netlab

QUIC_PORT = 4801
RELAY_PORT = 4802
LAB_ENV = {"LATTICARAY_LAB": "1"}

DRIVER = r"""
import json, sys, time
import numpy as np
import latticaray as lattica
from latticaray.runtime import api
from latticaray.util import state

bootstrap, credential = sys.argv[1:3]
t0 = time.monotonic()
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1)
join_s = time.monotonic() - t0

def offering(resource):
    return [n["NodeID"] for n in lattica.nodes()
            if n["Alive"] and n.get("Resources", {}).get(resource)]

deadline = time.monotonic() + 60
while not (offering("zf_hostB") and offering("zf_hostC")):
    assert time.monotonic() < deadline, lattica.nodes()
    time.sleep(0.05)
workers = {h: offering(f"zf_{h}")[0] for h in ("hostB", "hostC")}

@lattica.remote
def where(i):
    print(f"zero-flag task {i} says hello", flush=True)
    return lattica.get_runtime_context().node_id, i * i

@lattica.remote
def total(x):
    return lattica.get_runtime_context().node_id, int(x.sum())

@lattica.remote
def make(n, fill):
    return np.full(n, fill, dtype=np.uint8)

@lattica.remote
class Counter:
    def __init__(self):
        self.n = 0
    def add(self, k):
        self.n += k
        return lattica.get_runtime_context().node_id, self.n

out = {"workers": workers, "join_s": join_s, "tasks": {}, "actors": {},
       "push_MBps": {}, "pull_MBps": {}, "sums": {}, "paths": {}}
big = 200 * 1024 * 1024
for host, node in workers.items():
    opts = dict(resources={f"zf_{host}": 0.01})
    out["tasks"][host] = lattica.get([where.options(**opts).remote(i) for i in range(20)],
                                     timeout=120)
    counter = Counter.options(**opts).remote()
    out["actors"][host] = [lattica.get(counter.add.remote(k), timeout=60) for k in (1, 2, 3)]
    data = np.full(big, 3, dtype=np.uint8)
    t = time.monotonic()
    out["sums"][host] = lattica.get(total.options(**opts).remote(lattica.put(data)), timeout=300)
    out["push_MBps"][host] = big / 2**20 / (time.monotonic() - t)
    del data
    t = time.monotonic()
    back = lattica.get(make.options(**opts).remote(big, 5), timeout=300)
    out["pull_MBps"][host] = big / 2**20 / (time.monotonic() - t)
    whole = len(back) == big and int(back[::4096].sum()) == 5 * (big // 4096)
    out["pulled_ok"] = out.get("pulled_ok", True) and whole
    del back
# a driver's reachability settles after init() returns (in the background): read it now
out["timings"] = dict(api._runtime.mesh_runtime.timings)
links = state.list_links(raise_on_missing_output=False, limit=1000)
me = api._runtime.mesh_runtime.node_id
for host, node in workers.items():
    out["paths"][host] = sorted({l.path for l in links if l.src == me and l.dst == node})
time.sleep(0.5)  # the last print lines travel with their task's logs
print("RESULT " + json.dumps(out), flush=True)
lattica.shutdown()
"""


def _node_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "latticaray.runtime.node_main", "--num-cpus", "1", *extra]


@pytest.fixture(scope="module")
def zero_flag_lab(nat_lab, tmp_path_factory):
    prefix = nat_lab[0]
    logdir = tmp_path_factory.mktemp("zero-flag")
    processes: list[LabNode] = []
    try:
        pub1 = LabNode(
            prefix,
            "pub1",
            _node_args(
                "--listen", f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1", "--serve-relay", str(RELAY_PORT)
            ),
            str(logdir / "pub1.log"),
            env=LAB_ENV,
        )
        processes.append(pub1)
        info = pub1.ready_line(60)
        bootstrap = f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1/p2p/{info['node_id']}"
        workers = {}
        for host in ("hostB", "hostC"):
            worker = LabNode(
                prefix,
                host,
                _node_args(
                    "--bootstrap",
                    bootstrap,
                    "--credential",
                    info["invite"],
                    "--resources",
                    json.dumps({f"zf_{host}": 1}),
                ),
                str(logdir / f"{host}.log"),
                env=LAB_ENV,
            )
            processes.append(worker)
            workers[host] = worker.ready_line(90)
        yield {
            "prefix": prefix,
            "bootstrap": bootstrap,
            "invite": info["invite"],
            "workers": workers,
            "logdir": logdir,
        }
    finally:
        for process in processes:
            process.stop()


def test_workers_behind_nats_join_with_only_bootstrap_and_credential(zero_flag_lab):
    for host, info in zero_flag_lab["workers"].items():
        timings = info["timings"]
        # behind a NAT: not public, and a relay found among its peers is reserved and advertised
        assert timings["reachability"] != "public", (host, timings)
        assert any("p2p-circuit" in a for a in info["advertised"]), (host, info["advertised"])
        # it listens on every interface, not on loopback only (no --listen was given)
        assert any(a.startswith("/ip4/198.19.") for a in info["advertised"]), info["advertised"]
    assert zero_flag_lab["workers"]["hostB"]["timings"]["nat_type"] == "endpoint-independent"
    assert zero_flag_lab["workers"]["hostC"]["timings"]["nat_type"] == "endpoint-dependent"


def test_driver_with_only_bootstrap_runs_tasks_actors_and_200mb_each_way(zero_flag_lab):
    driver = LabNode(
        zero_flag_lab["prefix"],
        "hostA",
        [sys.executable, "-c", DRIVER, zero_flag_lab["bootstrap"], zero_flag_lab["invite"]],
        str(zero_flag_lab["logdir"] / "driver.log"),
        env=LAB_ENV,
    )
    try:
        out = driver.wait_output(400)  # killed (exit -9) if it does not finish in 400 s
        err = driver.log_text()
        assert driver.proc.returncode == 0, (driver.proc.returncode, err[-4000:])
    finally:
        driver.stop()
    lines = out.splitlines()
    report = json.loads(next(x for x in reversed(lines) if x.startswith("RESULT "))[7:])
    workers = report["workers"]
    assert set(workers) == {"hostB", "hostC"}
    for host, node in workers.items():
        assert report["tasks"][host] == [[node, i * i] for i in range(20)], host
        assert report["actors"][host] == [[node, 1], [node, 3], [node, 6]], host
        assert report["sums"][host] == [node, 3 * 200 * 1024 * 1024], host
        assert report["paths"][host], (host, report["paths"])
    assert report["pulled_ok"] is True
    # the workers' print lines reach the driver, prefixed with where they ran
    hello = {x for x in out.splitlines() + err.splitlines() if "zero-flag task" in x}
    assert len(hello) >= 20, (out[-2000:], err[-2000:])
    assert report["timings"]["reachability"] != "public", report["timings"]
    print(
        "\nzero-flag join: driver init {:.2f} s (reachable after {:.2f} s); paths {}; "
        "push MB/s {}; pull MB/s {}".format(
            report["join_s"],
            report["timings"].get("reachable_s", float("nan")),
            report["paths"],
            {h: round(v, 1) for h, v in report["push_MBps"].items()},
            {h: round(v, 1) for h, v in report["pull_MBps"].items()},
        )
    )
