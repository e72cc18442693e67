"""SchedulerCore: the one placement path of a node (submitter, executor, neighbourhood, DHT ads)."""

from __future__ import annotations

import pytest
from sched_harness import Mesh

from latticaray.scheduler.core import (
    LookupCapacity,
    SchedulerConfig,
    SchedulerCore,
    StartLocal,
    Unsubscribe,
)
from latticaray.scheduler.errors import QueueFull, UnschedulableError
from latticaray.scheduler.policy import NodeAffinity, PlacementRequest
from latticaray.scheduler.resources import ResourceLedger
from latticaray.scheduler.submitter import Placed, SendPlacement


def req(tid, res=None, owner="", **kw):
    return PlacementRequest(tid, res or {"CPU": 1}, "A", owner=owner, **kw)


def test_alone_starts_queues_then_waits_fifo_and_drains_on_finish():
    core = SchedulerCore("A", ResourceLedger({"CPU": 2}))
    started = []
    for i in range(6):
        for action in core.submit(req(f"t{i}"), 0.0):
            if isinstance(action, StartLocal):
                started.append(action.request.task_id)
    # two run, two queue at the node (one per CPU), two wait at the submitter
    assert started == ["t0", "t1"]
    assert core.local.queued == 2 and core.submitter.waiting == 2
    order = []
    for done in ["t0", "t1", "t2", "t3", "t4", "t5"]:
        for action in core.finish(done, 1.0):
            assert isinstance(action, StartLocal | Placed)
            if isinstance(action, StartLocal):
                order.append(action.request.task_id)
    assert order == ["t2", "t3", "t4", "t5"]
    assert core.local.running == 0 and core.submitter.waiting == 0


def test_waiting_requests_are_served_round_robin_over_owners():
    core = SchedulerCore("A", ResourceLedger({"CPU": 1}), config=SchedulerConfig(queue_limit=1))
    core.submit(req("x0", owner="busy"), 0.0)  # runs
    core.submit(req("x1", owner="busy"), 0.0)  # queued at the node
    for i in range(2, 50):
        core.submit(req(f"x{i}", owner="busy"), 0.0)
    core.submit(req("y0", owner="polite"), 0.0)
    order = []
    running = "x0"
    for _ in range(5):
        for action in core.finish(running, 1.0):
            if isinstance(action, StartLocal):
                order.append(action.request.task_id)
                running = action.request.task_id
    # the second owner's only request is served right after the request queued at the node
    assert order[:3] == ["x1", "x2", "y0"]


def test_per_owner_bound_is_backpressure():
    core = SchedulerCore(
        "A",
        ResourceLedger({"CPU": 1}),
        config=SchedulerConfig(queue_limit=1, per_owner_waiting=3),
    )
    for i in range(5):
        core.submit(req(f"t{i}", owner="o"), 0.0)
    with pytest.raises(QueueFull):
        core.submit(req("t5", owner="o"), 0.0)
    core.submit(req("u0", owner="other"), 0.0)  # another owner still gets in


def test_infeasible_alone_reads_capacity_then_fails_after_capacity_wait():
    core = SchedulerCore("A", ResourceLedger({"CPU": 2}), config=SchedulerConfig(capacity_wait=3))
    actions = core.submit(req("g", {"CPU": 1, "GPU": 1}), 0.0)
    assert any("infeasible" in getattr(a, "message", "") for a in actions)
    actions = core.poll(0.0)
    assert LookupCapacity("GPU") in actions
    assert core.on_capacity("GPU", [], 0.1) == []
    actions = core.poll(3.5)
    failed = [a for a in actions if type(a).__name__ == "PlacementFailed"]
    assert len(failed) == 1 and isinstance(failed[0].error, UnschedulableError)
    assert "GPU" in str(failed[0].error)


def test_capacity_ad_names_a_node_and_the_waiting_request_goes_there():
    mesh = Mesh(SchedulerConfig(capacity_wait=30))
    a = mesh.add("A", {"CPU": 2})
    mesh.step("A", a.submit(req("g", {"CPU": 1, "GPU": 1}), 0.0))
    assert "g" not in mesh.out["A"].placed
    mesh.add("G", {"CPU": 4, "GPU": 2}, gpu_ids=["3", "5"])  # joins later
    mesh.now = 1.0
    mesh.poll("A")  # urgent lookup of capacity/GPU
    assert mesh.lookups >= 1
    assert mesh.out["A"].placed == {"g": "G"}
    assert mesh.out["G"].started["g"].cuda_visible_devices == "3"
    assert "G" in a.snapshot.nodes and "G" not in a.neighbours()  # used once: known
    mesh.step("A", a.submit(req("g2", {"CPU": 1, "GPU": 1}), 1.0))
    assert mesh.out["A"].placed["g2"] == "G"
    assert "G" in a.neighbours() and "A" in mesh.subs["G"]  # used again: a neighbour


