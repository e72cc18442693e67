"""Streaming RPC ``/latticaray/rpc/1`` over one authenticated channel.

The channel is any :class:`~latticaray.mesh.channel.Channel` (QUIC stream, TCP+TLS, Unix socket).

One :class:`RpcSession` per connection multiplexes any number of calls in both directions (either
end may call the other). Services are registered by name on an :class:`RpcRouter`; four call kinds
exist: unary, server-streaming, client-streaming and bidirectional. Frames and their meaning are
specified in docs/protocol/rpc.md; the byte-level codec is :mod:`latticaray.mesh.framing`.

What the session guarantees:

* every call has a deadline; it travels in the OPEN frame, the server cancels the handler when it
  passes and the caller raises :class:`~latticaray.mesh.errors.RpcTimeout`;
* cancellation travels both ways (a cancelled caller cancels the handler task; a handler that
  raises makes the caller raise the typed :class:`~latticaray.mesh.errors.RpcError`);
* streams are flow controlled with per-call byte credit, so a stalled reader stops its writer and
  memory stays bounded; the session also stops reading while its own send buffer is full;
* a malformed or oversize frame closes only this session (after a GOAWAY saying why); a closed
  channel fails every in-flight call at once with
  :class:`~latticaray.mesh.errors.RpcConnectionLost`.

Hot path notes: writes are queued and handed to the channel once per event-loop iteration by a
writer task; frames are parsed from one buffer per read; a caller's unary call is a future (no
task); a unary handler registered with ``eager=True`` is stepped inline and only gets a task if
it really awaits (about half the CPU per call of a task per call).
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
import logging
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import framing
from .errors import (
    ConnectionClosed,
    FrameTooLarge,
    ProtocolViolation,
    RpcCancelled,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    RpcUnimplemented,
)
from .framing import (
    BIDI,
    CANCEL,
    CLIENT_STREAM,
    CREDIT,
    ERROR,
    FLAG_END,
    FLAG_MSG,
    FLAG_RESPONSE,
    GOAWAY,
    INLINE_PAYLOAD,
    MESSAGE,
    OPEN,
    PROTOCOL_ID,
    SERVER_STREAM,
    UNARY,
    FrameDecoder,
)
from .rpcflow import INITIAL_WINDOW, MESSAGE_OVERHEAD, DeadlineQueue, StreamWindow

__all__ = [
    "INITIAL_WINDOW",
    "MESSAGE_OVERHEAD",
    "PROTOCOL_ID",
    "CallContext",
    "RpcCancelled",
    "RpcConnectionLost",
    "RpcError",
    "RpcLimits",
    "RpcRouter",
    "RpcSession",
    "RpcTimeout",
    "RpcUnimplemented",
    "Status",
    "StreamCall",
]

log = logging.getLogger(__name__)

_pack = framing._packb
_current_task = asyncio.current_task
# asyncio's own bookkeeping of the running task (C-accelerated; used by every Task step). The
# eager path steps a handler outside any task, so it takes the current task out for that step.
_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task
_pack_prefix = framing._pack_prefix

_MAX_ERROR_MESSAGE = 1024
_MAX_TRACEBACK = 16 * 1024


class Status:
    """Status codes carried in ERROR frames (names follow gRPC's)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"


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


UnaryHandler = Callable[["CallContext", bytes], Awaitable[bytes]]
ServerStreamHandler = Callable[["CallContext", bytes], AsyncIterator[bytes]]
ClientStreamHandler = Callable[["CallContext", "StreamCall"], Awaitable[bytes]]
BidiHandler = Callable[["CallContext", "StreamCall"], AsyncIterator[bytes]]


class RpcRouter:
    """Services by name. One router may serve many sessions (every connection of a node)."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[int, Callable, bool]] = {}

    def register_unary(self, service: str, handler: UnaryHandler, *, eager: bool = False) -> None:
        """``async def handler(ctx, payload: bytes) -> bytes``.

        ``eager=True`` runs the handler inline up to its first real suspension, so a handler that
        never waits costs no task. Until its first await no task is current, so such a handler
        must not use ``asyncio.timeout()`` or ``asyncio.current_task()`` before awaiting (they
        raise RuntimeError there, which the caller receives as an INTERNAL error).
        """
        self._register(
            service, UNARY, handler, inspect.iscoroutinefunction, "an async function", eager
        )

    def register_server_stream(self, service: str, handler: ServerStreamHandler) -> None:
        """``async def handler(ctx, payload: bytes)`` that ``yield``s bytes."""
        self._register(
            service,
            SERVER_STREAM,
            handler,
            inspect.isasyncgenfunction,
            "an async generator function",
        )

    def register_client_stream(self, service: str, handler: ClientStreamHandler) -> None:
        """``async def handler(ctx, requests) -> bytes``; ``async for msg in requests``."""
        self._register(
            service, CLIENT_STREAM, handler, inspect.iscoroutinefunction, "an async function"
        )

    def register_bidi(self, service: str, handler: BidiHandler) -> None:
        """``async def handler(ctx, requests)`` that reads ``requests`` and ``yield``s bytes."""
        self._register(
            service, BIDI, handler, inspect.isasyncgenfunction, "an async generator function"
        )

    def unregister(self, service: str) -> None:
        self._handlers.pop(service, None)

    def services(self) -> list[str]:
        return sorted(self._handlers)

    def lookup(self, service: str) -> tuple[int, Callable, bool] | None:
        return self._handlers.get(service)

    def _register(
        self,
        service: str,
        call_type: int,
        handler: Callable,
        check: Callable[[Any], bool],
        what: str,
        eager: bool = False,
    ) -> None:
        if not isinstance(service, str) or not 0 < len(service) <= framing.MAX_SERVICE_NAME:
            raise ValueError(f"service name must be 1..{framing.MAX_SERVICE_NAME} characters")
        if not check(handler):
            raise TypeError(f"handler for {service!r} must be {what}, got {handler!r}")
        if service in self._handlers:
            raise ValueError(f"service {service!r} is already registered")
        self._handlers[service] = (call_type, handler, eager)


class CallContext:
    """What a handler knows about its call."""

    __slots__ = ("_cancelled", "call_id", "deadline", "service", "session")

    def __init__(self, session: RpcSession, call_id: int, service: str, deadline: float) -> None:
        self.session = session
        self.call_id = call_id
        self.service = service
        #: Event-loop time (``loop.time()``) after which the call is cancelled.
        self.deadline = deadline
        self._cancelled = False

    @property
    def peer_id(self):
        """The authenticated identity of the caller (``channel.remote_peer``)."""
        return self.session.channel.remote_peer

    @property
    def remote_addr(self):
        return self.session.channel.remote_addr

    @property
    def transport(self) -> str:
        return self.session.channel.transport

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled, the deadline passed, or the session closed."""
        return self._cancelled

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - self.session._loop.time())

    def abort(self, code: str, message: str) -> None:
        """End the call with an error status the caller receives as :class:`RpcError`."""
        raise RpcError(code, message)


