"""The node's ready queue is the scheduler package's fair queue (scheduler/local.py FairQueue,
through LocalScheduler): tasks of two submitters waiting on a busy node start alternately, not
first-come first-served; a node's own clients are never rejected by the queue's bound."""

from __future__ import annotations

import os
import time

import pytest

import latticaray as lattica


def _wait_file(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


@lattica.remote
def hold(started: str, go: str) -> str:
    """Takes the node's CPUs until the test says go."""
    with open(started, "w"):
        pass
    _wait_file(go, 60)
    return "held"


@lattica.remote
def record(log: str, label: str) -> str:
    with open(log, "a") as f:  # O_APPEND: one line per write, in the order tasks ran
        f.write(label + "\n")
    time.sleep(0.01)
    return label


@lattica.remote(num_cpus=0)
def spawn(log: str, n: int) -> list:
    """A second owner on the same node: a worker that submits tasks of its own."""
    return [record.remote(log, f"B{i}") for i in range(n)]


@pytest.fixture
def two_cpu_node():
    lattica.init(num_cpus=2)
    try:
        yield
    finally:
        lattica.shutdown()


def test_two_submitters_interleave_on_a_busy_node(two_cpu_node, tmp_path):
    started, go, log = str(tmp_path / "started"), str(tmp_path / "go"), str(tmp_path / "log")
    blocker = hold.options(num_cpus=2).remote(started, go)
    _wait_file(started, 60)
    second = lattica.get(spawn.remote(log, 8), timeout=60)  # a worker's 8, queued first
    first = [record.remote(log, f"A{i}") for i in range(8)]  # then the driver's 8
    with open(go, "w"):
        pass
    assert lattica.get(blocker, timeout=60) == "held"
    assert lattica.get(first, timeout=60) == [f"A{i}" for i in range(8)]
    assert lattica.get(second, timeout=60) == [f"B{i}" for i in range(8)]
    with open(log) as f:
        order = f.read().split()
    assert sorted(order) == sorted([f"A{i}" for i in range(8)] + [f"B{i}" for i in range(8)])
    # FIFO would run B0..B7 first; round-robin between the two submitters starts them in turn
    # (two at a time on two CPUs, so the two of a pair may log in either order)
    head = order[:8]
    assert sum(x.startswith("A") for x in head) >= 3, order
    assert sum(x.startswith("B") for x in head) >= 3, order
    for owner in "AB":  # each submitter's own tasks start in its order
        ranks = [int(x[1:]) for x in order if x.startswith(owner)]
        assert all(abs(rank - i) <= 1 for i, rank in enumerate(ranks)), order


def test_a_local_flood_is_never_rejected_by_the_queue_bound(two_cpu_node):
    """The queue holds 16 for peers; the node's own driver queues 300 past it."""
    refs = [record.options(num_cpus=1).remote(os.devnull, str(i)) for i in range(300)]
    assert lattica.get(refs, timeout=120) == [str(i) for i in range(300)]
