"""`latticaray microbenchmark`: `ray microbenchmark`'s rows, names and method, on latticaray,
beside Ray's figures measured in the same run.

Method (as `ray microbenchmark`, `ray/_private/ray_perf.py`): each row runs the same workload as
Ray's row of that name (the same tasks, actors and counts; `n_cpu` = half the cores), for a 1 s
warm-up, then 4 trials of about 2 s each; the figure is the mean (and standard deviation) over the
trials of operations per second (times the row's multiplier). `--duration` scales the trial
length; `--settle` is the pause before each row (Ray's is 10 s; the same on both sides).
Extra rows: init() time, no-op task round trip, and put gigabytes with one element of the array
changed before each put (so no put can be recognised as a copy of an earlier one: every put
writes all its bytes, as Ray's do) and of an array of distinct pages.

The Ray column: when Ray is importable (`--ray-python`, `$LATTICARAY_RAY_PYTHON`, this
interpreter, or `.venv-ray/bin/python` of the checkout), `ray_baseline.py` runs Ray's own rows
in Ray's interpreter as a child process, loopback-only, before latticaray's; with `--rounds N`
the two alternate N times and each row's figure is the median of the rounds' means. The load
average is printed with every side's run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from .ray_baseline import measure, round_trip_ms

LOWER_IS_BETTER = {"init() seconds", "no-op task round trip ms"}
RAY_ROW_PREFIX = "ROW "  # ray_baseline.py's row lines


def timeit(
    name: str,
    fn,
    multiplier: float = 1,
    duration: float = 2.0,
    trials: int = 4,
    results: list | None = None,
    settle: float = 0.0,
) -> tuple[float, float]:
    """One row by Ray's method (:func:`.ray_baseline.measure`), printed (and appended to
    ``results``) as Ray prints its rows."""
    time.sleep(settle)
    mean, sd = measure(fn, multiplier, duration, trials)
    print(f"{name} per second {mean:,.2f} +- {sd:,.2f}", flush=True)
    if results is not None:
        results.append((name, mean, sd))
    return mean, sd


def run(duration: float, large_mb: int, only: str | None, settle: float = 0.0) -> list:
    """latticaray's rows, each the workload of Ray's row of that name (ray_perf.py)."""
    import numpy as np

    import latticaray as lattica

    results: list = []
    n_cpu = max(1, (os.cpu_count() or 2) // 2)

    t0 = time.perf_counter()
    lattica.init()
    init_s = time.perf_counter() - t0
    if only is None or only in "init() seconds":
        print(f"init() seconds {init_s:.3f}", flush=True)
        results.append(("init() seconds", init_s, 0.0))

    def want(name: str) -> bool:
        return only is None or only in name

    def row(name, fn, multiplier=1):
        if want(name):
            timeit(name, fn, multiplier, duration, results=results, settle=settle)

    # Ray's functions and classes (ray_perf.py), with Ray's resource options
    @lattica.remote
    def small_value():
        return b"ok"

    @lattica.remote
    def create_object_containing_ref():
        return [lattica.put(1) for _ in range(10000)]

    class ActorImpl:
        def small_value(self):
            return b"ok"

        def small_value_arg(self, x):
            return b"ok"

        def small_value_batch(self, n):
            lattica.get([small_value.remote() for _ in range(n)])

    class AsyncActorImpl:
        async def small_value(self):
            return b"ok"

        async def small_value_with_arg(self, x):
            return b"ok"

    class ClientImpl:
        def __init__(self, servers):
            self.servers = servers if isinstance(servers, list) else [servers]

        def small_value_batch(self, n):
            results = []
            for server in self.servers:
                results.extend(server.small_value.remote() for _ in range(n))
            lattica.get(results)

        def small_value_batch_arg(self, n):
            x = lattica.put(0)
            results = []
            for server in self.servers:
                results.extend(server.small_value_arg.remote(x) for _ in range(n))
            lattica.get(results)

    # the actor classes (mypy does not follow a class decorator: they are wrapped by call)
    Actor = lattica.remote(num_cpus=0)(ActorImpl)
    AsyncActor = lattica.remote(AsyncActorImpl)
    Client = lattica.remote(num_cpus=0)(ClientImpl)

    for _ in range(500):  # workers up and warm before timing starts
        lattica.get(small_value.remote())
    if want("no-op task round trip ms"):
        rtt_ms = round_trip_ms(lambda: lattica.get(small_value.remote()))
        print(f"no-op task round trip ms {rtt_ms:.3f}", flush=True)
        results.append(("no-op task round trip ms", rtt_ms, 0.0))

    value = lattica.put(0)
    row("single client get calls (Plasma Store)", lambda: lattica.get(value))
    row("single client put calls (Plasma Store)", lambda: lattica.put(0))

    @lattica.remote
    def do_put_small():
        for _ in range(100):
            lattica.put(0)

    row(
        "multi client put calls (Plasma Store)",
        lambda: lattica.get([do_put_small.remote() for _ in range(10)]),
        1000,
    )
    arr: Any = np.zeros(large_mb * 1024 * 1024 // 8, dtype=np.int64)
    row("single client put gigabytes", lambda: lattica.put(arr), large_mb / 1024)

    def put_changed():
        arr[0] += 1
        lattica.put(arr)

    row("single client put gigabytes, new content each put", put_changed, large_mb / 1024)
    # Ray's row copies np.zeros, whose untouched pages all map the kernel's one zero page (reads
    # hit the cache); this one copies an array of real, distinct pages
    arr = np.arange(large_mb * 1024 * 1024 // 8, dtype=np.int64)
    row(
        "single client put gigabytes, array of distinct pages",
        lambda: lattica.put(arr),
        large_mb / 1024,
    )
    arr = None  # frees the array (the closures above are done with it)
    row(
        "single client tasks and get batch",
        lambda: lattica.get([small_value.remote() for _ in range(1000)]),
    )

    @lattica.remote
    def do_put():
        for _ in range(10):
            lattica.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))

    row(
        "multi client put gigabytes",
        lambda: lattica.get([do_put.remote() for _ in range(10)]),
        10 * 8 * 0.1,
    )
    if want("get object containing 10k refs"):
        containing = create_object_containing_ref.remote()
        row("single client get object containing 10k refs", lambda: lattica.get(containing))

    def wait_multiple_refs():
        not_ready = [small_value.remote() for _ in range(1000)]
        for _ in range(1000):
            _ready, not_ready = lattica.wait(not_ready)

    row("single client wait 1k refs", wait_multiple_refs)
    row("single client tasks sync", lambda: lattica.get(small_value.remote()))
    row(
        "single client tasks async",
        lambda: lattica.get([small_value.remote() for _ in range(1000)]),
        1000,
    )
    n, m = 10000, 4
    if want("multi client tasks async"):
        spawners = [Actor.remote() for _ in range(m)]
        row(
            "multi client tasks async",
            lambda: lattica.get([a.small_value_batch.remote(n) for a in spawners]),
            n * m,
        )
        del spawners

    if want("1:1 actor calls sync"):
        a = Actor.remote()
        row("1:1 actor calls sync", lambda: lattica.get(a.small_value.remote()))
    if want("1:1 actor calls async"):
        a = Actor.remote()
        row(
            "1:1 actor calls async",
            lambda: lattica.get([a.small_value.remote() for _ in range(1000)]),
            1000,
        )
    if want("1:1 actor calls concurrent"):
        a = Actor.options(max_concurrency=16).remote()
        row(
            "1:1 actor calls concurrent",
            lambda: lattica.get([a.small_value.remote() for _ in range(1000)]),
            1000,
        )
    n = 5000
    if want("1:n actor calls async"):
        actors = [Actor.remote() for _ in range(n_cpu)]
        client = Client.remote(actors)
        row(
            "1:n actor calls async",
            lambda: lattica.get(client.small_value_batch.remote(n)),
            n * len(actors),
        )
    if want("n:n actor calls async"):
        servers = [Actor.remote() for _ in range(n_cpu)]

        @lattica.remote
        def work(actors):
            lattica.get([actors[i % n_cpu].small_value.remote() for i in range(n)])

        row(
            "n:n actor calls async",
            lambda: lattica.get([work.remote(servers) for _ in range(m)]),
            m * n,
        )
    n = 1000
    if want("n:n actor calls with arg async"):
        clients = [Client.remote(Actor.remote()) for _ in range(n_cpu)]
        row(
            "n:n actor calls with arg async",
            lambda: lattica.get([c.small_value_batch_arg.remote(n) for c in clients]),
            n * len(clients),
        )
    if want("1:1 async-actor calls sync"):
        a = AsyncActor.remote()
        row("1:1 async-actor calls sync", lambda: lattica.get(a.small_value.remote()))
    if want("1:1 async-actor calls async"):
        a = AsyncActor.remote()
        row(
            "1:1 async-actor calls async",
            lambda: lattica.get([a.small_value.remote() for _ in range(1000)]),
            1000,
        )
    if want("1:1 async-actor calls with args async"):
        a = AsyncActor.remote()
        row(
            "1:1 async-actor calls with args async",
            lambda: lattica.get([a.small_value_with_arg.remote(i) for i in range(1000)]),
            1000,
        )
    n = 5000
    if want("1:n async-actor calls async"):
        async_actors = [AsyncActor.remote() for _ in range(n_cpu)]
        async_client = Client.remote(async_actors)
        row(
            "1:n async-actor calls async",
            lambda: lattica.get(async_client.small_value_batch.remote(n)),
            n * len(async_actors),
        )
    if want("n:n async-actor calls async"):
        async_servers = [AsyncActor.remote() for _ in range(n_cpu)]

        @lattica.remote
        def async_actor_work(actors):
            lattica.get([actors[i % n_cpu].small_value.remote() for i in range(n)])

        row(
            "n:n async-actor calls async",
            lambda: lattica.get([async_actor_work.remote(async_servers) for _ in range(m)]),
            m * n,
        )
    placement_group_row(lattica, row)
    lattica.shutdown()
    return results


def placement_group_row(lattica, row) -> None:
    """Ray's `placement group create/removal` row."""
    from latticaray.runtime import placement_groups as pg_api

    num_pgs = 100

    def create_removal():
        pgs = [pg_api.placement_group(bundles=[{"CPU": 0.001}]) for _ in range(num_pgs)]
        for pg in pgs:
            pg.wait(timeout_seconds=30)
        for pg in pgs:
            pg_api.remove_placement_group(pg)

    row("placement group create/removal", create_removal, num_pgs)


