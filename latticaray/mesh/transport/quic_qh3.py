"""The qh3 backend of the QUIC transport, and every use of qh3's private API, pinned to its version.

qh3 keeps aioquic's sans-I/O API over a Rust packet core (packet protection, loss recovery,
congestion control, flow control, streams), so a 1350-byte packet costs a few microseconds of
CPU instead of aioquic's ~20. No other module of the package reads or writes an underscore name
of qh3; importing this one checks qh3's version and fails with a clear :class:`ImportError` on
any other than :data:`QH3_VERSION` (re-read this module against the new release, then move the
pin). What :class:`MeshQh3Connection` changes, and why:

* mutual authentication: a qh3 server never asks for the client's certificate (its TLS server
  anticipates the client's Finished). Server connections run :class:`ClientAuthServerContext`,
  our own server handshake over qh3's TLS message codecs and key schedule: it sends a
  CertificateRequest, checks the client's CertificateVerify signature with the certificate's
  key, and only then its Finished. The libp2p check of the certificate (peer ID binding) runs
  on ``HandshakeCompleted``, before any stream data is accepted, as with aioquic;
* Ed25519 peers: qh3's client leaves EdDSA out of its signature algorithms; ours offers it;
* anti-amplification (RFC 9000 8.1): before the handshake, qh3 feeds its core each packet of a
  datagram separately and so counts only the packets' bytes toward the 3x budget of an
  unvalidated client address. aioquic clients pad their Initial datagrams with zero bytes
  after the packet (846 of 1350), so a qh3 server credited 504 bytes, could not fit its first
  flight, and raised "packet builder capacity exhausted" from every transmit. Our server
  splits datagrams itself and hands trailing padding to the core with the last packet, so the
  whole datagram counts (:meth:`MeshQh3Connection._receive_handshake_datagram`);
* datagram size: a qh3 client tells servers it accepts at most 1472-byte datagrams; ours
  leaves the limit out (65527, what the transport's socket reads), so a loopback or LAN server
  is not held to it;
* receive-side backpressure: qh3's core grants flow-control credit as its events are read, so
  events are left in the core while a channel's reader is half a stream window behind
  (:meth:`MeshQh3Connection._drain_core`); the peer then stops within one more window, and the
  events are read again as the reader catches up;
* batched socket I/O (:func:`batched_udp`, qh3's binding of quinn-udp): ``recvmmsg`` with UDP
  GRO (a loopback or GRO-capable path hands over a run of datagrams in one buffer) and GSO
  sends, for the transport's UDP socket whichever backend drives the connections;
* a shorter path per datagram once connected: 1-RTT datagrams go straight to the core (qh3
  re-parses every header to split coalesced packets, needed only during the handshake), datagrams
  that arrived together enter the core in one call, and outgoing ones skip the qlog hooks.

* loss concealment: qh3's core runs CUBIC, with no setting or hook, so random loss holds a
  connection to the Mathis bound (0.5-0.8 MB/s at 40 ms round trips and 0.5-1 % loss). While a
  connection's path loses packets at random (off loopback), :meth:`MeshQh3Connection.
  datagrams_to_send` sends each 1-RTT datagram two or three times, as
  :class:`.quic_redundancy.RedundancyCore` decides; receivers drop the extra copies of a
  packet number.

qh3 has its own congestion control (CUBIC) and path MTU discovery (up to 1472 bytes, clients
only); the transport's :mod:`.quic_congestion` and :mod:`.quic_pmtu` serve the aioquic backend.
"""

from __future__ import annotations

import enum
import functools
import hmac
import operator
import os
from collections.abc import Callable
from typing import Any

import qh3
from qh3 import tls as qh3_tls
from qh3._hazmat import (
    Buffer,
    SignatureError,
    UdpSocketState,
    pull_quic_header,
    verify_with_public_key,
)
from qh3._hazmat import Certificate as X509Certificate
from qh3.quic import events as qh3_events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge

from ..tls import CertifiedKey
from .quic_backend import EventTypes, LibraryBackend, pinned_version_check
from .quic_config import QuicConfig
from .quic_pmtu import PmtuSearch
from .quic_redundancy import RedundancyCore

__all__ = [
    "BACKEND",
    "QH3_VERSION",
    "ClientAuthServerContext",
    "MeshQh3Connection",
    "Qh3Backend",
    "batched_udp",
    "check_qh3_version",
]

