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

The suspicion level is phi (Hayashibara et al., "The phi accrual failure detector", 2004),
judged by :mod:`.phi` (shared with the runtime's member liveness):
``phi = -log10(P(a heartbeat arrives later than now))`` under a normal distribution of the
recent inter-arrival times (mean plus ``acceptable_pause``, deviation at least ``min_std``). A
peer is ``SUSPECT`` once phi reaches ``suspect_phi``; it is ``DOWN`` only when phi reaches
``down_phi`` *and* it has been silent for ``min_down_after`` seconds *and* at least
``min_missed_probes`` keepalives went unanswered (or redials failed) since it was last heard: one
stalled call, one lost probe or one slow answer never declares a peer gone. Hearing from a peer
makes it ``ALIVE`` again at once. States and their allowed moves are :data:`TRANSITIONS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .phi import TRANSITIONS, ArrivalWindow, PeerLiveness, Redial, RedialBackoff

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

    @property
    def prior_interval(self) -> float:
        """The gap assumed before any was sampled: the probe interval."""
        return self.probe_interval

    @property
    def min_missed(self) -> int:
        return self.min_missed_probes

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
    arrivals: ArrivalWindow
    state: PeerLiveness = PeerLiveness.ALIVE
    connected: bool = True
    probe_sent: float | None = None  # when the outstanding probe went out
    last_probe: float = -math.inf
    missed: int = 0
    redial: RedialBackoff = field(default_factory=RedialBackoff)


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
        entry = self._peers[peer] = _Peer(arrivals=ArrivalWindow(now), connected=connected)
        if not connected:
            entry.redial.start(now, self.config.redial_initial)

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
        return entry.arrivals.last_heard if entry is not None else None

    # -- inputs --------------------------------------------------------------------------------
    def heard(self, peer: P, now: float) -> LivenessChanged[P] | None:
        """Something arrived from ``peer`` at ``now``; returns the change to ALIVE, if any."""
        entry = self._peers.get(peer)
        if entry is None:
            return None
        entry.probe_sent = None
        entry.missed = 0
        entry.arrivals.heard(now, self.config)
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
        entry.redial.stop()
        entry.probe_sent = None
        return self.heard(peer, now)

    def disconnected(self, peer: P, now: float) -> None:
        """``peer`` lost its last connection: redial it (at once, then with backoff)."""
        entry = self._peers.get(peer)
        if entry is None or not entry.connected:
            return
        entry.connected = False
        entry.probe_sent = None
        entry.redial.start(now, self.config.redial_initial)

    def redial_failed(self, peer: P, now: float) -> None:
        """A redial of ``peer`` failed; it counts as a missed keepalive."""
        entry = self._peers.get(peer)
        if entry is None or entry.connected:
            return
        entry.missed += 1
        entry.redial.failed(now, self.config.redial_max)

    # -- outputs -------------------------------------------------------------------------------
    def phi(self, peer: P, now: float) -> float:
        """The suspicion level of ``peer`` at ``now`` (0 for an unwatched peer)."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0.0
        return entry.arrivals.phi(now, self.config)

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
                quiet_since = max(entry.arrivals.last_heard, entry.last_probe)
                if entry.probe_sent is None and now - quiet_since >= cfg.probe_interval:
                    entry.probe_sent = now
                    entry.last_probe = now
                    actions.append(Probe(peer))
            elif entry.redial.due(now):
                actions.append(Redial(peer))
            verdict, phi = entry.arrivals.verdict(now, entry.state, entry.missed, cfg)
            if verdict is not None:
                change = self._move(peer, entry, verdict, now, phi)
                if change is not None:
                    actions.append(change)
        return actions

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
            entry.arrivals.phi(now, self.config) if phi is None else phi,
            now - entry.arrivals.last_heard,
        )
