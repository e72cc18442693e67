"""The phi-accrual failure detector's shared parts (sans-I/O), used by every liveness core.

Two cores judge liveness with them: the mesh's connection liveness (:mod:`.core`, which sends its
own keepalive probes) and the runtime's member liveness (``runtime/remote/liveness.py``, fed by
membership). Each keeps its own inputs and actions; what they judge with is this:

* :class:`PeerLiveness` and :data:`TRANSITIONS`: the states of a watched peer and their moves;
* :class:`ArrivalWindow`: when a peer was last heard, the recent gaps between hearings, its
  suspicion level phi at ``now`` and the state that level calls for;
* :class:`RedialBackoff` and the :class:`Redial` action: when a peer without a connection is
  dialed again.

The suspicion level is phi (Hayashibara et al., "The phi accrual failure detector", 2004): with
the recent gaps (at most ``window``; gaps under ``min_sample_interval`` are not sampled, so a busy
link does not make the detector twitchy) as a normal distribution of mean ``m`` (``prior_interval``
before any gap was sampled) and deviation ``s`` (at least ``min_std``),
``phi = -log10 P(gap > t)`` where ``t`` is the time since the peer was last heard less
``acceptable_pause``. A peer is ``SUSPECT`` once phi reaches ``suspect_phi``; it is ``DOWN`` only
when phi reaches ``down_phi`` *and* it has been silent for ``min_down_after`` *and* at least
``min_missed`` keepalives (or redials) failed since it was last heard.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

__all__ = [
    "TRANSITIONS",
    "ArrivalWindow",
    "PeerLiveness",
    "PhiSettings",
    "Redial",
    "RedialBackoff",
]

P = TypeVar("P")


class PeerLiveness(enum.Enum):
    """What the detector believes about a watched peer."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DOWN = "down"


#: The moves a watched peer's state may make.
TRANSITIONS: Final[dict[PeerLiveness, frozenset[PeerLiveness]]] = {
    PeerLiveness.ALIVE: frozenset({PeerLiveness.SUSPECT, PeerLiveness.DOWN}),
    PeerLiveness.SUSPECT: frozenset({PeerLiveness.ALIVE, PeerLiveness.DOWN}),
    PeerLiveness.DOWN: frozenset({PeerLiveness.ALIVE}),
}


@dataclass(frozen=True, slots=True)
class Redial(Generic[P]):
    """Dial ``peer`` again (any path it has: direct, hole-punched, relayed); report
    ``connected`` or ``redial_failed``."""

    peer: P


class PhiSettings(Protocol):
    """The tuning an :class:`ArrivalWindow` judges with (each core's config has it)."""

    @property
    def min_sample_interval(self) -> float: ...

    @property
    def window(self) -> int: ...

    @property
    def prior_interval(self) -> float: ...

    @property
    def min_std(self) -> float: ...

    @property
    def acceptable_pause(self) -> float: ...

    @property
    def suspect_phi(self) -> float: ...

    @property
    def down_phi(self) -> float: ...

    @property
    def min_down_after(self) -> float: ...

    @property
    def min_missed(self) -> int: ...


class ArrivalWindow:
    """When one peer was last heard and the recent gaps between hearings; phi from them."""

    __slots__ = ("_gap_sq_sum", "_gap_sum", "_gaps", "last_heard")

    def __init__(self, now: float) -> None:
        #: When the peer was last heard (moved by :meth:`forgive` over this process's pauses).
        self.last_heard = now
        self._gaps: deque[float] = deque()
        self._gap_sum = 0.0
        self._gap_sq_sum = 0.0

    def heard(self, now: float, settings: PhiSettings) -> bool:
        """The peer was heard at ``now``: sample the gap since it was last heard. False (nothing
        changed) when ``now`` is not later than that."""
        gap = now - self.last_heard
        if gap <= 0:
            return False
        if gap >= settings.min_sample_interval:
            gaps = self._gaps
            gaps.append(gap)
            self._gap_sum += gap
            self._gap_sq_sum += gap * gap
            if len(gaps) > settings.window:
                old = gaps.popleft()
                self._gap_sum -= old
                self._gap_sq_sum -= old * old
        self.last_heard = now
        return True

    def forgive(self, pause: float, now: float) -> None:
        """This process was paused for ``pause`` s: that is not the peer's silence."""
        self.last_heard = min(now, self.last_heard + pause)

    def phi(self, now: float, settings: PhiSettings) -> float:
        """The suspicion level at ``now``."""
        n = len(self._gaps)
        if n == 0:
            mean, std = settings.prior_interval, settings.min_std
        else:
            mean = self._gap_sum / n
            variance = max(self._gap_sq_sum / n - mean * mean, 0.0)
            std = max(math.sqrt(variance), settings.min_std)
        elapsed = now - self.last_heard
        z = (elapsed - mean - settings.acceptable_pause) / (std * math.sqrt(2.0))
        p_later = 0.5 * math.erfc(z)
        if p_later <= 1e-300:
            return 300.0
        return max(0.0, -math.log10(p_later))

    def verdict(
        self, now: float, state: PeerLiveness, missed: int, settings: PhiSettings
    ) -> tuple[PeerLiveness | None, float]:
        """The state phi calls for at ``now`` for a peer in ``state`` that missed ``missed``
        keepalives since it was last heard (DOWN, SUSPECT, or None for no move), and phi."""
        phi = self.phi(now, settings)
        if (
            phi >= settings.down_phi
            and now - self.last_heard >= settings.min_down_after
            and missed >= settings.min_missed
        ):
            return PeerLiveness.DOWN, phi
        if phi >= settings.suspect_phi and state is PeerLiveness.ALIVE:
            return PeerLiveness.SUSPECT, phi
        return None, phi


@dataclass(slots=True)
class RedialBackoff:
    """When a peer without a connection is dialed again: at once, then after a delay that
    doubles from ``initial`` up to ``maximum`` with each failed redial."""

    redialing: bool = False
    next_at: float = 0.0
    delay: float = 0.0

    def start(self, now: float, initial: float) -> None:
        """The peer lost its connection at ``now``: redial it at once."""
        self.redialing = False
        self.delay = initial
        self.next_at = now

    def due(self, now: float) -> bool:
        """Whether a redial is to start at ``now`` (it then is in flight)."""
        if self.redialing or now < self.next_at:
            return False
        self.redialing = True
        return True

    def failed(self, now: float, maximum: float) -> None:
        """The redial in flight failed: the next one waits, and the one after twice as long."""
        self.redialing = False
        self.next_at = now + self.delay
        self.delay = min(self.delay * 2, maximum)

    def stop(self) -> None:
        """The peer has a connection: no redial is in flight."""
        self.redialing = False

    def wait_until(self, when: float) -> None:
        """No redial in flight; the next one not before ``when``."""
        self.redialing = False
        self.next_at = when
