"""A libp2p stream as the byte pipe a connection is upgraded over (relayed connections).

A circuit relay v2 connection is a stream of another connection (the hop stream to the relay, or
the stop stream from it) that carries a whole libp2p connection: multistream, Noise, yamux.
:class:`StreamPipe` gives such a :class:`~.stream.MuxedStream` the reader/writer shape
:func:`~.connection.upgrade` and :class:`~.connection.Libp2pConnection` use on TCP sockets
(``read``, ``write`` without waiting, ``drain``, ``close``), so the same Noise and yamux code runs
over it. Writes are queued and sent in order by one task that waits for the stream's window; the
queue is bounded by the inner yamux windows, and ``drain`` waits until it is below
:data:`PIPE_HIGH_WATER`. A reset or closed stream reads as a :class:`ConnectionResetError`, as
a broken socket would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from ..errors import ConnectionClosed
from .stream import MuxedStream

__all__ = ["PIPE_HIGH_WATER", "StreamPipe"]

#: ``drain`` returns once fewer bytes than this wait to be sent.
PIPE_HIGH_WATER = 1 << 20
_READ_CHUNK = 256 * 1024


class StreamPipe:
    """Reader and writer over one stream (see the module docstring)."""

    def __init__(self, stream: MuxedStream, *, extra: dict[str, Any] | None = None) -> None:
        self.stream = stream
        stream.timeout = None  # the connection above has its own liveness (yamux keepalive)
        self._extra = dict(extra or {})
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._send_loop())

    # -- reading
    async def read(self, n: int = -1) -> bytes:
        try:
            return await self.stream.read(n if n > 0 else _READ_CHUNK, timeout=None)
        except (ConnectionClosed, TimeoutError) as exc:
            raise ConnectionResetError(f"relayed stream broke: {exc}") from None

    # -- writing
    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise ConnectionResetError(f"relayed stream broke: {self._error}")
        if self._closing or not data:
            return
        self._queue.append(bytes(data))
        self._queued += len(data)
        self._drained.clear()
        self._wake.set()

    async def drain(self) -> None:
        while self._queued >= PIPE_HIGH_WATER and self._error is None:
            self._drained.clear()
            await self._drained.wait()
        if self._error is not None:
            raise ConnectionResetError(f"relayed stream broke: {self._error}")

    async def _send_loop(self) -> None:
        try:
            while True:
                while self._queue:
                    chunk = self._queue.popleft()
                    await self.stream.write(chunk, timeout=None)
                    self._queued -= len(chunk)
                    if self._queued < PIPE_HIGH_WATER:
                        self._drained.set()
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
            await self.stream.close()
        except asyncio.CancelledError:
            self.stream.reset()
            raise
        except Exception as exc:
            self._error = exc
            self.stream.reset()
        finally:
            self._drained.set()

    def close(self) -> None:
        """Send what is queued, then close the stream (no wait)."""
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        """Reset the stream now, dropping what is queued."""
        self._closing = True
        self._queue.clear()
        self._task.cancel()
        self.stream.reset()

    async def wait_closed(self) -> None:
        with contextlib.suppress(BaseException):
            await self._task

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)
