"""A minimal protobuf wire codec and the unsigned-varint length-prefixed framing libp2p uses.

libp2p messages are small proto2/proto3 schemas; this module writes and reads their wire format
(varint, 64-bit, length-delimited and 32-bit fields) without generated code. Each message module
declares typed dataclasses and encodes/decodes them through :class:`Writer` and
:func:`parse_fields`. Every read is bounded: a field never runs past its message, varints are at
most 10 bytes, and callers give size and count limits; malformed input raises
:class:`~latticaray.mesh.libp2p.errors.ProtobufError`.

:class:`LengthPrefixedDecoder` is the sans-I/O reader of ``uvarint(len) || message`` streams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..varint import VarintError, decode_varint, encode_varint
from .errors import MessageTooLarge, ProtobufError

__all__ = [
    "WIRE_FIXED32",
    "WIRE_FIXED64",
    "WIRE_LEN",
    "WIRE_VARINT",
    "Fields",
    "LengthPrefixedDecoder",
    "Writer",
    "decode_uvarint",
    "encode_length_prefixed",
    "encode_uvarint",
    "parse_fields",
]

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5
_MAX_PB_VARINT_BYTES = 10
_UINT64_LIMIT = 1 << 64
_MAX_FIELD_NUMBER = (1 << 29) - 1
#: Fields one message may hold before it is refused (a guard against many tiny fields).
DEFAULT_MAX_FIELDS = 65536


def encode_uvarint(value: int) -> bytes:
    """Protobuf varint of an unsigned 64-bit value (1-10 bytes)."""
    if value < 0 or value >= _UINT64_LIMIT:
        raise ProtobufError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode a protobuf varint at ``offset``; return ``(value, next_offset)``."""
    value = 0
    shift = 0
    for i in range(_MAX_PB_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            raise ProtobufError(f"truncated varint at byte {offset}")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= _UINT64_LIMIT:
                raise ProtobufError(f"varint at byte {offset} exceeds 64 bits")
            return value, pos + 1
        shift += 7
    raise ProtobufError(f"varint at byte {offset} is longer than {_MAX_PB_VARINT_BYTES} bytes")


class Writer:
    """Builds one protobuf message field by field (in the order called)."""

    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out = bytearray()

    def _key(self, number: int, wire: int) -> None:
        self._out += encode_uvarint((number << 3) | wire)

    def uint(self, number: int, value: int, *, always: bool = False) -> Writer:
        """A varint field (uint32/uint64/enum/bool); zero is skipped unless ``always``."""
        if value or always:
            self._key(number, WIRE_VARINT)
            self._out += encode_uvarint(value)
        return self

    def int32(self, number: int, value: int, *, always: bool = False) -> Writer:
        """An int32/int64 field: negative values take 10 bytes, as protobuf writes them."""
        if value or always:
            self._key(number, WIRE_VARINT)
            self._out += encode_uvarint(value % _UINT64_LIMIT)
        return self

    def boolean(self, number: int, value: bool) -> Writer:
        return self.uint(number, 1 if value else 0)

    def bytes_(self, number: int, value: bytes, *, always: bool = False) -> Writer:
        """A length-delimited field (bytes, string or embedded message)."""
        if value or always:
            self._key(number, WIRE_LEN)
            self._out += encode_uvarint(len(value))
            self._out += value
        return self

    def string(self, number: int, value: str, *, always: bool = False) -> Writer:
        return self.bytes_(number, value.encode("utf-8"), always=always)

    def repeated_bytes(self, number: int, values: Iterable[bytes]) -> Writer:
        for value in values:
            self.bytes_(number, value, always=True)
        return self

    def repeated_string(self, number: int, values: Iterable[str]) -> Writer:
        for value in values:
            self.string(number, value, always=True)
        return self

    def finish(self) -> bytes:
        return bytes(self._out)


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    wire: int
    value: int | bytes


def parse_fields(data: bytes | memoryview, *, max_fields: int = DEFAULT_MAX_FIELDS) -> Fields:
    """Split a message into its fields; unknown fields are kept and ignored by the getters."""
    data = bytes(data)
    fields: list[_Field] = []
    pos = 0
    end = len(data)
    while pos < end:
        if len(fields) >= max_fields:
            raise ProtobufError(f"message has more than {max_fields} fields")
        key, pos = decode_uvarint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise ProtobufError(f"field number {number} is out of range")
        value: int | bytes
        if wire == WIRE_VARINT:
            value, pos = decode_uvarint(data, pos)
        elif wire == WIRE_LEN:
            length, pos = decode_uvarint(data, pos)
            if length > end - pos:
                raise ProtobufError(
                    f"field {number} declares {length} bytes but only {end - pos} remain"
                )
            value = data[pos : pos + length]
            pos += length
        elif wire == WIRE_FIXED64:
            if end - pos < 8:
                raise ProtobufError(f"field {number}: truncated 64-bit value")
            value = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == WIRE_FIXED32:
            if end - pos < 4:
                raise ProtobufError(f"field {number}: truncated 32-bit value")
            value = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise ProtobufError(f"field {number} has unsupported wire type {wire}")
        fields.append(_Field(number, wire, value))
    return Fields(fields)


class Fields:
    """The decoded fields of one message, read by typed, bounded getters."""

    __slots__ = ("_by_number",)

    def __init__(self, fields: list[_Field]) -> None:
        self._by_number: dict[int, list[_Field]] = {}
        for f in fields:
            self._by_number.setdefault(f.number, []).append(f)

    def has(self, number: int) -> bool:
        return number in self._by_number

    def _typed(self, number: int, wire: int) -> list[_Field]:
        found = self._by_number.get(number, [])
        for f in found:
            if f.wire != wire:
                raise ProtobufError(f"field {number} has wire type {f.wire}, expected {wire}")
        return found

    def uint(self, number: int, default: int = 0, *, maximum: int = _UINT64_LIMIT - 1) -> int:
        """The last occurrence of a varint field (protobuf's merge rule), bounded by ``maximum``."""
        found = self._typed(number, WIRE_VARINT)
        if not found:
            return default
        value = found[-1].value
        assert isinstance(value, int)
        if value > maximum:
            raise ProtobufError(f"field {number} value {value} exceeds {maximum}")
        return value

    def int32(self, number: int, default: int = 0) -> int:
        """A signed int32 field (negative values arrive as 64-bit two's complement)."""
        if not self.has(number):
            return default
        value = self.uint(number)
        if value >= 1 << 63:
            value -= _UINT64_LIMIT
        if not -(1 << 31) <= value < 1 << 31:
            raise ProtobufError(f"field {number} value {value} is not an int32")
        return value

    def boolean(self, number: int) -> bool:
        return self.uint(number) != 0

    def bytes_(self, number: int, *, max_len: int, default: bytes = b"") -> bytes:
        found = self._typed(number, WIRE_LEN)
        if not found:
            return default
        value = found[-1].value
        assert isinstance(value, bytes)
        if len(value) > max_len:
            raise ProtobufError(f"field {number} is {len(value)} bytes, limit {max_len}")
        return value

    def string(self, number: int, *, max_len: int, default: str = "") -> str:
        raw = self.bytes_(number, max_len=max_len, default=default.encode("utf-8"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtobufError(f"field {number} is not valid UTF-8") from None

    def repeated_bytes(self, number: int, *, max_len: int, max_count: int) -> list[bytes]:
        found = self._typed(number, WIRE_LEN)
        if len(found) > max_count:
            raise ProtobufError(f"field {number} repeats {len(found)} times, limit {max_count}")
        out: list[bytes] = []
        for f in found:
            assert isinstance(f.value, bytes)
            if len(f.value) > max_len:
                raise ProtobufError(f"field {number} item is {len(f.value)} bytes, limit {max_len}")
            out.append(f.value)
        return out

    def repeated_string(self, number: int, *, max_len: int, max_count: int) -> list[str]:
        out: list[str] = []
        for raw in self.repeated_bytes(number, max_len=max_len, max_count=max_count):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtobufError(f"field {number} item is not valid UTF-8") from None
        return out


def encode_length_prefixed(message: bytes) -> bytes:
    """``uvarint(len(message)) || message``, the framing of libp2p's protobuf protocols."""
    return encode_varint(len(message)) + message


class LengthPrefixedDecoder:
    """Sans-I/O reader of unsigned-varint length-prefixed messages, each at most ``max_size``.

    ``feed(data)`` returns the complete messages so far; a header declaring more than
    ``max_size`` raises :class:`MessageTooLarge` before any of the body is buffered.
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while self._buf:
            if all(b & 0x80 for b in self._buf[:9]) and len(self._buf) < 9:
                break  # the length prefix itself is incomplete
            try:
                length, start = decode_varint(bytes(self._buf[:10]))
            except VarintError as exc:
                raise ProtobufError(f"bad length prefix: {exc}") from None
            if length > self.max_size:
                raise MessageTooLarge(f"message of {length} bytes exceeds limit {self.max_size}")
            if len(self._buf) - start < length:
                break
            out.append(bytes(self._buf[start : start + length]))
            del self._buf[: start + length]
        return out

    def take_rest(self) -> bytes:
        """Whatever was fed after the last complete message (and clear it)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
