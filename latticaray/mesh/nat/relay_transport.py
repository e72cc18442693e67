"""Circuit relay over TCP + TLS: the connection format shared by relay server and client.

Every connection to the relay is a :class:`SecureTunnel` over TCP (relay = TLS server, the peer
authenticates in-band), so the relay knows who asks. The first length-prefixed msgpack frame says
what the connection is for:

* ``reserve`` — the peer's reservation; the connection stays open as its control stream (renewals,
  ``ping``; the relay sends ``incoming {src, cid}`` when someone opens a circuit to the peer);
* ``connect {peer}`` — open a circuit to a reserved peer;
* ``accept {cid}`` — the target's answer to ``incoming``, on a fresh connection.

After OK replies the relay splices the two connections' plaintext, which is the ciphertext of the
end-to-end :class:`SecureTunnel` the two peers run inside: the relay never sees their data. Each
direction is counted against the circuit's byte budget and duration (see ``RelayCore``).

This module holds the framing (:class:`FramedStream`) and :func:`open_outer` (a client's TLS
connection to the relay); the two ends are :mod:`.relay_server` and :mod:`.relay_client`.
"""

from __future__ import annotations

import asyncio
import logging
import struct

from ..errors import ConnectionClosed
from ..identity import KeyPair, PeerId
from . import wire
from .errors import (
    CONNECTION_FAILED,
    MalformedMessage,
    RelayRefused,
)
from .tunnel import SecureTunnel, StreamPair

log = logging.getLogger(__name__)


MAX_CONTROL_FRAME = 8192
CONTROL_TIMEOUT = 10.0
ACCEPT_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 15.0


class FramedStream:
    """Length-prefixed control frames on a byte stream, then raw bytes (nothing over-read is lost)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        #: set on a target's stream while the relay splices it; resolved when the circuit ends
        self.done: asyncio.Future | None = None

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self.stream.read(65536)
            if not chunk:
                raise ConnectionClosed("stream closed while reading a control frame")
            self._buf += chunk

    async def read_message(self, timeout: float = CONTROL_TIMEOUT) -> dict:
        async def _read() -> dict:
            await self._fill(4)
            (length,) = struct.unpack(">I", self._buf[:4])
            if length > MAX_CONTROL_FRAME:
                raise MalformedMessage(
                    f"control frame of {length} bytes exceeds {MAX_CONTROL_FRAME}"
                )
            await self._fill(4 + length)
            body = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            return wire.decode(body, MAX_CONTROL_FRAME)

        return await asyncio.wait_for(_read(), timeout)

    async def send_message(self, data: bytes) -> None:
        self.stream.write(struct.pack(">I", len(data)) + data)
        await self.stream.drain()

    # ByteStream for what comes after the control frames
    async def read(self, max_bytes: int) -> bytes:
        if self._buf:
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
            return data
        return await self.stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    async def drain(self) -> None:
        await self.stream.drain()

    def close(self) -> None:
        self.stream.close()


async def open_outer(
    host: str, port: int, key: KeyPair, relay_peer: PeerId, timeout: float
) -> FramedStream:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError) as exc:
        raise RelayRefused(
            CONNECTION_FAILED, f"cannot reach relay {host}:{port}: {exc!r}"
        ) from None
    try:
        outer = await SecureTunnel.client(
            StreamPair(reader, writer), key, relay_peer, transport="tcp", timeout=timeout
        )
    except BaseException:
        writer.close()
        raise
    return FramedStream(outer)
