"""Typed delta-CRDTs over the slot store: LWW-register, LWW-map, OR-set, PN-counter, map of CRDTs.

Each type is a *view* of one collection of :class:`~latticaray.state.store.CrdtStore`; a mutation
signs one or more atoms through the replica's writer, applies them locally and returns them — the
returned atoms are the delta that replication ships. Reads interpret the slots:

* **LWW-register** — slot ``(collection, key, "")``; the greatest ``(hlc, author)`` wins.
* **LWW-map** — a map of LWW-registers, one per key; delete writes a tombstone.
* **OR-set** (add-wins) — each add is a fresh slot ``(set, "<element-id>/<author>/<hlc>")`` (a
  unique *dot*); remove tombstones only the dots it has observed, so a concurrent add survives.
* **PN-counter** — one slot per author, ``(counter, "<author>")`` holding its ``[P, N]`` totals;
  the value is ``sum(P) - sum(N)``. Only the author may write its own slot.
* **map of CRDTs** — :class:`CrdtMap`: a collection whose keys each hold a nested CRDT of one
  kind; removing a key tombstones the slots it has observed.

:func:`define_collection` registers a collection with the write rule of its kind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

from ..mesh.identity import PeerId
from .atoms import Atom, decode_value, encode_value
from .errors import MalformedDelta
from .hlc import Hlc
from .store import CollectionSpec, CrdtStore

__all__ = [
    "KINDS",
    "CrdtMap",
    "LWWMap",
    "LWWRegister",
    "ORSet",
    "PNCounter",
    "StateWriter",
    "define_collection",
]


class StateWriter(Protocol):
    store: CrdtStore
    peer_id: PeerId

    def next_hlc(self) -> Hlc: ...

    def write(
        self,
        collection: str,
        key: str,
        subkey: str,
        value: Any = None,
        *,
        tombstone: bool = False,
        hlc: Hlc | None = None,
    ) -> Atom: ...


# write rules per kind --------------------------------------------------------------------------
def _lww_rule(atom: Atom) -> str | None:
    if atom.subkey != "":
        return "LWW entries use the empty subkey"
    return None


def element_id(encoded_element: bytes) -> str:
    return hashlib.blake2b(encoded_element, digest_size=8, person=b"lattica-elem").hexdigest()


def _dot_subkey(elem_id: str, author: PeerId, hlc: Hlc) -> str:
    return f"{elem_id}/{author}/{hlc.wall_ms}.{hlc.logical}"


def _orset_rule(atom: Atom) -> str | None:
    if atom.tombstone:
        return None if atom.value == b"" else "a tombstone carries no value"
    if atom.subkey != _dot_subkey(element_id(atom.value), atom.author, atom.hlc):
        return "an OR-set add must sit at its own dot <element-id>/<author>/<hlc>"
    return None


def _counter_rule(atom: Atom) -> str | None:
    if atom.tombstone:
        return None if atom.value == b"" else "a tombstone carries no value"
    if atom.subkey != str(atom.author):
        return "a counter slot may only be written by its own author"
    try:
        value = decode_value(atom.value)
    except MalformedDelta as exc:
        return str(exc)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(v) is int and 0 <= v < 2**63 for v in value)
    ):
        return "a counter slot holds [P, N] non-negative integers"
    return None


KINDS = {"lww": _lww_rule, "orset": _orset_rule, "counter": _counter_rule}


def define_collection(
    store: CrdtStore, name: str, kind: str, live_ttl: float | None = None
) -> None:
    """Define ``name`` as a map of CRDTs of ``kind`` (``lww``, ``orset`` or ``counter``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown CRDT kind {kind!r}; expected one of {sorted(KINDS)}")
    store.define(CollectionSpec(name, KINDS[kind], live_ttl))


# views -----------------------------------------------------------------------------------------
class LWWRegister:
    """A last-writer-wins register at ``(collection, key)``."""

    def __init__(self, writer: StateWriter, collection: str, key: str) -> None:
        self._writer, self.collection, self.key = writer, collection, key

    def set(self, value: Any) -> Atom:
        return self._writer.write(self.collection, self.key, "", value)

    def clear(self) -> Atom:
        return self._writer.write(self.collection, self.key, "", tombstone=True)

    def atom(self) -> Atom | None:
        atom = self._writer.store.get((self.collection, self.key, ""))
        return None if atom is None or atom.tombstone else atom

    def get(self, default: Any = None) -> Any:
        atom = self.atom()
        return default if atom is None else atom.decoded_value()


class LWWMap:
    """A map of LWW-registers: ``collection`` key -> value."""

    def __init__(self, writer: StateWriter, collection: str) -> None:
        self._writer, self.collection = writer, collection

    def register(self, key: str) -> LWWRegister:
        return LWWRegister(self._writer, self.collection, key)

    def set(self, key: str, value: Any) -> Atom:
        return self.register(key).set(value)

    def delete(self, key: str) -> Atom:
        return self.register(key).clear()

    def get(self, key: str, default: Any = None) -> Any:
        return self.register(key).get(default)

    def __contains__(self, key: str) -> bool:
        return self.register(key).atom() is not None

    def keys(self) -> list[str]:
        return [k for k in self._writer.store.keys(self.collection) if k in self]

    def items(self) -> Iterator[tuple[str, Any]]:
        for key in self._writer.store.keys(self.collection):
            atom = self.register(key).atom()
            if atom is not None:
                yield key, atom.decoded_value()


class ORSet:
    """An add-wins observed-remove set at ``(collection, key)``; elements are msgpack values."""

    def __init__(self, writer: StateWriter, collection: str, key: str) -> None:
        self._writer, self.collection, self.key = writer, collection, key

    def add(self, element: Any) -> Atom:
        encoded = encode_value(element)
        writer = self._writer
        # the dot is fixed before signing: the writer reserves the next HLC for it
        hlc = writer.next_hlc()
        subkey = _dot_subkey(element_id(encoded), writer.peer_id, hlc)
        return writer.write(self.collection, self.key, subkey, element, hlc=hlc)

    def remove(self, element: Any) -> list[Atom]:
        """Tombstone every add of ``element`` observed here; returns the delta (maybe empty)."""
        prefix = element_id(encode_value(element)) + "/"
        live = [
            a
            for a in self._writer.store.key_slots(self.collection, self.key).values()
            if not a.tombstone and a.subkey.startswith(prefix)
        ]
        return [
            self._writer.write(self.collection, self.key, a.subkey, tombstone=True) for a in live
        ]

    def _live(self) -> dict[str, Atom]:
        out: dict[str, Atom] = {}
        for atom in self._writer.store.key_slots(self.collection, self.key).values():
            if not atom.tombstone:
                out.setdefault(atom.subkey.split("/", 1)[0], atom)
        return out

    def __contains__(self, element: Any) -> bool:
        return element_id(encode_value(element)) in self._live()

    def elements(self) -> list[Any]:
        live = self._live()
        return [live[e].decoded_value() for e in sorted(live)]

    def __len__(self) -> int:
        return len(self._live())


class PNCounter:
    """A positive-negative counter at ``(collection, key)``, one slot per author."""

    def __init__(self, writer: StateWriter, collection: str, key: str) -> None:
        self._writer, self.collection, self.key = writer, collection, key

    def _own(self) -> tuple[int, int]:
        atom = self._writer.store.get((self.collection, self.key, str(self._writer.peer_id)))
        if atom is None or atom.tombstone:
            return 0, 0
        p, n = atom.decoded_value()
        return p, n

    def increment(self, amount: int = 1) -> Atom:
        if type(amount) is not int:
            raise TypeError("counter amounts are integers")
        p, n = self._own()
        if amount >= 0:
            p += amount
        else:
            n -= amount
        return self._writer.write(self.collection, self.key, str(self._writer.peer_id), [p, n])

    def decrement(self, amount: int = 1) -> Atom:
        return self.increment(-amount)

    def value(self) -> int:
        total = 0
        for atom in self._writer.store.key_slots(self.collection, self.key).values():
            if not atom.tombstone:
                p, n = atom.decoded_value()
                total += p - n
        return total


class CrdtMap:
    """A map of CRDTs: every key of ``collection`` holds a nested CRDT of the collection's kind."""

    _VIEWS: ClassVar[dict[str, type]] = {"lww": LWWRegister, "orset": ORSet, "counter": PNCounter}

    def __init__(self, writer: StateWriter, collection: str, kind: str) -> None:
        if kind not in self._VIEWS:
            raise ValueError(f"unknown CRDT kind {kind!r}")
        self._writer, self.collection, self.kind = writer, collection, kind

    def __getitem__(self, key: str) -> LWWRegister | ORSet | PNCounter:
        return self._VIEWS[self.kind](self._writer, self.collection, key)

    def keys(self) -> list[str]:
        store = self._writer.store
        return [
            k
            for k in store.keys(self.collection)
            if any(not a.tombstone for a in store.key_slots(self.collection, k).values())
        ]

    def remove(self, key: str) -> list[Atom]:
        """Observed-remove of a whole key: tombstones every live slot seen here."""
        live = [
            a
            for a in self._writer.store.key_slots(self.collection, key).values()
            if not a.tombstone
        ]
        return [self._writer.write(self.collection, key, a.subkey, tombstone=True) for a in live]
