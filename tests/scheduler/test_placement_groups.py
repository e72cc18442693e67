"""Placement groups: planning per strategy, the two-phase claim, leases, removal, owner death."""

from __future__ import annotations

import pytest
from sched_harness import Mesh

from latticaray.scheduler.placement_groups import (
    GROUP_TRANSITIONS,
    PACK,
    SPREAD,
    STRICT_PACK,
    STRICT_SPREAD,
    AbortBundle,
    BundleReply,
    BundleReservations,
    CommitBundle,
    GroupCoordinator,
    GroupCreated,
    GroupEvent,
    GroupState,
    IllegalGroupTransition,
    PlacementGroupError,
    PrepareBundle,
    ReleaseGroup,
    plan_bundles,
    validate_bundles,
)
from latticaray.scheduler.placement_groups import group_transition as transition
from latticaray.scheduler.policy import ClusterSnapshot, NodeView, PlacementRequest
from latticaray.scheduler.resources import ResourceLedger


def snap(**cpus):
    return ClusterSnapshot(
        NodeView(n, {"CPU": c, "GPU": 2}, {"CPU": c, "GPU": 2}) for n, c in cpus.items()
    )


def test_validation_refuses_bad_groups():
    with pytest.raises(PlacementGroupError, match="strategy"):
        validate_bundles([{"CPU": 1}], "PAKC")
    with pytest.raises(PlacementGroupError, match="non-empty"):
        validate_bundles([], PACK)
    with pytest.raises(PlacementGroupError, match="reserves nothing"):
        validate_bundles([{"CPU": 0}], PACK)
    with pytest.raises(PlacementGroupError, match="bundle 1"):
        validate_bundles([{"CPU": 1}, {"CPU": -1}], PACK)


def test_plans_per_strategy():
    s = snap(a=4, b=4, c=4)
    plan, _ = plan_bundles(s, [{"CPU": 1}] * 3, PACK)
    assert len(set(plan.values())) == 1
    plan, _ = plan_bundles(s, [{"CPU": 3}] * 3, PACK)  # cannot share one node: 3 nodes
    assert len(set(plan.values())) == 3
    plan, why = plan_bundles(s, [{"CPU": 3}] * 2, STRICT_PACK)
    assert plan is None and "STRICT_PACK" in why
    plan, _ = plan_bundles(s, [{"CPU": 1}] * 3, SPREAD)
    assert len(set(plan.values())) == 3
    plan, _ = plan_bundles(s, [{"CPU": 1}] * 5, SPREAD)  # more bundles than nodes: reuse
    assert len(set(plan.values())) == 3
    plan, why = plan_bundles(s, [{"CPU": 1}] * 4, STRICT_SPREAD)
    assert plan is None and "STRICT_SPREAD" in why
    plan, _ = plan_bundles(s, [{"GPU": 1}] * 3, STRICT_SPREAD)
    assert sorted(plan.values()) == ["a", "b", "c"]


def test_transition_table_is_the_whole_truth():
    assert transition(GroupState.PENDING, GroupEvent.PLAN) is GroupState.PREPARING
    with pytest.raises(IllegalGroupTransition):
        transition(GroupState.REMOVED, GroupEvent.PLAN)
    assert GROUP_TRANSITIONS[GroupState.REMOVED] == {}


def test_two_phase_claim_commits_only_when_every_bundle_is_prepared():
    g = GroupCoordinator("g", [{"CPU": 2}, {"CPU": 2}], STRICT_SPREAD, "owner")
    actions = g.poll(snap(a=4, b=4), 0.0)
    prepares = [a for a in actions if isinstance(a, PrepareBundle)]
    assert sorted(p.node_id for p in prepares) == ["a", "b"]
    first = prepares[0]
    assert g.on_reply(BundleReply("g", first.index, first.attempt, True), 0.1) == []
    assert g.state is GroupState.PREPARING
    second = prepares[1]
    actions = g.on_reply(BundleReply("g", second.index, second.attempt, True), 0.2)
    assert [type(a) for a in actions] == [CommitBundle, CommitBundle, GroupCreated]
    assert g.state is GroupState.CREATED


