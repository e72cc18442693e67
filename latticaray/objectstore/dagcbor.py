"""A strict, bounded DAG-CBOR codec for the small nodes the store writes (object manifests).

Supports what manifests need: unsigned/negative integers, byte strings, text strings, arrays,
maps with text keys, booleans, null, and CID links (tag 42, ``0x00 || binary CID``). Encoding is
deterministic per the DAG-CBOR spec (shortest integer and length forms, map keys sorted by length
then bytewise). Decoding rejects floats, indefinite lengths, other tags, duplicate or unsorted
keys, trailing bytes, oversize input and nesting deeper than ``max_depth``.
"""

from __future__ import annotations

import struct
from typing import Any

from .cid import Cid
from .errors import CodecError, InvalidCid

__all__ = ["decode", "encode"]

_MAX_INPUT = 4 << 20
_CID_TAG = 42


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([(major << 5) | value])
    if value < 1 << 8:
        return bytes([(major << 5) | 24, value])
    if value < 1 << 16:
        return bytes([(major << 5) | 25]) + struct.pack(">H", value)
    if value < 1 << 32:
        return bytes([(major << 5) | 26]) + struct.pack(">I", value)
    if value < 1 << 64:
        return bytes([(major << 5) | 27]) + struct.pack(">Q", value)
    raise CodecError(f"integer {value} does not fit in 64 bits")


def _encode_into(out: bytearray, value: Any, depth: int) -> None:
    if depth > 64:
        raise CodecError("value nested too deeply to encode")
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        out += _head(0, value) if value >= 0 else _head(1, -1 - value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += _head(2, len(data)) + data
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += _head(3, len(data)) + data
    elif isinstance(value, Cid):
        link = b"\x00" + bytes(value)
        out += _head(6, _CID_TAG) + _head(2, len(link)) + link
    elif isinstance(value, (list, tuple)):
        out += _head(4, len(value))
        for item in value:
            _encode_into(out, item, depth + 1)
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"DAG-CBOR map keys must be strings, got {type(key).__name__}")
            items.append((key.encode("utf-8"), item))
        items.sort(key=lambda kv: (len(kv[0]), kv[0]))
        out += _head(5, len(items))
        for key_bytes, item in items:
            out += _head(3, len(key_bytes)) + key_bytes
            _encode_into(out, item, depth + 1)
    else:
        raise CodecError(f"cannot encode {type(value).__name__} as DAG-CBOR")


def encode(value: Any) -> bytes:
    out = bytearray()
    _encode_into(out, value, 0)
    return bytes(out)


class _Reader:
    __slots__ = ("data", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CodecError("truncated DAG-CBOR")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int]:
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info
        widths = {24: 1, 25: 2, 26: 4, 27: 8}
        if info not in widths:
            if major == 7:
                return major, info
            raise CodecError(f"indefinite or reserved length (info {info}) not allowed")
        raw = self.take(widths[info])
        value = int.from_bytes(raw, "big")
        minimum = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}[info]
        if major != 7 and value < minimum:
            raise CodecError("integer or length not in its shortest form")
        return major, value

    def length(self, value: int) -> int:
        if value > len(self.data) - self.pos:
            raise CodecError(f"declared length {value} exceeds the remaining input")
        return value

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise CodecError(f"DAG-CBOR nested deeper than {self.max_depth}")
        major, value = self.head()
        if major == 0:
            return value
        if major == 1:
            return -1 - value
        if major == 2:
            return self.take(self.length(value))
        if major == 3:
            try:
                return self.take(self.length(value)).decode("utf-8")
            except UnicodeDecodeError:
                raise CodecError("text string is not valid UTF-8") from None
        if major == 4:
            return [self.item(depth + 1) for _ in range(self.length(value))]
        if major == 5:
            result: dict[str, Any] = {}
            previous: bytes | None = None
            for _ in range(self.length(value)):
                key_major, key_len = self.head()
                if key_major != 3:
                    raise CodecError("DAG-CBOR map keys must be text strings")
                key_bytes = self.take(self.length(key_len))
                sort_key = (len(key_bytes), key_bytes)
                if previous is not None and sort_key <= (len(previous), previous):
                    raise CodecError("map keys duplicated or not in canonical order")
                previous = key_bytes
                try:
                    key = key_bytes.decode("utf-8")
                except UnicodeDecodeError:
                    raise CodecError("map key is not valid UTF-8") from None
                result[key] = self.item(depth + 1)
            return result
        if major == 6:
            if value != _CID_TAG:
                raise CodecError(f"unsupported CBOR tag {value}")
            link_major, link_len = self.head()
            if link_major != 2:
                raise CodecError("CID link (tag 42) must wrap a byte string")
            link = self.take(self.length(link_len))
            if not link or link[0] != 0:
                raise CodecError("CID link must start with the 0x00 multibase prefix")
            try:
                return Cid.decode(link[1:])
            except InvalidCid as exc:
                raise CodecError(f"bad CID link: {exc}") from None
        if major == 7:
            if value == 20:
                return False
            if value == 21:
                return True
            if value == 22:
                return None
            raise CodecError(f"unsupported simple value or float (info {value})")
        raise CodecError(f"unsupported CBOR major type {major}")  # pragma: no cover


def decode(data: bytes | memoryview, max_depth: int = 16, max_size: int = _MAX_INPUT) -> Any:
    if len(data) > max_size:
        raise CodecError(f"DAG-CBOR node of {len(data)} bytes exceeds the {max_size}-byte limit")
    reader = _Reader(bytes(data), max_depth)
    value = reader.item(0)
    if reader.pos != len(reader.data):
        raise CodecError(f"{len(reader.data) - reader.pos} trailing bytes after DAG-CBOR value")
    return value
