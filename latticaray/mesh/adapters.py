"""Transport adapters: what the connection manager needs of each transport.

A :class:`TransportAdapter` listens and dials; each connection it authenticates is handed over as a
:class:`RawConnection`: a peer ID, a :class:`~latticaray.mesh.channel.Channel` for the RPC
session (``None`` for a foreign libp2p peer, which speaks no latticaray RPC), and a way to close.

Multiplexed transports (QUIC, and TCP the libp2p way: :mod:`latticaray.mesh.tcpnoise`) speak
libp2p on every stream: each is negotiated with multistream-select. The RPC session runs on one
long-lived stream, ``/latticaray/rpc/1``, that the dialer opens at once with *lazy* negotiation
(header, proposal and the first RPC bytes leave together; the echo is checked on the first read,
so the fast path costs no extra round trip). Every other stream is routed by protocol
(:class:`InboundStreams`) to the node's libp2p handlers (identify, ping, Kademlia, Bitswap, ...),
and ``RawConnection.muxer`` opens outbound ones. An inbound connection is registered with the
manager on its first stream: ``/latticaray/rpc/1`` makes it a latticaray (*native*) connection,
any other protocol a *foreign* one (a js-libp2p, go or rust peer; an RPC stream arriving later
is attached); one that negotiates no stream within ``preamble_timeout`` is closed. A dialed
peer that answers ``na`` to ``/latticaray/rpc/1`` is foreign too: its connection stays, only
its RPC session is closed (:class:`RpcRefused`).

:class:`StreamAdapter` wraps the TCP+TLS and Unix transports, whose connections are one channel
each (latticaray peers only). Other transports (NAT traversal's relay circuits) implement
:class:`TransportAdapter` themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConnectionClosed, MeshError
from .identity import KeyPair, PeerId
from .libp2p.errors import MultistreamError, ProtocolNotSupported, StreamReset
from .libp2p.multistream import MultistreamCore, MultistreamRole
from .libp2p.stream import (
    DEFAULT_NEGOTIATION_TIMEOUT,
    MuxedConnection,
    MuxedStream,
    ProtocolRouter,
    StreamHandler,
    serve_inbound,
)
from .multiaddr import Multiaddr
from .quicstreams import QuicMuxedConnection, QuicStream

__all__ = [
    "RPC_PROTOCOL",
    "InboundStreams",
    "NoRpcChannel",
    "QuicAdapter",
    "RawConnection",
    "RpcChannel",
    "RpcRefused",
    "StreamAdapter",
    "TransportAdapter",
    "make_stream_adapter",
    "open_quic_rpc",
    "open_rpc_stream",
]

log = logging.getLogger(__name__)

#: The protocol of the RPC session's stream (multistream-select negotiated).
RPC_PROTOCOL = "/latticaray/rpc/1"


class RpcRefused(ConnectionClosed):
    """The peer answered ``na`` to ``/latticaray/rpc/1``: a foreign libp2p peer."""


@dataclass
class RawConnection:
    """An authenticated transport connection, before the manager wraps it in an RPC session.

    ``channel`` is None for a foreign peer (no RPC); ``muxer`` opens libp2p streams on
    multiplexed transports (None on single-channel ones). The manager sets ``attach_rpc``: an
    adapter calls it with the channel of an RPC stream that arrives after registration."""

    peer_id: PeerId
    channel: object
    transport: str
    remote_addr: Multiaddr | None
    outbound: bool
    close: Callable[[str], None]
    on_close: Callable[[Callable[[], None]], None] | None = None
    muxer: MuxedConnection | None = None
    attach_rpc: Callable[[object], None] | None = field(default=None, repr=False)


class TransportAdapter:
    """What the manager needs of a transport."""

    name = "?"

    def can_listen(self, addr: Multiaddr) -> bool:
        return addr.transport == self.name

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.transport == self.name

    async def listen(self, addr: Multiaddr | None) -> list[Multiaddr]:
        """Listen on ``addr`` (None: the transport's default, e.g. the Unix socket path)."""
        raise NotImplementedError

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- the RPC session's channel over a negotiated stream ------------------------------------------


class RpcChannel:
    """The :class:`~latticaray.mesh.channel.Channel` of an RPC session on a libp2p stream.

    On QUIC the stream's own :class:`~latticaray.mesh.transport.quic_channel.QuicChannel` does
    the work once negotiation is over (its methods are bound onto this object: no extra layer
    on the hot path); on yamux writes are queued and sent by ``drain``. ``negotiated`` resolves
    True when the peer selected ``/latticaray/rpc/1``, False when it refused it."""

    def __init__(
        self,
        stream: MuxedStream,
        *,
        transport: str,
        local_peer: PeerId,
        remote_peer: PeerId,
        remote_addr: Multiaddr | None,
    ) -> None:
        self.stream = stream
        self.transport = transport
        self.local_peer = local_peer
        self.remote_peer = remote_peer
        self.remote_addr = remote_addr
        self.refused = False
        self.negotiated: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        stream.timeout = None  # the session's own deadlines and liveness apply
        self._out: list[bytes] = []
        self._closing = False
        self._quic = stream.channel if isinstance(stream, QuicStream) else None
        if self._quic is not None:
            self.write = self._quic.write  # type: ignore[method-assign]
            self.drain = self._quic.drain  # type: ignore[method-assign]
            self.abort = self._quic.abort  # type: ignore[method-assign]
        if not stream.negotiating:
            self._settle(True)

    def _settle(self, ok: bool) -> None:
        if not self.negotiated.done():
            self.negotiated.set_result(ok)

    async def read(self, max_bytes: int) -> bytes:
        stream = self.stream
        if stream.negotiating:
            try:
                await stream.finish_negotiation(DEFAULT_NEGOTIATION_TIMEOUT)
            except ProtocolNotSupported:
                self.refused = True
                self._settle(False)
                raise RpcRefused(f"{self.remote_peer} does not speak {RPC_PROTOCOL}") from None
            except (MultistreamError, TimeoutError) as exc:
                self._settle(False)
                raise ConnectionClosed(f"{RPC_PROTOCOL} negotiation failed: {exc}") from None
            self._settle(True)
        data = await stream.read(max_bytes)
        if self._quic is not None and not stream.negotiating and not stream.has_pushback:
            self.read = self._quic.read  # type: ignore[method-assign]
        return data

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise ConnectionClosed("write on a closed RPC stream")
        if data:
            self._out.append(bytes(data))

    async def drain(self) -> None:
        if self._out:
            out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            try:
                await self.stream.write(out)
            except StreamReset as exc:
                raise ConnectionClosed(str(exc)) from None

    def close(self) -> None:
        if self._quic is not None:
            self._quic.close()
            return
        if self._closing:
            return
        self._closing = True
        asyncio.get_running_loop().create_task(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        try:
            await self.drain()
            await self.stream.close_write()
        except (ConnectionClosed, TimeoutError):
            self.stream.reset()

    def abort(self) -> None:
        self._closing = True
        self._out.clear()
        self.stream.reset()

    @property
    def is_closed(self) -> bool:
        if self._quic is not None:
            return bool(self._quic.is_closed)
        return self._closing or getattr(self.stream, "is_reset", False)


class NoRpcChannel:
    """The channel of a foreign connection's RPC session: closed before it opens, saying why."""

    transport = "none"

    def __init__(self, local_peer: PeerId, remote_peer: PeerId, remote_addr: Multiaddr | None):
        self.local_peer = local_peer
        self.remote_peer = remote_peer
        self.remote_addr = remote_addr

    async def read(self, max_bytes: int) -> bytes:
        raise RpcRefused(f"{self.remote_peer} is a libp2p peer without {RPC_PROTOCOL}")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RpcRefused(f"{self.remote_peer} is a libp2p peer without {RPC_PROTOCOL}")

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None

    is_closed = True


def open_rpc_stream(
    stream: MuxedStream, transport: str, local_peer: PeerId, conn: MuxedConnection
) -> RpcChannel:
    """Start the lazy ``/latticaray/rpc/1`` negotiation on a new outbound stream."""
    core = MultistreamCore(MultistreamRole.INITIATOR, [RPC_PROTOCOL], lazy=True)
    stream.start_negotiation(core, lazy_protocol=RPC_PROTOCOL)
    return RpcChannel(
        stream,
        transport=transport,
        local_peer=local_peer,
        remote_peer=conn.mesh_peer_id,
        remote_addr=conn.remote_multiaddr,
    )


# -- inbound streams of a multiplexed connection -------------------------------------------------


class InboundStreams:
    """Routes the streams a peer opens on one multiplexed connection.

    ``/latticaray/rpc/1`` goes to the RPC session (one per connection); every other protocol to
    the node's :class:`~latticaray.mesh.libp2p.stream.ProtocolRouter`. On an inbound connection
    the first stream decides how the connection is registered (``register(channel or None)``):
    native when it is the RPC stream, foreign otherwise (a connection that negotiates no
    stream in time is closed by its adapter)."""

    def __init__(
        self,
        muxer: MuxedConnection,
        router: ProtocolRouter,
        transport: str,
        local_peer: PeerId,
        register: Callable[[object], RawConnection | None] | None,
        raw: RawConnection | None = None,
    ) -> None:
        self.muxer = muxer
        self.router = router
        self.transport = transport
        self.local_peer = local_peer
        self._register = register
        self.raw = raw  # set once registered (at once for connections we dialed)
        self._refused = False

    @property
    def protocols(self) -> list[str]:
        return [RPC_PROTOCOL, *self.router.protocols]

    def handler(self, protocol: str) -> StreamHandler | None:
        if protocol == RPC_PROTOCOL:
            return self._rpc
        handler = self.router.handler(protocol)
        if handler is None:
            return None

        async def run(stream: MuxedStream) -> None:
            if self._ensure_registered(None):
                await handler(stream)
            else:
                stream.reset()

        return run

    async def serve(self, stream: MuxedStream) -> None:
        await serve_inbound(stream, self.protocols, self.handler, self.muxer.remote_peer_text)

    async def close_if_silent(
        self,
        closed: Callable[[], Awaitable[object]],
        timeout: float,
        close: Callable[[], object],
        what: str,
    ) -> None:
        """An inbound connection's guard (every adapter's): if it is not ``closed()`` within
        ``timeout`` s and its peer negotiated no stream by then, ``close()`` it."""
        try:
            await asyncio.wait_for(closed(), timeout)
        except TimeoutError:
            if self.raw is None:
                log.info("%s opened no stream", what)
                close()

    def _ensure_registered(self, channel: object) -> bool:
        if self.raw is not None or self._refused:
            return not self._refused
        assert self._register is not None
        self.raw = self._register(channel)
        if self.raw is None:  # refused by the manager (limit, shutting down)
            self._refused = True
        return not self._refused

    async def _rpc(self, stream: MuxedStream) -> None:
        channel = RpcChannel(
            stream,
            transport=self.transport,
            local_peer=self.local_peer,
            remote_peer=self.muxer.mesh_peer_id,
            remote_addr=self.muxer.remote_multiaddr,
        )
        if self.raw is None:
            self._ensure_registered(channel)
            return
        if self.raw.channel is None and self.raw.attach_rpc is not None:
            self.raw.channel = channel
            self.raw.attach_rpc(channel)
            return
        log.debug("%s opened a second RPC stream; reset", self.muxer.remote_peer_text)
        stream.reset()


# -- QUIC ----------------------------------------------------------------------------------------


def quic_raw_connection(
    conn: Any, muxer: QuicMuxedConnection, channel: object, outbound: bool
) -> RawConnection:
    """The :class:`RawConnection` of an authenticated QUIC connection."""
    return RawConnection(
        peer_id=conn.remote_peer,
        channel=channel,
        transport="quic",
        remote_addr=conn.remote_addr,
        outbound=outbound,
        close=conn.close,
        on_close=lambda cb: conn.on_close(lambda _c: cb()),
        muxer=muxer,
    )


def open_quic_rpc(conn: Any, router: ProtocolRouter | None = None) -> RawConnection:
    """Open the RPC stream (lazily negotiated) on an authenticated QUIC connection we dialed
    (or punched), and serve the streams the peer opens with ``router``'s protocols."""
    muxer = QuicMuxedConnection(conn)
    channel = open_rpc_stream(muxer.new_stream(), "quic", conn.local_peer, muxer)
    raw = quic_raw_connection(conn, muxer, channel, outbound=True)
    inbound = InboundStreams(
        muxer, router or ProtocolRouter(), "quic", conn.local_peer, None, raw=raw
    )
    muxer.accept_loop(inbound.serve)
    conn.on_close(lambda _c: muxer.close())
    return raw


class QuicAdapter(TransportAdapter):
    """QUIC: one shared UDP socket; libp2p streams, the RPC session on one of them."""

    name = "quic"

    def __init__(
        self,
        transport,
        on_inbound: Callable[[RawConnection], None],
        preamble_timeout: float = 10.0,
        *,
        streams: ProtocolRouter | None = None,
    ) -> None:
        self.transport = transport  # latticaray.mesh.transport.quic.QuicTransport
        self._on_inbound = on_inbound
        self._preamble_timeout = preamble_timeout
        self.streams = streams if streams is not None else ProtocolRouter()
        self._tasks: set[asyncio.Task] = set()
        transport.on_connection = self._on_connection

    async def listen(self, addr: Multiaddr | None) -> list[Multiaddr]:
        if addr is None:
            addr = Multiaddr.parse("/ip4/127.0.0.1/udp/0/quic-v1")
        if self.transport.local_address is not None:
            raise MeshError(
                "QUIC listens on one UDP socket per node; a second quic address "
                f"({addr}) is not supported"
            )
        bound = await self.transport.listen(addr.host or "127.0.0.1", addr.port or 0)
        return [bound]

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        conn = await self.transport.dial(addr.without_peer(), expected_peer, timeout)
        return open_quic_rpc(conn, self.streams)

    def _on_connection(self, conn) -> None:
        if conn.is_client:
            return
        muxer = QuicMuxedConnection(conn)
        conn.on_close(lambda _c: muxer.close())

        def register(channel: object) -> RawConnection | None:
            raw = quic_raw_connection(conn, muxer, channel, outbound=False)
            self._on_inbound(raw)
            return None if conn.is_closed else raw

        inbound = InboundStreams(muxer, self.streams, "quic", conn.local_peer, register)
        muxer.accept_loop(inbound.serve)
        expire = inbound.close_if_silent(
            conn.wait_closed,
            self._preamble_timeout,
            lambda: conn.close("no stream negotiated in time"),
            f"inbound QUIC connection from {conn.remote_peer}",
        )
        task = asyncio.get_running_loop().create_task(expire)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.transport.close()


class StreamAdapter(TransportAdapter):
    """TCP+TLS or Unix socket transports: each connection is one authenticated StreamChannel."""

    def __init__(self, name: str, transport, on_inbound: Callable[[RawConnection], None]) -> None:
        self.name = name
        self.transport = transport
        self._on_inbound = on_inbound

    async def listen(self, addr: Multiaddr | None) -> list[Multiaddr]:
        """Listen on ``addr``; for unix, ``None`` lets the transport pick its default path."""
        if self.name == "unix":
            path = addr.unix_path if addr is not None else None
            bound = await self.transport.listen(path, on_channel=self._inbound)
        else:
            host = addr.host if addr is not None else None
            port = addr.port if addr is not None else None
            bound = await self.transport.listen(
                host or "127.0.0.1", port or 0, on_channel=self._inbound
            )
        return [bound]

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        if self.name == "unix":
            channel = await self.transport.dial(addr.unix_path, expected_peer, timeout=timeout)
        else:
            channel = await self.transport.dial(
                addr.host, addr.port, expected_peer, timeout=timeout
            )
        return self._raw(channel, outbound=True, addr=addr.without_peer())

    def _raw(self, channel, outbound: bool, addr: Multiaddr | None = None) -> RawConnection:
        return RawConnection(
            peer_id=channel.remote_peer,
            channel=channel,
            transport=self.name,
            remote_addr=channel.remote_addr or addr,
            outbound=outbound,
            close=lambda _reason: channel.close(),
        )

    def _inbound(self, channel) -> None:
        self._on_inbound(self._raw(channel, outbound=False))

    async def close(self) -> None:
        await self.transport.close()


def make_stream_adapter(
    name: str,
    key: KeyPair,
    certified: object,
    on_inbound: Callable[[RawConnection], None],
    options: dict[str, Any],
) -> TransportAdapter | None:
    """The TCP+TLS or Unix adapter, if that transport module is available (else None)."""
    transport: Any
    try:
        if name == "tcp":
            from .transport.tcp import TcpTransport

            transport = TcpTransport(key, **(options or {}))
        else:
            from .transport.unix import UnixTransport

            transport = UnixTransport(key, **(options or {}))
    except ImportError:
        log.info("%s transport is not available", name)
        return None
    return StreamAdapter(name, transport, on_inbound)
