"""The typed collections: members (liveness, expiry), actors (claim rule, loser told), jobs."""

from __future__ import annotations

import random

import pytest

from latticaray.state import (
    ActorState,
    FailureDetector,
    JobStatus,
    Liveness,
    MemberReachability,
    NoSuchClaim,
    StateCore,
)
from latticaray.state.simulation import deterministic_key

NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def make(n: int, clock: Clock, detector: FailureDetector | None = None) -> list[StateCore]:
    return [
        StateCore(
            deterministic_key(3, i), wall_clock=clock, detector=detector, rng=random.Random(i)
        )
        for i in range(n)
    ]


def exchange(*cores: StateCore) -> None:
    """Full-state merge between every pair (what replication achieves eventually)."""
    atoms = [a for c in cores for a in c.store.atoms()]
    for core in cores:
        report = core.store.merge(atoms, core.replica.wall_clock())
        assert not report.rejected, report.rejected


def test_members_upsert_read_and_keep_unspecified_fields():
    clock = Clock()
    (a,) = make(1, clock)
    a.members.upsert_self(
        addrs=["/ip4/127.0.0.1/udp/4001/quic-v1"],
        reachability="public",
        resources_total={"CPU": 8, "GPU": 1},
        resources_available={"CPU": 8},
        labels={"zone": "a"},
    )
    clock.t += 1
    a.members.upsert_self(resources_available={"CPU": 3})
    info = a.members.get(a.peer_id)
    assert info.addrs == ("/ip4/127.0.0.1/udp/4001/quic-v1",)
    assert info.reachability is MemberReachability.PUBLIC
    assert info.resources_total == {"CPU": 8, "GPU": 1}
    assert info.resources_available == {"CPU": 3}
    assert info.labels == {"zone": "a"} and info.heartbeat == pytest.approx(clock.t)
    with pytest.raises(ValueError):
        a.members.upsert_self(resources_total={"CPU": -1})


def test_failure_detection_by_heartbeat_age_then_removal():
    clock = Clock()
    detector = FailureDetector(suspect_after=2, dead_after=5, remove_after=30)
    a, b = make(2, clock, detector)
    seen = []
    a.members.watch(lambda peer, info: seen.append((peer, info is not None)))
    b.members.upsert_self(addrs=["/ip4/127.0.0.1/tcp/1"])
    exchange(a, b)
    assert [m.peer_id for m in a.members.alive()] == [b.peer_id]
    clock.t += 3
    assert a.members.liveness(b.peer_id) is Liveness.SUSPECT and a.members.alive() == []
    clock.t += 3
    assert a.members.liveness(b.peer_id) is Liveness.DEAD
    assert [m.peer_id for m in a.members.dead()] == [b.peer_id]
    clock.t += 30
    a.store.gc(clock.t)
    assert a.members.get(b.peer_id) is None
    assert seen == [(b.peer_id, True), (b.peer_id, False)]
    # the expired heartbeat is refused if someone replays it later
    stale = [x for x in b.store.atoms() if x.collection == "members"]
    report = a.store.merge(stale, clock.t)
    assert [type(e).__name__ for _, e in report.rejected] == ["ExpiredAtom"]


def test_member_leave_is_a_tombstone_that_replicates():
    clock = Clock()
    a, b = make(2, clock)
    b.members.upsert_self(addrs=["x"])
    exchange(a, b)
    clock.t += 1
    b.members.leave()
    exchange(a, b)
    assert a.members.get(b.peer_id) is None and a.members.all() == []


def test_concurrent_actor_claims_resolve_the_same_everywhere_and_loser_is_told():
    clock = Clock()
    a, b, c = make(3, clock)
    lost = {a.peer_id: [], b.peer_id: []}
    for core in (a, b):
        core.actors.on_claim_lost(
            lambda name, mine, winner, me=core.peer_id: lost[me].append((name, winner.owner))
        )
    ra = a.actors.claim("counter", "actor-a")
    clock.t += 0.5  # b claims later, without having seen a's claim (partition)
    rb = b.actors.claim("counter", "actor-b")
    assert ra.won and rb.won and ra.provisional
    exchange(a, b, c)
    winners = {core.actors.get("counter").actor_id for core in (a, b, c)}
    assert winners == {"actor-a"}
    assert lost[b.peer_id] == [("counter", a.peer_id)] and lost[a.peer_id] == []
    exchange(a, b, c)  # told once only
    assert len(lost[b.peer_id]) == 1
    # the loser releases; later claims by others see the owner and do not write
    b.actors.release("counter")
    before = len(c.store)
    result = c.actors.claim("counter", "actor-c")
    assert not result.won and result.record.actor_id == "actor-a" and len(c.store) == before


