"""Join time of a zero-flag driver behind a NAT (netlab; needs root), with public and no-mesh baselines.

pub1 runs the mesh's first node (bootstrap, serving relay and AutoNAT); workers behind hostB's
cone NAT and hostC's symmetric NAT are started with only ``--bootstrap`` and ``--credential``.
Then, ``--runs`` times each and interleaved, a fresh driver process calls only
``lattica.init(bootstrap=[pub1], credential=...)``:

* behind hostA's cone NAT: the zero-flag path a laptop takes (AutoNAT from the peers it meets, a
  relay found among them; a driver does not wait for those before init() returns, its
  ``reachable_s`` says when they settled);
* on pub2, a public host (the baseline, same run): the same code, which finds itself public;
* in hostA without a mesh (``init()`` alone: the node, its store and workers, no join).

``--baseline DIR`` runs every driver a second time, interleaved, from another source tree (e.g.
``git worktree add /tmp/main main``) against the same mesh, so that before and after are measured
under the same load: the table then has both, and the JSON line both figures.

Every process has ``LATTICARAY_LAB=1`` (the lab's 198.18.0.0/15 counts as public) and nothing
else. The package's bytecode is compiled once beforehand (under ``PYTHONPYCACHEPREFIX``, as
``pip install`` leaves it); ``--no-bytecode-cache`` has every process compile from source instead
(what ``PYTHONDONTWRITEBYTECODE=1`` without a cache gives). ``--cpu-quota F`` runs the whole lab in
a cgroup (v1 ``cpu``) limited to F CPUs: a reproducible stand-in for a loaded machine.

Per run: ``init()`` wall time, the driver process's CPU time in it (``init_cpu_s``, every thread:
what a loaded machine multiplies), its phases (the runtime's own ``timings``: ``join_s``,
``reachable_s``, ``at_<phase>_s`` marks), and the first task's round trip to each NATed worker
after ``init()`` returned. Prints a table (p50, p90, min, max) and, last, one JSON line. Target:
p50 of ``init()`` behind the NAT <= 2 s.

    sudo .venv/bin/python bench/join_time.py [--runs 10] [--baseline DIR] [--cpu-quota 0.5]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
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
CGROUP_CPU = "/sys/fs/cgroup/cpu"

DRIVER = r"""
import json, sys, time
t0 = time.monotonic()
import latticaray as lattica
from latticaray.runtime import api
imported = time.monotonic() - t0
bootstrap, credential = sys.argv[1:3]
t, cpu = time.monotonic(), time.process_time()
if bootstrap == "-":  # the local baseline: the same init() without a mesh
    lattica.init(num_cpus=1)
    print("RESULT " + json.dumps({"import_s": imported, "init_s": time.monotonic() - t,
                                  "package": lattica.__file__}))
    lattica.shutdown()
    sys.exit(0)
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1)
init_s = time.monotonic() - t
init_cpu_s = time.process_time() - cpu  # this process's CPU (all its threads) in init()
phases = dict(getattr(api._runtime, "timings", {}))  # init()'s own phases (where timed)

@lattica.remote
def where():
    return lattica.get_runtime_context().node_id

first = {}
for host in ("hostB", "hostC"):
    t = time.monotonic()
    lattica.get(where.options(resources={f"jt_{host}": 0.01}).remote(), timeout=120)
    first[host] = time.monotonic() - t
# read after the first tasks: what settles in the background (reachability) is in by then
timings = dict(api._runtime.mesh_runtime.timings)
print("RESULT " + json.dumps({"import_s": imported, "init_s": init_s, "timings": timings,
                              "init_cpu_s": init_cpu_s, "phases": phases, "first_task_s": first,
                              "package": lattica.__file__}),
      flush=True)
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


