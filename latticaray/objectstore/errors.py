"""Typed errors of the object store: CIDs, blocks, serialization, the local store, the exchange."""

from __future__ import annotations


class ObjectStoreError(Exception):
    """Base class of every error raised by latticaray.objectstore."""


class InvalidCid(ObjectStoreError, ValueError):
    """A CID (binary or string) is malformed or uses an unsupported version, codec or hash."""


class CodecError(ObjectStoreError, ValueError):
    """A DAG-CBOR node, manifest or wire message is malformed, oversize or too deep."""


class BlockVerificationError(ObjectStoreError):
    """A block's bytes do not hash to the CID they were offered as."""

    def __init__(self, cid: object, message: str = "block bytes do not match their CID") -> None:
        super().__init__(f"{message}: {cid}")
        self.cid = cid


class SerializationError(ObjectStoreError):
    """An object could not be serialized, or a payload could not be deserialized."""


class ObjectNotFound(ObjectStoreError, KeyError):
    """The object is not in the store, or could not be fetched from any peer before its deadline."""

    def __init__(self, cid: object, message: str = "object not found") -> None:
        super().__init__(f"{message}: {cid}")
        self.cid = cid

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class StoreFull(ObjectStoreError, MemoryError):
    """The object does not fit in the store's budget even after evicting every unpinned object."""


class ExchangeError(ObjectStoreError):
    """A Bitswap exchange failed for a reason other than the object being absent."""
