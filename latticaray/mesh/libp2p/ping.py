"""libp2p ping (``/ipfs/ping/1.0.0``): 32 random bytes echoed back, repeated on one stream.

The responder echoes every 32-byte payload until the stream ends, the idle timeout passes, or
:data:`MAX_PINGS_PER_STREAM` were answered; the initiator measures the round trip.
"""

from __future__ import annotations

import os
import time

from ..errors import ProtocolViolation
from .stream import MuxedConnection, MuxedStream, ProtocolRouter

__all__ = ["PING_PROTOCOL", "PING_SIZE", "PingService"]

PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_SIZE = 32
MAX_PINGS_PER_STREAM = 1024
IDLE_TIMEOUT = 60.0


class PingService:
    def __init__(self, router: ProtocolRouter) -> None:
        router.add(PING_PROTOCOL, self._handle)

    async def _handle(self, stream: MuxedStream) -> None:
        for _ in range(MAX_PINGS_PER_STREAM):
            try:
                payload = await stream.readexactly(PING_SIZE, timeout=IDLE_TIMEOUT)
            except (EOFError, TimeoutError):
                break
            await stream.write(payload)
        await stream.close()

    @staticmethod
    async def ping(conn: MuxedConnection, *, count: int = 1, timeout: float = 10.0) -> list[float]:
        """Round trips, in seconds, of ``count`` pings on one stream."""
        stream = await conn.open_stream(PING_PROTOCOL, timeout=timeout)
        rtts: list[float] = []
        try:
            for _ in range(count):
                payload = os.urandom(PING_SIZE)
                start = time.monotonic()
                await stream.write(payload, timeout=timeout)
                echo = await stream.readexactly(PING_SIZE, timeout=timeout)
                if echo != payload:
                    raise ProtocolViolation(f"{conn.remote_peer_text} echoed other ping bytes")
                rtts.append(time.monotonic() - start)
        except BaseException:
            stream.reset()
            raise
        await stream.close()
        return rtts