def test_a_refusal_aborts_the_round_and_plans_again_without_that_node():
    g = GroupCoordinator("g", [{"CPU": 2}, {"CPU": 2}], SPREAD, "owner", retry_interval=1.0)
    s = snap(a=4, b=4, c=4)
    prepares = [a for a in g.poll(s, 0.0) if isinstance(a, PrepareBundle)]
    refused = prepares[0]
    actions = g.on_reply(BundleReply("g", refused.index, refused.attempt, False, "busy"), 0.1)
    assert sorted(a.node_id for a in actions if isinstance(a, AbortBundle)) == sorted(
        p.node_id for p in prepares
    )
    assert g.state is GroupState.PENDING
    assert g.poll(s, 0.5) == []  # backing off
    again = [a for a in g.poll(s, 1.2) if isinstance(a, PrepareBundle)]
    assert refused.node_id not in {p.node_id for p in again}
    assert all(p.attempt == refused.attempt + 1 for p in again)
    # a late answer of the old round changes nothing
    assert g.on_reply(BundleReply("g", refused.index, refused.attempt, True), 1.3) == []


def test_unanswered_prepare_times_out():
    g = GroupCoordinator("g", [{"CPU": 1}], PACK, "owner", prepare_timeout=2.0)
    g.poll(snap(a=4), 0.0)
    actions = g.poll(snap(a=4), 2.5)
    assert [type(a) for a in actions] == [AbortBundle]
    assert "no answer" in g.reason


def test_reservations_expire_unless_committed():
    ledger = ResourceLedger({"CPU": 4})
    r = BundleReservations(ledger)
    assert r.prepare("g", 0, {"CPU": 3}, "owner", 1, lease=5.0, now=0.0)[0]
    assert ledger.available["CPU"] == 1.0
    ok, why = r.prepare("h", 0, {"CPU": 3}, "owner", 1, lease=5.0, now=0.0)
    assert not ok and "short" in why
    assert r.expire(4.0) == [] and len(r.expire(5.0)) == 1
    assert ledger.available["CPU"] == 4.0
    assert r.commit("g", 0, 1)[0] is False  # expired: the commit is refused
    assert r.prepare("g", 0, {"CPU": 3}, "owner", 2, lease=5.0, now=6.0)[0]
    assert r.commit("g", 0, 2)[0]
    assert r.expire(100.0) == []
    assert r.ledger_for("g", 0).total == {"CPU": 3.0}


def mesh4(**kw):
    mesh = Mesh()
    owner = mesh.add("O", {"CPU": 0.5})
    for n in ("N1", "N2", "N3", "N4"):
        mesh.add(n, {"CPU": 4, "GPU": 2}, gpu_ids=["0", "1"], **kw)
        mesh.step("O", owner.add_neighbour(n, 0.0))
    return mesh, owner


@pytest.mark.parametrize(
    "strategy,bundles,nodes",
    [
        (PACK, [{"CPU": 1}] * 4, 1),
        (STRICT_PACK, [{"CPU": 2}] * 2, 1),
        (SPREAD, [{"CPU": 1}] * 4, 4),
        (STRICT_SPREAD, [{"CPU": 1, "GPU": 1}] * 4, 4),
    ],
)
def test_each_strategy_over_four_nodes(strategy, bundles, nodes):
    mesh, owner = mesh4()
    mesh.step("O", owner.create_group("g", bundles, strategy, 0.0))
    placed = mesh.out["O"].created["g"]
    assert len(set(placed)) == nodes
    held = sum(len(mesh.cores[n].local.bundles) for n in mesh.cores)
    assert held == len(bundles)
    # tasks of bundle 0 run on its node, in its reservation
    mesh.step("O", owner.submit(PlacementRequest("t", {"CPU": 1}, "O", bundle=("g", 0)), 0.1))
    assert mesh.out["O"].placed["t"] == placed[0]
    alloc = mesh.out[placed[0]].started["t"]
    assert alloc.allocation_id == "t"
    # remove: every reservation is released, the task in it ends
    mesh.step("O", owner.remove_group("g", 0.2))
    assert sum(len(mesh.cores[n].local.bundles) for n in mesh.cores) == 0
    ended = [e for n in mesh.cores for e in mesh.out[n].ended]
    assert ended and ended[0].running == ("t",)
    for n in ("N1", "N2", "N3", "N4"):
        assert mesh.cores[n].local.ledger.available == {"CPU": 4.0, "GPU": 2.0}


