"""Typed errors of the DHT: malformed messages, rejected records, failed operations."""

from __future__ import annotations

from ..errors import MeshError

__all__ = ["DhtError", "DhtOperationFailed", "DhtProtocolError", "RecordRejected"]


class DhtError(MeshError):
    """Base class of every DHT error."""


class DhtProtocolError(DhtError, ValueError):
    """A DHT message is malformed, oversize, or of the wrong shape; it is dropped, never obeyed."""


class RecordRejected(DhtError):
    """A record failed validation or storage policy.

    ``reason`` is a stable code also sent on the wire: ``bad_signature``, ``expired``,
    ``oversize``, ``too_far_future``, ``unauthorized``, ``quota``, ``full``, ``stale``, ``malformed``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DhtOperationFailed(DhtError):
    """A DHT operation could not complete (no reachable peers, nothing stored, ...)."""
