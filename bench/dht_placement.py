"""Placement through DHT capacity ads: how long the first task for a resource only an unknown
node has takes, against the same first task sent to a node already known from pushed views.

Each trial starts three node processes on loopback: D (the driver attaches to it), A (joins
through D) and C (joins through A; the only node with a "tpu"). Two meshes per trial:

* ``dht``: D and C run sparse peering with ``--fill-neighbours 0`` (they admit no peer introduced
  in views), so D has no view of C; the first tpu task waits
  while D reads ``capacity/tpu``, admits C and places it there.
* ``views`` (baseline): ``--peering full``; the driver waits until C's pushed view is at D, then sends
  the same first tpu task (a fresh task session and code shipped, as in the dht case).

In both, a second tpu task then measures a warm known peer.

    .venv/bin/python bench/dht_placement.py [--trials 3]

Prints one line per trial and a JSON line with min/median/max per figure (milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "tests", "runtime"), ROOT]

from meshutil import NodeProcess, alive_nodes, wait_for  # noqa: E402

import latticaray as lattica  # noqa: E402


@lattica.remote
def whereami():
    return lattica.get_runtime_context().node_id


def trial(sparse: bool) -> dict:
    peering = ("--fill-neighbours", "0") if sparse else ("--peering", "full")
    nodes = []
    try:
        d = NodeProcess(None, None, extra_args=peering)
        nodes.append(d)
        invite = d.info["invite"]
        a = NodeProcess(d.info["addrs"][0], invite, extra_args=("--peering", "full"))
        nodes.append(a)
        c = NodeProcess(
            a.info["addrs"][0], invite, extra_args=(*peering, "--resources", '{"tpu": 1}')
        )
        nodes.append(c)
        lattica.init(address=d.info["driver_address"])
        try:
            wait_for(lambda: a.node_id in alive_nodes(), 30, "D to see A")
            if sparse:
                assert c.node_id not in {n["NodeID"] for n in lattica.nodes()}
            else:
                wait_for(lambda: c.node_id in alive_nodes(), 30, "C's view at D")
            task = whereami.options(resources={"tpu": 1})
            started = time.perf_counter()
            assert lattica.get(task.remote(), timeout=60) == c.node_id
            first = time.perf_counter() - started
            started = time.perf_counter()
            assert lattica.get(task.remote(), timeout=60) == c.node_id
            warm = time.perf_counter() - started
        finally:
            lattica.shutdown()
        return {"first_ms": first * 1e3, "warm_ms": warm * 1e3}
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"dht": [], "views": []}
    for i in range(args.trials):
        for name in ("dht", "views"):  # interleaved: both see the same machine load
            result = trial(sparse=name == "dht")
            results[name].append(result)
            print(
                f"trial {i} {name:5s} first {result['first_ms']:8.1f} ms  "
                f"warm {result['warm_ms']:6.1f} ms",
                flush=True,
            )
    summary = {}
    for name, rows in results.items():
        for figure in ("first_ms", "warm_ms"):
            values = [r[figure] for r in rows]
            summary[f"{name}_{figure}"] = {
                "min": round(min(values), 1),
                "median": round(statistics.median(values), 1),
                "max": round(max(values), 1),
            }
    print(
        json.dumps(
            {
                "figures": summary,
                "trials": args.trials,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
