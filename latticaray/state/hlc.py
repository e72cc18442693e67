"""Hybrid logical clocks: timestamps that follow wall time yet never go backwards across peers.

An :class:`Hlc` is ``(wall_ms, logical)``. :class:`HybridClock` is sans-I/O: the caller passes the
current wall time (seconds) to :meth:`HybridClock.tick` (local event) and
:meth:`HybridClock.observe` (a remote timestamp was received), following Kulkarni et al.,
"Logical Physical Clocks" (2014). Remote timestamps too far in the future are refused, so one peer
with a bad clock cannot drag every clock forward.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import ClockSkewError

__all__ = ["MAX_LOGICAL", "Hlc", "HybridClock"]

MAX_LOGICAL = 2**31 - 1


class Hlc(NamedTuple):
    wall_ms: int
    logical: int

    @property
    def seconds(self) -> float:
        return self.wall_ms / 1000.0

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.logical}"


class HybridClock:
    """The local hybrid logical clock. ``max_drift_s`` bounds how far ahead a remote may be."""

    def __init__(self, max_drift_s: float = 60.0, last: Hlc | None = None) -> None:
        self.max_drift_ms = int(max_drift_s * 1000)
        self.last = Hlc(0, 0) if last is None else Hlc(int(last.wall_ms), int(last.logical))

    def tick(self, now: float) -> Hlc:
        """Return a fresh timestamp for a local event, strictly greater than every earlier one."""
        physical = int(now * 1000)
        if physical > self.last.wall_ms:
            self.last = Hlc(physical, 0)
        else:
            self.last = Hlc(self.last.wall_ms, self._next_logical(self.last.logical))
        return self.last

    def check(self, remote: Hlc, now: float) -> None:
        """Raise :class:`ClockSkewError` if ``remote`` is further ahead than the allowed drift."""
        limit = int(now * 1000) + self.max_drift_ms
        if remote.wall_ms > limit:
            raise ClockSkewError(
                f"timestamp {remote} is {(remote.wall_ms - int(now * 1000)) / 1000:.1f} s ahead of "
                f"the local clock (max drift {self.max_drift_ms / 1000:.0f} s)"
            )

    def observe(self, remote: Hlc, now: float) -> None:
        """Merge a received timestamp so later local ticks order after it."""
        self.check(remote, now)
        physical = int(now * 1000)
        wall = max(self.last.wall_ms, remote.wall_ms, physical)
        if wall == self.last.wall_ms and wall == remote.wall_ms:
            logical = self._next_logical(max(self.last.logical, remote.logical))
        elif wall == self.last.wall_ms:
            logical = self._next_logical(self.last.logical)
        elif wall == remote.wall_ms:
            logical = self._next_logical(remote.logical)
        else:
            logical = 0
        self.last = Hlc(wall, logical)

    @staticmethod
    def _next_logical(logical: int) -> int:
        if logical >= MAX_LOGICAL:
            raise ClockSkewError("hybrid logical clock counter overflow")
        return logical + 1
