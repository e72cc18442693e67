"""Framing of the node <-> worker channel: 4-byte big-endian length, then one msgpack map.

The channel is a Unix socketpair between a node and the worker processes it spawned, so both
ends are trusted; frames are still size-bounded so a corrupted stream fails clearly.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 32) - 1

# Task return counts with a meaning beyond "this many values".
STREAMING = -1

# Status of a sealed result.
OK, ERROR = 0, 1


class ChannelClosed(Exception):
    """The peer end of a worker channel closed."""


class WorkerFrameTooLarge(Exception):
    """A node <-> worker frame longer than MAX_FRAME (mesh frames have mesh.errors.FrameTooLarge)."""


def pack(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise WorkerFrameTooLarge(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


async def read_frame(reader: asyncio.StreamReader) -> dict:
    try:
        header = await reader.readexactly(4)
        (length,) = HEADER.unpack(header)
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed(str(exc)) from None
    return unpack(body)


class BlockingFrameReader:
    """Reads frames from a blocking socket with a reusable buffer."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray()
        self._eof = False

    def _parse(self) -> dict | None:
        buffer = self._buffer
        if len(buffer) >= 4:
            (length,) = HEADER.unpack_from(buffer)
            if len(buffer) >= 4 + length:
                body = bytes(buffer[4 : 4 + length])
                del buffer[: 4 + length]
                return unpack(body)
        return None

    def read(self) -> dict:
        """The next frame, waiting for it."""
        while True:
            message = self._parse()
            if message is not None:
                return message
            if self._eof:
                raise ChannelClosed("node closed the worker channel")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ChannelClosed("node closed the worker channel")
            self._buffer += chunk

    def read_available(self) -> list[dict]:
        """Every complete frame that can be had without waiting."""
        while True:
            try:
                chunk = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                self._eof = True
                break
            self._buffer += chunk
        out = []
        while (message := self._parse()) is not None:
            out.append(message)
        if not out and self._eof:
            raise ChannelClosed("node closed the worker channel")
        return out
