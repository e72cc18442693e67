"""The sans-I/O member liveness detector (runtime/remote/liveness.py), fed simulated arrivals:
loss, delay, stalls behind bulk data, deaths, disconnects, partitions and our own pauses."""

from __future__ import annotations

import itertools
import random

import pytest

from latticaray.runtime.remote.liveness import (
    STATE_MOVES,
    IllegalLivenessMove,
    LivenessConfig,
    LivenessCore,
    MemberState,
    Redial,
    StateChanged,
    move,
)

TICK = 0.25
VIEW = 0.3  # the shell's keepalive (view push) period


class Sim:
    """One watched peer. Every VIEW s this node pushes a keepalive whose answer arrives after
    the link's delay unless lost (then it is missed after `timeout`); the peer's own pushes arrive
    the same way. `stall(t0, t1)`: nothing gets through between t0 and t1 (HOL blocking behind
    bulk data), and what was sent meanwhile arrives at t1. `dead_at`: the peer stops."""

    def __init__(self, core: LivenessCore, loss: float = 0.0, delay: float = 0.025, seed: int = 1):
        self.core = core
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.stalls: list[tuple[float, float]] = []
        self.dead_at = float("inf")
        self.events: list[tuple[float, str, str]] = []  # (time, kind, peer) sorted on run
        self.changes: list[tuple[float, StateChanged]] = []
        self.redials: list[float] = []
        core.watch("p", 0.0)

    def stall(self, t0: float, t1: float) -> None:
        self.stalls.append((t0, t1))

    def _arrival(self, sent: float) -> float | None:
        if sent >= self.dead_at or self.rng.random() < self.loss:
            return None
        at = sent + self.delay + self.rng.expovariate(1 / 0.01)
        for t0, t1 in self.stalls:
            if t0 <= at < t1:
                at = t1 + self.rng.random() * 0.05
        return at

    def run(self, until: float, timeout: float = 2.0) -> None:
        t = VIEW
        while t < until:
            # the peer's view to us, and the answer to ours (a round trip)
            arrival = self._arrival(t)
            if arrival is not None:
                self.events.append((arrival, "heard", "p"))
            answer = self._arrival(t)
            answer = None if answer is None else self._arrival(answer)
            if answer is not None and answer - t <= timeout:
                self.events.append((answer, "heard", "p"))
            else:
                self.events.append((t + timeout, "missed", "p"))
            t += VIEW
        now = 0.0
        self.events.sort()
        index = 0
        while now < until:
            now += TICK
            while index < len(self.events) and self.events[index][0] <= now:
                at, kind, peer = self.events[index]
                index += 1
                if kind == "heard":
                    change = self.core.heard(peer, at)
                    if change is not None:
                        self.changes.append((at, change))
                else:
                    self.core.probe_failed(peer, at)
            for action in self.core.tick(now):
                if isinstance(action, StateChanged):
                    self.changes.append((now, action))
                else:
                    self.redials.append(now)

    def downs(self) -> list[float]:
        return [t for t, c in self.changes if c.state is MemberState.DOWN]


@pytest.mark.parametrize("loss", [0.0, 0.005, 0.02, 0.05])
def test_a_live_peer_on_a_lossy_link_is_never_down(loss):
    sim = Sim(LivenessCore(), loss=loss, delay=0.025, seed=int(loss * 1000))
    sim.run(3600.0)
    assert sim.downs() == []
    assert sim.core.state("p") is MemberState.ALIVE


def test_stalls_behind_bulk_data_shorter_than_the_window_never_make_a_peer_down():
    """Views and answers held up for 2-7 s at a time (HOL blocking and queues behind a transfer
    on a lossy link), 20 times in an hour, with 2% loss besides."""
    sim = Sim(LivenessCore(), loss=0.02, seed=7)
    rng = random.Random(3)
    for k in range(20):
        start = 60.0 + k * 170.0 + rng.random() * 60
        sim.stall(start, start + rng.uniform(2.0, 7.0))
    sim.run(3600.0)
    assert sim.downs() == []
    suspects = [c for _, c in sim.changes if c.state is MemberState.SUSPECT]
    assert suspects, "stalls that long are at least suspicious"
    assert sim.core.state("p") is MemberState.ALIVE


