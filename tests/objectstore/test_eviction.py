"""The eviction planner: least recently used first, pins never, spill while the spill budget holds."""

from latticaray.objectstore.eviction import Budget, Entry, Evict, plan_eviction


def _budget(capacity=100, committed=100, spill_capacity=0, spill_used=0) -> Budget:
    return Budget(capacity, committed, spill_capacity, spill_used)


def test_nothing_to_do_when_the_need_fits():
    plan = plan_eviction([Entry("a", 10, 1)], [], 10, _budget(committed=90))
    assert plan.steps == () and plan.fits


def test_least_recently_used_first_and_only_as_much_as_needed():
    resident = [Entry("new", 30, 3), Entry("old", 30, 1), Entry("mid", 30, 2)]
    plan = plan_eviction(resident, [], 50, _budget(committed=90))
    assert [s.name for s in plan.steps] == ["old", "mid"]
    assert plan.fits and not any(s.spill for s in plan.steps)


def test_pinned_objects_are_never_evicted_and_a_need_beside_them_does_not_fit():
    resident = [Entry("pinned", 60, 1, pinned=True), Entry("free", 30, 2)]
    plan = plan_eviction(resident, [], 50, _budget(committed=90))
    assert [s.name for s in plan.steps] == ["free"]
    assert not plan.fits


def test_spilled_while_the_spill_budget_holds_then_dropped():
    resident = [Entry("a", 40, 1), Entry("b", 40, 2), Entry("c", 40, 3)]
    plan = plan_eviction(resident, [], 100, _budget(capacity=120, committed=120, spill_capacity=50))
    # a spills; b would need a's spill room, so a's spilled copy goes (least recently used)
    assert plan.steps[0] == Evict("a", 40, spill=True)
    assert plan.steps[1].name == "b" and plan.steps[1].spill
    assert [e.name for e in plan.steps[1].drop_spilled] == ["a"]
    assert plan.steps[2].name == "c" and plan.steps[2].spill
    assert plan.fits


def test_objects_larger_than_the_spill_capacity_are_dropped_without_touching_the_spill():
    spilled = [Entry("s", 10, 0)]
    plan = plan_eviction(
        [Entry("big", 80, 1)], spilled, 50, _budget(spill_capacity=60, spill_used=10)
    )
    assert plan.steps == (Evict("big", 80, spill=False),) and plan.fits


def test_the_object_being_restored_and_pinned_spills_are_kept():
    spilled = [Entry("keep", 20, 0), Entry("pinned", 20, 0, pinned=True), Entry("other", 20, 5)]
    plan = plan_eviction(
        [Entry("a", 30, 1)],
        spilled,
        30,
        _budget(capacity=100, committed=100, spill_capacity=70, spill_used=60),
        keep="keep",
    )
    (step,) = plan.steps
    assert [e.name for e in step.drop_spilled] == ["other"] and step.spill


def test_a_local_object_is_marked_to_be_linked_first():
    plan = plan_eviction([Entry("L" + "0" * 32, 30, 1, local=True)], [], 30, _budget())
    assert plan.steps[0].link_first and plan.fits


def test_ties_in_last_use_are_broken_by_name():
    resident = [Entry("b", 10, 1), Entry("a", 10, 1)]
    plan = plan_eviction(resident, [], 10, _budget())
    assert [s.name for s in plan.steps] == ["a"]
