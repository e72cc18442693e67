"""The ``placement_groups`` collection: placement groups, their bundles and where they are held.

A group is written only by its owner (the node that created it), in the slot
``(placement_groups, <group id>, <owner peer ID>)``: its name, strategy, bundles, lifecycle state
(``pending`` while its two-phase claim runs or waits for capacity, ``created`` once every bundle
is committed, ``removed`` at the end) and the node holding each bundle. Readers (nodes placing
tasks of the group, `placement_group_table`) take the record of the group's owner; a record whose
owner left the mesh is stale: the nodes holding its bundles release them when they see the owner
gone, as they do for a ``removed`` record.

Every node of a mesh defines the collection (:class:`PlacementGroups` does it) so that records
merge everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..mesh.identity import PeerId
from .atoms import Atom
from .schema import (
    TOMBSTONE,
    check_fields,
    check_peer_id,
    check_resources,
    check_str,
    own_entry_value,
)
from .store import Change, CollectionSpec

__all__ = ["PLACEMENT_GROUPS", "GroupRecord", "PlacementGroups"]

PLACEMENT_GROUPS = "placement_groups"
_STATES = ("pending", "created", "removed")
_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MAX_BUNDLES = 1024


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    owner: PeerId
    name: str
    strategy: str
    bundles: tuple[dict[str, float], ...]
    state: str
    #: node (peer ID string) of each bundle; "" while not placed
    nodes: tuple[str, ...]

    @classmethod
    def from_atom(cls, atom: Atom) -> GroupRecord:
        value = atom.decoded_value()
        return cls(
            atom.key,
            atom.author,
            value["name"],
            value["strategy"],
            tuple(dict(b) for b in value["bundles"]),
            value["state"],
            tuple(value["nodes"]),
        )


def groups_rule(atom: Atom) -> str | None:
    problem, value = own_entry_value(
        atom, atom.subkey == str(atom.author), "only a group's owner writes its record"
    )
    if problem or value is TOMBSTONE:
        return problem
    problem = check_fields(value, {"name", "strategy", "bundles", "state", "nodes"}) or check_str(
        value["name"], "name"
    )
    if problem:
        return problem
    if value["strategy"] not in _STRATEGIES:
        return f"unknown strategy {value['strategy']!r}"
    if value["state"] not in _STATES:
        return f"unknown state {value['state']!r}"
    bundles, nodes = value["bundles"], value["nodes"]
    if not isinstance(bundles, list) or not 0 < len(bundles) <= MAX_BUNDLES:
        return f"bundles must be a list of 1..{MAX_BUNDLES} resource maps"
    if not isinstance(nodes, list) or len(nodes) != len(bundles):
        return "nodes must list one node (or '') per bundle"
    for i, bundle in enumerate(bundles):
        problem = check_resources(bundle, f"bundle {i}")
        if problem:
            return problem
    for node in nodes:
        if node != "":
            problem = check_peer_id(node, "bundle node")
            if problem:
                return problem
    return None


class PlacementGroups:
    """Typed accessors for ``placement_groups`` (defines the collection on ``replica``)."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica
        replica.store.define(CollectionSpec(PLACEMENT_GROUPS, groups_rule))

    def get(self, group_id: str) -> GroupRecord | None:
        """The group's record (its owner's), or None when unknown or its owner dropped it."""
        slots = self._replica.store.key_slots(PLACEMENT_GROUPS, group_id)
        records = [GroupRecord.from_atom(a) for a in slots.values() if not a.tombstone]
        return records[0] if records else None

    def all(self) -> list[GroupRecord]:
        out = []
        for group_id in self._replica.store.keys(PLACEMENT_GROUPS):
            record = self.get(group_id)
            if record is not None:
                out.append(record)
        return out

    def owned_by(self, owner: PeerId) -> list[GroupRecord]:
        return [r for r in self.all() if r.owner == owner]

    def put(
        self,
        group_id: str,
        *,
        name: str,
        strategy: str,
        bundles: list[dict[str, float]],
        state: str,
        nodes: list[str],
    ) -> Atom:
        """Write this node's record of a group it owns."""
        value = {
            "name": name,
            "strategy": strategy,
            "bundles": [dict(b) for b in bundles],
            "state": state,
            "nodes": list(nodes),
        }
        return self._replica.write(PLACEMENT_GROUPS, group_id, str(self._replica.peer_id), value)

    def drop(self, group_id: str) -> Atom:
        return self._replica.write(
            PLACEMENT_GROUPS, group_id, str(self._replica.peer_id), tombstone=True
        )

    def watch(self, callback: Callable[[str, GroupRecord | None], None]) -> Callable[[], None]:
        """``callback(group_id, record_or_None)`` whenever a group's record changes."""

        def on_changes(changes: list[Change]) -> None:
            for group_id in dict.fromkeys(c.slot[1] for c in changes):
                callback(group_id, self.get(group_id))

        return self._replica.store.watch(PLACEMENT_GROUPS, on_changes)
