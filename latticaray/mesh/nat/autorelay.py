"""Relay selection and reservation management (sans-I/O), libp2p AutoRelay-style.

:class:`AutoRelayCore` decides which relays a node holds reservations on. Its inputs are plain
method calls with ``now``; its outputs are frozen-dataclass actions the asyncio shell
(:class:`~latticaray.mesh.nat.reservations.ReservationService`) carries out and reports back.

* Candidates come from discovery (peers that advertise the relay service in identify or in the
  DHT) and from the user (*pinned* relays, always kept, whatever the need).
* While the node needs relays (it is not publicly reachable) the core keeps ``want``
  reservations (default two): it measures each candidate's round-trip time (:class:`MeasureRtt`)
  and reserves on the fastest ready one (:class:`Reserve`).
* A reservation that is lost (the relay died, its stream ended) is replaced at once by the next
  best candidate; the lost relay is retried after a capped exponential backoff (a pinned one at
  once first). A candidate whose RTT probe or reservation fails backs off the same way.
* Short of candidates it asks for more (:class:`Discover`, at most every ``discover_interval``);
  still without any reservation ``no_relay_grace`` seconds after it started needing one, it says
  so once (:class:`NoRelayFound`, with every relay it tried and why it failed).
* When the node stops needing relays (it became public) it releases the unpinned ones
  (:class:`Release`).

Each candidate's lifecycle is a :class:`Phase` with its transitions in :data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.Enum):
    NEW = "new"  # RTT not measured yet
    MEASURING = "measuring"
    READY = "ready"  # RTT known, no reservation
    RESERVING = "reserving"
    RESERVED = "reserved"
    BACKOFF = "backoff"  # failed or lost: retried at ``next_attempt``


class Event(enum.Enum):
    MEASURE = "measure"
    MEASURED = "measured"
    RESERVE = "reserve"
    RESERVED = "reserved"
    FAILED = "failed"
    LOST = "lost"
    RELEASE = "release"
    RETRY = "retry"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.NEW, Event.MEASURE): Phase.MEASURING,
    (Phase.MEASURING, Event.MEASURED): Phase.READY,
    (Phase.MEASURING, Event.FAILED): Phase.BACKOFF,
    (Phase.NEW, Event.RESERVE): Phase.RESERVING,  # pinned relays need no RTT
    (Phase.READY, Event.RESERVE): Phase.RESERVING,
    (Phase.RESERVING, Event.RESERVED): Phase.RESERVED,
    (Phase.RESERVING, Event.FAILED): Phase.BACKOFF,
    (Phase.RESERVED, Event.LOST): Phase.BACKOFF,
    (Phase.RESERVED, Event.RELEASE): Phase.READY,
    (Phase.BACKOFF, Event.RETRY): Phase.READY,  # NEW instead when the RTT is still unknown
}
"""(phase, event) -> next phase; any other pair is a bug in the caller (:class:`ValueError`)."""


# ------------------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class MeasureRtt:
    """Measure the round-trip time to ``relay``; report :meth:`AutoRelayCore.on_rtt`."""

    relay: str


@dataclass(frozen=True)
class Reserve:
    """Reserve a slot on ``relay`` at ``addr``; report ``on_reserved`` or ``on_failed``."""

    relay: str
    addr: str


@dataclass(frozen=True)
class Release:
    """Close the reservation on ``relay`` (it is no longer needed)."""

    relay: str


@dataclass(frozen=True)
class Discover:
    """Look for more relay candidates (e.g. DHT providers of the relay service)."""


@dataclass(frozen=True)
class NoRelayFound:
    """The node needs a relay and holds none after the grace period; ``tried`` says why."""

    tried: tuple[tuple[str, str], ...]  # (relay, its last error or phase)


Action = MeasureRtt | Reserve | Release | Discover | NoRelayFound


# --------------------------------------------------------------------------------------- core
@dataclass
class AutoRelayConfig:
    want: int = 2  # reservations to hold while the node needs relays
    max_candidates: int = 32
    max_measuring: int = 4  # RTT probes in flight at once
    rtt_wait: float = 0.5  # a ready candidate waits this long for slower probes to compare
    retry_base: float = 1.0
    retry_max: float = 60.0
    discover_interval: float = 30.0
    no_relay_grace: float = 10.0


@dataclass
class Candidate:
    relay: str
    addr: str  # the relay's own address (multiaddr text without /p2p)
    pinned: bool = False
    phase: Phase = Phase.NEW
    rtt: float | None = None
    failures: int = 0
    next_attempt: float = 0.0
    expires: float = 0.0  # of the reservation, as granted (renewals keep it alive)
    ready_at: float = 0.0
    last_error: str | None = None

    def step(self, event: Event) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise ValueError(f"relay {self.relay}: no transition from {self.phase} on {event}")
        self.phase = nxt


class AutoRelayCore:
    """Which relays to reserve on, and when (see the module docstring)."""

    def __init__(self, config: AutoRelayConfig | None = None) -> None:
        self.config = config or AutoRelayConfig()
        self.candidates: dict[str, Candidate] = {}
        self.needed = False
        self._missing_since: float | None = None  # needed, and no reservation held since
        self._reported_missing = False
        self._last_discover: float | None = None

    # -- inputs ----------------------------------------------------------------------------
    def add_candidate(
        self, relay: str, addr: str, now: float, *, pinned: bool = False
    ) -> list[Action]:
        """A relay became known (discovered, or given by the user with ``pinned``)."""
        existing = self.candidates.get(relay)
        if existing is not None:
            existing.addr = addr
            existing.pinned = existing.pinned or pinned
            return self.plan(now)
        if len(self.candidates) >= self.config.max_candidates and not pinned:
            return []
        self.candidates[relay] = Candidate(relay, addr, pinned, next_attempt=now)
        return self.plan(now)

    def add_reserved(
        self, relay: str, addr: str, ttl: float, now: float, *, pinned: bool = True
    ) -> list[Action]:
        """A reservation the user made directly: the core keeps it from now on."""
        cand = self.candidates.get(relay)
        if cand is None:
            cand = self.candidates[relay] = Candidate(relay, addr, pinned)
        cand.addr, cand.pinned = addr, cand.pinned or pinned
        if cand.phase is not Phase.RESERVED:
            cand.phase = Phase.RESERVED
            self._reserved(cand, ttl, now)
        return self.plan(now)

    def set_needed(self, needed: bool, now: float) -> list[Action]:
        """Whether the node needs relays (it is not publicly reachable)."""
        self.needed = needed
        return self.plan(now)

    def on_rtt(self, relay: str, rtt: float | None, now: float, error: str = "") -> list[Action]:
        """The RTT probe of ``relay`` ended: ``rtt`` in seconds, or None with ``error``."""
        cand = self.candidates.get(relay)
        if cand is None or cand.phase is not Phase.MEASURING:
            return []
        if rtt is None:
            self._fail(cand, f"RTT probe failed: {error}" if error else "RTT probe failed", now)
        else:
            cand.rtt = rtt
            cand.ready_at = now
            cand.step(Event.MEASURED)
        return self.plan(now)

    def on_reserved(self, relay: str, ttl: float, now: float) -> list[Action]:
        cand = self.candidates.get(relay)
        if cand is None or cand.phase is not Phase.RESERVING:
            return []
        cand.step(Event.RESERVED)
        self._reserved(cand, ttl, now)
        return self.plan(now)

    def on_failed(self, relay: str, error: str, now: float) -> list[Action]:
        """The reservation attempt on ``relay`` failed."""
        cand = self.candidates.get(relay)
        if cand is None or cand.phase is not Phase.RESERVING:
            return []
        self._fail(cand, error, now)
        return self.plan(now)

    def on_lost(self, relay: str, now: float, error: str = "reservation lost") -> list[Action]:
        """A held reservation ended (the relay died or closed its stream)."""
        cand = self.candidates.get(relay)
        if cand is None or cand.phase is not Phase.RESERVED:
            return []
        cand.step(Event.LOST)
        cand.last_error = error
        if cand.pinned:  # the user's relay: try again at once, then back off
            cand.next_attempt = now
        else:
            cand.failures += 1
            cand.next_attempt = now + self._backoff(cand.failures)
        return self.plan(now)

    def tick(self, now: float) -> list[Action]:
        return self.plan(now)

    # -- outputs ---------------------------------------------------------------------------
    def reserved(self) -> list[Candidate]:
        return [c for c in self.candidates.values() if c.phase is Phase.RESERVED]

    def next_timer(self) -> float | None:
        times = [c.next_attempt for c in self.candidates.values() if c.phase is Phase.BACKOFF]
        if not self._reported_missing and self._missing_since is not None:
            times.append(self._missing_since + self.config.no_relay_grace)
        if self.needed and self._last_discover is not None and self._short():
            times.append(self._last_discover + self.config.discover_interval)
        waiting = self._rtt_wait_until()
        if self.needed and waiting is not None and self._held() < self.config.want:
            times.append(waiting)
        return min(times) if times else None

    def plan(self, now: float) -> list[Action]:
        """Everything due now (called by every input; also on :meth:`tick`)."""
        actions: list[Action] = []
        for cand in self.candidates.values():
            if cand.phase is Phase.BACKOFF and cand.next_attempt <= now:
                cand.step(Event.RETRY)
                cand.ready_at = now
                if cand.rtt is None:
                    cand.phase = Phase.NEW
        for cand in self.candidates.values():  # the user's relays, whatever the need
            if cand.pinned and cand.phase in (Phase.NEW, Phase.READY):
                actions.append(self._reserve(cand))
        if self.needed and self.reserved():
            self._missing_since, self._reported_missing = None, False
        elif self.needed and self._missing_since is None:
            self._missing_since = now
        elif not self.needed:
            self._missing_since, self._reported_missing = None, False
        if self.needed:
            actions += self._fill(now)
        else:
            for cand in self.candidates.values():
                if cand.phase is Phase.RESERVED and not cand.pinned:
                    cand.step(Event.RELEASE)
                    actions.append(Release(cand.relay))
        return actions

    # -- internals -------------------------------------------------------------------------
    def _fill(self, now: float) -> list[Action]:
        actions: list[Action] = []
        held = self._held()
        ready = sorted(
            (c for c in self.candidates.values() if c.phase is Phase.READY),
            key=lambda c: (c.rtt if c.rtt is not None else float("inf"), c.relay),
        )
        waiting = self._rtt_wait_until()
        if waiting is None or now >= waiting:  # pick by RTT among the probes answered so far
            for cand in ready[: max(0, self.config.want - held)]:
                actions.append(self._reserve(cand))
        measuring = sum(1 for c in self.candidates.values() if c.phase is Phase.MEASURING)
        for cand in self.candidates.values():
            if cand.phase is Phase.NEW and measuring < self.config.max_measuring:
                cand.step(Event.MEASURE)
                measuring += 1
                actions.append(MeasureRtt(cand.relay))
        if self._short() and (
            self._last_discover is None
            or now - self._last_discover >= self.config.discover_interval
        ):
            self._last_discover = now
            actions.append(Discover())
        if (
            not self._reported_missing
            and self._missing_since is not None
            and now - self._missing_since >= self.config.no_relay_grace
        ):
            self._reported_missing = True
            tried = tuple(
                (c.relay, c.last_error or c.phase.value) for c in self.candidates.values()
            )
            actions.append(NoRelayFound(tried))
        return actions

    def _held(self) -> int:
        return sum(1 for c in self.candidates.values() if c.phase in _HOLDING)

    def _rtt_wait_until(self) -> float | None:
        """While RTT probes are in flight, ready candidates wait for them until this time."""
        if not any(c.phase is Phase.MEASURING for c in self.candidates.values()):
            return None
        ready = [c.ready_at for c in self.candidates.values() if c.phase is Phase.READY]
        return min(ready) + self.config.rtt_wait if ready else None

    def _short(self) -> bool:
        """Fewer usable candidates than reservations wanted."""
        usable = sum(1 for c in self.candidates.values() if c.phase is not Phase.BACKOFF)
        return usable < self.config.want

    def _reserve(self, cand: Candidate) -> Reserve:
        cand.step(Event.RESERVE)
        return Reserve(cand.relay, cand.addr)

    def _reserved(self, cand: Candidate, ttl: float, now: float) -> None:
        cand.expires = now + ttl
        cand.failures = 0
        cand.last_error = None

    def _fail(self, cand: Candidate, error: str, now: float) -> None:
        cand.step(Event.FAILED)
        cand.failures += 1
        cand.last_error = error
        cand.next_attempt = now + self._backoff(cand.failures)

    def _backoff(self, failures: int) -> float:
        return float(min(self.config.retry_max, self.config.retry_base * 2 ** (failures - 1)))


_HOLDING = (Phase.RESERVING, Phase.RESERVED)
