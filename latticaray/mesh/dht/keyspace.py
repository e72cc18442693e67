"""The 256-bit XOR keyspace: DHT ids of peers and keys, distances, bucket indices, contacts.

A peer's DHT id is SHA-256 of its peer-ID bytes; a key's DHT id is SHA-256 of the key bytes.
Ids are Python ints so XOR distance and comparisons are single machine-level operations.

This is libp2p Kademlia's keyspace, so lookups can run through foreign libp2p nodes: a signed
latticaray record of key ``k`` lives at ``/latticaray/`` + ``k`` (:func:`record_id`, the key it
travels under in ``/ipfs/kad/1.0.0``), a provider record at the multihash of the CID.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

__all__ = [
    "ID_BITS",
    "RECORD_NAMESPACE",
    "Contact",
    "bucket_index",
    "dht_id",
    "id_from_bytes",
    "id_to_bytes",
    "key_id",
    "record_id",
]

ID_BITS = 256
ID_BYTES = ID_BITS // 8


@lru_cache(maxsize=1 << 16)
def dht_id(peer_id_bytes: bytes) -> int:
    """The DHT id of a peer: SHA-256 of its peer-ID bytes, as an int (cached; ids repeat a lot)."""
    return int.from_bytes(hashlib.sha256(peer_id_bytes).digest(), "big")


def key_id(key: bytes) -> int:
    """The DHT id of a record or provider key: SHA-256 of the key bytes."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


#: The namespace latticaray's signed records travel under in libp2p Kademlia.
RECORD_NAMESPACE = b"/latticaray/"


def record_id(key: bytes) -> int:
    """The DHT id of a latticaray record key: that of its libp2p key ``/latticaray/<key>``."""
    return key_id(RECORD_NAMESPACE + key)


def id_to_bytes(node_id: int) -> bytes:
    return node_id.to_bytes(ID_BYTES, "big")


def id_from_bytes(data: bytes) -> int:
    if len(data) != ID_BYTES:
        raise ValueError(f"a DHT id is {ID_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def bucket_index(local_id: int, other_id: int) -> int:
    """Index of the k-bucket ``other_id`` belongs to: floor(log2(distance)); -1 for ourselves."""
    return (local_id ^ other_id).bit_length() - 1


class Contact:
    """A peer as the DHT knows it: peer-ID bytes, its DHT id, and the addresses it was seen at."""

    __slots__ = ("addrs", "node_id", "peer_id")

    def __init__(
        self, peer_id: bytes, addrs: tuple[str, ...] = (), node_id: int | None = None
    ) -> None:
        self.peer_id = peer_id
        self.node_id = dht_id(peer_id) if node_id is None else node_id
        self.addrs = tuple(addrs)

    def with_addrs(self, addrs: tuple[str, ...]) -> Contact:
        return Contact(self.peer_id, addrs, self.node_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Contact) and other.peer_id == self.peer_id

    def __hash__(self) -> int:
        return hash(self.peer_id)

    def __repr__(self) -> str:
        return f"Contact({self.peer_id[-6:].hex()}, id={self.node_id >> 224:08x}…)"
