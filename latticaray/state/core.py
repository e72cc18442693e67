"""The sans-I/O cluster-state core of one node: replica plus the typed collections.

:class:`StateCore` is what both the asyncio driver (:class:`~latticaray.state.service.StateService`)
and the simulator run. It reads no clock except the ``wall_clock`` it is given for timestamping
local writes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..mesh.identity import KeyPair, PeerId
from .actors import Actors
from .atoms import DEFAULT_LIMITS, Limits
from .crdts import CrdtMap, LWWMap, define_collection
from .errors import UnknownCollection
from .jobs import Jobs
from .members import FailureDetector, Members
from .replication import Replica, ReplicationConfig
from .store import CrdtStore

__all__ = ["StateCore"]


class StateCore:
    """Replica + ``members`` / ``actors`` / ``jobs`` + user-defined CRDT collections."""

    def __init__(
        self,
        key_pair: KeyPair,
        *,
        wall_clock: Callable[[], float],
        is_member: Callable[[PeerId], bool] | None = None,
        config: ReplicationConfig | None = None,
        detector: FailureDetector | None = None,
        limits: Limits = DEFAULT_LIMITS,
        tombstone_ttl: float = 24 * 3600.0,
        max_slots: int = 1_000_000,
        rng: random.Random | None = None,
    ) -> None:
        store = CrdtStore(is_member=is_member, tombstone_ttl=tombstone_ttl, max_slots=max_slots)
        self.replica = Replica(
            key_pair, store=store, config=config, limits=limits, rng=rng, wall_clock=wall_clock
        )
        self.store = store
        self.peer_id = key_pair.peer_id
        self.members = Members(self.replica, detector)
        self.actors = Actors(self.replica)
        self.jobs = Jobs(self.replica)

    def define(self, name: str, kind: str, live_ttl: float | None = None) -> CrdtMap:
        """Define a map-of-CRDTs collection (every replica must define it the same way)."""
        if name in ("members", "actors", "jobs"):
            raise ValueError(f"collection {name!r} is built in")
        define_collection(self.store, name, kind, live_ttl)
        return CrdtMap(self.replica, name, kind)

    def lww_map(self, name: str) -> LWWMap:
        """Define (if needed) and return an LWW-map collection."""
        try:
            self.store.spec(name)
        except UnknownCollection:
            define_collection(self.store, name, "lww")
        return LWWMap(self.replica, name)
