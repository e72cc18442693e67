"""Signed DHT records, namespaced validators, and the bounded record and provider stores.

A record is ``(key, subkey, value, expiration, publisher, signature)``; the publisher signs
``msgpack([RECORD_SIGNATURE_DOMAIN, key, subkey, value, expiration])`` with its Ed25519 host key, and
anyone can check it from the publisher's peer ID alone (the key is embedded in the ID).

One key holds a map of subkeys (``None`` is the plain, subkey-less slot). Each (key, subkey) slot
keeps the record with the newest expiration, so concurrent writers under different subkeys merge on
the storing node instead of overwriting each other.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import msgpack

from ..identity import KeyPair, PeerId, PeerIdError
from .errors import RecordRejected
from .keyspace import Contact

__all__ = [
    "RECORD_SIGNATURE_DOMAIN",
    "OwnerOnlyKey",
    "OwnerOnlySubkey",
    "ProviderStore",
    "Record",
    "RecordPolicy",
    "RecordStore",
    "RecordValidator",
    "default_validators",
    "validate_record",
]

RECORD_SIGNATURE_DOMAIN = "/latticaray/dht/record/1"


class Record:
    """One signed value under (key, subkey). Immutable by convention."""

    __slots__ = ("expiration", "key", "publisher", "signature", "subkey", "value")

    def __init__(
        self,
        key: bytes,
        subkey: bytes | None,
        value: bytes,
        expiration: float,
        publisher: bytes,
        signature: bytes,
    ) -> None:
        self.key = key
        self.subkey = subkey
        self.value = value
        self.expiration = float(expiration)
        self.publisher = publisher
        self.signature = signature

    @staticmethod
    def signed_payload(key: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bytes:
        return msgpack.packb(
            [RECORD_SIGNATURE_DOMAIN, key, subkey, value, float(expiration)], use_bin_type=True
        )

    @classmethod
    def create(
        cls,
        key: bytes,
        value: bytes,
        expiration: float,
        keypair: KeyPair,
        subkey: bytes | None = None,
    ) -> Record:
        payload = cls.signed_payload(key, subkey, value, expiration)
        return cls(
            key, subkey, value, expiration, keypair.peer_id.to_bytes(), keypair.sign(payload)
        )

    @property
    def size(self) -> int:
        """Bytes this record costs a store (payload plus signature and publisher)."""
        return (
            len(self.key)
            + len(self.subkey or b"")
            + len(self.value)
            + len(self.publisher)
            + len(self.signature)
            + 8
        )

    def newer_than(self, other: Record) -> bool:
        """Conflict rule: the newest expiration wins; ties break on the signature bytes so every
        node picks the same winner."""
        if self.expiration != other.expiration:
            return self.expiration > other.expiration
        return self.signature > other.signature

    def to_wire(self) -> list:
        return [self.key, self.subkey, self.value, self.expiration, self.publisher, self.signature]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and self.to_wire() == other.to_wire()

    def __hash__(self) -> int:
        return hash(self.signature)

    def __repr__(self) -> str:
        return (
            f"Record(key={self.key!r}, subkey={self.subkey!r}, value={len(self.value)}B, "
            f"expiration={self.expiration:.1f})"
        )


class RecordValidator(Protocol):
    def validate(self, record: Record) -> None:
        """Raise :class:`RecordRejected` (reason ``unauthorized``) if the record may not exist."""


class OwnerOnlyKey:
    """Keys ``<namespace><peer-id string>`` (optionally followed by ``/...``) may be written only
    by that peer."""

    def __init__(self, namespace: bytes) -> None:
        self.namespace = namespace

    def validate(self, record: Record) -> None:
        rest = record.key[len(self.namespace) :]
        owner = rest.split(b"/", 1)[0]
        try:
            expected = str(PeerId.from_bytes(record.publisher)).encode()
        except PeerIdError:
            raise RecordRejected("unauthorized", "publisher is not a valid peer ID") from None
        if owner != expected:
            raise RecordRejected(
                "unauthorized",
                f"key {record.key[:80]!r} is owned by {owner[:60]!r}; publisher "
                f"{expected.decode()} may not write it",
            )


class OwnerOnlySubkey:
    """Under keys starting with ``namespace`` every subkey must be the publisher's peer-ID bytes,
    so each peer owns its own entry (e.g. ``capacity/gpu``) and cannot overwrite another's."""

    def __init__(self, namespace: bytes) -> None:
        self.namespace = namespace

    def validate(self, record: Record) -> None:
        if record.subkey != record.publisher:
            raise RecordRejected(
                "unauthorized",
                f"under {self.namespace!r} the subkey must be the publisher's peer ID bytes",
            )


