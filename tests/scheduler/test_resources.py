"""ResourceLedger: never over-commits, exclusive whole GPUs, shared fractional GPUs, reclaim."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.scheduler.errors import InsufficientResources, ResourceError
from latticaray.scheduler.resources import ResourceLedger, fits, normalize, shortfall


def test_normalize_rejects_bad_amounts():
    with pytest.raises(ResourceError):
        normalize({"CPU": -1})
    with pytest.raises(ResourceError):
        normalize({"CPU": float("nan")})
    with pytest.raises(ResourceError):
        normalize({"GPU": 1.5})
    with pytest.raises(ResourceError):
        normalize({"": 1})
    with pytest.raises(ResourceError):
        normalize({"CPU": "2"})
    assert normalize({"CPU": 0, "GPU": 2, "x": 0.25}) == {"GPU": 2.0, "x": 0.25}


def test_fits_and_shortfall():
    assert fits({"CPU": 4}, {"CPU": 4})
    assert not fits({"CPU": 4}, {"CPU": 4, "GPU": 1})
    assert shortfall({"CPU": 1}, {"CPU": 3, "GPU": 1}) == {"CPU": 2, "GPU": 1}


def test_acquire_release_and_over_commit_refused():
    ledger = ResourceLedger({"CPU": 2, "memory": 1000})
    a = ledger.acquire("t1", {"CPU": 1.5, "memory": 600})
    assert a.resources == {"CPU": 1.5, "memory": 600}
    with pytest.raises(InsufficientResources) as info:
        ledger.acquire("t2", {"CPU": 1, "memory": 100})
    assert "CPU" in str(info.value)
    assert ledger.available == {"CPU": 0.5, "memory": 400}  # nothing taken by the failed acquire
    with pytest.raises(ResourceError):
        ledger.acquire("t1", {"CPU": 0.1})
    ledger.release("t1")
    assert ledger.release("t1") is None
    assert ledger.available == ledger.total


def test_whole_gpus_are_exclusive_and_rendered_for_cuda():
    ledger = ResourceLedger({"CPU": 8}, gpu_ids=[0, 1, 2, 3])
    a = ledger.acquire("a", {"GPU": 2})
    b = ledger.acquire("b", {"GPU": 1})
    assert len(set(a.gpu_ids) | set(b.gpu_ids)) == 3
    assert a.cuda_visible_devices == ",".join(a.gpu_ids)
    assert not ledger.can_fit({"GPU": 2})
    ledger.release("a")
    c = ledger.acquire("c", {"GPU": 2})
    assert not set(c.gpu_ids) & set(b.gpu_ids)


def test_fractional_gpus_share_a_device_and_keep_whole_ones_free():
    ledger = ResourceLedger({"GPU": 2})
    halves = [ledger.acquire(f"h{i}", {"GPU": 0.5}) for i in range(2)]
    assert halves[0].gpu_ids == halves[1].gpu_ids  # best fit packs them on one device
    whole = ledger.acquire("w", {"GPU": 1})
    assert whole.gpu_ids != halves[0].gpu_ids
    assert not ledger.can_fit({"GPU": 0.1})


def test_fragmented_gpus_refuse_a_whole_request():
    ledger = ResourceLedger({"GPU": 2})
    ledger.acquire("a", {"GPU": 0.6})
    ledger.acquire("b", {"GPU": 0.6})  # cannot share a's device: goes to the other one
    assert ledger.available["GPU"] == pytest.approx(0.8)
    assert ledger.missing({"GPU": 0.5}) == {"GPU": 0.5}
    with pytest.raises(InsufficientResources):
        ledger.acquire("c", {"GPU": 0.5})


def test_dead_worker_resources_are_reclaimed():
    ledger = ResourceLedger({"CPU": 4, "GPU": 1})
    ledger.acquire("t1", {"CPU": 1, "GPU": 1}, owner="w1")
    ledger.acquire("t2", {"CPU": 2}, owner="w1")
    ledger.acquire("t3", {"CPU": 1})
    ledger.set_owner("t3", "w2")
    freed = ledger.release_owner("w1")
    assert sorted(a.allocation_id for a in freed) == ["t1", "t2"]
    assert ledger.available == {"CPU": 3, "GPU": 1}
    assert [a.allocation_id for a in ledger.release_owner("w2")] == ["t3"]
    assert ledger.available == ledger.total


ops = st.lists(
    st.tuples(
        st.sampled_from(["acq", "rel", "die"]),
        st.integers(0, 9),
        st.sampled_from([0, 0.25, 0.5, 1, 2]),
        st.sampled_from([0, 0.3, 0.5, 1, 2]),
        st.sampled_from(["w1", "w2", "w3"]),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_ledger_never_over_commits(sequence):
    ledger = ResourceLedger({"CPU": 4, "custom": 2}, gpu_ids=["a", "b", "c"])
    for op, idx, cpu, gpu, owner in sequence:
        tid = f"t{idx}"
        if op == "acq":
            demand = {"CPU": cpu, "GPU": gpu}
            if ledger.allocation(tid) is None and ledger.can_fit(demand):
                ledger.acquire(tid, demand, owner=owner)
            elif ledger.allocation(tid) is None:
                with pytest.raises(InsufficientResources):
                    ledger.acquire(tid, demand, owner=owner)
        elif op == "rel":
            ledger.release(tid)
        else:
            ledger.release_owner(owner)
        allocations = ledger.allocations()
        used_cpu = sum(a.resources.get("CPU", 0) for a in allocations)
        assert used_cpu <= 4 + 1e-9
        assert ledger.available["CPU"] == pytest.approx(4 - used_cpu)
        per_device: dict[str, float] = {}
        whole_owner: dict[str, str] = {}
        for a in allocations:
            for device, share in a.gpu_shares:
                per_device[device] = per_device.get(device, 0) + share
                if a.resources.get("GPU", 0) >= 1:
                    assert device not in whole_owner  # whole devices are exclusive
                    whole_owner[device] = a.allocation_id
        assert all(v <= 10_000 for v in per_device.values())
        for device in whole_owner:
            assert per_device[device] == 10_000
    for a in ledger.allocations():
        ledger.release(a.allocation_id)
    assert ledger.available == ledger.total
