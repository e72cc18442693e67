"""QUIC transport: the node's QUIC endpoint, one UDP socket for every connection in and out.

Every inbound and outbound connection of a node shares the one listening UDP socket and is
demultiplexed by destination connection ID, so the address peers observe, the address AutoNAT
confirms and the port a hole punch opens are all the same mapping. ``send_raw`` sends arbitrary
datagrams from that socket (hole punching) and datagrams that are not QUIC packets for a known
connection go to ``unknown_datagram_handler``. New inbound connections are admitted here (limits
on pending handshakes and connections, stateless Retry under handshake load, version
negotiation).

Both ends authenticate with libp2p certificates (:mod:`latticaray.mesh.tls`), ALPN ``libp2p``.

The transport is split by role:

* :mod:`.quic` (this module): :class:`QuicTransport`, the endpoint and datagram demultiplexer;
* :mod:`.quic_conn`: :class:`QuicConn`, one connection (events, timers, liveness, close);
* :mod:`.quic_channel`: :class:`QuicChannel`, one stream as a Channel (backpressure both ways);
* :mod:`.quic_udp`: the UDP socket (batched reads, GSO sends);
* :mod:`.quic_config`: :class:`QuicConfig` and the wire constants;
* :mod:`.quic_backend`: the QUIC libraries that can drive the connections, and the interface;
* :mod:`.quic_qh3`: the qh3 backend (Rust packet core; the default), its overrides pinned;
* :mod:`.quic_aioquic`: the aioquic backend (pure Python; the fallback), its overrides pinned;
* :mod:`.quic_pmtu`: path MTU discovery (sans-I/O), which sizes aioquic paths' datagrams;
* :mod:`.quic_congestion`: the loss-tolerant congestion controller of aioquic connections.

The cost of QUIC here is per packet: aioquic spends about 20 us of CPU per 1350-byte packet on
each side, qh3 about 3 us sending and 1 us receiving. So the driver keeps its own share small:
the socket is drained up to ``receive_batch`` datagrams per wake-up (with qh3 installed through
``recvmmsg`` with UDP GRO, a run of datagrams per system call), a connection takes the datagrams
of one batch into its library together and answers them with one transmit, a reader gets the
STREAM data that arrived together as one piece, runs of equal-size datagrams leave in one UDP
GSO send (Linux ``UDP_SEGMENT``; plain sends where the kernel refuses it), the library's timer is
re-armed only when its deadline moves earlier, and datagrams are as large as the path carries
(aioquic probes past 1472 bytes where the local route allows, 64 KiB on loopback). With
thousands of connections in a process, full garbage collections had paused the loop for up to
~1 s, so connections keep few tracked objects: aioquic ones share one frame dispatch table and
drop their spent Initial/Handshake and TLS state, and connections alike share one configuration.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import ipaddress
import logging
import operator
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from aioquic.buffer import Buffer
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from ..errors import ConnectionClosed, PeerUnreachable
from ..identity import KeyPair, PeerId
from ..multiaddr import Multiaddr
from ..tls import CertifiedKey, make_certified_key
from .quic_backend import QuicBackend, QuicEngine
from .quic_channel import QuicChannel
from .quic_config import CONNECTION_ID_LENGTH, MIN_DATAGRAM_SIZE, QuicConfig, udp_multiaddr
from .quic_conn import EndpointLink, QuicConn, now
from .quic_loader import load_backend
from .quic_pmtu import PmtuSearch
from .quic_udp import UdpSocket, open_udp_socket, route_max_payload

if TYPE_CHECKING:
    from aioquic.quic.retry import QuicRetryTokenHandler

__all__ = ["QuicChannel", "QuicConfig", "QuicConn", "QuicTransport"]

_data_of = operator.itemgetter(0)
_address_of = operator.itemgetter(1)
_first_byte = operator.itemgetter(0)
#: A short-header packet's destination connection ID: the bytes after its first byte.
_short_header_dcid = operator.itemgetter(slice(1, 1 + CONNECTION_ID_LENGTH))

log = logging.getLogger(__name__)


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
        #: The QUIC library the connections run on (:mod:`.quic_backend`).
        self.backend: QuicBackend = load_backend(self.config.backend)
        self._retry_handler: QuicRetryTokenHandler | None = None  # made on first use
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: EndpointLink | None = None
        self._udp: UdpSocket | None = None
        self._by_cid: dict[bytes, QuicConn] = {}
        self._conns: set[QuicConn] = set()
        self._tick_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._local: tuple | None = None
        self._configurations: dict[tuple[str, bool, int], object] = {}
        #: Hosts whose paths lost packets (host -> until when): later connections use aioquic.
        self._lossy: dict[str, float] = {}
        #: Connections that datagrams of the current read batch went to (flushed at its end).
        self._touched: list[QuicConn] = []
        self.stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle ------------------------------------------------------------------------------
    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Multiaddr:
        """Bind the one UDP socket; returns its ``/ip4|ip6/../udp/../quic-v1`` address."""
        if self._udp is not None:
            raise RuntimeError("QUIC transport is already bound")
        self._loop = loop = asyncio.get_running_loop()
        sock = open_udp_socket(host, port, self.config.socket_buffer_bytes)
        self._local = sock.getsockname()
        self._link = EndpointLink(
            loop=loop,
            context=contextvars.Context(),
            local_peer=self.key.peer_id,
            config=self.config,
            send_datagrams=self._send_datagrams,
            register_cid=self._register_cid,
            received=self._touched.append,
            unregister_cid=self._unregister_cid,
            forget=self._forget,
            established=self._on_established,
            background=self._background,
        )
        self._udp = UdpSocket(
            self._loop,
            sock,
            self._datagram_received,
            self.config.receive_batch,
            self._batch_received,
            self.config.send_queue_datagrams,
            self.config.udp_gso,
            self.config.batched_io,
            self._datagrams_received,
        )
        self._tick_task = self._loop.create_task(self._tick_loop())
        return self.listen_addr

    @property
    def listen_addr(self) -> Multiaddr:
        if self._local is None:
            raise RuntimeError("QUIC transport is not bound")
        return udp_multiaddr(self._local)

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
        loop, link = self._loop, self._link
        if self._udp is None or loop is None or link is None:
            raise RuntimeError("QUIC transport must listen() before dialing (one shared socket)")
        if len(self._conns) >= self.config.max_connections:
            raise PeerUnreachable("QUIC connection limit reached")
        host = target[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            infos = await loop.getaddrinfo(host, target[1], type=socket.SOCK_DGRAM)
            if not infos:
                raise PeerUnreachable(f"cannot resolve {host}") from None
            target = (str(infos[0][4][0]), int(infos[0][4][1]))
        if self._local is not None and len(self._local) == 4 and ":" not in target[0]:
            target = ("::ffff:" + target[0], target[1])  # IPv6 socket dialing IPv4
        quic = self._make_connection(is_client=True, remote=target)
        conn = QuicConn(link, quic, target, is_client=True, expected_peer=expected_peer)
        self._conns.add(conn)
        self._register_cid(quic.host_cid, conn)
        conn.cids.add(quic.host_cid)
        conn.connect()
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

    def _retry(self) -> QuicRetryTokenHandler:
        """The stateless Retry token handler, made the first time a Retry is sent or a token
        checked (importing it costs ~0.1 s of CPU: aioquic's TLS module and its dependencies,
        which a node on the qh3 backend that is never under handshake load does not need)."""
        if self._retry_handler is None:
            from aioquic.quic.retry import QuicRetryTokenHandler

            self._retry_handler = QuicRetryTokenHandler()
        return self._retry_handler

    def _make_connection(
        self,
        *,
        is_client: bool,
        remote: tuple,
        original_dcid: bytes | None = None,
        retry_scid: bytes | None = None,
    ) -> QuicEngine:
        cfg = self.config
        host = remote[0].removeprefix("::ffff:")
        size = cfg.datagram_size_for(host)
        backend, primed = self._backend_for(remote[0])
        # the libraries only read their configuration: connections alike share one
        key = (backend.name, is_client, size)
        configuration = self._configurations.get(key)
        if configuration is None:
            configuration = self._configurations[key] = backend.configuration(
                is_client=is_client, max_datagram_size=size, certified=self._certified, config=cfg
            )
        quic = backend.connection(
            configuration=configuration,
            config=dataclasses.replace(cfg, redundancy_from_start=True) if primed else cfg,
            original_dcid=original_dcid,
            retry_scid=retry_scid,
            pmtu=self._pmtu_search(remote, size),
        )
        if not cfg.paces(host):
            quic.disable_pacing()
        return quic

    def _backend_for(self, host: str) -> tuple[QuicBackend, bool]:
        """The backend of a new connection to ``host``, and whether it sends datagram copies
        from its first datagram. A host whose path lost packets lately gets qh3 connections
        that do (``loss_redundancy``) or, with copies switched off and backend "auto", aioquic
        (its loss-tolerant "bdp" controller); other hosts the transport's backend."""
        until = self._lossy.get(host)
        if until is not None and until <= now():
            del self._lossy[host]
            until = None
        if until is None:
            return self.backend, False
        if self.backend.name == "qh3" and self.config.loss_redundancy:
            return self.backend, True
        if self.config.backend == "auto":
            try:
                return load_backend("aioquic"), False
            except ImportError:
                pass
        return self.backend, False

    def _note_path_loss(self, conn: QuicConn) -> None:
        """Mark the peer's host lossy when this qh3 connection lost enough of its packets or
        sends copies of its datagrams (it measured random loss)."""
        cfg = self.config
        stats = conn.loss_stats()
        if stats is None:
            return
        lost, sent = stats
        if conn.conceals_loss() or (
            lost >= cfg.lossy_min_losses and lost >= cfg.lossy_loss_rate * sent
        ):
            host = conn.addr[0]
            if host not in self._lossy:
                self.stats["lossy_paths"] += 1
                log.info(
                    "QUIC: %d of ~%d packets to %s lost; its next connections are made for a "
                    "lossy path",
                    lost,
                    sent,
                    host,
                )
            self._lossy[host] = now() + cfg.lossy_path_ttl

    def _pmtu_search(self, remote: tuple, base: int) -> PmtuSearch | None:
        """Path MTU discovery from ``base`` up to what the local route carries."""
        cfg = self.config
        if not cfg.pmtu_discovery:
            return None
        ceiling = min(cfg.pmtu_max_datagram_size, route_max_payload(remote) or base)
        return PmtuSearch(base, ceiling) if ceiling > base else None

    def _forget(self, conn: QuicConn) -> None:
        self._conns.discard(conn)
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.cids.clear()

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

    def _datagrams_received(self, received: list[tuple[bytes, tuple]]) -> None:
        """One read of the socket. A run of 1-RTT datagrams from one address to one connection
        (what a loopback or LAN bulk transfer reads) goes to it whole, checked and taken apart
        by C-level maps instead of a Python call per datagram; anything else one by one."""
        if len(received) > 1 and len(set(map(_address_of, received))) == 1:
            datas = list(map(_data_of, received))
            if min(map(len, datas)) > CONNECTION_ID_LENGTH:
                firsts = set(map(_first_byte, datas))  # header protection varies the low bits
                cids = set(map(_short_header_dcid, datas))
                if len(cids) == 1 and min(firsts) >= 0x40 and max(firsts) <= 0x7F:
                    conn = self._by_cid.get(cids.pop())
                    if conn is not None:
                        conn.datagrams_received(datas, received[0][1])
                        return
        for data, addr in received:
            self._datagram_received(data, addr)

    def _datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) > CONNECTION_ID_LENGTH and data[0] & 0xC0 == 0x40:
            # a short-header (1-RTT) packet: its destination connection ID follows the first
            # byte; the connection parses the header itself, once
            conn = self._by_cid.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if conn is None:
                self._unknown(data, addr)
            else:
                conn.datagram_received(data, addr)
            return
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
            versions = self.backend.supported_versions
            if header.version is not None and header.version not in versions:
                self._sendto(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=list(versions),
                    ),
                    addr,
                )
                return
            conn = self._accept(header, addr, len(data))
            if conn is None:
                return
        conn.datagram_received(data, addr)

    def _accept(self, header: QuicHeader, addr: tuple, size: int) -> QuicConn | None:
        link, version = self._link, header.version
        if link is None or version is None or not self.accept_inbound or size < MIN_DATAGRAM_SIZE:
            self.stats["initial_dropped"] += 1
            return None
        pending = sum(1 for c in self._conns if c.is_handshaking)
        if (
            pending >= self.config.max_pending_handshakes
            or len(self._conns) >= self.config.max_connections
        ):
            self.stats["initial_dropped"] += 1
            return None
        dcid = header.destination_cid
        original_dcid, retry_scid = dcid, None
        validated = False
        if header.token:
            # a token we cannot validate is treated as no token (RFC 9000 8.1.3): it may be a
            # NEW_TOKEN token another server gave the client; libp2p clients use one server
            # name for every peer, so quinn (js-libp2p, rust-libp2p) offers another peer's
            # tokens to us. Dropping such an Initial would fail every dial of theirs until
            # their token store runs dry.
            try:
                original_dcid = self._retry().validate_token(
                    address=addr, destination_cid=dcid, token=header.token, now=now()
                )
                retry_scid, validated = dcid, True
            except ValueError:
                self.stats["retry_token_invalid"] += 1
        if not validated and pending >= self.config.retry_when_pending_handshakes:
            retry_cid = os.urandom(CONNECTION_ID_LENGTH)
            self._sendto(
                encode_quic_retry(
                    version=version,
                    source_cid=retry_cid,
                    destination_cid=header.source_cid,
                    original_destination_cid=dcid,
                    retry_token=self._retry().create_token(
                        address=addr,
                        original_destination_connection_id=dcid,
                        retry_source_connection_id=retry_cid,
                        now=now(),
                    ),
                ),
                addr,
            )
            self.stats["retries_sent"] += 1
            return None
        quic = self._make_connection(
            is_client=False, remote=addr, original_dcid=original_dcid, retry_scid=retry_scid
        )
        conn = QuicConn(link, quic, addr, is_client=False, expected_peer=None)
        self._conns.add(conn)
        for cid in (dcid, quic.host_cid):
            self._register_cid(cid, conn)
            conn.cids.add(cid)
        self.stats["accepted"] += 1
        return conn

    def _batch_received(self) -> None:
        """The socket's read batch is over: each connection takes its datagrams in one go."""
        touched = self._touched
        while touched:
            conn = touched.pop()
            try:
                conn.flush_received()
            except Exception:
                log.exception("QUIC: error handling datagrams of %r", conn)

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
            at = now()
            for conn in list(self._conns):
                try:
                    conn.tick(at)
                    self._note_path_loss(conn)
                except Exception:
                    log.exception("QUIC tick failed for %r", conn)