class _Resume(collections.abc.Coroutine):
    """Hands a coroutine that was already stepped once (eagerly) to an asyncio Task."""

    __slots__ = ("_coro", "_first", "_started")

    def __init__(self, coro, first_yield) -> None:
        self._coro = coro
        self._first = first_yield
        self._started = False

    def send(self, value):
        if not self._started:
            self._started = True
            return self._first
        return self._coro.send(value)

    def throw(self, typ, val=None, tb=None):
        self._started = True
        if val is None:
            return self._coro.throw(typ)
        return self._coro.throw(val)

    def close(self):
        self._coro.close()

    def __await__(self):
        return self


class _InUnary:
    """A unary handler that awaited, so runs as a task (kept for cancel and deadline)."""

    __slots__ = ("ctx", "reason", "task")

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx
        self.task: asyncio.Task | None = None
        self.reason: str | None = None

    def on_done(self, task: asyncio.Task) -> None:
        self.ctx.session._on_unary_done(self, task)

    def stop(self, reason: str) -> None:
        self.ctx._cancelled = True
        if self.reason is None:
            self.reason = reason
        if self.task is not None:
            self.task.cancel()


class StreamCall:
    """One streaming call, either end: a bounded inbound queue plus credit-limited sending.

    Caller side (returned by :meth:`RpcSession.call_stream`, :meth:`~RpcSession.call_client_stream`,
    :meth:`~RpcSession.call_bidi`): ``await send(msg)``, ``end()`` (no more requests),
    ``async for reply in call``, ``await result()`` (client stream: the single reply),
    ``cancel()``; usable as ``async with`` (leaving cancels it if unfinished).
    Handler side: it is the ``requests`` argument (``async for msg in requests``).
    """

    __slots__ = (
        "_credit_waiter",
        "_error",
        "_finished",
        "_flow",
        "_queue",
        "_recv_done",
        "_recv_waiter",
        "_send_done",
        "_session",
        "call_id",
        "ctx",
        "deadline",
        "outgoing",
        "reason",
        "service",
        "task",
    )

    def __init__(
        self,
        session: RpcSession,
        call_id: int,
        service: str,
        outgoing: bool,
        deadline: float,
        window: int | None = None,
    ) -> None:
        self._session = session
        self.call_id = call_id
        self.service = service
        self.outgoing = outgoing
        self.deadline = deadline
        self.ctx: CallContext | None = None
        self.task: asyncio.Task | None = None
        self.reason: str | None = None
        self._queue: deque[bytes] = deque()
        self._flow = StreamWindow(
            window or session.limits.stream_window, session.limits.max_frame_size
        )
        self._recv_waiter: asyncio.Future | None = None
        self._recv_done = False
        self._error: BaseException | None = None
        self._credit_waiter: asyncio.Future | None = None
        self._send_done = False
        self._finished = False

    # -- public ------------------------------------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Received bytes not yet read by the application (bounded by the stream window)."""
        return self._flow.unread

    @property
    def done(self) -> bool:
        return self._finished

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one message; waits while the receiver's window is exhausted."""
        if self._error is not None:
            raise self._error
        if self._send_done:
            raise RpcError(Status.INVALID_ARGUMENT, "send after end() on this call")
        session = self._session
        n = len(message)
        if n > session.limits.max_frame_size:
            raise FrameTooLarge(
                f"message of {n} bytes exceeds max_frame_size "
                f"{session.limits.max_frame_size}; split it into several messages"
            )
        while not self._flow.can_send():
            waiter = self._credit_waiter = session._loop.create_future()
            await waiter
            if self._error is not None:
                raise self._error
        if session._pending_bytes > session._write_high or session._turn_waiters:
            await session._wait_turn(n)
            if self._error is not None:
                raise self._error
        self._flow.sent(n)
        flags = FLAG_MSG if self.outgoing else FLAG_MSG | FLAG_RESPONSE
        session._send([MESSAGE, self.call_id, flags], message)
        if session._turn_waiters:
            session._pass_turn()

    def end(self) -> None:
        """No more messages from this side (half-close)."""
        if self._send_done or self._finished:
            return
        self._send_done = True
        flags = FLAG_END if self.outgoing else FLAG_END | FLAG_RESPONSE
        self._session._send([MESSAGE, self.call_id, flags])

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> bytes:
        queue = self._queue
        while not queue:
            if self._error is not None:
                raise self._error
            if self._recv_done:
                raise StopAsyncIteration
            waiter = self._recv_waiter = self._session._loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = queue.popleft()
        grant = self._flow.consumed(len(message))
        if grant and not self._recv_done and not self._finished:
            flags = 0 if self.outgoing else FLAG_RESPONSE
            self._session._send([CREDIT, self.call_id, flags, grant])
        return message

    async def result(self) -> bytes:
        """The single reply of a client-streaming call (ends our side first if still open)."""
        self.end()
        reply = None
        async for message in self:
            if reply is not None:
                raise RpcError(Status.INTERNAL, "client-stream call got more than one reply")
            reply = message
        if reply is None:
            raise RpcError(Status.INTERNAL, "client-stream call ended without a reply")
        return reply

    def cancel(self) -> None:
        """Abandon the call: the remote handler is cancelled; local readers raise RpcCancelled."""
        if self._finished:
            return
        session = self._session
        if self.outgoing:
            session._send([CANCEL, self.call_id, 0])
            session._out_streams.pop(self.call_id, None)
        else:
            session._send([CANCEL, self.call_id, FLAG_RESPONSE])
            session._in_calls.pop(self.call_id, None)
        self._fail(RpcCancelled("cancelled by this side"), discard=True)

    async def __aenter__(self) -> StreamCall:
        return self

    async def __aexit__(self, *exc_info) -> None:
        if not self._finished:
            self.cancel()

    # -- session side ------------------------------------------------------------------------
    def _deliver(self, flags: int, payload: bytes) -> None:
        if flags & FLAG_MSG:
            if self._recv_done:
                raise ProtocolViolation(f"message after end of stream on call {self.call_id}")
            try:
                self._flow.received(len(payload))
            except ProtocolViolation as exc:
                raise ProtocolViolation(f"call {self.call_id}: {exc}") from None
            self._queue.append(payload)
        if flags & FLAG_END:
            self._recv_done = True
            if self.outgoing:
                self._finished = True
                if self._session._out_streams.pop(self.call_id, None) is not None:
                    self._session._release_slot()
                self._wake_credit()
        self._wake_recv()

    def _grant(self, n: int) -> None:
        self._flow.granted(n)
        self._wake_credit()

    def _fail(self, error: BaseException, discard: bool = False) -> None:
        """End the call with ``error``; ``discard`` drops unread messages (local cancel or
        deadline: nothing more is delivered), else they are read before the error."""
        if discard:
            self._queue.clear()
            self._flow.discard_unread()
        if self._finished and self._error is not None:
            return
        self._finished = True
        if self._error is None:
            self._error = error
        if self.ctx is not None:
            self.ctx._cancelled = True
        self._wake_recv()
        self._wake_credit()

    def stop(self, reason: str) -> None:
        """Handler side: cancel the running handler (caller cancelled, deadline, closing)."""
        if self.reason is None:
            self.reason = reason
        self._fail(RpcCancelled(reason))
        if self.task is not None:
            self.task.cancel()

    def _wake_recv(self) -> None:
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_credit(self) -> None:
        waiter = self._credit_waiter
        if waiter is not None:
            self._credit_waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _error_from_frame(header: list, payload: bytes) -> RpcError:
    code, message = header[3], header[4]
    if code == Status.DEADLINE_EXCEEDED:
        return RpcTimeout(f"remote: {message}")
    if code == Status.CANCELLED:
        return RpcCancelled(f"remote: {message}")
    if code == Status.UNIMPLEMENTED:
        return RpcUnimplemented(message)
    tb = bytes(payload[:_MAX_TRACEBACK]).decode("utf-8", "replace") if payload else None
    return RpcError(code, message, tb)


