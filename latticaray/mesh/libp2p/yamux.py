"""yamux 1.0.0 (``/yamux/1.0.0``): streams multiplexed over one secure connection, sans-I/O.

Every frame starts with a 12-byte header ``version(0) type flags(16) stream_id(32)
length(32)``, big-endian. Types: Data (length = payload bytes), Window Update (length = window
delta), Ping (stream 0, length = opaque value) and Go Away (stream 0, length = error code).
Flags: SYN opens a stream, ACK accepts it, FIN half-closes, RST aborts. The dialer (client)
uses odd stream IDs, the listener even ones.

Flow control follows the spec: each direction of each stream starts with a 256 KiB window; a
sender may have at most the window unacknowledged; the receiver grants more with Window
Update frames. Here the receiver grants only what its application consumed, batched until half
the stream window is free, so a stream never buffers more than its window; the window may be
raised (``stream_window``, up to 16 MiB) by a grant sent with SYN/ACK. A peer that overruns a
window, reuses a stream ID or sends a malformed frame gets Go Away (protocol error) and
:class:`YamuxError` is raised. Inbound streams beyond ``max_streams`` are reset.

:class:`YamuxCore` is fed received bytes and ``now``; it returns events and queues bytes to send.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag

from .errors import YamuxError

__all__ = [
    "INITIAL_WINDOW",
    "MAX_WINDOW",
    "YAMUX_PROTOCOL",
    "GoAwayCode",
    "StreamState",
    "YamuxCore",
    "YamuxGoAway",
    "YamuxPong",
    "YamuxStreamData",
    "YamuxStreamEnded",
    "YamuxStreamOpened",
    "YamuxStreamReset",
    "YamuxTimeout",
    "YamuxWindowOpened",
]

YAMUX_PROTOCOL = "/yamux/1.0.0"
HEADER = struct.Struct(">BBHII")
HEADER_LEN = HEADER.size
VERSION = 0
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
#: Outgoing Data frames are cut at this many payload bytes so streams interleave.
MAX_DATA_FRAME = 64 * 1024
_MAX_U32 = (1 << 32) - 1


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class StreamState(Enum):
    SYN_SENT = "syn-sent"
    ESTABLISHED = "established"
    LOCAL_CLOSED = "local-closed"  # we sent FIN
    REMOTE_CLOSED = "remote-closed"  # the peer sent FIN
    CLOSED = "closed"
    RESET = "reset"


_S = StreamState
_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    _S.SYN_SENT: frozenset({_S.ESTABLISHED, _S.LOCAL_CLOSED, _S.REMOTE_CLOSED, _S.RESET}),
    _S.ESTABLISHED: frozenset({_S.LOCAL_CLOSED, _S.REMOTE_CLOSED, _S.RESET}),
    _S.LOCAL_CLOSED: frozenset({_S.CLOSED, _S.RESET}),
    _S.REMOTE_CLOSED: frozenset({_S.CLOSED, _S.RESET}),
    _S.CLOSED: frozenset(),
    _S.RESET: frozenset(),
}


@dataclass(frozen=True, slots=True)
class YamuxStreamOpened:
    """The peer opened stream ``stream_id`` (already accepted)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class YamuxStreamData:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class YamuxStreamEnded:
    """The peer half-closed the stream (FIN): no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class YamuxStreamReset:
    stream_id: int


@dataclass(frozen=True, slots=True)
class YamuxWindowOpened:
    """The stream's send window grew; a writer blocked on it may go on."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class YamuxPong:
    opaque: int
    rtt: float


@dataclass(frozen=True, slots=True)
class YamuxGoAway:
    code: int


@dataclass(frozen=True, slots=True)
class YamuxTimeout:
    """A keepalive ping went unanswered for ``ping_timeout``: the connection is dead."""


YamuxEvent = (
    YamuxStreamOpened
    | YamuxStreamData
    | YamuxStreamEnded
    | YamuxStreamReset
    | YamuxWindowOpened
    | YamuxPong
    | YamuxGoAway
    | YamuxTimeout
)


