"""Multi-client puts: Ray's `multi client put gigabytes` row, latticaray and Ray in one sitting.

    .venv/bin/python bench/objects_multiput.py                      # both, alternated, 3 rounds
    .venv/bin/python bench/objects_multiput.py --ray-python PATH    # Ray's interpreter (a venv)
    .venv/bin/python bench/objects_multiput.py --rounds 1 --duration 1

The method is Ray's (``ray/_private/ray_perf.py``): 10 tasks at once, each putting 10 arrays of
``np.zeros(10 * 1024 * 1024, dtype=np.int64)`` (80 MiB) and dropping them; a call waits for all
10 tasks; the row is calls per second times 8 (Ray's multiplier: "gigabytes" of 1e9 bytes... of
8 x 100 MiB per call). Warm-up 1 s, then 4 trials of ``--duration`` s; mean and sd of the trials.
``--old-row``: also the variant latticaray's microbenchmark ran before (one actor per two cores
putting 800 MiB per call, after the driver's own 800 MiB puts, as the rows before it in the
microbenchmark do); ``--extra``: a single client putting 80 MiB arrays back to back.

Ray runs in a subprocess of the interpreter given by ``--ray-python`` (or ``$RAY_PYTHON``; by
default ``.venv-ray/bin/python`` of this checkout or of /work/main if present), alternated with
latticaray so both see the same load. If Ray is not importable there, its column says so.
The last line printed is one JSON object with every figure, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROW = "multi client put gigabytes"
MULTIPLIER = 10 * 8 * 0.1  # Ray's

#: Ray's timing method (latticaray/runtime/ray_baseline.py imports nothing of latticaray, so Ray's
#: interpreter loads it by its path).
_RAY_BASELINE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "latticaray",
    "runtime",
    "ray_baseline.py",
)

# the same code runs under Ray (``api = ray``) and latticaray (``api = latticaray``), with
# ``measure`` (ray_baseline.measure) given
_WORKLOAD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np

    def timeit(fn, multiplier, duration):
        return measure(fn, multiplier, duration, warmup=1.0)

    def main(api, duration, extra):
        @api.remote
        def do_put():
            for _ in range(10):
                api.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))

        def put_multi():
            api.get([do_put.remote() for _ in range(10)])

        out = {}
        out["multi client put gigabytes"] = timeit(put_multi, 10 * 8 * 0.1, duration)
        if extra:
            arr = np.zeros(10 * 1024 * 1024, dtype=np.int64)
            out["single client put 80 MiB, gigabytes"] = timeit(
                lambda: api.put(arr), 8 * 0.1 / 10 * 1.048576, duration
            )
        return out
    """
)

