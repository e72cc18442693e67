"""Bounded per-owner queues with spillback in the real runtime: a peer's task that finds a node
busy with a full queue is rejected with the node's fresh view (`rejected`), and the caller places
it again elsewhere (or waits for room) instead of piling it up there."""

from __future__ import annotations

import time

import pytest
from meshutil import driver_with_nodes

import latticaray as lattica
from latticaray.runtime import api


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(1) as cluster:  # the driver's node (1 CPU) and one node (1 CPU)
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
