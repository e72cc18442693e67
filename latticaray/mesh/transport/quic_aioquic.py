"""The aioquic backend of the QUIC transport: every use of aioquic's private API, in one place,
pinned to the aioquic version it was read from.

The transport drives aioquic's sans-I/O ``QuicConnection`` and changes some of its behaviour
from the inside: no other module of the package reads or writes an underscore name of aioquic.
Those internals can change in any release, so importing this module checks aioquic's version and
fails with a clear :class:`ImportError` on any other than :data:`AIOQUIC_VERSION` (re-read this
module against the new version's source, then move the pin).

What :class:`MeshQuicConnection` changes, and why:

* mutual authentication: aioquic 1.7.2 asks a client for its certificate only behind the private
  ``tls.Context._request_client_certificate``; it is set on every server connection (a test checks
  that the client certificate really arrives);
* consumption-driven receive windows: MAX_STREAM_DATA / MAX_DATA advance with what the
  application has *read* (``stream_consumed`` / ``connection_consumed``), not with what arrived
  (aioquic doubles windows on arrival, which lets a stalled reader's memory grow without bound);
* fewer objects per connection for the garbage collector: one shared frame dispatch table
  (:class:`SharedFrameHandlers`), and once the handshake is over the spent Initial/Handshake
  state, TLS's handshake-only state and the key-logging callbacks are dropped for shared
  stand-ins (:class:`SpentHandshakeState`);
* pacing off on paths that need none (:class:`Unpaced`);
* no per-packet scan of every open stream: aioquic's ``_write_application`` visits each open
  stream (limits, then data) for every packet it builds, which with hundreds of streams in
  flight cost more than the packets; here streams are visited only when marked as having
  something to send (data written or lost, a reset, a stop, a finished stream to discard, a
  window to raise), see ``_write_application``;
* path MTU discovery (:mod:`.quic_pmtu` decides, this sends the padded PING probes outside
  congestion control and adopts the confirmed size), and STREAM frames longer than 16383 bytes
  (aioquic writes every STREAM length as a 2-byte varint, which broke datagrams above 16 KiB);
* ``tls.Epoch`` hashes by identity (a C slot instead of Enum's Python ``__hash__``);
* read-only views the connection wrapper needs (RTT, datagram size, active path, unacknowledged
  bytes) as public methods.
"""

from __future__ import annotations

from typing import Any

import aioquic
from aioquic import tls as aioquic_tls
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import events as aioquic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicNetworkPath,
    QuicReceiveContext,
    stream_is_client_initiated,
)
from aioquic.quic.crypto import CryptoPair, NoCallback
from aioquic.quic.packet import QuicFrameType, QuicPacketType, pull_quic_transport_parameters
from aioquic.quic.packet_builder import (
    QuicDeliveryState,
    QuicPacketBuilder,
    QuicPacketBuilderStop,
)
from aioquic.quic.recovery import QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from cryptography.hazmat.primitives.serialization import Encoding

from ..tls import CertifiedKey
from . import quic_congestion  # noqa: F401  (registers the "bdp" congestion controller)
from .quic_backend import EventTypes, LibraryBackend, connection_window, pinned_version_check
from .quic_config import QuicConfig
from .quic_pmtu import PmtuSearch, PmtuState

__all__ = [
    "AIOQUIC_VERSION",
    "BACKEND",
    "AioquicBackend",
    "MeshQuicConnection",
    "SharedFrameHandlers",
    "SpentHandshakeState",
    "Unpaced",
    "check_aioquic_version",
]

#: The aioquic release whose internals this module was written against.
AIOQUIC_VERSION = "1.7.2"


#: Raises ImportError unless the version it is given is the pinned aioquic release.
check_aioquic_version = pinned_version_check("aioquic", AIOQUIC_VERSION)
check_aioquic_version(aioquic.__version__)

# aioquic keys its per-connection tables (crypto pairs, packet spaces, crypto streams) by
# tls.Epoch, whose Enum __hash__ is a Python function: a few calls per packet, ~8 % of the CPU
# of a bulk transfer at 1350 B. Enum members compare by identity, so the identity hash agrees
# with equality; aioquic builds no Epoch-keyed table at import, only per connection.
aioquic_tls.Epoch.__hash__ = object.__hash__  # type: ignore[method-assign]


