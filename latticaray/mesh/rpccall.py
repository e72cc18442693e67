"""The call objects of ``/latticaray/rpc/1`` that application code holds.

:class:`CallContext` is a handler's view of the call it serves (who called, the deadline, whether
it was cancelled); :class:`StreamCall` is one streaming call at either end: a bounded inbound
queue with credit-based flow control (:class:`~latticaray.mesh.rpcflow.StreamWindow`) and
credit-limited sending. Both belong to an :class:`~latticaray.mesh.rpc.RpcSession`; what they
need of it is the :class:`CallSession` protocol.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from .errors import FrameTooLarge, ProtocolViolation, RpcCancelled, RpcError, Status
from .framing import CREDIT, FLAG_END, FLAG_MSG, FLAG_RESPONSE, MESSAGE
from .rpccore import RpcConnection
from .rpcflow import StreamWindow

if TYPE_CHECKING:
    from .identity import PeerId
    from .multiaddr import Multiaddr

__all__ = ["CallContext", "CallSession", "StreamCall"]


class CallSession(Protocol):
    """What call objects use of their session (implemented by RpcSession)."""

    channel: Any
    loop: asyncio.AbstractEventLoop
    core: RpcConnection

    def send_blocked(self) -> bool:
        """True while a sender must wait its turn (the send queue is full or others wait)."""
        ...

    async def wait_turn(self, nbytes: int) -> None:
        """Wait in FIFO order until the send queue has room for ``nbytes``."""
        ...

    def pass_turn(self) -> None:
        """After queueing: let waiting senders go while there is room."""
        ...

    def stream_cancelled(self, stream: StreamCall) -> None:
        """A stream left the call table by a local cancel (frees its slot)."""
        ...


class CallContext:
    """What a handler knows about its call."""

    __slots__ = ("_cancelled", "call_id", "deadline", "service", "session")

    def __init__(self, session: CallSession, call_id: int, service: str, deadline: float) -> None:
        self.session = session
        self.call_id = call_id
        self.service = service
        #: Event-loop time (``loop.time()``) after which the call is cancelled.
        self.deadline = deadline
        self._cancelled = False

    @property
    def peer_id(self) -> PeerId:
        """The authenticated identity of the caller (``channel.remote_peer``)."""
        peer: PeerId = self.session.channel.remote_peer
        return peer

    @property
    def remote_addr(self) -> Multiaddr | None:
        addr: Multiaddr | None = self.session.channel.remote_addr
        return addr

    @property
    def transport(self) -> str:
        return str(self.session.channel.transport)

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled, the deadline passed, or the session closed."""
        return self._cancelled

    def mark_cancelled(self) -> None:
        """Session side: the call is over for the handler (cancel, deadline, close)."""
        self._cancelled = True

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - self.session.loop.time())

    def abort(self, code: str, message: str) -> None:
        """End the call with an error status the caller receives as :class:`RpcError`."""
        raise RpcError(code, message)


