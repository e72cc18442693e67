"""Content identifiers: CIDv1 with multihash, per the multiformats specs.

Binary form: ``varint(1) || varint(codec) || varint(hash_code) || varint(len) || digest``.
String form: multibase base32-lower, i.e. ``"b" + base32(binary)`` without padding, which gives
``bafkrei...`` for raw blocks (codec 0x55) and ``bafyrei...`` for DAG-CBOR nodes (codec 0x71) with
sha2-256.

Public API::

    cid = Cid.of(data, codec=RAW)             # hash bytes -> CIDv1 (sha2-256 unless hash=BLAKE3)
    cid.verify(data) -> bool                  # does data hash to this CID?
    Cid.decode(binary) / Cid.parse("bafk...") # precise InvalidCid errors
    bytes(cid), str(cid), cid.codec, cid.hash_code, cid.digest

sha2-256 is the default (interoperable with IPFS; hashlib uses SHA-NI here). BLAKE3 (multihash
0x1e) is accepted and produced when the optional ``blake3`` package is installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final

from latticaray.mesh import varint as _varint
from latticaray.mesh.varint import VarintError

from .errors import InvalidCid

__all__ = [
    "BLAKE3",
    "DAG_CBOR",
    "DAG_PB",
    "RAW",
    "SHA2_256",
    "Cid",
    "blake3_available",
    "decode_varint",
    "encode_varint",
]

RAW: Final = 0x55
DAG_PB: Final = 0x70
DAG_CBOR: Final = 0x71
SHA2_256: Final = 0x12
BLAKE3: Final = 0x1E

_CODEC_NAMES = {RAW: "raw", DAG_PB: "dag-pb", DAG_CBOR: "dag-cbor"}
_HASH_LENGTHS = {SHA2_256: 32, BLAKE3: 32}

try:  # optional, faster hash
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the environment
    _blake3 = None  # type: ignore[assignment]


def blake3_available() -> bool:
    return _blake3 is not None


def encode_varint(value: int) -> bytes:
    try:
        return _varint.encode_varint(value)
    except VarintError as exc:
        raise InvalidCid(str(exc)) from None


def decode_varint(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    """Decode an unsigned varint at ``offset``; return ``(value, next_offset)``."""
    try:
        return _varint.decode_varint(data, offset)
    except VarintError as exc:
        raise InvalidCid(str(exc)) from None


def hash_digest(hash_code: int, data: bytes | memoryview) -> bytes:
    if hash_code == SHA2_256:
        return hashlib.sha256(data).digest()
    if hash_code == BLAKE3:
        if _blake3 is None:
            raise InvalidCid("BLAKE3 multihash needs the optional 'blake3' package")
        return _blake3.blake3(data).digest()
    raise InvalidCid(f"unsupported multihash code 0x{hash_code:x}")


class Cid:
    """An immutable CIDv1. Hashable and comparable; ``bytes(cid)`` is the binary form."""

    __slots__ = ("_binary", "codec", "digest", "hash_code")

    def __init__(self, codec: int, hash_code: int, digest: bytes) -> None:
        if codec not in _CODEC_NAMES:
            raise InvalidCid(f"unsupported codec 0x{codec:x} (expected raw, dag-pb or dag-cbor)")
        expected = _HASH_LENGTHS.get(hash_code)
        if expected is None:
            raise InvalidCid(f"unsupported multihash code 0x{hash_code:x}")
        if len(digest) != expected:
            raise InvalidCid(
                f"digest is {len(digest)} bytes, multihash 0x{hash_code:x} needs {expected}"
            )
        self.codec = codec
        self.hash_code = hash_code
        self.digest = bytes(digest)
        self._binary = (
            encode_varint(1)
            + encode_varint(codec)
            + encode_varint(hash_code)
            + encode_varint(len(digest))
            + self.digest
        )

    @classmethod
    def of(cls, data: bytes | memoryview, codec: int = RAW, hash_code: int = SHA2_256) -> Cid:
        return cls(codec, hash_code, hash_digest(hash_code, data))

    def verify(self, data: bytes | memoryview) -> bool:
        return hash_digest(self.hash_code, data) == self.digest

    @classmethod
    def decode(cls, binary: bytes | memoryview) -> Cid:
        binary = bytes(binary)
        if len(binary) > 128:
            raise InvalidCid(f"binary CID of {len(binary)} bytes is too long")
        if len(binary) == 34 and binary[:2] == b"\x12\x20":
            raise InvalidCid("CIDv0 (bare sha2-256 multihash) is not supported; use CIDv1")
        version, pos = decode_varint(binary, 0)
        if version != 1:
            raise InvalidCid(f"unsupported CID version {version}")
        codec, pos = decode_varint(binary, pos)
        hash_code, pos = decode_varint(binary, pos)
        length, pos = decode_varint(binary, pos)
        digest = binary[pos:]
        if len(digest) != length:
            raise InvalidCid(f"multihash says {length} digest bytes but {len(digest)} follow")
        return cls(codec, hash_code, digest)

    @classmethod
    def parse(cls, text: str) -> Cid:
        if not isinstance(text, str) or not text:
            raise InvalidCid("empty CID string")
        if text.startswith("Qm"):
            raise InvalidCid("CIDv0 (base58btc 'Qm...') is not supported; use CIDv1")
        if text[0] != "b":
            raise InvalidCid(
                f"unsupported multibase prefix {text[0]!r} (expected 'b', base32-lower)"
            )
        body = text[1:]
        if len(body) > 220 or not body.isascii() or body != body.lower():
            raise InvalidCid(f"not a base32-lower CID string: {text!r}")
        padded = body.upper() + "=" * (-len(body) % 8)
        try:
            binary = base64.b32decode(padded)
        except (ValueError, binascii.Error) as exc:
            raise InvalidCid(f"bad base32 in CID {text!r}: {exc}") from None
        return cls.decode(binary)

    @classmethod
    def coerce(cls, value: Cid | str | bytes) -> Cid:
        if isinstance(value, Cid):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls.decode(value)
        raise InvalidCid(f"cannot make a CID from {type(value).__name__}")

    def __bytes__(self) -> bytes:
        return self._binary

    def __str__(self) -> str:
        return "b" + base64.b32encode(self._binary).decode("ascii").lower().rstrip("=")

    def __repr__(self) -> str:
        return f"Cid({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cid) and other._binary == self._binary

    def __lt__(self, other: Cid) -> bool:
        return self._binary < other._binary

    def __hash__(self) -> int:
        return hash(self._binary)

    @property
    def codec_name(self) -> str:
        return _CODEC_NAMES[self.codec]
