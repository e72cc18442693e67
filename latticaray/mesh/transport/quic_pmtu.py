"""Datagram packetization layer path MTU discovery (DPLPMTUD, RFC 8899), sans-I/O.

A QUIC connection starts at a base datagram size that every path is assumed to carry (1200-1350 B
off loopback) and :class:`PmtuSearch` finds what this path really carries by sending padded
probe packets of larger sizes: an acknowledged probe confirms its size, a probe lost
``max_probes`` times in a row rules it out. The search starts at the ceiling (the local route's
MTU tells it: 65 KB on loopback, 1472 B on an Ethernet LAN) and bisects down, so a path that
carries everything the interface allows is confirmed with one probe. Probe losses are not
congestion signals (the connection sends probes outside congestion control accounting).

This core has no clock, socket or packet of its own: the connection asks :meth:`next_probe`
when it may send, reports :meth:`probe_sent`, :meth:`probe_acked` and :meth:`probe_lost`, and
adopts the size :meth:`probe_acked` returns; :meth:`cap` lowers the ceiling to what the peer
accepts. After ``raise_interval`` seconds in ``COMPLETE``
the search runs again (RFC 8899 PMTU_RAISE_TIMER), and :meth:`reset` starts over at the base
size (the path changed).
"""

from __future__ import annotations

import enum

__all__ = ["PmtuSearch", "PmtuState"]


class PmtuState(enum.Enum):
    SEARCHING = "searching"
    COMPLETE = "complete"
    DISABLED = "disabled"


class PmtuSearch:
    """The probing state of one path: sizes confirmed, ruled out, and in flight."""

    __slots__ = (
        "_completed_at",
        "_failures",
        "_granularity",
        "_in_flight",
        "_max_probes",
        "_probing",
        "_too_big",
        "base",
        "ceiling",
        "confirmed",
        "raise_interval",
        "state",
    )

    def __init__(
        self,
        base: int,
        ceiling: int,
        *,
        max_probes: int = 3,
        granularity: int = 32,
        raise_interval: float = 600.0,
    ) -> None:
        if base <= 0 or max_probes < 1:
            raise ValueError("PMTU search needs a positive base size and at least one probe")
        self.base = base
        self.ceiling = max(base, ceiling)
        self.confirmed = base
        self.raise_interval = raise_interval
        self._max_probes = max_probes
        self._granularity = max(1, granularity)
        #: the smallest size known not to get through (ceiling + 1 when none is)
        self._too_big = self.ceiling + 1
        self._failures = 0
        #: the size being tried (until acknowledged or lost max_probes times)
        self._probing: int | None = None
        self._in_flight: int | None = None
        self._completed_at = 0.0
        self.state = PmtuState.SEARCHING if self.ceiling > base else PmtuState.DISABLED

    @property
    def in_flight(self) -> int | None:
        """The size of the probe awaiting its fate, if any."""
        return self._in_flight

    def _candidate(self) -> int | None:
        if self._probing is not None:
            return self._probing
        low, high = self.confirmed, self._too_big
        if high - low <= self._granularity:
            return None
        if high > self.ceiling:
            return self.ceiling  # first try what the interface allows
        return (low + high) // 2

    def next_probe(self, now: float) -> int | None:
        """The size to probe now, or None (a probe in flight, the search complete)."""
        if self.state is PmtuState.COMPLETE and now - self._completed_at >= self.raise_interval:
            self.state = PmtuState.SEARCHING
            self._too_big = self.ceiling + 1
            self._failures = 0
            self._probing = None
        if self.state is not PmtuState.SEARCHING or self._in_flight is not None:
            return None
        size = self._candidate()
        if size is None:
            self.state = PmtuState.COMPLETE
            self._completed_at = now
        return size

    def probe_sent(self, size: int) -> None:
        self._in_flight = self._probing = size

    def probe_acked(self, size: int) -> int | None:
        """A probe of ``size`` arrived: the new datagram size to use, if it grew."""
        if self._in_flight == size:
            self._in_flight = None
        if self._probing == size:
            self._probing = None
            self._failures = 0
        if size <= self.confirmed or size > self.ceiling or self.state is PmtuState.DISABLED:
            return None
        self.confirmed = size
        if self._too_big <= size:
            self._too_big = self.ceiling + 1
        return size

    def probe_lost(self, size: int) -> None:
        """A probe of ``size`` was declared lost (``max_probes`` in a row rule the size out)."""
        if self._in_flight == size:
            self._in_flight = None
        if size != self._probing:
            return
        self._failures += 1
        if self._failures >= self._max_probes:
            self._too_big = size
            self._failures = 0
            self._probing = None

    def cap(self, size: int) -> None:
        """Never use nor probe more than ``size`` (the peer's max_udp_payload_size, RFC 9000
        18.2); the base and the confirmed size come down to it where they were larger."""
        self.ceiling = min(self.ceiling, size)
        self.base = min(self.base, self.ceiling)
        self.confirmed = min(self.confirmed, self.ceiling)
        self._too_big = min(self._too_big, self.ceiling + 1)
        if self._probing is not None and self._probing > self.ceiling:
            self._probing = None
            self._failures = 0
        if self.ceiling <= self.confirmed:
            self.state = PmtuState.DISABLED

    def reset(self) -> None:
        """The path changed: back to the base size, search again."""
        self.confirmed = self.base
        self._too_big = self.ceiling + 1
        self._failures = 0
        self._in_flight = self._probing = None
        if self.state is not PmtuState.DISABLED:
            self.state = PmtuState.SEARCHING
