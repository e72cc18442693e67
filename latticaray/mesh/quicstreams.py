"""libp2p streams on a QUIC connection: each QUIC stream negotiated with multistream-select.

QUIC multiplexes natively, so a libp2p connection over QUIC is the QUIC connection itself and
every libp2p stream one bidirectional QUIC stream (as js-libp2p, go-libp2p and rust-libp2p do).
:class:`QuicMuxedConnection` adapts a :class:`~latticaray.mesh.transport.quic_conn.QuicConn` to
:class:`~latticaray.mesh.libp2p.stream.MuxedConnection`: ``open_stream`` opens a QUIC stream and
negotiates on it; :meth:`QuicMuxedConnection.accept_loop` takes every stream the peer opens and
hands it to ``on_stream`` (the transport adapter, which negotiates and routes it).
:class:`QuicStream` is a :class:`~latticaray.mesh.libp2p.stream.MuxedStream` over one
:class:`~latticaray.mesh.transport.quic_channel.QuicChannel` (whose flow control bounds what it
buffers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConnectionClosed
from .libp2p.errors import StreamReset
from .libp2p.keys import PublicKey
from .libp2p.stream import MuxedStream, open_negotiated

if TYPE_CHECKING:
    from .identity import PeerId
    from .multiaddr import Multiaddr

__all__ = ["QuicMuxedConnection", "QuicStream"]

log = logging.getLogger(__name__)


class QuicStream(MuxedStream):
    """One QUIC stream as a libp2p stream."""

    __slots__ = ("_conn", "channel")

    def __init__(self, conn: QuicMuxedConnection, channel: Any) -> None:
        super().__init__()
        self._conn = conn
        self.channel = channel  # a QuicChannel

    @property
    def connection(self) -> QuicMuxedConnection:
        return self._conn

    async def _recv(self, max_bytes: int, timeout: float | None) -> bytes:
        try:
            if timeout is None:
                return await self.channel.read(max_bytes)
            return await asyncio.wait_for(self.channel.read(max_bytes), timeout)
        except TimeoutError:
            raise TimeoutError(f"no data on stream {self.protocol or '?'}") from None
        except ConnectionClosed as exc:
            raise StreamReset(str(exc)) from None

    def _send_now(self, data: bytes) -> None:
        try:
            self.channel.write(data)
        except ConnectionClosed as exc:
            raise StreamReset(str(exc)) from None

    async def write(self, data: bytes | memoryview, *, timeout: float | None = None) -> None:
        limit = timeout or self.timeout
        try:
            self.channel.write(data)
            if limit is None:
                await self.channel.drain()
            else:
                await asyncio.wait_for(self.channel.drain(), limit)
        except TimeoutError:
            raise TimeoutError("peer granted no window before the deadline") from None
        except ConnectionClosed as exc:
            raise StreamReset(str(exc)) from None

    async def _close_write_now(self) -> None:
        self.channel.close()

    def reset(self) -> None:
        self.channel.abort()

    def _forget(self) -> None:
        # the channel keeps crediting what still arrives until the peer's FIN
        pass


class QuicMuxedConnection:
    """A QUIC connection as a libp2p :class:`~latticaray.mesh.libp2p.stream.MuxedConnection`."""

    def __init__(self, conn: Any) -> None:
        self.quic = conn  # QuicConn, authenticated
        self._peer: PeerId = conn.remote_peer
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None

    @property
    def remote_key(self) -> PublicKey:
        key = self._peer.key
        assert key is not None  # a handshake's PeerId carries the certificate's key
        return key

    @property
    def remote_peer_id(self) -> bytes:
        return self._peer.to_bytes()

    @property
    def remote_peer_text(self) -> str:
        return str(self._peer)

    @property
    def mesh_peer_id(self) -> PeerId:
        return self._peer

    @property
    def remote_multiaddr(self) -> Multiaddr | None:
        addr: Multiaddr | None = self.quic.remote_addr
        return addr

    @property
    def is_closed(self) -> bool:
        return bool(self.quic.is_closed)

    def new_stream(self) -> QuicStream:
        """A fresh outbound stream, not negotiated yet."""
        try:
            channel = self.quic.open_channel()
        except ConnectionClosed as exc:
            raise ConnectionClosed(f"cannot open a stream to {self._peer}: {exc}") from None
        return QuicStream(self, channel)

    async def open_stream(
        self, protocols: Sequence[str] | str, *, lazy: bool = False, timeout: float | None = None
    ) -> QuicStream:
        stream = self.new_stream()
        await open_negotiated(stream, protocols, lazy=lazy, timeout=timeout)
        return stream

    def accept_loop(self, on_stream: Callable[[QuicStream], Coroutine[Any, Any, None]]) -> None:
        """Hand every stream the peer opens to ``on_stream`` (each in a task of its own)."""
        if self._accepting is None:
            self._accepting = asyncio.get_running_loop().create_task(self._accept(on_stream))

    async def _accept(self, on_stream: Callable[[QuicStream], Coroutine[Any, Any, None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                channel = await self.quic.accept_channel()
            except ConnectionClosed:
                return
            task = loop.create_task(on_stream(QuicStream(self, channel)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in [self._accepting, *self._tasks]:
            if task is not None:
                task.cancel()