def test_a_dead_peer_is_down_after_the_window_not_before():
    sim = Sim(LivenessCore(), loss=0.005)
    sim.dead_at = 100.0
    sim.run(160.0)
    downs = sim.downs()
    assert len(downs) == 1
    cfg = sim.core.config
    assert 100.0 + cfg.min_down_after <= downs[0] <= 100.0 + cfg.min_down_after + 4.0
    change = next(c for t, c in sim.changes if c.state is MemberState.DOWN)
    assert change.previous is MemberState.SUSPECT and change.phi >= cfg.down_phi
    assert "keepalives missed" in change.why


def test_silence_without_missed_keepalives_is_never_down():
    """If this node sent no keepalive (nothing to judge the peer by), silence alone is not
    enough: DOWN needs missed keepalives too."""
    core: LivenessCore[str] = LivenessCore()
    core.watch("p", 0.0)
    for k in range(1, 200):
        core.heard("p", k * 0.3)
    now = 60.0
    changes = []
    while now < 120.0:
        changes += [a for a in core.tick(now) if isinstance(a, StateChanged)]
        now += TICK
    assert [c.state for c in changes] == [MemberState.SUSPECT]
    core.probe_failed("p", now)
    core.probe_failed("p", now)
    assert core.tick(now) == []
    core.probe_failed("p", now)
    (change,) = core.tick(now + TICK)
    assert change.state is MemberState.DOWN


def test_phi_adapts_to_the_link():
    """A peer whose gaps vary widely is given more time than a metronome."""
    steady: LivenessCore[str] = LivenessCore()
    jumpy: LivenessCore[str] = LivenessCore()
    steady.watch("p", 0.0)
    jumpy.watch("p", 0.0)
    rng = random.Random(5)
    t_steady = t_jumpy = 0.0
    for _ in range(100):
        t_steady += 0.3
        steady.heard("p", t_steady)
        t_jumpy += rng.choice([0.2, 0.3, 2.5, 4.0])
        jumpy.heard("p", t_jumpy)
    for silence in (4.0, 6.0, 9.0):
        assert steady.phi("p", t_steady + silence) > jumpy.phi("p", t_jumpy + silence)
    phis = [steady.phi("p", t_steady + s) for s in (1.0, 3.0, 4.0, 5.0, 6.0, 7.0)]
    assert phis == sorted(phis) and phis[0] < 0.01 and phis[-1] > 8.0


def test_a_disconnected_peer_is_suspect_and_redialed_with_backoff():
    cfg = LivenessConfig()
    core: LivenessCore[str] = LivenessCore(cfg)
    core.watch("p", 0.0)
    change = core.disconnected("p", 1.0)
    assert change is not None and change.state is MemberState.SUSPECT
    assert core.disconnected("p", 1.1) is None  # once
    assert core.tick(1.0) == [Redial("p")]
    assert core.tick(1.25) == []  # one redial at a time
    core.redial_failed("p", 2.0)
    assert core.tick(2.25) == []
    assert core.tick(2.0 + cfg.redial_initial) == [Redial("p")]
    core.redial_failed("p", 3.0)
    assert core.tick(3.0 + cfg.redial_initial) == []
    assert core.tick(3.0 + 2 * cfg.redial_initial) == [Redial("p")]
    back = core.connected("p", 4.0)
    assert back is not None and back.state is MemberState.ALIVE
    assert core.tick(4.25) == []


def test_a_peer_that_cannot_be_redialed_goes_down_and_is_still_redialed_to_rejoin():
    cfg = LivenessConfig()
    core: LivenessCore[str] = LivenessCore(cfg)
    core.watch("p", 0.0)
    for k in range(1, 40):
        core.heard("p", k * 0.3)
    last = 39 * 0.3
    core.disconnected("p", last)
    now, down_at, redials = last, None, []
    while now < last + 60:
        now += TICK
        for action in core.tick(now):
            if isinstance(action, Redial):
                redials.append(now)
                core.redial_failed("p", now + 0.5)  # nothing answers (a partition)
            elif action.state is MemberState.DOWN:
                down_at = now
    assert down_at is not None and down_at - last >= cfg.min_down_after
    late = [t for t in redials if t > down_at]
    assert late and all(b - a >= cfg.rejoin_interval for a, b in itertools.pairwise(late))
    change = core.connected("p", now)  # the partition healed
    assert change is not None and change.previous is MemberState.DOWN
    assert core.state("p") is MemberState.ALIVE


