"""Capacity ads: wire round trip, validation of untrusted ads, publish timing, snapshot builders."""

import asyncio

import msgpack
import pytest

from latticaray.scheduler.advertiser import (
    MAX_AD_BYTES,
    AdvertiserCore,
    CandidateSampler,
    CapacityAd,
    CapacityAdvertiser,
    build_snapshot,
    capacity_key,
    view_from_ad,
    views_from_dht,
)
from latticaray.scheduler.errors import InvalidCapacityAd
from latticaray.scheduler.local import LocalScheduler
from latticaray.scheduler.policy import PlacementPolicy, PlacementRequest
from latticaray.scheduler.resources import ResourceLedger


def ad(node="12D3KooWnode", **kw):
    base = {
        "seq": 1,
        "time": 100.0,
        "total": {"CPU": 8, "GPU": 2, "accel": 1},
        "available": {"CPU": 3, "GPU": 1},
        "labels": {"zone": "eu"},
        "queued": 2,
        "running": 5,
        "queue_limit": 16,
        "store_free": 1 << 30,
    }
    base.update(kw)
    return CapacityAd(node, **base)


def test_round_trip_and_publisher_binding():
    data = ad().encode()
    assert CapacityAd.decode(data) == ad()
    assert CapacityAd.decode(data, publisher="12D3KooWnode") == ad()
    with pytest.raises(InvalidCapacityAd, match="published by"):
        CapacityAd.decode(data, publisher="12D3KooWother")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.update(v=2), "v=1"),
        (lambda m: m.pop("node"), "node"),
        (lambda m: m.update(queued=-1), "queued"),
        (lambda m: m.update(time=float("inf")), "time"),
        (lambda m: m.update(total={"CPU": -4}), "resources"),
        (lambda m: m.update(labels={"k": 5}), "labels"),
        (lambda m: m.update(total={f"r{i}": 1 for i in range(100)}), "max_map_len"),
    ],
)
def test_malformed_ads_are_refused_with_a_clear_error(mutate, message):
    obj = msgpack.unpackb(ad().encode(), raw=False)
    mutate(obj)
    with pytest.raises(InvalidCapacityAd, match=message):
        CapacityAd.decode(msgpack.packb(obj, use_bin_type=True))


def test_garbage_and_oversize_are_refused():
    with pytest.raises(InvalidCapacityAd):
        CapacityAd.decode(b"\xc1\xff\x00")
    with pytest.raises(InvalidCapacityAd):
        CapacityAd.decode(b"\x00" * (MAX_AD_BYTES + 1))
    with pytest.raises(InvalidCapacityAd):
        ad(labels={f"k{i}": "v" * 200 for i in range(60)}).encode()


def test_core_publishes_on_change_rate_limited_and_on_refresh():
    local = LocalScheduler("n1", ResourceLedger({"CPU": 2, "GPU": 1, "accel": 1}))
    core = AdvertiserCore("n1", ttl=15.0, refresh_interval=5.0, min_interval=0.5)
    first = core.poll(0.0, local.version, local.view(0.0))
    assert first is not None and first.expiration == 15.0
    assert set(first.keys) == {capacity_key("CPU"), capacity_key("GPU"), capacity_key("accel")}
    assert core.poll(1.0, local.version, local.view(1.0)) is None  # nothing changed, not due
    local.offer(PlacementRequest("t", {"CPU": 1}, "s"), 1.0)
    assert core.next_deadline(local.version) == 0.5
    changed = core.poll(1.0, local.version, local.view(1.0))
    assert changed is not None and changed.ad.running == 1 and changed.ad.seq == 2
    local.finish("t", 1.1)
    assert core.poll(1.2, local.version, local.view(1.2)) is None  # rate limit
    assert core.poll(1.5, local.version, local.view(1.5)).ad.running == 0
    assert core.poll(6.4, local.version, local.view(6.4)) is None
    assert core.poll(6.5, local.version, local.view(6.5)) is not None  # refresh inside the TTL


class FakeDht:
    """Stands in for DhtService's put/get (same signatures) to test the asyncio driver."""

    def __init__(self):
        self.records = {}

    async def put(self, key, value, expiration, subkey=None):
        self.records.setdefault(key, {})[subkey] = value

    async def get(self, key):
        return self.records.get(key)


class FakeMembers:
    def __init__(self):
        self.entries = []

    def upsert_self(self, **kw):
        self.entries.append(kw)


async def test_advertiser_writes_dht_subkeys_and_members_then_views_feed_the_policy():
    dht, members = FakeDht(), FakeMembers()
    nodes = {}
    for i, extra in enumerate([{}, {}, {"accel": 1}]):
        local = LocalScheduler(
            f"node{i}", ResourceLedger({"CPU": 4, **extra}), labels={"i": str(i)}
        )
        advertiser = CapacityAdvertiser(
            local, f"node{i}", f"node{i}".encode(), dht, members, clock=lambda: 50.0
        )
        assert await advertiser.publish_once() is not None
        nodes[f"node{i}"] = advertiser
    assert set(dht.records[b"capacity/CPU"]) == {b"node0", b"node1", b"node2"}
    assert set(dht.records[b"capacity/accel"]) == {b"node2"}
    assert len(members.entries) == 3 and members.entries[2]["resources_total"]["accel"] == 1

    sampler = CandidateSampler(dht, sample_size=2, seed=1, clock=lambda: 7.0)
    views = await sampler.candidates({"CPU": 1, "accel": 1})
    assert [v.node_id for v in views] == ["node2"] and views[0].ad_time == 7.0
    assert len(await sampler.candidates({"CPU": 1})) == 2  # sampled, not everyone
    snapshot = build_snapshot(dht_views=views, local_node="node0")
    decision = PlacementPolicy(seed=0).place(
        snapshot, PlacementRequest("t", {"accel": 1}, "s"), 7.0
    )
    assert decision.node_id == "node2"


