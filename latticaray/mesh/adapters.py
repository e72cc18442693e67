"""Transport adapters: what the connection manager needs of each transport.

A :class:`TransportAdapter` listens and dials; each connection it authenticates is handed over as a
:class:`RawConnection`: a peer ID, a :class:`~latticaray.mesh.channel.Channel` for the RPC
session, and a way to close. :class:`QuicAdapter` runs the RPC session on one QUIC stream opened
by the dialer (which writes :data:`RPC_PROTOCOL_PREAMBLE` first); :class:`StreamAdapter` wraps the
TCP+TLS and Unix transports, whose connections are one channel each. Other transports (NAT
traversal's relay circuits) implement :class:`TransportAdapter` themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConnectionClosed, HandshakeError, MeshError
from .identity import KeyPair, PeerId
from .multiaddr import Multiaddr

__all__ = [
    "RPC_PROTOCOL_PREAMBLE",
    "QuicAdapter",
    "RawConnection",
    "StreamAdapter",
    "TransportAdapter",
    "make_stream_adapter",
    "open_quic_rpc",
    "quic_raw_connection",
]

log = logging.getLogger(__name__)

RPC_PROTOCOL_PREAMBLE = b"\x11/latticaray/rpc/1"


@dataclass
class RawConnection:
    """An authenticated transport connection, before the manager wraps it in an RPC session."""

    peer_id: PeerId
    channel: object
    transport: str
    remote_addr: Multiaddr | None
    outbound: bool
    close: Callable[[str], None]
    on_close: Callable[[Callable[[], None]], None] | None = None


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


def quic_raw_connection(conn: Any, channel: Any, outbound: bool) -> RawConnection:
    """The :class:`RawConnection` of an authenticated QUIC connection whose RPC stream is
    ``channel``."""
    return RawConnection(
        peer_id=conn.remote_peer,
        channel=channel,
        transport="quic",
        remote_addr=conn.remote_addr,
        outbound=outbound,
        close=conn.close,
        on_close=lambda cb: conn.on_close(lambda _c: cb()),
    )


def open_quic_rpc(conn: Any) -> RawConnection:
    """Open the RPC stream on an authenticated QUIC connection we dialed (or punched) and
    announce the protocol on it (:data:`RPC_PROTOCOL_PREAMBLE`)."""
    channel = conn.open_channel()
    channel.write(RPC_PROTOCOL_PREAMBLE)
    return quic_raw_connection(conn, channel, outbound=True)


class QuicAdapter(TransportAdapter):
    """QUIC: one shared UDP socket; the RPC session runs on one stream opened by the dialer."""

    name = "quic"

    def __init__(
        self, transport, on_inbound: Callable[[RawConnection], None], preamble_timeout: float = 10.0
    ) -> None:
        self.transport = transport  # latticaray.mesh.transport.quic.QuicTransport
        self._on_inbound = on_inbound
        self._preamble_timeout = preamble_timeout
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
        return open_quic_rpc(conn)

    def _on_connection(self, conn) -> None:
        if not conn.is_client:
            task = asyncio.get_running_loop().create_task(self._accept(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accept(self, conn) -> None:
        try:
            channel = await asyncio.wait_for(conn.accept_channel(), self._preamble_timeout)
            preamble = bytearray()
            while len(preamble) < len(RPC_PROTOCOL_PREAMBLE):
                chunk = await asyncio.wait_for(
                    channel.read(len(RPC_PROTOCOL_PREAMBLE) - len(preamble)),
                    self._preamble_timeout,
                )
                if not chunk:
                    raise ConnectionClosed("stream ended before the protocol preamble")
                preamble += chunk
            if bytes(preamble) != RPC_PROTOCOL_PREAMBLE:
                raise HandshakeError(f"unexpected protocol preamble {bytes(preamble)[:32]!r}")
        except (TimeoutError, ConnectionClosed, HandshakeError) as exc:
            log.info(
                "inbound QUIC connection from %s dropped: %s", conn.remote_peer, exc or "timeout"
            )
            conn.close("no rpc stream")
            return
        self._on_inbound(quic_raw_connection(conn, channel, outbound=False))

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
