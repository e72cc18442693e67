"""One bidirectional QUIC stream as a :class:`~latticaray.mesh.channel.Channel`.

:class:`QuicChannel` is the stream adapter between the RPC layer and a connection
(:class:`~latticaray.mesh.transport.quic_conn.QuicConn`), with backpressure both ways:

* write: ``drain()`` waits while the stream's unacknowledged send buffer is over a high-water
  mark, which it stays at when the peer's flow-control window is exhausted;
* read: the receive window granted to the peer advances only with what the application has
  *read* (the channel reports what it hands out with ``consumed``; aioquic then raises the
  window, qh3 leaves arriving data in its core while a reader is half a window behind), so a
  stalled reader holds about one window.

The methods without a Channel-contract name (``feed``, ``fail``, ``discard``, ``finish``,
``check_drain``) are the connection's side: it calls them with the stream's events.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from ..errors import ConnectionClosed
from .quic_config import STREAM_ERROR_ABORTED

if TYPE_CHECKING:
    from ..identity import PeerId
    from ..multiaddr import Multiaddr
    from .quic_backend import QuicEngine
    from .quic_conn import QuicConn

__all__ = ["QuicChannel"]


class QuicChannel:
    """One bidirectional QUIC stream as a :class:`~latticaray.mesh.channel.Channel`."""

    transport = "quic"

    def __init__(
        self, conn: QuicConn, quic: QuicEngine, stream_id: int, remote_peer: PeerId
    ) -> None:
        self._conn = conn
        self._quic = quic
        self._high_water = conn.config.write_high_water
        self.stream_id = stream_id
        self.remote_peer: PeerId = remote_peer
        self.local_peer: PeerId = conn.local_peer
        self.remote_addr: Multiaddr | None = conn.remote_addr
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._received = 0
        self._consumed = 0
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._write_closed = False
        self._closed = False
        quic.track_stream(stream_id)

    # -- fed by the connection ----------------------------------------------------------------
    @property
    def write_closed(self) -> bool:
        """Whether this end sent its FIN (or aborted)."""
        return self._write_closed

    def feed(self, data: bytes, end_stream: bool) -> None:
        """STREAM data (and the FIN) that arrived for this stream."""
        if data:
            if self._closed:
                self._credit(len(data))  # discarded; keep the peer's window moving
            else:
                self._chunks.append(data)
                self._buffered += len(data)
            self._received += len(data)
        if end_stream:
            self._eof = True
        self._wake_reader()

    def fail(self, error: BaseException) -> None:
        """The stream or its connection failed: readers and writers get ``error``."""
        if self._error is None:
            self._error = error
        self._closed = True
        self._wake_reader()
        self._wake_drain()

    def check_drain(self) -> None:
        """Acknowledgements arrived: wake a waiting ``drain()`` once below half high water."""
        if self._drain_waiter is not None and (
            self._closed or self.send_buffered <= self._high_water // 2
        ):
            self._wake_drain()

    def discard(self) -> None:
        """Drop what is buffered (crediting the peer's window) and leave the connection."""
        if self._buffered:
            n, self._buffered = self._buffered, 0
            self._chunks.clear()
            self._credit(n)
        self._conn.forget_channel(self.stream_id)

    def finish(self) -> None:
        """Both directions are done; leave the connection once the reader took everything."""
        if not self._closed:
            self._closed = True
            self._wake_drain()
        if not self._chunks:
            self._conn.forget_channel(self.stream_id)

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _credit(self, n: int) -> None:
        self._consumed += n
        self._quic.consumed(self.stream_id, self._consumed, n)
        self._conn.schedule_transmit()

    # -- Channel API ---------------------------------------------------------------------------
    @property
    def send_buffered(self) -> int:
        return self._quic.stream_buffered(self.stream_id)

    @property
    def receive_buffered(self) -> int:
        return self._buffered

    async def read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof or self._closed:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunks = self._chunks
        chunk = chunks[0]
        if len(chunk) > max_bytes:
            chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        elif len(chunks) == 1 or len(chunk) + len(chunks[1]) > max_bytes:
            chunks.popleft()
        else:
            # each STREAM frame is one chunk (~1.3 KB off the internet): hand on what arrived
            # together as one piece, so the reader parses once per batch, not once per packet
            pieces = [chunks.popleft()]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                piece = chunks.popleft()
                pieces.append(piece)
                size += len(piece)
            chunk = b"".join(pieces)
        self._buffered -= len(chunk)
        self._credit(len(chunk))
        if self._closed and not self._chunks and self._error is None:
            self._conn.forget_channel(self.stream_id)
        return chunk

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._write_closed:
            raise ConnectionClosed("write on a closed QUIC channel")
        if not data:
            return
        try:
            self._quic.send_stream_data(self.stream_id, bytes(data))
        except Exception as exc:  # qh3 raises once its connection is closed
            raise ConnectionClosed(f"QUIC connection closed: {exc}") from None
        self._conn.note_sent()
        self._conn.schedule_transmit()

    async def drain(self) -> None:
        high = self._high_water
        while True:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise ConnectionClosed("QUIC channel closed")
            if self.send_buffered <= high:
                return
            self._drain_waiter = asyncio.get_running_loop().create_future()
            self._conn.watch_drain(self)
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
                self._conn.unwatch_drain(self)

    def close(self) -> None:
        """Send FIN after what was written; reading continues until the peer's FIN."""
        if self._write_closed or self._closed:
            return
        self._write_closed = True
        try:
            self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        except Exception:
            pass
        self._conn.schedule_transmit()
        if self._eof:
            self.finish()

    def abort(self) -> None:
        if self._closed:
            return
        quic = self._quic
        try:
            if not self._write_closed:
                quic.reset_stream(self.stream_id, STREAM_ERROR_ABORTED)
            if not self._eof:
                quic.stop_stream(self.stream_id, STREAM_ERROR_ABORTED)
        except Exception:
            pass
        self._write_closed = True
        self.fail(ConnectionClosed("QUIC channel aborted locally"))
        self.discard()
        self._conn.schedule_transmit()

    @property
    def is_closed(self) -> bool:
        return self._closed or self._write_closed or self._eof

    def __repr__(self) -> str:
        return f"<QuicChannel {self.stream_id} to {self.remote_peer}>"
