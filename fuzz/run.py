"""Run the fuzz targets with atheris (libFuzzer, coverage-guided) and report what was tried.

    python -m fuzz.run --list
    python -m fuzz.run TARGET [--seconds S | --runs N] [--seed K]     # one target, in-process
    python -m fuzz.run --all --seconds S [--seed K]                   # every target, a process each
    python -m fuzz.run --all --runs N --only a,b                      # those targets, a process each

Each target starts from a corpus seeded with valid encodings (:mod:`fuzz.targets`) kept under
``.fuzz/<target>/`` (it grows across runs). A crash is an exception the decoder does not declare
as its refusal; libFuzzer writes the input to ``.fuzz/crashes/`` and the run fails. A hang is an
input that takes longer than ``--timeout`` seconds. ``--all`` prints a table and, as its last line,
one JSON object with the figures (inputs executed per target, crashes, hangs), machine and
versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".fuzz"
DONE = re.compile(r"Done (\d+) runs in (\d+) second")
STAT = re.compile(r"#(\d+)\s+(?:pulse|NEW|REDUCE|DONE|INITED)\s+cov: (\d+)")


def _seed_corpus(name: str) -> Path:
    from fuzz.targets import TARGETS

    corpus = WORK / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(TARGETS[name].seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    return corpus


def run_one(name: str, seconds: float | None, runs: int | None, seed: int, timeout: int) -> None:
    """Fuzz one target in this process (atheris takes over and exits when done)."""
    import atheris

    with atheris.instrument_imports(include=["latticaray", "fuzz"]):
        from fuzz.targets import TARGETS
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}")
    target = TARGETS[name]
    corpus = _seed_corpus(name)
    crashes = WORK / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)

    def test_one_input(data: bytes) -> None:
        try:
            target.run(data)
        except target.allowed:
            pass

    argv = [
        sys.argv[0],
        str(corpus),
        f"-seed={seed}",
        f"-timeout={timeout}",
        "-rss_limit_mb=2048",
        "-max_len=65536",
        f"-artifact_prefix={crashes}/{name}-",
        "-print_final_stats=1",
    ]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seconds is not None:
        argv.append(f"-max_total_time={int(max(1, seconds))}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def _crash_report(log: str) -> str:
    """The Python traceback and the artifact line of a failed run (not the whole fuzzing log)."""
    start = log.find("Uncaught Python exception")
    if start < 0:
        return log[-3000:]
    artifact = log.find("artifact_prefix", start)
    return log[start : artifact + 300 if artifact > 0 else start + 4000]


def run_all(names: list[str], seconds: float | None, runs: int | None, seed: int, timeout: int):
    """Fuzz each target in a process of its own; returns one result row per target."""
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "fuzz.run", name, f"--seed={seed}", f"--timeout={timeout}"]
        if seconds is not None:
            cmd.append(f"--seconds={seconds}")
        if runs is not None:
            cmd.append(f"--runs={runs}")
        started = time.monotonic()
        limit = (seconds or 0) + 120 + (runs or 0) / 100
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=limit,
        )
        elapsed = time.monotonic() - started
        log = proc.stdout
        done = DONE.search(log)
        executed = (
            int(done.group(1))
            if done
            else max((int(m.group(1)) for m in STAT.finditer(log)), default=0)
        )
        cov = max((int(m.group(2)) for m in STAT.finditer(log)), default=0)
        # libFuzzer's exit codes: 70 a hang (-timeout), 77 an uncaught exception, 71 out of memory
        hung = proc.returncode == 70 or "libFuzzer: timeout" in log
        crashed = proc.returncode != 0 and not hung
        rows.append(
            {
                "target": name,
                "executed": executed,
                "seconds": round(elapsed, 1),
                "per_second": round(executed / elapsed) if elapsed else 0,
                "coverage": cov,
                "crashes": int(crashed),
                "hangs": int(hung),
                "exit": proc.returncode,
                "tail": "" if proc.returncode == 0 else _crash_report(log),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    # fuzz.targets (and so latticaray) is imported only after atheris instruments imports
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("target", nargs="?")
    parser.add_argument("--all", action="store_true", help="every target, one process each")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--only", help="with --all: these targets (comma-separated)")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=10, help="seconds per input before a hang")
    args = parser.parse_args(argv)
    if args.target and not args.all and not args.list:
        if args.seconds is None and args.runs is None:
            parser.error("give --seconds or --runs")
        run_one(args.target, args.seconds, args.runs, args.seed, args.timeout)
        return 0
    from fuzz.targets import TARGETS

    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:12} {t.about}")
        return 0
    if args.seconds is None and args.runs is None:
        parser.error("give --seconds or --runs")
    if not args.all:
        parser.error("give a target or --all")
    names = sorted(TARGETS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; known: {', '.join(sorted(TARGETS))}")
    rows = run_all(names, args.seconds, args.runs, args.seed, args.timeout)
    print(f"{'target':12} {'executed':>10} {'per s':>7} {'cov':>6} {'crashes':>7} {'hangs':>5}")
    for r in rows:
        print(
            f"{r['target']:12} {r['executed']:>10,} {r['per_second']:>7,} {r['coverage']:>6} "
            f"{r['crashes']:>7} {r['hangs']:>5}"
        )
        if r["exit"] != 0:
            print(r["tail"], file=sys.stderr)
    from importlib.metadata import version

    import atheris  # noqa: F401  (version below)

    print(
        json.dumps(
            {
                "fuzz": [{k: v for k, v in r.items() if k != "tail"} for r in rows],
                "total_executed": sum(r["executed"] for r in rows),
                "crashes": sum(r["crashes"] for r in rows),
                "hangs": sum(r["hangs"] for r in rows),
                "seed": args.seed,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "versions": {
                    "python": platform.python_version(),
                    "atheris": version("atheris"),
                    "latticaray": version("latticaray"),
                },
            }
        )
    )
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
