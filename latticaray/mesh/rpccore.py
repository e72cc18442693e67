"""Sans-I/O core of ``/latticaray/rpc/1``: the call table of one session and the rules on it.

:class:`RpcConnection` is what one end of an RPC session knows, with no socket, task or clock of
its own (h11's ``Connection`` is the model): the calls open in each direction, which call ids are
taken, which service answers an OPEN, how many calls the peer may have open on us, every call's
deadline, the OPENs parked while our send queue is full (with the frames of served calls
behind them), and the frames queued to send. The
asyncio shell (:class:`latticaray.mesh.rpc.RpcSession`) feeds it decoded frames and ``now`` and
applies what it returns:

* :meth:`RpcConnection.receive_frame` returns ``None`` (nothing to do: a late frame, a parked or
  refused OPEN) or an *event*: a tuple whose first item is one of the event codes below and whose
  other items are listed beside the code;
* :meth:`RpcConnection.expire` returns the calls whose deadline has passed;
* outgoing calls open with :meth:`~RpcConnection.open_unary` / :meth:`~RpcConnection.open_stream`
  and end with a reply event, :meth:`~RpcConnection.cancel_call` or expiry; calls served end with
  :meth:`~RpcConnection.finish_incoming`;
* every frame to send is encoded into :attr:`RpcConnection.frames`; the shell takes it with
  :meth:`~RpcConnection.take_output` (``on_output`` is called when the queue stops being empty,
  so the shell knows when to wake its writer).

The shell registers one object per call (a future, a stream call, a running handler) and gets it
back in events; the core never looks inside. Events are tuples rather than dataclasses because
one is made per frame on the hot path. Per-stream credit and the deadline heap are
:mod:`latticaray.mesh.rpcflow`; the byte codec is :mod:`latticaray.mesh.framing`; the wire is
specified in docs/protocol/rpc.md.
"""

from __future__ import annotations

import enum
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .errors import (
    FrameTooLarge,
    ProtocolViolation,
    RpcCancelled,
    RpcConnectionLost,
    RpcError,
    Status,
    error_for_status,
)
from .framing import (
    CALL_TYPE_NAMES,
    CANCEL,
    CREDIT,
    ERROR,
    FLAG_END,
    FLAG_MSG,
    FLAG_RESPONSE,
    GOAWAY,
    MESSAGE,
    OPEN,
    UNARY,
    FrameEncoder,
)
from .rpcflow import INITIAL_WINDOW, DeadlineQueue, RpcLimits

__all__ = [
    "CALL_CANCELLED",
    "CALL_OPENED",
    "EXPIRED_INCOMING",
    "EXPIRED_STREAM",
    "EXPIRED_UNARY",
    "GOAWAY_RECEIVED",
    "MAX_ERROR_MESSAGE",
    "MAX_TRACEBACK",
    "REPLY",
    "STREAM_CREDIT",
    "STREAM_ENDED",
    "STREAM_FAILED",
    "STREAM_MESSAGE",
    "UNARY_FAILED",
    "Event",
    "RpcConnection",
    "ServiceEntry",
    "SessionState",
    "error_from_frame",
]

MAX_ERROR_MESSAGE = 1024
MAX_TRACEBACK = 16 * 1024

# -- events returned by RpcConnection.receive_frame (the table entry is gone where it says so) --
#: ``(REPLY, future, payload)``: an outgoing unary call was answered (entry gone).
REPLY: Final = 1
#: ``(UNARY_FAILED, future, error)``: an outgoing unary call got ERROR (entry gone).
UNARY_FAILED: Final = 2
#: ``(STREAM_MESSAGE, stream, flags, payload)``: MESSAGE on an open stream, either direction.
STREAM_MESSAGE: Final = 3
#: ``(STREAM_ENDED, stream, flags, payload)``: the callee ended an outgoing stream (entry gone).
STREAM_ENDED: Final = 4
#: ``(STREAM_CREDIT, stream, nbytes)``: the peer granted stream credit.
STREAM_CREDIT: Final = 5
#: ``(STREAM_FAILED, stream, error)``: ERROR or CANCEL from the callee of a stream (entry gone).
STREAM_FAILED: Final = 6
#: ``(CALL_CANCELLED, handle)``: the caller cancelled a call we serve (entry gone).
CALL_CANCELLED: Final = 7
#: ``(CALL_OPENED, call_id, service, call_type, handler, eager, deadline, flags, payload)``: an
#: accepted OPEN; the shell starts the handler and registers it with ``track_incoming``.
CALL_OPENED: Final = 8
#: ``(GOAWAY_RECEIVED, reason)``: the peer is closing the session.
GOAWAY_RECEIVED: Final = 9

