"""The ``actors`` collection: named actors -> actor ID, hosting peer, lifecycle state.

A name may be claimed concurrently on both sides of a partition. Every claimant writes only its
own slot ``(actors, name, <claimant peer ID>)`` carrying the HLC time of its first claim
(``claimed_at``). Every replica applies the same rule to the same set of claims: among claims
that are not dead (and not released), the earliest ``(claimed_at, claimant peer ID)`` owns the
name. A claimant that learns (by a merge) that an earlier claim beats its own is told once through
:meth:`Actors.on_claim_lost`; it should stop its actor and :meth:`Actors.release` the claim.
A ``dead`` winner frees the name for a new claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..mesh.identity import PeerId
from .atoms import Atom
from .errors import StateError
from .hlc import Hlc
from .schema import TOMBSTONE, check_fields, check_peer_id, check_str, own_entry_value
from .store import Change, CollectionSpec

__all__ = ["ACTORS", "ActorRecord", "ActorState", "Actors", "ClaimResult", "NoSuchClaim"]

ACTORS = "actors"


class NoSuchClaim(StateError):
    """This node holds no claim on the named actor it tried to update or release."""


class ActorState(str, Enum):
    PENDING = "pending"
    ALIVE = "alive"
    RESTARTING = "restarting"
    DEAD = "dead"


@dataclass(frozen=True)
class ActorRecord:
    name: str
    actor_id: str
    host: PeerId
    #: The claimant: the peer that wrote (and alone may update) this claim.
    owner: PeerId
    state: ActorState
    claimed_at: Hlc
    updated_at: Hlc

    @property
    def precedence(self) -> tuple[Hlc, bytes]:
        return (self.claimed_at, self.owner.to_bytes())

    @classmethod
    def from_atom(cls, atom: Atom) -> ActorRecord:
        value = atom.decoded_value()
        return cls(
            atom.key,
            value["actor_id"],
            PeerId.from_string(value["host"]),
            atom.author,
            ActorState(value["state"]),
            Hlc(*value["claimed_at"]),
            atom.hlc,
        )


@dataclass(frozen=True)
class ClaimResult:
    #: True if this node's claim owns the name as far as this replica knows now.
    won: bool
    #: The record that owns the name (ours if ``won``).
    record: ActorRecord
    #: A won claim is provisional until it has reached the replicas that might hold an earlier
    #: one; a later loss is reported through :meth:`Actors.on_claim_lost`.
    provisional: bool = True


def actors_rule(atom: Atom) -> str | None:
    problem, value = own_entry_value(
        atom, atom.subkey == str(atom.author), "a peer may only write its own claim"
    )
    if problem or value is TOMBSTONE:
        return problem
    problem = (
        check_fields(value, {"actor_id", "host", "state", "claimed_at"})
        or check_str(value["actor_id"], "actor_id")
        or check_peer_id(value["host"], "host")
    )
    if problem:
        return problem
    if value["state"] not in {s.value for s in ActorState}:
        return f"unknown actor state {value['state']!r}"
    claimed = value["claimed_at"]
    if not (
        isinstance(claimed, list)
        and len(claimed) == 2
        and all(type(x) is int and x >= 0 for x in claimed)
    ):
        return "claimed_at must be [wall_ms, logical]"
    if Hlc(*claimed) > atom.hlc:
        return "claimed_at lies after the claim's own timestamp"
    return None


class Actors:
    """Typed accessors for ``actors`` with the deterministic claim rule."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica
        replica.store.define(CollectionSpec(ACTORS, actors_rule))
        self._lost_callbacks: list[Callable[[str, ActorRecord, ActorRecord], None]] = []
        self._lost_reported: set[tuple[str, Hlc]] = set()
        replica.store.watch(ACTORS, self._check_lost)

    # reads ------------------------------------------------------------------------------------
    def claims(self, name: str) -> list[ActorRecord]:
        """All live (unreleased) claims on ``name``, best first."""
        slots = self._replica.store.key_slots(ACTORS, name)
        records = [ActorRecord.from_atom(a) for a in slots.values() if not a.tombstone]
        return sorted(records, key=lambda r: r.precedence)

    def get(self, name: str) -> ActorRecord | None:
        """The owner of ``name``: the best claim not dead; if all are dead, the latest dead one."""
        records = self.claims(name)
        live = [r for r in records if r.state is not ActorState.DEAD]
        if live:
            return live[0]
        if records:
            return max(records, key=lambda r: (r.updated_at, r.owner.to_bytes()))
        return None

    def names(self) -> list[str]:
        return [n for n in self._replica.store.keys(ACTORS) if self.get(n) is not None]

    def _own(self, name: str) -> ActorRecord | None:
        atom = self._replica.store.get((ACTORS, name, str(self._replica.peer_id)))
        return None if atom is None or atom.tombstone else ActorRecord.from_atom(atom)

    # writes -----------------------------------------------------------------------------------
    def claim(
        self,
        name: str,
        actor_id: str,
        host: PeerId | None = None,
        state: ActorState = ActorState.PENDING,
    ) -> ClaimResult:
        """Claim ``name`` for ``actor_id`` hosted on ``host`` (default: this node).

        If another live claim already owns the name here, nothing is written and ``won`` is False.
        """
        me = self._replica.peer_id
        owner = self.get(name)
        if owner is not None and owner.state is not ActorState.DEAD and owner.owner != me:
            return ClaimResult(False, owner, provisional=False)
        if owner is not None and owner.owner == me and owner.state is not ActorState.DEAD:
            return ClaimResult(True, owner)
        hlc = self._replica.next_hlc()
        value = {
            "actor_id": actor_id,
            "host": str(host or me),
            "state": ActorState(state).value,
            "claimed_at": [hlc.wall_ms, hlc.logical],
        }
        atom = self._replica.write(ACTORS, name, str(me), value, hlc=hlc)
        return ClaimResult(True, ActorRecord.from_atom(atom))

    def update(self, name: str, state: ActorState | str, host: PeerId | None = None) -> Atom:
        """Move this node's claim on ``name`` to ``state`` (and optionally another host)."""
        own = self._own(name)
        if own is None:
            raise NoSuchClaim(f"this node holds no claim on actor {name!r}")
        value = {
            "actor_id": own.actor_id,
            "host": str(host or own.host),
            "state": ActorState(state).value,
            "claimed_at": [own.claimed_at.wall_ms, own.claimed_at.logical],
        }
        return self._replica.write(ACTORS, name, str(self._replica.peer_id), value)

    def release(self, name: str) -> Atom:
        if self._own(name) is None:
            raise NoSuchClaim(f"this node holds no claim on actor {name!r}")
        return self._replica.write(ACTORS, name, str(self._replica.peer_id), tombstone=True)

    # events -----------------------------------------------------------------------------------
    def on_claim_lost(self, callback: Callable[[str, ActorRecord, ActorRecord], None]) -> None:
        """``callback(name, our_claim, winning_claim)`` once when a merge shows our claim lost."""
        self._lost_callbacks.append(callback)

    def watch(self, callback: Callable[[str, ActorRecord | None], None]) -> Callable[[], None]:
        """``callback(name, owner_or_None)`` whenever the claims on a name change."""

        def on_changes(changes: list[Change]) -> None:
            for name in dict.fromkeys(c.slot[1] for c in changes):
                callback(name, self.get(name))

        return self._replica.store.watch(ACTORS, on_changes)

    def _check_lost(self, changes: list[Change]) -> None:
        me = self._replica.peer_id
        for name in dict.fromkeys(c.slot[1] for c in changes):
            own = self._own(name)
            if own is None or own.state is ActorState.DEAD:
                continue
            winner = self.get(name)
            if winner is None or winner.owner == me:
                continue
            marker = (name, own.claimed_at)
            if marker in self._lost_reported:
                continue
            self._lost_reported.add(marker)
            for callback in list(self._lost_callbacks):
                callback(name, own, winner)
