"""A fetch session's view of one provider, and of one request in flight to it. Sans-I/O.

:class:`PeerState` is what a :class:`~.session.FetchSession` knows of a peer: whether it holds the
whole object or which blocks (its have-bitmap, and the PENDING bitmap of blocks it has asked for,
both also kept in the session's block order), which blocks it said it lacks, its load (blocks in
flight), its measured delivery rate and the window that rate earns it, and its failures and
backoff. :class:`Inflight` is one request stream: its peer, the blocks it asks for, whether it
asks for the manifest, and its start and deadline.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import SessionConfig
from .messages import bitmap_has

__all__ = ["Inflight", "PeerState"]


def _unpack_bitmap(bitmap: bytes, count: int) -> Any:
    """A have-bitmap as one uint8 (0 or 1) per block, exactly ``count`` long (absent bits 0)."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[:count]
    if len(bits) < count:
        bits = np.concatenate([bits, np.zeros(count - len(bits), dtype=np.uint8)])
    return bits


@dataclass
class PeerState:
    peer: Hashable
    full: bool = False
    bitmap: bytes | None = None
    lacks: set[int] = field(default_factory=set)
    asked_have: float = float("-inf")
    answered_have: bool = False
    inflight: int = 0
    failures: int = 0
    bad_blocks: int = 0
    dropped: bool = False
    bytes_received: int = 0
    throughput: float = 0.0  # bytes/s EWMA of delivery rate while busy for us
    last_request_start: float = 0.0
    last_delivery: float = float("-inf")
    rate_bytes: int = 0
    rate_time: float = 0.0
    retry_at: float = float("-inf")
    #: one byte per block (non-zero = held), unpacked from ``bitmap`` once the manifest is known
    have: bytes | None = None
    have_ranked: Any = None  # the same as a numpy array in the session's block order
    pending: bytes | None = None  # its PENDING bitmap: blocks it has asked for
    pending_ranked: Any = None

    def can_serve(self, index: int) -> bool:
        if self.dropped or index in self.lacks:
            return False
        if self.full:
            return True
        if self.have is not None:
            return bool(self.have[index])
        return self.bitmap is not None and bitmap_has(self.bitmap, index)

    def set_bitmap(self, bitmap: bytes | None, count: int | None, order: Any) -> None:
        """Take the peer's have-bitmap (None: none known). ``count`` is the object's number of
        blocks (None while the manifest is unknown), ``order`` the session's block order (empty
        until it is drawn)."""
        self.bitmap = bitmap
        self.have = None
        if bitmap is not None and count is not None:
            bits = _unpack_bitmap(bitmap, count)
            self.have = bits.tobytes()
            self.have_ranked = bits[order] if len(order) == count else None
        else:
            self.have_ranked = None

    def set_pending(self, bitmap: bytes | None, count: int | None, order: Any) -> None:
        """Take the peer's PENDING bitmap (None: none known); arguments as :meth:`set_bitmap`."""
        self.pending = bitmap
        self.pending_ranked = None
        if bitmap is not None and count is not None and len(order) == count:
            self.pending_ranked = _unpack_bitmap(bitmap, count)[order]

    def window(self, config: SessionConfig, chunk_size: int) -> int:
        """Blocks to keep in flight here: about window_seconds at the peer's measured rate."""
        if self.throughput <= 0:
            return min(config.window, config.min_window)
        wanted = int(self.throughput * config.window_seconds / chunk_size) + 1
        return max(config.min_window, min(config.window, wanted))

    def record_delivery(self, nbytes: int, started: float, now: float, rate_period: float) -> bool:
        """Count a block of ``nbytes`` delivered at ``now`` by a request started at ``started``;
        True if that resampled the peer's delivery rate."""
        # delivery rate while the peer is busy for us: from the later of the request's start and
        # the previous block, so time spent waiting in the peer's queue behind our own earlier
        # blocks is not counted twice
        since = max(started, self.last_delivery)
        self.rate_bytes += nbytes
        self.rate_time += max(0.0, now - since)
        self.last_delivery = now
        # samples over at least rate_period of busy time: a peer that serves others between
        # our blocks delivers in bursts, and one burst is not its rate for us
        if self.rate_time > 0 and (self.throughput == 0 or self.rate_time >= rate_period):
            rate = self.rate_bytes / self.rate_time
            self.throughput = rate if self.throughput == 0 else 0.5 * self.throughput + 0.5 * rate
            self.rate_bytes, self.rate_time = 0, 0.0
            return True
        return False

    def record_failure(self, now: float, config: SessionConfig) -> None:
        """A request to the peer failed: back off before asking it again (doubling per failure)."""
        self.failures += 1
        self.retry_at = now + min(
            config.backoff_max, config.backoff_base * 2 ** min(self.failures - 1, 16)
        )

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "full": self.full,
            "bitmap": self.bitmap is not None,
            "lacks": len(self.lacks),
            "inflight": self.inflight,
            "failures": self.failures,
            "dropped": self.dropped,
            "retry_in": round(self.retry_at - now, 2),
        }


@dataclass
class Inflight:
    peer: Hashable
    blocks: list[int]
    manifest: bool
    started: float
    deadline: float
