"""TCP the libp2p way as a transport of the mesh node: multistream, Noise XX, yamux.

:class:`Libp2pTcpAdapter` puts :class:`~latticaray.mesh.libp2p.tcp.Libp2pTcpTransport` behind the
connection manager's :class:`~latticaray.mesh.adapters.TransportAdapter` contract, exactly as
:class:`~latticaray.mesh.adapters.QuicAdapter` does for QUIC: the dialer opens the RPC stream
``/latticaray/rpc/1`` lazily, every other yamux stream is routed by protocol
(:class:`~latticaray.mesh.adapters.InboundStreams`), and an inbound connection is registered on
its first stream (native or foreign). A js-libp2p, go-libp2p or rust-libp2p node dials a
latticaray node's ``/ip4/../tcp/..`` address and speaks to it like any libp2p peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .adapters import InboundStreams, RawConnection, TransportAdapter, open_rpc_stream
from .errors import ConnectionClosed, HandshakeError, PeerIdMismatch, PeerUnreachable
from .identity import KeyPair, PeerId
from .libp2p.connection import Libp2pConnection
from .libp2p.keys import PrivateKey
from .libp2p.stream import ProtocolRouter
from .libp2p.tcp import Libp2pTcpTransport
from .multiaddr import Multiaddr

__all__ = ["Libp2pTcpAdapter"]

log = logging.getLogger(__name__)

#: yamux stream window of mesh connections: the RPC stream carries bulk transfers (objects), so
#: it gets more than the spec's 256 KiB start.
MESH_STREAM_WINDOW = 4 * 1024 * 1024


class Libp2pTcpAdapter(TransportAdapter):
    """TCP + Noise + yamux connections for the connection manager."""

    name = "tcp"

    def __init__(
        self,
        key: KeyPair,
        on_inbound: Callable[[RawConnection], None],
        *,
        streams: ProtocolRouter | None = None,
        preamble_timeout: float = 10.0,
        stream_window: int = MESH_STREAM_WINDOW,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.local_peer = key.peer_id
        self.streams = streams if streams is not None else ProtocolRouter()
        self._on_inbound = on_inbound
        self._preamble_timeout = preamble_timeout
        self.transport = Libp2pTcpTransport(
            PrivateKey.from_keypair(key),
            self.streams,
            handshake_timeout=handshake_timeout,
            stream_window=stream_window,
            on_connection=self._on_connection,
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, addr: Multiaddr | None) -> list[Multiaddr]:
        host = addr.host if addr is not None else None
        port = addr.port if addr is not None else None
        return [await self.transport.listen(host or "127.0.0.1", port or 0)]

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None, timeout: float
    ) -> RawConnection:
        if addr.host is None or addr.port is None:
            raise PeerUnreachable(f"{addr} is not a TCP address")
        try:
            conn = await self.transport.dial(
                addr.host,
                addr.port,
                peer_id=expected_peer.to_bytes() if expected_peer is not None else None,
                timeout=timeout,
            )
        except PeerIdMismatch:
            raise
        except HandshakeError as exc:
            raise PeerUnreachable(f"libp2p upgrade with {addr} failed: {exc}") from None
        channel = open_rpc_stream(conn.new_stream(), "tcp", self.local_peer, conn)
        raw = self._raw(conn, channel)
        conn.router = InboundStreams(conn, self.streams, "tcp", self.local_peer, None, raw=raw)
        return raw

    def _raw(self, conn: Libp2pConnection, channel: object) -> RawConnection:
        return RawConnection(
            peer_id=conn.mesh_peer_id,
            channel=channel,
            transport="tcp",
            remote_addr=conn.remote_multiaddr,
            outbound=conn.outbound,
            close=lambda _reason: self._close(conn),
            on_close=lambda cb: conn.on_close(lambda _c: cb()),
            muxer=conn,
        )

    def _close(self, conn: Libp2pConnection) -> None:
        if conn.is_closed:
            return
        task = asyncio.get_running_loop().create_task(conn.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection(self, conn: Libp2pConnection) -> None:
        if conn.outbound:
            return  # dial() wires its own connection up

        def register(channel: object) -> RawConnection | None:
            raw = self._raw(conn, channel)
            self._on_inbound(raw)
            return None if conn.is_closed else raw

        inbound = InboundStreams(conn, self.streams, "tcp", self.local_peer, register)
        conn.router = inbound
        expire = inbound.close_if_silent(
            conn.wait_closed,
            self._preamble_timeout,
            lambda: self._close(conn),
            f"inbound libp2p TCP connection from {conn}",
        )
        task = asyncio.get_running_loop().create_task(expire)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        try:
            await self.transport.close()
        except ConnectionClosed:
            pass