def test_infeasible_group_pends_then_is_placed_when_a_node_joins():
    mesh, owner = mesh4()
    mesh.step("O", owner.create_group("big", [{"CPU": 1}] * 5, STRICT_SPREAD, 0.0))
    assert "big" not in mesh.out["O"].created and mesh.out["O"].pending
    # a task for the pending group waits for it
    mesh.step("O", owner.submit(PlacementRequest("t", {"CPU": 1}, "O", bundle=("big", 4)), 0.0))
    assert "t" not in mesh.out["O"].placed
    mesh.add("N5", {"CPU": 4})
    mesh.now = 1.0
    mesh.step("O", owner.add_neighbour("N5", 1.0, kind="found"))
    mesh.poll("O")
    assert len(set(mesh.out["O"].created["big"])) == 5
    assert mesh.out["O"].placed["t"] == mesh.out["O"].created["big"][4]


def test_bundles_are_released_when_their_owner_dies():
    mesh, owner = mesh4()
    mesh.step("O", owner.create_group("g", [{"CPU": 2}] * 4, SPREAD, 0.0))
    assert all(len(mesh.cores[n].local.bundles) == 1 for n in ("N1", "N2", "N3", "N4"))
    mesh.kill("O")
    for n in ("N1", "N2", "N3", "N4"):
        assert len(mesh.cores[n].local.bundles) == 0
        assert mesh.cores[n].local.ledger.available["CPU"] == 4.0


def test_a_dead_bundle_node_is_replaced():
    mesh, owner = mesh4()
    mesh.add("N5", {"CPU": 4})
    mesh.step("O", owner.add_neighbour("N5", 0.0, kind="found"))
    mesh.step("O", owner.create_group("g", [{"CPU": 3}] * 4, STRICT_SPREAD, 0.0))
    first = mesh.out["O"].created["g"]
    victim = first[2]
    mesh.kill(victim)
    mesh.now = 1.0
    mesh.poll("O")
    again = mesh.out["O"].created["g"]
    assert victim not in again and len(set(again)) == 4
    assert [a for a, b in zip(first, again, strict=True) if a != b] == [victim]


def test_gpu_bundle_hands_its_own_devices_to_tasks():
    mesh, owner = mesh4()
    mesh.step("O", owner.create_group("g", [{"CPU": 1, "GPU": 1}], PACK, 0.0))
    node = mesh.out["O"].created["g"][0]
    held = mesh.cores[node].local.bundles.describe()[0]["gpu_shares"]
    req = PlacementRequest("t", {"CPU": 1, "GPU": 0.5}, "O", bundle=("g", -1))
    mesh.step("O", owner.submit(req, 0.1))
    alloc = mesh.out[node].started["t"]
    assert alloc.gpu_ids == [held[0][0]]
    # the bundle has half a GPU left: a second half fits, a third does not (it queues)
    mesh.step("O", owner.submit(PlacementRequest("u", {"GPU": 0.5}, "O", bundle=("g", 0)), 0.2))
    assert mesh.out[node].started["u"].gpu_ids == [held[0][0]]
    mesh.step("O", owner.submit(PlacementRequest("v", {"GPU": 0.5}, "O", bundle=("g", 0)), 0.3))
    assert "v" not in mesh.out[node].started and mesh.cores[node].local.queued == 1
    mesh.finish(node, "t")
    assert mesh.out[node].started["v"].gpu_ids == [held[0][0]]


def test_task_for_a_missing_bundle_index_fails():
    mesh, owner = mesh4()
    mesh.step("O", owner.create_group("g", [{"CPU": 1}], PACK, 0.0))
    mesh.step("O", owner.submit(PlacementRequest("t", {"CPU": 1}, "O", bundle=("g", 3)), 0.1))
    assert "no bundle 3" in str(mesh.out["O"].failed["t"])
    mesh.step("O", owner.submit(PlacementRequest("u", {"CPU": 1}, "O", bundle=("zz", 0)), 0.1))
    assert "unknown or removed" in str(mesh.out["O"].failed["u"])


def test_release_group_action_reaches_only_its_nodes():
    g = GroupCoordinator("g", [{"CPU": 1}] * 2, STRICT_SPREAD, "owner")
    for p in [a for a in g.poll(snap(a=2, b=2, c=2), 0.0) if isinstance(a, PrepareBundle)]:
        g.on_reply(BundleReply("g", p.index, p.attempt, True), 0.1)
    releases = g.remove()
    assert all(isinstance(r, ReleaseGroup) for r in releases)
    assert sorted(r.node_id for r in releases) == sorted(set(g.nodes.values()))
    assert g.remove() == []
