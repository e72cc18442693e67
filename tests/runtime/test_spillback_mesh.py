"""Bounded per-owner queues with spillback in the real runtime: a peer's task that finds a node
busy with a full queue is rejected with the node's fresh view (`rejected`), and the caller places
it again elsewhere (or waits for room) instead of piling it up there."""

from __future__ import annotations

import os
import time

import pytest
from meshutil import driver_with_nodes

import latticaray as lattica
from latticaray.runtime import api


@pytest.fixture(scope="module")
def mesh():
    # the driver's node (1 CPU) and one node (1 CPU, and one "slot" no other node has)
    with driver_with_nodes(1, ("--resources", '{"slot": 1}')) as cluster:
        yield cluster


def remote_runtime():
    return api._runtime.mesh_runtime.remote


@lattica.remote
def where(i: int, seconds: float) -> tuple[str, int]:
    time.sleep(seconds)
    return lattica.get_runtime_context().node_id, i * i


def test_flood_to_a_one_cpu_node_is_partly_spilled_to_the_other(mesh):
    target = mesh["nodes"][0].node_id
    spilled = remote_runtime().stats["tasks_spilled"]
    strategy = lattica.NodeAffinitySchedulingStrategy(target, soft=True)
    refs = [where.options(scheduling_strategy=strategy).remote(i, 0.05) for i in range(40)]
    results = lattica.get(refs, timeout=120)
    assert [square for _, square in results] == [i * i for i in range(40)]
    ran_on = [node for node, _ in results]
    # the 1-CPU node took what it could run or queue; the rest was rejected and spilled back
    assert remote_runtime().stats["tasks_spilled"] > spilled
    assert set(ran_on) == {target, mesh["driver"]}, ran_on
    assert ran_on.count(target) < 40


def test_default_flood_waits_for_room_and_finishes_everywhere(mesh):
    """Every node busy with a full queue: the rest waits at the submitter, in order, and is
    placed as room appears (on either node), all results correct."""
    refs = [where.remote(i, 0.02) for i in range(120)]
    results = lattica.get(refs, timeout=180)
    assert [square for _, square in results] == [i * i for i in range(120)]
    assert {node for node, _ in results} == {mesh["nodes"][0].node_id, mesh["driver"]}
    assert not remote_runtime().placer.waiting


@lattica.remote(resources={"slot": 1})
def hold_slot(started: str, go: str) -> str:
    with open(started, "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return lattica.get_runtime_context().node_id


def test_tasks_waiting_for_a_busy_resource_do_not_hold_back_others(mesh, tmp_path):
    """Tasks no node has room for wait at the submitter per (owner, demand): CPU tasks submitted
    after 40 tasks waiting for the one busy slot still run meanwhile."""
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    blocker = hold_slot.remote(started, go)
    deadline = time.monotonic() + 60
    while not os.path.exists(started):
        assert time.monotonic() < deadline, "the slot holder never started"
        time.sleep(0.01)
    slot_tasks = [hold_slot.remote(str(tmp_path / f"s{i}"), go) for i in range(40)]
    try:
        results = lattica.get([where.remote(i, 0.0) for i in range(20)], timeout=60)
        assert [square for _, square in results] == [i * i for i in range(20)]
        assert remote_runtime().placer.waiting  # the slot tasks still wait
    finally:
        with open(go, "w"):
            pass
    slot_node = mesh["nodes"][0].node_id
    assert lattica.get(blocker, timeout=60) == slot_node
    assert lattica.get(slot_tasks, timeout=120) == [slot_node] * 40