class Unpaced(QuicPacketPacer):
    """A pacer that never holds a packet back (congestion control still applies)."""

    def next_send_time(self, now: float) -> float:
        return None  # type: ignore[return-value]  # aioquic's own pacer returns None too

    def update_after_send(self, now: float) -> None:
        pass


class SharedFrameHandlers:
    """aioquic's frame dispatch table without a per-connection copy.

    aioquic builds a dict of ~60 bound methods, tuples and frozensets for every connection:
    about a third of the objects a connection keeps alive. With thousands of connections in
    one process those objects made each full garbage collection pause the loop for up to ~1 s.
    This stands in for that dict: one object per connection, reading one table per class."""

    __slots__ = ("_conn", "_table")

    def __init__(self, conn: QuicConnection, table: dict) -> None:
        self._conn = conn
        self._table = table

    def __getitem__(self, frame_type: int) -> tuple[Any, Any]:
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
    setattr(conn, _FRAME_TABLE_ATTR, SharedFrameHandlers(conn, _shared_frame_table))


class SpentHandshakeState:
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


_spent_state: SpentHandshakeState | None = None
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


class MeshQuicConnection(QuicConnection):
    """aioquic connection with mutual authentication and consumption-driven receive windows."""

    backend = "aioquic"
    events = EventTypes.of(aioquic_events)

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        stream_window: int,
        connection_window: int,
        max_streams: int,
        connection_ids: int = 2,
        pmtu: PmtuSearch | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(configuration=configuration, **kwargs)
        #: path MTU discovery (None: the configured datagram size stays)
        self.pmtu = pmtu
        _share_frame_handlers(self)
        self._local_active_connection_id_limit = max(2, connection_ids)
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._local_max_streams_bidi.value = max_streams
        self._local_max_streams_bidi.sent = max_streams
        #: Bytes of each stream the application has read (drives MAX_STREAM_DATA).
        self.stream_consumed: dict[int, int] = {}
        #: Bytes of all streams the application has read or discarded (drives MAX_DATA).
        self.connection_consumed = 0
        # Streams that may have something to send (ordered: served ones move to the end),
        # and streams whose MAX_STREAM_DATA may need raising; see _write_application.
        self._active_streams: dict[QuicStream, None] = {}
        self._window_streams: dict[QuicStream, None] = {}

    # -- read-only views for the connection wrapper -----------------------------------------
    @property
    def smoothed_rtt(self) -> float | None:
        """Smoothed round-trip time in seconds (None before the first RTT sample)."""
        loss = self._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    def active_path_addr(self) -> tuple | None:
        """The address datagrams go to (it changes when the peer migrates)."""
        paths = self._network_paths
        return paths[0].addr if paths else None

    def peer_certificate(self) -> Any:
        """The peer's certificate from the handshake (None once dropped or before it)."""
        return getattr(self.tls, "_peer_certificate", None) if hasattr(self, "tls") else None

    def peer_certificate_der(self) -> bytes | None:
        cert = self.peer_certificate()
        return None if cert is None else bytes(cert.public_bytes(Encoding.DER))

    def drop_peer_certificate(self) -> None:
        """Forget the checked peer certificate: its parsed extensions need not stay."""
        self.tls._peer_certificate = None

    def stream_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def unacked_total(self) -> int:
        """Bytes written to any stream and not yet acknowledged."""
        return sum(self.stream_buffered(sid) for sid in list(self._streams))

    def disable_pacing(self) -> None:
        """Send whatever congestion control allows at once (paths with no queue to protect)."""
        self._loss._pacer = Unpaced(max_datagram_size=self._max_datagram_size)

    def receive_datagrams(self, datagrams: list[bytes], addr: NetworkAddress, now: float) -> None:
        """Datagrams that arrived together from one address (aioquic takes one at a time)."""
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def track_stream(self, stream_id: int) -> None:
        self.stream_consumed[stream_id] = 0

    def untrack_stream(self, stream_id: int) -> None:
        self.stream_consumed.pop(stream_id, None)

    def discard_stream_data(self, stream_id: int, n: int) -> None:
        self.connection_consumed += n

    def loss_stats(self) -> tuple[int, int] | None:
        """Not needed: aioquic connections run the loss-tolerant "bdp" controller."""
        return None

    def conceals_loss(self) -> bool:
        """Never: the "bdp" controller reads random loss for what it is."""
        return False

    def consumed(self, stream_id: int, total: int, n: int) -> None:
        """The application has now read ``total`` bytes of the stream, ``n`` of them new."""
        self.stream_consumed[stream_id] = total
        self.connection_consumed += n
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._window_streams[stream] = None

    # -- streams that have something to send -------------------------------------------------
    def _mark(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._active_streams[stream] = None

    def _mark_all(self) -> None:
        active = self._active_streams
        for stream in self._streams.values():
            active[stream] = None

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._mark(stream_id)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        super().reset_stream(stream_id, error_code)
        self._mark(stream_id)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        super().stop_stream(stream_id, error_code)
        self._mark(stream_id)

    def _handle_max_data_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        super()._handle_max_data_frame(context, frame_type, buf)
        self._mark_all()  # streams held back by the connection's window may go on

    def _handle_max_stream_data_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_uint_var(buf)
        super()._handle_max_stream_data_frame(context, frame_type, buf)
        self._mark(stream_id)

    def _handle_stop_sending_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_uint_var(buf)
        super()._handle_stop_sending_frame(context, frame_type, buf)
        self._mark(stream_id)  # a RESET_STREAM to send

    def _handle_reset_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        stream_id = _peek_uint_var(buf)
        super()._handle_reset_stream_frame(context, frame_type, buf)
        self._mark(stream_id)  # may have finished: to discard

    def _handle_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        if frame_type & 1:  # FIN: the stream may have finished (to discard)
            stream_id = _peek_uint_var(buf)
            super()._handle_stream_frame(context, frame_type, buf)
            self._mark(stream_id)
        else:
            super()._handle_stream_frame(context, frame_type, buf)

    def _unblock_streams(self, is_unidirectional: bool) -> None:
        super()._unblock_streams(is_unidirectional)
        self._mark_all()

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED:
            self._window_streams[stream] = None

    def _on_stream_data_delivery(
        self, delivery: QuicDeliveryState, stream: QuicStream, start: int, stop: int, fin: bool
    ) -> None:
        sender = stream.sender
        sender.on_data_delivery(delivery, start, stop, fin)
        if delivery != QuicDeliveryState.ACKED or sender.is_finished:
            self._active_streams[stream] = None  # data to resend, or finished: to discard

    def _write_application(
        self, builder: QuicPacketBuilder, network_path: QuicNetworkPath, now: float
    ) -> None:
        """aioquic's, visiting only the marked streams (limits, then data) per packet."""
        epochs = aioquic_tls.Epoch
        crypto_stream: QuicStream | None = None
        if self._cryptos[epochs.ONE_RTT].send.is_valid():
            crypto = self._cryptos[epochs.ONE_RTT]
            crypto_stream = self._crypto_streams[epochs.ONE_RTT]
            packet_type = QuicPacketType.ONE_RTT
        elif self._cryptos[epochs.ZERO_RTT].send.is_valid():
            crypto = self._cryptos[epochs.ZERO_RTT]
            packet_type = QuicPacketType.ZERO_RTT
        else:
            return
        space = self._spaces[epochs.ONE_RTT]
        active = self._active_streams
        windows = self._window_streams
        if self._streams_queue:  # streams aioquic created since the last call
            for stream in self._streams_queue:
                active[stream] = None
            self._streams_queue.clear()

        while True:
            # apply pacing, except if we have ACKs to send
            if space.ack_at is None or space.ack_at >= now:
                self._pacing_at = self._loss._pacer.next_send_time(now=now)
                if self._pacing_at is not None:
                    break
            builder.start_packet(packet_type, crypto)

            if (
                packet_type == QuicPacketType.ONE_RTT
                and space.ack_at is not None
                and space.ack_at <= now
            ):
                self._write_ack_frame(builder=builder, space=space, now=now)

            if self._handshake_complete:
                self._write_control_frames(builder, network_path, space, now)

            # stream-level limits, for the streams whose reader moved (or whose frame was lost)
            if windows:
                for stream in list(windows):
                    self._write_stream_limits(builder=builder, space=space, stream=stream)
                    del windows[stream]

            if self._ping_pending:
                self._write_ping_frame(builder, self._ping_pending)
                self._ping_pending.clear()

            if self._probe_pending:
                self._write_ping_frame(builder, comment="probe")
                self._probe_pending = False

            if crypto_stream is not None and not crypto_stream.sender.buffer_is_empty:
                self._write_crypto_frame(builder=builder, space=space, stream=crypto_stream)

            while self._datagrams_pending:
                try:
                    self._write_datagram_frame(
                        builder=builder,
                        data=self._datagrams_pending[0],
                        frame_type=QuicFrameType.DATAGRAM_WITH_LENGTH,
                    )
                    self._datagrams_pending.popleft()
                except QuicPacketBuilderStop:
                    break

            discarded = self._write_streams(builder, space, active)

            if builder.packet_is_empty:
                # Discarded streams may let the peer open new ones, which the next
                # packet announces with MAX_STREAMS.
                if not discarded:
                    break
            else:
                self._loss._pacer.update_after_send(now=now)

    def _write_control_frames(
        self,
        builder: QuicPacketBuilder,
        network_path: QuicNetworkPath,
        space: QuicPacketSpace,
        now: float,
    ) -> None:
        """The connection's own frames of a 1-RTT packet, as aioquic writes them."""
        if not (network_path.is_validated or network_path.local_challenge_sent):
            # PATH_CHALLENGE on a server whose client migrated (RFC 9000 9.3)
            self._write_path_challenge_frame(builder=builder, network_path=network_path)
            if network_path.validation_deadline is None:
                network_path.validation_deadline = now + 3 * max(
                    self._loss.get_probe_timeout(), 2 * self._configuration.initial_rtt
                )
        if self._handshake_done_pending:
            self._write_handshake_done_frame(builder=builder)
            self._handshake_done_pending = False
        while network_path.remote_challenges:
            self._write_path_response_frame(
                builder=builder, challenge=network_path.remote_challenges[0]
            )
            network_path.remote_challenges.popleft()
        for connection_id in self._host_cids:
            if not connection_id.was_sent:
                self._write_new_connection_id_frame(builder=builder, connection_id=connection_id)
        for sequence_number in self._retire_connection_ids[:]:
            self._write_retire_connection_id_frame(builder=builder, sequence_number=sequence_number)
            self._retire_connection_ids.pop(0)
        if self._streams_blocked_pending:
            if self._streams_blocked_bidi:
                self._write_streams_blocked_frame(
                    builder=builder,
                    frame_type=QuicFrameType.STREAMS_BLOCKED_BIDI,
                    limit=self._remote_max_streams_bidi,
                )
            if self._streams_blocked_uni:
                self._write_streams_blocked_frame(
                    builder=builder,
                    frame_type=QuicFrameType.STREAMS_BLOCKED_UNI,
                    limit=self._remote_max_streams_uni,
                )
            self._streams_blocked_pending = False
        self._write_connection_limits(builder=builder, space=space)

    def _write_streams(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, active: dict[QuicStream, None]
    ) -> bool:
        """STOP_SENDING, RESET_STREAM and STREAM frames of the marked streams; a stream stays
        marked while it has something left to send. Returns whether a stream was discarded."""
        discarded = False
        served: list[QuicStream] = []
        try:
            for stream in list(active):
                if builder.remaining_flight_space < _FULL_PACKET_ROOM:
                    break  # this packet is full: the next one goes on from here
                sender = stream.sender
                if stream.is_finished:
                    stream_id: int = stream.stream_id  # type: ignore[assignment]
                    self._streams.pop(stream_id, None)
                    if stream_is_client_initiated(stream_id) != self._is_client:
                        # let the peer open a new stream for each one that closes (RFC 9000 4.6)
                        self._stream_limit(stream_id).value += 1
                    del active[stream]
                    discarded = True
                    continue
                if stream.receiver.stop_pending:
                    self._write_stop_sending_frame(builder=builder, stream=stream)
                if sender.reset_pending:
                    self._write_reset_stream_frame(builder=builder, stream=stream)
                elif not stream.is_blocked and not sender.buffer_is_empty:
                    used = self._write_stream_frame(
                        builder=builder,
                        space=space,
                        stream=stream,
                        max_offset=min(
                            sender.highest_offset
                            + self._remote_max_data
                            - self._remote_max_data_used,
                            stream.max_stream_data_remote,
                        ),
                    )
                    self._remote_max_data_used += used
                    if used > 0:
                        served.append(stream)
                        continue
                if sender.buffer_is_empty or stream.is_blocked:
                    # Nothing to send until an event marks it again, unless a reset or stop
                    # is under way (their frames may be lost and resent): those stay.
                    receiver = stream.receiver
                    if (
                        not (sender.reset_pending or receiver.stop_pending)
                        and (sender._reset_error_code is None or sender.is_finished)
                        and (receiver._stop_error_code is None or receiver.is_finished)
                    ):
                        del active[stream]
                elif not self._remote_max_data_used < self._remote_max_data:
                    del active[stream]  # held by the connection window: MAX_DATA marks all
                elif sender.highest_offset >= stream.max_stream_data_remote and (
                    not len(sender._pending) or sender._pending[0].start >= sender.highest_offset
                ):
                    del active[stream]  # held by its window: MAX_STREAM_DATA marks it
        finally:
            for stream in served:  # round robin: served streams go to the end
                if stream in active:
                    del active[stream]
                    active[stream] = None
        return discarded

    # -- path MTU discovery -----------------------------------------------------------------
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = super().datagrams_to_send(now)
        pmtu = self.pmtu
        if (
            pmtu is not None
            and pmtu.state is PmtuState.SEARCHING
            and pmtu.in_flight is None
            and self._handshake_confirmed
            and not self._close_pending
            and self._state not in END_STATES
        ):
            size = pmtu.next_probe(now)
            if size is not None:
                probe = self._pmtu_probe(pmtu, size, now)
                if probe is not None:
                    datagrams.append(probe)
        return datagrams

    def _pmtu_probe(
        self, pmtu: PmtuSearch, size: int, now: float
    ) -> tuple[bytes, NetworkAddress] | None:
        """One datagram of ``size`` bytes: a 1-RTT packet of PING and PADDING (RFC 9000
        14.4), sent outside congestion control so that its loss is no congestion signal."""
        network_path = self._network_paths[0]
        crypto = self._cryptos[aioquic_tls.Epoch.ONE_RTT]
        if not network_path.is_validated or not crypto.send.is_valid():
            return None
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=None,
            spin_bit=self._spin_bit,
            version=self._version,  # type: ignore[arg-type]  # set once connected
        )
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        builder.start_frame(
            QuicFrameType.PING,
            capacity=1,
            handler=self._on_pmtu_probe_delivery,
            handler_args=(size,),
        )
        builder._datagram_needs_padding = True  # PADDING frames up to the datagram's size
        datagrams, packets = builder.flush()
        if len(datagrams) != 1 or len(datagrams[0]) != size:
            return None
        self._packet_number = builder.packet_number
        space = self._spaces[aioquic_tls.Epoch.ONE_RTT]
        for packet in packets:
            packet.sent_time = now
            packet.in_flight = False  # neither counted in flight nor reported lost to CC
            self._loss.on_packet_sent(packet=packet, space=space)
        pmtu.probe_sent(size)
        return datagrams[0], network_path.addr

    def _on_pmtu_probe_delivery(self, delivery: QuicDeliveryState, size: int) -> None:
        pmtu = self.pmtu
        if pmtu is None:
            return
        if delivery == QuicDeliveryState.ACKED:
            grown = pmtu.probe_acked(size)
            if grown is not None:
                self._use_datagram_size(grown)
        else:
            pmtu.probe_lost(size)

    def _use_datagram_size(self, size: int) -> None:
        """Build datagrams of ``size`` bytes from now on (congestion control and the pacer
        count in them too)."""
        self._max_datagram_size = size
        loss = self._loss
        cc = loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):
            cc.additive_increase_factor = size
        loss._pacer._max_datagram_size = size

    def reset_datagram_size(self) -> None:
        """The path changed: back to the base size, and search again."""
        pmtu = self.pmtu
        if pmtu is not None and self._max_datagram_size != pmtu.base:
            pmtu.reset()
            self._use_datagram_size(pmtu.base)

    # -- overrides --------------------------------------------------------------------------
    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        # never send datagrams larger than the peer accepts (RFC 9000 18.2; quinn, for one,
        # advertises 1472): aioquic checks the parameter but does not apply it
        limit = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        if limit is None:
            return
        if self.pmtu is not None:
            self.pmtu.cap(limit)
        if limit < self._max_datagram_size:
            self._use_datagram_size(limit)

    def _write_stream_frame(
        self,
        builder: QuicPacketBuilder,
        space: QuicPacketSpace,
        stream: QuicStream,
        max_offset: int,
    ) -> int:
        """aioquic's, with a 4-byte length where the frame may exceed 16383 bytes."""
        sender = stream.sender
        stream_id: int = stream.stream_id  # type: ignore[assignment]  # set for every stream
        next_offset = sender.next_offset
        header = 1 + size_uint_var(stream_id) + (size_uint_var(next_offset) if next_offset else 0)
        room = builder.remaining_flight_space
        long_length = room - header - 2 > 16383
        frame_overhead = header + (4 if long_length else 2)
        previous_send_highest = sender.highest_offset
        frame = sender.get_frame(room - frame_overhead, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2  # length
        offset = frame.offset
        if offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        data = frame.data
        buf = builder.start_frame(
            frame_type,
            capacity=frame_overhead,
            handler=self._on_stream_data_delivery,
            handler_args=(stream, offset, offset + len(data), frame.fin),
        )
        buf.push_uint_var(stream_id)
        if offset:
            buf.push_uint_var(offset)
        if long_length:
            buf.push_uint32(len(data) | 0x80000000)
        else:
            buf.push_uint16(len(data) | 0x4000)
        buf.push_bytes(data)
        return sender.highest_offset - previous_send_highest

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

    def _discard_epoch(self, epoch: aioquic_tls.Epoch) -> None:
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
            _spent_state = SpentHandshakeState()
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

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        if not stream.max_stream_data_local:
            return
        stream_id: int = stream.stream_id  # type: ignore[assignment]  # set for every stream
        window = self._stream_window
        target = self.stream_consumed.get(stream_id, 0) + window
        if target - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
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


class AioquicBackend(LibraryBackend[QuicConfiguration]):
    """Builds aioquic configurations and :class:`MeshQuicConnection` objects."""

    name = "aioquic"

    def __init__(self) -> None:
        super().__init__(QuicConfiguration)

    def library_fields(self, certified: CertifiedKey, config: QuicConfig) -> dict[str, Any]:
        return {
            "certificate": certified.certificate,
            "private_key": certified.private_key,
            "congestion_control_algorithm": config.congestion_control,
        }

    def connection(
        self,
        *,
        configuration: Any,
        config: QuicConfig,
        original_dcid: bytes | None,
        retry_scid: bytes | None,
        pmtu: PmtuSearch | None,
    ) -> MeshQuicConnection:
        return MeshQuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            stream_window=config.stream_receive_window,
            connection_window=connection_window(config),
            max_streams=config.max_streams,
            connection_ids=config.connection_ids,
            pmtu=pmtu,
        )


BACKEND = AioquicBackend()

#: Room (bytes) below which a packet counts as full: a STREAM frame's header alone takes up
#: to 19, so visiting further streams for it (aioquic tries every one) would only cost time.
_FULL_PACKET_ROOM = 32


def _peek_uint_var(buf: Buffer) -> int:
    """The variable-length integer at the buffer's position, which stays where it was."""
    position = buf.tell()
    value = buf.pull_uint_var()
    buf.seek(position)
    return value
