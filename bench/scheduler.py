"""Scheduler benchmark: 10,000 simulated nodes, each running the runtime's SchedulerCore.

Every node is a :class:`~latticaray.scheduler.core.SchedulerCore` (the placement code a
runtime node runs) on the virtual network of latticaray.mesh.sim: heterogeneous nodes (2-8
CPUs, some GPUs, a custom resource, two zones), 500 of them submitting tasks, each knowing only
its bounded neighbourhood (32 peers), the answers of its placements and sampled DHT capacity
ads; half of the tasks take a large argument (1-64 MiB) held by 1-3 nodes, the other half a
small one. Placement offers, view subscriptions and pushes, and DHT lookups are messages; ads
are republished every 30 s. The same workload is run with a baseline policy (uniform random
feasible node with room in its view) for comparison.

    .venv/bin/python bench/scheduler.py            # 10,000 nodes, 500 submitters, 100,000 tasks
    .venv/bin/python bench/scheduler.py --quick    # 1,000 nodes, 50 submitters, 10,000 tasks

The two runs go side by side in two processes (``--serial`` for one after the other). Wall time
on an idle 2-core machine: about 5 minutes for the full size.

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

TARGETS = {"max_mean_load_ratio": 1.3, "data_local_fraction": 0.95, "messages_per_placement": 5}

ROWS = [
    ("placed / failed", lambda s: f"{s['placed']} / {s['failed']}"),
    ("max/mean load at saturation (median)", lambda s: s["max_mean_load_ratio_median"]),
    ("max/mean load at saturation (p90)", lambda s: s["max_mean_load_ratio_p90"]),
    ("max/mean load at saturation (worst)", lambda s: s["max_mean_load_ratio_worst"]),
    ("saturated samples (every 0.5 s)", lambda s: s["saturated_samples"]),
    ("CPU utilization at saturation", lambda s: s["cpu_utilization_at_saturation"]),
    ("data-local (large argument, feasible holder)", lambda s: s["data_local_fraction"]),
    ("messages per placement (all kinds)", lambda s: s["messages_per_placement_all"]),
    ("  of which offers + answers", lambda s: s["placement_messages_per_placement_mean"]),
    ("  of which view pushes", lambda s: s["messages_per_placement_by_kind"].get("push", 0)),
    (
        "  of which subscriptions",
        lambda s: s["messages_per_placement_by_kind"].get("subscribe", 0),
    ),
    ("  of which DHT lookups", lambda s: s["messages_per_placement_by_kind"].get("lookup", 0)),
    (
        "offers per placement (p99 / max)",
        lambda s: (
            f"{s['messages_per_placement_p99'] // 2} / {s['messages_per_placement_max'] // 2}"
        ),
    ),
    ("ad republish messages per node per s", lambda s: s["ad_publish_messages_per_node_per_s"]),
    (
        "placement latency s (p50 / p99)",
        lambda s: f"{s['placement_latency_s_p50']} / {s['placement_latency_s_p99']}",
    ),
    ("fairness: Jain index of submitters' latency", lambda s: s["submitter_latency_jain_index"]),
    ("spillbacks (re-sent offers)", lambda s: s["spillbacks"]),
    ("offers to a node that lacked a resource", lambda s: s["placed_on_infeasible_node"]),
    (
        "largest neighbourhood / snapshot (nodes)",
        lambda s: f"{s['neighbourhood_max']} / {s['snapshot_nodes_max']}",
    ),
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
        "--quick", action="store_true", help="1,000 nodes, 50 submitters, 10,000 tasks"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--serial", action="store_true", help="run the baseline after, not beside")
    parser.add_argument(
        "--queue-per-cpu",
        type=int,
        default=1,
        help="node queue bound per CPU (ablation: deep queues let stale-view herding "
        "pile work on a few nodes)",
    )
    args = parser.parse_args()
    size: dict = {
        "cpu_choices": (2, 4, 4, 8),
        "arrival_window": 3.0,
        "mean_duration": 8.0,
        "large_arg_fraction": 0.5,
    }
    if args.quick:
        size |= {"nodes": 1000, "submitters": 50, "tasks": 10_000}
    else:
        size |= {"nodes": 10_000, "submitters": 500, "tasks": 100_000}
    size["queue_per_cpu"] = args.queue_per_cpu
    configs = {"latticaray": SimulationConfig(seed=args.seed, **size)}
    if not args.no_baseline:
        configs["random baseline"] = SimulationConfig(seed=args.seed, policy="random", **size)
    load_before = os.getloadavg()
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
        f"scheduler simulation: {size['nodes']} nodes (each a SchedulerCore), "
        f"{size['submitters']} submitters, {size['tasks']} tasks arriving over "
        f"{size['arrival_window']} s, mean {size['mean_duration']} s each; node queues "
        f"{size['queue_per_cpu']} per CPU"
    )
    width = max(len(r[0]) for r in ROWS) + 2
    print("".ljust(width) + "".join(n.rjust(22) for n in names))
    for label, get in ROWS:
        print(label.ljust(width) + "".join(str(get(results[n])).rjust(22) for n in names))
    print(
        f"targets: max/mean <= {TARGETS['max_mean_load_ratio']} at saturation; data-local >= "
        f"{TARGETS['data_local_fraction']}; messages per placement <= "
        f"{TARGETS['messages_per_placement']}"
    )
    print("nonlocal placements by reason (latticaray):", ours["nonlocal_reasons"])

    import msgpack

    met = {
        "max_mean_load_ratio_median": (ours["max_mean_load_ratio_median"] or 99)
        <= TARGETS["max_mean_load_ratio"],
        "data_local_fraction": (ours["data_local_fraction"] or 0) >= TARGETS["data_local_fraction"],
        "messages_per_placement_all": ours["messages_per_placement_all"]
        <= TARGETS["messages_per_placement"],
    }
    print(
        json.dumps(
            {
                "bench": "scheduler",
                "config": size,
                "seed": args.seed,
                "results": {n: dict(results[n].items()) for n in names},
                "targets": TARGETS,
                "met": met,
                "load_before": load_before,
                "load_after": os.getloadavg(),
                "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
                "versions": {"python": platform.python_version(), "msgpack": msgpack.version},
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
