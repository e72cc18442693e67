"""Placement groups through the public API across `latticaray start` node processes on loopback.

The driver (this process, an embedded node with no CPU of its own) owns the groups; the bundles
are reserved on the node processes by the two-phase claim over ``/latticaray/sched/1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import latticaray as lattica
from latticaray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from latticaray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tests.runtime.meshutil import _die_with_parent, start_child, stop_child, wait_for

pytestmark = pytest.mark.timeout(240)

LOOPBACK = "/ip4/127.0.0.1/udp/0/quic-v1"


class StartedNode:
    """A `latticaray start` process; stop() always reaps it."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "latticaray.cli", "start", "--listen", LOOPBACK, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))
        reader.daemon = True
        reader.start()
        reader.join(90)
        if not line or not line[0]:
            self.stop()
            raise RuntimeError("latticaray start did not print its ready line")
        self.info = json.loads(line[0])
        self.node_id = self.info["node_id"]
        self.addr = self.info["addrs"][0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@contextlib.contextmanager
def started_mesh(count: int, *args: str):
    """``count`` `latticaray start` nodes (``args`` each) and this process as a driver of the
    mesh with no CPU of its own; yields the nodes once the driver has every node's view."""
    first = StartedNode(*args)
    nodes = [first]
    try:
        invite = first.info["invite"]
        for _ in range(count - 1):
            nodes.append(StartedNode(*args, "--bootstrap", first.addr, "--credential", invite))
        lattica.init(bootstrap=[first.addr], credential=invite, num_cpus=0, listen=[LOOPBACK])
        ids = {n.node_id for n in nodes}
        wait_for(
            lambda: ids <= {n["NodeID"] for n in lattica.nodes() if n["Alive"]},
            60,
            "the node processes' views",
        )
        yield nodes
    finally:
        lattica.shutdown()
        for node in nodes:
            node.stop()


@lattica.remote(num_cpus=1)
def where() -> str:
    return lattica.get_runtime_context().node_id


@lattica.remote(num_cpus=1)
class Shard:
    def node(self) -> str:
        return lattica.get_runtime_context().node_id


def in_bundle(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, index)


def cpu_nodes() -> set[str]:
    return {
        n["NodeID"] for n in lattica.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU")
    }


@pytest.fixture(scope="module")
def mesh():
    with started_mesh(3, "--num-cpus", "1") as nodes:
        yield {"nodes": nodes, "first": nodes[0], "invite": nodes[0].info["invite"]}


def test_strict_spread_over_three_nodes_places_a_bundle_on_each(mesh):
    ids = {n.node_id for n in mesh["nodes"]}
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD", name="spread3")
    assert lattica.get(pg.ready(), timeout=60) is True
    entry = placement_group_table(pg)
    assert entry["state"] == "CREATED" and entry["strategy"] == "STRICT_SPREAD"
    holders = [entry["bundles_to_node_id"][i] for i in range(3)]
    assert set(holders) == ids  # one bundle on each node process
    # tasks and actors of each bundle run on its node
    ran = lattica.get(
        [where.options(scheduling_strategy=in_bundle(pg, i)).remote() for i in range(3)]
    )
    assert ran == holders
    shards = [Shard.options(scheduling_strategy=in_bundle(pg, i)).remote() for i in range(3)]
    assert lattica.get([s.node.remote() for s in shards], timeout=60) == holders
    assert get_placement_group("spread3") == pg
    # every CPU of the mesh is reserved: a task outside the group finds none free
    wait_for(lambda: lattica.available_resources().get("CPU", 0) < 0.5, 30, "CPUs reserved")
    for shard in shards:
        lattica.kill(shard)
    remove_placement_group(pg)
    wait_for(lambda: lattica.available_resources().get("CPU", 0) >= 2.5, 30, "CPUs released")
    assert lattica.get(where.remote(), timeout=60) in ids
    assert placement_group_table().get(pg.id) in (None, {}) or (
        placement_group_table()[pg.id]["state"] == "REMOVED"
    )


def test_pack_puts_both_bundles_on_one_node(mesh):
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="PACK")
    assert pg.wait(timeout_seconds=60)
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    assert nodes[0] == nodes[1]
    ran = lattica.get(
        [where.options(num_cpus=0.5, scheduling_strategy=in_bundle(pg, i)).remote() for i in (0, 1)]
    )
    assert ran == [nodes[0], nodes[0]]
    remove_placement_group(pg)


