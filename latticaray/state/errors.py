"""Typed errors of the cluster-state layer (signed delta-CRDTs and their replication)."""

from __future__ import annotations


class StateError(Exception):
    """Base class of every error raised by latticaray.state."""


class MalformedDelta(StateError, ValueError):
    """A delta, atom or replication message could not be decoded or has wrong field types."""


class DeltaTooLarge(MalformedDelta):
    """A message, atom value, key or batch exceeds its size bound."""


class SignatureInvalid(StateError):
    """An atom's Ed25519 signature does not verify against its claimed author."""


class NotAMember(StateError):
    """The author (or the sender) of a delta is not admitted as a mesh member."""


class WriteRejected(StateError):
    """An atom breaks its collection's write rule (e.g. a peer writing another peer's entry)."""


class UnknownCollection(WriteRejected):
    """An atom names a collection this replica does not define."""


class ClockSkewError(StateError):
    """An atom's hybrid-logical-clock time lies too far in the future of the local clock."""


class ExpiredAtom(StateError):
    """An atom is older than its collection's horizon (a collected tombstone or expired entry)."""


class StateStoreFull(StateError):
    """Accepting the atom would exceed the store's bound on the number of slots."""


class SnapshotError(StateError):
    """A state snapshot on disk is unreadable, malformed, or of an unsupported version."""
