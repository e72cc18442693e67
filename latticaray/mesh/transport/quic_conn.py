"""One authenticated QUIC connection: the asyncio shell around a sans-I/O QUIC connection.

:class:`QuicConn` feeds its :class:`~latticaray.mesh.transport.quic_backend.QuicEngine` (qh3 or
aioquic) the datagrams the endpoint routed to it, all those of one socket read batch together,
turns the library's events into channel data, accepted channels, connection-ID routing changes
and the libp2p peer check, and sends what the library has to send once per batch or loop
iteration. It owns the connection's timers (the library's loss/idle timer, and keepalive and
liveness on the endpoint's tick) and its graceful close (written data is delivered before
CONNECTION_CLOSE). The library is fed ``time.monotonic()`` (uvloop's cached clock upsets its
timers).

What it needs from the endpoint that owns it comes as one :class:`EndpointLink`.
:class:`PeerStreams` remembers which peer-initiated streams have finished in bounded memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConnectionClosed, HandshakeError, PeerIdMismatch, PeerUnreachable
from ..identity import PeerId
from ..tls import ALPN_LIBP2P, verify_certificate
from .quic_backend import QuicEngine
from .quic_channel import QuicChannel
from .quic_config import (
    APP_ERROR_AUTH_FAILED,
    APP_ERROR_CLOSED,
    STREAM_ERROR_ABORTED,
    STREAM_ERROR_REFUSED,
    QuicConfig,
    udp_multiaddr,
)

__all__ = ["EndpointLink", "PeerStreams", "QuicConn", "now"]

log = logging.getLogger(__name__)


def now() -> float:
    """The clock aioquic is fed (monotonic, not the event loop's cached one)."""
    return time.monotonic()


@dataclass(frozen=True, slots=True)
class EndpointLink:
    """What a connection needs from the endpoint (transport) that routes its datagrams."""

    loop: asyncio.AbstractEventLoop
    #: The context timer and transmit callbacks run in: one for all connections instead of a
    #: copy of the caller's per scheduled callback (a tracked object each).
    context: contextvars.Context
    local_peer: PeerId
    config: QuicConfig
    send_datagrams: Callable[[list[tuple[bytes, tuple]]], None]
    register_cid: Callable[[bytes, QuicConn], None]
    #: Datagrams for this connection are waiting: call its ``flush_received`` at the end of
    #: the socket's read batch.
    received: Callable[[QuicConn], None]
    unregister_cid: Callable[[bytes, QuicConn], None]
    #: The connection ended: forget it and its connection IDs.
    forget: Callable[[QuicConn], None]
    #: The connection is authenticated.
    established: Callable[[QuicConn], None]
    #: Keep a task of the connection alive until it ends (graceful closes).
    background: Callable[[asyncio.Task], None]


class PeerStreams:
    """Which peer-initiated streams this end has seen finish, in memory bounded by the peer's
    stream limit.

    Every stream up to the highest ID seen of its kind (bidirectional, unidirectional) that has
    no channel is finished, except the IDs the peer skipped over (opened implicitly, their data
    not here yet). A set of finished IDs grew with every stream of a long-lived connection. The
    gap set stays None until first needed: sets are objects the garbage collector tracks."""

    __slots__ = ("gaps", "max_bidi", "max_uni")

    def __init__(self) -> None:
        self.max_bidi = -1
        self.max_uni = -1
        self.gaps: set[int] | None = None

    def finished(self, stream_id: int) -> bool:
        """Whether a peer-initiated stream without a channel was seen and has finished."""
        highest = self.max_uni if stream_id & 2 else self.max_bidi
        return stream_id <= highest and not (self.gaps and stream_id in self.gaps)

    def note(self, stream_id: int) -> None:
        """The peer's stream ``stream_id`` has arrived."""
        highest = self.max_uni if stream_id & 2 else self.max_bidi
        if highest < 0:
            highest = (stream_id & 3) - 4
        if stream_id > highest:
            if stream_id > highest + 4:  # bounded: aioquic refuses IDs past our stream limit
                if self.gaps is None:
                    self.gaps = set()
                self.gaps.update(range(highest + 4, stream_id, 4))
            if stream_id & 2:
                self.max_uni = stream_id
            else:
                self.max_bidi = stream_id
        elif self.gaps:
            self.gaps.discard(stream_id)


class QuicConn:
    """One authenticated QUIC connection to a peer; a factory of :class:`QuicChannel`."""

    transport = "quic"

    def __init__(
        self,
        link: EndpointLink,
        quic: QuicEngine,
        addr: tuple,
        is_client: bool,
        expected_peer: PeerId | None,
    ) -> None:
        self._link = link
        self._quic = quic
        self.config = link.config
        self.addr = addr
        self.is_client = is_client
        self.expected_peer = expected_peer
        self.local_peer: PeerId = link.local_peer
        self.remote_peer: PeerId | None = None
        self.remote_addr = udp_multiaddr(addr)
        self.created_at = now()
        self._loop = link.loop
        self._channels: dict[int, QuicChannel] = {}
        self._peer_streams = PeerStreams()
        self._accept_queue: collections.deque[QuicChannel] = collections.deque()
        self._accept_waiter: asyncio.Future | None = None
        self._ready: asyncio.Future = self._loop.create_future()
        self._closed_future: asyncio.Future = self._loop.create_future()
        #: Connection IDs the endpoint routes to this connection.
        self.cids: set[bytes] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._transmit_scheduled = False
        self._last_rx = now()
        self._unanswered_since: float | None = None
        self._close_callbacks: list[Callable[[QuicConn], None]] = []
        # made on first use: sets are objects the garbage collector tracks
        self._draining: set[QuicChannel] | None = None
        self._closing = False
        self._flush_waiter: asyncio.Future | None = None
        self.close_reason: str | None = None
        #: Datagrams routed here in the current read batch (taken in by ``flush_received``),
        #: as runs from one address.
        self._rx: list[tuple[list[bytes], tuple]] = []
        self._ready.add_done_callback(_consume_exception)

    # -- state ---------------------------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        return (
            self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None
        )

    @property
    def is_handshaking(self) -> bool:
        return not self._ready.done()

    @property
    def is_closed(self) -> bool:
        return self._closed_future.done()

    @property
    def last_received(self) -> float:
        """When the last datagram from the peer arrived (``time.monotonic()``): any packet counts,
        ACKs and PINGs included, so a peer busy sending or receiving bulk data is heard from
        even while its streams are blocked."""
        return self._last_rx

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds (None before the first RTT sample)."""
        return self._quic.smoothed_rtt

    @property
    def max_datagram_size(self) -> int:
        return self._quic.max_datagram_size

    @property
    def backend(self) -> str:
        """The QUIC library driving this connection ("qh3", "aioquic")."""
        return self._quic.backend

    def loss_stats(self) -> tuple[int, int] | None:
        """(packets lost, about how many were sent) where the library reports them."""
        return self._quic.loss_stats()

    def conceals_loss(self) -> bool:
        """Whether this connection sends copies of its datagrams (its path loses packets)."""
        return self._quic.conceals_loss()

    def on_close(self, callback: Callable[[QuicConn], None]) -> None:
        if self.is_closed:
            self._loop.call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_future)

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            self._terminate(f"handshake did not complete within {timeout:.1f} s", send=True)
            raise PeerUnreachable(
                f"QUIC handshake with {self.addr[0]}:{self.addr[1]} timed out after {timeout:.1f} s"
            ) from None

    # -- channels -------------------------------------------------------------------------------
    def open_channel(self) -> QuicChannel:
        if self.remote_peer is None or self.is_closed or self._closing:
            raise ConnectionClosed("QUIC connection is not open")
        stream_id = self._quic.get_next_available_stream_id()
        try:
            self._quic.send_stream_data(stream_id, b"")  # creates it: the next ID differs
        except Exception as exc:  # qh3: past the peer's stream limit
            raise ConnectionClosed(f"cannot open a QUIC stream: {exc}") from None
        channel = QuicChannel(self, self._quic, stream_id, self.remote_peer)
        self._channels[stream_id] = channel
        return channel

    async def accept_channel(self) -> QuicChannel:
        while not self._accept_queue:
            if self.is_closed:
                raise ConnectionClosed(f"QUIC connection closed: {self.close_reason}")
            self._accept_waiter = self._loop.create_future()
            try:
                await self._accept_waiter
            finally:
                self._accept_waiter = None
        return self._accept_queue.popleft()

    # -- called by this connection's channels ----------------------------------------------------
    def forget_channel(self, stream_id: int) -> None:
        """The channel is done: drop it and its consumption record."""
        if self._channels.pop(stream_id, None) is not None:
            self._quic.untrack_stream(stream_id)

    def watch_drain(self, channel: QuicChannel) -> None:
        """Tell ``channel`` (``check_drain``) whenever acknowledgements arrive."""
        if self._draining is None:
            self._draining = set()
        self._draining.add(channel)

    def unwatch_drain(self, channel: QuicChannel) -> None:
        if self._draining is not None:
            self._draining.discard(channel)

    def note_sent(self) -> None:
        """Something was sent that the peer must answer (liveness starts counting)."""
        if self._unanswered_since is None:
            self._unanswered_since = now()

    def schedule_transmit(self) -> None:
        """Send what aioquic has to send, once, at the end of this loop iteration."""
        if not self._transmit_scheduled and not self.is_closed:
            self._transmit_scheduled = True
            self._loop.call_soon(self._transmit_soon, context=self._link.context)

    # -- closing --------------------------------------------------------------------------------
    def close(self, reason: str = "closed", flush_timeout: float = 2.0) -> None:
        """Close gracefully: data already written is delivered (acknowledged) first, for at
        most ``flush_timeout`` seconds, then CONNECTION_CLOSE is sent."""
        if self.is_closed or self._closing:
            return
        if flush_timeout > 0 and self.is_established and self._quic.unacked_total() > 0:
            self._closing = True
            self._flush_waiter = self._loop.create_future()
            task = self._loop.create_task(self._close_after_flush(reason, flush_timeout))
            self._link.background(task)
            return
        self.abort(reason)

    def abort(self, reason: str = "aborted") -> None:
        """Send CONNECTION_CLOSE now, dropping unsent data."""
        if self.is_closed:
            return
        self._quic.close(error_code=APP_ERROR_CLOSED, reason_phrase=reason[:100])
        self._transmit()
        self._terminate(reason, send=False)

    async def _close_after_flush(self, reason: str, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while not self.is_closed and self._quic.unacked_total() > 0:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            self._flush_waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._flush_waiter, remaining)
            except TimeoutError:
                break
        self.abort(reason)

    def _terminate(self, reason: str, *, send: bool, error: BaseException | None = None) -> None:
        if self.is_closed:
            return
        if send:
            try:
                self._quic.close(error_code=APP_ERROR_CLOSED, reason_phrase=reason[:100])
                self._transmit()
            except Exception:
                pass
        self.close_reason = reason
        failure = error or ConnectionClosed(
            f"QUIC connection to {self._peer_name()} closed: {reason}"
        )
        if not self._ready.done():
            self._ready.set_exception(failure)
        for channel in list(self._channels.values()):
            channel.fail(
                ConnectionClosed(f"QUIC connection to {self._peer_name()} closed: {reason}")
            )
        self._channels.clear()
        if self._accept_waiter is not None and not self._accept_waiter.done():
            self._accept_waiter.set_result(None)
        if self._flush_waiter is not None and not self._flush_waiter.done():
            self._flush_waiter.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed_future.set_result(None)
        self._link.forget(self)
        for callback in self._close_callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("QUIC close callback failed")
        self._close_callbacks.clear()

    def _peer_name(self) -> str:
        return str(self.remote_peer or self.expected_peer or f"{self.addr[0]}:{self.addr[1]}")

    # -- datagrams, events, timers ----------------------------------------------------------------
    def connect(self) -> None:
        """Start the client handshake (the first Initial leaves now)."""
        self._quic.connect(self.addr, now=now())
        self._transmit()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """A datagram the endpoint routed to this connection (by its connection ID); it enters
        the QUIC library with the others of this read batch, in ``flush_received``."""
        rx = self._rx
        if not rx:
            self._link.received(self)
        elif rx[-1][1] == addr:
            rx[-1][0].append(data)
            return
        rx.append(([data], addr))

    def datagrams_received(self, datagrams: list[bytes], addr: tuple) -> None:
        """Several datagrams from ``addr`` routed here at once (see ``datagram_received``)."""
        rx = self._rx
        if not rx:
            self._link.received(self)
        rx.append((datagrams, addr))

    def flush_received(self) -> None:
        """The socket's read batch is over: hand the library this batch's datagrams (a run from
        one address in one call), act on the events, and answer them with one transmit."""
        received, self._rx = self._rx, []
        if not received or self.is_closed:
            return
        at = now()
        self._last_rx = at
        self._unanswered_since = None
        quic = self._quic
        for datagrams, addr in received:
            if len(datagrams) == 1:
                quic.receive_datagram(datagrams[0], addr, at)
            else:
                quic.receive_datagrams(datagrams, addr, at)
            if addr != self.addr and quic.active_path_addr() == addr:
                self.addr = addr  # migrated: the new path's MTU is unknown
                self.remote_addr = udp_multiaddr(addr)
                quic.reset_datagram_size()
        self._process_events()
        if not self.is_closed:
            self._transmit()
        waiter = self._flush_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _process_events(self) -> None:
        quic = self._quic
        kinds = quic.events
        while True:
            event = quic.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is kinds.stream_data:
                self._on_stream_data(event)
            elif kind is kinds.handshake_completed:
                self._on_handshake(event)
            elif kind is kinds.connection_id_issued:
                self.cids.add(event.connection_id)
                self._link.register_cid(event.connection_id, self)
            elif kind is kinds.connection_id_retired:
                self.cids.discard(event.connection_id)
                self._link.unregister_cid(event.connection_id, self)
            elif kind is kinds.stream_reset:
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    channel.fail(
                        ConnectionClosed(f"stream reset by peer (code {event.error_code})")
                    )
                    channel.discard()
            elif kind is kinds.stop_sending:
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    try:
                        quic.reset_stream(event.stream_id, STREAM_ERROR_ABORTED)
                    except Exception:
                        pass
                    channel.fail(ConnectionClosed("peer stopped reading this stream"))
                    channel.discard()
            elif kind is kinds.terminated:
                reason = event.reason_phrase or f"error 0x{event.error_code:x}"
                error = None
                if not self._ready.done() and event.error_code == APP_ERROR_AUTH_FAILED:
                    error = HandshakeError(f"peer refused our authentication: {reason}")
                self._terminate(
                    f"terminated by peer or transport: {reason}", send=False, error=error
                )
                return

    def _on_handshake(self, event: Any) -> None:
        try:
            if event.alpn_protocol != ALPN_LIBP2P:
                raise HandshakeError(f"peer negotiated ALPN {event.alpn_protocol!r}, not 'libp2p'")
            cert = self._quic.peer_certificate_der()
            if cert is None:
                raise HandshakeError("peer presented no certificate")
            peer = verify_certificate(cert)
            if self.expected_peer is not None and peer != self.expected_peer:
                raise PeerIdMismatch(self.expected_peer, peer)
        except HandshakeError as exc:
            log.info("QUIC handshake with %s:%s refused: %s", self.addr[0], self.addr[1], exc)
            self._quic.close(error_code=APP_ERROR_AUTH_FAILED, reason_phrase=str(exc)[:100])
            self._transmit()
            self._terminate(str(exc), send=False, error=exc)
            return
        self._quic.drop_peer_certificate()
        self.remote_peer = peer
        self._ready.set_result(self)
        self._link.established(self)

    def _on_stream_data(self, event: Any) -> None:
        channel = self._channels.get(event.stream_id)
        if channel is None:
            remote_peer = self.remote_peer
            if (
                remote_peer is None
                or not _peer_initiated(event.stream_id, self.is_client)
                or self._peer_streams.finished(event.stream_id)
            ):
                self._quic.discard_stream_data(event.stream_id, len(event.data))
                return
            self._peer_streams.note(event.stream_id)  # a refused one counts as finished
            if len(self._accept_queue) >= self.config.accept_backlog:
                try:
                    self._quic.reset_stream(event.stream_id, STREAM_ERROR_REFUSED)
                    self._quic.stop_stream(event.stream_id, STREAM_ERROR_REFUSED)
                except Exception:  # qh3 raises once its connection is closed
                    pass
                return
            channel = QuicChannel(self, self._quic, event.stream_id, remote_peer)
            self._channels[event.stream_id] = channel
            self._accept_queue.append(channel)
            if self._accept_waiter is not None and not self._accept_waiter.done():
                self._accept_waiter.set_result(None)
        channel.feed(event.data, event.end_stream)
        if event.end_stream and channel.write_closed:
            channel.finish()

    def _transmit_soon(self) -> None:
        self._transmit_scheduled = False
        if not self.is_closed:
            self._process_events()  # what a reader catching up let the library hand on
        if not self.is_closed:
            self._transmit()

    def _transmit(self) -> None:
        quic = self._quic
        datagrams = quic.datagrams_to_send(now=now())
        if datagrams:
            self._link.send_datagrams(datagrams)
        if self._draining:  # acknowledgements (aioquic) or sends (qh3) shrank send buffers
            for channel in list(self._draining):
                channel.check_drain()
        timer_at = quic.get_timer()
        if timer_at is None:
            return
        # The deadline moves with nearly every packet. An armed timer that fires too early is
        # harmless (handle_timer acts only on what is due, then we re-arm), so it is replaced
        # only when the new deadline is earlier: no cancel + call_later per packet.
        if self._timer is not None:
            if timer_at >= self._timer_at:
                return
            self._timer.cancel()
        self._timer_at = timer_at
        self._timer = self._loop.call_later(
            max(0.0, timer_at - now()), self._on_timer, context=self._link.context
        )

    def _on_timer(self) -> None:
        self._timer = None
        if self.is_closed:
            return
        self._quic.handle_timer(now=now())
        self._process_events()
        if not self.is_closed:
            self._transmit()

    def tick(self, at: float) -> None:
        """Keepalive and liveness, called about once a second by the endpoint."""
        if self.is_closed:
            return
        if not self._ready.done():
            if at - self.created_at > self.config.handshake_timeout:
                self._terminate("handshake timed out", send=True)
            return
        if (
            self._unanswered_since is not None
            and at - self._unanswered_since > self.config.unresponsive_timeout
        ):
            self._terminate(f"peer unresponsive for {at - self._unanswered_since:.1f} s", send=True)
            return
        if at - self._last_rx > self.config.keepalive_interval:
            try:
                self._quic.send_ping(0)
            except Exception:  # qh3 raises once its connection is closed: the events say why
                self._process_events()
                return
            self.note_sent()
            self._transmit()

    def __repr__(self) -> str:
        return f"<QuicConn {self._peer_name()} {'out' if self.is_client else 'in'}>"


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _peer_initiated(stream_id: int, is_client: bool) -> bool:
    client_initiated = stream_id % 2 == 0
    return client_initiated != is_client