def default_validators() -> dict[bytes, RecordValidator]:
    """Namespaces with write rules: ``peer/<id>...`` is owner-only; ``capacity/...`` entries are
    owner-only per subkey (the subkey is the advertiser's peer-ID bytes)."""
    return {b"peer/": OwnerOnlyKey(b"peer/"), b"capacity/": OwnerOnlySubkey(b"capacity/")}


@dataclass
class RecordPolicy:
    max_key_size: int = 512
    max_subkey_size: int = 512
    max_value_size: int = 64 * 1024
    max_ttl: float = 7 * 24 * 3600.0
    #: clock skew tolerated between publisher and storer when checking expiration
    clock_skew: float = 0.0


_SIGNATURE_CACHE: OrderedDict[bytes, None] = OrderedDict()
_SIGNATURE_CACHE_SIZE = 1 << 14


def _signature_ok(record: Record) -> bool:
    """Ed25519 check of the record signature, memoized by a digest of everything signed (so a
    record re-received from many replicas is verified once per process)."""
    payload = Record.signed_payload(record.key, record.subkey, record.value, record.expiration)
    digest = hashlib.sha256(record.publisher + b"\0" + record.signature + payload).digest()
    if digest in _SIGNATURE_CACHE:
        _SIGNATURE_CACHE.move_to_end(digest)
        return True
    try:
        publisher = PeerId.from_bytes(record.publisher)
    except PeerIdError:
        return False
    if not publisher.verify(record.signature, payload):
        return False
    _SIGNATURE_CACHE[digest] = None
    if len(_SIGNATURE_CACHE) > _SIGNATURE_CACHE_SIZE:
        _SIGNATURE_CACHE.popitem(last=False)
    return True


def validate_record(
    record: Record, now: float, policy: RecordPolicy, validators: dict[bytes, RecordValidator]
) -> None:
    """Raise :class:`RecordRejected` unless the record is well-formed, fresh, authorized and
    correctly signed. Cheap checks run first; the signature last."""
    if not isinstance(record.key, bytes) or not record.key or len(record.key) > policy.max_key_size:
        raise RecordRejected(
            "oversize" if isinstance(record.key, bytes) and record.key else "malformed",
            f"key must be 1..{policy.max_key_size} bytes",
        )
    if record.subkey is not None and len(record.subkey) > policy.max_subkey_size:
        raise RecordRejected(
            "oversize", f"subkey is {len(record.subkey)} bytes, limit {policy.max_subkey_size}"
        )
    if len(record.value) > policy.max_value_size:
        raise RecordRejected(
            "oversize", f"value is {len(record.value)} bytes, limit {policy.max_value_size}"
        )
    if record.expiration <= now - policy.clock_skew:
        raise RecordRejected("expired", f"record expired {now - record.expiration:.1f}s ago")
    if record.expiration > now + policy.max_ttl + policy.clock_skew:
        raise RecordRejected(
            "too_far_future", f"expiration is more than {policy.max_ttl:.0f}s ahead"
        )
    for namespace, validator in validators.items():
        if record.key.startswith(namespace):
            validator.validate(record)
    if not _signature_ok(record):
        raise RecordRejected(
            "bad_signature", "signature does not verify against the publisher's key"
        )


