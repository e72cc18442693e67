"""Placement from the capacity nodes advertise in the DHT (`capacity/<resource>`).

Three node processes: D (sparse peering: admits peers only through its bootstrap role, placement
or when asked; the driver attaches to it), A (joins through D, full peering), and C (joins
through A, sparse, the only node with "tpu"s). D never gets a pushed view of C, yet a task and an
actor asking for a tpu land on C because C's DHT capacity ad names it; afterwards C feeds D's
views. A request no node can take still fails with TaskUnschedulableError after the wait (an
actor's calls with ActorDiedError saying why).
The directory's bookkeeping (when to read keys, bounds, deadlines) is tested on its own.
"""
import time

import pytest

import latticaray as lattica
from latticaray.runtime.placement import CapacityDirectoryCore
from latticaray.scheduler.policy import NodeView

from meshutil import NodeProcess, alive_nodes, wait_for


@lattica.remote
def whereami():
    return lattica.get_runtime_context().node_id


@lattica.remote
class Accelerated:
    def where(self):
        return lattica.get_runtime_context().node_id


@pytest.fixture(scope="module")
def sparse_mesh():
    nodes = []
    try:
        d = NodeProcess(None, None, extra_args=("--peering", "sparse", "--capacity-wait", "30"))
        nodes.append(d)
        invite = d.info["invite"]
        a = NodeProcess(d.info["addrs"][0], invite, extra_args=("--capacity-wait", "3"))
        nodes.append(a)
        c = NodeProcess(a.info["addrs"][0], invite,
                        extra_args=("--peering", "sparse", "--resources", '{"tpu": 2}'))
        nodes.append(c)
        yield {"d": d, "a": a, "c": c}
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def attach():
    def attach_to(node: NodeProcess):
        lattica.init(address=node.info["driver_address"])
    yield attach_to
    if lattica.is_initialized():
        lattica.shutdown()


def test_task_lands_on_node_found_only_through_dht_capacity(sparse_mesh, attach):
    d, a, c = sparse_mesh["d"], sparse_mesh["a"], sparse_mesh["c"]
    attach(d)
    wait_for(lambda: a.node_id in alive_nodes(), 30, "D to see A")
    assert c.node_id not in {n["NodeID"] for n in lattica.nodes()}, "D already knows C"
    assert lattica.cluster_resources().get("tpu", 0) == 0
    actor = Accelerated.options(resources={"tpu": 1}).remote()
    calls = [actor.where.remote() for _ in range(3)]  # wait with the actor for its placement
    node = lattica.get(whereami.options(resources={"tpu": 1}).remote(), timeout=60)
    assert node == c.node_id
    assert lattica.get(calls, timeout=60) == [c.node_id] * 3
    # the advertiser is now a peer like any other: its pushed views reach D
    wait_for(lambda: c.node_id in alive_nodes(), 30, "C's view at D")
    assert lattica.cluster_resources().get("tpu") == 2
    # once admitted, C takes tpu work at once (no DHT wait)
    started = time.monotonic()
    assert lattica.get([whereami.options(resources={"tpu": 1}).remote() for _ in range(3)],
                       timeout=60) == [c.node_id] * 3  # one tpu left beside the actor's
    assert time.monotonic() - started < 10


def test_unschedulable_request_fails_after_its_wait(sparse_mesh, attach):
    attach(sparse_mesh["a"])  # A waits 3 s for capacity
    started = time.monotonic()
    ref = whereami.options(resources={"quantum": 1}).remote()
    with pytest.raises(lattica.TaskUnschedulableError, match="quantum"):
        lattica.get(ref, timeout=60)
    waited = time.monotonic() - started
    assert 3.0 <= waited < 20, waited
    actor = Accelerated.options(resources={"quantum": 1}).remote()
    with pytest.raises(lattica.ActorDiedError, match="cannot be scheduled.*quantum"):
        lattica.get(actor.where.remote(), timeout=60)