def ray_python(explicit: str | None) -> str | None:
    """The interpreter that imports Ray: `explicit`, `$LATTICARAY_RAY_PYTHON`, this one, or the
    checkout's `.venv-ray`; None when none does."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [
        explicit,
        os.environ.get("LATTICARAY_RAY_PYTHON"),
        sys.executable,
        os.path.join(root, ".venv-ray", "bin", "python"),
    ]
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        probe = subprocess.run(
            [python, "-c", "import ray"], capture_output=True, timeout=120, check=False
        )
        if probe.returncode == 0:
            return python
    return None


def run_ray(
    python: str, duration: float, settle: float, large_mb: int, only: str | None
) -> tuple[list, str]:
    """Ray's rows, measured now by `ray_baseline.py` in Ray's interpreter: (results, version)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_baseline.py")
    cmd = [python, script, "--duration", str(duration), "--settle", str(settle)]
    cmd += ["--large-mb", str(large_mb)]
    if only:
        cmd += ["--only", only]
    # Ray's own output (warnings, its row lines) goes to our stderr; rows come on stdout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    results: list = []
    version = "?"
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(RAY_ROW_PREFIX):
            continue
        row = json.loads(line[len(RAY_ROW_PREFIX) :])
        if "version" in row:
            version = row["version"]
        else:
            results.append((row["name"], row["mean"], row["sd"]))
            print(f"[Ray] {row['name']} {row['mean']:,.2f} +- {row['sd']:,.2f}", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"Ray's microbenchmark failed (exit {proc.returncode}): see above")
    return results, version


