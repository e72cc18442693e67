"""Scheduler benchmark: 1,000-node placement simulation with stale ads and spillback.

Runs the sans-I/O scheduler cores (PlacementPolicy, Submitter, LocalScheduler) over the virtual
network of latticaray.mesh.sim: heterogeneous nodes (2-32 CPUs, some GPUs, a custom resource,
two zones), submitters placing tasks whose argument objects sit on 1-3 nodes, ads refreshed every
second so placements are made on stale views, spillback on rejection. The same workload is run
with a baseline policy (uniform random feasible node with room in its ad) for comparison.

    .venv/bin/python bench/scheduler.py            # 1,000 nodes, 50 submitters, 100,000 tasks
    .venv/bin/python bench/scheduler.py --quick    # 200 nodes, 20 submitters, 10,000 tasks

The two runs go side by side in two processes (``--serial`` for one after the other). Wall time
on an idle 2-core machine is about 1-2.5 minutes; under load it grows accordingly.

Prints a table, then one JSON line with the figures, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latticaray.scheduler.sim import SimulationConfig, run_simulation

ROWS = [
    ("placed / failed", lambda s: f"{s['placed']} / {s['failed']}"),
    ("max/mean load at saturation (median)", lambda s: s["max_mean_load_ratio_median"]),
    ("max/mean load at saturation (p90)", lambda s: s["max_mean_load_ratio_p90"]),
    ("max/mean load at saturation (worst)", lambda s: s["max_mean_load_ratio_worst"]),
    ("saturated samples (every 0.5 s)", lambda s: s["saturated_samples"]),
    ("CPU utilization at saturation", lambda s: s["cpu_utilization_at_saturation"]),
    ("data-local (feasible holder existed)", lambda s: s["data_local_fraction"]),
    ("messages per placement (mean)", lambda s: s["messages_per_placement_mean"]),
    (
        "messages per placement (p99 / max)",
        lambda s: f"{s['messages_per_placement_p99']} / {s['messages_per_placement_max']}",
    ),
    (
        "placement latency s (p50 / p99)",
        lambda s: f"{s['placement_latency_s_p50']} / {s['placement_latency_s_p99']}",
    ),
    ("fairness: Jain index of submitters' latency", lambda s: s["submitter_latency_jain_index"]),
    ("spillbacks (re-sent requests)", lambda s: s["spillbacks"]),
    ("holder ad fetches per task (messages)", lambda s: s["holder_lookup_messages_per_task"]),
    ("placed on an infeasible node", lambda s: s["placed_on_infeasible_node"]),
    ("virtual time s / events", lambda s: f"{s['virtual_time_s']} / {s['events']}"),
    ("wall time s", lambda s: s["wall_s"]),
]


def run(config: SimulationConfig) -> dict:
    started = time.perf_counter()
    summary = run_simulation(config).summary()
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="200 nodes, 20 submitters, 10,000 tasks"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--serial", action="store_true", help="run the baseline after, not beside")
    parser.add_argument(
        "--view-sample",
        type=int,
        default=None,
        metavar="N",
        help="also run the large-mesh path: each submitter reads N random nodes "
        "per refresh (plus holder ads) instead of every node's ad",
    )
    parser.add_argument(
        "--queue-per-cpu",
        type=int,
        default=1,
        help="node queue bound per CPU (ablation: deep queues let stale-ad herding "
        "pile work on a few nodes)",
    )
    args = parser.parse_args()
    if args.quick:
        size = {"nodes": 200, "submitters": 20, "tasks": 10_000, "arrival_window": 5.0}
    else:
        size = {"nodes": 1000, "submitters": 50, "tasks": 100_000, "arrival_window": 10.0}
    size["queue_per_cpu"] = args.queue_per_cpu
    configs = {"latticaray": SimulationConfig(seed=args.seed, **size)}
    if args.view_sample:
        configs[f"sampled view {args.view_sample}"] = SimulationConfig(
            seed=args.seed, view_sample=args.view_sample, **size
        )
    if not args.no_baseline:
        configs["random baseline"] = SimulationConfig(seed=args.seed, policy="random", **size)
    if args.serial or len(configs) == 1:
        results = {name: run(config) for name, config in configs.items()}
    else:
        # The two runs are independent and deterministic: run them side by side.
        with ProcessPoolExecutor(max_workers=len(configs)) as pool:
            futures = {name: pool.submit(run, config) for name, config in configs.items()}
            results = {name: future.result() for name, future in futures.items()}
    ours = results["latticaray"]

    names = list(results)
    print(
        f"scheduler simulation: {size['nodes']} nodes, {size['submitters']} submitters, "
        f"{size['tasks']} tasks arriving over {size['arrival_window']} s; ads every 1 s; "
        f"node queues {size['queue_per_cpu']} per CPU"
    )
    width = max(len(r[0]) for r in ROWS) + 2
    print("".ljust(width) + "".join(n.rjust(22) for n in names))
    for label, get in ROWS:
        print(label.ljust(width) + "".join(str(get(results[n])).rjust(22) for n in names))
    print("targets: max/mean <= 1.5 at saturation; data-local >= 0.9")
    print("nonlocal placements by reason (latticaray):", ours["nonlocal_reasons"])

    import msgpack

    print(
        json.dumps(
            {
                "bench": "scheduler",
                "config": size,
                "seed": args.seed,
                "results": {n: dict(results[n].items()) for n in names},
                "targets": {"max_mean_load_ratio": 1.5, "data_local_fraction": 0.9},
                "met": {
                    "max_mean_load_ratio_median": (ours["max_mean_load_ratio_median"] or 99) <= 1.5,
                    "data_local_fraction": (ours["data_local_fraction"] or 0) >= 0.9,
                },
                "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
                "versions": {"python": platform.python_version(), "msgpack": msgpack.version},
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
