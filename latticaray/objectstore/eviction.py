"""Eviction planning, as a pure function: which objects leave memory, and which go to disk.

Given the objects in memory and in the spill directory (name, size, last use, pinned) and the
budget, :func:`plan_eviction` says what to do so that ``need`` more bytes fit: evict unpinned
objects least recently used first until the need fits; an evicted object is spilled (copied to
the spill directory) if it fits in the spill budget, after deleting least recently used spilled
objects (unpinned, never ``keep``: the object being restored) to make spill room; else it is
dropped. Pinned objects are never evicted nor spilled. No I/O, no clock: the caller (room.py)
gathers the entries, applies the steps in order, and plans again whenever a step's outcome is
not what was planned (a local object linked under its CID changes its name and size; a spill
that failed left its spill room unused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Budget", "Entry", "Evict", "EvictionPlan", "plan_eviction"]


@dataclass(frozen=True, slots=True)
class Entry:
    """An object in memory (or in the spill directory)."""

    name: str
    size: int
    last_use: int  # any monotonic order: file mtimes in ns
    pinned: bool = False
    local: bool = False  # an unresolved local object: linked under its CID before it leaves


@dataclass(frozen=True, slots=True)
class Budget:
    capacity: int
    committed: int  # bytes counted against ``capacity`` now (objects and reservations)
    spill_capacity: int
    spill_used: int


@dataclass(frozen=True, slots=True)
class Evict:
    """Evict ``name`` from memory: after deleting ``drop_spilled`` (in that order) from the
    spill directory, spill it there if ``spill``, else drop it. ``link_first``: it is a local
    object, linked under its CID first (its name and size change: plan again after)."""

    name: str
    size: int
    spill: bool
    drop_spilled: tuple[Entry, ...] = ()
    link_first: bool = False


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    steps: tuple[Evict, ...]
    fits: bool  # whether ``need`` fits once every step is done as planned


def _lru(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.last_use, e.name, e.size))


def plan_eviction(
    resident: Sequence[Entry],
    spilled: Sequence[Entry],
    need: int,
    budget: Budget,
    keep: str | None = None,
) -> EvictionPlan:
    """The steps that make ``need`` bytes fit in ``budget`` (see the module docstring)."""
    committed = budget.committed
    if committed + need <= budget.capacity:
        return EvictionPlan((), True)
    spill_used = budget.spill_used
    on_disk = [e for e in _lru(spilled) if not e.pinned and e.name != keep]
    newest = max((e.last_use for e in spilled), default=0)
    steps: list[Evict] = []
    for entry in _lru(resident):
        if committed + need <= budget.capacity:
            break
        if entry.pinned:
            continue
        drops: list[Entry] = []
        spill = False
        if entry.size <= budget.spill_capacity:
            while spill_used + entry.size > budget.spill_capacity and on_disk:
                dropped = on_disk.pop(0)
                drops.append(dropped)
                spill_used -= dropped.size
            if spill_used + entry.size <= budget.spill_capacity:
                spill = True
                spill_used += entry.size
                if entry.name != keep:  # the newest spilled object: the last to make room
                    newest += 1
                    on_disk.append(Entry(entry.name, entry.size, newest))
        steps.append(Evict(entry.name, entry.size, spill, tuple(drops), entry.local))
        committed -= entry.size
    return EvictionPlan(tuple(steps), committed + need <= budget.capacity)