class RpcSession:
    """Multiplexes RPC calls in both directions over one channel (see the module docstring).

    Create it inside a running event loop; it starts its reader and writer tasks at once.
    """

    def __init__(
        self, channel, router: RpcRouter | None = None, limits: RpcLimits | None = None
    ) -> None:
        self.channel = channel
        self.router = router if router is not None else RpcRouter()
        self.limits = limits if limits is not None else RpcLimits()
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(self.limits.max_frame_size)
        self._next_call_id = 0
        self._out_unary: dict[int, asyncio.Future] = {}
        self._out_streams: dict[int, StreamCall] = {}
        self._in_calls: dict[int, _InUnary | StreamCall] = {}
        self._deadlines = DeadlineQueue()
        self._deadline_adds = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._out: list = []
        self._out_large = False  # a large payload is queued as its own piece
        self._pending_bytes = 0
        self._out_waiter: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None
        self._turn_waiters: deque[tuple[asyncio.Future, int]] = deque()
        self._reserved = 0  # send-queue room promised to woken senders not yet run
        self._slot_waiters: deque[asyncio.Future] = deque()
        self._write_high = self.limits.write_buffer_high
        self._max_frame = self.limits.max_frame_size
        self._max_calls = self.limits.max_concurrent_calls
        self._default_timeout = self.limits.default_timeout
        self._max_timeout = self.limits.max_timeout
        self._deferred: deque[tuple[list, int, bytes]] = deque()
        self._deferred_bytes = 0
        self._closed = False
        self._closing = False
        self.close_reason: str | None = None
        self._close_callbacks: list[Callable[[RpcSession], None]] = []
        self._done = self._loop.create_future()
        self._read_progress = 0
        self._stall_mark = -1
        self._stall_timer = self._loop.call_later(self.limits.frame_timeout, self._check_stall)
        self._close_timer: asyncio.TimerHandle | None = None
        self._writer_task = self._loop.create_task(self._write_loop())
        self._reader_task = self._loop.create_task(self._read_loop())

    # -- public ------------------------------------------------------------------------------
    @property
    def remote_peer(self):
        return self.channel.remote_peer

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active_calls(self) -> int:
        return len(self._out_unary) + len(self._out_streams) + len(self._in_calls)

    def on_close(self, callback: Callable[[RpcSession], None]) -> None:
        """``callback(session)`` once the session has closed (at once if it already has)."""
        if self._closed:
            self._loop.call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    async def call(
        self,
        service: str,
        payload: bytes | bytearray | memoryview = b"",
        timeout: float | None = None,
    ) -> bytes:
        """Unary call: send ``payload``, return the reply; raises the RpcError family."""
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        if len(payload) > self._max_frame:
            raise FrameTooLarge(
                f"request of {len(payload)} bytes exceeds max_frame_size "
                f"{self._max_frame}; send it as a client stream"
            )
        out_unary = self._out_unary
        if len(out_unary) + len(self._out_streams) >= self._max_calls:
            await self._wait_slot()
        if self._pending_bytes > self._write_high or self._turn_waiters:
            await self._wait_turn(len(payload))
        if timeout is None:
            timeout = self._default_timeout
        elif not 0 < timeout <= self._max_timeout:
            timeout = self._timeout(timeout)
        call_id = self._next_call_id = self._next_call_id + 1
        future = self._loop.create_future()
        out_unary[call_id] = future
        self._add_deadline(self._loop.time() + timeout, call_id, True)
        self._send(
            [OPEN, call_id, FLAG_MSG | FLAG_END, service, UNARY, int(timeout * 1000) + 1], payload
        )
        if self._turn_waiters:
            self._pass_turn()
        try:
            return await future
        except asyncio.CancelledError:
            if out_unary.pop(call_id, None) is not None and not self._closed:
                self._send([CANCEL, call_id, 0])
                self._release_slot()
            raise

    def call_stream(
        self,
        service: str,
        payload: bytes = b"",
        timeout: float | None = None,
        window: int | None = None,
    ) -> StreamCall:
        """Server-streaming call: ``async for reply in session.call_stream(...)``.

        ``window``: this call's receive window in bytes (default ``limits.stream_window``, at
        most ``limits.max_stream_window``); a bulk reader asks for what it expects in flight.
        """
        call = self._open_stream(service, SERVER_STREAM, timeout, payload, window)
        call._send_done = True
        return call

    def call_client_stream(self, service: str, timeout: float | None = None) -> StreamCall:
        """Client-streaming call: ``await c.send(m)`` ..., then ``await c.result()``."""
        return self._open_stream(service, CLIENT_STREAM, timeout, None)

    def call_bidi(self, service: str, timeout: float | None = None) -> StreamCall:
        """Bidirectional call: ``send``/``end`` requests while iterating replies."""
        return self._open_stream(service, BIDI, timeout, None)

    def close(self, reason: str = "closed locally") -> None:
        """Fail in-flight calls, flush what is queued (GOAWAY included), close the channel."""
        if self._closing:
            return
        self._send([GOAWAY, 0, 0, Status.UNAVAILABLE, reason[:_MAX_ERROR_MESSAGE]])
        self._shutdown(reason, graceful=True)

    async def aclose(self, reason: str = "closed locally") -> None:
        self.close(reason)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    # -- outgoing ----------------------------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.limits.default_timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return min(timeout, self.limits.max_timeout)

    def _open_stream(
        self,
        service: str,
        call_type: int,
        timeout: float | None,
        payload: bytes | None,
        window: int | None = None,
    ) -> StreamCall:
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        if len(self._out_unary) + len(self._out_streams) >= self.limits.max_concurrent_calls:
            raise RpcError(
                Status.RESOURCE_EXHAUSTED,
                f"{self.limits.max_concurrent_calls} calls already in flight",
            )
        if payload is not None and len(payload) > self.limits.max_frame_size:
            raise FrameTooLarge(f"request of {len(payload)} bytes exceeds max_frame_size")
        timeout = self._timeout(timeout)
        if window is not None:
            window = max(INITIAL_WINDOW, min(int(window), self.limits.max_stream_window))
        call_id = self._next_call_id = self._next_call_id + 1
        deadline = self._loop.time() + timeout
        call = StreamCall(self, call_id, service, True, deadline, window)
        self._out_streams[call_id] = call
        self._add_deadline(deadline, call_id, True)
        header = [OPEN, call_id, 0, service, call_type, int(timeout * 1000) + 1]
        if payload is not None:
            header[2] = FLAG_MSG | FLAG_END
            self._send(header, payload)
        else:
            self._send(header)
        extra = call._flow.initial_grant()
        if extra > 0:
            self._send([CREDIT, call_id, 0, extra])
        return call

    def _send(self, header: list, payload: bytes | bytearray | memoryview = b"") -> None:
        if self._closed:
            return
        h = _pack(header)
        plen = len(payload)
        hlen = len(h)
        out = self._out
        if plen == 0:
            out.append(_pack_prefix(2 + hlen, hlen) + h)
        elif plen <= INLINE_PAYLOAD:
            out.append(b"".join((_pack_prefix(2 + hlen + plen, hlen), h, payload)))
        else:
            out.append(_pack_prefix(2 + hlen + plen, hlen) + h)
            out.append(payload)
            self._out_large = True
        self._pending_bytes += 6 + hlen + plen
        waiter = self._out_waiter
        if waiter is not None:
            self._out_waiter = None
            waiter.set_result(None)

    async def _wait_writable(self) -> None:
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        if self._writable is None:
            self._writable = self._loop.create_future()
        await self._writable
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")

    async def _wait_turn(self, nbytes: int) -> None:
        """Wait, in FIFO order with other senders, until the send queue has room for ``nbytes``.

        Only as many waiters as fit are woken at once (no herd); each may then queue one message.
        """
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")
        waiter = self._loop.create_future()
        self._turn_waiters.append((waiter, nbytes))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._reserved -= waiter.result()
                self._pass_turn()  # we were given room we will not use
            raise
        # the room reserved for us becomes real queued bytes as soon as we send (no await between)
        self._reserved -= waiter.result()
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")

    def _pass_turn(self) -> None:
        """Wake waiting senders in order while their messages fit under write_buffer_high,
        counting room already promised to woken senders that have not run yet."""
        waiters = self._turn_waiters
        if self._closing:
            while waiters:
                waiter, _ = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(0)
            return
        room = self._write_high - self._pending_bytes - self._reserved
        while waiters and room >= 0:
            waiter, nbytes = waiters.popleft()
            if not waiter.done():
                cost = nbytes + 64
                self._reserved += cost
                waiter.set_result(cost)
                room -= cost

    def _run_deferred(self) -> None:
        """Start calls that arrived while our send queue was full, as far as it has room."""
        deferred = self._deferred
        high = self._write_high
        while deferred and self._pending_bytes <= high and not self._closing:
            header, flags, payload = deferred.popleft()
            self._deferred_bytes -= len(payload)
            try:
                self._on_open(header, flags, payload)
            except ProtocolViolation as exc:
                self._send([GOAWAY, 0, 0, "PROTOCOL_VIOLATION", str(exc)[:_MAX_ERROR_MESSAGE]])
                self._shutdown(f"protocol violation: {exc}", graceful=True)
                return

    def _wake_writable(self) -> None:
        if self._deferred:
            self._run_deferred()
        if self._turn_waiters:
            self._pass_turn()
        writable = self._writable
        if writable is not None:
            self._writable = None
            if not writable.done():
                writable.set_result(None)

    async def _wait_slot(self) -> None:
        while (
            len(self._out_unary) + len(self._out_streams) >= self.limits.max_concurrent_calls
            and not self._closing
        ):
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            await waiter
        if self._closing:
            raise RpcConnectionLost(f"session closed: {self.close_reason}")

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _write_loop(self) -> None:
        channel = self.channel
        loop = self._loop
        try:
            while True:
                out = self._out
                if not out:
                    if self._closing:
                        break
                    waiter = self._out_waiter = loop.create_future()
                    await waiter
                    continue
                self._out = []
                self._pending_bytes = 0
                if len(out) == 1:
                    channel.write(out[0])
                elif not self._out_large:
                    channel.write(b"".join(out))
                else:
                    self._out_large = False
                    run: list = []
                    for piece in out:
                        if len(piece) > 65536:
                            if run:
                                channel.write(b"".join(run) if len(run) > 1 else run[0])
                                run = []
                            channel.write(piece)
                        else:
                            run.append(piece)
                    if run:
                        channel.write(b"".join(run) if len(run) > 1 else run[0])
                await channel.drain()
                self._wake_writable()
        except asyncio.CancelledError:
            return
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            self._shutdown(f"channel write failed: {exc}", graceful=False)
            return
        if self._closing:
            channel.close()
            self._finish_close()

    # -- deadlines ---------------------------------------------------------------------------
    def _add_deadline(self, deadline: float, call_id: int, outgoing: bool) -> None:
        self._deadlines.add(deadline, call_id, outgoing)
        if self._timer is None or deadline < self._timer_at:
            self._arm_timer(deadline)
        self._deadline_adds += 1
        if self._deadline_adds >= 4096:
            # entries of finished calls stay until they expire: drop them now and then
            self._deadline_adds = 0
            if len(self._deadlines) > 4 * self.active_calls:
                self._deadlines.compact(self._is_live)

    def _is_live(self, call_id: int, outgoing: bool) -> bool:
        if outgoing:
            return call_id in self._out_unary or call_id in self._out_streams
        return call_id in self._in_calls

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time() + 0.001  # call_at may fire up to the clock resolution early
        for call_id, outgoing in self._deadlines.pop_expired(now):
            if outgoing:
                future = self._out_unary.pop(call_id, None)
                if future is not None:
                    if not future.done():
                        future.set_exception(RpcTimeout(f"call {call_id} exceeded its deadline"))
                    self._send([CANCEL, call_id, 0])
                    self._release_slot()
                    continue
                stream = self._out_streams.pop(call_id, None)
                if stream is not None:
                    stream._fail(
                        RpcTimeout(f"stream {stream.service!r} exceeded its deadline"), discard=True
                    )
                    self._send([CANCEL, call_id, 0])
                    self._release_slot()
            else:
                call = self._in_calls.get(call_id)
                if call is not None:
                    call.stop(Status.DEADLINE_EXCEEDED)
        next_deadline = self._deadlines.next_deadline()
        if next_deadline is not None and not self._closed:
            self._arm_timer(next_deadline)

    # -- incoming ----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        channel = self.channel
        feed = self._decoder.feed
        read_size = self.limits.read_size
        max_deferred = self.limits.max_concurrent_calls
        max_deferred_bytes = 4 * self.limits.write_buffer_high + self.limits.max_frame_size
        reason = "remote closed the connection"
        try:
            while True:
                data = await channel.read(read_size)
                if not data:
                    break
                self._read_progress += 1
                frames = feed(data)
                if frames:
                    self._dispatch(frames)
                # Reading continues while our replies are blocked (replies and credit from the
                # peer must still get through, or two busy peers would wait on each other);
                # only a peer flooding us with more new calls than that makes us stop reading.
                while self._deferred and (
                    len(self._deferred) > max_deferred or self._deferred_bytes > max_deferred_bytes
                ):
                    await self._wait_writable()
        except asyncio.CancelledError:
            return
        except ProtocolViolation as exc:
            log.warning("rpc session with %s: protocol violation: %s", self._peer_name(), exc)
            self._send([GOAWAY, 0, 0, "PROTOCOL_VIOLATION", str(exc)[:_MAX_ERROR_MESSAGE]])
            self._shutdown(f"protocol violation: {exc}", graceful=True)
            return
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            reason = f"channel read failed: {exc}"
        except RpcConnectionLost:
            return
        except Exception as exc:  # a bug here must close this session, not hang its calls
            log.exception("rpc session with %s failed", self._peer_name())
            reason = f"internal error: {exc!r}"
        self._shutdown(reason, graceful=False)

    def _check_stall(self) -> None:
        """Every frame_timeout: close if a frame was partly received and no read since."""
        if self._closing:
            return
        if self._decoder.has_partial and self._read_progress == self._stall_mark:
            reason = f"peer sent part of a frame and nothing more for {self.limits.frame_timeout} s"
            log.warning("rpc session with %s: %s", self._peer_name(), reason)
            self._shutdown(reason, graceful=False)
            return
        self._stall_mark = self._read_progress
        self._stall_timer = self._loop.call_later(self.limits.frame_timeout, self._check_stall)

    def _peer_name(self) -> str:
        try:
            return str(self.channel.remote_peer)
        except Exception:
            return "?"

    def _dispatch(self, frames: list) -> None:
        out_unary = self._out_unary
        for header, payload in frames:
            kind = header[0]
            flags = header[2]
            if flags & FLAG_RESPONSE:
                call_id = header[1]
                future = out_unary.get(call_id)
                if future is not None:
                    if kind == MESSAGE:
                        del out_unary[call_id]
                        if not future.done():
                            future.set_result(payload)
                        if self._slot_waiters:
                            self._release_slot()
                    elif kind == ERROR:
                        del out_unary[call_id]
                        if not future.done():
                            future.set_exception(_error_from_frame(header, payload))
                        if self._slot_waiters:
                            self._release_slot()
                    continue
                stream = self._out_streams.get(call_id)
                if stream is None:
                    if kind == GOAWAY:
                        self._on_goaway(header)
                    continue
                if kind == MESSAGE:
                    stream._deliver(flags, payload)
                elif kind == CREDIT:
                    stream._grant(header[3])
                elif kind == ERROR:
                    self._out_streams.pop(call_id, None)
                    stream._fail(_error_from_frame(header, payload))
                    self._release_slot()
                elif kind == CANCEL:
                    self._out_streams.pop(call_id, None)
                    stream._fail(RpcCancelled("remote dropped the call"))
                    self._release_slot()
            elif kind == OPEN:
                if self._deferred or self._pending_bytes > self._write_high:
                    self._deferred.append((header, flags, payload))
                    self._deferred_bytes += len(payload)
                else:
                    self._on_open(header, flags, payload)
            elif kind == MESSAGE:
                call = self._in_calls.get(header[1])
                if type(call) is StreamCall:
                    call._deliver(flags, payload)
            elif kind == CREDIT:
                call = self._in_calls.get(header[1])
                if type(call) is StreamCall:
                    call._grant(header[3])
            elif kind == CANCEL:
                call = self._in_calls.pop(header[1], None)
                if call is not None:
                    call.stop(Status.CANCELLED)
            elif kind == GOAWAY:
                self._on_goaway(header)

    def _on_goaway(self, header: list) -> None:
        reason = f"remote is closing the session: [{header[3]}] {header[4]}"
        self._shutdown(reason, graceful=True)
        raise RpcConnectionLost(reason)

    def _on_open(self, header: list, flags: int, payload: bytes) -> None:
        call_id, service, call_type, timeout_ms = header[1], header[3], header[4], header[5]
        if call_id in self._in_calls:
            raise ProtocolViolation(f"call id {call_id} opened twice")
        entry = self.router._handlers.get(service)
        if entry is None:
            self._send_error(
                call_id,
                Status.UNIMPLEMENTED,
                f"no service {service!r} on peer {self.channel.local_peer}",
            )
            return
        if entry[0] != call_type:
            self._send_error(
                call_id,
                Status.UNIMPLEMENTED,
                f"service {service!r} is {framing.CALL_TYPE_NAMES[entry[0]]}, "
                f"called as {framing.CALL_TYPE_NAMES[call_type]}",
            )
            return
        if len(self._in_calls) >= self._max_calls:
            self._send_error(
                call_id,
                Status.RESOURCE_EXHAUSTED,
                f"peer has {len(self._in_calls)} calls in progress from you",
            )
            return
        timeout = timeout_ms / 1000.0 if timeout_ms else self._default_timeout
        if timeout > self._max_timeout:
            timeout = self._max_timeout
        deadline = self._loop.time() + timeout
        handler = entry[1]
        ctx = CallContext(self, call_id, service, deadline)
        if call_type == UNARY:
            self._start_unary(ctx, handler, payload, entry[2])
            return
        call = StreamCall(self, call_id, service, False, deadline)
        call.ctx = ctx
        self._in_calls[call_id] = call
        self._add_deadline(deadline, call_id, False)
        if call_type == SERVER_STREAM:
            call._recv_done = True
            runner = self._run_server_stream(call, handler(ctx, payload))
        else:
            if flags & (FLAG_MSG | FLAG_END):
                call._deliver(flags, payload)
            extra = self.limits.stream_window - INITIAL_WINDOW
            if extra > 0:
                self._send([CREDIT, call_id, FLAG_RESPONSE, extra])
            if call_type == CLIENT_STREAM:
                runner = self._run_client_stream(call, handler)
            else:
                runner = self._run_server_stream(call, handler(ctx, call))
        call.task = self._loop.create_task(runner)

    def _start_unary(
        self, ctx: CallContext, handler: Callable, payload: bytes, eager: bool
    ) -> None:
        call_id = ctx.call_id
        if not eager:
            try:
                coro = handler(ctx, payload)
            except Exception as exc:
                self._send_exception(call_id, exc)
                return
            call = _InUnary(ctx)
            self._in_calls[call_id] = call
            self._add_deadline(ctx.deadline, call_id, False)
            task = call.task = self._loop.create_task(coro)
            task.add_done_callback(call.on_done)
            return
        # While the handler runs inline no task is current, so asyncio.timeout() or
        # current_task() in it fail loudly instead of capturing (and later cancelling) our reader.
        current = _current_task(self._loop)
        if current is not None:
            _leave_task(self._loop, current)
        try:
            coro = handler(ctx, payload)
            first = coro.send(None)
        except StopIteration as stop:
            reply = stop.value
            if type(reply) is bytes and len(reply) <= self._max_frame:
                self._send([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], reply)
            else:
                self._send_reply(call_id, reply)
            return
        except Exception as exc:  # the handler failed before its first await
            self._send_exception(call_id, exc)
            return
        except asyncio.CancelledError:
            self._send_error(call_id, Status.CANCELLED, "handler cancelled itself")
            return
        finally:
            if current is not None:
                _enter_task(self._loop, current)
        call = _InUnary(ctx)
        self._in_calls[call_id] = call
        self._add_deadline(ctx.deadline, call_id, False)
        task = call.task = self._loop.create_task(_Resume(coro, first))
        task.add_done_callback(call.on_done)

    def _on_unary_done(self, call: _InUnary, task: asyncio.Task) -> None:
        call_id = call.ctx.call_id
        self._in_calls.pop(call_id, None)
        if self._closed:
            return
        if task.cancelled():
            if call.reason == Status.DEADLINE_EXCEEDED:
                self._send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
            elif call.reason is None:
                self._send_error(call_id, Status.CANCELLED, "handler was cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self._send_exception(call_id, exc)
        else:
            self._send_reply(call_id, task.result())

    def _send_reply(self, call_id: int, reply: object) -> None:
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self._send_error(
                call_id, Status.INTERNAL, f"handler returned {type(reply).__name__}, expected bytes"
            )
            return
        if len(reply) > self.limits.max_frame_size:
            self._send_error(
                call_id,
                Status.RESOURCE_EXHAUSTED,
                f"reply of {len(reply)} bytes exceeds max_frame_size "
                f"{self.limits.max_frame_size}; use a server stream",
            )
            return
        self._send([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], reply)

    def _send_error(self, call_id: int, code: str, message: str, tb: str = "") -> None:
        self._send(
            [ERROR, call_id, FLAG_RESPONSE, code, message[:_MAX_ERROR_MESSAGE]],
            tb.encode("utf-8", "replace")[:_MAX_TRACEBACK],
        )

    def _send_exception(self, call_id: int, exc: BaseException) -> None:
        if isinstance(exc, RpcError):
            self._send_error(call_id, exc.code, exc.message)
            return
        tb = ""
        if self.limits.expose_tracebacks:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._send_error(call_id, Status.INTERNAL, f"{type(exc).__name__}: {exc}", tb)

    async def _run_server_stream(self, call: StreamCall, replies: AsyncIterator[bytes]) -> None:
        call_id = call.call_id
        try:
            async for reply in replies:
                if not isinstance(reply, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"stream handler yielded {type(reply).__name__}, expected bytes"
                    )
                await call.send(reply)
            if not call._finished:
                call.end()
        except asyncio.CancelledError:
            if call.reason == Status.DEADLINE_EXCEEDED and not self._closed:
                self._send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
        except RpcError as exc:
            if call.reason is None and not self._closed:
                self._send_exception(call_id, exc)
        except Exception as exc:
            if not self._closed:
                self._send_exception(call_id, exc)
        finally:
            self._in_calls.pop(call_id, None)
            call._finished = True
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass

    async def _run_client_stream(self, call: StreamCall, handler: Callable) -> None:
        call_id = call.call_id
        try:
            reply = await handler(call.ctx, call)
            if not self._closed and call.reason is None:
                self._send_reply(call_id, reply)
        except asyncio.CancelledError:
            if call.reason == Status.DEADLINE_EXCEEDED and not self._closed:
                self._send_error(call_id, Status.DEADLINE_EXCEEDED, "handler exceeded the deadline")
        except Exception as exc:
            if not self._closed and call.reason is None:
                self._send_exception(call_id, exc)
        finally:
            self._in_calls.pop(call_id, None)
            call._finished = True

    # -- closing -----------------------------------------------------------------------------
    def _shutdown(self, reason: str, graceful: bool) -> None:
        if self._closing:
            if not graceful and not self._closed:
                self._finish_close()
            return
        self._closing = True
        self.close_reason = reason
        error = RpcConnectionLost(f"session closed: {reason}")
        for future in self._out_unary.values():
            if not future.done():
                future.set_exception(error)
        self._out_unary.clear()
        for stream in list(self._out_streams.values()):
            stream._fail(error)
        self._out_streams.clear()
        for call in list(self._in_calls.values()):
            call.stop("session closed")
        self._in_calls.clear()
        self._deferred.clear()
        self._wake_writable()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._slot_waiters.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stall_timer.cancel()
        self._deadlines.clear()
        if self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        if graceful and self._out and not self._writer_task.done():
            waiter = self._out_waiter
            if waiter is not None:
                self._out_waiter = None
                waiter.set_result(None)
            # The writer flushes what is queued, then closes the channel and finishes.
            self._close_timer = self._loop.call_later(self.limits.close_timeout, self._finish_close)
        else:
            self._finish_close()

    def _finish_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_timer is not None:
            # a pending timer would keep this session, its channel and the connection's
            # transport state alive for close_timeout after the close
            self._close_timer.cancel()
            self._close_timer = None
        self._wake_writable()
        if self._writer_task is not asyncio.current_task():
            self._writer_task.cancel()
        self._out.clear()
        try:
            if self.channel.is_closed:
                pass
            else:
                self.channel.close()
        except Exception:  # closing a broken channel must not raise into the loop
            pass
        if not self._done.done():
            self._done.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("rpc session close callback failed")