# -- what RpcConnection.expire reports, as (code, call_id, handle) --
EXPIRED_UNARY: Final = 1  # an outgoing unary call (entry gone, CANCEL queued)
EXPIRED_STREAM: Final = 2  # an outgoing stream (entry gone, CANCEL queued)
EXPIRED_INCOMING: Final = 3  # a call we serve: the shell stops its handler (entry stays until then)

Event = tuple[Any, ...]
#: What a router knows of a service: ``(call_type, handler, eager)``.
ServiceEntry = tuple[int, Callable[..., Any], bool]


class SessionState(enum.Enum):
    """Lifecycle of a session; :data:`_TRANSITIONS` lists the allowed moves."""

    #: Calls open and run in both directions.
    OPEN = "open"
    #: Closing (locally, on GOAWAY, or on a broken channel): every call has been failed, no new
    #: call opens, frames already queued may still be flushed.
    CLOSING = "closing"
    #: Closed: nothing more is queued or sent.
    CLOSED = "closed"


_TRANSITIONS: Final[dict[SessionState, frozenset[SessionState]]] = {
    SessionState.OPEN: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


def error_from_frame(header: list[Any], payload: bytes) -> RpcError:
    """The exception a caller raises for an ERROR frame (payload: the remote traceback)."""
    tb = bytes(payload[:MAX_TRACEBACK]).decode("utf-8", "replace") if payload else None
    return error_for_status(header[3], header[4], tb)


class RpcConnection:
    """The sans-I/O state of one RPC session (see the module docstring).

    ``lookup(service)`` returns the :data:`ServiceEntry` serving a name, or None; ``local_name``
    appears in UNIMPLEMENTED messages; ``on_output()`` is called whenever a frame is queued into
    an empty :attr:`outbox`.
    """

    __slots__ = (
        "_deadline_adds",
        "_deadlines",
        "_default_timeout",
        "_local_name",
        "_lookup",
        "_max_calls",
        "_max_frame",
        "_max_timeout",
        "_write_high",
        "close_reason",
        "frames",
        "last_call_id",
        "limits",
        "parked",
        "parked_bytes",
        "send",
        "state",
        "streams_in",
        "streams_out",
        "unary_in",
        "unary_out",
    )

    def __init__(
        self,
        limits: RpcLimits,
        lookup: Callable[[str], ServiceEntry | None],
        local_name: str = "?",
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self._lookup = lookup
        self._local_name = local_name
        self._max_frame = limits.max_frame_size
        self._max_calls = limits.max_concurrent_calls
        self._default_timeout = limits.default_timeout
        self._max_timeout = limits.max_timeout
        self._write_high = limits.write_buffer_high
        self.state = SessionState.OPEN
        self.close_reason: str | None = None
        #: The id of the last call we opened (ids count up from 1).
        self.last_call_id = 0
        #: The call table, one dict per direction and kind: call id -> the shell's handle.
        self.unary_out: dict[int, Any] = {}
        self.streams_out: dict[int, Any] = {}
        self.unary_in: dict[int, Any] = {}
        self.streams_in: dict[int, Any] = {}
        self._deadlines = DeadlineQueue()
        self._deadline_adds = 0
        #: OPEN frames received while our send queue was above write_buffer_high, and the
        #: frames of served calls that came after them, in order.
        self.parked: deque[tuple[list[Any], bytes]] = deque()
        self.parked_bytes = 0
        #: Frames queued for the writer (``on_output`` fires when it stops being empty).
        self.frames = FrameEncoder(on_output)
        #: ``send(header, payload=b"")``: encode one frame into :attr:`frames` (dropped once
        #: the session is closed).
        self.send: Callable[..., None] = self.frames.put

    # -- table ---------------------------------------------------------------------------------
    @property
    def deadlines(self) -> DeadlineQueue:
        """Deadlines of open calls (finished calls' entries linger until expiry or compaction)."""
        return self._deadlines

    @property
    def active_calls(self) -> int:
        return (
            len(self.unary_out) + len(self.streams_out) + len(self.unary_in) + len(self.streams_in)
        )

    @property
    def outgoing_calls(self) -> int:
        return len(self.unary_out) + len(self.streams_out)

    @property
    def closing(self) -> bool:
        """True from the start of closing on: no call may open."""
        return self.state is not SessionState.OPEN

    def outgoing_full(self) -> bool:
        """True while we have ``max_concurrent_calls`` calls open on the peer."""
        return len(self.unary_out) + len(self.streams_out) >= self._max_calls

    def get_timer(self) -> float | None:
        """When :meth:`expire` has something to do next (None: no deadline pending)."""
        return self._deadlines.next_deadline()

    def normalize_timeout(self, timeout: float | None) -> float:
        """A call's timeout: the default for None, capped at ``max_timeout``; must be > 0."""
        if timeout is None:
            return self._default_timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return min(timeout, self._max_timeout)

    def clamp_window(self, window: int | None) -> int:
        """The receive window of a stream we open: ``stream_window`` unless the caller asked
        for another, kept within ``INITIAL_WINDOW .. max_stream_window``."""
        if window is None:
            return self.limits.stream_window
        return max(INITIAL_WINDOW, min(int(window), self.limits.max_stream_window))

    def _add_deadline(self, deadline: float, call_id: int, outgoing: bool) -> None:
        self._deadlines.add(deadline, call_id, outgoing)
        self._deadline_adds += 1
        if self._deadline_adds >= 4096:
            # entries of finished calls stay until they expire: drop them now and then
            self._deadline_adds = 0
            if len(self._deadlines) > 4 * self.active_calls:
                self._deadlines.compact(
                    self.unary_out.keys() | self.streams_out.keys(),
                    self.unary_in.keys() | self.streams_in.keys(),
                )

    # -- outgoing calls ------------------------------------------------------------------------
    def open_unary(
        self,
        service: str,
        payload: bytes | bytearray | memoryview,
        timeout: float | None,
        now: float,
        future: Any,
    ) -> tuple[int, float]:
        """Register an outgoing unary call and queue its OPEN; returns the call id and deadline.

        The shell has checked the payload size and waited for a free slot (:meth:`outgoing_full`).
        """
        if self.state is not SessionState.OPEN:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        if timeout is None:
            timeout = self._default_timeout
        elif not 0 < timeout <= self._max_timeout:
            timeout = self.normalize_timeout(timeout)
        call_id = self.last_call_id = self.last_call_id + 1
        deadline = now + timeout
        self.unary_out[call_id] = future
        self._add_deadline(deadline, call_id, True)
        self.send(
            [OPEN, call_id, FLAG_MSG | FLAG_END, service, UNARY, int(timeout * 1000) + 1], payload
        )
        return call_id, deadline

    def open_stream(
        self,
        stream: Any,
        service: str,
        call_type: int,
        timeout: float | None,
        window: int,
        payload: bytes | None,
        now: float,
    ) -> tuple[int, float]:
        """Register an outgoing stream call and queue its OPEN (with the first message if
        ``payload`` is not None) and the CREDIT that opens our ``window``; returns the call id
        and the deadline. Raises RpcConnectionLost, RpcError RESOURCE_EXHAUSTED (too many calls
        in flight) or FrameTooLarge."""
        if self.state is not SessionState.OPEN:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        if self.outgoing_full():
            raise RpcError(Status.RESOURCE_EXHAUSTED, f"{self._max_calls} calls already in flight")
        if payload is not None and len(payload) > self._max_frame:
            raise FrameTooLarge(f"request of {len(payload)} bytes exceeds max_frame_size")
        timeout = self.normalize_timeout(timeout)
        call_id = self.last_call_id = self.last_call_id + 1
        deadline = now + timeout
        self.streams_out[call_id] = stream
        self._add_deadline(deadline, call_id, True)
        header: list[Any] = [OPEN, call_id, 0, service, call_type, int(timeout * 1000) + 1]
        if payload is not None:
            header[2] = FLAG_MSG | FLAG_END
            self.send(header, payload)
        else:
            self.send(header)
        extra = window - INITIAL_WINDOW
        if extra > 0:
            self.send([CREDIT, call_id, 0, extra])
        return call_id, deadline

    def cancel_call(self, call_id: int, outgoing: bool) -> bool:
        """This end abandons a call: drop it from the table and queue CANCEL. False if the call
        was no longer open (nothing is sent)."""
        if outgoing:
            if self.unary_out.pop(call_id, None) is None:
                if self.streams_out.pop(call_id, None) is None:
                    return False
            self.send([CANCEL, call_id, 0])
        else:
            if self.unary_in.pop(call_id, None) is None:
                if self.streams_in.pop(call_id, None) is None:
                    return False
            self.send([CANCEL, call_id, FLAG_RESPONSE])
        return True

    # -- calls we serve ------------------------------------------------------------------------
    def track_incoming(self, call_id: int, handle: Any, deadline: float) -> None:
        """Register a unary call whose handler keeps running (it awaited)."""
        self.unary_in[call_id] = handle
        self._add_deadline(deadline, call_id, False)

    def track_incoming_stream(
        self, call_id: int, stream: Any, deadline: float, window: int
    ) -> None:
        """Register a streaming call we serve, and grant the caller our whole ``window`` when the
        call carries messages from it."""
        self.streams_in[call_id] = stream
        self._add_deadline(deadline, call_id, False)
        extra = window - INITIAL_WINDOW
        if extra > 0:
            self.send([CREDIT, call_id, FLAG_RESPONSE, extra])

    def finish_incoming(self, call_id: int) -> None:
        """A handler finished (its reply or error is queued, or none is due)."""
        if self.unary_in.pop(call_id, None) is None:
            self.streams_in.pop(call_id, None)

    def accept(self, header: list[Any], payload: bytes, now: float) -> Event | None:
        """Decide on an OPEN: a CALL_OPENED event, or None after queueing the ERROR refusing it
        (unknown service, wrong call type, too many calls). Raises ProtocolViolation for an id
        that is already open."""
        call_id, service, call_type, timeout_ms = header[1], header[3], header[4], header[5]
        if call_id in self.unary_in or call_id in self.streams_in:
            raise ProtocolViolation(f"call id {call_id} opened twice")
        entry = self._lookup(service)
        if entry is None:
            self.send_error(
                call_id, Status.UNIMPLEMENTED, f"no service {service!r} on peer {self._local_name}"
            )
            return None
        if entry[0] != call_type:
            self.send_error(
                call_id,
                Status.UNIMPLEMENTED,
                f"service {service!r} is {CALL_TYPE_NAMES[entry[0]]}, "
                f"called as {CALL_TYPE_NAMES[call_type]}",
            )
            return None
        open_calls = len(self.unary_in) + len(self.streams_in)
        if open_calls >= self._max_calls:
            self.send_error(
                call_id,
                Status.RESOURCE_EXHAUSTED,
                f"peer has {open_calls} calls in progress from you",
            )
            return None
        timeout = timeout_ms / 1000.0 if timeout_ms else self._default_timeout
        if timeout > self._max_timeout:
            timeout = self._max_timeout
        return (
            CALL_OPENED,
            call_id,
            service,
            call_type,
            entry[1],
            entry[2],
            now + timeout,
            header[2],
            payload,
        )

    def take_parked(self) -> tuple[list[Any], bytes] | None:
        """The oldest parked frame if our send queue has room again (pass it to
        :meth:`unpark`)."""
        if (
            self.parked
            and self.frames.pending <= self._write_high
            and self.state is SessionState.OPEN
        ):
            header, payload = self.parked.popleft()
            self.parked_bytes -= len(payload)
            return header, payload
        return None

    def unpark(self, header: list[Any], payload: bytes, now: float) -> Event | None:
        """Apply a frame :meth:`take_parked` returned, as :meth:`receive_frame` would have."""
        if header[0] == OPEN:
            return self.accept(header, payload, now)
        return self._served(header, payload)

    # -- input ---------------------------------------------------------------------------------
    def receive_frame(self, header: list[Any], payload: bytes, now: float) -> Event | None:
        """Apply one decoded frame; returns the event for the shell, or None."""
        kind = header[0]
        flags = header[2]
        if flags & FLAG_RESPONSE:
            call_id = header[1]
            future = self.unary_out.get(call_id)
            if future is not None:
                if kind == MESSAGE:
                    del self.unary_out[call_id]
                    return (REPLY, future, payload)
                if kind == ERROR:
                    del self.unary_out[call_id]
                    return (UNARY_FAILED, future, error_from_frame(header, payload))
                return None
            stream = self.streams_out.get(call_id)
            if stream is None:
                if kind == GOAWAY:
                    return self._goaway(header)
                return None
            if kind == MESSAGE:
                if flags & FLAG_END:
                    del self.streams_out[call_id]
                    return (STREAM_ENDED, stream, flags, payload)
                return (STREAM_MESSAGE, stream, flags, payload)
            if kind == CREDIT:
                return (STREAM_CREDIT, stream, header[3])
            if kind == ERROR:
                del self.streams_out[call_id]
                return (STREAM_FAILED, stream, error_from_frame(header, payload))
            if kind == CANCEL:
                del self.streams_out[call_id]
                return (STREAM_FAILED, stream, RpcCancelled("remote dropped the call"))
            return None
        if kind == OPEN:
            if self.parked or self.frames.pending > self._write_high:
                self._park(header, payload)
                return None
            return self.accept(header, payload, now)
        if kind == GOAWAY:
            return self._goaway(header)
        if self.parked:
            # frames of calls we serve stay in order behind a parked OPEN (its first messages,
            # credit, a cancel): none may overtake it or be lost as "unknown call"
            self._park(header, payload)
            return None
        return self._served(header, payload)

    def _served(self, header: list[Any], payload: bytes) -> Event | None:
        """A MESSAGE, CREDIT or CANCEL frame of a call we serve."""
        kind = header[0]
        if kind == MESSAGE:
            stream = self.streams_in.get(header[1])
            if stream is not None:
                return (STREAM_MESSAGE, stream, header[2], payload)
            return None
        if kind == CREDIT:
            stream = self.streams_in.get(header[1])
            if stream is not None:
                return (STREAM_CREDIT, stream, header[3])
            return None
        if kind == CANCEL:
            handle = self.unary_in.pop(header[1], None)
            if handle is None:
                handle = self.streams_in.pop(header[1], None)
            if handle is not None:
                return (CALL_CANCELLED, handle)
        return None

    def _park(self, header: list[Any], payload: bytes) -> None:
        self.parked.append((header, payload))
        self.parked_bytes += len(payload)

    def _goaway(self, header: list[Any]) -> Event:
        return (GOAWAY_RECEIVED, f"remote is closing the session: [{header[3]}] {header[4]}")

    def expire(self, now: float) -> list[tuple[int, int, Any]]:
        """Calls whose deadline is at or before ``now``, as ``(EXPIRED_*, call_id, handle)``. Outgoing
        ones leave the table and get a CANCEL queued; calls we serve stay until their handler
        has stopped (:meth:`finish_incoming`)."""
        expired: list[tuple[int, int, Any]] = []
        for call_id, outgoing in self._deadlines.pop_expired(now):
            if outgoing:
                future = self.unary_out.pop(call_id, None)
                if future is not None:
                    expired.append((EXPIRED_UNARY, call_id, future))
                    self.send([CANCEL, call_id, 0])
                    continue
                stream = self.streams_out.pop(call_id, None)
                if stream is not None:
                    expired.append((EXPIRED_STREAM, call_id, stream))
                    self.send([CANCEL, call_id, 0])
            else:
                handle = self.unary_in.get(call_id)
                if handle is None:
                    handle = self.streams_in.get(call_id)
                if handle is not None:
                    expired.append((EXPIRED_INCOMING, call_id, handle))
        return expired

    # -- output --------------------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        """Bytes queued to send."""
        return self.frames.pending

    @property
    def outbox(self) -> list[bytes | bytearray | memoryview]:
        """The queued write pieces."""
        return self.frames.pieces

    def take_output(self) -> tuple[list[bytes | bytearray | memoryview], bool]:
        """Everything queued to send, and whether it holds a large payload as its own piece."""
        return self.frames.take()

    def send_reply(self, call_id: int, reply: object) -> None:
        """Queue the single reply of a call we serve (an ERROR if it is not bytes or too big)."""
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self.send_error(
                call_id, Status.INTERNAL, f"handler returned {type(reply).__name__}, expected bytes"
            )
            return
        if len(reply) > self._max_frame:
            self.send_error(
                call_id,
                Status.RESOURCE_EXHAUSTED,
                f"reply of {len(reply)} bytes exceeds max_frame_size "
                f"{self._max_frame}; use a server stream",
            )
            return
        self.send([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], reply)

    def send_error(self, call_id: int, code: str, message: str, tb: str = "") -> None:
        self.send(
            [ERROR, call_id, FLAG_RESPONSE, code, message[:MAX_ERROR_MESSAGE]],
            tb.encode("utf-8", "replace")[:MAX_TRACEBACK],
        )

    def send_exception(self, call_id: int, exc: BaseException) -> None:
        """Queue the ERROR for a handler that raised: its own status for an RpcError, else
        INTERNAL with the traceback (if ``expose_tracebacks``)."""
        if isinstance(exc, RpcError):
            self.send_error(call_id, exc.code, exc.message)
            return
        tb = ""
        if self.limits.expose_tracebacks:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.send_error(call_id, Status.INTERNAL, f"{type(exc).__name__}: {exc}", tb)

    def send_goaway(self, code: str, reason: str) -> None:
        self.send([GOAWAY, 0, 0, code, reason[:MAX_ERROR_MESSAGE]])

    # -- closing -------------------------------------------------------------------------------
    def _move_to(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"rpc session cannot go from {self.state.name} to {state.name}")
        self.state = state

    def start_closing(self, reason: str) -> tuple[list[Any], list[Any], list[Any]]:
        """Move to CLOSING and empty the table: returns the handles of the outgoing unary calls,
        the outgoing streams and the calls we serve, for the shell to fail or stop. Parked
        OPENs and deadlines are dropped; queued frames stay for a graceful flush."""
        self._move_to(SessionState.CLOSING)
        self.close_reason = reason
        unary = list(self.unary_out.values())
        streams = list(self.streams_out.values())
        served = list(self.unary_in.values()) + list(self.streams_in.values())
        self.unary_out.clear()
        self.streams_out.clear()
        self.unary_in.clear()
        self.streams_in.clear()
        self.parked.clear()
        self.parked_bytes = 0
        self._deadlines.clear()
        return unary, streams, served

    def mark_closed(self) -> None:
        """Move to CLOSED: the outbox is dropped and nothing more is queued."""
        if self.state is SessionState.OPEN:
            self._move_to(SessionState.CLOSING)
        self._move_to(SessionState.CLOSED)
        self.frames.close()
