"""Signed envelopes (RFC 0002) and the signed peer record they carry in identify.

An ``Envelope`` is ``{public_key=1 PublicKey, payload_type=2, payload=3, signature=5}``; its
signature covers ``uvarint(len(domain)) || domain || uvarint(len(type)) || type ||
uvarint(len(payload)) || payload``, so a signature made for one domain is worthless in another.
A peer record (domain ``libp2p-peer-record``, payload type ``0x03 0x01``) is
``{peer_id=1, seq=2, addresses=3 {multiaddr=1}}``: the addresses a peer vouches for, ordered by
``seq`` so a newer record replaces an older one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..varint import encode_varint
from .errors import KeyDecodeError, ProtobufError
from .keys import PrivateKey, PublicKey
from .protobuf import Writer, parse_fields

__all__ = [
    "PEER_RECORD_DOMAIN",
    "PEER_RECORD_PAYLOAD_TYPE",
    "Envelope",
    "EnvelopeError",
    "PeerRecord",
    "open_peer_record",
    "seal_peer_record",
]

PEER_RECORD_DOMAIN = "libp2p-peer-record"
PEER_RECORD_PAYLOAD_TYPE = bytes([0x03, 0x01])
MAX_ENVELOPE = 8 * 1024
MAX_RECORD_ADDRS = 64
MAX_ADDR_BYTES = 1024


class EnvelopeError(ProtobufError):
    """An envelope is malformed, signed for another domain, or its signature is bad."""


def _signed_bytes(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    raw_domain = domain.encode("utf-8")
    return b"".join(
        (
            encode_varint(len(raw_domain)),
            raw_domain,
            encode_varint(len(payload_type)),
            payload_type,
            encode_varint(len(payload)),
            payload,
        )
    )


@dataclass(frozen=True, slots=True)
class Envelope:
    public_key: PublicKey
    payload_type: bytes
    payload: bytes
    signature: bytes

    @classmethod
    def seal(cls, key: PrivateKey, domain: str, payload_type: bytes, payload: bytes) -> Envelope:
        signature = key.sign(_signed_bytes(domain, payload_type, payload))
        return cls(key.public_key, payload_type, payload, signature)

    def verify(self, domain: str) -> bool:
        return self.public_key.verify(
            self.signature, _signed_bytes(domain, self.payload_type, self.payload)
        )

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.public_key.to_protobuf())
            .bytes_(2, self.payload_type)
            .bytes_(3, self.payload)
            .bytes_(5, self.signature)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        if len(data) > MAX_ENVELOPE:
            raise EnvelopeError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE}")
        fields = parse_fields(data, max_fields=32)
        try:
            key = PublicKey.from_protobuf(fields.bytes_(1, max_len=MAX_ENVELOPE))
        except KeyDecodeError as exc:
            raise EnvelopeError(f"envelope key: {exc}") from None
        return cls(
            key,
            fields.bytes_(2, max_len=16),
            fields.bytes_(3, max_len=MAX_ENVELOPE),
            fields.bytes_(5, max_len=1024),
        )


@dataclass(frozen=True, slots=True)
class PeerRecord:
    peer_id: bytes
    seq: int
    addrs: tuple[bytes, ...]

    def encode(self) -> bytes:
        writer = Writer().bytes_(1, self.peer_id).uint(2, self.seq)
        for addr in self.addrs:
            writer.bytes_(3, Writer().bytes_(1, addr).finish(), always=True)
        return writer.finish()

    @classmethod
    def decode(cls, data: bytes) -> PeerRecord:
        fields = parse_fields(data, max_fields=MAX_RECORD_ADDRS + 8)
        addrs = tuple(
            parse_fields(info, max_fields=8).bytes_(1, max_len=MAX_ADDR_BYTES)
            for info in fields.repeated_bytes(
                3, max_len=MAX_ADDR_BYTES + 8, max_count=MAX_RECORD_ADDRS
            )
        )
        return cls(fields.bytes_(1, max_len=64), fields.uint(2), addrs)


def seal_peer_record(
    key: PrivateKey, addrs: tuple[bytes, ...] | list[bytes], seq: int | None = None
) -> bytes:
    """An encoded envelope carrying our signed peer record (``seq`` defaults to the time in ns)."""
    record = PeerRecord(
        key.public_key.peer_id_bytes(), seq if seq is not None else time.time_ns(), tuple(addrs)
    )
    return Envelope.seal(
        key, PEER_RECORD_DOMAIN, PEER_RECORD_PAYLOAD_TYPE, record.encode()
    ).encode()


def open_peer_record(data: bytes, expected_peer_id: bytes | None = None) -> PeerRecord:
    """Decode and check a signed peer record: signature, payload type, and who it is about."""
    envelope = Envelope.decode(data)
    if envelope.payload_type != PEER_RECORD_PAYLOAD_TYPE:
        raise EnvelopeError(
            f"envelope payload type {envelope.payload_type.hex()} is not a peer record"
        )
    if not envelope.verify(PEER_RECORD_DOMAIN):
        raise EnvelopeError("peer record envelope signature is bad")
    record = PeerRecord.decode(envelope.payload)
    if record.peer_id != envelope.public_key.peer_id_bytes():
        raise EnvelopeError("peer record names a peer other than its signer")
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise EnvelopeError("peer record is about another peer than the connection's")
    return record