def test_neighbourhood_is_bounded_and_evicts_least_recently_used():
    mesh = Mesh(SchedulerConfig(neighbours=4, pinned=1, queue_limit=1))
    a = mesh.add("A", {"CPU": 0.5})  # cannot run CPU:1 tasks itself
    for i in range(10):
        mesh.add(f"N{i}", {"CPU": 1})
    mesh.step("A", a.add_neighbour("N0", 0.0))  # bootstrap: pinned
    for i in range(20):  # none ends: each node takes two (one runs, one queues)
        mesh.now = float(i)
        mesh.step("A", a.submit(req(f"t{i}"), mesh.now))
        mesh.poll("A")  # work waits and the known nodes are full: capacity ads are read
    assert len(mesh.out["A"].placed) == 20
    assert len(set(mesh.out["A"].placed.values())) == 10  # it used more nodes than it keeps
    assert mesh.lookups >= 1
    assert len(a.neighbours()) == 4 and "N0" in a.neighbours()
    subscribed = [n for n, subs in mesh.subs.items() if "A" in subs]
    assert sorted(subscribed) == sorted(a.neighbours())


def test_locality_prefers_the_holder_of_a_large_argument():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 4})
    for n in "BCD":
        mesh.add(n, {"CPU": 16})
        mesh.step("A", a.add_neighbour(n, 0.0))
    for i in range(30):
        mesh.now = i * 0.1
        holder = "BCD"[i % 3]
        a.note_object(f"cid{i}", 100 << 20, [holder])
        mesh.step("A", a.submit(req(f"t{i}", args=((f"cid{i}", 100 << 20),)), mesh.now))
        if i % 2:  # half of them end at once; the holders' pushed views say so
            for node, started in mesh.out.items():
                if f"t{i}" in started.started:
                    mesh.finish(node, f"t{i}")
        mesh.push_views()
    placed = mesh.out["A"].placed
    assert all(placed[f"t{i}"] == "BCD"[i % 3] for i in range(30)), placed


def test_work_on_data_no_known_node_holds_goes_straight_to_its_holder():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 1})
    mesh.add("B", {"CPU": 4})
    mesh.add("H", {"CPU": 4})
    mesh.step("A", a.add_neighbour("B", 0.0))
    a.note_object("big", 50 << 20, ["H"])
    actions = a.submit(req("t", args=(("big", 50 << 20),)), 0.0)
    assert [(type(x), x.node_id) for x in actions] == [(SendPlacement, "H")]
    mesh.step("A", actions)
    assert mesh.out["A"].placed == {"t": "H"}
    assert "H" in a.snapshot.nodes  # its answer's view is kept (not a neighbour yet)
    assert "H" not in a.neighbours()


def test_a_busy_unknown_holder_spills_over_when_not_worth_waiting_for():
    mesh = Mesh(SchedulerConfig(locality_wait_free=0.0))
    a = mesh.add("A", {"CPU": 0.5})
    mesh.add("B", {"CPU": 4})
    h = mesh.add("H", {"CPU": 1})
    h.offer(PlacementRequest("x", {"CPU": 1}, "Z"), 0.0)
    h.offer(PlacementRequest("y", {"CPU": 1}, "Z"), 0.0)  # H full, queue full
    mesh.step("A", a.add_neighbour("B", 0.0))
    a.note_object("big", 50 << 20, ["H"])
    mesh.step("A", a.submit(req("t", args=(("big", 50 << 20),)), 0.0))
    assert mesh.out["A"].placed == {"t": "B"} and a.submitter.rejections == 1


def test_work_waits_for_the_busy_holder_of_its_data_and_goes_there_when_it_has_room():
    mesh = Mesh()  # locality_wait_free: 5 s by default
    a = mesh.add("A", {"CPU": 0.5})
    mesh.add("B", {"CPU": 4})
    h = mesh.add("H", {"CPU": 1})
    h.offer(PlacementRequest("x", {"CPU": 1}, "Z"), 0.0)
    h.offer(PlacementRequest("y", {"CPU": 1}, "Z"), 0.0)  # H full, queue full
    mesh.step("A", a.add_neighbour("B", 0.0))
    a.note_object("big", 50 << 20, ["H"])
    mesh.step("A", a.submit(req("t", args=(("big", 50 << 20),)), 0.0))
    assert mesh.out["A"].placed == {} and a.submitter.waiting == 1  # B is free, but not H
    mesh.now = 1.0
    mesh.step("H", h.finish("x", 1.0))  # y starts, H's queue has room again
    mesh.step("A", a.on_view(mesh.view("H"), 1.0))  # its push (a watch of the refusal)
    assert mesh.out["A"].placed == {"t": "H"}


def _view(node, cpus, queued=0, running=0):
    from latticaray.scheduler.policy import NodeView

    return NodeView(
        node,
        {"CPU": cpus},
        {"CPU": cpus - running},
        queued=queued,
        running=running,
        queue_limit=cpus,
    )


def test_stale_view_spills_back_to_another_node():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 0.5})
    b = mesh.add("B", {"CPU": 1})
    mesh.add("C", {"CPU": 1})
    # B is busy (one running, one queued) but A's view of it says idle
    b.offer(PlacementRequest("x", {"CPU": 1}, "Z"), 0.0)
    b.offer(PlacementRequest("y", {"CPU": 1}, "Z"), 0.0)
    a.on_view(_view("B", 1), 0.0)
    a.on_view(_view("C", 1, running=1), 0.0)
    mesh.step("A", a.submit(req("t"), 0.0))
    assert mesh.out["A"].placed["t"] == "C"
    assert a.submitter.rejections == 1