def test_spread_uses_a_node_per_bundle_and_strict_pack_one_node(mesh):
    ids = {n.node_id for n in mesh["nodes"]}
    spread = placement_group([{"CPU": 0.5}] * 3, strategy="SPREAD")
    assert spread.wait(timeout_seconds=60)
    assert set(placement_group_table(spread)["bundles_to_node_id"].values()) == ids
    remove_placement_group(spread)
    packed = placement_group([{"CPU": 0.25}] * 3, strategy="STRICT_PACK")
    assert packed.wait(timeout_seconds=60)
    assert len(set(placement_group_table(packed)["bundles_to_node_id"].values())) == 1
    remove_placement_group(packed)
    too_big = placement_group([{"CPU": 0.75}] * 2, strategy="STRICT_PACK")  # no node has 1.5
    assert not too_big.wait(timeout_seconds=2)
    remove_placement_group(too_big)


def test_a_group_no_node_set_can_hold_stays_pending_then_a_joining_node_takes_it(mesh):
    pg = placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")  # 4 bundles, 3 nodes
    assert not pg.wait(timeout_seconds=3)
    assert placement_group_table(pg)["state"] == "PENDING"
    # work of the pending group waits for it instead of failing
    waiting = where.options(scheduling_strategy=in_bundle(pg, 3)).remote()
    assert lattica.wait([waiting], timeout=1)[0] == []
    fourth = StartedNode(
        "--num-cpus", "1", "--bootstrap", mesh["first"].addr, "--credential", mesh["invite"]
    )
    try:
        assert pg.wait(timeout_seconds=60)
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        assert len(set(nodes.values())) == 4 and fourth.node_id in nodes.values()
        assert lattica.get(waiting, timeout=60) == nodes[3]
        remove_placement_group(pg)
        wait_for(lambda: lattica.available_resources().get("CPU", 0) >= 3.5, 30, "released")
    finally:
        fourth.stop()
    wait_for(lambda: fourth.node_id not in cpu_nodes(), 60, "the fourth node gone")


def test_work_beyond_its_bundle_or_in_an_unknown_group_fails_clearly(mesh):
    pg = placement_group([{"CPU": 0.5}], strategy="PACK")
    assert pg.wait(timeout_seconds=60)
    with pytest.raises(
        lattica.TaskUnschedulableError, match=r"bundle 0 of placement group pg\w+ holds .*less than"
    ):
        lattica.get(where.options(scheduling_strategy=in_bundle(pg, 0)).remote(), timeout=30)
    remove_placement_group(pg)
    with pytest.raises(lattica.TaskUnschedulableError, match="unknown or removed"):
        lattica.get(
            where.options(num_cpus=0.5, scheduling_strategy=in_bundle(pg, 0)).remote(), timeout=30
        )
    with pytest.raises(ValueError, match="unknown placement strategy"):
        placement_group([{"CPU": 1}], strategy="SIDEWAYS")


OWNER = textwrap.dedent(
    """
    import signal, sys, time, latticaray as lattica
    from latticaray.util.placement_group import placement_group, placement_group_table
    lattica.init(bootstrap=[sys.argv[1]], credential=sys.argv[2], num_cpus=0,
                 listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert pg.wait(timeout_seconds=60)
    print("CREATED", flush=True)
    # hold it until told to leave; leave the mesh without removing the group
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(120)
    """
)


def test_bundles_are_released_when_their_owner_leaves_the_mesh(mesh):
    owner = start_child([sys.executable, "-c", OWNER, mesh["first"].addr, mesh["invite"]])
    try:
        line = owner.stdout.readline()
        assert line.strip() == "CREATED", stop_child(owner)
        wait_for(lambda: lattica.available_resources().get("CPU", 0) < 0.5, 30, "all reserved")
        mine = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        assert not mine.wait(timeout_seconds=1)  # the owner holds every CPU
        owner.send_signal(signal.SIGTERM)  # the owner leaves without removing its group
        assert mine.wait(timeout_seconds=60)
        remove_placement_group(mine)
    finally:
        stop_child(owner)
