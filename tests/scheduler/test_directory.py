"""CapacityDirectory: when DHT capacity keys are read, what their answers keep, its bounds."""

from __future__ import annotations

from latticaray.scheduler.directory import CapacityDirectory, key_resource
from latticaray.scheduler.policy import NodeView


def view(node):
    return NodeView(node, {"CPU": 1}, {"CPU": 1})


def test_key_is_the_rarest_demanded_resource():
    assert key_resource({"CPU": 1}) == "CPU"
    assert key_resource({"CPU": 1, "GPU": 1}) == "GPU"
    assert key_resource({"CPU": 1, "GPU": 1, "tpu": 2}) == "tpu"
    assert key_resource({"memory": 10}) == "CPU"


def test_urgent_keys_are_read_at_once_then_back_off_while_answers_bring_nothing_new():
    d = CapacityDirectory(min_gap=0.5, refresh_interval=4.0, seed=1)
    assert d.due(0.0, urgent={"GPU"}) == ["GPU"]
    d.started("GPU", 0.0)
    assert d.due(0.1, urgent={"GPU"}) == []  # one lookup in flight per key
    d.done("GPU", [], 0.2)
    assert d.due(0.4, urgent={"GPU"}) == []
    assert d.due(0.6, urgent={"GPU"}) == ["GPU"]  # min_gap after the last lookup
    d.started("GPU", 0.6)
    d.done("GPU", [], 0.7)  # second empty answer: the gap doubles
    assert d.due(1.2, urgent={"GPU"}) == [] and d.due(1.7, urgent={"GPU"}) == ["GPU"]
    d.started("GPU", 1.7)
    d.done("GPU", [view("g1")], 1.8, is_new=lambda v: True)  # something new: back to min_gap
    assert d.due(2.3, urgent={"GPU"}) == ["GPU"]


def test_background_refresh_only_while_demanded_and_never_for_an_idle_node():
    d = CapacityDirectory(refresh_interval=5.0, interest_window=10.0, seed=1)
    assert d.due(0.0) == [] and d.next_wakeup(0.0) is None  # nothing demanded: nothing read
    d.demand("CPU", 0.0)
    assert d.due(0.0) == ["CPU"]
    d.started("CPU", 0.0)
    d.done("CPU", [view("a")], 0.1, is_new=lambda v: True)
    assert d.due(3.0) == [] and d.due(5.1) == ["CPU"]
    d.started("CPU", 5.1)
    d.done("CPU", [view("a")], 5.2, is_new=lambda v: False)
    assert d.due(20.0) == []  # demand is older than the interest window: quiet
    assert d.next_wakeup(20.0) is None


def test_answers_are_sampled_and_cached_and_keys_bounded():
    d = CapacityDirectory(sample_size=3, max_keys=2, ttl=2.0, seed=1)
    d.demand("CPU", 0.0)
    d.started("CPU", 0.0)
    kept = d.done("CPU", [view(f"n{i}") for i in range(10)] + [view("me")], 0.1, own_node="me")
    assert len(kept) == 3 and all(v.node_id != "me" for v in kept)
    assert d.cached("CPU", 1.0) == kept and d.cached("CPU", 3.0) == []
    for resource in ("GPU", "tpu", "npu"):
        d.demand(resource, 1.0)
    assert len(d.keys) == 2 and "CPU" not in d.keys  # least recently demanded dropped
