"""QUIC transport over aioquic's sans-I/O ``QuicConnection``, one UDP socket per node.

Every inbound and outbound connection of a node shares the one listening UDP socket and is
demultiplexed by destination connection ID, so the address peers observe, the address AutoNAT
confirms and the port a hole punch opens are all the same mapping. ``send_raw`` sends arbitrary
datagrams from that socket (hole punching) and datagrams that are not QUIC packets for a known
connection go to ``unknown_datagram_handler``.

Both ends authenticate with libp2p certificates (:mod:`latticaray.mesh.tls`), ALPN ``libp2p``.
aioquic 1.7.2 only asks a client for its certificate behind a private flag
(``tls.Context._request_client_certificate``); we set it on every server connection and a test
checks the client certificate really arrives, so an aioquic change cannot silently drop client
authentication. aioquic is fed ``time.monotonic()`` (uvloop's cached clock upsets its timers).

Each connection carries :class:`QuicChannel` objects (one bidirectional QUIC stream each) that
implement the :class:`~latticaray.mesh.channel.Channel` contract with backpressure both ways:

* write: ``drain()`` waits while the stream's unacknowledged send buffer is over a high-water
  mark, which it stays at when the peer's flow-control window is exhausted;
* read: the receive window we grant the peer (MAX_STREAM_DATA / MAX_DATA) advances only with what
  the application has *read*, not with what arrived (aioquic's own policy doubles windows on
  arrival, which lets a stalled reader's memory grow without bound).

aioquic is bound by per-packet Python work (about 30 us of CPU per 1350-byte packet on each side,
so roughly 35 MB/s per core off loopback), so the driver keeps its own share small: the socket is
drained up to ``receive_batch`` datagrams per wake-up and those are answered by one transmit
(asyncio's datagram transport reads one per loop iteration), a reader gets the STREAM data that
arrived together as one piece, runs of equal-size datagrams leave in one UDP GSO send (Linux
``UDP_SEGMENT``; plain sends where the kernel refuses it), the aioquic timer is re-armed only when
its deadline moves earlier, loopback paths are not paced, and connections share one frame
dispatch table (fewer objects for the garbage collector to scan: with thousands of connections
in a process, full collections had paused the loop for up to ~1 s). For the same reason a
connection past its handshake gives up aioquic's spent Initial/Handshake state and TLS's
handshake-only state (see ``_SpentHandshakeState``), and connections alike share one
``QuicConfiguration``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aioquic import tls as aioquic_tls
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.crypto import CryptoPair, NoCallback
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.retry import QuicRetryTokenHandler

from ..errors import ConnectionClosed, HandshakeError, PeerIdMismatch, PeerUnreachable
from ..identity import KeyPair, PeerId
from ..multiaddr import Multiaddr
from ..tls import ALPN_LIBP2P, CertifiedKey, make_certified_key, verify_certificate

__all__ = ["QuicChannel", "QuicConfig", "QuicConn", "QuicTransport"]

log = logging.getLogger(__name__)

CONNECTION_ID_LENGTH = 8
#: aioquic writes STREAM/CRYPTO frame lengths that break above this datagram size.
MAX_SAFE_DATAGRAM_SIZE = 16384
MIN_DATAGRAM_SIZE = 1200
APP_ERROR_AUTH_FAILED = 0x100
APP_ERROR_CLOSED = 0x0
STREAM_ERROR_ABORTED = 0x1
STREAM_ERROR_REFUSED = 0x2


@dataclass
class QuicConfig:
    """Tunables of the QUIC transport (sizes in bytes, times in seconds)."""

    #: Datagram size for paths to non-loopback addresses (the internet's safe size is ~1200-1452).
    max_datagram_size: int = 1350
    #: Datagram size for loopback paths (aioquic breaks above 16384).
    loopback_max_datagram_size: int = 16384
    #: Receive window per stream; the most a stalled reader can have buffered per channel.
    stream_receive_window: int = 4 * 1024 * 1024
    #: Receive window per connection.
    connection_receive_window: int = 16 * 1024 * 1024
    #: ``drain()`` waits while a channel has more than this written but unacknowledged.
    write_high_water: int = 4 * 1024 * 1024
    #: Bidirectional streams (channels) a peer may open at once on one connection.
    max_streams: int = 64
    #: Peer-opened channels waiting in ``accept_channel`` before further ones are refused.
    accept_backlog: int = 64
    handshake_timeout: float = 10.0
    #: aioquic idle timeout: a connection with no traffic at all this long is closed.
    idle_timeout: float = 60.0
    #: Send a PING when nothing was received for this long (keeps NAT mappings, < 30 s).
    keepalive_interval: float = 10.0
    #: Close the connection when something we sent got no answer at all for this long.
    unresponsive_timeout: float = 8.0
    #: SO_RCVBUF / SO_SNDBUF of the UDP socket.
    socket_buffer_bytes: int = 8 * 1024 * 1024
    #: Datagrams read from the socket per event-loop wake-up (then answered by one transmit).
    receive_batch: int = 64
    #: Datagrams held while the socket's send buffer is full; more are dropped (as lost).
    send_queue_datagrams: int = 4096
    #: Send runs of equal-size datagrams with one UDP GSO call (Linux; falls back by itself).
    udp_gso: bool = True
    #: Inbound connections still handshaking at once; further Initial packets are dropped.
    max_pending_handshakes: int = 256
    #: With this many inbound handshakes pending, new clients must first prove their address
    #: with a stateless Retry round trip (RFC 9000 8.1.2) — cheap defence against spoofed floods.
    #: 0 = always, a value >= max_pending_handshakes = never.
    retry_when_pending_handshakes: int = 32
    #: All connections on this transport.
    max_connections: int = 4096
    congestion_control: str = "reno"
    #: RTT assumed before the first sample: the first handshake retransmission fires after
    #: twice this. RFC 9002 recommends 333 ms; aioquic's 100 ms makes a busy process (many
    #: handshakes at once) retransmit handshakes that were never lost, and each spurious
    #: retransmission adds work to the very backlog that delayed the answer.
    initial_rtt: float = 0.333
    #: Pace sends on loopback paths too. aioquic paces from timers; on loopback there is no
    #: bottleneck queue to protect and each paced burst costs a timer wake-up, which capped
    #: large transfers.
    pace_loopback: bool = False
    #: Connection IDs we ask the peer to issue us (RFC 9000 active_connection_id_limit, >= 2).
    #: aioquic asks for 8; each costs objects, a routing entry and a NEW_CONNECTION_ID frame,
    #: and 2 still leave a spare for a migration.
    connection_ids: int = 2

    def datagram_size_for(self, host: str) -> int:
        size = self.loopback_max_datagram_size if _is_loopback(host) else self.max_datagram_size
        return max(MIN_DATAGRAM_SIZE, min(size, MAX_SAFE_DATAGRAM_SIZE))

    def paces(self, host: str) -> bool:
        return self.pace_loopback or not _is_loopback(host)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Unpaced(QuicPacketPacer):
    """A pacer that never holds a packet back (congestion control still applies)."""

    def next_send_time(self, now: float) -> None:
        return None

    def update_after_send(self, now: float) -> None:
        pass


def _now() -> float:
    return time.monotonic()


class _SharedFrameHandlers:
    """aioquic's frame dispatch table without a per-connection copy.

    aioquic builds a dict of ~60 bound methods, tuples and frozensets for every connection:
    about a third of the objects a connection keeps alive. With thousands of connections in
    one process those objects made each full garbage collection pause the loop for up to ~1 s.
    This stands in for that dict: one object per connection, reading one table per class."""

    __slots__ = ("_conn", "_table")

    def __init__(self, conn: QuicConnection, table: dict) -> None:
        self._conn = conn
        self._table = table

    def __getitem__(self, frame_type: int):
        function, epochs = self._table[frame_type]
        return function.__get__(self._conn), epochs


_FRAME_TABLE_ATTR = "_QuicConnection__frame_handlers"
_shared_frame_table: dict | None = None


def _share_frame_handlers(conn: QuicConnection) -> None:
    global _shared_frame_table
    own = getattr(conn, _FRAME_TABLE_ATTR, None)
    if not isinstance(own, dict):
        return  # aioquic changed its internals: keep its own table
    if _shared_frame_table is None:
        _shared_frame_table = {
            frame_type: (handler.__func__, epochs) for frame_type, (handler, epochs) in own.items()
        }
    setattr(conn, _FRAME_TABLE_ATTR, _SharedFrameHandlers(conn, _shared_frame_table))


class _SpentHandshakeState:
    """Stand-ins for the Initial and Handshake epochs' state once both are discarded.

    aioquic keeps each connection's Initial/Handshake crypto pairs, packet spaces, crypto
    streams and buffers for its whole life (about 45 tracked objects per connection), though
    after the handshake it only looks at them to drop a late packet of those epochs: it reads
    the space's expected packet number, and decryption then fails for want of a key. One
    key-less pair and one discarded space, shared by every connection, answer those reads."""

    def __init__(self) -> None:
        self.pair = CryptoPair()
        for context in (self.pair.recv, self.pair.send):
            context._setup_cb = context._teardown_cb = NoCallback
        self.space = QuicPacketSpace()
        self.space.discarded = True
        self.initial_pairs: dict[tuple, dict] = {}

    def initial(self, versions: tuple) -> dict:
        """A shared ``_cryptos_initial`` for these versions (read only after the handshake)."""
        table = self.initial_pairs.get(versions)
        if table is None:
            table = self.initial_pairs[versions] = dict.fromkeys(versions, self.pair)
        return table


_spent_state: _SpentHandshakeState | None = None
_HANDSHAKE_EPOCHS = (aioquic_tls.Epoch.INITIAL, aioquic_tls.Epoch.HANDSHAKE)
_POST_HANDSHAKE = (aioquic_tls.State.CLIENT_POST_HANDSHAKE, aioquic_tls.State.SERVER_POST_HANDSHAKE)
#: TLS state only the handshake reads. Past it, a server's TLS refuses every message and a
#: client's reads only NewSessionTicket, which without a ticket callback touches none of these.
_TLS_HANDSHAKE_ONLY = (
    "handshake_extensions",
    "received_extensions",
    "_cipher_suites",
    "_legacy_compression_methods",
    "_psk_key_exchange_modes",
    "_signature_algorithms",
    "_supported_groups",
    "_supported_versions",
    "_peer_certificate_chain",
    "_ec_private_keys",
    "_certificate_request",
    "key_schedule",
    "_key_schedule_psk",
    "_key_schedule_proxy",
    "alpn_cb",
    "update_traffic_key_cb",
)


class _MeshQuicConnection(QuicConnection):
    """aioquic connection with mutual authentication and consumption-driven receive windows."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        connection_ids: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        _share_frame_handlers(self)
        self._local_active_connection_id_limit = max(2, connection_ids)
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        self.stream_consumed: dict[int, int] = {}
        self.connection_consumed = 0

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True
        if self._quic_logger is None:
            # each context's callbacks only log key changes to the (absent) qlog: 24 partials
            # and bound methods per connection for nothing
            for pair in (*self._cryptos.values(), *self._cryptos_initial.values()):
                for context in (pair.recv, pair.send):
                    context._setup_cb = context._teardown_cb = NoCallback

    def _discard_epoch(self, epoch) -> None:
        super()._discard_epoch(epoch)
        if (
            epoch == aioquic_tls.Epoch.HANDSHAKE
            and self._spaces[aioquic_tls.Epoch.INITIAL].discarded
        ):
            self._release_handshake_state()

    def _release_handshake_state(self) -> None:
        """Swap the spent Initial/Handshake state for the shared stand-ins."""
        global _spent_state
        if _spent_state is None:
            _spent_state = _SpentHandshakeState()
        spent = _spent_state
        for epoch in _HANDSHAKE_EPOCHS:
            if self._spaces[epoch] is spent.space:
                continue
            # CRYPTO data of these epochs is neither read (no key) nor written (TLS is past
            # them): without the entries, a stray write would fail loudly instead
            self._crypto_streams.pop(epoch, None)
            self._crypto_buffers.pop(epoch, None)
            self._spaces[epoch] = spent.space
        self._loss.spaces = [space for space in self._loss.spaces if not space.discarded]
        for epoch, pair in list(self._cryptos.items()):
            if (
                epoch != aioquic_tls.Epoch.ONE_RTT
                and not pair.recv.is_valid()
                and not pair.send.is_valid()
            ):
                self._cryptos[epoch] = spent.pair
        initial = self._cryptos_initial
        if all(not p.recv.is_valid() and not p.send.is_valid() for p in initial.values()):
            self._cryptos_initial = spent.initial(tuple(initial))
        tls = self.tls
        if tls.state in _POST_HANDSHAKE and tls.new_session_ticket_cb is None:
            for name in _TLS_HANDSHAKE_ONLY:
                if getattr(tls, name, None) is not None:
                    setattr(tls, name, None)

    def peer_certificate(self):
        return getattr(self.tls, "_peer_certificate", None) if hasattr(self, "tls") else None

    def _write_stream_limits(self, builder, space, stream) -> None:
        if not stream.max_stream_data_local:
            return
        window = self._stream_window
        target = self.stream_consumed.get(stream.stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder, space) -> None:
        limit = self._local_max_data
        window = self._connection_window
        target = self.connection_consumed + window
        if target - limit.value >= window // 4:
            limit.value = target
        used = limit.used
        limit.used = 0  # stop aioquic from doubling MAX_DATA on arrival
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def stream_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start