class RecordStore:
    """Records held by one node, bounded in total and per publisher.

    ``store`` assumes the record was validated. Quotas count slots and bytes per publisher, so one
    peer cannot fill the store; ``max_records`` bounds all slots together.
    """

    def __init__(
        self,
        max_records: int = 100_000,
        per_publisher_records: int = 1_000,
        per_publisher_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.max_records = max_records
        self.per_publisher_records = per_publisher_records
        self.per_publisher_bytes = per_publisher_bytes
        self._records: dict[bytes, dict[bytes | None, Record]] = {}
        self._usage: dict[bytes, list[int]] = {}  # publisher -> [records, bytes]
        self._count = 0
        #: when each key was last stored by a peer or republished by us (Kademlia's rule: a holder
        #: skips republishing what it received recently, since the sender republished it)
        self.last_refreshed: dict[bytes, float] = {}

    def __len__(self) -> int:
        return self._count

    def keys(self) -> list[bytes]:
        return list(self._records)

    def usage(self, publisher: bytes) -> tuple[int, int]:
        u = self._usage.get(publisher)
        return (u[0], u[1]) if u else (0, 0)

    def store(self, record: Record, now: float) -> bool:
        """Store or merge; returns False if an existing record for the slot is newer (kept)."""
        slots = self._records.get(record.key)
        old = slots.get(record.subkey) if slots is not None else None
        if old is not None:
            if old.signature == record.signature and old.expiration == record.expiration:
                self.last_refreshed[record.key] = now
                return True
            if not record.newer_than(old):
                return False
        usage = self._usage.get(record.publisher, [0, 0])
        add_count = 1 if old is None or old.publisher != record.publisher else 0
        add_bytes = record.size - (
            old.size if old is not None and old.publisher == record.publisher else 0
        )
        if (
            usage[0] + add_count > self.per_publisher_records
            or usage[1] + add_bytes > self.per_publisher_bytes
        ):
            raise RecordRejected(
                "quota",
                f"publisher would exceed its quota of "
                f"{self.per_publisher_records} records / "
                f"{self.per_publisher_bytes} bytes on this node",
            )
        if old is None and self._count >= self.max_records:
            raise RecordRejected("full", f"store holds its maximum of {self.max_records} records")
        if old is not None:
            self._release(old)
        if slots is None:
            slots = self._records[record.key] = {}
        slots[record.subkey] = record
        self._count += 1
        u = self._usage.setdefault(record.publisher, [0, 0])
        u[0] += 1
        u[1] += record.size
        self.last_refreshed[record.key] = now
        return True

    def _release(self, record: Record) -> None:
        self._count -= 1
        u = self._usage[record.publisher]
        u[0] -= 1
        u[1] -= record.size
        if u[0] <= 0:
            del self._usage[record.publisher]

    def get(self, key: bytes, now: float) -> list[Record]:
        slots = self._records.get(key)
        if not slots:
            return []
        return [r for r in slots.values() if r.expiration > now]

    def sweep(self, now: float) -> int:
        """Drop expired records; returns how many were removed."""
        removed = 0
        for key in list(self._records):
            slots = self._records[key]
            for subkey in [s for s, r in slots.items() if r.expiration <= now]:
                self._release(slots.pop(subkey))
                removed += 1
            if not slots:
                del self._records[key]
                self.last_refreshed.pop(key, None)
        return removed

    def items(self) -> Iterator[tuple[bytes, list[Record]]]:
        for key, slots in list(self._records.items()):
            yield key, list(slots.values())


class ProviderStore:
    """Provider records: which peers announced they hold a key's content, until when."""

    def __init__(
        self, max_total: int = 100_000, max_per_key: int = 64, per_provider_keys: int = 10_000
    ) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.per_provider_keys = per_provider_keys
        self._providers: dict[bytes, dict[bytes, tuple[Contact, float]]] = {}
        self._per_provider: dict[bytes, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: bytes, provider: Contact, expiration: float, now: float) -> None:
        entries = self._providers.get(key)
        if entries is not None and provider.peer_id in entries:
            entries[provider.peer_id] = (provider, expiration)
            return
        if self._per_provider.get(provider.peer_id, 0) >= self.per_provider_keys:
            raise RecordRejected(
                "quota", f"provider already announced {self.per_provider_keys} keys here"
            )
        if entries is not None and len(entries) >= self.max_per_key:
            known = entries
            oldest = min(known, key=lambda p: known[p][1])
            if entries[oldest][1] >= expiration:
                raise RecordRejected("full", f"key already has {self.max_per_key} providers")
            self._remove(key, oldest)
        if self._count >= self.max_total:
            raise RecordRejected("full", f"provider store holds its maximum of {self.max_total}")
        entries = self._providers.setdefault(key, {})
        entries[provider.peer_id] = (provider, expiration)
        self._per_provider[provider.peer_id] = self._per_provider.get(provider.peer_id, 0) + 1
        self._count += 1

    def remove(self, key: bytes, peer_id: bytes) -> None:
        """Forget ``peer_id`` as a provider of ``key`` (nothing if it is not one)."""
        if peer_id in self._providers.get(key, {}):
            self._remove(key, peer_id)

    def _remove(self, key: bytes, peer_id: bytes) -> None:
        entries = self._providers[key]
        del entries[peer_id]
        if not entries:
            del self._providers[key]
        self._count -= 1
        left = self._per_provider[peer_id] - 1
        if left:
            self._per_provider[peer_id] = left
        else:
            del self._per_provider[peer_id]

    def get(self, key: bytes, now: float) -> list[Contact]:
        entries = self._providers.get(key)
        if not entries:
            return []
        return [c for c, exp in entries.values() if exp > now]

    def sweep(self, now: float) -> int:
        removed = 0
        for key in list(self._providers):
            for pid in [p for p, (_, exp) in self._providers[key].items() if exp <= now]:
                self._remove(key, pid)
                removed += 1
        return removed
