"""Join time of a zero-flag driver behind a NAT (netlab; needs root), with a public baseline.

pub1 runs the mesh's first node (bootstrap, serving relay and AutoNAT); workers behind hostB's
cone NAT and hostC's symmetric NAT are started with only ``--bootstrap`` and ``--credential``.
Then, ``--runs`` times each and interleaved, a fresh driver process calls only
``lattica.init(bootstrap=[pub1], credential=...)``:

* behind hostA's cone NAT: ``init()`` returns once the node knows it is not public and holds a
  relay reservation (AutoNAT from the peers it met, a relay found among them), so its time
  includes the NAT discovery;
* on pub2, a public host (the baseline, same run): the same code, which finds itself public;
* in hostA without a mesh (``init()`` alone: the node, its store and workers, no join).

Every process has ``LATTICARAY_LAB=1`` (the lab's 198.18.0.0/15 counts as public) and nothing
else. Per run: ``init()`` wall time, the runtime's own ``join_s``/``reachable_s`` timings, and the
first task's round trip to each NATed worker after ``init()`` returned. Prints a table (p50,
p90, min, max) and, last, one JSON line. Target: p50 of ``init()`` behind the NAT <= 2 s.

    sudo .venv/bin/python bench/join_time.py [--runs 10] [--prefix jt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench"), ROOT]

from netlab_nodes import PUB1, LabNode  # noqa: E402
from netlab_util import lab, netlab_available  # noqa: E402

QUIC_PORT = 4821
RELAY_PORT = 4822

DRIVER = r"""
import json, sys, time
t0 = time.monotonic()
import latticaray as lattica
from latticaray.runtime import api
imported = time.monotonic() - t0
bootstrap, credential = sys.argv[1:3]
t = time.monotonic()
if bootstrap == "-":  # the local baseline: the same init() without a mesh
    lattica.init(num_cpus=1)
    print("RESULT " + json.dumps({"import_s": imported, "init_s": time.monotonic() - t}))
    lattica.shutdown()
    sys.exit(0)
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1)
init_s = time.monotonic() - t
timings = dict(api._runtime.mesh_runtime.timings)

@lattica.remote
def where():
    return lattica.get_runtime_context().node_id

first = {}
for host in ("hostB", "hostC"):
    t = time.monotonic()
    lattica.get(where.options(resources={f"jt_{host}": 0.01}).remote(), timeout=120)
    first[host] = time.monotonic() - t
print("RESULT " + json.dumps({"import_s": imported, "init_s": init_s, "timings": timings,
                              "first_task_s": first}), flush=True)
