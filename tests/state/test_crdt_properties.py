"""Property tests of the CRDT core: merge laws, convergence under reordering/duplication/loss."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latticaray.state import CrdtStore, ORSet, PNCounter, StateCore
from latticaray.state.atoms import encode_value, sign_atom
from latticaray.state.crdts import define_collection
from latticaray.state.hlc import Hlc
from latticaray.state.simulation import deterministic_key

NOW = 1_700_000_000.0
KEYS = [deterministic_key(99, i) for i in range(4)]
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def fresh_store() -> CrdtStore:
    store = CrdtStore()
    define_collection(store, "kv", "lww")
    return store


@st.composite
def lww_atoms(draw):
    key_pair = draw(st.sampled_from(KEYS))
    key = draw(st.sampled_from(["a", "b", "c"]))
    hlc = Hlc(int(NOW * 1000) - draw(st.integers(0, 5)), draw(st.integers(0, 3)))
    tombstone = draw(st.booleans())
    value = b"" if tombstone else encode_value(draw(st.integers(0, 9)))
    return sign_atom(key_pair, "kv", key, "", hlc, value, tombstone)


atom_lists = st.lists(lww_atoms(), max_size=12)


def state_of(store: CrdtStore) -> dict:
    return {a.slot: a.signature for a in store.atoms()}


def merged(*batches) -> CrdtStore:
    store = fresh_store()
    for batch in batches:
        report = store.merge(batch, NOW)
        assert not report.rejected
    return store


@PROPERTY_SETTINGS
@given(atom_lists, atom_lists)
def test_merge_is_commutative(a, b):
    assert state_of(merged(a, b)) == state_of(merged(b, a))


@PROPERTY_SETTINGS
@given(atom_lists, atom_lists, atom_lists)
def test_merge_is_associative(a, b, c):
    left = merged(a + b, c)
    right = merged(a, b + c)
    assert state_of(left) == state_of(right)
    assert left.node(0, 0) == right.node(0, 0)


@PROPERTY_SETTINGS
@given(atom_lists)
def test_merge_is_idempotent(a):
    store = merged(a)
    before = state_of(store)
    report = store.merge(a, NOW)
    assert report.applied == [] and state_of(store) == before


@PROPERTY_SETTINGS
@given(atom_lists, st.randoms(use_true_random=False))
def test_any_order_gives_the_same_digest(a, rnd):
    shuffled = list(a)
    rnd.shuffle(shuffled)
    assert merged(a).node(0, 0) == merged(shuffled).node(0, 0)


@PROPERTY_SETTINGS
@given(atom_lists)
def test_lww_winner_is_greatest_hlc_then_peer_id(a):
    store = merged(a)
    for key in ("a", "b", "c"):
        candidates = [x for x in a if x.key == key]
        held = store.get(("kv", key, ""))
        if not candidates:
            assert held is None
            continue
        best = max(candidates, key=lambda x: (x.hlc, x.author.to_bytes(), x.signature))
        assert held.signature == best.signature


# --- convergence of N replicas driving the typed CRDTs ----------------------------------------

OPS = st.lists(
    st.tuples(
        st.integers(0, 3),  # replica
        st.sampled_from(["add", "remove", "inc", "dec", "set", "delete"]),
        st.integers(0, 3),
    ),  # element / value
    min_size=1,
    max_size=25,
)


def make_replicas(n: int, clock):
    replicas = []
    for i in range(n):
        core = StateCore(KEYS[i], wall_clock=clock, rng=random.Random(i))
        core.define("sets", "orset")
        core.define("counters", "counter")
        core.lww_map("kv")
        replicas.append(core)
    return replicas


def apply_op(core: StateCore, op: str, arg: int) -> list:
    if op == "add":
        return [_orset(core).add(arg)]
    if op == "remove":
        return _orset(core).remove(arg)
    if op == "inc":
        return [_counter(core).increment(arg + 1)]
    if op == "dec":
        return [_counter(core).decrement(arg)]
    if op == "set":
        return [core.lww_map("kv").set("k", arg)]
    return [core.lww_map("kv").delete("k")]


def _orset(core) -> ORSet:
    return ORSet(core.replica, "sets", "s")


def _counter(core) -> PNCounter:
    return PNCounter(core.replica, "counters", "c")


def views(core: StateCore):
    return (
        sorted(_orset(core).elements()),
        _counter(core).value(),
        core.lww_map("kv").get("k"),
        core.store.node(0, 0),
    )


def anti_entropy_to_fixpoint(replicas, now):
    """Pairwise anti-entropy sessions over a ring, each run to completion, until digests agree."""
    for _ in range(len(replicas) * 2):
        for i, a in enumerate(replicas):
            b = replicas[(i + 1) % len(replicas)]
            _peer, data = a.replica.start_anti_entropy(b.peer_id, now)
            for _round in range(20):
                reply, _ = b.replica.handle_message(a.peer_id, data, now)
                _, sends = a.replica.handle_message(b.peer_id, reply, now)
                if not sends:
                    break
                data = sends[0][1]
        if len({r.store.node(0, 0) for r in replicas}) == 1:
            return


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(OPS, st.randoms(use_true_random=False), st.floats(0, 0.4), st.floats(0, 0.5))
def test_replicas_converge_under_reorder_duplication_and_loss(ops, rnd, loss, duplication):
    t = [NOW]
    replicas = make_replicas(4, lambda: t[0])
    in_flight = []  # (destination index, atoms)
    for who, op, arg in ops:
        t[0] += rnd.choice([0.0, 0.001, 0.5])
        delta = apply_op(replicas[who], op, arg)
        for dst in range(4):
            if dst != who and rnd.random() >= loss:
                in_flight.append((dst, delta))
                if rnd.random() < duplication:
                    in_flight.append((dst, delta))
        # deliver a random part of what is in flight, in random order
        rnd.shuffle(in_flight)
        keep = []
        for dst, delta in in_flight:
            if rnd.random() < 0.5:
                assert not replicas[dst].store.merge(delta, t[0]).rejected
            else:
                keep.append((dst, delta))
        in_flight = keep
    for dst, delta in in_flight:
        replicas[dst].store.merge(delta, t[0])
    anti_entropy_to_fixpoint(replicas, t[0])
    first = views(replicas[0])
    assert all(views(r) == first for r in replicas[1:])


def test_or_set_add_wins_over_concurrent_remove():
    t = [NOW]
    a, b = make_replicas(2, lambda: t[0])
    delta = [_orset(a).add(7)]
    b.store.merge(delta, t[0])
    removal = _orset(b).remove(7)  # b removed the add it saw ...
    concurrent_add = [_orset(a).add(7)]  # ... while a re-added 7 concurrently
    a.store.merge(removal, t[0])
    b.store.merge(concurrent_add, t[0])
    assert _orset(a).elements() == [7] and _orset(b).elements() == [7]
    assert a.store.node(0, 0) == b.store.node(0, 0)


def test_counter_sums_every_authors_increments():
    t = [NOW]
    replicas = make_replicas(3, lambda: t[0])
    deltas = []
    for i, r in enumerate(replicas):
        deltas.append(_counter(r).increment(10 * (i + 1)))
        deltas.append(_counter(r).decrement(i))
    for r in replicas:
        r.store.merge(deltas, t[0])
    assert {_counter(r).value() for r in replicas} == {60 - 3}


# --- anti-entropy finds exactly the differences ----------------------------------------------


def run_session(initiator: StateCore, responder: StateCore, now: float) -> tuple[int, int]:
    """One anti-entropy session to completion; returns (rounds, bytes both ways)."""
    _, data = initiator.replica.start_anti_entropy(responder.peer_id, now)
    total, rounds = len(data), 0
    while data is not None and rounds < 20:
        reply, _ = responder.replica.handle_message(initiator.peer_id, data, now)
        total += len(reply)
        rounds += 1
        _, sends = initiator.replica.handle_message(responder.peer_id, reply, now)
        data = sends[0][1] if sends else None
        total += len(data) if data else 0
    return rounds, total


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.integers(0, 400), st.integers(0, 6), st.integers(0, 6), st.randoms(use_true_random=False))
def test_one_anti_entropy_session_reconciles_divergent_replicas(shared, only_a, only_b, rnd):
    a = StateCore(KEYS[0], wall_clock=lambda: NOW, rng=random.Random(1))
    b = StateCore(KEYS[1], wall_clock=lambda: NOW, rng=random.Random(2))
    for core in (a, b):
        define_collection(core.store, "kv", "lww")
    stamp = iter(range(10**6))

    def atom(key_pair, key):
        return sign_atom(
            key_pair, "kv", key, "", Hlc(int(NOW * 1000), next(stamp)), encode_value(rnd.random())
        )

    common = [atom(KEYS[2], f"s{i}") for i in range(shared)]
    a.store.merge(common, NOW)
    b.store.merge(common, NOW)
    a.store.merge([atom(KEYS[0], f"a{i}") for i in range(only_a)], NOW)
    b.store.merge([atom(KEYS[1], f"b{i}") for i in range(only_b)], NOW)
    # and one slot both hold, where b has the newer version
    newer = atom(KEYS[1], "s0") if shared else None
    if newer is not None:
        b.store.merge([newer], NOW)
    rounds, traffic = run_session(a, b, NOW)
    assert a.store.node(0, 0) == b.store.node(0, 0)
    assert len(a.store) == shared + only_a + only_b
    if newer is not None:
        assert a.store.get(newer.slot).signature == newer.signature
    differences = only_a + only_b + (1 if newer else 0)
    assert rounds <= 8
    # traffic follows the differences, not the shared state
    assert traffic <= 600 * (differences + 1) + 40 * 16 * 8, (traffic, differences)
