"""The runtime node's object store: its capacity from `init(object_store_memory=)` (what does not
fit is spilled to disk and read back whole), and the stores of node processes that died without
removing theirs (`kill -9`) removed by the next node that starts on the host."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import latticaray as lattica
from latticaray.objectstore.layout import store_parent
from latticaray.runtime import api


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def test_a_starting_node_removes_the_stores_of_dead_processes():
    parent = store_parent()
    os.makedirs(parent, exist_ok=True)
    dead = os.path.join(parent, f"store-{_dead_pid()}-abcdef")
    os.makedirs(os.path.join(dead, "objects"))
    with open(os.path.join(dead, "objects", "blob"), "wb") as f:
        f.write(b"x" * 4096)
    alive = os.path.join(parent, f"store-{os.getppid()}-fedcba")  # our parent is alive
    os.makedirs(alive)
    try:
        lattica.init(num_cpus=1)
        try:
            # the store is made (and the dead's removed) off the loop: a put waits for it
            lattica.get(lattica.put(np.zeros(1 << 20)))
            deadline = time.monotonic() + 30
            while os.path.exists(dead) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(dead)
            assert os.path.isdir(alive)  # a live process's store is never touched
        finally:
            lattica.shutdown()
    finally:
        os.rmdir(alive)


def test_object_store_memory_sets_the_capacity_and_what_does_not_fit_spills():
    lattica.init(num_cpus=1, object_store_memory=64 << 20)
    try:
        deadline = time.monotonic() + 30  # the store is made off the loop after init()
        while api._runtime.node.store is None and time.monotonic() < deadline:
            time.sleep(0.02)
        store = api._runtime.node.store
        assert store.stats()["capacity"] == 64 << 20
        refs = [lattica.put(np.full(5 << 20, i, dtype=np.int64)) for i in range(4)]  # 4 x 40 MB
        assert store.stats()["spilled"] >= 2
        assert [int(lattica.get(r)[-1]) for r in refs] == [0, 1, 2, 3]
    finally:
        lattica.shutdown()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1GB", True])
def test_object_store_memory_must_be_a_positive_number_of_bytes(bad):
    with pytest.raises(ValueError, match="object_store_memory"):
        lattica.init(object_store_memory=bad)


def test_object_store_memory_is_refused_for_an_attaching_driver():
    with pytest.raises(ValueError, match="option of the node"):
        lattica.init(address="unix:/nonexistent.sock", object_store_memory=1 << 30)
