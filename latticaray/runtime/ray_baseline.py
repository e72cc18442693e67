"""Ray's `ray microbenchmark` rows, run in Ray's interpreter: the baseline of `latticaray
microbenchmark` (a script for a child process; it imports nothing of latticaray).

    <ray's python> ray_baseline.py --duration 2 --settle 1 [--only NAME] [--extras MB]

It runs `ray._private.ray_perf.main()` (the code of `ray microbenchmark`: its rows, its
functions and actors, its `ray.init()` calls) with three changes, each the same for latticaray:
* each row is timed by Ray's own method (1 s warm-up, 4 trials) with `--duration` s trials
  instead of 2 and a `--settle` s pause before it instead of 10 (`--only` filters rows by name, as
  Ray's `TESTS_TO_RUN` does);
* `ray.init()` is loopback-only (`_node_ip_address="127.0.0.1"` with
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: otherwise Ray resolves its node address to this
  machine's outward one) and starts no dashboard; every TCP socket Ray's processes listen on is
  checked to be a loopback one;
* Ray's client-mode rows (`ray_client_microbenchmark`, which needs grpc and a client server) are
  left out.
After Ray's rows it adds the rows `latticaray microbenchmark` has beyond Ray's (init time, no-op
round trip, put gigabytes of new content and of distinct pages), measured the same way.
Every row is printed on stdout as `ROW {"name": ..., "mean": ..., "sd": ...}`.

:func:`measure` is Ray's timing method itself; `latticaray microbenchmark` and
bench/objects_multiput.py time their rows with it too (it is the same code on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

ROW_PREFIX = "ROW "


def _emit(name: str, mean: float, sd: float) -> None:
    print(ROW_PREFIX + json.dumps({"name": name, "mean": mean, "sd": sd}), flush=True)


def measure(
    fn, multiplier: float = 1, duration: float = 2.0, trials: int = 4, warmup: float | None = None
) -> tuple[float, float]:
    """Ray's method (`ray_microbenchmark_helpers.timeit`): call ``fn`` for ``warmup`` s (half a
    trial by default), then ``trials`` trials of ``duration`` s, calling it in batches of a tenth
    of the warm-up's count; (mean, standard deviation) over the trials of calls per second times
    ``multiplier``."""
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < (duration / 2 if warmup is None else warmup):
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
    return statistics.mean(stats), statistics.pstdev(stats)


def round_trip_ms(call, batches: int = 5, per_batch: int = 200) -> float:
    """The median over ``batches`` batches of ``per_batch`` calls of one call's time, in ms."""
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            call()
        samples.append((time.perf_counter() - t0) / per_batch * 1000)
    return statistics.median(samples)


def _timer(duration: float, settle: float, only: str | None):
    def timeit(name, fn, multiplier=1, warmup_time_sec=None):
        if only and only not in name:
            return [None]
        time.sleep(settle)
        mean, sd = measure(fn, multiplier, duration)
        print(f"{name} per second {mean:,.2f} +- {sd:,.2f}", file=sys.stderr, flush=True)
        _emit(name, mean, sd)
        return [(name, mean, sd)]

    return timeit


def _loopback_only() -> None:
    """Raise if a process of this Ray instance listens on a TCP address outside loopback."""
    import ipaddress

    import psutil

    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    # Ray's GCS and raylet are started detached from the driver: find them by command line
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray/core/src/ray" in cmd or "ray/dashboard" in cmd or "ray/_private" in cmd:
            ours.add(proc.info["pid"])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid in ours and conn.status == psutil.CONN_LISTEN:
            host = getattr(conn.laddr, "ip", "127.0.0.1")  # a listener always has one
            addr = ipaddress.ip_address(host)
            mapped = getattr(addr, "ipv4_mapped", None)
            if not (mapped or addr).is_loopback:
                raise SystemExit(f"Ray listens on {conn.laddr} (pid {conn.pid}): not loopback")


def _patch_init(ray, record_init) -> None:
    real_init = ray.init

    def init(*args, **kwargs):
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
        kwargs.setdefault("include_dashboard", False)
        started = time.perf_counter()
        context = real_init(*args, **kwargs)
        record_init(time.perf_counter() - started)
        _loopback_only()
        return context

    ray.init = init


def _extras(ray, timeit, large_mb: int, only: str | None, init_s: float) -> None:
    import numpy as np

    if not only or only in "init() seconds":
        _emit("init() seconds", init_s, 0.0)
    ray.init()
    try:

        @ray.remote(num_cpus=0)
        def small_value():
            return b"ok"

        if not only or only in "no-op task round trip ms":
            for _ in range(500):
                ray.get(small_value.remote())
            rtt_ms = round_trip_ms(lambda: ray.get(small_value.remote()))
            _emit("no-op task round trip ms", rtt_ms, 0.0)
        arr = np.zeros(large_mb * 1024 * 1024 // 8, dtype=np.int64)

        def put_changed():
            arr[0] += 1
            ray.put(arr)

        timeit("single client put gigabytes, new content each put", put_changed, large_mb / 1024)
        arr = np.arange(large_mb * 1024 * 1024 // 8, dtype=np.int64)
        timeit(
            "single client put gigabytes, array of distinct pages",
            lambda: ray.put(arr),
            large_mb / 1024,
        )
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--only", default=None)
    parser.add_argument("--large-mb", type=int, default=800)
    parser.add_argument("--no-extras", action="store_true")
    args = parser.parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray._private.ray_microbenchmark_helpers as helpers

    timeit = _timer(args.duration, args.settle, args.only)
    helpers.timeit = timeit  # ray_perf imports it by name: patch before importing ray_perf
    client_rows = types.ModuleType("ray._private.ray_client_microbenchmark")
    client_rows.main = lambda results=None: results  # type: ignore[attr-defined]
    sys.modules["ray._private.ray_client_microbenchmark"] = client_rows
    init_times: list[float] = []
    _patch_init(ray, init_times.append)
    from ray._private import ray_perf

    ray_perf.main()
    if not args.no_extras:
        _extras(ray, timeit, args.large_mb, args.only, init_times[0])
    print(ROW_PREFIX + json.dumps({"version": ray.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
