"""Cluster state: signed delta-CRDTs with gossip and anti-entropy (sans-I/O core + asyncio driver).

Layout:

* :mod:`.hlc` — hybrid logical clocks.
* :mod:`.atoms` — the signed atom (unit of state, delta and verification) and its wire form.
* :mod:`.store` — the slot store: admission checks, merge, digest trie, tombstone/TTL GC.
* :mod:`.crdts` — LWW-register, LWW-map, OR-set, PN-counter, map of CRDTs (views over the store).
* :mod:`.members`, :mod:`.actors`, :mod:`.jobs`, :mod:`.revocations` — the typed collections the
  runtime uses.
* :mod:`.replication` — the sans-I/O replica: local writes, gossip, anti-entropy.
* :mod:`.core` — :class:`StateCore`, replica + typed collections (what the simulator runs).
* :mod:`.persistence` — snapshots on disk.
* :mod:`.service` — :class:`StateService`, the asyncio driver over mesh RPC.
"""

from .actors import ActorRecord, Actors, ActorState, ClaimResult, NoSuchClaim
from .atoms import Atom, Limits
from .core import StateCore
from .crdts import CrdtMap, LWWMap, LWWRegister, ORSet, PNCounter
from .errors import (
    ClockSkewError,
    DeltaTooLarge,
    ExpiredAtom,
    MalformedDelta,
    NotAMember,
    SignatureInvalid,
    SnapshotError,
    StateError,
    StateStoreFull,
    UnknownCollection,
    WriteRejected,
)
from .hlc import Hlc, HybridClock
from .jobs import JobRecord, Jobs, JobStatus
from .members import FailureDetector, Liveness, MemberInfo, MemberReachability, Members
from .replication import PROTOCOL_ID, Replica, ReplicationConfig, ReplicationStats
from .revocations import REVOCATIONS, Revocations
from .service import StateService
from .store import Change, CollectionSpec, CrdtStore

__all__ = [
    "PROTOCOL_ID",
    "REVOCATIONS",
    "ActorRecord",
    "ActorState",
    "Actors",
    "Atom",
    "Change",
    "ClaimResult",
    "ClockSkewError",
    "CollectionSpec",
    "CrdtMap",
    "CrdtStore",
    "DeltaTooLarge",
    "ExpiredAtom",
    "FailureDetector",
    "Hlc",
    "HybridClock",
    "JobRecord",
    "JobStatus",
    "Jobs",
    "LWWMap",
    "LWWRegister",
    "Limits",
    "Liveness",
    "MalformedDelta",
    "MemberInfo",
    "MemberReachability",
    "Members",
    "NoSuchClaim",
    "NotAMember",
    "ORSet",
    "PNCounter",
    "Replica",
    "ReplicationConfig",
    "ReplicationStats",
    "Revocations",
    "SignatureInvalid",
    "SnapshotError",
    "StateCore",
    "StateError",
    "StateService",
    "StateStoreFull",
    "UnknownCollection",
    "WriteRejected",
]
