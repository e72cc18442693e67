"""Record validation (signatures, expiry, size, namespaces) and the bounded record/provider stores."""

from __future__ import annotations

import pytest

from latticaray.mesh.dht.errors import RecordRejected
from latticaray.mesh.dht.keyspace import Contact
from latticaray.mesh.dht.records import (
    ProviderStore,
    Record,
    RecordPolicy,
    RecordStore,
    default_validators,
    validate_record,
)
from latticaray.mesh.identity import KeyPair

NOW = 1_000_000.0
POLICY = RecordPolicy(max_value_size=1024)


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="module")
def mallory() -> KeyPair:
    return KeyPair.generate()


def _check(record: Record, now: float = NOW) -> None:
    validate_record(record, now, POLICY, default_validators())


def _reason(record: Record, now: float = NOW) -> str:
    with pytest.raises(RecordRejected) as info:
        _check(record, now)
    return info.value.reason


def test_valid_record_passes(alice):
    _check(Record.create(b"k", b"v", NOW + 60, alice, subkey=b"s"))


def test_forged_signature_rejected(alice, mallory):
    good = Record.create(b"k", b"v", NOW + 60, alice)
    tampered = Record(
        good.key, good.subkey, b"other", good.expiration, good.publisher, good.signature
    )
    assert _reason(tampered) == "bad_signature"
    # mallory signs but claims alice as publisher
    forged = Record.create(b"k", b"v", NOW + 60, mallory)
    claimed = Record(b"k", None, b"v", NOW + 60, alice.peer_id.to_bytes(), forged.signature)
    assert _reason(claimed) == "bad_signature"
    moved = Record(b"k", b"sub", good.value, good.expiration, good.publisher, good.signature)
    assert _reason(moved) == "bad_signature", "the subkey is covered by the signature"
    junk = Record(b"k", None, b"v", NOW + 60, b"not-a-peer-id", b"x" * 64)
    assert _reason(junk) == "bad_signature"


def test_expired_oversize_and_far_future_rejected(alice):
    assert _reason(Record.create(b"k", b"v", NOW - 1, alice)) == "expired"
    assert _reason(Record.create(b"k", b"v" * 1025, NOW + 60, alice)) == "oversize"
    assert _reason(Record.create(b"k" * 600, b"v", NOW + 60, alice)) == "oversize"
    assert _reason(Record.create(b"k", b"v", NOW + 10 * 24 * 3600, alice)) == "too_far_future"
    # the same record is fine while fresh, rejected once the clock passes its expiration
    record = Record.create(b"k", b"v", NOW + 60, alice)
    _check(record)
    assert _reason(record, NOW + 61) == "expired"


def test_owner_only_namespaces(alice, mallory):
    own_key = b"peer/" + str(alice.peer_id).encode() + b"/addrs"
    _check(Record.create(own_key, b"v", NOW + 60, alice))
    assert _reason(Record.create(own_key, b"v", NOW + 60, mallory)) == "unauthorized"
    _check(Record.create(b"capacity/gpu", b"4", NOW + 60, alice, subkey=alice.peer_id.to_bytes()))
    assert (
        _reason(
            Record.create(b"capacity/gpu", b"4", NOW + 60, mallory, subkey=alice.peer_id.to_bytes())
        )
        == "unauthorized"
    )


def test_newest_expiration_wins_per_subkey_and_subkeys_merge(alice, mallory):
    store = RecordStore()
    old = Record.create(b"k", b"old", NOW + 60, alice, subkey=b"a")
    new = Record.create(b"k", b"new", NOW + 120, alice, subkey=b"a")
    other = Record.create(b"k", b"m", NOW + 30, mallory, subkey=b"b")
    assert store.store(new, NOW)
    assert store.store(old, NOW) is False, "an older record never replaces a newer one"
    assert store.store(other, NOW)
    values = {r.subkey: r.value for r in store.get(b"k", NOW)}
    assert values == {b"a": b"new", b"b": b"m"}
    assert len(store) == 2
    assert {r.subkey for r in store.get(b"k", NOW + 60)} == {b"a"}, "expired entries are not served"
    assert store.sweep(NOW + 60) == 1 and len(store) == 1


def test_per_publisher_quota_and_total_bound(alice, mallory):
    store = RecordStore(max_records=5, per_publisher_records=3, per_publisher_bytes=10_000)
    for i in range(3):
        store.store(Record.create(b"k%d" % i, b"v", NOW + 60, mallory), NOW)
    with pytest.raises(RecordRejected) as info:
        store.store(Record.create(b"k9", b"v", NOW + 60, mallory), NOW)
    assert info.value.reason == "quota"
    # replacing one's own slot does not count against the quota
    assert store.store(Record.create(b"k0", b"w", NOW + 90, mallory), NOW)
    assert store.usage(mallory.peer_id.to_bytes())[0] == 3
    store.store(Record.create(b"a1", b"v", NOW + 60, alice), NOW)
    store.store(Record.create(b"a2", b"v", NOW + 60, alice), NOW)
    with pytest.raises(RecordRejected) as info:
        store.store(Record.create(b"a3", b"v", NOW + 60, alice), NOW)
    assert info.value.reason == "full"
    byte_store = RecordStore(per_publisher_bytes=2_000)
    byte_store.store(Record.create(b"big", b"x" * 1500, NOW + 60, alice), NOW)
    with pytest.raises(RecordRejected) as info:
        byte_store.store(Record.create(b"big2", b"x" * 1500, NOW + 60, alice), NOW)
    assert info.value.reason == "quota"


def test_provider_store_expires_and_bounds():
    store = ProviderStore(max_total=3, max_per_key=2, per_provider_keys=2)
    a, b, c = Contact(b"a", ("/ip4/127.0.0.1/tcp/1",)), Contact(b"b"), Contact(b"c")
    store.add(b"cid", a, NOW + 10, NOW)
    store.add(b"cid", b, NOW + 20, NOW)
    assert {p.peer_id for p in store.get(b"cid", NOW)} == {b"a", b"b"}
    store.add(b"cid", c, NOW + 30, NOW)  # evicts the provider expiring first
    assert {p.peer_id for p in store.get(b"cid", NOW)} == {b"b", b"c"}
    store.add(b"other", c, NOW + 5, NOW)
    with pytest.raises(RecordRejected) as info:
        store.add(b"third", c, NOW + 5, NOW)
    assert info.value.reason == "quota"
    assert {p.peer_id for p in store.get(b"cid", NOW + 25)} == {b"c"}
    assert store.sweep(NOW + 25) == 2
    assert len(store) == 1