#: The qh3 release whose internals this module was written against.
QH3_VERSION = "2.1.0"


#: Raises ImportError unless the version it is given is the pinned qh3 release.
check_qh3_version = pinned_version_check("qh3", QH3_VERSION)
check_qh3_version(qh3.__version__)

Alg = qh3_tls.SignatureAlgorithm
Epoch = qh3_tls.Epoch
#: What a client offers for the server's CertificateVerify: qh3's list, plus Ed25519.
CLIENT_OFFERED_SIGNATURE_ALGORITHMS: tuple[int, ...] = (
    *qh3_tls.Context(is_client=True)._signature_algorithms,
    Alg.ED25519,
)
#: What our server accepts in the client's CertificateVerify (the CertificateRequest's list).
CLIENT_CERTIFICATE_SIGNATURE_ALGORITHMS: tuple[int, ...] = (
    Alg.ECDSA_SECP256R1_SHA256,
    Alg.ED25519,
    Alg.ECDSA_SECP384R1_SHA384,
    Alg.RSA_PSS_RSAE_SHA256,
    Alg.RSA_PSS_RSAE_SHA384,
    Alg.RSA_PSS_RSAE_SHA512,
)
#: Key exchange groups our server picks from the client's key shares, preferred first (no
#: HelloRetryRequest: every libp2p stack sends an X25519 or P-256 share).
SERVER_GROUPS: tuple[tuple[int, Callable[[], Any]], ...] = (
    (qh3_tls.Group.X25519, qh3_tls.X25519KeyExchange),
    (qh3_tls.Group.SECP256R1, qh3_tls.ECDHP256KeyExchange),
    (qh3_tls.Group.SECP384R1, qh3_tls.ECDHP384KeyExchange),
)
#: The largest handshake message the server accepts (a certificate chain fits many times).
MAX_HANDSHAKE_MESSAGE = 64 * 1024


class AlertCertificateRequired(qh3_tls.Alert):
    description = qh3_tls.AlertDescription.certificate_required


class AuthStep(enum.Enum):
    """Where the server's handshake stands: the message it waits for next."""

    CLIENT_HELLO = "client hello"
    CERTIFICATE = "client certificate"
    CERTIFICATE_VERIFY = "client certificate verify"
    FINISHED = "client finished"
    DONE = "done"


#: The message type and encryption level each step accepts.
_EXPECTED: dict[AuthStep, tuple[int, int]] = {
    AuthStep.CLIENT_HELLO: (qh3_tls.HandshakeType.CLIENT_HELLO, Epoch.INITIAL),
    AuthStep.CERTIFICATE: (qh3_tls.HandshakeType.CERTIFICATE, Epoch.HANDSHAKE),
    AuthStep.CERTIFICATE_VERIFY: (qh3_tls.HandshakeType.CERTIFICATE_VERIFY, Epoch.HANDSHAKE),
    AuthStep.FINISHED: (qh3_tls.HandshakeType.FINISHED, Epoch.HANDSHAKE),
}


def _signature_algorithm_for(key: Any) -> int:
    """The signature algorithm a server certificate key signs its CertificateVerify with."""
    if isinstance(key, qh3_tls.EcPrivateKey):
        curves = {256: Alg.ECDSA_SECP256R1_SHA256, 384: Alg.ECDSA_SECP384R1_SHA384}
        if key.curve_type in curves:
            return curves[key.curve_type]
    elif isinstance(key, qh3_tls.Ed25519PrivateKey):
        return Alg.ED25519
    elif isinstance(key, qh3_tls.RsaPrivateKey):
        return Alg.RSA_PSS_RSAE_SHA256
    raise qh3_tls.AlertInternalError("the server's certificate key cannot sign TLS 1.3")


def _push_certificate_request(buf: Buffer, algorithms: tuple[int, ...]) -> None:
    """A CertificateRequest (RFC 8446 4.3.2): empty context, one signature_algorithms ext."""
    buf.push_uint8(qh3_tls.HandshakeType.CERTIFICATE_REQUEST)
    with qh3_tls.push_block(buf, 3):
        qh3_tls.push_opaque(buf, 1, b"")
        with qh3_tls.push_block(buf, 2):
            with qh3_tls.push_extension(buf, qh3_tls.ExtensionType.SIGNATURE_ALGORITHMS):
                qh3_tls.push_list(buf, 2, buf.push_uint16, list(algorithms))