def run_driver(
    prefix: str, host: str, env: dict, logdir: str, tag: str, root: str, local=False
) -> dict:
    """One driver process from the source tree ``root``; its RESULT line."""
    bootstrap = "-" if local else env["bootstrap"]
    driver = LabNode(
        prefix,
        host,
        [sys.executable, "-P", "-c", DRIVER, bootstrap, env["invite"]],  # -P: not the cwd's tree
        os.path.join(logdir, f"driver-{host}-{'local-' if local else ''}{tag}.log"),
        env={"PYTHONPATH": os.pathsep.join([root, *(p for p in sys.path if p and p != ROOT)])},
    )
    try:
        out = driver.wait_output(240)
    finally:
        driver.stop()
    line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"driver {tag} on {host} gave no result: {driver.log_tail()}")
    result = json.loads(line[7:])
    if not result["package"].startswith(os.path.join(root, "")):
        raise RuntimeError(f"driver {tag} ran {result['package']}, not the tree at {root}")
    return result


@contextlib.contextmanager
def cpu_quota(cpus: float | None):
    """This process and its children (the whole lab) in a cgroup v1 ``cpu`` group limited to
    ``cpus`` CPUs (a 10 ms period), while the block runs; nothing when ``cpus`` is None."""
    if cpus is None:
        yield
        return
    if not os.path.isdir(CGROUP_CPU):
        raise SystemExit(f"--cpu-quota needs the cgroup v1 cpu controller at {CGROUP_CPU}")
    group = os.path.join(CGROUP_CPU, f"latticaray-join-time-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
            f.write("10000")
        with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(max(1000, int(cpus * 10000))))
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        yield
    finally:
        with open(os.path.join(CGROUP_CPU, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))  # back to the root group; the lab's processes are gone
        os.rmdir(group)


def compile_bytecode(roots: list[str], cache: str) -> None:
    """Compile the package of each source tree into ``cache`` (PYTHONPYCACHEPREFIX)."""
    previous = sys.pycache_prefix
    sys.pycache_prefix = cache
    try:
        for root in roots:
            compileall.compile_dir(os.path.join(root, "latticaray"), quiet=1, workers=1)
    finally:
        sys.pycache_prefix = previous


def measures(runs: list[dict]) -> dict:
    """The figures of one driver variant: a summary per measure."""
    out = {
        "init_s": [r["init_s"] for r in runs],
        "mesh_join_s": [r["timings"]["join_s"] for r in runs],
        "reachable_s": [r["timings"]["reachable_s"] for r in runs if "reachable_s" in r["timings"]],
        "first_task_hostB_s": [r["first_task_s"]["hostB"] for r in runs],
        "first_task_hostC_s": [r["first_task_s"]["hostC"] for r in runs],
        "import_s": [r["import_s"] for r in runs],
        "init_cpu_s": [r["init_cpu_s"] for r in runs],
    }
    figures: dict = {k: summary(v) for k, v in out.items() if v}
    figures["reachability"] = sorted({str(r["timings"].get("reachability")) for r in runs})
    phases = sorted({k for r in runs for k in r["timings"] if k.startswith("at_")})
    phases += sorted({k for r in runs for k in r.get("phases", {})})
    figures["phases_p50"] = {
        k: statistics.median(
            [r["timings"][k] if k in r["timings"] else r["phases"][k] for r in runs
             if k in r["timings"] or k in r.get("phases", {})]
        )
        for k in phases
    }  # fmt: skip
    return figures


