"""Circuit relay v2 messages (``/libp2p/circuit/relay/0.2.0/hop`` and ``/stop``) and vouchers.

Hop protocol (client <-> relay): ``HopMessage{type=1 (RESERVE 0, CONNECT 1, STATUS 2), peer=2
Peer{id=1, addrs=2}, reservation=3 Reservation{expire=1, addrs=2, voucher=3}, limit=4
Limit{duration=1 (s), data=2 (bytes)}, status=5}``. Stop protocol (relay -> target):
``StopMessage{type=1 (CONNECT 0, STATUS 1), peer=2, limit=3, status=4}``. Each is one
length-prefixed frame (at most 4 KiB); after an OK CONNECT the stream carries the relayed bytes.

A reservation voucher is a signed envelope (domain ``libp2p-relay-rsvp``, payload type
``0x03 0x02``) over ``Voucher{relay=1, peer=2, expiration=3}``. Only the codecs live here; the
relay service and client are future work beside :mod:`latticaray.mesh.nat.relay`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .errors import ProtobufError
from .keys import PrivateKey
from .peer_record import Envelope, EnvelopeError
from .protobuf import Fields, Writer, parse_fields

__all__ = [
    "HOP_PROTOCOL",
    "MAX_RELAY_MESSAGE",
    "STOP_PROTOCOL",
    "VOUCHER_DOMAIN",
    "VOUCHER_PAYLOAD_TYPE",
    "HopMessage",
    "HopType",
    "RelayLimit",
    "RelayPeer",
    "RelayStatus",
    "Reservation",
    "StopMessage",
    "StopType",
    "Voucher",
    "open_voucher",
]

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
VOUCHER_DOMAIN = "libp2p-relay-rsvp"
VOUCHER_PAYLOAD_TYPE = bytes([0x03, 0x02])
MAX_RELAY_MESSAGE = 4096
_MAX_ADDRS = 32
_MAX_ADDR = 512


class HopType(IntEnum):
    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(IntEnum):
    CONNECT = 0
    STATUS = 1


class RelayStatus(IntEnum):
    UNUSED = 0
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


@dataclass(frozen=True, slots=True)
class RelayPeer:
    peer_id: bytes
    addrs: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return Writer().bytes_(1, self.peer_id, always=True).repeated_bytes(2, self.addrs).finish()

    @classmethod
    def decode(cls, data: bytes) -> RelayPeer:
        f = parse_fields(data, max_fields=_MAX_ADDRS + 4)
        return cls(
            f.bytes_(1, max_len=128),
            tuple(f.repeated_bytes(2, max_len=_MAX_ADDR, max_count=_MAX_ADDRS)),
        )


@dataclass(frozen=True, slots=True)
class RelayLimit:
    duration: int = 0  # seconds; 0: no limit
    data: int = 0  # bytes each way; 0: no limit

    def encode(self) -> bytes:
        return Writer().uint(1, self.duration).uint(2, self.data).finish()

    @classmethod
    def decode(cls, data: bytes) -> RelayLimit:
        f = parse_fields(data, max_fields=8)
        return cls(f.uint(1, maximum=2**32 - 1), f.uint(2))


@dataclass(frozen=True, slots=True)
class Reservation:
    expire: int  # Unix seconds, UTC
    addrs: tuple[bytes, ...] = ()
    voucher: bytes = b""

    def encode(self) -> bytes:
        return (
            Writer()
            .uint(1, self.expire, always=True)
            .repeated_bytes(2, self.addrs)
            .bytes_(3, self.voucher)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Reservation:
        f = parse_fields(data, max_fields=_MAX_ADDRS + 4)
        return cls(
            f.uint(1),
            tuple(f.repeated_bytes(2, max_len=_MAX_ADDR, max_count=_MAX_ADDRS)),
            f.bytes_(3, max_len=MAX_RELAY_MESSAGE),
        )


def _status(f: Fields, number: int) -> RelayStatus | None:
    if not f.has(number):
        return None
    raw = f.uint(number)
    try:
        return RelayStatus(raw)
    except ValueError:
        raise ProtobufError(f"unknown relay status {raw}") from None


def _optional(f: Fields, number: int) -> bytes | None:
    return f.bytes_(number, max_len=MAX_RELAY_MESSAGE) if f.has(number) else None


def _parse(data: bytes) -> tuple[Fields, int]:
    """The fields of a hop or stop message and its raw type, size-checked."""
    if len(data) > MAX_RELAY_MESSAGE:
        raise ProtobufError(f"relay message of {len(data)} bytes exceeds {MAX_RELAY_MESSAGE}")
    f = parse_fields(data, max_fields=16)
    return f, f.uint(1)


def _write(
    kind: int,
    parts: tuple[tuple[int, RelayPeer | Reservation | RelayLimit | None], ...],
    status_field: int,
    status: RelayStatus | None,
) -> bytes:
    w = Writer().uint(1, kind, always=True)
    for number, part in parts:
        if part is not None:
            w.bytes_(number, part.encode(), always=True)
    if status is not None:
        w.uint(status_field, int(status), always=True)
    return w.finish()


@dataclass(frozen=True, slots=True)
class HopMessage:
    type: HopType
    peer: RelayPeer | None = None
    reservation: Reservation | None = None
    limit: RelayLimit | None = None
    status: RelayStatus | None = None

    def encode(self) -> bytes:
        parts = ((2, self.peer), (3, self.reservation), (4, self.limit))
        return _write(int(self.type), parts, 5, self.status)

    @classmethod
    def decode(cls, data: bytes) -> HopMessage:
        f, raw = _parse(data)
        try:
            kind = HopType(raw)
        except ValueError:
            raise ProtobufError("unknown hop message type") from None
        peer, rsvp, limit = _optional(f, 2), _optional(f, 3), _optional(f, 4)
        return cls(
            kind,
            RelayPeer.decode(peer) if peer is not None else None,
            Reservation.decode(rsvp) if rsvp is not None else None,
            RelayLimit.decode(limit) if limit is not None else None,
            _status(f, 5),
        )


@dataclass(frozen=True, slots=True)
class StopMessage:
    type: StopType
    peer: RelayPeer | None = None
    limit: RelayLimit | None = None
    status: RelayStatus | None = None

    def encode(self) -> bytes:
        return _write(int(self.type), ((2, self.peer), (3, self.limit)), 4, self.status)

    @classmethod
    def decode(cls, data: bytes) -> StopMessage:
        f, raw = _parse(data)
        try:
            kind = StopType(raw)
        except ValueError:
            raise ProtobufError("unknown stop message type") from None
        peer, limit = _optional(f, 2), _optional(f, 3)
        return cls(
            kind,
            RelayPeer.decode(peer) if peer is not None else None,
            RelayLimit.decode(limit) if limit is not None else None,
            _status(f, 4),
        )


@dataclass(frozen=True, slots=True)
class Voucher:
    relay: bytes
    peer: bytes
    expiration: int

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.relay, always=True)
            .bytes_(2, self.peer, always=True)
            .uint(3, self.expiration, always=True)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Voucher:
        f = parse_fields(data, max_fields=8)
        return cls(f.bytes_(1, max_len=128), f.bytes_(2, max_len=128), f.uint(3))

    def seal(self, relay_key: PrivateKey) -> bytes:
        """The signed envelope a relay hands out with a reservation."""
        return Envelope.seal(
            relay_key, VOUCHER_DOMAIN, VOUCHER_PAYLOAD_TYPE, self.encode()
        ).encode()


def open_voucher(data: bytes, relay_peer_id: bytes) -> Voucher:
    """Check a voucher's signature and that the relay ``relay_peer_id`` issued it."""
    envelope = Envelope.decode(data)
    if envelope.payload_type != VOUCHER_PAYLOAD_TYPE or not envelope.verify(VOUCHER_DOMAIN):
        raise EnvelopeError("not a validly signed relay reservation voucher")
    voucher = Voucher.decode(envelope.payload)
    if envelope.public_key.peer_id_bytes() != relay_peer_id or voucher.relay != relay_peer_id:
        raise EnvelopeError("voucher was not issued by this relay")
    return voucher