class _Stream:
    __slots__ = ("credit", "recv_window", "send_window", "state", "unread")

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.send_window = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW  # what the peer may still send
        self.unread = 0  # delivered, not yet consumed
        self.credit = 0  # consumed, not yet granted back

    def to(self, state: StreamState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise YamuxError(f"yamux stream: no transition {self.state.value} -> {state.value}")
        self.state = state


class YamuxCore:
    """One yamux session. ``is_client``: the dialer's side (odd stream IDs)."""

    __slots__ = (
        "_buf",
        "_go_away_received",
        "_go_away_sent",
        "_last_recv",
        "_next_id",
        "_out",
        "_pending_body",
        "_ping_sent",
        "_pings",
        "_streams",
        "is_client",
        "keepalive",
        "max_streams",
        "ping_timeout",
        "stream_window",
    )

    def __init__(
        self,
        is_client: bool,
        *,
        stream_window: int = INITIAL_WINDOW,
        max_streams: int = 512,
        keepalive: float | None = None,
        ping_timeout: float = 30.0,
    ) -> None:
        if not INITIAL_WINDOW <= stream_window <= MAX_WINDOW:
            raise ValueError(f"stream_window must be {INITIAL_WINDOW}-{MAX_WINDOW} bytes")
        self.is_client = is_client
        self.stream_window = stream_window
        self.max_streams = max_streams
        self.keepalive = keepalive
        self.ping_timeout = ping_timeout
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._buf = bytearray()
        self._out = bytearray()
        self._pending_body: tuple[int, int, int] | None = None  # (flags, stream, length)
        self._pings: dict[int, float] = {}
        self._ping_sent = 0
        self._last_recv: float | None = None
        self._go_away_sent = False
        self._go_away_received = False

    # ---- output
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame(self, ftype: FrameType, flags: int, stream_id: int, length: int) -> None:
        self._out += HEADER.pack(VERSION, ftype, flags, stream_id, length)

    # ---- streams, local side
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState | None:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def open_stream(self) -> int:
        """Open a stream (SYN with our window grant); return its ID."""
        if self._go_away_sent or self._go_away_received:
            raise YamuxError("the yamux session is going away; no new streams")
        if len(self._streams) >= self.max_streams:
            raise YamuxError(f"yamux session already has {self.max_streams} streams")
        stream_id = self._next_id
        if stream_id > _MAX_U32:
            raise YamuxError("yamux stream IDs exhausted")
        self._next_id += 2
        stream = _Stream(StreamState.SYN_SENT)
        self._streams[stream_id] = stream
        self._grant_initial(stream, stream_id, Flag.SYN)
        return stream_id

    def _grant_initial(self, stream: _Stream, stream_id: int, flag: Flag) -> None:
        delta = self.stream_window - INITIAL_WINDOW
        stream.recv_window += delta
        self._frame(FrameType.WINDOW_UPDATE, flag, stream_id, delta)

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state in (_S.LOCAL_CLOSED, _S.CLOSED, _S.RESET):
            return 0
        return stream.send_window

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the send window allows; return the bytes taken."""
        stream = self._writable(stream_id)
        take = min(len(data), stream.send_window)
        view = memoryview(data)[:take]
        for start in range(0, take, MAX_DATA_FRAME):
            chunk = view[start : start + MAX_DATA_FRAME]
            self._frame(FrameType.DATA, 0, stream_id, len(chunk))
            self._out += chunk
        stream.send_window -= take
        return take

    def _writable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise YamuxError(f"yamux stream {stream_id} is not open")
        if stream.state in (_S.LOCAL_CLOSED, _S.CLOSED, _S.RESET):
            raise YamuxError(f"yamux stream {stream_id} is {stream.state.value} for writing")
        return stream

    def close_stream(self, stream_id: int) -> None:
        """Half-close our direction (FIN); the stream ends when the peer closes too."""
        stream = self._writable(stream_id)
        self._frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0)
        if stream.state is _S.REMOTE_CLOSED:
            stream.to(_S.CLOSED)
            del self._streams[stream_id]
        else:
            stream.to(_S.LOCAL_CLOSED)

    def reset_stream(self, stream_id: int) -> None:
        """Abort the stream (RST); unknown or finished streams are ignored."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.to(_S.RESET)
        self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The application read ``nbytes`` of the stream; grant them back in batches."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        nbytes = min(nbytes, stream.unread)
        stream.unread -= nbytes
        if stream.state in (_S.REMOTE_CLOSED, _S.CLOSED):
            return  # the peer sends no more; no window to give
        stream.credit += nbytes
        if stream.credit >= self.stream_window // 2:
            self._frame(FrameType.WINDOW_UPDATE, 0, stream_id, stream.credit)
            stream.recv_window += stream.credit
            stream.credit = 0

    # ---- session
    def ping(self, now: float) -> int:
        """Send a ping; the matching :class:`YamuxPong` carries its round trip."""
        self._ping_sent = (self._ping_sent + 1) & _MAX_U32
        self._pings[self._ping_sent] = now
        self._frame(FrameType.PING, Flag.SYN, 0, self._ping_sent)
        return self._ping_sent

    def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        if not self._go_away_sent:
            self._go_away_sent = True
            self._frame(FrameType.GO_AWAY, 0, 0, int(code))

    @property
    def going_away(self) -> bool:
        return self._go_away_sent or self._go_away_received

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (keepalive and ping timeouts)."""
        if self.keepalive is None or self._last_recv is None:
            return None
        if self._pings:
            return min(self._pings.values()) + self.ping_timeout
        return self._last_recv + self.keepalive

    def handle_timer(self, now: float) -> list[YamuxEvent]:
        if self._pings and now >= min(self._pings.values()) + self.ping_timeout:
            return [YamuxTimeout()]
        if (
            self.keepalive is not None
            and self._last_recv is not None
            and now >= self._last_recv + self.keepalive
            and not self._pings
        ):
            self.ping(now)
        return []

    # ---- input
    def _violation(self, message: str) -> YamuxError:
        self.go_away(GoAwayCode.PROTOCOL_ERROR)
        return YamuxError(message)

    def receive(self, data: bytes, now: float) -> list[YamuxEvent]:
        """Parse received bytes; raises :class:`YamuxError` (after queueing Go Away) on abuse."""
        self._buf += data
        self._last_recv = now
        events: list[YamuxEvent] = []
        while True:
            if self._pending_body is not None:
                flags, stream_id, length = self._pending_body
                if len(self._buf) < length:
                    break
                body = bytes(self._buf[:length])
                del self._buf[:length]
                self._pending_body = None
                self._on_data(flags, stream_id, body, events)
                continue
            if len(self._buf) < HEADER_LEN:
                break
            version, ftype, flags, stream_id, length = HEADER.unpack_from(self._buf)
            del self._buf[:HEADER_LEN]
            if version != VERSION:
                raise self._violation(f"yamux version {version} is not 0")
            if ftype == FrameType.DATA:
                self._check_data_header(flags, stream_id, length)
                self._pending_body = (flags, stream_id, length)
            elif ftype == FrameType.WINDOW_UPDATE:
                self._on_window_update(flags, stream_id, length, events)
            elif ftype == FrameType.PING:
                self._on_ping(flags, stream_id, length, now, events)
            elif ftype == FrameType.GO_AWAY:
                if stream_id != 0:
                    raise self._violation("yamux Go Away on a stream other than 0")
                self._go_away_received = True
                events.append(YamuxGoAway(length))
            else:
                raise self._violation(f"unknown yamux frame type {ftype}")
        return events

    def _check_data_header(self, flags: int, stream_id: int, length: int) -> None:
        if stream_id == 0:
            raise self._violation("yamux Data frame on stream 0")
        stream = self._streams.get(stream_id)
        window = stream.recv_window if stream is not None else INITIAL_WINDOW
        if stream is None and not flags & Flag.SYN:
            window = self.stream_window  # late data for a stream we reset: bounded, dropped
        if length > window:
            raise self._violation(
                f"yamux stream {stream_id} sent {length} bytes over a window of {window}"
            )

    def _open_inbound(self, stream_id: int, events: list[YamuxEvent]) -> _Stream | None:
        if stream_id in self._streams:
            raise self._violation(f"yamux stream {stream_id} opened twice")
        if (stream_id % 2 == 1) == self.is_client:
            raise self._violation(f"yamux stream {stream_id} has our parity")
        if self._go_away_sent or len(self._streams) >= self.max_streams:
            self._frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0)
            return None
        stream = _Stream(StreamState.ESTABLISHED)
        self._streams[stream_id] = stream
        self._grant_initial(stream, stream_id, Flag.ACK)
        events.append(YamuxStreamOpened(stream_id))
        return stream

    def _on_flags(self, flags: int, stream_id: int, events: list[YamuxEvent]) -> _Stream | None:
        """SYN/ACK/RST handling shared by Data and Window Update; returns the live stream."""
        stream = self._streams.get(stream_id)
        if flags & Flag.SYN:
            stream = self._open_inbound(stream_id, events)
        if stream is None:
            return None
        if flags & Flag.ACK and stream.state is _S.SYN_SENT:
            stream.to(_S.ESTABLISHED)
        if flags & Flag.RST:
            stream.to(_S.RESET)
            del self._streams[stream_id]
            events.append(YamuxStreamReset(stream_id))
            return None
        return stream

    def _on_data(self, flags: int, stream_id: int, body: bytes, events: list[YamuxEvent]) -> None:
        stream = self._on_flags(flags, stream_id, events)
        if stream is None:
            return
        if body:
            if stream.state in (_S.REMOTE_CLOSED, _S.CLOSED):
                raise self._violation(f"yamux stream {stream_id} sent data after FIN")
            if len(body) > stream.recv_window:
                raise self._violation(f"yamux stream {stream_id} overran its window")
            stream.recv_window -= len(body)
            stream.unread += len(body)
            events.append(YamuxStreamData(stream_id, body))
        self._on_fin(flags, stream_id, stream, events)

    def _on_fin(
        self, flags: int, stream_id: int, stream: _Stream, events: list[YamuxEvent]
    ) -> None:
        if not flags & Flag.FIN:
            return
        if stream.state in (_S.REMOTE_CLOSED, _S.CLOSED):
            return
        if stream.state is _S.LOCAL_CLOSED:
            stream.to(_S.CLOSED)
            del self._streams[stream_id]
        else:
            stream.to(_S.REMOTE_CLOSED)
        events.append(YamuxStreamEnded(stream_id))

    def _on_window_update(
        self, flags: int, stream_id: int, delta: int, events: list[YamuxEvent]
    ) -> None:
        if stream_id == 0:
            raise self._violation("yamux Window Update on stream 0")
        stream = self._on_flags(flags, stream_id, events)
        if stream is None:
            return
        if delta:
            if stream.send_window + delta > _MAX_U32:
                raise self._violation(f"yamux stream {stream_id} window grew past 2^32")
            stream.send_window += delta
            events.append(YamuxWindowOpened(stream_id))
        self._on_fin(flags, stream_id, stream, events)

    def _on_ping(
        self, flags: int, stream_id: int, opaque: int, now: float, events: list[YamuxEvent]
    ) -> None:
        if stream_id != 0:
            raise self._violation("yamux Ping on a stream other than 0")
        if flags & Flag.SYN:
            self._frame(FrameType.PING, Flag.ACK, 0, opaque)
        elif flags & Flag.ACK:
            sent = self._pings.pop(opaque, None)
            if sent is not None:
                events.append(YamuxPong(opaque, now - sent))
