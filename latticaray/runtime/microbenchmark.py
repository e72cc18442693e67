"""`latticaray microbenchmark`: Ray's microbenchmark rows, names and method, on latticaray.

Method (as `ray microbenchmark`): each row runs its operation for a 1 s warm-up, then 4 trials of
about 2 s each; the figure is the mean (and standard deviation) over the trials of operations
per second (times the row's multiplier). `--duration` scales the trial length for quick runs.
Extra rows: init() time, no-op task round trip, and put gigabytes with one element of the array
changed before each put (so no put can be recognised as a copy of an earlier one: every put
writes all its bytes, as Ray's do). Ray 2.60 figures measured on this machine are printed beside
ours where the issue gives them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

RAY_260 = {
    "single client tasks sync": 751,
    "single client tasks async": 1839,
    "1:1 actor calls sync": 1321,
    "1:1 actor calls async": 4008,
    "1:n actor calls async": 4356,
    "n:n actor calls async": 4253,
    "single client put calls (Plasma Store)": 1642,
    "single client get calls (Plasma Store)": 9382,
    "single client put gigabytes": 3.26,
    "init() seconds": 3.0,
    "no-op task round trip ms": 1.26,
}
LOWER_IS_BETTER = {"init() seconds", "no-op task round trip ms"}


def timeit(
    name: str,
    fn,
    multiplier: float = 1,
    duration: float = 2.0,
    trials: int = 4,
    results: list | None = None,
) -> tuple[float, float]:
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < duration / 2:
        fn()
        count += 1
    step = count // 10 + 1
    stats = []
    for _ in range(trials):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < duration:
            for _ in range(step):
                fn()
            count += step
        stats.append(multiplier * count / (time.perf_counter() - start))
    mean = statistics.mean(stats)
    sd = statistics.pstdev(stats)
    print(f"{name} per second {mean:,.2f} +- {sd:,.2f}", flush=True)
    if results is not None:
        results.append((name, mean, sd))
    return mean, sd


def run(duration: float, large_mb: int, only: str | None) -> list:
    import numpy as np

    import latticaray as lattica

    results: list = []
    n_cpu = max(1, (os.cpu_count() or 2) // 2)

    t0 = time.perf_counter()
    lattica.init()
    init_s = time.perf_counter() - t0
    print(f"init() seconds {init_s:.3f}", flush=True)
    results.append(("init() seconds", init_s, 0.0))

    def want(name: str) -> bool:
        return only is None or only in name

    def row(name, fn, multiplier=1):
        if want(name):
            timeit(name, fn, multiplier, duration, results=results)

    @lattica.remote(num_cpus=0)
    def small_value():
        return b"ok"

    @lattica.remote(num_cpus=0)
    def create_object_containing_ref():
        return [lattica.put(i) for i in range(10000)]

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

    class TaskSpawnerImpl:
        def spawn(self, n):
            lattica.get([small_value.remote() for _ in range(n)])

        def put_batch(self, n):
            for _ in range(n):
                lattica.put(0)

        def put_large(self, nbytes):
            lattica.put(np.zeros(nbytes // 8, dtype=np.int64))

    # the actor classes (mypy does not follow a class decorator: they are wrapped by call)
    Actor = lattica.remote(num_cpus=0)(ActorImpl)
    AsyncActor = lattica.remote(num_cpus=0)(AsyncActorImpl)
    Client = lattica.remote(num_cpus=0)(ClientImpl)
    TaskSpawner = lattica.remote(num_cpus=0)(TaskSpawnerImpl)

    for _ in range(500):  # workers up and warm before timing starts
        lattica.get(small_value.remote())
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            lattica.get(small_value.remote())
        samples.append((time.perf_counter() - t0) / 200 * 1000)
    rtt_ms = statistics.median(samples)
    print(f"no-op task round trip ms {rtt_ms:.3f}", flush=True)
    results.append(("no-op task round trip ms", rtt_ms, 0.0))

    value = lattica.put(0)
    row("single client get calls (Plasma Store)", lambda: lattica.get(value))
    row("single client put calls (Plasma Store)", lambda: lattica.put(0))
    if want("multi client put calls"):
        spawners = [TaskSpawner.remote() for _ in range(n_cpu)]
        row(
            "multi client put calls (Plasma Store)",
            lambda: lattica.get([s.put_batch.remote(1000) for s in spawners]),
            1000 * n_cpu,
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
    if want("multi client put gigabytes"):
        spawners = [TaskSpawner.remote() for _ in range(n_cpu)]
        row(
            "multi client put gigabytes",
            lambda: lattica.get([s.put_large.remote(large_mb << 20) for s in spawners]),
            large_mb / 1024 * n_cpu,
        )
    if want("get object containing 10k refs"):
        containing = create_object_containing_ref.remote()
        lattica.get(containing)
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
    if want("multi client tasks async"):
        spawners = [TaskSpawner.remote() for _ in range(n_cpu)]
        row(
            "multi client tasks async",
            lambda: lattica.get([s.spawn.remote(1000) for s in spawners]),
            1000 * n_cpu,
        )

    a = Actor.remote()
    row("1:1 actor calls sync", lambda: lattica.get(a.small_value.remote()))
    row(
        "1:1 actor calls async",
        lambda: lattica.get([a.small_value.remote() for _ in range(1000)]),
        1000,
    )
    concurrent_actor = Actor.options(max_concurrency=16).remote()
    row(
        "1:1 actor calls concurrent",
        lambda: lattica.get([concurrent_actor.small_value.remote() for _ in range(1000)]),
        1000,
    )

    n = 5000
    actors = [Actor.remote() for _ in range(n_cpu)]

    def actor_multi():
        lattica.get([actors[i % n_cpu].small_value.remote() for i in range(n)])

    row("1:n actor calls async", actor_multi, n)
    n = 1000
    if want("n:n actor calls"):
        clients = [Client.remote(actor) for actor in actors]
        row(
            "n:n actor calls async",
            lambda: lattica.get([c.small_value_batch.remote(n) for c in clients]),
            n * len(clients),
        )
        row(
            "n:n actor calls with arg async",
            lambda: lattica.get([c.small_value_batch_arg.remote(n) for c in clients]),
            n * len(clients),
        )

    async_actor = AsyncActor.remote()
    row("1:1 async-actor calls sync", lambda: lattica.get(async_actor.small_value.remote()))
    row(
        "1:1 async-actor calls async",
        lambda: lattica.get([async_actor.small_value.remote() for _ in range(1000)]),
        1000,
    )
    row(
        "1:1 async-actor calls with args async",
        lambda: lattica.get([async_actor.small_value_with_arg.remote(i) for i in range(1000)]),
        1000,
    )
    n = 5000
    async_actors = [AsyncActor.remote() for _ in range(n_cpu)]
    row(
        "1:n async-actor calls async",
        lambda: lattica.get([async_actors[i % n_cpu].small_value.remote() for i in range(n)]),
        n,
    )
    n = 1000
    if want("n:n async-actor calls"):
        async_clients = [Client.remote(async_actors) for _ in range(n_cpu)]
        row(
            "n:n async-actor calls async",
            lambda: lattica.get([c.small_value_batch.remote(n) for c in async_clients]),
            n * n_cpu * len(async_actors),
        )
    lattica.shutdown()
    return results


def render(results: list) -> dict:
    print()
    print(f"{'benchmark':48s} {'latticaray':>14s} {'Ray 2.60':>10s} {'ratio':>7s}")
    figures = {}
    for name, mean, sd in results:
        ray = RAY_260.get(name)
        if ray is None:
            ratio_text = "-"
        else:
            ratio = ray / mean if name in LOWER_IS_BETTER else mean / ray
            ratio_text = f"{ratio:.2f}x"
        print(
            f"{name:48s} {mean:14,.2f} {('-' if ray is None else f'{ray:,}'):>10s} {ratio_text:>7s}"
        )
        figures[name] = {"mean": round(mean, 4), "sd": round(sd, 4), "ray_2_60": ray}
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
        "--large-mb",
        type=int,
        default=800,
        help="size of the array of the put-gigabytes rows (Ray: 800 MiB)",
    )
    parser.add_argument("--only", default=None, help="run only rows whose name contains this")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = run(args.duration, args.large_mb, args.only)
    figures = render(results)
    print(
        json.dumps(
            {
                "benchmark": "microbenchmark",
                "figures": figures,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": versions(),
                "duration_s": args.duration,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
