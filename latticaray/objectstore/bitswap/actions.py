"""What a Bitswap fetch session asks of its driver: the actions it returns, the sink it writes to.

A :class:`~.session.FetchSession` is sans-I/O: each input returns a list of these frozen actions,
which the driver (``objectstore/exchange.py``) carries out -- open or cancel a request stream,
look up providers, open the store writer (then hand it over as a :class:`BlockSink`), penalize a
peer, and finish with :class:`Completed` or :class:`Failed`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from ..cid import Cid
from ..manifest import Manifest
from .messages import Request

__all__ = [
    "BlockSink",
    "CancelRequest",
    "Completed",
    "Failed",
    "FindProviders",
    "ManifestReady",
    "Penalize",
    "SendRequest",
]


class BlockSink(Protocol):
    """Where a session puts verified blocks (the store's ObjectWriter implements this)."""

    def write_block(self, index: int, data: bytes | memoryview) -> bool: ...
    def has_block(self, index: int) -> bool: ...


@dataclass(frozen=True)
class SendRequest:
    peer: Hashable
    request_id: int
    request: Request
    timeout: float
    #: Bytes of blocks the request asks for (0 when unknown, e.g. the manifest): the driver
    #: opens the stream with at least this receive window, so every requested block can be in
    #: flight at once instead of one window's worth per round trip.
    window: int = 0


@dataclass(frozen=True)
class CancelRequest:
    peer: Hashable
    request_id: int


@dataclass(frozen=True)
class FindProviders:
    root: Cid


@dataclass(frozen=True)
class ManifestReady:
    manifest: Manifest


@dataclass(frozen=True)
class Penalize:
    peer: Hashable
    reason: str


@dataclass(frozen=True)
class Completed:
    manifest: Manifest


@dataclass(frozen=True)
class Failed:
    error: Exception
