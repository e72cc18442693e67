"""Helpers for the examples' tests: the examples' folders on sys.path, running an example's
run.py as a program (as a person would) and reading the JSON report it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
for sub in ("", "sharded_inference", "federated_averaging", "model_distribution"):
    path = os.path.join(EXAMPLES, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


def run_example(name: str, *args: str, timeout: float = 240) -> dict:
    """Run examples/<name>/run.py with `args` and --json; its report (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name, "run.py"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(proc.stdout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded():
    """An embedded node for tests that drive the examples' actors from this process."""
    import latticaray as lattica

    lattica.init(num_cpus=2)
    yield lattica
    lattica.shutdown()
