"""Signed atoms: the unit of cluster state, of its deltas, and of what is verified before merge.

Every CRDT in :mod:`latticaray.state` is a map of *slots* ``(collection, key, subkey)``, and each
slot holds the greatest :class:`Atom` written to it, ordered by ``(hlc, author, signature)``. That
pointwise maximum is a join-semilattice, so merging is commutative, associative and idempotent, and
a *delta* is simply a set of atoms. Each atom carries its author's Ed25519 signature over its
whole content (domain-separated with :data:`ATOM_SIGNING_DOMAIN`), so atoms can be batched,
joined and forwarded by anyone while no one can forge or re-attribute them.

Wire form (msgpack array, see docs/protocol/state.md)::

    [collection: str, key: str, subkey: str, wall_ms: int, logical: int,
     author: bin (peer ID bytes), tombstone: bool, value: bin (msgpack), signature: bin(64)]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from ..mesh.identity import KeyPair, PeerId, PeerIdError
from .errors import DeltaTooLarge, MalformedDelta, SignatureInvalid
from .hlc import Hlc

__all__ = [
    "ATOM_SIGNING_DOMAIN",
    "DEFAULT_LIMITS",
    "Atom",
    "Limits",
    "SlotId",
    "atom_fingerprint",
    "decode_atom",
    "decode_value",
    "encode_atom",
    "encode_value",
    "sign_atom",
    "slot_hash",
    "verify_atom",
]

ATOM_SIGNING_DOMAIN = "latticaray/state/atom/1"
SIGNATURE_LEN = 64

SlotId = tuple[str, str, str]


@dataclass(frozen=True)
class Limits:
    """Size bounds applied to everything decoded from the network or disk."""

    max_collection_len: int = 64
    max_key_len: int = 256
    max_subkey_len: int = 256
    max_value_bytes: int = 16 * 1024
    max_message_bytes: int = 1024 * 1024
    max_atoms_per_message: int = 2048


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Atom:
    collection: str
    key: str
    subkey: str
    hlc: Hlc
    author: PeerId
    tombstone: bool
    value: bytes
    signature: bytes

    @property
    def slot(self) -> SlotId:
        return (self.collection, self.key, self.subkey)

    @property
    def order(self) -> tuple[int, int, bytes, bytes]:
        """Total order within a slot: later HLC wins, ties by peer ID, then by signature."""
        return (self.hlc.wall_ms, self.hlc.logical, self.author.to_bytes(), self.signature)

    def decoded_value(self) -> Any:
        return decode_value(self.value)

    def signed_bytes(self) -> bytes:
        return _signing_payload(
            self.collection,
            self.key,
            self.subkey,
            self.hlc,
            self.author,
            self.tombstone,
            self.value,
        )


def encode_value(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def decode_value(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedDelta(f"atom value is not valid msgpack: {exc}") from None


def _signing_payload(
    collection: str, key: str, subkey: str, hlc: Hlc, author: PeerId, tombstone: bool, value: bytes
) -> bytes:
    return msgpack.packb(
        [
            ATOM_SIGNING_DOMAIN,
            collection,
            key,
            subkey,
            hlc.wall_ms,
            hlc.logical,
            author.to_bytes(),
            tombstone,
            value,
        ],
        use_bin_type=True,
    )


def sign_atom(
    key_pair: KeyPair,
    collection: str,
    key: str,
    subkey: str,
    hlc: Hlc,
    value: bytes = b"",
    tombstone: bool = False,
) -> Atom:
    """Create an atom authored and signed by ``key_pair``."""
    author = key_pair.peer_id
    signature = key_pair.sign(
        _signing_payload(collection, key, subkey, hlc, author, tombstone, value)
    )
    return Atom(collection, key, subkey, hlc, author, tombstone, value, signature)


def verify_atom(atom: Atom) -> None:
    """Raise :class:`SignatureInvalid` unless the atom is signed by the key of its author."""
    if not atom.author.verify(atom.signature, atom.signed_bytes()):
        raise SignatureInvalid(
            f"bad signature on {atom.collection}/{atom.key}/{atom.subkey} claimed by "
            f"{atom.author.short()}"
        )


def encode_atom(atom: Atom) -> list:
    return [
        atom.collection,
        atom.key,
        atom.subkey,
        atom.hlc.wall_ms,
        atom.hlc.logical,
        atom.author.to_bytes(),
        atom.tombstone,
        atom.value,
        atom.signature,
    ]


_peer_cache: dict[bytes, PeerId] = {}
_PEER_CACHE_MAX = 65536


def _peer_from_bytes(data: bytes) -> PeerId:
    peer = _peer_cache.get(data)
    if peer is None:
        try:
            peer = PeerId.from_bytes(data)
        except PeerIdError as exc:
            raise MalformedDelta(f"atom author is not a valid peer ID: {exc}") from None
        if len(_peer_cache) >= _PEER_CACHE_MAX:
            _peer_cache.clear()
        _peer_cache[data] = peer
    return peer


def _check_str(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise MalformedDelta(f"atom {name} must be a string, got {type(value).__name__}")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise DeltaTooLarge(f"atom {name} is longer than {limit} bytes")
    return value


def _check_uint(value: Any, name: str, limit: int) -> int:
    if type(value) is not int or value < 0 or value > limit:
        raise MalformedDelta(f"atom {name} must be an integer in [0, {limit}], got {value!r}")
    return value


def decode_atom(item: Any, limits: Limits = DEFAULT_LIMITS) -> Atom:
    """Decode one wire atom with strict type and size checks (signature is *not* checked here)."""
    if not isinstance(item, (list, tuple)) or len(item) != 9:
        raise MalformedDelta("an atom must be an array of 9 fields")
    collection, key, subkey, wall, logical, author, tombstone, value, signature = item
    collection = _check_str(collection, "collection", limits.max_collection_len)
    key = _check_str(key, "key", limits.max_key_len)
    subkey = _check_str(subkey, "subkey", limits.max_subkey_len)
    wall = _check_uint(wall, "wall time", 2**53)
    logical = _check_uint(logical, "logical counter", 2**31 - 1)
    if not isinstance(author, bytes) or len(author) > 64:
        raise MalformedDelta("atom author must be peer ID bytes")
    if not isinstance(tombstone, bool):
        raise MalformedDelta("atom tombstone flag must be a boolean")
    if not isinstance(value, bytes):
        raise MalformedDelta("atom value must be bytes")
    if len(value) > limits.max_value_bytes:
        raise DeltaTooLarge(f"atom value is {len(value)} bytes (limit {limits.max_value_bytes})")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise MalformedDelta(f"atom signature must be {SIGNATURE_LEN} bytes")
    return Atom(
        collection,
        key,
        subkey,
        Hlc(wall, logical),
        _peer_from_bytes(author),
        tombstone,
        value,
        signature,
    )


def slot_hash(slot: SlotId) -> int:
    """A 64-bit position of the slot in the anti-entropy trie."""
    digest = hashlib.blake2b(
        msgpack.packb(list(slot), use_bin_type=True), digest_size=8, person=b"lattica-slot"
    ).digest()
    return int.from_bytes(digest, "big")


def atom_fingerprint(slot_h: int, atom: Atom) -> int:
    """A 64-bit fingerprint of one slot's content, XOR-combined into the trie's node digests."""
    digest = hashlib.blake2b(
        slot_h.to_bytes(8, "big") + atom.signature, digest_size=8, person=b"lattica-fp"
    ).digest()
    return int.from_bytes(digest, "big")
