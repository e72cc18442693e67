"""Test helpers for the RPC tests: an in-memory Channel pair with bounded buffers and backpressure.

(No tests here; the RPC test modules import it.)
"""

from __future__ import annotations

import asyncio
import time

from latticaray.mesh.errors import ConnectionClosed
from latticaray.mesh.identity import KeyPair


class MemoryChannel:
    """One end of an in-memory duplex pipe implementing the Channel contract."""

    transport = "memory"

    def __init__(self, local_peer, remote_peer, high_water: int) -> None:
        self.local_peer = local_peer
        self.remote_peer = remote_peer
        self.remote_addr = None
        self.high_water = high_water
        self.other: MemoryChannel | None = None
        self.inbox = bytearray()
        self.eof = False
        self._closed = False
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self.bytes_written = 0

    async def read(self, max_bytes: int) -> bytes:
        while not self.inbox:
            if self.eof or self._closed:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        data = bytes(self.inbox[:max_bytes])
        del self.inbox[:max_bytes]
        other = self.other
        if other._drain_waiter is not None and len(self.inbox) <= self.high_water:
            waiter, other._drain_waiter = other._drain_waiter, None
            if not waiter.done():
                waiter.set_result(None)
        return data

    def write(self, data) -> None:
        if self._closed or self.other._closed:
            raise ConnectionClosed("memory channel closed")
        self.other.inbox += data
        self.bytes_written += len(data)
        waiter = self.other._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        while len(self.other.inbox) > self.high_water:
            if self._closed or self.other._closed:
                raise ConnectionClosed("memory channel closed")
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def _wake_all(self) -> None:
        for end in (self, self.other):
            for waiter in (end._read_waiter, end._drain_waiter):
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def close(self) -> None:
        self._closed = True
        self.other.eof = True
        self._wake_all()

    def abort(self) -> None:
        self.inbox.clear()
        self.close()

    @property
    def is_closed(self) -> bool:
        return self._closed


def memory_pipe(high_water: int = 1 << 20) -> tuple[MemoryChannel, MemoryChannel]:
    a, b = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    end_a = MemoryChannel(a, b, high_water)
    end_b = MemoryChannel(b, a, high_water)
    end_a.other, end_b.other = end_b, end_a
    return end_a, end_b


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds (bounded loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