def test_hard_affinity_to_a_node_never_met_is_sent_directly():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 1})
    mesh.add("Far", {"CPU": 1})
    actions = a.submit(req("t", strategy=NodeAffinity("Far")), 0.0)
    assert [type(x) for x in actions] == [SendPlacement]
    mesh.step("A", actions)
    assert mesh.out["A"].placed == {"t": "Far"}


def test_hard_affinity_to_an_unreachable_node_fails_at_once():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 1})
    mesh.step("A", a.submit(req("t", strategy=NodeAffinity("Nobody")), 0.0))
    err = mesh.out["A"].failed["t"]
    assert isinstance(err, UnschedulableError) and "not reachable" in str(err)


def test_node_gone_unsubscribes_and_forgets_it():
    mesh = Mesh()
    a = mesh.add("A", {"CPU": 1})
    mesh.add("B", {"CPU": 1})
    mesh.step("A", a.add_neighbour("B", 0.0))
    actions = a.node_gone("B", 1.0)
    assert Unsubscribe("B") in actions
    assert "B" not in a.snapshot.nodes and "B" not in a.neighbours()


def test_executor_queue_is_bounded_per_submitter_and_fair():
    core = SchedulerCore(
        "E",
        ResourceLedger({"CPU": 1}),
        config=SchedulerConfig(queue_limit=4, per_submitter_queue=2),
    )
    kinds = []
    for i in range(4):
        kinds.append(core.offer(PlacementRequest(f"p{i}", {"CPU": 1}, "P"), 0.0).kind.value)
    assert kinds == ["started", "queued", "queued", "rejected"]
    reject = core.offer(PlacementRequest("q0", {"CPU": 1}, "P"), 0.0)
    assert reject.hint is not None and reject.hint.queued == 2
    assert core.offer(PlacementRequest("r0", {"CPU": 1}, "Q"), 0.0).kind.value == "queued"
    order = []
    running = "p0"
    for _ in range(3):
        for action in core.finish(running, 1.0):
            order.append(action.request.task_id)
            running = action.request.task_id
    assert order == ["p1", "r0", "p2"]


def test_lend_runs_other_work_while_a_task_blocks():
    core = SchedulerCore("A", ResourceLedger({"CPU": 1}))
    core.submit(req("parent"), 0.0)
    core.submit(req("child"), 0.0)  # queued behind the parent
    actions = core.lend("parent", 0.1)
    assert [a.request.task_id for a in actions if isinstance(a, StartLocal)] == ["child"]
    assert core.finish("parent", 0.2) == []  # its resources were lent: nothing double-freed
    assert core.local.ledger.available["CPU"] == 0.0
    core.finish("child", 0.3)
    assert core.local.ledger.available["CPU"] == 1.0


def test_a_deferred_decision_is_found_when_capacity_appears_or_expires():
    from latticaray.scheduler.core import CapacityExpired, CapacityFound

    core = SchedulerCore("A", ResourceLedger({"CPU": 1}), config=SchedulerConfig(capacity_wait=5))
    request = req("actor-1", {"CPU": 1, "GPU": 1})
    assert core.decide(request, 0.0).kind.value == "infeasible"
    assert core.defer(request, "no GPU known", 0.0) == []
    assert LookupCapacity("GPU") in core.poll(0.0)
    gpu = _view("G", 4)
    gpu.total["GPU"] = gpu.available["GPU"] = 1.0
    assert core.on_capacity("GPU", [gpu], 0.5) == [CapacityFound("actor-1")]
    assert core.decide(request, 0.6).node_id == "G"
    other = req("actor-2", {"CPU": 1, "TPU": 1})
    core.defer(other, "no TPU known", 1.0)
    expired = [a for a in core.poll(6.5) if isinstance(a, CapacityExpired)]
    assert [a.key for a in expired] == ["actor-2"] and "TPU" in str(expired[0].error)


def test_candidates_from_the_cluster_state_seed_a_small_snapshot_only():
    core = SchedulerCore("A", ResourceLedger({"CPU": 1}), config=SchedulerConfig(seed_candidates=3))
    core.on_candidates([_view(f"M{i}", 2) for i in range(10)], 0.0)
    assert len(core.snapshot.nodes) == 3  # A itself and two members


def test_a_view_made_before_the_one_held_is_ignored_whenever_it_arrives():
    from latticaray.scheduler.policy import NodeView

    core = SchedulerCore("A", ResourceLedger({"CPU": 1}))
    idle = NodeView("B", {"CPU": 2}, {"CPU": 2}, ad_time=5.0, seq=9)
    busy_but_older = NodeView("B", {"CPU": 2}, {}, running=2, ad_time=6.0, seq=7)
    core.on_view(idle, 5.0)
    core.on_view(busy_but_older, 6.0)  # an answer that left B before its idle view
    assert core.snapshot.nodes["B"].available == {"CPU": 2}