def test_claim_ties_on_hlc_are_broken_by_peer_id():
    clock = Clock()
    a, b = make(2, clock)
    a.actors.claim("same", "x")
    b.actors.claim("same", "y")  # same wall time, same logical counter
    exchange(a, b)
    records = a.actors.claims("same")
    assert records[0].claimed_at == records[1].claimed_at
    expected = min(records, key=lambda r: r.owner.to_bytes())
    assert a.actors.get("same") == b.actors.get("same") == expected


def test_actor_lifecycle_and_dead_owner_frees_the_name():
    clock = Clock()
    a, b = make(2, clock)
    a.actors.claim("svc", "actor-1")
    clock.t += 1
    a.actors.update("svc", ActorState.ALIVE)
    exchange(a, b)
    assert b.actors.get("svc").state is ActorState.ALIVE
    with pytest.raises(NoSuchClaim):
        b.actors.update("svc", ActorState.DEAD)
    clock.t += 1
    a.actors.update("svc", "dead")
    exchange(a, b)
    assert b.actors.get("svc").state is ActorState.DEAD
    clock.t += 1
    result = b.actors.claim("svc", "actor-2")
    assert result.won
    exchange(a, b)
    assert a.actors.get("svc").actor_id == "actor-2" and a.actors.names() == ["svc"]


def test_jobs_are_written_by_their_driver_and_read_everywhere():
    clock = Clock()
    a, b = make(2, clock)
    changes = []
    b.jobs.watch(lambda job_id, record: changes.append((job_id, record and record.status)))
    a.jobs.submit("job-1", metadata={"entrypoint": "train.py"})
    exchange(a, b)
    clock.t += 10
    a.jobs.update("job-1", JobStatus.SUCCEEDED)
    exchange(a, b)
    record = b.jobs.get("job-1")
    assert record.driver == a.peer_id and record.status is JobStatus.SUCCEEDED
    assert record.start == NOW and record.end == clock.t
    assert record.metadata == {"entrypoint": "train.py"}
    assert changes == [("job-1", JobStatus.RUNNING), ("job-1", JobStatus.SUCCEEDED)]
    assert b.jobs.by_driver(a.peer_id) == [record]
    with pytest.raises(KeyError):
        b.jobs.update("job-1", JobStatus.FAILED)


def test_tombstones_are_collected_after_their_ttl():
    clock = Clock()
    core = StateCore(deterministic_key(3, 9), wall_clock=clock, tombstone_ttl=60)
    kv = core.lww_map("kv")
    kv.set("k", 1)
    kv.delete("k")
    assert len(core.store) == 1 and "k" not in kv
    clock.t += 61
    core.store.gc(clock.t)
    assert len(core.store) == 0 and core.store.node(0, 0) == (0, 0)


def test_heartbeat_interval_and_thresholds_stretch_with_mesh_size():
    detector = FailureDetector(
        suspect_after=5,
        dead_after=15,
        remove_after=120,
        heartbeat_interval=1,
        heartbeats_per_second=50,
    )
    assert detector.interval_for(10) == 1 and detector.interval_for(1000) == 20
    assert detector.thresholds(10) == (5, 15)
    assert detector.thresholds(100) == (10, 30)
    assert detector.thresholds(1000) == (30, 60)  # capped by remove_after
    assert detector.judge(0, 20, members=10) is Liveness.DEAD
    assert detector.judge(0, 20, members=1000) is Liveness.ALIVE


def test_member_entries_are_what_the_scheduler_reads():
    """Interface check with latticaray.scheduler: the advertiser's upsert and the view builder."""
    from latticaray.scheduler.advertiser import view_from_member

    clock = Clock()
    (core,) = make(1, clock)
    core.members.upsert_self(
        resources_total={"CPU": 8.0, "GPU": 1.0},
        resources_available={"CPU": 6.0, "GPU": 1.0},
        labels={"zone": "eu"},
    )
    view = view_from_member(core.members.alive()[0], clock.t)
    assert view.node_id == str(core.peer_id) and view.total == {"CPU": 8.0, "GPU": 1.0}
    assert view.available["CPU"] == 6.0 and view.labels == {"zone": "eu"} and view.running == 2
    assert view.ad_time == clock.t
