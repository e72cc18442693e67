"""The ``members`` collection: who is in the mesh, how to reach them, what they offer, and liveness.

Each member writes only its own entry (key = its peer ID; enforced by the write rule on every
replica), re-signed at every heartbeat. Liveness is judged locally from the age of the latest
heartbeat (the HLC time of the member's entry): ``alive`` below ``suspect_after``, ``suspect``
below ``dead_after``, then ``dead`` (thresholds stretch with the heartbeat interval as the mesh
grows, see :class:`FailureDetector`). Entries older than ``remove_after`` expire on every replica
(the collection's TTL) and are refused if they arrive later, so departed peers do not accumulate.
A member leaving cleanly writes a tombstone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..mesh.identity import PeerId
from .atoms import Atom
from .schema import (
    TOMBSTONE,
    check_fields,
    check_labels,
    check_resources,
    check_str,
    own_entry_value,
)
from .store import Change, CollectionSpec

__all__ = ["MEMBERS", "FailureDetector", "Liveness", "MemberInfo", "MemberReachability", "Members"]

MEMBERS = "members"
MAX_ADDRS = 32


class MemberReachability(str, Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    RELAYED = "relayed"
    UNKNOWN = "unknown"


class Liveness(str, Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True)
class FailureDetector:
    """Heartbeat-age thresholds (seconds) for a small mesh, stretched as the mesh grows.

    Every member heartbeats every :meth:`interval_for` seconds: ``heartbeat_interval`` until the
    mesh has ``heartbeats_per_second`` members, then slower, so the whole mesh gossips about
    ``heartbeats_per_second`` heartbeats per second. The suspect and dead thresholds stretch by
    the same factor, capped at a quarter and a half of ``remove_after``.
    """

    suspect_after: float = 5.0
    dead_after: float = 15.0
    remove_after: float = 120.0
    heartbeat_interval: float = 1.0
    heartbeats_per_second: float = 50.0

    def interval_for(self, members: int) -> float:
        return max(self.heartbeat_interval, members / self.heartbeats_per_second)

    def thresholds(self, members: int) -> tuple[float, float]:
        scale = self.interval_for(members) / self.heartbeat_interval
        return (
            min(self.suspect_after * scale, max(self.suspect_after, self.remove_after / 4)),
            min(self.dead_after * scale, max(self.dead_after, self.remove_after / 2)),
        )

    def judge(self, heartbeat: float, now: float, members: int = 0) -> Liveness:
        suspect_after, dead_after = self.thresholds(members)
        age = now - heartbeat
        if age < suspect_after:
            return Liveness.ALIVE
        if age < dead_after:
            return Liveness.SUSPECT
        return Liveness.DEAD


@dataclass(frozen=True)
class MemberInfo:
    peer_id: PeerId
    addrs: tuple[str, ...]
    reachability: MemberReachability
    resources_total: dict[str, float] = field(default_factory=dict)
    resources_available: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    #: Wall time (seconds) of the member's latest heartbeat, from its signed HLC timestamp.
    heartbeat: float = 0.0

    @classmethod
    def from_atom(cls, atom: Atom) -> MemberInfo:
        value = atom.decoded_value()
        return cls(
            atom.author,
            tuple(value["addrs"]),
            MemberReachability(value["reachability"]),
            dict(value["resources_total"]),
            dict(value["resources_available"]),
            dict(value["labels"]),
            atom.hlc.seconds,
        )


_FIELDS = {"addrs", "reachability", "resources_total", "resources_available", "labels"}


def validate_member_value(value: Any) -> str | None:
    problem = check_fields(value, _FIELDS)
    if problem:
        return problem
    addrs = value["addrs"]
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        return f"addrs must be a list of at most {MAX_ADDRS} multiaddrs"
    for addr in addrs:
        problem = check_str(addr, "address", 512)
        if problem:
            return problem
    if value["reachability"] not in {r.value for r in MemberReachability}:
        return f"unknown reachability {value['reachability']!r}"
    return (
        check_resources(value["resources_total"], "resources_total")
        or check_resources(value["resources_available"], "resources_available")
        or check_labels(value["labels"], "labels")
    )


def members_rule(atom: Atom) -> str | None:
    problem, value = own_entry_value(
        atom,
        atom.key == str(atom.author) and atom.subkey == "",
        "a member may only write its own entry",
    )
    if problem or value is TOMBSTONE:
        return problem
    return validate_member_value(value)


def members_spec(detector: FailureDetector) -> CollectionSpec:
    return CollectionSpec(MEMBERS, members_rule, live_ttl=detector.remove_after)


class Members:
    """Typed accessors for ``members`` over a replica (see :class:`~.replication.Replica`)."""

    def __init__(self, replica: Any, detector: FailureDetector | None = None) -> None:
        self._replica = replica
        self.detector = detector or FailureDetector()
        replica.store.define(members_spec(self.detector))

    def _now(self, now: float | None) -> float:
        return self._replica.wall_clock() if now is None else now

    def upsert_self(
        self,
        *,
        addrs: list[str] | None = None,
        reachability: MemberReachability | str | None = None,
        resources_total: dict[str, float] | None = None,
        resources_available: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
    ) -> Atom:
        """Publish this node's entry (also a heartbeat); omitted fields keep their last value."""
        current = self.get(self._replica.peer_id)
        value = {
            "addrs": list(addrs if addrs is not None else (current.addrs if current else [])),
            "reachability": MemberReachability(
                reachability
                if reachability is not None
                else (current.reachability if current else "unknown")
            ).value,
            "resources_total": dict(
                resources_total
                if resources_total is not None
                else (current.resources_total if current else {})
            ),
            "resources_available": dict(
                resources_available
                if resources_available is not None
                else (current.resources_available if current else {})
            ),
            "labels": dict(labels if labels is not None else (current.labels if current else {})),
        }
        problem = validate_member_value(value)
        if problem:
            raise ValueError(f"member entry: {problem}")
        return self._replica.write(MEMBERS, str(self._replica.peer_id), "", value)

    def heartbeat(self) -> Atom:
        return self.upsert_self()

    def leave(self) -> Atom:
        return self._replica.write(MEMBERS, str(self._replica.peer_id), "", tombstone=True)

    def get(self, peer_id: PeerId | str) -> MemberInfo | None:
        atom = self._replica.store.get((MEMBERS, str(peer_id), ""))
        if atom is None or atom.tombstone:
            return None
        return MemberInfo.from_atom(atom)

    def all(self) -> list[MemberInfo]:
        """Every member with an entry, including suspect and dead ones not yet removed."""
        out = []
        store = self._replica.store
        for key in store.keys(MEMBERS):
            atom = store.get((MEMBERS, key, ""))
            if atom is not None and not atom.tombstone:
                out.append(MemberInfo.from_atom(atom))
        return out

    def count(self) -> int:
        """Entries held (alive, suspect or dead, not yet removed)."""
        return len(self._replica.store.keys(MEMBERS))

    def heartbeat_interval(self) -> float:
        """How often this node should heartbeat, given the mesh's current size."""
        return self.detector.interval_for(self.count())

    def liveness(self, peer_id: PeerId | str, now: float | None = None) -> Liveness | None:
        info = self.get(peer_id)
        return (
            None
            if info is None
            else self.detector.judge(info.heartbeat, self._now(now), self.count())
        )

    def _judged(self, now: float | None, wanted: Liveness) -> list[MemberInfo]:
        now, members = self._now(now), self.all()
        return [m for m in members if self.detector.judge(m.heartbeat, now, len(members)) is wanted]

    def alive(self, now: float | None = None) -> list[MemberInfo]:
        return self._judged(now, Liveness.ALIVE)

    def suspect(self, now: float | None = None) -> list[MemberInfo]:
        return self._judged(now, Liveness.SUSPECT)

    def dead(self, now: float | None = None) -> list[MemberInfo]:
        return self._judged(now, Liveness.DEAD)

    def watch(self, callback: Callable[[PeerId, MemberInfo | None], None]) -> Callable[[], None]:
        """``callback(peer_id, info_or_None)`` on every change (None: left, expired, removed)."""

        def on_changes(changes: list[Change]) -> None:
            for change in changes:
                atom = change.new
                if atom is None or atom.tombstone:
                    callback(PeerId.from_string(change.slot[1]), None)
                else:
                    callback(atom.author, MemberInfo.from_atom(atom))

        return self._replica.store.watch(MEMBERS, on_changes)