class QuicChannel:
    """One bidirectional QUIC stream as a :class:`~latticaray.mesh.channel.Channel`."""

    transport = "quic"

    def __init__(self, conn: QuicConn, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.remote_peer: PeerId = conn.remote_peer
        self.local_peer: PeerId = conn.local_peer
        self.remote_addr: Multiaddr | None = conn.remote_addr
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._received = 0
        self._consumed = 0
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._write_closed = False
        self._closed = False
        conn._quic.stream_consumed[stream_id] = 0

    # -- fed by the connection ----------------------------------------------------------------
    def _feed(self, data: bytes, end_stream: bool) -> None:
        if data:
            if self._closed:
                self._credit(len(data))  # discarded; keep the peer's window moving
            else:
                self._chunks.append(data)
                self._buffered += len(data)
            self._received += len(data)
        if end_stream:
            self._eof = True
        self._wake_reader()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._closed = True
        self._wake_reader()
        self._wake_drain()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_drain(self) -> None:
        if self._drain_waiter is not None and (
            self._closed or self.send_buffered <= self._conn.config.write_high_water // 2
        ):
            self._wake_drain()

    def _credit(self, n: int) -> None:
        quic = self._conn._quic
        self._consumed += n
        quic.stream_consumed[self.stream_id] = self._consumed
        quic.connection_consumed += n
        self._conn._schedule_transmit()

    # -- Channel API ---------------------------------------------------------------------------
    @property
    def send_buffered(self) -> int:
        return self._conn._quic.stream_buffered(self.stream_id)

    @property
    def receive_buffered(self) -> int:
        return self._buffered

    async def read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof or self._closed:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunks = self._chunks
        chunk = chunks[0]
        if len(chunk) > max_bytes:
            chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        elif len(chunks) == 1 or len(chunk) + len(chunks[1]) > max_bytes:
            chunks.popleft()
        else:
            # each STREAM frame is one chunk (~1.3 KB off the internet): hand on what arrived
            # together as one piece, so the reader parses once per batch, not once per packet
            pieces = [chunks.popleft()]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                piece = chunks.popleft()
                pieces.append(piece)
                size += len(piece)
            chunk = b"".join(pieces)
        self._buffered -= len(chunk)
        self._credit(len(chunk))
        if self._closed and not self._chunks and self._error is None:
            self._conn._forget_channel(self.stream_id)
        return chunk

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._write_closed:
            raise ConnectionClosed("write on a closed QUIC channel")
        if not data:
            return
        self._conn._quic.send_stream_data(self.stream_id, bytes(data))
        self._conn._note_sent()
        self._conn._schedule_transmit()

    async def drain(self) -> None:
        high = self._conn.config.write_high_water
        while True:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise ConnectionClosed("QUIC channel closed")
            if self.send_buffered <= high:
                return
            self._drain_waiter = asyncio.get_running_loop().create_future()
            if self._conn._draining is _NONE:
                self._conn._draining = set()
            self._conn._draining.add(self)
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
                self._conn._draining.discard(self)

    def close(self) -> None:
        """Send FIN after what was written; reading continues until the peer's FIN."""
        if self._write_closed or self._closed:
            return
        self._write_closed = True
        try:
            self._conn._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        except Exception:
            pass
        self._conn._schedule_transmit()
        if self._eof:
            self._finish()

    def abort(self) -> None:
        if self._closed:
            return
        quic = self._conn._quic
        try:
            if not self._write_closed:
                quic.reset_stream(self.stream_id, STREAM_ERROR_ABORTED)
            if not self._eof:
                quic.stop_stream(self.stream_id, STREAM_ERROR_ABORTED)
        except Exception:
            pass
        self._write_closed = True
        self._fail(ConnectionClosed("QUIC channel aborted locally"))
        self._discard()
        self._conn._schedule_transmit()

    def _discard(self) -> None:
        if self._buffered:
            n, self._buffered = self._buffered, 0
            self._chunks.clear()
            self._credit(n)
        self._conn._forget_channel(self.stream_id)

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake_drain()
        if not self._chunks:
            self._conn._forget_channel(self.stream_id)

    @property
    def is_closed(self) -> bool:
        return self._closed or self._write_closed or self._eof

    def __repr__(self) -> str:
        return f"<QuicChannel {self.stream_id} to {self.remote_peer}>"


class QuicConn:
    """One authenticated QUIC connection to a peer; a factory of :class:`QuicChannel`."""

    transport = "quic"

    def __init__(
        self,
        transport: QuicTransport,
        quic: _MeshQuicConnection,
        addr: tuple,
        is_client: bool,
        expected_peer: PeerId | None,
    ) -> None:
        self._transport = transport
        self._quic = quic
        self.config = transport.config
        self.addr = addr
        self.is_client = is_client
        self.expected_peer = expected_peer
        self.local_peer: PeerId = transport.key.peer_id
        self.remote_peer: PeerId | None = None
        self.remote_addr = _udp_multiaddr(addr)
        self.created_at = _now()
        self._loop = transport._loop
        self._channels: dict[int, QuicChannel] = {}
        # Peer-initiated streams this end has seen: every one up to the highest ID seen of its
        # kind (bidirectional, unidirectional) that has no channel is finished, except the
        # IDs the peer skipped over (opened implicitly, their data not here yet). This is
        # bounded by the peer's stream limit, where a set of finished IDs grew with every
        # stream of a long-lived connection. The gap set stays the shared empty frozenset
        # until first needed: sets are tracked objects.
        self._peer_max_bidi = -1
        self._peer_max_uni = -1
        self._peer_gaps: set[int] | frozenset = _NONE
        self._accept_queue: collections.deque[QuicChannel] = collections.deque()
        self._accept_waiter: asyncio.Future | None = None
        self._ready: asyncio.Future = self._loop.create_future()
        self._closed_future: asyncio.Future = self._loop.create_future()
        self._cids: set[bytes] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_scheduled = False
        self._last_rx = _now()
        self._unanswered_since: float | None = None
        self._close_callbacks: list[Callable[[QuicConn], None]] = []
        self._draining: set[QuicChannel] | frozenset = _NONE
        self._closing = False
        self._flush_waiter: asyncio.Future | None = None
        self.close_reason: str | None = None
        self._ready.add_done_callback(_consume_exception)

    # -- state ---------------------------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        return (
            self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None
        )

    @property
    def is_closed(self) -> bool:
        return self._closed_future.done()

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds (None before the first RTT sample)."""
        loss = self._quic._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def max_datagram_size(self) -> int:
        return self._quic._max_datagram_size

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
        if not self.is_established or self.is_closed or self._closing:
            raise ConnectionClosed("QUIC connection is not open")
        stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(stream_id, b"")  # creates the stream: the next ID differs
        channel = QuicChannel(self, stream_id)
        self._channels[stream_id] = channel
        return channel

    def _forget_channel(self, stream_id: int) -> None:
        if self._channels.pop(stream_id, None) is not None:
            self._quic.stream_consumed.pop(stream_id, None)

    def _peer_stream_finished(self, stream_id: int) -> bool:
        """Whether a peer-initiated stream without a channel was seen and has finished."""
        highest = self._peer_max_uni if stream_id & 2 else self._peer_max_bidi
        return stream_id <= highest and stream_id not in self._peer_gaps

    def _note_peer_stream(self, stream_id: int) -> None:
        highest = self._peer_max_uni if stream_id & 2 else self._peer_max_bidi
        if highest < 0:
            highest = (stream_id & 3) - 4
        if stream_id > highest:
            if stream_id > highest + 4:  # bounded: aioquic refuses IDs past our stream limit
                if self._peer_gaps is _NONE:
                    self._peer_gaps = set()
                self._peer_gaps.update(range(highest + 4, stream_id, 4))
            if stream_id & 2:
                self._peer_max_uni = stream_id
            else:
                self._peer_max_bidi = stream_id
        elif self._peer_gaps:
            self._peer_gaps.discard(stream_id)

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

    # -- closing --------------------------------------------------------------------------------
    def close(self, reason: str = "closed", flush_timeout: float = 2.0) -> None:
        """Close gracefully: data already written is delivered (acknowledged) first, for at
        most ``flush_timeout`` seconds, then CONNECTION_CLOSE is sent."""
        if self.is_closed or self._closing:
            return
        if flush_timeout > 0 and self.is_established and self._unacked_total() > 0:
            self._closing = True
            self._flush_waiter = self._loop.create_future()
            task = self._loop.create_task(self._close_after_flush(reason, flush_timeout))
            self._transport._background(task)
            return
        self.abort(reason)

    def abort(self, reason: str = "aborted") -> None:
        """Send CONNECTION_CLOSE now, dropping unsent data."""
        if self.is_closed:
            return
        self._quic.close(error_code=APP_ERROR_CLOSED, reason_phrase=reason[:100])
        self._transmit()
        self._terminate(reason, send=False)

    def _unacked_total(self) -> int:
        return sum(self._quic.stream_buffered(sid) for sid in list(self._quic._streams))

    async def _close_after_flush(self, reason: str, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while not self.is_closed and self._unacked_total() > 0:
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
            channel._fail(
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
        self._transport._forget(self)
        for callback in self._close_callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("QUIC close callback failed")
        self._close_callbacks.clear()

    def _peer_name(self) -> str:
        return str(self.remote_peer or self.expected_peer or f"{self.addr[0]}:{self.addr[1]}")

    # -- datagrams, events, timers ----------------------------------------------------------------
    def _datagram_received(self, data: bytes, addr: tuple) -> None:
        now = _now()
        self._last_rx = now
        self._unanswered_since = None
        self._quic.receive_datagram(data, addr, now)
        if (
            addr != self.addr
            and self._quic._network_paths
            and self._quic._network_paths[0].addr == addr
        ):
            self.addr = addr  # migrated
            self.remote_addr = _udp_multiaddr(addr)
        self._process_events()
        # Datagrams that arrive together are answered together: the transmit runs once, after
        # the loop has handed us every datagram it read in this iteration.
        self._schedule_transmit()
        if self._draining:
            for channel in list(self._draining):
                channel._check_drain()
        waiter = self._flush_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _process_events(self) -> None:
        quic = self._quic
        while True:
            event = quic.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._on_stream_data(event)
            elif kind is events.HandshakeCompleted:
                self._on_handshake(event)
            elif kind is events.ConnectionIdIssued:
                self._cids.add(event.connection_id)
                self._transport._register_cid(event.connection_id, self)
            elif kind is events.ConnectionIdRetired:
                self._cids.discard(event.connection_id)
                self._transport._unregister_cid(event.connection_id, self)
            elif kind is events.StreamReset:
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    channel._fail(
                        ConnectionClosed(f"stream reset by peer (code {event.error_code})")
                    )
                    channel._discard()
            elif kind is events.StopSendingReceived:
                channel = self._channels.get(event.stream_id)
                if channel is not None:
                    try:
                        quic.reset_stream(event.stream_id, STREAM_ERROR_ABORTED)
                    except Exception:
                        pass
                    channel._fail(ConnectionClosed("peer stopped reading this stream"))
                    channel._discard()
            elif kind is events.ConnectionTerminated:
                reason = event.reason_phrase or f"error 0x{event.error_code:x}"
                error = None
                if not self._ready.done() and event.error_code == APP_ERROR_AUTH_FAILED:
                    error = HandshakeError(f"peer refused our authentication: {reason}")
                self._terminate(
                    f"terminated by peer or transport: {reason}", send=False, error=error
                )
                return

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        try:
            if event.alpn_protocol != ALPN_LIBP2P:
                raise HandshakeError(f"peer negotiated ALPN {event.alpn_protocol!r}, not 'libp2p'")
            cert = self._quic.peer_certificate()
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
        self._quic.tls._peer_certificate = None  # checked; its parsed extensions need not stay
        self.remote_peer = peer
        self._ready.set_result(self)
        self._transport._on_established(self)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        channel = self._channels.get(event.stream_id)
        if channel is None:
            if (
                self.remote_peer is None
                or not _peer_initiated(event.stream_id, self.is_client)
                or self._peer_stream_finished(event.stream_id)
            ):
                self._quic.connection_consumed += len(event.data)  # discarded stream
                return
            self._note_peer_stream(event.stream_id)  # a refused one counts as finished
            if len(self._accept_queue) >= self.config.accept_backlog:
                self._quic.reset_stream(event.stream_id, STREAM_ERROR_REFUSED)
                self._quic.stop_stream(event.stream_id, STREAM_ERROR_REFUSED)
                return
            channel = QuicChannel(self, event.stream_id)
            self._channels[event.stream_id] = channel
            self._accept_queue.append(channel)
            if self._accept_waiter is not None and not self._accept_waiter.done():
                self._accept_waiter.set_result(None)
        channel._feed(event.data, event.end_stream)
        if event.end_stream and channel._write_closed:
            channel._finish()

    def _schedule_transmit(self) -> None:
        if not self._transmit_scheduled and not self.is_closed:
            self._transmit_scheduled = True
            self._loop.call_soon(self._transmit_soon, context=self._transport._context)

    def _transmit_soon(self) -> None:
        self._transmit_scheduled = False
        if not self.is_closed:
            self._transmit()

    def _note_sent(self) -> None:
        if self._unanswered_since is None:
            self._unanswered_since = _now()

    def _transmit(self) -> None:
        quic = self._quic
        datagrams = quic.datagrams_to_send(now=_now())
        if datagrams:
            self._transport._send_datagrams(datagrams)
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
            max(0.0, timer_at - _now()), self._on_timer, context=self._transport._context
        )

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.is_closed:
            return
        self._quic.handle_timer(now=_now())
        self._process_events()
        if not self.is_closed:
            self._transmit()

    def _tick(self, now: float) -> None:
        """Keepalive and liveness, called about once a second by the transport."""
        if self.is_closed:
            return
        if not self._ready.done():
            if now - self.created_at > self.config.handshake_timeout:
                self._terminate("handshake timed out", send=True)
            return
        if (
            self._unanswered_since is not None
            and now - self._unanswered_since > self.config.unresponsive_timeout
        ):
            self._terminate(
                f"peer unresponsive for {now - self._unanswered_since:.1f} s", send=True
            )
            return
        if now - self._last_rx > self.config.keepalive_interval:
            self._quic.send_ping(0)
            self._note_sent()
            self._transmit()

    def __repr__(self) -> str:
        return f"<QuicConn {self._peer_name()} {'out' if self.is_client else 'in'}>"


_NONE: frozenset = frozenset()


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _peer_initiated(stream_id: int, is_client: bool) -> bool:
    client_initiated = stream_id % 2 == 0
    return client_initiated != is_client


def _udp_multiaddr(addr: tuple) -> Multiaddr:
    host, port = addr[0], addr[1]
    family = "ip6" if ":" in host else "ip4"
    if family == "ip6" and host.startswith("::ffff:") and "." in host:
        family, host = "ip4", host[7:]
    return Multiaddr([(family, host), ("udp", port), ("quic-v1", None)])


_UDP_SEGMENT = 103  # Linux UDP_SEGMENT (GSO segment size), SOL_UDP level
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000  # one UDP datagram before segmentation (IPv4 limit 65507)


class _UdpSocket:
    """The transport's non-blocking UDP socket, driven by the event loop's reader callback.

    asyncio's datagram transport reads one datagram per loop iteration, so a receiver paid a
    whole iteration (and a transmit attempt) per 1350-byte packet. Here one readiness callback
    reads up to ``batch`` datagrams; the connections they touched transmit once afterwards
    (their transmit is scheduled with ``call_soon``), which also batches ACKs. Sends go straight
    to the socket; when its buffer is full they wait in a bounded queue for writability (beyond
    the bound they are dropped, as a full network queue would: QUIC recovers them).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_datagram: Callable[[bytes, tuple], None],
        batch: int,
        max_queued: int,
        gso: bool = True,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._on_datagram = on_datagram
        self._batch = batch
        self._max_queued = max_queued
        self._queue: collections.deque[tuple[bytes, tuple]] = collections.deque()
        self._closed = False
        self._gso = gso and hasattr(sock, "sendmsg")
        self.gso_sends = 0
        loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        deliver = self._on_datagram
        for _ in range(self._batch):
            if self._closed:
                return
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("QUIC socket error: %s", exc)
                continue
            try:
                deliver(data, addr)
            except Exception:
                log.exception("QUIC: error handling a datagram from %s", addr)

    def send_many(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        """Send datagrams in order; runs of equal-size datagrams to one address go out as one
        UDP GSO send (the kernel splits them), which saves a syscall per 1350-byte packet."""
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j, total = i + 1, size
            if self._gso and not self._queue:
                while j < n and j - i < _GSO_MAX_SEGMENTS and datagrams[j][1] == addr:
                    length = len(datagrams[j][0])
                    if length > size or total + length > _GSO_MAX_BYTES:
                        break
                    total += length
                    j += 1
                    if length < size:  # only the last segment may be shorter
                        break
            if j - i == 1:
                self.sendto(data, addr)
            else:
                self._send_segments(datagrams[i:j], size, addr)
            i = j

    def _send_segments(self, run: list[tuple[bytes, tuple]], size: int, addr: tuple) -> None:
        try:
            self._sock.sendmsg(
                [b"".join(d for d, _ in run)],
                [(socket.SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, "little"))],
                0,
                addr,
            )
            self.gso_sends += 1
            return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # no GSO on this kernel or path: plain sends from now on
            log.debug("QUIC: UDP GSO unavailable (%s); sending datagrams one by one", exc)
            self._gso = False
        for data, target in run:
            self.sendto(data, target)

    def sendto(self, data: bytes, addr: tuple) -> None:
        if self._closed:
            return
        if not self._queue:
            try:
                self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._sock.fileno(), self._write_ready)
            except OSError as exc:  # unreachable destination and the like: a lost datagram
                log.debug("QUIC sendto %s failed: %s", addr, exc)
                return
        if len(self._queue) < self._max_queued:
            self._queue.append((data, addr))

    def _write_ready(self) -> None:
        queue = self._queue
        while queue and not self._closed:
            data, addr = queue[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("QUIC sendto %s failed: %s", addr, exc)
            queue.popleft()
        if not self._closed:
            self._loop.remove_writer(self._sock.fileno())

    def getsockname(self) -> tuple:
        return self._sock.getsockname()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        self._sock.close()


class QuicTransport:
    """The node's QUIC endpoint: one UDP socket, every connection in and out.

    ``on_connection(conn)`` is called for each authenticated connection, inbound and outbound.
    """

    def __init__(
        self,
        key: KeyPair,
        config: QuicConfig | None = None,
        *,
        on_connection: Callable[[QuicConn], None] | None = None,
        certified: CertifiedKey | None = None,
    ) -> None:
        self.key = key
        self.config = config or QuicConfig()
        self.on_connection = on_connection
        self.unknown_datagram_handler: Callable[[bytes, tuple], None] | None = None
        self.accept_inbound = True
        self._certified = certified or make_certified_key(key)
        self._retry = QuicRetryTokenHandler()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: _UdpSocket | None = None
        self._by_cid: dict[bytes, QuicConn] = {}
        self._conns: set[QuicConn] = set()
        self._tick_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._local: tuple | None = None
        self._configurations: dict[tuple[bool, int], QuicConfiguration] = {}
        # the context the connections' timer and transmit callbacks run in: one for all
        # instead of a copy of the caller's per scheduled callback (a tracked object each)
        self._context = contextvars.Context()
        self.stats = collections.Counter()

    # -- lifecycle ------------------------------------------------------------------------------
    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Multiaddr:
        """Bind the one UDP socket; returns its ``/ip4|ip6/../udp/../quic-v1`` address."""
        if self._udp is not None:
            raise RuntimeError("QUIC transport is already bound")
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # *BUFFORCE lets a privileged process exceed net.core.[rw]mem_max
            for force, plain in (
                (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
            ):
                for opt in (force, plain):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, self.config.socket_buffer_bytes)
                        break
                    except OSError:
                        continue
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._local = sock.getsockname()
        self._udp = _UdpSocket(
            self._loop,
            sock,
            self._datagram_received,
            self.config.receive_batch,
            self.config.send_queue_datagrams,
            self.config.udp_gso,
        )
        self._tick_task = self._loop.create_task(self._tick_loop())
        return self.listen_addr

    @property
    def listen_addr(self) -> Multiaddr:
        if self._local is None:
            raise RuntimeError("QUIC transport is not bound")
        return _udp_multiaddr(self._local)

    @property
    def local_address(self) -> tuple | None:
        return self._local

    @property
    def connections(self) -> list[QuicConn]:
        return list(self._conns)

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.close("transport shutting down")
        if self._tasks:  # graceful closes flushing their data (each bounded in time)
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for conn in list(self._conns):
            conn.abort("transport shutting down")
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        if self._udp is not None:
            # let the CONNECTION_CLOSE datagrams leave before the socket goes
            await asyncio.sleep(0)
            self._udp.close()
            self._udp = None

    # -- dialing ----------------------------------------------------------------------------------
    async def dial(
        self,
        addr: Multiaddr | tuple,
        expected_peer: PeerId | None = None,
        timeout: float | None = None,
    ) -> QuicConn:
        """Connect and authenticate; raises PeerIdMismatch / HandshakeError / PeerUnreachable."""
        if isinstance(addr, Multiaddr):
            if addr.transport != "quic" or addr.host is None:
                raise PeerUnreachable(f"{addr} is not a QUIC address")
            if expected_peer is None:
                expected_peer = addr.peer_id
            target = (addr.host, addr.port)
        else:
            target = (addr[0], addr[1])
        if self._udp is None:
            raise RuntimeError("QUIC transport must listen() before dialing (one shared socket)")
        if len(self._conns) >= self.config.max_connections:
            raise PeerUnreachable("QUIC connection limit reached")
        host = target[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            infos = await self._loop.getaddrinfo(host, target[1], type=socket.SOCK_DGRAM)
            if not infos:
                raise PeerUnreachable(f"cannot resolve {host}") from None
            target = infos[0][4][:2]
        if self._local is not None and len(self._local) == 4 and ":" not in target[0]:
            target = ("::ffff:" + target[0], target[1])  # IPv6 socket dialing IPv4
        quic = self._make_connection(is_client=True, remote_host=target[0])
        conn = QuicConn(self, quic, target, is_client=True, expected_peer=expected_peer)
        self._add(conn)
        self._register_cid(quic.host_cid, conn)
        conn._cids.add(quic.host_cid)
        quic.connect(target, now=_now())
        conn._transmit()
        self.stats["dials"] += 1
        try:
            await conn.wait_ready(timeout or self.config.handshake_timeout)
        except ConnectionClosed as exc:
            raise PeerUnreachable(f"QUIC dial to {target[0]}:{target[1]} failed: {exc}") from None
        return conn

    def send_raw(self, addr: tuple, data: bytes) -> None:
        """Send one datagram from the shared socket (hole-punch packets)."""
        self._sendto(bytes(data), addr)

    # -- internals ---------------------------------------------------------------------------------
    def _background(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_connection(
        self,
        *,
        is_client: bool,
        remote_host: str,
        original_dcid: bytes | None = None,
        retry_scid: bytes | None = None,
    ) -> _MeshQuicConnection:
        cfg = self.config
        size = cfg.datagram_size_for(remote_host.removeprefix("::ffff:"))
        # aioquic only reads its configuration: connections alike share one (and its lists)
        configuration = self._configurations.get((is_client, size))
        if configuration is None:
            configuration = self._configurations[(is_client, size)] = self._configuration(
                is_client, size
            )
        quic = _MeshQuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            stream_window=cfg.stream_receive_window,
            connection_window=max(cfg.connection_receive_window, cfg.stream_receive_window),
            max_streams=cfg.max_streams,
            connection_ids=cfg.connection_ids,
        )
        host = remote_host.removeprefix("::ffff:")
        if not cfg.paces(host):
            quic._loss._pacer = _Unpaced(max_datagram_size=configuration.max_datagram_size)
        return quic

    def _configuration(self, is_client: bool, max_datagram_size: int) -> QuicConfiguration:
        cfg = self.config
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN_LIBP2P],
            certificate=self._certified.certificate,
            private_key=self._certified.private_key,
            verify_mode=0,  # ssl.CERT_NONE: the libp2p certificate is checked by us
            idle_timeout=cfg.idle_timeout,
            max_datagram_size=max_datagram_size,
            max_data=max(cfg.connection_receive_window, cfg.stream_receive_window),
            max_stream_data=cfg.stream_receive_window,
            connection_id_length=CONNECTION_ID_LENGTH,
            congestion_control_algorithm=cfg.congestion_control,
            initial_rtt=cfg.initial_rtt,
            server_name=None,
        )

    def _add(self, conn: QuicConn) -> None:
        self._conns.add(conn)

    def _forget(self, conn: QuicConn) -> None:
        self._conns.discard(conn)
        for cid in conn._cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn._cids.clear()

    def _register_cid(self, cid: bytes, conn: QuicConn) -> None:
        self._by_cid[cid] = conn

    def _unregister_cid(self, cid: bytes, conn: QuicConn) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]

    def _on_established(self, conn: QuicConn) -> None:
        self.stats["established"] += 1
        if self.on_connection is not None:
            try:
                self.on_connection(conn)
            except Exception:
                log.exception("QUIC on_connection callback failed")

    def _sendto(self, data: bytes, addr: tuple) -> None:
        if self._udp is not None:
            self._udp.sendto(data, addr)

    def _send_datagrams(self, datagrams: list[tuple[bytes, tuple]]) -> None:
        if self._udp is not None:
            self._udp.send_many(datagrams)

    def _datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except Exception:
            self._unknown(data, addr)
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if header.packet_type != QuicPacketType.INITIAL:
                self._unknown(data, addr)
                return
            if (
                header.version is not None
                and header.version not in QuicConfiguration().supported_versions
            ):
                self._sendto(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=QuicConfiguration().supported_versions,
                    ),
                    addr,
                )
                return
            conn = self._accept(header, addr, len(data))
            if conn is None:
                return
        conn._datagram_received(data, addr)

    def _accept(self, header, addr: tuple, size: int) -> QuicConn | None:
        if not self.accept_inbound or size < MIN_DATAGRAM_SIZE:
            self.stats["initial_dropped"] += 1
            return None
        pending = sum(1 for c in self._conns if not c._ready.done())
        if (
            pending >= self.config.max_pending_handshakes
            or len(self._conns) >= self.config.max_connections
        ):
            self.stats["initial_dropped"] += 1
            return None
        dcid = header.destination_cid
        original_dcid, retry_scid = dcid, None
        if header.token:
            try:
                original_dcid = self._retry.validate_token(
                    address=addr, destination_cid=dcid, token=header.token, now=_now()
                )
            except ValueError:
                self.stats["retry_token_invalid"] += 1
                return None
            retry_scid = dcid
        elif pending >= self.config.retry_when_pending_handshakes:
            retry_cid = os.urandom(CONNECTION_ID_LENGTH)
            self._sendto(
                encode_quic_retry(
                    version=header.version,
                    source_cid=retry_cid,
                    destination_cid=header.source_cid,
                    original_destination_cid=dcid,
                    retry_token=self._retry.create_token(
                        address=addr,
                        original_destination_connection_id=dcid,
                        retry_source_connection_id=retry_cid,
                        now=_now(),
                    ),
                ),
                addr,
            )
            self.stats["retries_sent"] += 1
            return None
        quic = self._make_connection(
            is_client=False, remote_host=addr[0], original_dcid=original_dcid, retry_scid=retry_scid
        )
        conn = QuicConn(self, quic, addr, is_client=False, expected_peer=None)
        self._add(conn)
        for cid in (dcid, quic.host_cid):
            self._register_cid(cid, conn)
            conn._cids.add(cid)
        self.stats["accepted"] += 1
        return conn

    def _unknown(self, data: bytes, addr: tuple) -> None:
        self.stats["unknown_datagrams"] += 1
        handler = self.unknown_datagram_handler
        if handler is not None:
            try:
                handler(data, addr)
            except Exception:
                log.exception("unknown-datagram handler failed")

    async def _tick_loop(self) -> None:
        period = max(
            0.05, min(1.0, self.config.unresponsive_timeout / 4, self.config.keepalive_interval / 2)
        )
        while True:
            await asyncio.sleep(period)
            now = _now()
            for conn in list(self._conns):
                try:
                    conn._tick(now)
                except Exception:
                    log.exception("QUIC tick failed for %r", conn)