class ClientAuthServerContext(qh3_tls.Context):
    """A TLS 1.3 server handshake that requires and verifies the client's certificate.

    Installed on a server connection's qh3 TLS context (:func:`require_client_certificate`). It
    speaks the subset libp2p uses: a full handshake (no PSK resumption, no early data, no
    HelloRetryRequest), ALPN, and the QUIC transport parameters extension. The messages are
    built and parsed with qh3's codecs and key schedule; the order and checks are ours:

    ClientHello -> ServerHello, {EncryptedExtensions, CertificateRequest, Certificate,
    CertificateVerify, Finished} -> client's {Certificate, CertificateVerify, Finished}.
    """

    _auth_step: AuthStep
    _client_app_secret: bytes | None

    def handle_message(
        self, input_data: bytes, output_buf: dict[Epoch, Buffer], epoch: int = -1
    ) -> None:
        handlers = {
            AuthStep.CLIENT_HELLO: self._on_client_hello,
            AuthStep.CERTIFICATE: self._on_client_certificate,
            AuthStep.CERTIFICATE_VERIFY: self._on_client_certificate_verify,
            AuthStep.FINISHED: self._on_client_finished,
        }
        self._receive_buffer += input_data
        while len(self._receive_buffer) >= 4:
            pending = self._receive_buffer
            length = 4 + int.from_bytes(pending[1:4], "big")
            if length > MAX_HANDSHAKE_MESSAGE:
                raise qh3_tls.AlertDecodeError("handshake message too large")
            if len(pending) < length:
                return
            message, self._receive_buffer = pending[:length], pending[length:]
            step = self._auth_step
            expected = _EXPECTED.get(step)
            if expected is None or message[0] != expected[0]:
                raise qh3_tls.AlertUnexpectedMessage(f"unexpected message while awaiting {step}")
            if epoch >= 0 and epoch != expected[1]:
                raise qh3_tls.AlertUnexpectedMessage(f"{step} at the wrong encryption level")
            buf = Buffer(data=message)
            handlers[step](buf, output_buf)
            if not buf.eof():
                raise qh3_tls.AlertDecodeError("extra bytes at the end of a handshake message")

    def _on_client_hello(self, buf: Buffer, output_buf: dict[Epoch, Buffer]) -> None:
        hello = qh3_tls.pull_client_hello(buf)
        signature_algorithm = _signature_algorithm_for(self.certificate_private_key)
        cipher_suite = qh3_tls.negotiate(
            self._cipher_suites,
            hello.cipher_suites,
            qh3_tls.AlertHandshakeFailure("No supported cipher suite"),
            excl_fn=qh3_tls._is_grease_value,
        )
        compression_method = qh3_tls.negotiate(
            self._legacy_compression_methods,
            hello.legacy_compression_methods,
            qh3_tls.AlertHandshakeFailure("No supported compression method"),
        )
        qh3_tls.negotiate(
            [signature_algorithm],
            hello.signature_algorithms,
            qh3_tls.AlertHandshakeFailure("No supported signature algorithm"),
        )
        supported_version = qh3_tls.negotiate(
            self._supported_versions,
            hello.supported_versions,
            qh3_tls.AlertProtocolVersion("No supported protocol version"),
        )
        alpn: str = qh3_tls.negotiate(  # libp2p requires ALPN
            self._alpn_protocols or [],
            hello.alpn_protocols,
            qh3_tls.AlertHandshakeFailure("No common ALPN protocols"),
        )
        self.alpn_negotiated = alpn
        offered = dict(hello.key_share or [])
        group = next((g for g in SERVER_GROUPS if g[0] in offered), None)
        if group is None:
            raise qh3_tls.AlertHandshakeFailure("No supported key share group in ClientHello")
        exchange = group[1]()
        shared_secret = exchange.exchange(offered[group[0]])

        self.client_random = hello.random
        self.server_random = os.urandom(32)
        self.legacy_session_id = hello.legacy_session_id
        self.received_extensions = hello.other_extensions
        if self.alpn_cb:
            self.alpn_cb(alpn)  # the QUIC layer reads the transport parameters here

        schedule = self.key_schedule = qh3_tls.KeySchedule(cipher_suite)
        schedule.extract(None)
        schedule.update_hash(buf.data)
        initial, handshake = output_buf[Epoch.INITIAL], output_buf[Epoch.HANDSHAKE]
        with qh3_tls.push_message(schedule, initial):
            qh3_tls.push_server_hello(
                initial,
                qh3_tls.ServerHello(
                    random=self.server_random,
                    legacy_session_id=self.legacy_session_id,
                    cipher_suite=cipher_suite,
                    compression_method=compression_method,
                    key_share=(group[0], exchange.public_key()),
                    supported_version=supported_version,
                ),
            )
        schedule.extract(shared_secret)
        self._setup_traffic_protection(qh3_tls.Direction.ENCRYPT, Epoch.HANDSHAKE, b"s hs traffic")
        self._setup_traffic_protection(qh3_tls.Direction.DECRYPT, Epoch.HANDSHAKE, b"c hs traffic")
        with qh3_tls.push_message(schedule, handshake):
            qh3_tls.push_encrypted_extensions(
                handshake,
                qh3_tls.EncryptedExtensions(
                    alpn_protocol=self.alpn_negotiated,
                    other_extensions=self.handshake_extensions,
                ),
            )
        with qh3_tls.push_message(schedule, handshake):
            _push_certificate_request(handshake, CLIENT_CERTIFICATE_SIGNATURE_ALGORITHMS)
        with qh3_tls.push_message(schedule, handshake):
            qh3_tls.push_certificate(
                handshake,
                qh3_tls.Certificate(
                    request_context=b"",
                    certificates=[
                        (cert.public_bytes(), b"")
                        for cert in [self.certificate, *self.certificate_chain]
                        if cert is not None
                    ],
                ),
            )
        signature = self.certificate_private_key.sign(  # type: ignore[union-attr]
            schedule.certificate_verify_data(b"TLS 1.3, server CertificateVerify"),
            *qh3_tls.signature_algorithm_params(signature_algorithm),
        )
        with qh3_tls.push_message(schedule, handshake):
            qh3_tls.push_certificate_verify(
                handshake,
                qh3_tls.CertificateVerify(algorithm=signature_algorithm, signature=signature),
            )
        with qh3_tls.push_message(schedule, handshake):
            qh3_tls.push_finished(
                handshake,
                qh3_tls.Finished(verify_data=schedule.finished_verify_data(_key(self._enc_key))),
            )
        schedule.extract(None)
        self._setup_traffic_protection(qh3_tls.Direction.ENCRYPT, Epoch.ONE_RTT, b"s ap traffic")
        self._client_app_secret = schedule.derive_secret(b"c ap traffic")
        self._set_state(qh3_tls.State.SERVER_EXPECT_FINISHED)
        self._auth_step = AuthStep.CERTIFICATE

    def _on_client_certificate(self, buf: Buffer, output_buf: dict[Epoch, Buffer]) -> None:
        certificate = qh3_tls.pull_certificate(buf)
        if certificate.request_context:
            raise qh3_tls.AlertIllegalParameter("unexpected certificate request context")
        if not certificate.certificates:
            raise AlertCertificateRequired("the client sent no certificate")
        try:
            self._peer_certificate = X509Certificate(certificate.certificates[0][0])
        except Exception as exc:
            raise qh3_tls.AlertBadCertificate(f"unreadable client certificate: {exc}") from None
        self._schedule().update_hash(buf.data)
        self._auth_step = AuthStep.CERTIFICATE_VERIFY

    def _on_client_certificate_verify(self, buf: Buffer, output_buf: dict[Epoch, Buffer]) -> None:
        verify = qh3_tls.pull_certificate_verify(buf)
        if verify.algorithm not in CLIENT_CERTIFICATE_SIGNATURE_ALGORITHMS:
            raise qh3_tls.AlertIllegalParameter("a signature algorithm we did not request")
        schedule = self._schedule()
        peer = self._peer_certificate
        if peer is None:
            raise qh3_tls.AlertUnexpectedMessage("CertificateVerify without a certificate")
        try:
            verify_with_public_key(
                peer.public_key(),
                verify.algorithm,
                schedule.certificate_verify_data(b"TLS 1.3, client CertificateVerify"),
                verify.signature,
            )
        except SignatureError as exc:
            raise qh3_tls.AlertDecryptError(f"client CertificateVerify: {exc}") from None
        schedule.update_hash(buf.data)
        self._auth_step = AuthStep.FINISHED

    def _on_client_finished(self, buf: Buffer, output_buf: dict[Epoch, Buffer]) -> None:
        finished = qh3_tls.pull_finished(buf)
        schedule = self._schedule()
        expected = schedule.finished_verify_data(_key(self._dec_key))
        if not hmac.compare_digest(finished.verify_data, expected):
            raise qh3_tls.AlertDecryptError("client Finished does not verify")
        secret, self._client_app_secret = self._client_app_secret, None
        assert secret is not None
        self._dec_key = secret
        self.update_traffic_key_cb(
            qh3_tls.Direction.DECRYPT, Epoch.ONE_RTT, schedule.cipher_suite, secret
        )
        self._set_state(qh3_tls.State.SERVER_POST_HANDSHAKE)
        self._auth_step = AuthStep.DONE

    def _schedule(self) -> qh3_tls.KeySchedule:
        schedule = self.key_schedule
        if schedule is None:
            raise qh3_tls.AlertUnexpectedMessage("no handshake in progress")
        return schedule


