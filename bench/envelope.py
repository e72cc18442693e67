"""Ray's single-node scalability envelope, reproduced on this machine.

ray-project/ray release/benchmarks/README.md lists, for one node (an m4.16xlarge, 64 cores):
10,000+ object arguments to one task, 3,000+ objects returned from one task, 10,000+ objects in
one `get`, 1,000,000+ tasks queued on one node, and a `get` of a numpy object larger than the
object store (spilled; 10 GiB+). Each dimension runs here in its own process (a fresh
`latticaray.init()`), while this process samples the memory of that process and all of its
children (the node's workers) every 50 ms; reported per dimension: the size reached, the time
it took, peak memory (RSS summed over the process tree: the driver with its embedded node and
the workers; store pages a process maps count in its RSS), and for the queued tasks the memory
per queued task.

    .venv/bin/python bench/envelope.py                      # every dimension at Ray's sizes
    .venv/bin/python bench/envelope.py --only args,returns  # some of them
    .venv/bin/python bench/envelope.py --scale 0.1          # 1/10 of every size (a quick look)

The last line of output is one JSON object with the figures, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DIMENSIONS = {
    # name: (Ray's figure, unit)
    "args": (10_000, "object arguments to one task"),
    "returns": (3_000, "objects returned from one task"),
    "get": (10_000, "objects in one get"),
    "queued": (1_000_000, "tasks queued on one node"),
    "large": (10 * 2**30, "bytes in one numpy object, larger than the store (spilled)"),
}


# -- the dimensions (run in a child process) ------------------------------------------------------


def _args(n: int) -> dict:
    import latticaray

    latticaray.init()

    @latticaray.remote
    def count(*args):
        return len(args)

    refs = [latticaray.put(i) for i in range(n)]
    started = time.perf_counter()
    got = latticaray.get(count.remote(*refs))
    took = time.perf_counter() - started
    latticaray.shutdown()
    return {"reached": got, "seconds": took, "ok": got == n}


def _returns(n: int) -> dict:
    import latticaray

    latticaray.init()

    @latticaray.remote(num_returns=n)
    def many():
        return list(range(n))

    started = time.perf_counter()
    refs = many.remote()
    values = latticaray.get(refs)
    took = time.perf_counter() - started
    latticaray.shutdown()
    return {"reached": len(values), "seconds": took, "ok": values == list(range(n))}


def _get(n: int) -> dict:
    import latticaray

    latticaray.init()
    refs = [latticaray.put(i) for i in range(n)]
    started = time.perf_counter()
    values = latticaray.get(refs)
    took = time.perf_counter() - started
    latticaray.shutdown()
    return {"reached": len(values), "seconds": took, "ok": values == list(range(n))}


def _queued(n: int) -> dict:
    import psutil

    import latticaray

    latticaray.init()
    gate = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"envelope-gate-{os.getpid()}")

    @latticaray.remote
    def hold(path):
        while not os.path.exists(path):
            time.sleep(0.05)
        return 0

    @latticaray.remote
    def noop(i):
        return i

    cpus = int(latticaray.cluster_resources().get("CPU", 1))
    holders = [hold.remote(gate) for _ in range(cpus)]
    time.sleep(1.0)
    me = psutil.Process()

    def tree_rss() -> int:
        procs = [me, *me.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    before = tree_rss()
    started = time.perf_counter()
    refs = [noop.remote(i) for i in range(n)]
    submit_s = time.perf_counter() - started
    time.sleep(1.0)
    queued_rss = tree_rss()
    with open(gate, "w"):
        pass
    drain_started = time.perf_counter()
    latticaray.get(holders)
    total = 0
    step = 10_000
    for i in range(0, n, step):  # in slices: one get of a million refs is its own dimension
        total += sum(latticaray.get(refs[i : i + step]))
    drain_s = time.perf_counter() - drain_started
    os.unlink(gate)
    latticaray.shutdown()
    return {
        "reached": n,
        "seconds": submit_s,
        "submit_per_s": n / submit_s,
        "drain_seconds": drain_s,
        "drain_per_s": n / drain_s,
        "bytes_per_queued_task": (queued_rss - before) / n,
        "ok": total == n * (n - 1) // 2,
    }


def _large(n: int) -> dict:
    import numpy as np

    import latticaray
    from latticaray.runtime import api

    capacity = max(n // 4, 64 << 20)
    latticaray.init(object_store_memory=capacity)
    deadline = time.monotonic() + 60  # the node makes its store off the loop after init()
    while api._runtime.node.store is None and time.monotonic() < deadline:
        time.sleep(0.05)
    store = api._runtime.node.store
    array = np.ones(n // 8, dtype=np.float64)
    started = time.perf_counter()
    ref = latticaray.put(array)
    del array
    put_s = time.perf_counter() - started
    stats = store.stats()
    # where the value lives: spilled to disk (Ray's figure), or, where the store cannot take
    # it, in this process's memory (then the dimension is not reached)
    where = "spilled" if stats["spilled"] else ("store" if stats["objects"] else "process memory")
    started = time.perf_counter()
    value = latticaray.get(ref)
    ok = value.nbytes == n and float(value[-1]) == 1.0 and where == "spilled"
    get_s = time.perf_counter() - started
    del value
    latticaray.shutdown()
    return {
        "reached": n,
        "seconds": put_s + get_s,
        "put_seconds": put_s,
        "get_seconds": get_s,
        "store_bytes": capacity,
        "where": where,
        "ok": ok,
    }


RUNNERS = {"args": _args, "returns": _returns, "get": _get, "queued": _queued, "large": _large}


def child(name: str, n: int) -> None:
    try:
        out = RUNNERS[name](n)
    except Exception as exc:  # report the failure as the dimension's result
        out = {"reached": 0, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent: one child per dimension, memory sampled ------------------------------------------


def run_dimension(name: str, n: int, timeout: float) -> dict:
    import psutil

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", name, "--n", str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = {"rss": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak["rss"] = max(peak["rss"], total)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stdout += "\nRESULT " + json.dumps(
            {"reached": 0, "ok": False, "error": f"timed out after {timeout:.0f}s"}
        )
    done.set()
    sampler.join()
    result: dict = {"reached": 0, "ok": False, "error": (stderr or "")[-2000:]}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - started
    result["peak_rss_bytes"] = peak["rss"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DIMENSIONS))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of Ray's sizes")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per dimension, seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n)
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(DIMENSIONS)
    if unknown:
        parser.error(f"unknown dimensions {sorted(unknown)}; known: {', '.join(DIMENSIONS)}")
    load_before = os.getloadavg()
    results = {}
    for name in names:
        target = int(DIMENSIONS[name][0] * args.scale)
        results[name] = run_dimension(name, target, args.timeout)
        results[name]["target"] = target
    print(f"single-node envelope on {os.cpu_count()} cores (Ray's figures: a 64-core node)")
    print(f"{'dimension':<58}{'reached':>14}{'time s':>10}{'peak RSS MB':>13}")
    for name in names:
        r = results[name]
        label = f"{DIMENSIONS[name][1]} (Ray: {DIMENSIONS[name][0]:,})"
        reached = f"{r['reached']:,}" if r.get("ok") else "FAILED"
        seconds = r.get("seconds")
        print(
            f"{label:<58}{reached:>14}"
            f"{(f'{seconds:.2f}' if seconds is not None else '-'):>10}"
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}"
        )
        if not r.get("ok"):
            why = r.get("error") or f"the value lived in {r.get('where', '?')}, not spilled"
            print(f"    not reached: {why[-300:]}")
    if "queued" in results and results["queued"].get("ok"):
        q = results["queued"]
        print(
            f"queued tasks: {q['bytes_per_queued_task']:.0f} bytes of RSS per queued task, "
            f"submitted at {q['submit_per_s']:,.0f}/s, drained at {q['drain_per_s']:,.0f}/s"
        )
    import msgpack
    import numpy

    print(
        json.dumps(
            {
                "bench": "envelope",
                "scale": args.scale,
                "results": results,
                "ray_figures": {k: v[0] for k, v in DIMENSIONS.items()},
                "load_before": load_before,
                "load_after": os.getloadavg(),
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                },
                "versions": {
                    "python": platform.python_version(),
                    "numpy": numpy.__version__,
                    "msgpack": msgpack.version,
                },
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
