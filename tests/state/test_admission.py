"""Verifiability and bad input: forged, re-attributed, unsigned, malformed, oversize, non-member."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.state import (
    DeltaTooLarge,
    MalformedDelta,
    NotAMember,
    StateCore,
)
from latticaray.state.atoms import Atom, encode_atom, encode_value, sign_atom
from latticaray.state.hlc import Hlc
from latticaray.state.simulation import deterministic_key

NOW = 1_700_000_000.0
ALICE, BOB, MALLORY = (deterministic_key(7, i) for i in range(3))


def core_for(key, members=None) -> StateCore:
    is_member = None if members is None else (lambda peer: peer in members)
    core = StateCore(key, wall_clock=lambda: NOW, is_member=is_member, rng=random.Random(1))
    core.lww_map("kv")
    return core


def delta_message(atoms) -> bytes:
    return msgpack.packb(
        {"v": 1, "t": "delta", "a": [encode_atom(a) for a in atoms]}, use_bin_type=True
    )


def snapshot(core: StateCore):
    return {a.slot: a.signature for a in core.store.atoms()}


def test_honest_delta_is_applied():
    alice, bob = core_for(ALICE), core_for(BOB)
    atom = alice.lww_map("kv").set("x", 1)
    bob.replica.handle_message(ALICE.peer_id, delta_message([atom]), NOW)
    assert bob.lww_map("kv").get("x") == 1


def test_forged_signature_tampered_value_and_reattribution_are_rejected():
    alice, bob = core_for(ALICE), core_for(BOB)
    honest = alice.lww_map("kv").set("x", 1)
    tampered = dataclasses.replace(honest, value=encode_value(666))
    # Mallory re-attributes her own signed atom to Alice
    mallory_signed = sign_atom(
        MALLORY, "kv", "x", "", Hlc(honest.hlc.wall_ms + 5, 0), encode_value(2)
    )
    reattributed = dataclasses.replace(mallory_signed, author=ALICE.peer_id)
    # Mallory signs with her key but claims to be Alice from the start
    forged = Atom(
        "kv",
        "x",
        "",
        Hlc(honest.hlc.wall_ms + 9, 0),
        ALICE.peer_id,
        False,
        encode_value(3),
        MALLORY.sign(b"anything"),
    )
    bob.replica.handle_message(
        MALLORY.peer_id, delta_message([tampered, reattributed, forged]), NOW
    )
    assert bob.lww_map("kv").get("x") is None
    assert bob.replica.stats.atoms_rejected["SignatureInvalid"] == 3
    bob.replica.handle_message(ALICE.peer_id, delta_message([honest]), NOW)
    assert bob.lww_map("kv").get("x") == 1


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(0, 63), st.integers(0, 7))
def test_any_single_bit_flip_in_the_signature_is_rejected(byte, bit):
    bob = core_for(BOB)
    honest = sign_atom(ALICE, "kv", "k", "", Hlc(int(NOW * 1000), 0), encode_value("v"))
    flipped = bytearray(honest.signature)
    flipped[byte] ^= 1 << bit
    bad = dataclasses.replace(honest, signature=bytes(flipped))
    report = bob.store.merge([bad], NOW)
    assert report.applied == [] and len(report.rejected) == 1


def test_unsigned_delta_is_malformed_and_changes_nothing():
    bob = core_for(BOB)
    honest = sign_atom(ALICE, "kv", "k", "", Hlc(int(NOW * 1000), 0), encode_value("v"))
    wire = encode_atom(honest)
    for signature in (b"", None, b"\x00" * 10):
        wire[8] = signature
        msg = msgpack.packb({"v": 1, "t": "delta", "a": [wire]}, use_bin_type=True)
        with pytest.raises(MalformedDelta):
            bob.replica.handle_message(ALICE.peer_id, msg, NOW)
    assert snapshot(bob) == {}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"not msgpack at all \xff\xfe",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99, "t": "delta", "a": []}),
        msgpack.packb({"v": 1, "t": "teleport"}),
        msgpack.packb({"v": 1, "t": "delta", "a": "nope"}),
        msgpack.packb({"v": 1, "t": "delta", "a": [[1, 2, 3]]}),
        msgpack.packb({"v": 1, "t": "ae", "s": 1, "n": [[9, 0, 0, 0]]}),
        msgpack.packb({"v": 1, "t": "ae", "s": 1, "n": [[1, 99, 0, 0]]}),
        msgpack.packb({"v": 1, "t": "ae", "s": "x"}),
        msgpack.packb({"v": 1, "t": "ae", "s": 1, "w": [-1]}),
        msgpack.packb({"v": 1, "t": "ihave", "h": [[1, 2]]}),
        msgpack.packb({"v": 1, "t": "ihave", "h": "x"}),
        msgpack.packb({"v": 1, "t": "iwant", "w": ["a"]}),
    ],
)
def test_malformed_messages_raise_typed_errors_and_leave_state_alone(payload):
    bob = core_for(BOB)
    bob.lww_map("kv").set("mine", 1)
    before = snapshot(bob)
    with pytest.raises(MalformedDelta):
        bob.replica.handle_message(ALICE.peer_id, payload, NOW)
    assert snapshot(bob) == before


def test_oversize_message_and_oversize_value_are_rejected():
    bob = core_for(BOB)
    with pytest.raises(DeltaTooLarge):
        bob.replica.handle_message(ALICE.peer_id, b"\x00" * (2 * 1024 * 1024), NOW)
    big = sign_atom(ALICE, "kv", "k", "", Hlc(int(NOW * 1000), 0), b"\x01" * 100_000)
    with pytest.raises(DeltaTooLarge):
        bob.replica.handle_message(ALICE.peer_id, delta_message([big]), NOW)
    with pytest.raises(DeltaTooLarge):
        core_for(ALICE).lww_map("kv").set("k", "x" * 100_000)
    long_key = sign_atom(ALICE, "kv", "k" * 1000, "", Hlc(int(NOW * 1000), 0), encode_value(1))
    with pytest.raises(DeltaTooLarge):
        bob.replica.handle_message(ALICE.peer_id, delta_message([long_key]), NOW)
    assert snapshot(bob) == {}


def test_non_member_sender_and_non_member_author_are_refused():
    members = {ALICE.peer_id, BOB.peer_id}
    alice, bob, mallory = core_for(ALICE, members), core_for(BOB, members), core_for(MALLORY)
    by_mallory = mallory.lww_map("kv").set("x", "evil")
    with pytest.raises(NotAMember):
        bob.replica.handle_message(MALLORY.peer_id, delta_message([by_mallory]), NOW)
    # a member relaying a non-member's (validly signed) atom does not launder it
    bob.replica.handle_message(ALICE.peer_id, delta_message([by_mallory]), NOW)
    assert bob.lww_map("kv").get("x") is None
    assert bob.replica.stats.atoms_rejected["NotAMember"] == 1
    # anti-entropy requests from a non-member are refused too
    _, ae = mallory.replica.start_anti_entropy(BOB.peer_id, NOW)
    with pytest.raises(NotAMember):
        bob.replica.handle_message(MALLORY.peer_id, ae, NOW)
    assert alice.lww_map("kv").get("x") is None


def test_write_rules_stop_a_member_writing_another_members_entries():
    alice = core_for(ALICE)
    value = {
        "addrs": ["/ip4/6.6.6.6/tcp/1"],
        "reachability": "public",
        "resources_total": {},
        "resources_available": {},
        "labels": {},
    }
    impostor = sign_atom(
        BOB, "members", str(ALICE.peer_id), "", Hlc(int(NOW * 1000), 0), encode_value(value)
    )
    claim_for_alice = sign_atom(
        BOB,
        "actors",
        "svc",
        str(ALICE.peer_id),
        Hlc(int(NOW * 1000), 1),
        encode_value(
            {
                "actor_id": "a",
                "host": str(BOB.peer_id),
                "state": "alive",
                "claimed_at": [int(NOW * 1000), 0],
            }
        ),
    )
    bad_schema = sign_atom(
        BOB,
        "members",
        str(BOB.peer_id),
        "",
        Hlc(int(NOW * 1000), 2),
        encode_value({"addrs": "not a list"}),
    )
    unknown = sign_atom(
        BOB, "no-such-collection", "k", "", Hlc(int(NOW * 1000), 3), encode_value(1)
    )
    alice.replica.handle_message(
        BOB.peer_id, delta_message([impostor, claim_for_alice, bad_schema, unknown]), NOW
    )
    assert alice.members.all() == [] and alice.actors.get("svc") is None
    assert alice.replica.stats.atoms_rejected["WriteRejected"] == 3
    assert alice.replica.stats.atoms_rejected["UnknownCollection"] == 1


def test_future_timestamps_and_expired_tombstones_are_rejected():
    bob = core_for(BOB)
    future = sign_atom(ALICE, "kv", "k", "", Hlc(int((NOW + 3600) * 1000), 0), encode_value(1))
    ancient_tombstone = sign_atom(
        ALICE, "kv", "j", "", Hlc(int((NOW - 10 * 86400) * 1000), 0), b"", tombstone=True
    )
    bob.replica.handle_message(ALICE.peer_id, delta_message([future, ancient_tombstone]), NOW)
    assert snapshot(bob) == {}
    assert bob.replica.stats.atoms_rejected["ClockSkewError"] == 1
    assert bob.replica.stats.atoms_rejected["ExpiredAtom"] == 1


def test_store_bound_refuses_new_slots_but_keeps_updating_existing_ones():
    bob = StateCore(BOB, wall_clock=lambda: NOW, max_slots=2)
    bob.lww_map("kv")
    atoms = [
        sign_atom(ALICE, "kv", f"k{i}", "", Hlc(int(NOW * 1000), i), encode_value(i))
        for i in range(4)
    ]
    report = bob.store.merge(atoms, NOW)
    assert len(report.applied) == 2 and len(bob.store) == 2
    update = sign_atom(ALICE, "kv", "k0", "", Hlc(int(NOW * 1000), 9), encode_value("new"))
    assert bob.store.merge([update], NOW).applied == [update]
    assert {type(e).__name__ for _, e in report.rejected} == {"StateStoreFull"}


def test_unsolicited_anti_entropy_reply_is_ignored():
    alice, bob = core_for(ALICE), core_for(BOB)
    atom = bob.lww_map("kv").set("x", 1)
    reply = msgpack.packb(
        {"v": 1, "t": "aer", "s": 12345, "c": [], "l": [], "x": [], "a": [encode_atom(atom)]},
        use_bin_type=True,
    )
    assert alice.replica.handle_message(BOB.peer_id, reply, NOW) == (None, [])
    assert alice.lww_map("kv").get("x") is None
    assert alice.replica.stats.messages_rejected["unexpected_reply"] == 1


def test_per_author_quota_stops_one_member_filling_the_store():
    bob = StateCore(BOB, wall_clock=lambda: NOW)
    bob.store.max_slots_per_author = 3
    bob.lww_map("kv")
    spam = [
        sign_atom(MALLORY, "kv", f"spam{i}", "", Hlc(int(NOW * 1000), i), encode_value(i))
        for i in range(10)
    ]
    report = bob.store.merge(spam, NOW)
    assert len(report.applied) == 3 and bob.store.slots_by(MALLORY.peer_id) == 3
    honest = sign_atom(ALICE, "kv", "mine", "", Hlc(int(NOW * 1000), 0), encode_value(1))
    assert bob.store.merge([honest], NOW).applied == [honest]
    # taking over another author's slot counts against the new author
    takeover = sign_atom(MALLORY, "kv", "mine", "", Hlc(int(NOW * 1000), 50), encode_value(2))
    assert [type(e).__name__ for _, e in bob.store.merge([takeover], NOW).rejected] == [
        "StateStoreFull"
    ]
