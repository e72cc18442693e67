"""The CRDT store: slots of signed atoms, admission checks before merge, digests, and GC.

:class:`CrdtStore` holds, for every slot ``(collection, key, subkey)``, the greatest atom seen
(see :mod:`latticaray.state.atoms`). :meth:`CrdtStore.merge` is the only way remote atoms get in,
and it admits an atom only if, in order: its collection is defined, it is not past its
collection's horizon (collected tombstones, expired entries), it would change the slot (older or
duplicate atoms are dropped without further work), its clock is not too far ahead, its author is a
mesh member, it obeys its collection's write rule, its signature verifies, and the store has room.

For anti-entropy the store keeps a 16-ary trie of XOR fingerprints over the 64-bit slot hashes
(:meth:`node`, :meth:`children`, :meth:`items_under`), updated incrementally on every change, so
two replicas find their differences by descending only where digests differ.

Sans-I/O: ``now`` (seconds of wall time) is passed to every call that needs it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from ..mesh.identity import PeerId
from .atoms import Atom, SlotId, atom_fingerprint, slot_hash, verify_atom
from .errors import (
    ClockSkewError,
    ExpiredAtom,
    NotAMember,
    SignatureInvalid,
    StateError,
    StateStoreFull,
    UnknownCollection,
    WriteRejected,
)
from .hlc import HybridClock

__all__ = ["TRIE_DEPTH", "Change", "CollectionSpec", "CrdtStore", "MergeReport", "WriteRule"]

log = logging.getLogger(__name__)

#: Levels of the 16-ary digest trie below the root (nibbles of the slot hash).
TRIE_DEPTH = 6

WriteRule = Callable[[Atom], "str | None"]


def any_member(atom: Atom) -> str | None:
    return None


@dataclass(frozen=True)
class CollectionSpec:
    """How one collection is governed.

    ``rule(atom)`` returns a reason string to reject the atom, or ``None`` to accept it.
    ``live_ttl`` (seconds): live atoms older than this expire everywhere (e.g. heartbeats).
    """

    name: str
    rule: WriteRule = any_member
    live_ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    slot: SlotId
    old: Atom | None
    new: Atom | None


@dataclass
class MergeReport:
    applied: list[Atom] = field(default_factory=list)
    stale: int = 0
    rejected: list[tuple[Atom, StateError]] = field(default_factory=list)


class CrdtStore:
    """All slots of one replica. ``is_member(peer_id)`` admits authors (default: everyone)."""

    def __init__(
        self,
        clock: HybridClock | None = None,
        *,
        is_member: Callable[[PeerId], bool] | None = None,
        tombstone_ttl: float = 24 * 3600.0,
        max_slots: int = 1_000_000,
        max_slots_per_author: int = 100_000,
    ) -> None:
        self.clock = clock if clock is not None else HybridClock()
        self.is_member = is_member if is_member is not None else (lambda peer: True)
        self.tombstone_ttl = tombstone_ttl
        self.max_slots = max_slots
        self.max_slots_per_author = max_slots_per_author
        self._per_author: Counter = Counter()
        self._specs: dict[str, CollectionSpec] = {}
        self._tree: dict[str, dict[str, dict[str, Atom]]] = {}
        self._hash: dict[SlotId, int] = {}
        self._fingerprint: dict[SlotId, int] = {}
        self._positions: SortedList = SortedList()
        self._node_fp: list[dict[int, int]] = [defaultdict(int) for _ in range(TRIE_DEPTH + 1)]
        self._node_count: list[dict[int, int]] = [defaultdict(int) for _ in range(TRIE_DEPTH + 1)]
        self._watchers: dict[str, list[Callable[[list[Change]], None]]] = defaultdict(list)
        self._size = 0

    # schema -----------------------------------------------------------------------------------
    def define(self, spec: CollectionSpec) -> None:
        self._specs[spec.name] = spec
        self._tree.setdefault(spec.name, {})

    def spec(self, collection: str) -> CollectionSpec:
        try:
            return self._specs[collection]
        except KeyError:
            raise UnknownCollection(f"collection {collection!r} is not defined") from None

    # reads ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def get(self, slot: SlotId) -> Atom | None:
        return self._tree.get(slot[0], {}).get(slot[1], {}).get(slot[2])

    def key_slots(self, collection: str, key: str) -> dict[str, Atom]:
        """Subkey -> atom for one key (a read-only view; do not mutate)."""
        return self._tree.get(collection, {}).get(key, {})

    def keys(self, collection: str) -> list[str]:
        return list(self._tree.get(collection, {}))

    def atoms(self) -> Iterator[Atom]:
        for keys in self._tree.values():
            for subkeys in keys.values():
                yield from subkeys.values()

    # watching ---------------------------------------------------------------------------------
    def watch(
        self, collection: str, callback: Callable[[list[Change]], None]
    ) -> Callable[[], None]:
        """Call ``callback(changes)`` after every merge, local write or GC touching ``collection``.

        Returns a function that removes the watch.
        """
        self._watchers[collection].append(callback)
        return lambda: (
            self._watchers[collection].remove(callback)
            if callback in self._watchers[collection]
            else None
        )

    def _notify(self, changes: list[Change]) -> None:
        by_collection: dict[str, list[Change]] = defaultdict(list)
        for change in changes:
            by_collection[change.slot[0]].append(change)
        for collection, group in by_collection.items():
            for callback in list(self._watchers.get(collection, ())):
                try:
                    callback(group)
                except Exception:  # a watcher's bug must not break replication
                    log.exception("state watcher for %r raised", collection)

    # writes -----------------------------------------------------------------------------------
    def apply_local(self, atom: Atom) -> Change:
        """Apply an atom this replica just signed (trusted; no admission checks).

        Like any merge it only replaces an older atom, so every replica keeps the same maximum.
        """
        current = self.get(atom.slot)
        if current is not None and current.order >= atom.order:
            return Change(atom.slot, current, current)
        change = self._put(atom)
        self._notify([change])
        return change

    def admit(self, atom: Atom, now: float) -> bool:
        """Admission check: False if ``atom`` would not change its slot; raises if inadmissible."""
        spec = self.spec(atom.collection)
        ttl = self.tombstone_ttl if atom.tombstone else spec.live_ttl
        if ttl is not None and atom.hlc.wall_ms < int((now - ttl) * 1000):
            raise ExpiredAtom(
                f"atom {atom.collection}/{atom.key} at {atom.hlc} is past its collection's horizon"
            )
        current = self.get(atom.slot)
        if current is not None and current.order >= atom.order:
            return False
        self.clock.check(atom.hlc, now)
        if not self.is_member(atom.author):
            raise NotAMember(f"author {atom.author.short()} is not a member of this mesh")
        reason = spec.rule(atom)
        if reason is not None:
            raise WriteRejected(
                f"{atom.collection}/{atom.key}/{atom.subkey} by {atom.author.short()}: {reason}"
            )
        verify_atom(atom)
        if current is None and self._size >= self.max_slots:
            raise StateStoreFull(f"store holds {self._size} slots (limit {self.max_slots})")
        if (current is None or current.author != atom.author) and self._per_author[
            atom.author
        ] >= self.max_slots_per_author:
            raise StateStoreFull(
                f"author {atom.author.short()} already holds {self.max_slots_per_author} slots"
            )
        return True

    def merge(self, atoms: Iterable[Atom], now: float) -> MergeReport:
        """Merge remote atoms; inadmissible ones are reported, never raised, never applied."""
        report = MergeReport()
        changes: list[Change] = []
        for atom in atoms:
            try:
                if not self.admit(atom, now):
                    report.stale += 1
                    continue
            except (
                ClockSkewError,
                ExpiredAtom,
                NotAMember,
                SignatureInvalid,
                StateStoreFull,
                WriteRejected,
            ) as exc:
                report.rejected.append((atom, exc))
                continue
            self.clock.observe(atom.hlc, now)
            changes.append(self._put(atom))
            report.applied.append(atom)
        if changes:
            self._notify(changes)
        return report

    def gc(self, now: float) -> list[Change]:
        """Drop tombstones past ``tombstone_ttl`` and live atoms past their collection's TTL."""
        tombstone_horizon = int((now - self.tombstone_ttl) * 1000)
        doomed: list[Atom] = []
        for collection, keys in self._tree.items():
            spec = self._specs.get(collection)
            live_horizon = (
                int((now - spec.live_ttl) * 1000)
                if spec is not None and spec.live_ttl is not None
                else None
            )
            for subkeys in keys.values():
                for atom in subkeys.values():
                    if atom.tombstone:
                        if atom.hlc.wall_ms < tombstone_horizon:
                            doomed.append(atom)
                    elif live_horizon is not None and atom.hlc.wall_ms < live_horizon:
                        doomed.append(atom)
        changes = [self._remove(atom) for atom in doomed]
        if changes:
            self._notify(changes)
        return changes

    def _put(self, atom: Atom) -> Change:
        slot = atom.slot
        subkeys = self._tree.setdefault(atom.collection, {}).setdefault(atom.key, {})
        old = subkeys.get(atom.subkey)
        h = self._hash.get(slot)
        if h is None:
            h = self._hash[slot] = slot_hash(slot)
        fp = atom_fingerprint(h, atom)
        if old is not None:
            self._trie_update(h, self._fingerprint[slot] ^ fp, 0)
            self._per_author[old.author] -= 1
        else:
            self._positions.add((h, slot))
            self._trie_update(h, fp, 1)
            self._size += 1
        self._fingerprint[slot] = fp
        self._per_author[atom.author] += 1
        subkeys[atom.subkey] = atom
        return Change(slot, old, atom)

    def _remove(self, atom: Atom) -> Change:
        slot = atom.slot
        keys = self._tree[atom.collection]
        subkeys = keys[atom.key]
        del subkeys[atom.subkey]
        if not subkeys:
            del keys[atom.key]
        h = self._hash.pop(slot)
        self._positions.remove((h, slot))
        self._trie_update(h, self._fingerprint.pop(slot), -1)
        self._size -= 1
        self._per_author[atom.author] -= 1
        if not self._per_author[atom.author]:
            del self._per_author[atom.author]
        return Change(slot, atom, None)

    # digest trie ------------------------------------------------------------------------------
    def _trie_update(self, h: int, fp_delta: int, count_delta: int) -> None:
        for depth in range(TRIE_DEPTH + 1):
            prefix = h >> (64 - 4 * depth)
            fps = self._node_fp[depth]
            fps[prefix] ^= fp_delta
            if count_delta:
                counts = self._node_count[depth]
                counts[prefix] += count_delta
                if counts[prefix] == 0:
                    del counts[prefix]
                    fps.pop(prefix, None)

    def node(self, depth: int, prefix: int) -> tuple[int, int]:
        """``(fingerprint, count)`` of the trie node at ``depth`` (0 = root) and ``prefix``."""
        return self._node_fp[depth].get(prefix, 0), self._node_count[depth].get(prefix, 0)

    def children(self, depth: int, prefix: int) -> list[tuple[int, int, int]]:
        """Non-empty children of a node as ``(child_prefix, fingerprint, count)``."""
        out = []
        fps, counts = self._node_fp[depth + 1], self._node_count[depth + 1]
        for nibble in range(16):
            child = (prefix << 4) | nibble
            count = counts.get(child, 0)
            if count:
                out.append((child, fps.get(child, 0), count))
        return out

    def items_under(self, depth: int, prefix: int) -> list[tuple[int, Atom]]:
        """``(slot_hash, atom)`` for every slot under a trie node, in hash order."""
        shift = 64 - 4 * depth
        low = prefix << shift
        high = (prefix + 1) << shift
        start = self._positions.bisect_left((low,))
        stop = self._positions.bisect_left((high,))
        out = []
        for h, slot in self._positions[start:stop]:
            atom = self.get(slot)
            if atom is not None:  # every position names a held slot
                out.append((h, atom))
        return out

    def slot_hash_of(self, slot: SlotId) -> int | None:
        """The trie position of a held slot (None if the slot is empty)."""
        return self._hash.get(slot)

    def slots_by(self, author: PeerId) -> int:
        """How many slots currently hold an atom by ``author`` (bounded by the per-author quota)."""
        return self._per_author.get(author, 0)

    def fingerprint(self, slot: SlotId) -> int:
        return self._fingerprint.get(slot, 0)

    def atoms_with_hash(self, h: int) -> list[Atom]:
        start = self._positions.bisect_left((h,))
        stop = self._positions.bisect_left((h + 1,))
        atoms = (self.get(slot) for _, slot in self._positions[start:stop])
        return [atom for atom in atoms if atom is not None]