async def test_advertiser_loop_publishes_changes_and_stops():
    dht = FakeDht()
    local = LocalScheduler("n", ResourceLedger({"CPU": 2}))
    advertiser = CapacityAdvertiser(
        local,
        "n",
        b"n",
        dht,
        core=AdvertiserCore("n", ttl=10, refresh_interval=5, min_interval=0.01),
    )
    advertiser.start()
    try:

        async def published_running(count):
            for _ in range(500):
                value = (dht.records.get(b"capacity/CPU") or {}).get(b"n")
                if value is not None and CapacityAd.decode(value).running == count:
                    return True
                await asyncio.sleep(0.01)
            return False

        assert await published_running(0)
        local.offer(PlacementRequest("t", {"CPU": 1}, "s"), 0.0)
        advertiser.notify_change()
        assert await published_running(1)
    finally:
        await advertiser.stop()


def test_views_from_dht_skip_bad_and_forged_records():
    class Rec:
        def __init__(self, value, publisher):
            self.value, self.publisher = value, publisher

    good = Rec(ad(node="A").encode(), "A")
    forged = Rec(ad(node="A").encode(), "B")
    views, problems = views_from_dht({b"A": good, b"B": forged, b"C": Rec(b"junk", "C")}, 3.0)
    assert [v.node_id for v in views] == ["A"]
    assert len(problems) == 2 and any("published by B" in p for p in problems)


def test_view_from_ad_marks_old_ads_not_alive():
    assert view_from_ad(ad(), received_at=0.0, max_age=10.0, now=5.0).alive
    assert not view_from_ad(ad(), received_at=0.0, max_age=10.0, now=11.0).alive


def test_build_snapshot_from_members_prefers_dht_views():
    class Member:
        def __init__(self, pid, total, avail):
            self.peer_id, self.resources_total, self.resources_available = pid, total, avail
            self.labels, self.heartbeat = {}, 1.0

    members = [Member("A", {"CPU": 4}, {"CPU": 1}), Member("B", {"CPU": 2}, {"CPU": 2})]
    dht_view = view_from_ad(
        ad(node="B", total={"CPU": 2}, available={"CPU": 0}, running=2, queued=3), 2.0
    )
    snapshot = build_snapshot(members, [dht_view], objects={"cid": (10, ["A"])})
    assert snapshot.nodes["A"].running == 3
    assert snapshot.nodes["B"].queued == 3
    assert snapshot.objects["cid"].holders == frozenset({"A"})


async def test_advertiser_writes_the_crdt_members_entry_that_small_meshes_read():
    from latticaray.mesh.identity import KeyPair
    from latticaray.state.core import StateCore

    key = KeyPair.generate()
    state = StateCore(key, wall_clock=lambda: 1000.0)
    local = LocalScheduler(
        str(key.peer_id), ResourceLedger({"CPU": 4, "accel": 2}), labels={"zone": "eu"}
    )
    local.offer(PlacementRequest("t", {"CPU": 3}, "s"), 0.0)
    advertiser = CapacityAdvertiser(
        local,
        str(key.peer_id),
        key.peer_id.to_bytes(),
        dht=None,
        members=state.members,
        clock=lambda: 1000.0,
    )
    await advertiser.publish_once()
    assert advertiser.failures == 0
    (member,) = state.members.alive(1000.0)
    snapshot = build_snapshot(members=[member], now=1000.0)
    view = snapshot.nodes[str(key.peer_id)]
    assert view.total == {"CPU": 4, "accel": 2} and view.available["CPU"] == 1 and view.running == 3
    assert view.labels == {"zone": "eu"}
    decision = PlacementPolicy(seed=0).place(
        snapshot, PlacementRequest("u", {"accel": 1}, "s"), 0.0
    )
    assert decision.node_id == str(key.peer_id)


def test_member_views_move_heartbeats_onto_the_local_clock():
    from latticaray.scheduler.advertiser import member_views

    class Member:
        def __init__(self, pid, heartbeat):
            self.peer_id, self.heartbeat, self.labels = pid, heartbeat, {}
            self.resources_total, self.resources_available = {"CPU": 2}, {"CPU": 2}

    class Members:
        def alive(self, now):
            return [Member("A", 1000.0), Member("B", 997.5)]

    views = {v.node_id: v for v in member_views(Members(), wall_now=1001.0, local_now=50.0)}
    assert views["A"].ad_time == pytest.approx(49.0) and views["B"].ad_time == pytest.approx(46.5)


async def test_a_failing_put_is_warned_once_per_streak_and_names_its_error(caplog):
    class FlakyDht(FakeDht):
        failing = True

        async def put(self, key, value, expiration, subkey=None):
            if self.failing:
                raise TimeoutError()  # says nothing itself
            await super().put(key, value, expiration, subkey)

    dht = FlakyDht()
    local = LocalScheduler("n", ResourceLedger({"CPU": 2}))
    now = [0.0]
    advertiser = CapacityAdvertiser(
        local, "n", b"n", dht, core=AdvertiserCore("n", refresh_interval=1.0), clock=lambda: now[0]
    )
    caplog.set_level("DEBUG", logger="latticaray.scheduler.advertiser")
    for _ in range(3):
        assert await advertiser.publish_once() is not None
        now[0] += 2.0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "TimeoutError" in warnings[0].getMessage()
    assert advertiser.failures == 3
    dht.failing = False
    assert await advertiser.publish_once() is not None
    assert any("succeeded again" in r.getMessage() for r in caplog.records)
    dht.failing = True
    now[0] += 2.0
    assert await advertiser.publish_once() is not None
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2  # a new streak
