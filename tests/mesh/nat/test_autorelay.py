"""Unit tests of the sans-I/O AutoRelay core: RTT pick, two reservations, replacement, backoff."""

import pytest

from latticaray.mesh.nat.autorelay import (
    AutoRelayConfig,
    AutoRelayCore,
    Discover,
    Event,
    MeasureRtt,
    NoRelayFound,
    Phase,
    Release,
    Reserve,
)

ADDR = {r: f"/ip4/198.18.0.{i}/tcp/4002" for i, r in enumerate("ABCD", start=11)}


def kinds(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def reserves(actions):
    return sorted(a.relay for a in kinds(actions, Reserve))


def measured(core, rtts, now=0.0):
    """Add candidates, answer every RTT probe; returns the actions of the last answer."""
    actions = []
    for relay in rtts:
        actions += core.add_candidate(relay, ADDR[relay], now)
    assert sorted(a.relay for a in kinds(actions, MeasureRtt)) == sorted(rtts)
    out = []
    for relay, rtt in rtts.items():
        out = core.on_rtt(relay, rtt, now)
    return out


def test_keeps_two_reservations_on_the_fastest_relays():
    core = AutoRelayCore()
    core.set_needed(True, 0.0)
    actions = measured(core, {"A": 0.050, "B": 0.010, "C": 0.030})
    assert reserves(actions) == ["B", "C"]
    assert core.on_reserved("B", 3600.0, 0.1) == []
    assert core.on_reserved("C", 3600.0, 0.1) == []
    assert sorted(c.relay for c in core.reserved()) == ["B", "C"]
    assert core.candidates["A"].phase is Phase.READY


def test_a_ready_relay_waits_briefly_for_slower_probes_then_takes_what_answered():
    core = AutoRelayCore(AutoRelayConfig(rtt_wait=0.5))
    core.set_needed(True, 0.0)
    for relay in "AB":
        core.add_candidate(relay, ADDR[relay], 0.0)
    assert core.on_rtt("A", 0.2, 0.1) == []  # B's probe is still out
    assert core.next_timer() == pytest.approx(0.6)
    assert reserves(core.on_rtt("B", 0.01, 0.2)) == ["A", "B"]  # both answered: no wait

    slow = AutoRelayCore(AutoRelayConfig(rtt_wait=0.5))
    slow.set_needed(True, 0.0)
    for relay in "AB":
        slow.add_candidate(relay, ADDR[relay], 0.0)
    slow.on_rtt("A", 0.2, 0.1)
    assert slow.tick(0.5) == []
    assert reserves(slow.tick(0.6)) == ["A"]  # B never answered in time


def test_a_relay_that_dies_is_replaced_at_once_and_retried_after_backoff():
    core = AutoRelayCore(AutoRelayConfig(retry_base=1.0))
    core.set_needed(True, 0.0)
    measured(core, {"A": 0.01, "B": 0.02, "C": 0.03})
    core.on_reserved("A", 60.0, 0.0)
    core.on_reserved("B", 60.0, 0.0)
    actions = core.on_lost("A", 10.0)
    assert reserves(actions) == ["C"]  # the next best replaces it
    assert core.candidates["A"].phase is Phase.BACKOFF
    assert core.next_timer() == pytest.approx(11.0)
    core.on_reserved("C", 60.0, 10.1)
    assert core.tick(11.0) == []  # A is ready again, but two are held
    assert core.candidates["A"].phase is Phase.READY
    assert reserves(core.on_lost("B", 12.0)) == ["A"]


def test_failed_reservations_back_off_exponentially_and_a_lone_relay_is_retried():
    core = AutoRelayCore(AutoRelayConfig(retry_base=1.0, retry_max=4.0, no_relay_grace=100))
    core.set_needed(True, 0.0)
    assert reserves(measured(core, {"A": 0.01})) == ["A"]
    retries = []
    now = 0.0
    for _ in range(4):
        core.on_failed("A", "refused", now)
        now = core.next_timer()
        retries.append(now)
        assert reserves(core.tick(now)) == ["A"]
    assert retries == [1.0, 3.0, 7.0, 11.0]  # 1, 2, 4, then capped at 4
    core.on_reserved("A", 60.0, now)
    assert core.candidates["A"].failures == 0


def test_no_relay_found_is_reported_once_with_what_was_tried():
    core = AutoRelayCore(AutoRelayConfig(no_relay_grace=10.0, discover_interval=30.0))
    actions = core.set_needed(True, 0.0)
    assert kinds(actions, Discover)  # no candidates: look for some
    core.add_candidate("A", ADDR["A"], 1.0)
    core.on_rtt("A", 0.01, 1.0)
    core.on_failed("A", "[RESOURCE_LIMIT_EXCEEDED] all slots are taken", 1.1)
    assert core.next_timer() == pytest.approx(2.1)  # A's retry comes before the grace ends
    core.tick(2.1)
    core.on_failed("A", "[RESOURCE_LIMIT_EXCEEDED] all slots are taken", 2.2)
    actions = core.tick(10.0)
    missing = kinds(actions, NoRelayFound)
    assert missing == [NoRelayFound((("A", "[RESOURCE_LIMIT_EXCEEDED] all slots are taken"),))]
    assert not kinds(core.tick(10.5), NoRelayFound)  # once
    assert kinds(core.tick(30.0), Discover)  # still short: ask again after the interval


def test_becoming_public_releases_discovered_relays_but_keeps_pinned_ones():
    core = AutoRelayCore()
    core.add_reserved("P", ADDR["D"], 60.0, 0.0)  # the user's own relay
    core.set_needed(True, 0.0)
    assert reserves(measured(core, {"A": 0.01})) == ["A"]
    core.on_reserved("A", 60.0, 0.1)
    actions = core.set_needed(False, 1.0)
    assert actions == [Release("A")]
    assert [c.relay for c in core.reserved()] == ["P"]
    # a pinned relay that drops is re-reserved at once, needed or not
    assert reserves(core.on_lost("P", 2.0)) == ["P"]


def test_failed_rtt_probe_backs_off_and_is_measured_again():
    core = AutoRelayCore(AutoRelayConfig(retry_base=2.0))
    core.set_needed(True, 0.0)
    core.add_candidate("A", ADDR["A"], 0.0)
    assert core.on_rtt("A", None, 0.5, "timed out") == []
    assert core.candidates["A"].last_error == "RTT probe failed: timed out"
    assert kinds(core.tick(2.5), MeasureRtt) == [MeasureRtt("A")]


def test_transitions_outside_the_table_are_refused():
    core = AutoRelayCore()
    core.add_candidate("A", ADDR["A"], 0.0)  # not needed: stays NEW, nothing measured
    cand = core.candidates["A"]
    assert cand.phase is Phase.NEW
    with pytest.raises(ValueError, match="no transition"):
        cand.step(Event.LOST)
    # reports for a relay in the wrong phase are ignored, not applied
    assert core.on_reserved("A", 60.0, 0.0) == [] and cand.phase is Phase.NEW
    assert core.on_lost("A", 0.0) == [] and core.on_failed("Z", "x", 0.0) == []
