"""Running an example's run.py as a program (as a person would) and reading the JSON report it
prints last. A module of its own (not conftest.py), so that tests import it by a name no other
test folder's conftest shadows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")


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
