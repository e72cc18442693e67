"""Liveness of the members this node works with: a sans-I/O phi-accrual failure detector.

:class:`LivenessCore` is a plain class. Its shell (membership.py) feeds it what happened, with the
time ``now`` it happened, and applies the actions :meth:`LivenessCore.tick` returns:

* ``heard(peer, now)`` — something arrived from the peer: a pushed view, a request it made of this
  node, a frame on a task session to it, the answer to one of our view pushes, or (where the
  transport says) any packet of its connection. Gaps between arrivals are the detector's samples.
* ``probe_failed(peer, now)`` — a keepalive went unanswered in time. The view this node pushes to
  each member every VIEW_INTERVAL is the keepalive; one unanswered within its deadline is *missed*.
* ``connected(peer, now)`` / ``disconnected(peer, now)`` — the peer has a connection again / lost
  its last one. A disconnected peer is redialed (``Redial``: first at once, then with backoff
  from ``redial_initial`` to ``redial_max``); each failed redial (``redial_failed``), and each
  ``unreachable_miss_interval`` it stays without a connection, is a missed keepalive too.
* ``declare_down(peer, now, why)`` — the shell knows the peer is gone (it restarted, ...).

The judgement (Hayashibara et al., "The phi accrual failure detector", 2004; the arrival window,
phi and its verdict, the state table and the redial backoff are mesh/liveness/phi.py's, shared
with the mesh's connection liveness): with the recent
inter-arrival gaps (at most ``window``; gaps under ``min_sample_interval`` are not sampled, so a
busy link does not make the detector twitchy) as a normal distribution of mean ``m`` and deviation
``s`` (at least ``min_std``), ``phi(t) = -log10 P(gap > t)`` where ``t`` is the time since the peer
was last heard, less ``acceptable_pause`` (silence always tolerated: a retransmission burst, a
collector pause). A peer is

* ``SUSPECT`` when phi reaches ``suspect_phi`` or it has no connection: placement still counts
  its resources (a slow peer stays schedulable), the shell only reports it;
* ``DOWN`` only when phi reaches ``down_phi`` *and* it has been silent for ``min_down_after`` *and*
  at least ``min_missed`` keepalives (or redials) failed since it was last heard. One stalled
  stream, one lost answer or one slow call never makes a peer DOWN; the shell then settles what
  the peer ran and hosted (``peer_gone``).

Hearing from a peer makes it ``ALIVE`` again at once, DOWN included: a DOWN peer is still redialed
every ``rejoin_interval`` for ``forget_after`` s, so that a healed partition or a restarted
process comes back (the shell admits it afresh). A tick that comes more than ``max_tick_gap``
after the previous one means this process itself was paused (CPU starvation, a long collection):
the pause is not counted as the peers' silence.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from latticaray.mesh.liveness.phi import (
    TRANSITIONS,
    ArrivalWindow,
    PeerLiveness,
    Redial,
    RedialBackoff,
)

__all__ = [
    "STATE_MOVES",
    "IllegalLivenessMove",
    "LivenessConfig",
    "LivenessCore",
    "MemberState",
    "Redial",
    "StateChanged",
]

P = TypeVar("P", bound=Hashable)

#: What this node believes about a watched member (the mesh detector's states).
MemberState = PeerLiveness

#: The moves a member's state may make (anything else raises IllegalLivenessMove).
STATE_MOVES: Final[dict[MemberState, frozenset[MemberState]]] = TRANSITIONS


class IllegalLivenessMove(RuntimeError):
    """A state change the table does not allow."""


def move(state: MemberState, to: MemberState) -> MemberState:
    if to not in STATE_MOVES[state]:
        raise IllegalLivenessMove(f"a member cannot go from {state.value} to {to.value}")
    return to


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    """Tuning of the detector (seconds). The defaults keep a member on a busy link with 50 ms
    round trips, a few percent loss and a CPU-starved process ALIVE, and make a dead one DOWN
    about 8-10 s after it was last heard."""

    #: Inter-arrival gaps shorter than this are not sampled.
    min_sample_interval: float = 0.1
    #: How many recent gaps the estimate uses.
    window: int = 100
    #: The gap assumed before any was sampled (the shell's keepalive period is shorter).
    prior_interval: float = 1.0
    #: Floor of the gaps' deviation (a perfectly regular link would otherwise be judged on noise).
    min_std: float = 0.5
    #: Silence always tolerated on top of the expected gap.
    acceptable_pause: float = 3.0
    suspect_phi: float = 3.0
    down_phi: float = 8.0
    #: A member is never DOWN before it has been silent this long ...
    min_down_after: float = 8.0
    #: ... and this many keepalives or redials failed since it was last heard.
    min_missed: int = 3
    #: A member without a connection cannot even be sent a keepalive: every this many seconds
    #: without one counts as a missed keepalive (a redial can take a dial timeout to fail).
    unreachable_miss_interval: float = 1.0
    #: Redials of a disconnected member: the first at once, then after redial_initial, doubling
    #: up to redial_max.
    redial_initial: float = 0.5
    redial_max: float = 4.0
    #: A DOWN member is redialed this often ...
    rejoin_interval: float = 10.0
    #: ... for this long after it went DOWN; then it is no longer watched.
    forget_after: float = 600.0
    #: The shell ticks about every tick_interval; a tick later than max_tick_gap after the previous
    #: one means this process was paused, and the pause is not the members' silence.
    tick_interval: float = 0.25
    max_tick_gap: float = 1.5

    def __post_init__(self) -> None:
        if not 0 < self.min_sample_interval <= self.prior_interval:
            raise ValueError("need 0 < min_sample_interval <= prior_interval")
        if self.window < 2 or self.min_std <= 0 or self.acceptable_pause < 0:
            raise ValueError("need window >= 2, min_std > 0 and acceptable_pause >= 0")
        if not 0 < self.suspect_phi <= self.down_phi:
            raise ValueError("need 0 < suspect_phi <= down_phi")
        if self.min_missed < 0 or self.min_down_after < 0:
            raise ValueError("min_missed and min_down_after must not be negative")
        if not 0 < self.redial_initial <= self.redial_max:
            raise ValueError("need 0 < redial_initial <= redial_max")
        if not 0 < self.tick_interval < self.max_tick_gap:
            raise ValueError("need 0 < tick_interval < max_tick_gap")
        if self.unreachable_miss_interval <= 0:
            raise ValueError("unreachable_miss_interval must be positive")


@dataclass(frozen=True, slots=True)
class StateChanged(Generic[P]):
    """``peer`` went from ``previous`` to ``state``; ``silent_for``: seconds since last heard;
    ``why``: what decided it."""

    peer: P
    previous: MemberState
    state: MemberState
    phi: float
    silent_for: float
    why: str


@dataclass(slots=True)
class _Member:
    arrivals: ArrivalWindow
    state: MemberState = MemberState.ALIVE
    connected: bool = True
    disconnected_at: float = 0.0
    missed: int = 0
    redial: RedialBackoff = field(default_factory=RedialBackoff)
    down_since: float | None = None


class LivenessCore(Generic[P]):
    """The liveness of the members being watched (see the module docstring)."""

    def __init__(self, config: LivenessConfig | None = None) -> None:
        self.config = config or LivenessConfig()
        self._members: dict[P, _Member] = {}
        self._last_tick: float | None = None
        #: Seconds of this process's own pauses forgiven so far (for reports).
        self.paused_total = 0.0

    # -- what is watched ----------------------------------------------------------------------
    def watch(self, peer: P, now: float, connected: bool = True) -> None:
        """Watch ``peer`` from ``now`` (ALIVE, heard now). Watching it again changes nothing."""
        if peer in self._members:
            return
        member = self._members[peer] = _Member(
            arrivals=ArrivalWindow(now), connected=connected, disconnected_at=now
        )
        if not connected:
            member.redial.start(now, self.config.redial_initial)

    def unwatch(self, peer: P) -> None:
        self._members.pop(peer, None)

    def watched(self) -> list[P]:
        return list(self._members)

    def state(self, peer: P) -> MemberState | None:
        """ALIVE, SUSPECT or DOWN; None for a peer not watched."""
        member = self._members.get(peer)
        return member.state if member is not None else None

    def silent_for(self, peer: P, now: float) -> float | None:
        member = self._members.get(peer)
        return None if member is None else max(0.0, now - member.arrivals.last_heard)

    def missed(self, peer: P) -> int:
        member = self._members.get(peer)
        return 0 if member is None else member.missed

    # -- events ---------------------------------------------------------------------------------
    def heard(self, peer: P, now: float) -> StateChanged[P] | None:
        """Something from ``peer`` arrived at ``now`` (an older time than the last one heard
        changes nothing). Returns the change to ALIVE, if it was not."""
        member = self._members.get(peer)
        if member is None or not member.arrivals.heard(now, self.config):
            return None
        member.missed = 0
        if member.state is MemberState.ALIVE:
            return None
        if not member.connected:
            # something arrived, so a connection exists (the shell's disconnect was stale)
            member.connected = True
            member.redial.stop()
        return self._move(peer, member, MemberState.ALIVE, now, "heard from")

    def probe_failed(self, peer: P, now: float) -> None:
        """A keepalive to ``peer`` went unanswered in time."""
        member = self._members.get(peer)
        if member is not None:
            member.missed += 1

    def connected(self, peer: P, now: float) -> StateChanged[P] | None:
        """``peer`` has a connection (again): it counts as heard, redials stop."""
        member = self._members.get(peer)
        if member is None:
            return None
        member.connected = True
        member.redial.stop()
        change = self.heard(peer, now)
        if change is None and member.state is not MemberState.ALIVE:
            change = self._move(peer, member, MemberState.ALIVE, now, "reconnected")
        return change

    def disconnected(self, peer: P, now: float) -> StateChanged[P] | None:
        """``peer`` lost its last connection: it is redialed, and SUSPECT meanwhile."""
        member = self._members.get(peer)
        if member is None or not member.connected:
            return None
        member.connected = False
        member.disconnected_at = now
        member.redial.start(now, self.config.redial_initial)
        if member.state is MemberState.ALIVE:
            return self._move(peer, member, MemberState.SUSPECT, now, "disconnected")
        return None

    def redial_failed(self, peer: P, now: float) -> None:
        """A redial of ``peer`` failed: a missed keepalive; the next one waits longer."""
        member = self._members.get(peer)
        if member is None or member.connected:
            return
        member.missed += 1
        if member.state is MemberState.DOWN:
            member.redial.wait_until(now + self.config.rejoin_interval)
        else:
            member.redial.failed(now, self.config.redial_max)

    def declare_down(self, peer: P, now: float, why: str) -> StateChanged[P] | None:
        """The shell knows ``peer`` is gone (it restarted, its task sessions keep breaking):
        DOWN now, redialed to rejoin as any DOWN member."""
        member = self._members.get(peer)
        if member is None or member.state is MemberState.DOWN:
            return None
        return self._move(peer, member, MemberState.DOWN, now, why)

    # -- judgement ------------------------------------------------------------------------------
    def phi(self, peer: P, now: float) -> float:
        """The suspicion level of ``peer`` at ``now`` (0 for a peer not watched)."""
        member = self._members.get(peer)
        return 0.0 if member is None else member.arrivals.phi(now, self.config)

    def tick(self, now: float) -> list[Redial[P] | StateChanged[P]]:
        """Redials due at ``now`` and state changes, in the order peers were watched."""
        cfg = self.config
        if self._last_tick is not None:
            gap = now - self._last_tick
            if gap > cfg.max_tick_gap:  # this process was paused: not the members' silence
                pause = gap - cfg.tick_interval
                self.paused_total += pause
                for member in self._members.values():
                    member.arrivals.forgive(pause, now)
                    member.disconnected_at = min(now, member.disconnected_at + pause)
        self._last_tick = now
        actions: list[Redial[P] | StateChanged[P]] = []
        forget = []
        for peer, member in self._members.items():
            if member.state is MemberState.DOWN:
                assert member.down_since is not None
                if now - member.down_since >= cfg.forget_after:
                    forget.append(peer)
                    continue
            if not member.connected and member.redial.due(now):
                actions.append(Redial(peer))
            change = self._judge(peer, member, now)
            if change is not None:
                actions.append(change)
        for peer in forget:
            del self._members[peer]
        return actions

    def _judge(self, peer: P, member: _Member, now: float) -> StateChanged[P] | None:
        if member.state is MemberState.DOWN:
            return None
        cfg = self.config
        last_heard = member.arrivals.last_heard
        if not member.connected:
            unreachable = now - max(member.disconnected_at, last_heard)
            member.missed = max(member.missed, int(unreachable / cfg.unreachable_miss_interval))
        verdict, _ = member.arrivals.verdict(now, member.state, member.missed, cfg)
        silent = now - last_heard
        if verdict is MemberState.DOWN:
            return self._move(
                peer,
                member,
                MemberState.DOWN,
                now,
                f"silent {silent:.1f} s, {member.missed} keepalives missed"
                + ("" if member.connected else ", not reachable"),
            )
        if verdict is MemberState.SUSPECT:
            return self._move(peer, member, MemberState.SUSPECT, now, f"silent {silent:.1f} s")
        return None

    def _move(
        self, peer: P, member: _Member, state: MemberState, now: float, why: str
    ) -> StateChanged[P]:
        previous = member.state
        member.state = move(previous, state)
        if state is MemberState.DOWN:
            member.down_since = now
            member.redial.wait_until(now + self.config.rejoin_interval)
        elif previous is MemberState.DOWN:
            member.down_since = None
        phi = member.arrivals.phi(now, self.config)
        silent = max(0.0, now - member.arrivals.last_heard)
        return StateChanged(peer, previous, state, phi, silent, why)
