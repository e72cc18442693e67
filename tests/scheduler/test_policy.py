"""PlacementPolicy: feasibility, locality, load balance, strategies, anti-herding."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.scheduler.policy import (
    DEFAULT,
    SPREAD,
    ClusterSnapshot,
    DecisionKind,
    NodeAffinity,
    NodeView,
    PlacementPolicy,
    PlacementRequest,
    labels_match,
)
from latticaray.scheduler.resources import fits


def node(i, cpu=4, gpu=0, labels=None, avail=None, queued=0, running=0, queue_limit=16, **extra):
    total = {"CPU": cpu, **({"GPU": gpu} if gpu else {}), **extra}
    return NodeView(
        f"n{i}",
        total,
        dict(avail if avail is not None else total),
        labels or {},
        queued=queued,
        running=running,
        queue_limit=queue_limit,
    )


def req(tid="t", submitter="s", **kw):
    kw.setdefault("resources", {"CPU": 1})
    return PlacementRequest(tid, submitter=submitter, **kw)


node_views = st.builds(
    lambda i, cpu, gpu, zone, free_frac, queued: node(
        i,
        cpu=cpu,
        gpu=gpu,
        labels={"zone": zone},
        avail={"CPU": cpu * free_frac, **({"GPU": gpu * free_frac} if gpu else {})},
        queued=queued,
        running=int(cpu * (1 - free_frac)),
    ),
    st.integers(0, 10_000),
    st.sampled_from([0, 1, 2, 8]),
    st.sampled_from([0, 1, 4]),
    st.sampled_from(["a", "b"]),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.integers(0, 20),
)

requests = st.builds(
    lambda cpu, gpu, zone, args, excluded: PlacementRequest(
        "t",
        {"CPU": cpu, "GPU": gpu},
        "s",
        label_selector={"zone": zone} if zone else {},
        args=tuple((f"obj{a}", 1000 * (a + 1)) for a in args),
        excluded=frozenset(excluded),
    ),
    st.sampled_from([0.5, 1, 2, 8, 16]),
    st.sampled_from([0, 0.5, 1, 2]),
    st.sampled_from([None, "a", "b"]),
    st.lists(st.integers(0, 4), max_size=3),
    st.sets(st.sampled_from([f"n{i}" for i in range(20)]), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(node_views, min_size=0, max_size=25, unique_by=lambda n: n.node_id),
    requests,
    st.dictionaries(
        st.integers(0, 4), st.sets(st.sampled_from([f"n{i}" for i in range(30)])), max_size=5
    ),
    st.sampled_from([DEFAULT, SPREAD]),
    st.integers(0, 5),
)
def test_never_places_on_an_infeasible_node(views, request, holders, strategy, seed):
    snapshot = ClusterSnapshot(views)
    for obj, nodes in holders.items():
        snapshot.set_object(f"obj{obj}", 1000 * (obj + 1), nodes)
    request.strategy = strategy
    decision = PlacementPolicy(seed=seed).place(snapshot, request, now=0.0)

    def feasible(v):
        return (
            fits(v.total, request.resources)
            and labels_match(v.labels, request.label_selector)
            and v.node_id not in request.excluded
        )

    if decision.kind is DecisionKind.PLACE:
        assert feasible(snapshot.nodes[decision.node_id])
    elif decision.kind is DecisionKind.INFEASIBLE:
        assert not any(
            fits(v.total, request.resources) and labels_match(v.labels, request.label_selector)
            for v in views
        )
    else:
        assert any(feasible(v) for v in views) or request.excluded


@settings(max_examples=200, deadline=None)
@given(
    st.lists(node_views, min_size=1, max_size=25, unique_by=lambda n: n.node_id), st.integers(0, 3)
)
def test_locality_is_chosen_when_a_holder_has_room(views, seed):
    snapshot = ClusterSnapshot(views)
    request = req(resources={"CPU": 1}, args=(("big", 10**9), ("small", 10)))
    with_room = [v for v in views if fits(v.available, {"CPU": 1})]
    snapshot.set_object("big", 10**9, [v.node_id for v in with_room[:2]])
    snapshot.set_object("small", 10, [v.node_id for v in views])
    decision = PlacementPolicy(seed=seed).place(snapshot, request, now=0.0)
    if with_room:
        assert decision.node_id in {v.node_id for v in with_room[:2]}
        assert decision.local_bytes >= 10**9


def test_infeasible_reason_names_the_constraint():
    snapshot = ClusterSnapshot([node(1, cpu=4, labels={"zone": "a"}), node(2, cpu=2)])
    policy = PlacementPolicy(seed=1)
    d = policy.place(snapshot, req(resources={"CPU": 1, "TPU": 1}), 0.0)
    assert d.kind is DecisionKind.INFEASIBLE and "TPU" in d.reason
    d = policy.place(snapshot, req(label_selector={"zone": "z"}), 0.0)
    assert d.kind is DecisionKind.INFEASIBLE and "zone" in d.reason
    d = policy.place(ClusterSnapshot(), req(), 0.0)
    assert d.kind is DecisionKind.INFEASIBLE and "no live node" in d.reason


def test_custom_resource_and_label_selector_pick_only_matching_nodes():
    views = [node(i) for i in range(10)] + [node(10, accel=1, labels={"zone": "b"})]
    snapshot = ClusterSnapshot(views)
    policy = PlacementPolicy(seed=2)
    for i in range(20):
        d = policy.place(snapshot, req(f"t{i}", resources={"CPU": 1, "accel": 0.05}), 0.0)
        assert d.node_id == "n10"
    assert (
        policy.place(snapshot, req("t21", resources={"CPU": 1, "accel": 0.05}), 0.0).kind
        is DecisionKind.WAIT
    )
    policy = PlacementPolicy(seed=2)
    for i in range(10):
        d = policy.place(snapshot, req(f"u{i}", label_selector={"zone": ["b", "c"]}), 0.0)
        assert d.node_id == "n10"


def test_anti_herding_spreads_a_burst_under_a_stale_snapshot():
    # One node looks idle, the rest look busy; the ads will not refresh during the burst.
    views = [node(0, cpu=8)] + [
        node(i, cpu=8, avail={"CPU": 0}, running=8, queued=0) for i in range(1, 50)
    ]
    snapshot = ClusterSnapshot(views)
    policy = PlacementPolicy(seed=3)
    placed = Counter(
        policy.place(snapshot, req(f"t{i}"), now=0.001 * i).node_id for i in range(400)
    )
    assert placed["n0"] <= 8 + 400 // 40  # took its free slots, then shares the queueing
    assert len(placed) > 20


def test_newer_ad_supersedes_remembered_placements():
    snapshot = ClusterSnapshot([node(0, cpu=2)])
    policy = PlacementPolicy(seed=0, settle_time=0.0)
    policy.place(snapshot, req("a"), now=1.0)
    policy.place(snapshot, req("b"), now=1.0)
    assert policy.pending_count("n0") == 2
    snapshot.update_node(node(0, cpu=2, avail={"CPU": 0}, running=2))
    snapshot.nodes["n0"].ad_time = 2.0
    policy.place(snapshot, req("c"), now=2.5)
    assert policy.pending_count("n0") == 1  # only "c"; a and b are in the new ad
    snapshot.update_node(NodeView("n0", {"CPU": 2}, {"CPU": 2}, ad_time=1.5))  # older: ignored
    assert snapshot.nodes["n0"].ad_time == 2.0


def test_power_of_choices_balances_load_at_saturation():
    views = [
        node(i, cpu=c, avail={"CPU": 0}, running=c, queue_limit=None)
        for i, c in enumerate([1, 2, 4, 8, 16] * 20)
    ]
    snapshot = ClusterSnapshot(views)
    policy = PlacementPolicy(seed=4)
    for i in range(3000):
        d = policy.place(snapshot, req(f"t{i}"), now=0.0)
        assert d.kind is DecisionKind.PLACE
    loads = [(v.running + policy.pending_count(v.node_id)) / v.total["CPU"] for v in views]
    assert max(loads) / (sum(loads) / len(loads)) <= 1.5


def test_wait_when_everything_is_full_and_queues_are_full():
    views = [node(i, avail={"CPU": 0}, running=4, queued=16, queue_limit=16) for i in range(5)]
    d = PlacementPolicy(seed=0).place(ClusterSnapshot(views), req(), 0.0)
    assert d.kind is DecisionKind.WAIT


def test_spread_uses_every_node_before_reusing_one():
    views = [node(i, cpu=16) for i in range(10)]
    snapshot = ClusterSnapshot(views)
    policy = PlacementPolicy(seed=0)
    first = [policy.place(snapshot, req(f"t{i}", strategy=SPREAD), 0.0).node_id for i in range(10)]
    assert sorted(first) == sorted(v.node_id for v in views)


def test_node_affinity_hard_and_soft():
    views = [node(0, cpu=1, avail={"CPU": 0}, running=1, queued=4, queue_limit=4), node(1, cpu=4)]
    snapshot = ClusterSnapshot(views)
    policy = PlacementPolicy(seed=0)
    assert policy.place(snapshot, req("a", strategy=NodeAffinity("n1")), 0.0).node_id == "n1"
    assert (
        policy.place(snapshot, req("b", strategy=NodeAffinity("n0")), 0.0).kind is DecisionKind.WAIT
    )
    assert (
        policy.place(snapshot, req("c", strategy=NodeAffinity("n0", soft=True)), 0.0).node_id
        == "n1"
    )
    d = policy.place(snapshot, req("d", strategy=NodeAffinity("gone")), 0.0)
    assert d.kind is DecisionKind.INFEASIBLE and "gone" in d.reason
    assert (
        policy.place(snapshot, req("e", strategy=NodeAffinity("gone", soft=True)), 0.0).node_id
        == "n1"
    )


def test_local_only_places_on_the_local_node_or_nowhere():
    snapshot = ClusterSnapshot([node(0), node(1)], local_node="n1")
    policy = PlacementPolicy(seed=0)
    assert all(
        policy.place(snapshot, req(f"t{i}", local_only=True), 0.0).node_id == "n1" for i in range(3)
    )
    d = policy.place(snapshot, req("big", resources={"CPU": 64}, local_only=True), 0.0)
    assert d.kind is DecisionKind.INFEASIBLE


def test_feasibility_cache_follows_membership_changes():
    snapshot = ClusterSnapshot([node(0)])
    policy = PlacementPolicy(seed=0)
    assert (
        policy.place(snapshot, req("a", resources={"GPU": 1}), 0.0).kind is DecisionKind.INFEASIBLE
    )
    snapshot.update_node(node(1, gpu=1))
    assert policy.place(snapshot, req("b", resources={"GPU": 1}), 0.0).node_id == "n1"
    snapshot.remove_node("n1")
    assert (
        policy.place(snapshot, req("c", resources={"GPU": 1}), 0.0).kind is DecisionKind.INFEASIBLE
    )