lattica.shutdown()
"""


def node(*extra: str) -> list[str]:
    return [sys.executable, "-m", "latticaray", "start", "--num-cpus", "1", *extra]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {
        "p50": statistics.median(values),
        "p90": pct(values, 0.9),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def run_driver(prefix: str, host: str, env: dict, logdir: str, i: int, local=False) -> dict:
    bootstrap = "-" if local else env["bootstrap"]
    driver = LabNode(
        prefix,
        host,
        [sys.executable, "-c", DRIVER, bootstrap, env["invite"]],
        os.path.join(logdir, f"driver-{host}-{'local-' if local else ''}{i}.log"),
    )
    try:
        out = driver.wait_output(240)
    finally:
        driver.stop()
    line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"driver {i} on {host} gave no result: {driver.log_tail()}")
    return json.loads(line[7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--prefix", default=f"ljt{os.getpid() % 100000}")
    args = parser.parse_args()
    reason = netlab_available()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    os.environ["LATTICARAY_LAB"] = "1"  # every process of the lab, nothing else
    os.environ.pop("LATTICARAY_PROGRESS", None)
    logdir = tempfile.mkdtemp(prefix="join-time-")
    results: dict[str, list[dict]] = {"hostA": [], "pub2": []}
    local: list[dict] = []
    load_before = os.getloadavg()
    with lab(args.prefix):
        nodes: list[LabNode] = []
        try:
            pub1 = LabNode(
                args.prefix,
                "pub1",
                node(
                    "--listen",
                    f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1",
                    "--serve-relay",
                    str(RELAY_PORT),
                ),
                os.path.join(logdir, "pub1.log"),
            )
            nodes.append(pub1)
            info = pub1.ready_line(120)
            env = {
                "invite": info["invite"],
                "bootstrap": f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1/p2p/{info['node_id']}",
            }
            workers = {}
            for host in ("hostB", "hostC"):
                worker = LabNode(
                    args.prefix,
                    host,
                    node(
                        "--bootstrap",
                        env["bootstrap"],
                        "--credential",
                        env["invite"],
                        "--resources",
                        json.dumps({f"jt_{host}": 1}),
                    ),
                    os.path.join(logdir, f"{host}.log"),
                )
                nodes.append(worker)
                workers[host] = worker.ready_line(120)["timings"]
            for i in range(args.runs):
                for host in ("hostA", "pub2"):  # interleaved: all see the same load
                    results[host].append(run_driver(args.prefix, host, env, logdir, i))
                local.append(run_driver(args.prefix, "hostA", env, logdir, i, local=True))
        finally:
            for n in nodes:
                n.stop()
    load_after = os.getloadavg()

    figures: dict[str, dict] = {}
    print(f"join time of a zero-flag driver, {args.runs} runs each (seconds)")
    print(f"{'driver':<22}{'measure':<22}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}")
    for host, label in (("hostA", "hostA (cone NAT)"), ("pub2", "pub2 (public, base)")):
        runs = results[host]
        measures = {
            "init_s": [r["init_s"] for r in runs],
            "mesh_join_s": [r["timings"]["join_s"] for r in runs],
            "reachable_s": [r["timings"].get("reachable_s", r["init_s"]) for r in runs],
            "first_task_hostB_s": [r["first_task_s"]["hostB"] for r in runs],
            "first_task_hostC_s": [r["first_task_s"]["hostC"] for r in runs],
        }
        figures[host] = {k: summary(v) for k, v in measures.items()}
        figures[host]["reachability"] = sorted({r["timings"].get("reachability") for r in runs})
        for name, s in figures[host].items():
            if name == "reachability":
                continue
            print(
                f"{label:<22}{name:<22}{s['p50']:>8.2f}{s['p90']:>8.2f}"
                f"{s['min']:>8.2f}{s['max']:>8.2f}"
            )
    figures["local"] = {"init_s": summary([r["init_s"] for r in local])}
    s = figures["local"]["init_s"]
    print(f"{'hostA, no mesh (base)':<22}{'init_s':<22}{s['p50']:>8.2f}{s['p90']:>8.2f}"
          f"{s['min']:>8.2f}{s['max']:>8.2f}")  # fmt: skip
    nat_p50 = figures["hostA"]["init_s"]["p50"]
    base_p50 = figures["pub2"]["init_s"]["p50"]
    print(
        f"\ninit() p50 behind the cone NAT {nat_p50:.2f} s (target <= 2 s: "
        f"{'met' if nat_p50 <= 2.0 else 'NOT met'}); public baseline {base_p50:.2f} s; "
        f"NAT discovery adds {nat_p50 - base_p50:+.2f} s"
    )
    join_nat = figures["hostA"]["mesh_join_s"]["p50"]
    join_pub = figures["pub2"]["mesh_join_s"]["p50"]
    print(
        f"the mesh join itself (dial, admission, NAT discovery: the runtime's join_s) p50 "
        f"{join_nat:.2f} s behind the NAT, {join_pub:.2f} s public; init() without a mesh "
        f"{figures['local']['init_s']['p50']:.2f} s"
    )
    print(f"reachability seen: hostA {figures['hostA']['reachability']}, "
          f"pub2 {figures['pub2']['reachability']}; logs in {logdir}")  # fmt: skip
    import latticaray

    print(
        json.dumps(
            {
                "bench": "join_time",
                "runs": args.runs,
                "figures": figures,
                "init_p50_nat_s": nat_p50,
                "init_p50_public_s": base_p50,
                "mesh_join_p50_nat_s": join_nat,
                "mesh_join_p50_public_s": join_pub,
                "target_met": nat_p50 <= 2.0,
                "workers_timings": workers,
                "machine": {
                    "cpus": os.cpu_count(),
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "versions": {"latticaray": getattr(latticaray, "__version__", "dev")},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
