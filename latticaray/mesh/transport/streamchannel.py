"""A :class:`~latticaray.mesh.channel.Channel` over an asyncio stream transport (TCP, TLS, Unix).

:class:`StreamChannel` is the asyncio ``Protocol`` of one connection. It buffers received bytes up
to a bound (then pauses reading, so a stalled reader holds at most ``read_high_water`` plus one
socket read), and exposes the transport's write high-water mark as ``drain()``. The TCP and Unix
transports run their authentication handshake over it with :meth:`read_exactly` before handing
it to the RPC layer.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionClosed, HandshakeError

if TYPE_CHECKING:
    from ..identity import PeerId
    from ..multiaddr import Multiaddr

__all__ = ["StreamChannel"]

#: Received chunks smaller than this are joined into one read (fewer, larger parses).
_JOIN_BELOW = 64 * 1024


class StreamChannel(asyncio.Protocol):
    """One authenticated byte stream; ``remote_peer`` is set once its handshake succeeded."""

    def __init__(
        self,
        transport_name: str,
        *,
        read_high_water: int = 4 * 1024 * 1024,
        write_high_water: int = 1024 * 1024,
    ) -> None:
        self.transport = transport_name
        self.local_peer: PeerId | None = None
        self.remote_peer: PeerId | None = None
        self.remote_addr: Multiaddr | None = None
        self.local_addr: Multiaddr | None = None
        self._read_high_water = read_high_water
        self._write_high_water = write_high_water
        self._io: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._eof = False
        self._closed = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Called with the channel once its connection is gone (the transport forgets it).
        self.connection_lost_hook: Callable[[StreamChannel], None] | None = None

    async def wait_connected(self) -> None:
        """Until the transport has connected (raises ConnectionClosed if it was lost first)."""
        await self._connected

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's ``get_extra_info`` (socket, peername, ssl_object, ...)."""
        if self._io is None:
            return default
        return self._io.get_extra_info(name, default)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._io = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=self._write_high_water)  # type: ignore[attr-defined]
        if not self._connected.done():
            self._connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._read_high_water and not self._reading_paused:
            self._reading_paused = True
            if self._io is not None:
                self._io.pause_reading()
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if exc is not None and self._error is None:
            self._error = exc
        if not self._connected.done():
            self._connected.set_exception(ConnectionClosed(f"connection lost: {exc}"))
            self._connected.exception()  # retrieved: nobody may be waiting for it
        self._wake()
        hook = self.connection_lost_hook
        if hook is not None:
            self.connection_lost_hook = None
            hook(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        for waiter in (self._read_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._read_waiter = self._drain_waiter = None

    # -- Channel -------------------------------------------------------------------------------
    async def read(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._eof or self._closed:
                if self._error is not None and not self._eof:
                    raise ConnectionClosed(f"{self.transport} connection lost: {self._error}")
                return b""
            waiter = self._read_waiter = asyncio.get_running_loop().create_future()
            await waiter
        first = chunks[0]
        if len(first) > max_bytes:
            chunks[0] = first[max_bytes:]
            data = first[:max_bytes]
        elif len(chunks) == 1 or len(first) >= _JOIN_BELOW:
            data = chunks.popleft()  # large chunks are handed on as they are: no copy
        else:
            pieces = [chunks.popleft()]
            size = len(first)
            while chunks and size + len(chunks[0]) <= max_bytes and len(chunks[0]) < _JOIN_BELOW:
                piece = chunks.popleft()
                pieces.append(piece)
                size += len(piece)
            data = b"".join(pieces) if len(pieces) > 1 else pieces[0]
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= self._read_high_water // 2:
            self._reading_paused = False
            if not self._closed and self._io is not None:
                self._io.resume_reading()
        return data

    async def read_exactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (handshakes); raises HandshakeError on a short stream."""
        parts = []
        while n > 0:
            data = await self.read(n)
            if not data:
                raise HandshakeError("connection closed during the handshake")
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._io is None or self._io.is_closing():
            raise ConnectionClosed(f"{self.transport} channel is closed")
        self._io.write(data)

    async def drain(self) -> None:
        while self._write_paused:
            if self._closed:
                break
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            await waiter
        if self._closed or self._io is None or self._io.is_closing():
            raise ConnectionClosed(f"{self.transport} channel is closed")

    def close(self) -> None:
        if self._io is not None and not self._io.is_closing():
            self._io.close()

    def abort(self) -> None:
        if self._io is not None:
            self._io.abort()
        self._closed = True
        self._wake()

    @property
    def is_closed(self) -> bool:
        return self._closed or self._io is None or self._io.is_closing()

    @property
    def receive_buffered(self) -> int:
        return self._buffered

    def __repr__(self) -> str:
        return f"<StreamChannel {self.transport} {self.remote_peer} {self.remote_addr}>"
