"""Sans-I/O peer liveness: a phi-accrual failure detector with keepalive probes and redial.

:class:`LivenessCore` decides, for each peer it watches, whether the peer is ``ALIVE``,
``SUSPECT`` or ``DOWN``, from what the shell tells it and ``now``:

* ``heard(peer, now)``: anything arrived from the peer (any RPC traffic on its connection, a
  probe's answer). The gaps between the times it was heard feed the detector (gaps shorter than
  ``min_sample_interval`` are not sampled, so a busy link does not make it jumpy).
* ``probe_failed(peer, now)``: a keepalive probe got no answer in time (a missed keepalive).
* ``connected(peer, now)`` / ``disconnected(peer, now)``: the peer has / no longer has a
  connection; while it has none the core asks for redials, with backoff.

:meth:`LivenessCore.tick` returns the actions for the shell: :class:`Probe` (send a keepalive to a
peer that has been quiet for ``probe_interval``), :class:`Redial` (dial a disconnected peer
again: its direct addresses, then relayed ones) and :class:`LivenessChanged` (a state change to
report).

The suspicion level is phi (Hayashibara et al., "The phi accrual failure detector", 2004):
``phi = -log10(P(a heartbeat arrives later than now))`` under a normal distribution of the
recent inter-arrival times (mean plus ``acceptable_pause``, deviation at least ``min_std``). A
peer is ``SUSPECT`` once phi reaches ``suspect_phi``; it is ``DOWN`` only when phi reaches
``down_phi`` *and* it has been silent for ``min_down_after`` seconds *and* at least
``min_missed_probes`` keepalives went unanswered (or redials failed) since it was last heard: one
stalled call, one lost probe or one slow answer never declares a peer gone. Hearing from a peer
makes it ``ALIVE`` again at once. States and their allowed moves are :data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

__all__ = [
    "TRANSITIONS",
    "LivenessChanged",
    "LivenessConfig",
    "LivenessCore",
    "PeerLiveness",
    "Probe",
    "Redial",
]

P = TypeVar("P")


class PeerLiveness(enum.Enum):
    """What the detector believes about a watched peer."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DOWN = "down"


TRANSITIONS: Final[dict[PeerLiveness, frozenset[PeerLiveness]]] = {
    PeerLiveness.ALIVE: frozenset({PeerLiveness.SUSPECT, PeerLiveness.DOWN}),
    PeerLiveness.SUSPECT: frozenset({PeerLiveness.ALIVE, PeerLiveness.DOWN}),
    PeerLiveness.DOWN: frozenset({PeerLiveness.ALIVE}),
}


@dataclass(frozen=True)
class LivenessConfig:
    """Tuning of the detector. Defaults: a quiet peer is probed every second; a healthy peer on a
    link with 50 ms round trips and a few percent loss stays ALIVE; a dead one is DOWN after about
    6-8 s."""

    #: Probe a connected peer when nothing was heard from it (or probed) for this long.
    probe_interval: float = 1.0
    #: How long the shell waits for a probe's answer before reporting ``probe_failed``.
    probe_timeout: float = 2.0
    #: Gaps between arrivals shorter than this are not sampled (busy links send many frames).
    min_sample_interval: float = 0.1
    #: Inter-arrival times kept for the estimate.
    window: int = 100
    #: Floor of the deviation of inter-arrival times, in seconds (keeps phi sane on a steady link).
    min_std: float = 0.5
    #: Silence tolerated on top of the mean inter-arrival time (GC pauses, retransmits, bursts).
    acceptable_pause: float = 2.0
    suspect_phi: float = 3.0
    down_phi: float = 8.0
    #: A peer is never DOWN before it has been silent this long ...
    min_down_after: float = 5.0
    #: ... and this many keepalives (or redials) failed since it was last heard.
    min_missed_probes: int = 3
    #: Redial backoff: first retry after redial_initial, doubling up to redial_max.
    redial_initial: float = 0.25
    redial_max: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.min_sample_interval <= self.probe_interval:
            raise ValueError("need 0 < min_sample_interval <= probe_interval")
        if self.probe_timeout <= 0 or self.min_std <= 0 or self.window < 2:
            raise ValueError("probe_timeout and min_std must be positive, window at least 2")
        if not 0 < self.suspect_phi <= self.down_phi:
            raise ValueError("need 0 < suspect_phi <= down_phi")
        if not 0 < self.redial_initial <= self.redial_max:
            raise ValueError("need 0 < redial_initial <= redial_max")


