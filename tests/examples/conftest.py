"""Helpers for the examples' tests: the examples' folders on sys.path, running an example's
run.py as a program (as a person would) and reading the JSON report it prints last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")
for sub in ("", "sharded_inference", "federated_averaging", "model_distribution"):
    path = os.path.join(EXAMPLES, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


def run_example(name: str, *args: str, timeout: float = 100) -> dict:
    """Run examples/<name>/run.py with `args` and --json; its report (it must exit 0). One that
    runs past `timeout` gets SIGABRT, which makes faulthandler print every thread's stack."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", os.path.join(EXAMPLES, name, "run.py"), *args,
         "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{name} ran past {timeout} s:\n{out[-3000:]}\n{err[-8000:]}")
    assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}\n{err[-5000:]}"
    print(out)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded():
    """An embedded node for tests that drive the examples' actors from this process."""
    import latticaray as lattica

    lattica.init(num_cpus=2)
    yield lattica
    lattica.shutdown()
