"""The sans-I/O liveness detector on its own: time is a number, the network is a script."""

from __future__ import annotations

import itertools
import random

import pytest

from latticaray.mesh.liveness.core import (
    LivenessChanged,
    LivenessConfig,
    LivenessCore,
    PeerLiveness,
    Probe,
    Redial,
)

ALIVE, SUSPECT, DOWN = PeerLiveness.ALIVE, PeerLiveness.SUSPECT, PeerLiveness.DOWN


class Script:
    """Drives a core with a tick every `step` s; the peer answers probes after `rtt` unless
    `answering` is false (then the probe times out, as the shell would report it)."""

    def __init__(self, core: LivenessCore, peer: str = "B", step: float = 0.1, rtt: float = 0.05):
        self.core, self.peer, self.step, self.rtt = core, peer, step, rtt
        self.now = 0.0
        self.answering = True
        self.pending: list[tuple[float, str]] = []  # (when, "heard" | "failed")
        self.changes: list[LivenessChanged] = []
        self.probes = 0
        self.redials: list[float] = []

    def run(self, seconds: float, traffic_every: float | None = None) -> None:
        end = self.now + seconds
        next_traffic = self.now
        while self.now < end - 1e-9:
            self.now = round(self.now + self.step, 9)
            if traffic_every is not None and self.now >= next_traffic:
                self.note(self.core.heard(self.peer, self.now))
                next_traffic = self.now + traffic_every
            due = [p for p in self.pending if p[0] <= self.now]
            self.pending = [p for p in self.pending if p[0] > self.now]
            for _, what in due:
                if what == "heard":
                    self.note(self.core.heard(self.peer, self.now))
                else:
                    self.core.probe_failed(self.peer, self.now)
            for action in self.core.tick(self.now):
                if isinstance(action, Probe):
                    self.probes += 1
                    if self.answering:
                        self.pending.append((self.now + self.rtt, "heard"))
                    else:
                        timeout = self.core.config.probe_timeout
                        self.pending.append((self.now + timeout, "failed"))
                elif isinstance(action, Redial):
                    self.redials.append(self.now)
                else:
                    self.note(action)

    def note(self, change: LivenessChanged | None) -> None:
        if change is not None:
            self.changes.append(change)

    def states(self) -> list[PeerLiveness]:
        return [c.state for c in self.changes]


def test_a_quiet_healthy_peer_is_probed_and_stays_alive():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    s.run(60.0)
    assert s.changes == []
    assert 50 <= s.probes <= 61  # about one per probe_interval while nothing else is heard
    assert core.state("B") is ALIVE and core.phi("B", s.now) < 1.0


def test_traffic_replaces_probes():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    s.run(30.0, traffic_every=0.3)
    assert s.probes == 0 and s.changes == []


def test_a_peer_that_goes_silent_is_suspected_then_down_after_missed_keepalives():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    s.run(20.0)
    silent_at = s.now
    s.answering = False
    s.run(15.0)
    assert s.states() == [SUSPECT, DOWN]
    suspect, down = s.changes
    cfg = core.config
    # DOWN only once every condition holds: phi, a window of silence, missed keepalives
    assert down.silent_for >= cfg.min_down_after and down.phi >= cfg.down_phi
    assert suspect.silent_for < down.silent_for
    assert 5.0 <= down.silent_for <= 9.0, down
    assert core.state("B") is DOWN and silent_at < s.now
    # it answers again: ALIVE at once
    s.answering = True
    s.run(5.0)
    assert s.states()[-1] is ALIVE


def test_one_missed_keepalive_or_a_short_stall_is_not_down():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    s.run(10.0)
    for stall in (1.5, 2.5, 3.5):  # a long call blocks nothing here, but a stalled link might
        s.answering = False
        s.run(stall)
        s.answering = True
        s.run(10.0)
    assert DOWN not in s.states()
    assert core.state("B") is ALIVE


def test_lossy_link_with_jitter_never_reports_down():
    """Probes lost at random (5 %) and answers delayed 20-400 ms, for ten minutes."""
    rng = random.Random(7)
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    for _ in range(600):
        s.answering = rng.random() >= 0.05
        s.rtt = rng.uniform(0.02, 0.4)
        s.run(1.0)
    assert DOWN not in s.states()


def test_phi_grows_with_silence_and_resets_when_heard():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    for t in range(1, 30):
        core.heard("B", float(t))
    values = [core.phi("B", 29.0 + dt) for dt in (0.5, 2.0, 4.0, 6.0, 8.0)]
    assert values == sorted(values) and values[0] < 0.5 and values[-1] > 8.0
    core.heard("B", 40.0)
    assert core.phi("B", 40.5) < 0.5
    assert core.phi("nobody", 40.5) == 0.0


def test_disconnected_peer_is_redialed_with_backoff_then_reconnects():
    cfg = LivenessConfig()
    core: LivenessCore[str] = LivenessCore(cfg)
    core.watch("B", 0.0)
    s = Script(core)
    s.run(5.0)
    core.disconnected("B", s.now)
    gone_at = s.now
    for _ in range(4):  # every redial fails at once
        before = len(s.redials)
        while len(s.redials) == before:
            s.run(s.step)
        core.redial_failed("B", s.now)
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(s.redials)]
    assert s.redials[0] - gone_at <= s.step + 1e-9  # the first redial is immediate
    assert gaps == [0.3, 0.5, 1.0]  # 0.25, 0.5, 1.0 s backoff, on 0.1 s ticks
    change = core.connected("B", s.now)
    assert core.state("B") is ALIVE
    assert change is None or change.state is ALIVE
    n = len(s.redials)
    s.run(5.0)
    assert len(s.redials) == n  # connected: no more redials


def test_a_peer_that_cannot_be_redialed_goes_down_and_redials_continue_slowly():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0)
    s = Script(core)
    s.run(3.0)
    core.disconnected("B", s.now)
    gone_at = s.now
    last = 0
    for _ in range(400):
        s.run(s.step)
        if len(s.redials) > last:
            last = len(s.redials)
            core.redial_failed("B", s.now)
        if core.state("B") is DOWN:
            break
    assert core.state("B") is DOWN
    assert s.now - gone_at >= core.config.min_down_after - 1.0
    s.run(30.0)
    # still redialing, at most every redial_max
    late = [t for t in s.redials if t > s.now - 30.0]
    assert late and all(b - a <= core.config.redial_max + 0.2 for a, b in itertools.pairwise(late))


def test_unwatched_peers_get_no_actions_and_watch_is_idempotent():
    core: LivenessCore[str] = LivenessCore()
    assert core.tick(10.0) == []
    assert core.heard("X", 1.0) is None and core.state("X") is None
    core.watch("B", 0.0)
    core.heard("B", 0.5)
    core.watch("B", 100.0)  # no reset
    assert core.last_heard("B") == 0.5
    core.unwatch("B")
    assert core.tick(200.0) == [] and core.watched() == []


def test_watching_a_disconnected_peer_dials_it():
    core: LivenessCore[str] = LivenessCore()
    core.watch("B", 0.0, connected=False)
    assert core.tick(0.0) == [Redial("B")]
    assert core.tick(0.1) == []  # one redial at a time


def test_config_is_checked():
    with pytest.raises(ValueError):
        LivenessConfig(suspect_phi=9.0, down_phi=8.0)
    with pytest.raises(ValueError):
        LivenessConfig(min_sample_interval=2.0, probe_interval=1.0)