@dataclass(frozen=True, slots=True)
class Probe(Generic[P]):
    """Send a keepalive to ``peer``; report ``heard`` or ``probe_failed``."""

    peer: P


@dataclass(frozen=True, slots=True)
class Redial(Generic[P]):
    """Dial ``peer`` again; report ``connected`` or ``redial_failed``."""

    peer: P


@dataclass(frozen=True, slots=True)
class LivenessChanged(Generic[P]):
    """``peer`` moved from ``previous`` to ``state``; ``silent_for``: seconds since last heard."""

    peer: P
    state: PeerLiveness
    previous: PeerLiveness
    phi: float
    silent_for: float


Action = Probe[P] | Redial[P] | LivenessChanged[P]


@dataclass(slots=True)
class _Peer:
    last_heard: float
    state: PeerLiveness = PeerLiveness.ALIVE
    intervals: deque[float] = field(default_factory=deque)
    total: float = 0.0
    total_sq: float = 0.0
    connected: bool = True
    probe_sent: float | None = None  # when the outstanding probe went out
    last_probe: float = -math.inf
    missed: int = 0
    next_redial: float = 0.0
    redial_delay: float = 0.0
    redialing: bool = False


class LivenessCore(Generic[P]):
    """Liveness of the peers being watched (see the module docstring). ``P``: a peer id type."""

    def __init__(self, config: LivenessConfig | None = None) -> None:
        self.config = config or LivenessConfig()
        self._peers: dict[P, _Peer] = {}

    # -- what is watched ---------------------------------------------------------------------
    def watch(self, peer: P, now: float, connected: bool = True) -> None:
        """Start watching ``peer`` (ALIVE; heard ``now``). Watching again changes nothing."""
        if peer in self._peers:
            return
        self._peers[peer] = _Peer(last_heard=now, connected=connected)
        if not connected:
            self._start_redialing(self._peers[peer], now)

    def unwatch(self, peer: P) -> None:
        self._peers.pop(peer, None)

    def watched(self) -> list[P]:
        return list(self._peers)

    def state(self, peer: P) -> PeerLiveness | None:
        """The peer's state, or None if it is not watched."""
        entry = self._peers.get(peer)
        return entry.state if entry is not None else None

    def last_heard(self, peer: P) -> float | None:
        entry = self._peers.get(peer)
        return entry.last_heard if entry is not None else None

    # -- inputs --------------------------------------------------------------------------------
    def heard(self, peer: P, now: float) -> LivenessChanged[P] | None:
        """Something arrived from ``peer`` at ``now``; returns the change to ALIVE, if any."""
        entry = self._peers.get(peer)
        if entry is None:
            return None
        entry.probe_sent = None
        entry.missed = 0
        gap = now - entry.last_heard
        if gap > 0:
            if gap >= self.config.min_sample_interval:
                self._sample(entry, gap)
            entry.last_heard = now
        return self._move(peer, entry, PeerLiveness.ALIVE, now)

    def probe_failed(self, peer: P, now: float) -> None:
        """The outstanding keepalive of ``peer`` went unanswered."""
        entry = self._peers.get(peer)
        if entry is None or entry.probe_sent is None:
            return
        entry.probe_sent = None
        entry.missed += 1

    def connected(self, peer: P, now: float) -> LivenessChanged[P] | None:
        """``peer`` has a connection (again): it is heard, redialing stops."""
        entry = self._peers.get(peer)
        if entry is None:
            return None
        entry.connected = True
        entry.redialing = False
        entry.probe_sent = None
        return self.heard(peer, now)

    def disconnected(self, peer: P, now: float) -> None:
        """``peer`` lost its last connection: redial it (at once, then with backoff)."""
        entry = self._peers.get(peer)
        if entry is None or not entry.connected:
            return
        entry.connected = False
        entry.probe_sent = None
        self._start_redialing(entry, now)

    def redial_failed(self, peer: P, now: float) -> None:
        """A redial of ``peer`` failed; it counts as a missed keepalive."""
        entry = self._peers.get(peer)
        if entry is None or entry.connected:
            return
        entry.redialing = False
        entry.missed += 1
        entry.next_redial = now + entry.redial_delay
        entry.redial_delay = min(entry.redial_delay * 2, self.config.redial_max)

    # -- outputs -------------------------------------------------------------------------------
    def phi(self, peer: P, now: float) -> float:
        """The suspicion level of ``peer`` at ``now`` (0 for an unwatched peer)."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0.0
        return self._phi(entry, now)

    def tick(self, now: float) -> list[Probe[P] | Redial[P] | LivenessChanged[P]]:
        """Probes and redials due at ``now``, and state changes, in peer order."""
        cfg = self.config
        actions: list[Probe[P] | Redial[P] | LivenessChanged[P]] = []
        for peer, entry in self._peers.items():
            if entry.connected:
                if entry.probe_sent is not None and now - entry.probe_sent >= cfg.probe_timeout:
                    # the shell never reported on it: count it as missed
                    entry.probe_sent = None
                    entry.missed += 1
                quiet_since = max(entry.last_heard, entry.last_probe)
                if entry.probe_sent is None and now - quiet_since >= cfg.probe_interval:
                    entry.probe_sent = now
                    entry.last_probe = now
                    actions.append(Probe(peer))
            elif not entry.redialing and now >= entry.next_redial:
                entry.redialing = True
                actions.append(Redial(peer))
            change = self._judge(peer, entry, now)
            if change is not None:
                actions.append(change)
        return actions

    # -- the detector --------------------------------------------------------------------------
    def _sample(self, entry: _Peer, gap: float) -> None:
        intervals = entry.intervals
        intervals.append(gap)
        entry.total += gap
        entry.total_sq += gap * gap
        if len(intervals) > self.config.window:
            old = intervals.popleft()
            entry.total -= old
            entry.total_sq -= old * old

    def _phi(self, entry: _Peer, now: float) -> float:
        cfg = self.config
        n = len(entry.intervals)
        if n == 0:
            mean, std = cfg.probe_interval, cfg.min_std
        else:
            mean = entry.total / n
            variance = max(entry.total_sq / n - mean * mean, 0.0)
            std = max(math.sqrt(variance), cfg.min_std)
        elapsed = now - entry.last_heard
        z = (elapsed - mean - cfg.acceptable_pause) / (std * math.sqrt(2.0))
        p_later = 0.5 * math.erfc(z)
        if p_later <= 1e-300:
            return 300.0
        return max(0.0, -math.log10(p_later))

    def _judge(self, peer: P, entry: _Peer, now: float) -> LivenessChanged[P] | None:
        cfg = self.config
        phi = self._phi(entry, now)
        if (
            phi >= cfg.down_phi
            and now - entry.last_heard >= cfg.min_down_after
            and entry.missed >= cfg.min_missed_probes
        ):
            return self._move(peer, entry, PeerLiveness.DOWN, now, phi)
        if phi >= cfg.suspect_phi and entry.state is PeerLiveness.ALIVE:
            return self._move(peer, entry, PeerLiveness.SUSPECT, now, phi)
        return None

    def _move(
        self, peer: P, entry: _Peer, state: PeerLiveness, now: float, phi: float | None = None
    ) -> LivenessChanged[P] | None:
        previous = entry.state
        if state is previous or state not in TRANSITIONS[previous]:
            return None
        entry.state = state
        return LivenessChanged(
            peer,
            state,
            previous,
            self._phi(entry, now) if phi is None else phi,
            now - entry.last_heard,
        )

    def _start_redialing(self, entry: _Peer, now: float) -> None:
        entry.redialing = False
        entry.redial_delay = self.config.redial_initial
        entry.next_redial = now