_RAY_MAIN = (
    textwrap.dedent(
        f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ray_baseline", {_RAY_BASELINE!r})
    ray_baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_baseline)
    measure = ray_baseline.measure
    """
    )
    + _WORKLOAD
    + textwrap.dedent(
        """
    import ray
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        figures = main(ray, float(sys.argv[1]), sys.argv[2] == "1")
    finally:
        ray.shutdown()
    with open(sys.argv[3], "w") as out:
        json.dump({"figures": figures, "version": ray.__version__}, out)
    """
    )
)


def _lattica_main(duration: float, extra: bool, old_row: bool) -> dict:
    import latticaray
    from latticaray.runtime.ray_baseline import measure

    namespace: dict = {"measure": measure}
    exec(_WORKLOAD, namespace)
    latticaray.init()
    try:
        figures = namespace["main"](latticaray, duration, extra)
        if old_row:  # latticaray microbenchmark's row before it followed Ray's method
            import numpy as np

            n_cpu = max(1, (os.cpu_count() or 2) // 2)
            large_mb = 800

            @latticaray.remote(num_cpus=0)
            class TaskSpawner:
                def put_large(self, nbytes):
                    latticaray.put(np.zeros(nbytes // 8, dtype=np.int64))

            # as in the microbenchmark, the driver's own 800 MiB puts come first (their files
            # go back to the driver, which may leave one untaken when it stops putting)
            for _ in range(3):
                latticaray.put(np.zeros((large_mb << 20) // 8, dtype=np.int64))
            spawners = [TaskSpawner.remote() for _ in range(n_cpu)]
            figures["actors put 800 MiB each (old row)"] = namespace["timeit"](
                lambda: latticaray.get([s.put_large.remote(large_mb << 20) for s in spawners]),
                large_mb / 1024 * n_cpu,
                duration,
            )
    finally:
        latticaray.shutdown()
    return figures


def _run_lattica(duration: float, extra: bool, old_row: bool) -> dict:
    """In a fresh process, as Ray's run is: nothing left over from the previous round."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); import objects_multiput as m; "
        f"print(json.dumps(m._lattica_main({duration!r}, {extra!r}, {old_row!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"latticaray run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ray_python(given: str | None) -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in (
        given,
        os.environ.get("RAY_PYTHON"),
        os.path.join(here, ".venv-ray/bin/python"),
        "/work/main/.venv-ray/bin/python",
    ):
        if path and os.path.exists(path):
            return path
    return None


def _run_ray(python: str, duration: float, extra: bool) -> dict:
    """Ray's daemons outlive ``ray.shutdown()`` for a moment and keep inherited pipes open: the
    result comes back through a file, and output goes to files, never to pipes we wait on."""
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        result = os.path.join(tmp, "result.json")
        log = os.path.join(tmp, "log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [python, "-c", _RAY_MAIN, str(duration), "1" if extra else "0", result],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        if code != 0 or not os.path.exists(result):
            with open(log, errors="replace") as file:
                raise RuntimeError(f"Ray run failed ({code}):\n{file.read()[-3000:]}")
        with open(result) as file:
            return json.load(file)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternated latticaray/Ray rounds")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per trial (Ray: 2)")
    parser.add_argument("--ray-python", default=None, help="interpreter that imports ray")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--extra", action="store_true", help="also the single-client row")
    parser.add_argument("--old-row", action="store_true", help="also the former latticaray row")
    args = parser.parse_args()

    ray_python = None if args.no_ray else _ray_python(args.ray_python)
    ray_note = None
    runs: dict[str, dict[str, list]] = {"latticaray": {}, "ray": {}}
    ray_version = None
    for i in range(args.rounds):
        figures = _run_lattica(args.duration, args.extra, args.old_row)
        for name, (mean, _sd) in figures.items():
            runs["latticaray"].setdefault(name, []).append(round(mean, 3))
        print(f"round {i + 1} latticaray: {figures}", flush=True)
        if ray_python is not None and ray_note is None:
            try:
                result = _run_ray(ray_python, args.duration, args.extra)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                ray_note = f"Ray not run: {exc}"[:500]
                continue
            ray_version = result["version"]
            for name, (mean, _sd) in result["figures"].items():
                runs["ray"].setdefault(name, []).append(round(mean, 3))
            print(f"round {i + 1} ray: {result['figures']}", flush=True)
    if ray_python is None:
        ray_note = "Ray not importable here (no --ray-python, $RAY_PYTHON or .venv-ray)"

    print()
    print(f"{'row':44s} {'latticaray (median)':>20s} {'Ray (median)':>14s} {'ratio':>7s}")
    summary = {}
    for name, values in runs["latticaray"].items():
        ours = statistics.median(values)
        theirs = runs["ray"].get(name)
        ray_median = statistics.median(theirs) if theirs else None
        ratio = f"{ours / ray_median:.2f}x" if ray_median else "-"
        ray_text = f"{ray_median:.2f}" if ray_median else "-"
        print(f"{name:44s} {ours:20.2f} {ray_text:>14s} {ratio:>7s}")
        summary[name] = {"latticaray": values, "ray": theirs or None}
    if ray_note:
        print(ray_note)
    print(
        json.dumps(
            {
                "benchmark": "objects_multiput",
                "figures": summary,
                "ray_note": ray_note,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": {"python": platform.python_version(), "ray": ray_version},
                "duration_s": args.duration,
                "rounds": args.rounds,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