def row(label: str, name: str, s: dict) -> str:
    return (
        f"{label:<30}{name:<22}{s['p50']:>8.2f}{s['p90']:>8.2f}{s['min']:>8.2f}{s['max']:>8.2f}"
        f"{s['n']:>4}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--prefix", default=f"ljt{os.getpid() % 100000}")
    parser.add_argument(
        "--baseline", metavar="DIR", help="a source tree to measure too, interleaved (e.g. main)"
    )
    parser.add_argument("--cpu-quota", type=float, metavar="CPUS", help="limit the lab's CPU")
    parser.add_argument(
        "--no-bytecode-cache", action="store_true", help="every process compiles from source"
    )
    args = parser.parse_args()
    reason = netlab_available()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    variants = {"this": ROOT}
    if args.baseline:
        base = os.path.abspath(args.baseline)
        if not os.path.isfile(os.path.join(base, "latticaray", "__init__.py")):
            raise SystemExit(f"--baseline {base}: no latticaray package there")
        variants = {"baseline": base, "this": ROOT}
    os.environ["LATTICARAY_LAB"] = "1"  # every process of the lab, nothing else
    os.environ.pop("LATTICARAY_PROGRESS", None)
    logdir = tempfile.mkdtemp(prefix="join-time-")
    if args.no_bytecode_cache:
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
    else:  # as installed: every tree's bytecode compiled once, before any process is timed
        cache = os.path.join(logdir, "pycache")
        compile_bytecode(sorted(set(variants.values())), cache)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = cache
    results: dict[str, dict[str, list[dict]]] = {
        v: {"hostA": [], "pub2": [], "local": []} for v in variants
    }
    load_before = os.getloadavg()
    with cpu_quota(args.cpu_quota), lab(args.prefix):
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
            order = list(variants)
            for i in range(args.runs):
                for host in ("hostA", "pub2", "local"):  # interleaved: all see the same load
                    for name in order:
                        results[name][host].append(
                            run_driver(
                                args.prefix,
                                "hostA" if host == "local" else host,
                                env,
                                logdir,
                                f"{name}-{i}",
                                variants[name],
                                local=host == "local",
                            )
                        )
                order.reverse()  # neither variant always goes first
        finally:
            for n in nodes:
                n.stop()
    load_after = os.getloadavg()

    figures: dict[str, dict] = {}
    print(
        f"join time of a zero-flag driver, {args.runs} runs each (seconds); load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs); "
        f"bytecode {'compiled by each process' if args.no_bytecode_cache else 'cached'}"
        + (f"; the lab limited to {args.cpu_quota} CPUs" if args.cpu_quota else "")
    )
    print(f"{'driver':<30}{'measure':<22}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}{'n':>4}")
    for name in variants:
        figures[name] = {}
        for host, label in (("hostA", "hostA (cone NAT)"), ("pub2", "pub2 (public, base)")):
            figures[name][host] = measures(results[name][host])
            for measure, s in figures[name][host].items():
                if isinstance(s, dict) and "p50" in s:
                    print(row(f"{name}: {label}", measure, s))
        local = {"init_s": summary([r["init_s"] for r in results[name]["local"]])}
        figures[name]["local"] = local
        print(row(f"{name}: hostA, no mesh (base)", "init_s", local["init_s"]))
    print()
    for name in variants:
        nat, pub = figures[name]["hostA"], figures[name]["pub2"]
        nat_p50 = nat["init_s"]["p50"]
        print(
            f"{name}: init() p50 behind the cone NAT {nat_p50:.2f} s, p90 "
            f"{nat['init_s']['p90']:.2f} s (target <= 2 s: {'met' if nat_p50 <= 2.0 else 'NOT met'});"
            f" public {pub['init_s']['p50']:.2f} s; no mesh {figures[name]['local']['init_s']['p50']:.2f} s;"
            f" reachable (NAT discovery done) p50 "
            f"{nat.get('reachable_s', {}).get('p50', float('nan')):.2f} s after the mesh start"
        )  # fmt: skip
        print(f"{name}: phases behind the NAT, p50 s since the mesh start (at_*) or init() "
              f"({', '.join(f'{k} {v:.2f}' for k, v in nat['phases_p50'].items())})")  # fmt: skip
        print(f"{name}: reachability seen: hostA {nat['reachability']}, pub2 {pub['reachability']}")
    print(f"logs in {logdir}")
    import latticaray

    this = figures["this"]["hostA"]["init_s"]["p50"]
    print(
        json.dumps(
            {
                "bench": "join_time",
                "runs": args.runs,
                "variants": variants,
                "figures": figures,
                "init_p50_nat_s": this,
                "init_p90_nat_s": figures["this"]["hostA"]["init_s"]["p90"],
                "init_p50_public_s": figures["this"]["pub2"]["init_s"]["p50"],
                "baseline_init_p50_nat_s": (
                    figures["baseline"]["hostA"]["init_s"]["p50"] if args.baseline else None
                ),
                "target_met": this <= 2.0,
                "workers_timings": workers,
                "bytecode_cached": not args.no_bytecode_cache,
                "cpu_quota": args.cpu_quota,
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
