"""CIDs at the byte level, as Bitswap 1.2 needs them: parse, prefix, and rebuild from a block.

A CIDv1 is ``uvarint(1) uvarint(codec) uvarint(hash) uvarint(len) digest``; a CIDv0 is a bare
34-byte sha2-256 multihash of a dag-pb block. Bitswap sends a block with its CID *prefix*
``uvarint(version) uvarint(codec) uvarint(hash) uvarint(len)`` and the receiver recomputes the
CID from the data, which is the integrity check. (The object store's richer
:mod:`latticaray.objectstore.cid` sits above the mesh layer and is not used here.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..varint import VarintError, decode_varint, encode_varint
from .errors import ProtobufError

__all__ = ["CidError", "CidParts", "cid_from_block", "parse_cid"]

DAG_PB = 0x70
SHA2_256 = 0x12
IDENTITY = 0x00
MAX_CID = 256
MAX_IDENTITY_DIGEST = 128


class CidError(ProtobufError):
    """A CID or CID prefix is malformed or uses a hash this node cannot compute."""


@dataclass(frozen=True, slots=True)
class CidParts:
    version: int
    codec: int
    hash_code: int
    digest_len: int
    digest: bytes = b""

    def prefix(self) -> bytes:
        return b"".join(
            encode_varint(v) for v in (self.version, self.codec, self.hash_code, self.digest_len)
        )

    def multihash(self) -> bytes:
        """The CID's multihash (what Kademlia keys provider records by)."""
        return encode_varint(self.hash_code) + encode_varint(self.digest_len) + self.digest

    def encode(self) -> bytes:
        multihash = self.multihash()
        if self.version == 0:
            return multihash
        return encode_varint(1) + encode_varint(self.codec) + multihash


def _varints(data: bytes, count: int) -> tuple[list[int], int]:
    out: list[int] = []
    pos = 0
    try:
        for _ in range(count):
            value, pos = decode_varint(data, pos)
            out.append(value)
    except VarintError as exc:
        raise CidError(f"bad CID varint: {exc}") from None
    return out, pos


def parse_cid(data: bytes) -> CidParts:
    """Split binary CID ``data`` (v0 or v1) into its parts."""
    if len(data) > MAX_CID:
        raise CidError(f"CID of {len(data)} bytes exceeds {MAX_CID}")
    if len(data) == 34 and data[0] == SHA2_256 and data[1] == 32:
        return CidParts(0, DAG_PB, SHA2_256, 32, bytes(data[2:]))
    (version, codec, hash_code, length), pos = _varints(data, 4)
    if version != 1:
        raise CidError(f"CID version {version} is not 1")
    if len(data) - pos != length:
        raise CidError(f"CID declares a {length}-byte digest but has {len(data) - pos}")
    return CidParts(version, codec, hash_code, length, bytes(data[pos:]))


def _digest(hash_code: int, digest_len: int, data: bytes) -> bytes:
    if hash_code == SHA2_256 and digest_len == 32:
        return hashlib.sha256(data).digest()
    if hash_code == IDENTITY and digest_len == len(data) <= MAX_IDENTITY_DIGEST:
        return bytes(data)
    raise CidError(f"cannot compute multihash 0x{hash_code:x} of length {digest_len}")


def cid_from_block(prefix: bytes, data: bytes) -> bytes:
    """The binary CID of block ``data`` under ``prefix`` (the hash is computed here)."""
    (version, codec, hash_code, length), pos = _varints(prefix, 4)
    if pos != len(prefix):
        raise CidError("CID prefix has trailing bytes")
    if version not in (0, 1) or (version == 0 and (codec != DAG_PB or hash_code != SHA2_256)):
        raise CidError(f"CID prefix version {version}/codec 0x{codec:x} is not valid")
    return CidParts(version, codec, hash_code, length, _digest(hash_code, length, data)).encode()
