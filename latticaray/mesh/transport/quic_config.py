"""Tunables and wire constants of the QUIC transport, and its address helpers.

:class:`QuicConfig` holds every knob of :mod:`latticaray.mesh.transport.quic` (sizes in bytes,
times in seconds) and decides the per-path choices (datagram size, pacing) from the peer's
address. The error codes are the application codes this transport puts on the wire.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from ..multiaddr import Multiaddr

__all__ = [
    "APP_ERROR_AUTH_FAILED",
    "APP_ERROR_CLOSED",
    "CONNECTION_ID_LENGTH",
    "MAX_SAFE_DATAGRAM_SIZE",
    "MAX_UDP_PAYLOAD",
    "MIN_DATAGRAM_SIZE",
    "STREAM_ERROR_ABORTED",
    "STREAM_ERROR_REFUSED",
    "QuicConfig",
    "is_loopback",
    "udp_multiaddr",
]

CONNECTION_ID_LENGTH = 8
#: The largest starting datagram size: handshake packets (long headers, CRYPTO frames) carry
#: 2-byte lengths in aioquic. Path MTU discovery grows 1-RTT datagrams past it.
MAX_SAFE_DATAGRAM_SIZE = 16384
MIN_DATAGRAM_SIZE = 1200
#: The largest UDP payload over IPv4 (65535 - 20 - 8).
MAX_UDP_PAYLOAD = 65507
#: CONNECTION_CLOSE codes: the peer failed libp2p authentication / an ordinary close.
APP_ERROR_AUTH_FAILED = 0x100
APP_ERROR_CLOSED = 0x0
#: RESET_STREAM / STOP_SENDING codes: a channel aborted / a stream refused (accept backlog).
STREAM_ERROR_ABORTED = 0x1
STREAM_ERROR_REFUSED = 0x2


@dataclass
class QuicConfig:
    """Tunables of the QUIC transport (sizes in bytes, times in seconds)."""

    #: The QUIC library: "qh3" (Rust packet core, ~7x less CPU per packet), "aioquic" (pure
    #: Python; the transport's own congestion control and path MTU search), or "auto" (qh3
    #: when installed, else aioquic). See :mod:`.quic_backend`. The environment variable
    #: ``LATTICARAY_QUIC_BACKEND`` sets the default (for the node processes a bench starts).
    backend: str = field(default_factory=lambda: os.environ.get("LATTICARAY_QUIC_BACKEND", "auto"))
    #: qh3's core runs CUBIC, which random loss holds far below a path's rate (40 ms round
    #: trips, 0.5 % loss: 0.8 MB/s; see ``loss_redundancy``). A qh3 connection that sends
    #: datagram copies, or has lost at least ``lossy_min_losses`` packets and
    #: ``lossy_loss_rate`` of those it sent, marks its peer's host lossy: connections to and
    #: from that host made in the next ``lossy_path_ttl`` seconds send copies from their first
    #: datagram (qh3 with ``loss_redundancy``) or, with copies off and backend "auto", use
    #: aioquic (its loss-tolerant "bdp" controller).
    lossy_loss_rate: float = 0.002
    lossy_min_losses: int = 20
    lossy_path_ttl: float = 600.0
    #: qh3 (off loopback): while a connection loses packets at random (at least
    #: ``redundancy_min_losses`` and ``redundancy_loss_rate`` of a measurement window, at most
    #: ``redundancy_max_loss_rate``, and no queue in its RTT), each 1-RTT datagram goes out
    #: twice, so CUBIC sees ~the square of the path's loss rate; it stops ``redundancy_hold``
    #: seconds after the last loss the copies did not hide (:mod:`.quic_redundancy`). False:
    #: never (and a lossy host gets aioquic connections, see ``lossy_loss_rate``).
    loss_redundancy: bool = True
    redundancy_loss_rate: float = 0.001
    redundancy_min_losses: int = 3
    redundancy_max_loss_rate: float = 0.1
    redundancy_hold: float = 30.0
    #: From this loss rate on, each datagram goes out three times (~the cube of the rate).
    redundancy_triple_rate: float = 0.01
    #: Every qh3 connection sends copies from its first datagram (a path known to be lossy);
    #: the transport sets it for the connections to a host marked lossy.
    redundancy_from_start: bool = False
    #: Datagram size a connection to a non-loopback address starts with (the internet's safe
    #: size is ~1200-1452); path MTU discovery raises it to what the path carries.
    max_datagram_size: int = 1350
    #: Datagram size a loopback connection starts with (at most 16384).
    loopback_max_datagram_size: int = 16384
    #: Path MTU discovery (RFC 8899): probe for larger datagrams once connected, up to what
    #: the local route's MTU allows and ``pmtu_max_datagram_size`` (aioquic); qh3 clients
    #: probe up to 1472 bytes, qh3 servers keep the starting size.
    pmtu_discovery: bool = True
    pmtu_max_datagram_size: int = MAX_UDP_PAYLOAD
    #: Receive window per stream; the most a stalled reader can have buffered per channel.
    stream_receive_window: int = 4 * 1024 * 1024
    #: Receive window per connection.
    connection_receive_window: int = 16 * 1024 * 1024
    #: ``drain()`` waits while a channel has more than this written but unacknowledged.
    write_high_water: int = 4 * 1024 * 1024
    #: Bidirectional streams (channels) a peer may open at once on one connection (aioquic;
    #: qh3 allows 100, and opening more than the peer allows fails instead of waiting).
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
    #: Read and send through qh3's batched socket I/O where installed (recvmmsg with UDP GRO,
    #: GSO sends), whichever backend drives the connections.
    batched_io: bool = True
    #: Inbound connections still handshaking at once; further Initial packets are dropped.
    max_pending_handshakes: int = 256
    #: With this many inbound handshakes pending, new clients must first prove their address
    #: with a stateless Retry round trip (RFC 9000 8.1.2) — cheap defence against spoofed floods.
    #: 0 = always, a value >= max_pending_handshakes = never.
    retry_when_pending_handshakes: int = 32
    #: All connections on this transport.
    max_connections: int = 4096
    #: "bdp" (loss-tolerant, :mod:`.quic_congestion`), or aioquic's "reno" / "cubic"
    #: (aioquic backend; qh3's core runs CUBIC).
    congestion_control: str = "bdp"
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
        size = self.loopback_max_datagram_size if is_loopback(host) else self.max_datagram_size
        return max(MIN_DATAGRAM_SIZE, min(size, MAX_SAFE_DATAGRAM_SIZE))

    def paces(self, host: str) -> bool:
        return self.pace_loopback or not is_loopback(host)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False


def udp_multiaddr(addr: tuple) -> Multiaddr:
    """``/ip4|ip6/HOST/udp/PORT/quic-v1`` of a socket address (IPv4-mapped IPv6 as ip4)."""
    host, port = addr[0], addr[1]
    family = "ip6" if ":" in host else "ip4"
    if family == "ip6" and host.startswith("::ffff:") and "." in host:
        family, host = "ip4", host[7:]
    return Multiaddr([(family, host), ("udp", port), ("quic-v1", None)])