def test_a_peer_whose_redials_hang_is_down_after_the_window():
    """A dial to a dead process can take its whole timeout to fail: every second without a
    connection counts as a missed keepalive meanwhile."""
    cfg = LivenessConfig()
    core: LivenessCore[str] = LivenessCore(cfg)
    core.watch("p", 0.0)
    for k in range(1, 40):
        core.heard("p", k * 0.3)
    last = 39 * 0.3
    core.disconnected("p", last + 0.5)
    now, down_at = last + 0.5, None
    while down_at is None and now < last + 30:
        now += TICK
        for action in core.tick(now):  # the one Redial is never answered
            if isinstance(action, StateChanged) and action.state is MemberState.DOWN:
                down_at = now
    assert down_at is not None
    assert cfg.min_down_after <= down_at - last <= cfg.min_down_after + 1.0


def test_a_down_peer_is_forgotten_after_forget_after():
    cfg = LivenessConfig(forget_after=30.0)
    core: LivenessCore[str] = LivenessCore(cfg)
    core.watch("p", 0.0)
    now = 0.0
    while core.state("p") is not MemberState.DOWN:
        now += TICK
        core.probe_failed("p", now)
        core.tick(now)
    down_at = now
    while now < down_at + 29.0:
        now += TICK
        core.tick(now)
    assert core.watched() == ["p"]
    core.tick(down_at + 30.0)
    assert core.watched() == [] and core.state("p") is None


def test_our_own_pause_is_not_the_peers_silence():
    """The process was stopped (or starved) for 30 s: on waking it does not declare its peers
    down, although the keepalives it did send before the pause went unanswered."""
    core: LivenessCore[str] = LivenessCore()
    core.watch("p", 0.0)
    now = 0.0
    while now < 30.0:
        now += TICK
        core.heard("p", now)
        core.tick(now)
    for _ in range(5):
        core.probe_failed("p", now)
    now += 30.0
    actions = core.tick(now)
    assert not any(isinstance(a, StateChanged) and a.state is MemberState.DOWN for a in actions)
    assert core.paused_total == pytest.approx(30.0 - TICK + TICK, abs=0.3)
    core.heard("p", now + 0.1)
    assert core.state("p") is MemberState.ALIVE


def test_a_member_declared_down_rejoins_when_heard():
    core: LivenessCore[str] = LivenessCore()
    core.watch("p", 0.0)
    change = core.declare_down("p", 1.0, "restarted")
    assert change is not None and change.state is MemberState.DOWN and change.why == "restarted"
    assert core.declare_down("p", 1.5, "again") is None
    back = core.heard("p", 2.0)
    assert back is not None and back.previous is MemberState.DOWN
    assert core.state("p") is MemberState.ALIVE


def test_older_arrivals_change_nothing():
    core: LivenessCore[str] = LivenessCore()
    core.watch("p", 10.0)
    assert core.heard("p", 5.0) is None
    assert core.silent_for("p", 12.0) == pytest.approx(2.0)
    assert core.heard("unknown", 1.0) is None and core.state("unknown") is None


def test_the_state_table():
    assert move(MemberState.SUSPECT, MemberState.ALIVE) is MemberState.ALIVE
    with pytest.raises(IllegalLivenessMove):
        move(MemberState.DOWN, MemberState.SUSPECT)
    assert all(state not in moves for state, moves in STATE_MOVES.items())


@pytest.mark.parametrize(
    "bad",
    [
        {"min_sample_interval": 0},
        {"window": 1},
        {"suspect_phi": 9.0, "down_phi": 8.0},
        {"redial_initial": 5.0, "redial_max": 1.0},
        {"tick_interval": 2.0, "max_tick_gap": 1.0},
        {"min_missed": -1},
        {"unreachable_miss_interval": 0},
    ],
)
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        LivenessConfig(**bad)
