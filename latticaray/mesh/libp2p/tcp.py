"""TCP the libp2p way: dial and listen, each connection upgraded with Noise and yamux.

:class:`Libp2pTcpTransport` owns a listener and the connections it made or accepted; every
connection goes through :func:`~latticaray.mesh.libp2p.connection.upgrade` with the transport's
identity and :class:`ProtocolRouter`. Inbound upgrades are bounded in number and time, so a peer
that connects and says nothing costs one slot for at most the handshake timeout.

This stands beside :mod:`latticaray.mesh.transport.tcp` (TLS over TCP between latticaray
peers); it is what a js-libp2p, go-libp2p or rust-libp2p node dials over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..errors import ConnectionClosed, HandshakeError, PeerUnreachable, ProtocolViolation
from ..multiaddr import Multiaddr
from .connection import DEFAULT_HANDSHAKE_TIMEOUT, Libp2pConnection, ProtocolRouter, upgrade
from .keys import PrivateKey

__all__ = ["Libp2pTcpTransport"]

log = logging.getLogger(__name__)

ConnectionCallback = Callable[[Libp2pConnection], Awaitable[None] | None]


class Libp2pTcpTransport:
    """Dials and accepts libp2p TCP connections (multistream, Noise XX, yamux)."""

    def __init__(
        self,
        identity: PrivateKey,
        router: ProtocolRouter | None = None,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_pending_upgrades: int = 64,
        stream_window: int | None = None,
        keepalive: float | None = None,
        on_connection: ConnectionCallback | None = None,
    ) -> None:
        self.identity = identity
        self.router = router if router is not None else ProtocolRouter()
        self.handshake_timeout = handshake_timeout
        self.stream_window = stream_window
        self.keepalive = keepalive
        self.on_connection = on_connection
        self.connections: set[Libp2pConnection] = set()
        self._server: asyncio.Server | None = None
        self._pending = asyncio.Semaphore(max_pending_upgrades)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def peer_id_text(self) -> str:
        return self.identity.public_key.peer_id_text()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Multiaddr:
        """Start listening; return the bound address (``/ip4/<host>/tcp/<port>``)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        proto = "ip6" if ":" in bound_host else "ip4"
        return Multiaddr.parse(f"/{proto}/{bound_host}/tcp/{bound_port}")

    @property
    def listen_port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def _upgrade(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dialed: bytes | None,
        timeout: float,
    ) -> Libp2pConnection:
        """Upgrade as the dialer (``dialed``: the peer ID expected, b"" for any) or listener."""
        return await upgrade(
            reader,
            writer,
            self.identity,
            self.router,
            initiator=dialed is not None,
            expected_peer_id=dialed or None,
            timeout=timeout,
            stream_window=self.stream_window,
            keepalive=self.keepalive,
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending.locked():
            writer.close()
            return
        async with self._pending:
            try:
                conn = await self._upgrade(reader, writer, None, self.handshake_timeout)
            except (
                HandshakeError,
                ProtocolViolation,
                ConnectionClosed,
                TimeoutError,
                OSError,
            ) as exc:
                log.debug("inbound libp2p upgrade failed: %s", exc)
                writer.close()
                return
        self._adopt(conn)

    def _adopt(self, conn: Libp2pConnection) -> None:
        self.connections.add(conn)
        watcher = asyncio.ensure_future(self._watch(conn))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        if self.on_connection is not None:
            result = self.on_connection(conn)
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _watch(self, conn: Libp2pConnection) -> None:
        await conn.wait_closed()
        self.connections.discard(conn)

    async def dial(
        self,
        host: str,
        port: int,
        *,
        peer_id: bytes | None = None,
        timeout: float | None = None,
    ) -> Libp2pConnection:
        """Connect and upgrade; ``peer_id`` (multihash bytes) must match the remote's proof."""
        limit = timeout if timeout is not None else self.handshake_timeout
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(f"cannot connect to {host}:{port}: {exc}") from None
        try:
            conn = await self._upgrade(reader, writer, peer_id or b"", limit)
        except BaseException:
            writer.close()
            raise
        self._adopt(conn)
        return conn

    async def dial_multiaddr(
        self, addr: Multiaddr | str, *, timeout: float | None = None
    ) -> Libp2pConnection:
        """Dial ``/ip4|ip6/<host>/tcp/<port>[/p2p/<id>]`` (the ``/p2p`` part is checked)."""
        if isinstance(addr, str):
            addr = Multiaddr.parse(addr)
        names = addr.protocols()
        if len(names) < 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
            raise PeerUnreachable(f"{addr} is not a TCP address")
        peer = addr.peer_id
        return await self.dial(
            str(addr.value_of(names[0])),
            int(str(addr.value_of("tcp"))),
            peer_id=peer.to_bytes() if peer is not None else None,
            timeout=timeout,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        for conn in list(self.connections):
            await conn.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
