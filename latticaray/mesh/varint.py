"""Unsigned varints as multiformats writes them (LEB128, minimal, at most 9 bytes).

Shared by multiaddrs, CIDs and multihashes. Errors are plain ``ValueError`` subclasses so each
format can re-raise them as its own typed error with its own context.
"""

from __future__ import annotations

MAX_VARINT_BYTES = 9


class VarintError(ValueError):
    """A varint is truncated, overlong, not minimally encoded, or out of range."""


def encode_varint(value: int) -> bytes:
    if value < 0 or value >= 1 << 63:
        raise VarintError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode the varint at ``offset``; return ``(value, next_offset)``."""
    value = 0
    shift = 0
    for i in range(MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            raise VarintError(f"truncated varint at byte {offset}")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise VarintError(f"varint at byte {offset} is not minimally encoded")
            return value, pos + 1
        shift += 7
    raise VarintError(f"varint at byte {offset} is longer than {MAX_VARINT_BYTES} bytes")