# the sans-I/O directory ---------------------------------------------------------------------

def _view(node_id, **total):
    return NodeView(node_id, dict(total), dict(total))


def test_urgent_lookups_rate_limited_and_back_off_when_dht_is_empty():
    core = CapacityDirectoryCore(min_gap=1.0, refresh_interval=4.0, idle_backoff_max=32.0,
                                 wait_timeout=100.0)
    assert core.wait("t1", {"tpu": 1.0, "CPU": 1.0}, "no tpu", now=0.0)
    assert core.due(0.0) == ["tpu"]
    starts = []
    now = 0.0
    while now < 40.0:
        for resource in core.due(now):
            core.lookup_started(resource, now)
            starts.append(now)
            core.lookup_done(resource, [], now)
        wake = core.next_wakeup(now)
        assert wake is not None and wake > now
        now = min(wake, 40.0) if wake < 40.0 else 40.0
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    # 1 s, doubled per further empty answer, capped at refresh_interval
    assert gaps[:4] == [1.0, 2.0, 4.0, 4.0] and all(g == 4.0 for g in gaps[2:])
    # an answer naming a node resets the gap
    core.lookup_started("tpu", 50.0)
    assert core.lookup_done("tpu", [_view("n1", tpu=1)], 50.0) == [_view("n1", tpu=1)]
    assert not core.lookup_due("tpu", 50.5, urgent=True)
    assert core.lookup_due("tpu", 51.0, urgent=True)


def test_background_refresh_only_for_recent_demand_and_quiet_when_empty():
    core = CapacityDirectoryCore(min_gap=1.0, refresh_interval=5.0, idle_backoff_max=40.0,
                                 interest_window=100.0)
    core.demand("CPU", 0.0)
    starts = []
    now = 0.0
    while True:
        for resource in core.due(now):
            core.lookup_started(resource, now)
            starts.append(now)
            core.lookup_done(resource, [], now)
        wake = core.next_wakeup(now)
        if wake is None:
            break
        now = wake
    # gaps 5, 10, 20, 40 (doubling while empty, at most 40) until the demand is 100 s old
    assert starts == [0.0, 5.0, 15.0, 35.0, 75.0]
    assert core.next_wakeup(200.0) is None


def test_bounds_sample_keys_and_waiting():
    core = CapacityDirectoryCore(max_keys=3, sample_size=4, max_waiting=2, seed=1)
    for i, resource in enumerate(["a", "b", "c", "d"]):
        core.demand(resource, float(i))
    assert list(core.keys) == ["b", "c", "d"]
    core.lookup_started("d", 5.0)
    views = [_view(f"n{i}", d=1) for i in range(10)] + [_view("me", d=1)]
    kept = core.lookup_done("d", views, 5.0, own_node="me")
    assert len(kept) == 4 and all(v.node_id != "me" for v in kept)
    assert core.cached("d", 5.0 + core.ttl) == kept and core.cached("d", 6.0 + core.ttl) == []
    assert core.wait("t1", {"x": 1}, "r", 0.0) and core.wait("t2", {"x": 1}, "r", 0.0)
    assert not core.wait("t3", {"x": 1}, "r", 0.0)


def test_waiting_keeps_its_first_deadline_and_dialing_holds_off():
    core = CapacityDirectoryCore(wait_timeout=10.0, redial_after=20.0)
    assert core.wait("t1", {"tpu": 1}, "no tpu", 0.0)
    assert core.wait("t1", {"tpu": 1}, "still no tpu", 6.0)  # retried: same deadline
    assert core.expired(9.9) == []
    [entry] = core.expired(10.0)
    assert entry.request_id == "t1" and entry.reason == "still no tpu" and core.waiting == {}
    core.hold_off("n1", 0.0)
    assert not core.may_dial("n1", 19.9) and core.may_dial("n1", 20.0)