class StreamCall:
    """One streaming call, either end: a bounded inbound queue plus credit-limited sending.

    Caller side (returned by :meth:`RpcSession.call_stream`, :meth:`~RpcSession.call_client_stream`,
    :meth:`~RpcSession.call_bidi`): ``await send(msg)``, ``end()`` (no more requests),
    ``async for reply in call``, ``await result()`` (client stream: the single reply),
    ``cancel()``; usable as ``async with`` (leaving cancels it if unfinished).
    Handler side: it is the ``requests`` argument (``async for msg in requests``).
    The session delivers frames with :meth:`deliver`, :meth:`grant`, :meth:`fail`, :meth:`stop`.
    """

    __slots__ = (
        "_credit_waiter",
        "_error",
        "_flow",
        "_queue",
        "_recv_waiter",
        "_session",
        "call_id",
        "ctx",
        "deadline",
        "finished",
        "outgoing",
        "reason",
        "recv_done",
        "send_done",
        "service",
        "task",
    )

    def __init__(
        self,
        session: CallSession,
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
        self.task: asyncio.Task[None] | None = None
        #: Why the handler was stopped (handler side), None while it was not.
        self.reason: str | None = None
        self._queue: deque[bytes] = deque()
        limits = session.core.limits
        self._flow = StreamWindow(window or limits.stream_window, limits.max_frame_size)
        self._recv_waiter: asyncio.Future[None] | None = None
        #: No more messages will arrive (the peer's END, or a server stream's handler side).
        self.recv_done = False
        self._error: BaseException | None = None
        self._credit_waiter: asyncio.Future[None] | None = None
        #: This side ended its messages (``end()``), or sends none (a server stream's caller).
        self.send_done = False
        self.finished = False

    # -- public ------------------------------------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Received bytes not yet read by the application (bounded by the stream window)."""
        return self._flow.unread

    @property
    def done(self) -> bool:
        return self.finished

    async def send(self, message: bytes | bytearray | memoryview) -> None:
        """Send one message; waits while the receiver's window is exhausted."""
        if self._error is not None:
            raise self._error
        if self.send_done:
            raise RpcError(Status.INVALID_ARGUMENT, "send after end() on this call")
        session = self._session
        core = session.core
        n = len(message)
        if n > core.limits.max_frame_size:
            raise FrameTooLarge(
                f"message of {n} bytes exceeds max_frame_size "
                f"{core.limits.max_frame_size}; split it into several messages"
            )
        while not self._flow.can_send():
            waiter = self._credit_waiter = session.loop.create_future()
            await waiter
            if self._error is not None:
                raise self._error
        if session.send_blocked():
            await session.wait_turn(n)
            if self._error is not None:
                raise self._error
        self._flow.sent(n)
        flags = FLAG_MSG if self.outgoing else FLAG_MSG | FLAG_RESPONSE
        core.send([MESSAGE, self.call_id, flags], message)
        session.pass_turn()

    def end(self) -> None:
        """No more messages from this side (half-close)."""
        if self.send_done or self.finished:
            return
        self.send_done = True
        flags = FLAG_END if self.outgoing else FLAG_END | FLAG_RESPONSE
        self._session.core.send([MESSAGE, self.call_id, flags])

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> bytes:
        queue = self._queue
        while not queue:
            if self._error is not None:
                raise self._error
            if self.recv_done:
                raise StopAsyncIteration
            waiter = self._recv_waiter = self._session.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = queue.popleft()
        grant = self._flow.consumed(len(message))
        if grant and not self.recv_done and not self.finished:
            flags = 0 if self.outgoing else FLAG_RESPONSE
            self._session.core.send([CREDIT, self.call_id, flags, grant])
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
        if self.finished:
            return
        session = self._session
        if session.core.cancel_call(self.call_id, self.outgoing) and self.outgoing:
            session.stream_cancelled(self)
        self.fail(RpcCancelled("cancelled by this side"), discard=True)

    async def __aenter__(self) -> StreamCall:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self.finished:
            self.cancel()

    # -- session side ------------------------------------------------------------------------
    def deliver(self, flags: int, payload: bytes) -> None:
        """A MESSAGE frame for this call (a message, the peer's END, or both)."""
        if flags & FLAG_MSG:
            if self.recv_done:
                raise ProtocolViolation(f"message after end of stream on call {self.call_id}")
            try:
                self._flow.received(len(payload))
            except ProtocolViolation as exc:
                raise ProtocolViolation(f"call {self.call_id}: {exc}") from None
            self._queue.append(payload)
        if flags & FLAG_END:
            self.recv_done = True
            if self.outgoing:
                self.finished = True
                self._wake_credit()
        self._wake_recv()

    def grant(self, n: int) -> None:
        """The peer's CREDIT for our sending."""
        self._flow.granted(n)
        self._wake_credit()

    def fail(self, error: BaseException, discard: bool = False) -> None:
        """End the call with ``error``; ``discard`` drops unread messages (local cancel or
        deadline: nothing more is delivered), else they are read before the error."""
        if discard:
            self._queue.clear()
            self._flow.discard_unread()
        if self.finished and self._error is not None:
            return
        self.finished = True
        if self._error is None:
            self._error = error
        if self.ctx is not None:
            self.ctx.mark_cancelled()
        self._wake_recv()
        self._wake_credit()

    def stop(self, reason: str) -> None:
        """Handler side: cancel the running handler (caller cancelled, deadline, closing)."""
        if self.reason is None:
            self.reason = reason
        self.fail(RpcCancelled(reason))
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
