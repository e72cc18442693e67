"""Gossip and anti-entropy on the simulator: spread, partition/heal, loss, bounded traffic."""

from __future__ import annotations

from latticaray.state import ReplicationConfig
from latticaray.state.simulation import SimCluster


def write_member(cluster: SimCluster, index: int, addr: str):
    pid = cluster.ids[index]
    atom = cluster.cores[pid].members.upsert_self(addrs=[addr])
    cluster.after_write(pid)
    return atom


def test_single_write_reaches_every_replica_by_gossip():
    cluster = SimCluster(60, seed=2)
    atom = write_member(cluster, 0, "/ip4/127.0.0.1/tcp/1")
    elapsed = cluster.run_until(lambda: cluster.count_having(atom.slot, atom) == 60, timeout=5)
    assert elapsed is not None and elapsed < 2.0
    assert cluster.errors == []


def test_partition_writes_on_both_sides_heal_and_converge():
    cluster = SimCluster(40, seed=3)
    left, right = set(cluster.ids[:20]), set(cluster.ids[20:])
    cluster.net.partition([left, right])
    w_left = write_member(cluster, 1, "/ip4/127.0.0.1/tcp/11")
    w_right = write_member(cluster, 30, "/ip4/127.0.0.1/tcp/12")
    # conflicting writes to one LWW key on both sides
    for index, value in ((2, "left"), (31, "right")):
        pid = cluster.ids[index]
        cluster.cores[pid].lww_map("kv")
        cluster.cores[pid].lww_map("kv").set("shared", value)
        cluster.after_write(pid)
    for core in cluster.cores.values():
        core.lww_map("kv")
    cluster.run_until(lambda: False, timeout=3)
    assert cluster.count_having(w_left.slot, w_left) == 20
    assert cluster.count_having(w_right.slot, w_right) == 20
    assert not cluster.converged()
    cluster.net.heal()
    elapsed = cluster.run_until(cluster.converged, timeout=10)
    assert elapsed is not None, "replicas did not converge after the heal"
    values = {core.lww_map("kv").get("shared") for core in cluster.cores.values()}
    assert len(values) == 1
    assert all(
        core.members.get(w_left.author) and core.members.get(w_right.author)
        for core in cluster.cores.values()
    )


def test_anti_entropy_alone_repairs_a_lossy_network():
    config = ReplicationConfig(fanout=1)  # gossip that will miss many replicas
    cluster = SimCluster(30, seed=4, loss=0.3, config=config)
    atoms = [write_member(cluster, i, f"/ip4/127.0.0.1/tcp/{i}") for i in range(5)]
    elapsed = cluster.run_until(cluster.converged, timeout=30)
    assert elapsed is not None
    assert all(cluster.count_having(a.slot, a) == 30 for a in atoms)


def test_anti_entropy_traffic_is_small_when_in_sync_and_proportional_to_the_difference():
    cluster = SimCluster(20, seed=5)
    base = []
    for i, pid in enumerate(cluster.ids):
        core = cluster.cores[pid]
        base.append(
            core.members.upsert_self(addrs=[f"/ip4/127.0.0.1/tcp/{i}"], labels={"pad": "x" * 200})
        )
    cluster.preload(base)
    cluster.run_until(lambda: False, timeout=2)  # let preload gossip duplicates die out
    assert cluster.converged()
    full_state = sum(len(a.value) + 150 for a in base)
    sent = cluster.net.stats.bytes_sent
    cluster.run_until(lambda: False, timeout=5)
    idle_per_node_round = (cluster.net.stats.bytes_sent - sent) / (20 * 5)
    assert idle_per_node_round < 200, idle_per_node_round
    # one replica misses one write: repairing it moves far less than the full state
    lonely = cluster.ids[0]
    cluster.net.partition([{lonely}, set(cluster.ids[1:])])
    atom = write_member(cluster, 5, "/ip4/127.0.0.1/tcp/99")
    cluster.run_until(lambda: cluster.count_having(atom.slot, atom) == 19, timeout=5)
    cluster.net.heal()
    sent = cluster.net.stats.bytes_sent
    assert cluster.run_until(cluster.converged, timeout=10) is not None
    repair = cluster.net.stats.bytes_sent - sent
    assert repair < full_state, (repair, full_state)


def test_a_restarted_replica_catches_up_from_empty():
    cluster = SimCluster(10, seed=6)
    atoms = [write_member(cluster, i, f"/ip4/127.0.0.1/tcp/{i}") for i in range(10)]
    assert cluster.run_until(cluster.converged, timeout=5) is not None
    victim = cluster.ids[3]
    cluster.net.set_down(victim)
    fresh = SimCluster(10, seed=6)  # same keys; take an empty core for the victim
    cluster.cores[victim] = fresh.cores[victim]
    cluster.cores[victim].replica.wall_clock = cluster.wall_clock
    cluster.cores[victim].replica.set_peers(cluster.ids)
    cluster.net.set_down(victim, False)
    assert cluster.run_until(cluster.converged, timeout=15) is not None
    assert all(cluster.count_having(a.slot, a) == 10 for a in atoms)


def test_announcements_alone_spread_a_write_and_each_replica_pulls_it_about_once():
    config = ReplicationConfig(fanout=0, lazy_fanout=4)
    cluster = SimCluster(50, seed=7, config=config)
    atom = write_member(cluster, 0, "/ip4/127.0.0.1/tcp/7")
    elapsed = cluster.run_until(lambda: cluster.count_having(atom.slot, atom) == 50, timeout=5)
    assert elapsed is not None and elapsed < 2.0
    pulled = sum(core.replica.stats.bytes_sent["iwant"] > 0 for core in cluster.cores.values())
    full_copies = sum(core.replica.stats.bytes_sent["delta"] for core in cluster.cores.values())
    assert pulled >= 40  # most replicas learned it by pulling
    assert full_copies < 50 * 2 * 500, full_copies  # about one copy each, not one per announcement