def combine(rounds: list[list]) -> dict:
    """name -> (median over the rounds of its mean, the sd of the median round, every mean)."""
    by_name: dict[str, list[tuple[float, float]]] = {}
    for results in rounds:
        for name, mean, sd in results:
            by_name.setdefault(name, []).append((mean, sd))
    out = {}
    for name, values in by_name.items():
        ordered = sorted(values)
        out[name] = (
            statistics.median(v for v, _ in values),
            ordered[len(ordered) // 2][1],
            [v for v, _ in values],
        )
    return out


def render(ours: dict, ray: dict | None) -> dict:
    print()
    print(f"{'benchmark':52s} {'latticaray':>14s} {'Ray':>12s} {'ratio':>8s}")
    figures: dict[str, dict[str, Any]] = {}
    names = list(ours) + [n for n in (ray or {}) if n not in ours]
    for name in names:
        mean, sd, every = ours.get(name, (None, None, []))
        ray_mean = ray[name][0] if ray and name in ray else None
        ratio = None
        if mean and ray_mean:
            ratio = ray_mean / mean if name in LOWER_IS_BETTER else mean / ray_mean
        print(
            f"{name:52s} {('-' if mean is None else f'{mean:,.2f}'):>14s} "
            f"{('-' if ray_mean is None else f'{ray_mean:,.2f}'):>12s} "
            f"{('-' if ratio is None else f'{ratio:.2f}x'):>8s}"
        )
        figures[name] = {
            "mean": None if mean is None else round(mean, 4),
            "sd": None if sd is None else round(sd, 4),
            "rounds": [round(v, 4) for v in every],
            "ray": None if ray_mean is None else round(ray_mean, 4),
            "ray_rounds": [round(v, 4) for v in ray[name][2]] if ray and name in ray else [],
            "ratio": None if ratio is None else round(ratio, 3),
        }
    if ray:
        below = [n for n, f in figures.items() if f["ratio"] is not None and f["ratio"] < 2]
        print(f"rows below 2x Ray: {', '.join(below) if below else 'none'}")
    return figures


def versions() -> dict:
    import cloudpickle
    import msgpack

    out = {
        "python": platform.python_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "cloudpickle": cloudpickle.__version__,
    }
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import uvloop

        out["uvloop"] = uvloop.__version__
    except ImportError:
        pass
    import latticaray

    out["latticaray"] = latticaray.__version__
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latticaray microbenchmark", description=__doc__)
    parser.add_argument(
        "--duration",
        type=float,
        default=2.0,
        help="seconds per trial (Ray uses 2; warm-up is half of it)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds of pause before each row, on both sides (Ray's own: 10)",
    )
    parser.add_argument(
        "--large-mb",
        type=int,
        default=800,
        help="size of the array of the put-gigabytes rows (Ray's row: 800 MiB; another size "
        "makes that row incomparable)",
    )
    parser.add_argument("--only", default=None, help="run only rows whose name contains this")
    parser.add_argument(
        "--rounds", type=int, default=1, help="Ray then latticaray, this many times"
    )
    parser.add_argument(
        "--ray-python",
        default=None,
        help="interpreter that imports Ray (default: $LATTICARAY_RAY_PYTHON, this one, or the "
        "checkout's .venv-ray)",
    )
    parser.add_argument("--no-ray", action="store_true", help="no Ray column")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    python = None if args.no_ray else ray_python(args.ray_python)
    if python is None and not args.no_ray:
        print("Ray is not importable here: no Ray column (see --ray-python)", flush=True)
    ours_rounds, ray_rounds, loads = [], [], []
    ray_version = None
    for _ in range(max(1, args.rounds)):
        if python is not None:
            loads.append(("ray", os.getloadavg()))
            print(f"Ray ({python}), load average {os.getloadavg()}", flush=True)
            results, ray_version = run_ray(
                python, args.duration, args.settle, args.large_mb, args.only
            )
            ray_rounds.append(results)
        loads.append(("latticaray", os.getloadavg()))
        print(f"latticaray, load average {os.getloadavg()}", flush=True)
        ours_rounds.append(run(args.duration, args.large_mb, args.only, args.settle))
    loads.append(("end", os.getloadavg()))
    figures = render(combine(ours_rounds), combine(ray_rounds) if ray_rounds else None)
    print(f"load averages (1, 5, 15 min) at each start: {loads}")
    out_versions = versions()
    if ray_version is not None:
        out_versions["ray"] = ray_version
    print(
        json.dumps(
            {
                "benchmark": "microbenchmark",
                "figures": figures,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "load": loads,
                "versions": out_versions,
                "duration_s": args.duration,
                "settle_s": args.settle,
                "rounds": args.rounds,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
