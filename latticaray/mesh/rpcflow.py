"""Sans-I/O numbers of ``/latticaray/rpc/1``: session limits, stream credit windows, deadlines.

These are the rules of an RPC session that involve sizes and time, kept free of asyncio so they
can be tested (and simulated) on their own: :class:`RpcLimits` (a session's configuration),
:class:`StreamWindow` (one stream's credit) and :class:`DeadlineQueue` (open calls' deadlines).
The session's core (:mod:`latticaray.mesh.rpccore`) feeds them message sizes and ``now`` and acts
on what they return. The byte-level codec is :mod:`latticaray.mesh.framing`.
"""

from __future__ import annotations

import heapq
from collections.abc import Container
from dataclasses import dataclass

from .errors import ProtocolViolation

__all__ = [
    "INITIAL_WINDOW",
    "MESSAGE_OVERHEAD",
    "DeadlineQueue",
    "RpcLimits",
    "StreamWindow",
]

#: Window every stream receiver starts with (both directions); more is granted with CREDIT.
INITIAL_WINDOW = 256 * 1024
#: Flow-control cost of a message beyond its payload, so empty messages are not free.
MESSAGE_OVERHEAD = 32


@dataclass(frozen=True)
class RpcLimits:
    """Per-session limits. Defaults suit a mesh node; tests shrink them."""

    #: Largest payload of one frame (= one message). Larger data must be sent as a stream.
    max_frame_size: int = 16 * 1024 * 1024
    #: Calls the remote may have open on us at once (more get RESOURCE_EXHAUSTED); our own
    #: outgoing unary calls wait for a slot beyond this many.
    max_concurrent_calls: int = 4096
    #: Deadline of a call made without an explicit timeout, and the cap on a caller's deadline.
    default_timeout: float = 30.0
    max_timeout: float = 24 * 3600.0
    #: Receive window of each stream, in bytes (a slow reader holds at most this plus one message).
    stream_window: int = 1024 * 1024
    #: Largest receive window a caller may ask for one stream it opens (``window=``): a bulk
    #: reader that asked for n large messages lets all of them be in flight at once.
    max_stream_window: int = 64 * 1024 * 1024
    #: Queued outgoing bytes above which senders (and the reader) wait for the channel.
    write_buffer_high: int = 4 * 1024 * 1024
    #: Bytes asked of the channel per read.
    read_size: int = 256 * 1024
    #: A peer that started a frame must deliver more of it within this many seconds (checked
    #: every frame_timeout; a stalled partial frame would otherwise pin memory forever).
    frame_timeout: float = 30.0
    #: How long a graceful close may spend flushing queued frames before it aborts the channel.
    close_timeout: float = 2.0
    #: Send the handler's traceback to the caller with INTERNAL errors.
    expose_tracebacks: bool = True

    def __post_init__(self) -> None:
        if self.max_frame_size < 1024:
            raise ValueError("max_frame_size must be at least 1024 bytes")
        if self.stream_window < INITIAL_WINDOW:
            raise ValueError(f"stream_window must be at least {INITIAL_WINDOW} bytes")
        if self.max_stream_window < self.stream_window:
            raise ValueError("max_stream_window must be at least stream_window")
        if self.max_concurrent_calls < 1 or self.default_timeout <= 0:
            raise ValueError("max_concurrent_calls and default_timeout must be positive")


class StreamWindow:
    """Credit accounting of one stream call, both directions.

    Sending: ``can_send()`` while credit is positive (a message may overrun it once);
    ``sent(n)`` charges a message; ``granted(n)`` adds the peer's CREDIT.
    Receiving: ``received(n)`` checks the peer respected our window (raises ProtocolViolation
    when more than ``window + max_message`` is unread); ``consumed(n)`` returns the credit to
    grant back (0 until half a window was read, so grants are batched).
    """

    __slots__ = ("_consumed", "credit", "max_message", "unread", "window")

    def __init__(self, window: int, max_message: int) -> None:
        if window < INITIAL_WINDOW:
            raise ValueError(f"window must be at least {INITIAL_WINDOW} bytes")
        self.credit = INITIAL_WINDOW
        self.window = window
        self.max_message = max_message
        self.unread = 0
        self._consumed = 0

    def initial_grant(self) -> int:
        """Credit to send at once so the peer may use our whole window (0 if the default)."""
        return self.window - INITIAL_WINDOW

    def can_send(self) -> bool:
        return self.credit > 0

    def sent(self, nbytes: int) -> None:
        self.credit -= nbytes + MESSAGE_OVERHEAD

    def granted(self, nbytes: int) -> None:
        self.credit += nbytes

    def received(self, nbytes: int) -> None:
        self.unread += nbytes + MESSAGE_OVERHEAD
        if self.unread > self.window + self.max_message:
            raise ProtocolViolation(
                f"peer overran the stream window ({self.unread} bytes unread, window {self.window})"
            )

    def consumed(self, nbytes: int) -> int:
        cost = nbytes + MESSAGE_OVERHEAD
        self.unread -= cost
        self._consumed += cost
        if self._consumed >= self.window // 2:
            grant, self._consumed = self._consumed, 0
            return grant
        return 0

    def discard_unread(self) -> None:
        self.unread = 0


class DeadlineQueue:
    """Deadlines of open calls, earliest first, with lazy removal.

    Entries of calls that finished stay until they expire or ``compact`` drops them; callers
    check liveness of what ``pop_expired`` returns.
    """

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, bool]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, call_id: int, outgoing: bool) -> bool:
        """Track a deadline; True if it is now the earliest (re-arm the timer)."""
        heap = self._heap
        heapq.heappush(heap, (deadline, call_id, outgoing))
        return heap[0][0] == deadline

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[tuple[int, bool]]:
        """``(call_id, outgoing)`` of every entry whose deadline is at or before ``now``."""
        heap = self._heap
        expired = []
        while heap and heap[0][0] <= now:
            _, call_id, outgoing = heapq.heappop(heap)
            expired.append((call_id, outgoing))
        return expired

    def compact(self, outgoing: Container[int], incoming: Container[int]) -> None:
        """Keep only the entries of calls still open: outgoing ones whose id is in
        ``outgoing``, the others whose id is in ``incoming``."""
        live = [e for e in self._heap if e[1] in (outgoing if e[2] else incoming)]
        heapq.heapify(live)
        self._heap = live

    def clear(self) -> None:
        self._heap.clear()