def _key(secret: bytes | None) -> bytes:
    if secret is None:
        raise qh3_tls.AlertInternalError("a handshake traffic secret is missing")
    return secret


def require_client_certificate(context: qh3_tls.Context) -> None:
    """Turn a fresh qh3 server TLS context into a :class:`ClientAuthServerContext`."""
    if context.state != qh3_tls.State.SERVER_EXPECT_CLIENT_HELLO:
        raise ValueError("client authentication is set up before the handshake starts")
    context.__class__ = ClientAuthServerContext
    assert isinstance(context, ClientAuthServerContext)
    context._auth_step = AuthStep.CLIENT_HELLO
    context._client_app_secret = None


class _OneEventCore:
    """A connection's core that answers ``next_event`` with one given event, then None: lets
    qh3's own event handling run for one event the transport read itself."""

    __slots__ = ("_core", "_event")

    def __init__(self, core: Any, event: tuple[Any, ...]) -> None:
        self._core = core
        self._event: tuple[Any, ...] | None = event

    def next_event(self) -> tuple[Any, ...] | None:
        event, self._event = self._event, None
        return event

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


class MeshQh3Connection(QuicConnection):
    """qh3 connection with mutual authentication and read-driven receive windows."""

    backend = "qh3"
    events = EventTypes.of(qh3_events)

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        stream_window: int,
        redundancy: RedundancyCore | None = None,
        **kwargs: Any,
    ):
        super().__init__(configuration=configuration, **kwargs)
        #: Decides when 1-RTT datagrams go out twice (None: never).
        self.redundancy = redundancy
        #: Events stay in the core (no credit for the peer) while a stream has this much
        #: delivered and not yet read.
        self._hold_at = max(1, stream_window // 2)
        #: Per stream: bytes delivered as events and not yet read (or discarded).
        self._unread: dict[int, int] = {}
        #: Streams at least ``_hold_at`` behind.
        self._held: set[int] = set()

    # -- setup ---------------------------------------------------------------------------------
    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = super()._create_tls(remote_source_cid)
        context = bridge.tls
        if self._is_client:
            context.handshake_extensions = [
                (kind, _without_udp_payload_limit(data) if kind == _TRANSPORT_PARAMETERS else data)
                for kind, data in context.handshake_extensions
            ]
        else:
            require_client_certificate(context)
        return bridge

    # -- datagrams -----------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        core = self._core
        if core is not None and self._handshake_complete:
            if not data[0] & 0x80:
                # a 1-RTT packet: nothing for the handshake logic of qh3's wrapper
                self._call_core(core.receive_datagram, data, addr, now, len(data))
                self._drain_core()
                return
        elif not self._is_client:
            self._receive_handshake_datagram(data, addr, now)
            return
        super().receive_datagram(data, addr, now)

    def _receive_handshake_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """A server's datagram before the handshake completes: its packets one by one (TLS
        installs the next level's keys between coalesced packets), the last one with any
        trailing padding, so the core counts the whole datagram toward the anti-amplification
        budget (RFC 9000 8.1)."""
        cid_length = self._configuration.connection_id_length
        if self._core is None:
            try:
                header = pull_quic_header(data, 0, cid_length)
            except ValueError:
                return
            version = header[0]
            if (
                len(data) < 1200
                or header[1] != int(QuicPacketType.INITIAL)
                or version not in self._configuration.supported_versions
            ):
                return
            self._remote_addr = addr
            self._version = version
            self._create_core(addr, header[3], now)
            self._create_tls(remote_source_cid=None)
        offset, size = 0, len(data)
        while offset < size:
            end = _packet_end(data, offset, cid_length)
            if end < size and _packet_end(data, end, cid_length) == size and data[end] & 0x40 == 0:
                end = size  # what follows is padding, not a packet (fixed bit clear)
            packet = data[offset:end]
            core = self._core
            assert core is not None
            report = self._call_core(core.receive_datagram, packet, addr, now, size)
            if report[2]:
                self._learn_remote_source_cid(packet)
            self._drain_core()
            offset = end

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        core = self._core
        if core is not None and self._handshake_complete:
            self._call_core(core.receive_many_datagrams, datagrams, addr, now)
            self._drain_core()
        else:
            for data in datagrams:
                self.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        # polled to exhaustion by a C-level loop, not a Python iteration per datagram; each
        # transmit is dropped as soon as its (datagram, address) is taken
        try:
            datagrams = list(
                map(_datagram_and_address, iter(functools.partial(core.poll_transmit, now), None))
            )
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        redundancy = self.redundancy
        if redundancy is not None and datagrams and self._handshake_complete:
            if redundancy.path is None:
                redundancy.path = core.active_path[2]  # the address the handshake validated
            redundancy.sent(len(datagrams))
            if redundancy.update(now, core.loss_total, core.smoothed_rtt):
                return redundancy.with_copies(datagrams)
        return datagrams

    # -- events and receive windows ----------------------------------------------------------
    def _drain_core(self) -> None:
        """Read the core's events, leaving them there (the peer's credit with them) while a
        reader is behind; qh3's own handling runs for every event but STREAM data."""
        core = self._core
        if core is None:
            return
        queue = self._events
        unread = self._unread
        held = self._held
        hold_at = self._hold_at
        stream_data = qh3_events.StreamDataReceived
        while True:
            if held and core.state == "connected":
                return
            native = core.next_event()
            if native is None:
                return
            kind = native[0]
            if kind == "peer_closed":  # qh3 logs a warning for every close the peer sends
                self._close_event = qh3_events.ConnectionTerminated(
                    native[2], native[3], native[4].decode("utf8", "replace")
                )
                continue
            if kind != "stream_data":
                self._core = _OneEventCore(core, native)  # type: ignore[assignment]
                try:
                    super()._drain_core()
                finally:
                    if isinstance(self._core, _OneEventCore):
                        self._core = core
                continue
            stream_id, data = native[1], native[2]
            queue.append(stream_data(data, native[3], stream_id))
            behind = unread.get(stream_id, 0) + len(data)
            unread[stream_id] = behind
            if behind >= hold_at:
                held.add(stream_id)

    def track_stream(self, stream_id: int) -> None:
        self._unread.setdefault(stream_id, 0)

    def untrack_stream(self, stream_id: int) -> None:
        self._unread.pop(stream_id, None)
        self._release(stream_id)

    def consumed(self, stream_id: int, total: int, n: int) -> None:
        behind = self._unread.get(stream_id)
        if behind is not None:
            self._unread[stream_id] = behind - n
            if behind - n < self._hold_at:
                self._release(stream_id)

    def discard_stream_data(self, stream_id: int, n: int) -> None:
        behind = self._unread.get(stream_id)
        if behind is not None:
            if behind <= n:
                del self._unread[stream_id]
            else:
                self._unread[stream_id] = behind - n
        self._release(stream_id)

    def _release(self, stream_id: int) -> None:
        held = self._held
        if stream_id in held:
            held.discard(stream_id)
            if not held:
                self._drain_core()

    # -- read-only views for the connection wrapper -------------------------------------------
    @property
    def smoothed_rtt(self) -> float | None:
        core = self._core
        return None if core is None else core.smoothed_rtt

    @property
    def max_datagram_size(self) -> int:
        core = self._core
        if core is None:
            return int(self._configuration.max_datagram_size)
        return int(core.active_path[5])

    def active_path_addr(self) -> Any:
        core = self._core
        return None if core is None else core.active_path[2]

    def peer_certificate_der(self) -> bytes | None:
        cert = self.get_peercert()
        return None if cert is None else bytes(cert.public_bytes())

    def drop_peer_certificate(self) -> None:
        context = self.tls
        if context is not None:
            context._peer_certificate = None
            context._peer_certificate_chain = []

    def stream_buffered(self, stream_id: int) -> int:
        return int(self.get_send_buffer_size(stream_id))

    def unacked_total(self) -> int:
        core = self._core
        if core is None:
            return 0
        return int(self.get_send_buffer_size()) + int(core.bytes_in_flight)

    def loss_stats(self) -> tuple[int, int] | None:
        core = self._core
        if core is None:
            return None
        path = core.active_path
        return int(core.loss_total), int(path[3]) // max(1, int(path[5]))

    def conceals_loss(self) -> bool:
        redundancy = self.redundancy
        return redundancy is not None and redundancy.on

    def disable_pacing(self) -> None:
        """qh3's core paces by itself (its pacer holds nothing back on a loopback RTT). A path
        the transport does not pace (loopback: no bottleneck, no random loss) gets no
        datagram copies either."""
        self.redundancy = None

    def reset_datagram_size(self) -> None:
        """qh3's core keeps a path MTU per network path."""


_TRANSPORT_PARAMETERS = qh3_tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS
#: A transmit of the core is ``(datagram, address, ...)``.
_datagram_and_address = operator.itemgetter(0, 1)


def _packet_end(data: bytes, offset: int, cid_length: int) -> int:
    """Where the QUIC packet at ``offset`` ends (the datagram's end if it does not parse)."""
    try:
        end = int(pull_quic_header(data, offset, cid_length)[9])
    except ValueError:
        return len(data)
    return end if end > offset else len(data)


def batched_udp(fd: int) -> Any:
    """qh3's quinn-udp state for a bound UDP socket: ``recv()`` (recvmmsg + GRO, a list of
    ``(datagram, address)``, empty when nothing waits) and ``send(datagrams, address)`` (GSO;
    returns how many left, raises OSError with ``datagrams_sent``). It enables UDP GRO on the
    socket and keeps a duplicate of the descriptor until it is dropped."""
    return UdpSocketState(fd)


def _without_udp_payload_limit(data: bytes) -> bytes:
    """Transport parameters without max_udp_payload_size (qh3 clients send 1472)."""
    parameters = pull_quic_transport_parameters(Buffer(data=data))
    parameters.max_udp_payload_size = None
    buf = Buffer(capacity=len(data) + 64)
    push_quic_transport_parameters(buf, parameters)
    return bytes(buf.data)


class Qh3Backend(LibraryBackend[QuicConfiguration]):
    """Builds qh3 configurations and :class:`MeshQh3Connection` objects."""

    name = "qh3"

    def __init__(self) -> None:
        super().__init__(QuicConfiguration)

    def library_fields(self, certified: CertifiedKey, config: QuicConfig) -> dict[str, Any]:
        return {
            "probe_datagram_size": config.pmtu_discovery,
            "active_connection_id_limit": max(2, config.connection_ids),
            "signature_algorithms": list(CLIENT_OFFERED_SIGNATURE_ALGORITHMS),
            "certificate": qh3_tls.load_pem_x509_certificates(certified.certificate_pem())[0],
            "private_key": qh3_tls.load_pem_private_key(certified.private_key_pem()),
        }

    def connection(
        self,
        *,
        configuration: Any,
        config: QuicConfig,
        original_dcid: bytes | None,
        retry_scid: bytes | None,
        pmtu: PmtuSearch | None,
    ) -> MeshQh3Connection:
        redundancy = None
        if config.loss_redundancy:
            redundancy = RedundancyCore(
                on_rate=config.redundancy_loss_rate,
                max_rate=config.redundancy_max_loss_rate,
                min_losses=config.redundancy_min_losses,
                hold=config.redundancy_hold,
                triple_rate=config.redundancy_triple_rate,
                start_on=config.redundancy_from_start,
            )
        return MeshQh3Connection(
            configuration=configuration,
            stream_window=config.stream_receive_window,
            redundancy=redundancy,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
        )


BACKEND = Qh3Backend()
