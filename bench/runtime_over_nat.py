"""The runtime across real kernel NATs (netlab; needs root): join time, first-task latency, path,
upgrade time (relayed -> direct, from the relayed dial to the direct connection) and how the task
session crossed it (moved behind a fence / reopened with work re-sent).

pub1 runs the bootstrap/relay runtime node; a worker node runs behind hostB's cone NAT and another
behind hostC's symmetric NAT; a driver process behind hostA's cone NAT joins with
`init(bootstrap=..., credential=..., nat=...)` `--runs` times per worker and runs tasks that need
that worker's resource. Prints a table and, last, one JSON line.

    sudo .venv/bin/python bench/runtime_over_nat.py [--runs 3]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [
    os.path.join(ROOT, "tests"),
    os.path.join(ROOT, "tests", "mesh", "nat"),
    os.path.join(ROOT, "bench"),
    ROOT,
]

from netlab_nodes import lab_unavailable, run_facts, start_pub1  # noqa: E402
from netlab_util import lab  # noqa: E402
from test_runtime_over_nat import run_driver, start_worker  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefix", default=f"lrb{os.getpid() % 100000}")
    args = parser.parse_args()
    if lab_unavailable():
        return 2
    rows = []
    with lab(args.prefix):
        processes = []
        try:
            pub1, env = start_pub1(
                args.prefix, tempfile.mkdtemp(prefix="runtime-over-nat-"), cpus=1
            )
            processes.append(pub1)
            env["processes"] = processes
            for host, nat in (("hostB", "cone"), ("hostC", "symmetric")):
                _, worker = start_worker(env, host)
                for run in range(args.runs):
                    report = run_driver(env, host)
                    ok = report["results"] == [[worker["node_id"], i * i] for i in range(40)]
                    rows.append(
                        {
                            "worker": host,
                            "worker_nat": nat,
                            "run": run,
                            "ok": ok,
                            "join_s": report["join_s"],
                            "first_task_s": report["first_task_s"],
                            "tasks_40_s": report["tasks_40_s"],
                            "first_path": report["first_path"],
                            "path": report["path"],
                            "punch_path": report["punch_path"],
                            "upgrade_s": report["upgrade_s"],
                            "sessions_moved": report["sessions_moved"],
                            "sessions_reopened": report["sessions_reopened"],
                            "tasks_resent": report["tasks_resent"],
                            "worker_nat_type": worker["timings"].get("nat_type"),
                            "worker_join_s": worker["timings"].get("join_s"),
                        }
                    )
        finally:
            for process in processes:
                process.stop()
    print(
        f"{'driver(hostA, cone) -> worker':32} {'run':>3} {'ok':>3} {'join s':>7} "
        f"{'1st task ms':>11} {'40 tasks ms':>11} {'path@1st':>9} {'path':>6} {'punch':>9} "
        f"{'upgrade ms':>10} {'moved':>5} {'reopened':>8} {'resent':>6}"
    )
    for r in rows:
        upgrade = "-" if r["upgrade_s"] is None else f"{r['upgrade_s'] * 1000:.0f}"
        print(
            f"{r['worker'] + ' (' + r['worker_nat'] + ')':32} {r['run']:>3} {str(r['ok'])[0]:>3} "
            f"{r['join_s']:7.2f} {r['first_task_s'] * 1000:11.1f} {r['tasks_40_s'] * 1000:11.1f} "
            f"{r['first_path']:>9} {r['path']:>6} {r['punch_path']:>9} {upgrade:>10} "
            f"{r['sessions_moved']:>5} {r['sessions_reopened']:>8} {r['tasks_resent']:>6}"
        )
    summary = {}
    for host in ("hostB", "hostC"):
        mine = [r for r in rows if r["worker"] == host]
        if mine:
            summary[host] = {
                "join_s_median": statistics.median(r["join_s"] for r in mine),
                "first_task_ms_median": statistics.median(r["first_task_s"] * 1000 for r in mine),
                "paths": sorted({r["path"] for r in mine}),
                "upgrade_ms": sorted(
                    round(r["upgrade_s"] * 1000) for r in mine if r["upgrade_s"] is not None
                ),
                "sessions_reopened": sum(r["sessions_reopened"] for r in mine),
                "all_ok": all(r["ok"] for r in mine),
            }
    print(
        json.dumps({"bench": "runtime_over_nat", "rows": rows, "summary": summary, **run_facts()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
