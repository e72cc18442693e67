"""Streaming RPC ``/latticaray/rpc/1`` over one authenticated channel: the asyncio session.

The channel is any :class:`~latticaray.mesh.channel.Channel` (QUIC stream, TCP+TLS, Unix socket).

One :class:`RpcSession` per connection multiplexes any number of calls in both directions (either
end may call the other). Services are registered by name on an :class:`RpcRouter`; four call kinds
exist: unary, server-streaming, client-streaming and bidirectional. Frames and their meaning are
specified in docs/protocol/rpc.md. The session is the asyncio shell around the sans-I/O
:class:`~latticaray.mesh.rpccore.RpcConnection` (call table, ids, limits, deadlines, frame
output): it owns the reader and writer tasks, the deadline timer, send-queue backpressure and the
handler tasks, feeds the core frames and ``now``, and applies the events it returns. Call objects
are :mod:`latticaray.mesh.rpccall`, the byte codec :mod:`latticaray.mesh.framing`.

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
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from latticaray.observe import metrics

from .errors import (
    ConnectionClosed,
    FrameTooLarge,
    ProtocolViolation,
    RpcCancelled,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    RpcUnimplemented,
    Status,
)
from .framing import (
    BIDI,
    CLIENT_STREAM,
    PROTOCOL_ID,
    SERVER_STREAM,
    UNARY,
    FrameDecoder,
)
from .paths import path_of_transport
from .rpccall import CallContext, StreamCall
from .rpccore import (
    CALL_CANCELLED,
    CALL_OPENED,
    EXPIRED_STREAM,
    EXPIRED_UNARY,
    GOAWAY_RECEIVED,
    REPLY,
    STREAM_CREDIT,
    STREAM_ENDED,
    STREAM_FAILED,
    STREAM_MESSAGE,
    UNARY_FAILED,
    Event,
    RpcConnection,
    SessionState,
)
from .rpcflow import INITIAL_WINDOW, MESSAGE_OVERHEAD, RpcLimits
from .rpcrouter import (
    BidiHandler,
    ClientStreamHandler,
    RpcRouter,
    ServerStreamHandler,
    UnaryHandler,
)
from .rpcserve import HandlerRunner

__all__ = [
    "INITIAL_WINDOW",
    "MESSAGE_OVERHEAD",
    "PROTOCOL_ID",
    "BidiHandler",
    "CallContext",
    "ClientStreamHandler",
    "RpcCancelled",
    "RpcConnectionLost",
    "RpcError",
    "RpcLimits",
    "RpcRouter",
    "RpcSession",
    "RpcTimeout",
    "RpcUnimplemented",
    "ServerStreamHandler",
    "Status",
    "StreamCall",
    "UnaryHandler",
]

log = logging.getLogger(__name__)

_OPEN = SessionState.OPEN
_CLOSED = SessionState.CLOSED


_LATENCY: dict[str, metrics.TimingChild] = {}  # service -> its latency histogram


def _meters(path: str) -> tuple[metrics.TallyChild, metrics.TallyChild]:
    return metrics.BYTES_MOVED.labels(path, "out"), metrics.BYTES_MOVED.labels(path, "in")


class RpcSession:
    """Multiplexes RPC calls in both directions over one channel (see the module docstring).

    Create it inside a running event loop; it starts its reader and writer tasks at once.
    """

    def __init__(
        self, channel: Any, router: RpcRouter | None = None, limits: RpcLimits | None = None
    ) -> None:
        self.channel = channel
        self.router = router if router is not None else RpcRouter()
        self.limits = limits if limits is not None else RpcLimits()
        self.loop = asyncio.get_running_loop()
        #: The sans-I/O state of this session (call table, deadlines, queued frames).
        self.core = RpcConnection(
            self.limits, self.router.lookup, _local_name(channel), self._wake_writer
        )
        self._frames = self.core.frames
        self._decoder = FrameDecoder(self.limits.max_frame_size)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._out_waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._turn_waiters: deque[tuple[asyncio.Future[int], int]] = deque()
        self._reserved = 0  # send-queue room promised to woken senders not yet run
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._write_high = self.limits.write_buffer_high
        self._max_frame = self.limits.max_frame_size
        self._close_callbacks: list[Callable[[RpcSession], None]] = []
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._read_progress = 0
        #: Event-loop time of the last read from the channel (any bytes: liveness evidence).
        self.last_activity = self.loop.time()
        self._stall_mark = -1
        self._stall_timer = self.loop.call_later(self.limits.frame_timeout, self._check_stall)
        self._close_timer: asyncio.TimerHandle | None = None
        self._runner = HandlerRunner(self, self._watch_deadline)
        #: Bytes sent and received on the channel, counted into the process's metrics under
        #: the path type (unix, direct, relayed; the NAT service calls it punched: count_as).
        self._sent, self._received = _meters(path_of_transport(getattr(channel, "transport", "")))
        self._writer_task = self.loop.create_task(self._write_loop())
        self._reader_task = self.loop.create_task(self._read_loop())

    def count_as(self, path: str) -> None:
        """Count this session's bytes from now on under ``path`` (a hole-punched connection
        is known as such only to the NAT service that adopted it)."""
        self._sent, self._received = _meters(path)

    # -- public ------------------------------------------------------------------------------
    @property
    def remote_peer(self) -> Any:
        return self.channel.remote_peer

    @property
    def closed(self) -> bool:
        return self.core.state is _CLOSED

    @property
    def close_reason(self) -> str | None:
        """Why the session is closing or closed (None while open)."""
        return self.core.close_reason

    @property
    def active_calls(self) -> int:
        return self.core.active_calls

    def on_close(self, callback: Callable[[RpcSession], None]) -> None:
        """``callback(session)`` once the session has closed (at once if it already has)."""
        if self.core.state is _CLOSED:
            self.loop.call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    async def call(
        self,
        service: str,
        payload: bytes | bytearray | memoryview = b"",
        timeout: float | None = None,
    ) -> bytes:
        """Unary call: send ``payload``, return the reply; raises the RpcError family."""
        core = self.core
        if core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {core.close_reason}")
        if len(payload) > self._max_frame:
            raise FrameTooLarge(
                f"request of {len(payload)} bytes exceeds max_frame_size "
                f"{self._max_frame}; send it as a client stream"
            )
        if core.outgoing_full():
            await self._wait_slot()
        if self._frames.pending > self._write_high or self._turn_waiters:
            await self.wait_turn(len(payload))
        future: asyncio.Future[bytes] = self.loop.create_future()
        started = self.loop.time()
        call_id, deadline = core.open_unary(service, payload, timeout, started, future)
        if self._timer is None or deadline < self._timer_at:
            self._arm_timer(deadline)
        if self._turn_waiters:
            self._pass_turn()
        try:
            reply = await future
            latency = _LATENCY.get(service)
            if latency is None:
                latency = _LATENCY[service] = metrics.RPC_LATENCY.labels(service)
            latency.observe(self.loop.time() - started)
            return reply
        except asyncio.CancelledError:
            if core.cancel_call(call_id, True):
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
        call.send_done = True
        return call

    def call_client_stream(self, service: str, timeout: float | None = None) -> StreamCall:
        """Client-streaming call: ``await c.send(m)`` ..., then ``await c.result()``."""
        return self._open_stream(service, CLIENT_STREAM, timeout, None)

    def call_bidi(self, service: str, timeout: float | None = None) -> StreamCall:
        """Bidirectional call: ``send``/``end`` requests while iterating replies."""
        return self._open_stream(service, BIDI, timeout, None)

    def close(self, reason: str = "closed locally") -> None:
        """Fail in-flight calls, flush what is queued (GOAWAY included), close the channel."""
        if self.core.state is not _OPEN:
            return
        self.core.send_goaway(Status.UNAVAILABLE, reason)
        self._shutdown(reason, graceful=True)

    async def aclose(self, reason: str = "closed locally") -> None:
        self.close(reason)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    # -- what call objects use (rpccall.CallSession) -----------------------------------------
    def send_blocked(self) -> bool:
        """True while a sender must wait its turn (the send queue is full or others wait)."""
        return self._frames.pending > self._write_high or bool(self._turn_waiters)

    async def wait_turn(self, nbytes: int) -> None:
        """Wait, in FIFO order with other senders, until the send queue has room for ``nbytes``.

        Only as many waiters as fit are woken at once (no herd); each may then queue one message.
        """
        if self.core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {self.core.close_reason}")
        waiter: asyncio.Future[int] = self.loop.create_future()
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
        if self.core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {self.core.close_reason}")

    def pass_turn(self) -> None:
        """After queueing a message: wake waiting senders while there is room."""
        if self._turn_waiters:
            self._pass_turn()

    def stream_cancelled(self, stream: StreamCall) -> None:
        """An outgoing stream was cancelled locally: its slot is free."""
        self._release_slot()

    # -- outgoing ----------------------------------------------------------------------------
    def _open_stream(
        self,
        service: str,
        call_type: int,
        timeout: float | None,
        payload: bytes | None,
        window: int | None = None,
    ) -> StreamCall:
        core = self.core
        window = core.clamp_window(window)
        call = StreamCall(self, 0, service, True, 0.0, window)
        call.call_id, call.deadline = core.open_stream(
            call, service, call_type, timeout, window, payload, self.loop.time()
        )
        self._watch_deadline(call.deadline)
        return call

    def _wake_writer(self) -> None:
        """The core queued a frame into an empty outbox."""
        waiter = self._out_waiter
        if waiter is not None:
            self._out_waiter = None
            waiter.set_result(None)

    async def _wait_writable(self) -> None:
        if self.core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {self.core.close_reason}")
        if self._writable is None:
            self._writable = self.loop.create_future()
        await self._writable
        if self.core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {self.core.close_reason}")

    def _pass_turn(self) -> None:
        """Wake waiting senders in order while their messages fit under write_buffer_high,
        counting room already promised to woken senders that have not run yet."""
        waiters = self._turn_waiters
        if self.core.state is not _OPEN:
            while waiters:
                waiter, _ = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(0)
            return
        room = self._write_high - self._frames.pending - self._reserved
        while waiters and room >= 0:
            waiter, nbytes = waiters.popleft()
            if not waiter.done():
                cost = nbytes + 64
                self._reserved += cost
                waiter.set_result(cost)
                room -= cost

    def _run_parked(self) -> None:
        """Start calls that arrived while our send queue was full (and apply the frames of served
        calls that came after them), as far as the queue has room."""
        core = self.core
        while (parked := core.take_parked()) is not None:
            try:
                event = core.unpark(parked[0], parked[1], self.loop.time())
                if event is not None:
                    self._apply(event)
            except ProtocolViolation as exc:
                core.send_goaway("PROTOCOL_VIOLATION", str(exc))
                self._shutdown(f"protocol violation: {exc}", graceful=True)
                return

    def _wake_writable(self) -> None:
        if self.core.parked:
            self._run_parked()
        if self._turn_waiters:
            self._pass_turn()
        writable = self._writable
        if writable is not None:
            self._writable = None
            if not writable.done():
                writable.set_result(None)

    async def _wait_slot(self) -> None:
        core = self.core
        while core.outgoing_full() and core.state is _OPEN:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._slot_waiters.append(waiter)
            await waiter
        if core.state is not _OPEN:
            raise RpcConnectionLost(f"session closed: {core.close_reason}")

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _write_loop(self) -> None:
        channel = self.channel
        loop = self.loop
        core = self.core
        frames = self._frames
        try:
            while True:
                if not frames.pieces:
                    if core.state is not _OPEN:
                        break
                    waiter = self._out_waiter = loop.create_future()
                    await waiter
                    continue
                out, large = frames.take()
                self._sent.value += sum(map(len, out))
                if len(out) == 1:
                    channel.write(out[0])
                elif not large:
                    channel.write(b"".join(out))
                else:
                    run: list[Any] = []
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
        if core.state is not _OPEN:
            channel.close()
            self._finish_close()

    # -- deadlines ---------------------------------------------------------------------------
    def _watch_deadline(self, deadline: float) -> None:
        if self._timer is None or deadline < self._timer_at:
            self._arm_timer(deadline)

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        core = self.core
        now = self.loop.time() + 0.001  # call_at may fire up to the clock resolution early
        for code, call_id, handle in core.expire(now):
            if code == EXPIRED_UNARY:
                if not handle.done():
                    handle.set_exception(RpcTimeout(f"call {call_id} exceeded its deadline"))
                self._release_slot()
            elif code == EXPIRED_STREAM:
                handle.fail(
                    RpcTimeout(f"stream {handle.service!r} exceeded its deadline"), discard=True
                )
                self._release_slot()
            else:
                handle.stop(Status.DEADLINE_EXCEEDED)
        next_deadline = core.get_timer()
        if next_deadline is not None and core.state is not _CLOSED:
            self._arm_timer(next_deadline)

    # -- incoming ----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        channel = self.channel
        core = self.core
        feed = self._decoder.feed
        time = self.loop.time
        read_size = self.limits.read_size
        max_parked = self.limits.max_concurrent_calls
        max_parked_bytes = 4 * self.limits.write_buffer_high + self.limits.max_frame_size
        reason = "remote closed the connection"
        try:
            while True:
                data = await channel.read(read_size)
                if not data:
                    break
                self._received.value += len(data)
                self._read_progress += 1
                now = self.last_activity = time()
                frames = feed(data)
                if frames:
                    self._dispatch(frames, now)
                # Reading continues while our replies are blocked (replies and credit from the
                # peer must still get through, or two busy peers would wait on each other);
                # only a peer flooding us with more new calls than that makes us stop reading.
                while core.parked and (
                    len(core.parked) > max_parked or core.parked_bytes > max_parked_bytes
                ):
                    await self._wait_writable()
        except asyncio.CancelledError:
            return
        except ProtocolViolation as exc:
            log.warning("rpc session with %s: protocol violation: %s", self._peer_name(), exc)
            core.send_goaway("PROTOCOL_VIOLATION", str(exc))
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
        if self.core.state is not _OPEN:
            return
        if self._decoder.has_partial and self._read_progress == self._stall_mark:
            reason = f"peer sent part of a frame and nothing more for {self.limits.frame_timeout} s"
            log.warning("rpc session with %s: %s", self._peer_name(), reason)
            self._shutdown(reason, graceful=False)
            return
        self._stall_mark = self._read_progress
        self._stall_timer = self.loop.call_later(self.limits.frame_timeout, self._check_stall)

    def _peer_name(self) -> str:
        try:
            return str(self.channel.remote_peer)
        except Exception:
            return "?"

    def _dispatch(self, frames: list[tuple[list[Any], bytes]], now: float) -> None:
        """Feed decoded frames to the core and apply its events, one frame at a time (the
        commonest events inline, the others in :meth:`_apply`)."""
        receive = self.core.receive_frame
        for header, payload in frames:
            event = receive(header, payload, now)
            if event is None:
                continue
            code = event[0]
            if code == REPLY:
                future = event[1]
                if not future.done():
                    future.set_result(event[2])
                if self._slot_waiters:
                    self._release_slot()
            elif code == CALL_OPENED and event[3] == UNARY:
                self._runner.start_unary(event)
            else:
                self._apply(event)

    def _apply(self, event: Event) -> None:
        """Apply one event of the core other than REPLY (which :meth:`_dispatch` applies)."""
        code = event[0]
        if code == CALL_OPENED:
            if event[3] == UNARY:
                self._runner.start_unary(event)
            else:
                self._runner.start_stream(event)
        elif code == STREAM_MESSAGE:
            event[1].deliver(event[2], event[3])
        elif code == STREAM_CREDIT:
            event[1].grant(event[2])
        elif code == UNARY_FAILED:
            future = event[1]
            if not future.done():
                future.set_exception(event[2])
            if self._slot_waiters:
                self._release_slot()
        elif code == STREAM_ENDED:
            event[1].deliver(event[2], event[3])
            self._release_slot()
        elif code == STREAM_FAILED:
            event[1].fail(event[2])
            self._release_slot()
        elif code == CALL_CANCELLED:
            event[1].stop(Status.CANCELLED)
        elif code == GOAWAY_RECEIVED:
            self._shutdown(event[1], graceful=True)
            raise RpcConnectionLost(event[1])

    # -- closing -----------------------------------------------------------------------------
    def _shutdown(self, reason: str, graceful: bool) -> None:
        core = self.core
        if core.state is not _OPEN:
            if not graceful and core.state is not _CLOSED:
                self._finish_close()
            return
        unary, streams, served = core.start_closing(reason)
        error = RpcConnectionLost(f"session closed: {reason}")
        for future in unary:
            if not future.done():
                future.set_exception(error)
        for stream in streams:
            stream.fail(error)
        for call in served:
            call.stop("session closed")
        self._wake_writable()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._slot_waiters.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stall_timer.cancel()
        if self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        if graceful and self._frames.pieces and not self._writer_task.done():
            self._wake_writer()
            # The writer flushes what is queued, then closes the channel and finishes.
            self._close_timer = self.loop.call_later(self.limits.close_timeout, self._finish_close)
        else:
            self._finish_close()

    def _finish_close(self) -> None:
        core = self.core
        if core.state is _CLOSED:
            return
        core.mark_closed()
        if self._close_timer is not None:
            # a pending timer would keep this session, its channel and the connection's
            # transport state alive for close_timeout after the close
            self._close_timer.cancel()
            self._close_timer = None
        self._wake_writable()
        if self._writer_task is not asyncio.current_task():
            self._writer_task.cancel()
        try:
            if not self.channel.is_closed:
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


def _local_name(channel: Any) -> str:
    try:
        return str(channel.local_peer)
    except Exception:
        return "?"
