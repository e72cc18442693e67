"""The name arbiter's records: which actor holds each (namespace, name) this node arbitrates.

Sans-I/O: `handle` takes a typed `/latticaray/names/1` request (wire/names.py) and returns the reply;
liveness of the nodes a record names and the method tables of actors hosted here are asked of
the callables it is given. See names.py for who the arbiter of a name is and how claims work.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from latticaray.runtime.remote.wire import (
    ClaimRefused,
    NameClaim,
    NameHosted,
    NameHostedReply,
    NameLookup,
    NameLookupReply,
    NamePlaced,
    NameRecord,
    NameRelease,
    NamesOk,
    NamesReply,
    NamesRequest,
)

#: released actors remembered so that a copy of their record a view still carries is not merged
#: back (the oldest are forgotten first)
RELEASED_MEMORY = 4096


class NameArbiterCore:
    """The records of the names this node arbitrates, by (namespace, name). A record whose
    holder is gone is dropped when read; a released one is not taken back from a view that
    still carries a copy of it. Requests in, replies out (`/latticaray/names/1`)."""

    def __init__(
        self,
        node_id: str,
        is_alive: Callable[[str], bool | None],
        hosted_meta: Callable[[str, str, bytes], dict[str, Any] | None],
    ):
        self.node_id = node_id
        self.is_alive = is_alive  # a peer's liveness; None for a node this one never met
        self.hosted_meta = hosted_meta  # (namespace, name, aid) -> method table hosted here
        self.records: dict[tuple[str, str], NameRecord] = {}
        self.released: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def handle(self, request: NamesRequest, caller: str) -> NamesReply:
        """One request: claim, lookup, release, placed, moved, hosted."""
        key = (request.ns, request.name)
        record = self.records.get(key)
        if record is not None and not self._holder_alive(record):
            del self.records[key]
            record = None
        if isinstance(request, NameClaim):
            if record is not None and record.aid != request.aid:
                return ClaimRefused(record, record.owner)
            pending = request.pending
            self.records[key] = NameRecord(
                request.aid,
                None if pending else request.host or request.owner,
                request.owner,
                request.meta,
                request.detached,
                pending,
                request.wait_s if pending else None,
            )
            return NamesOk()
        if isinstance(request, NameLookup):
            return NameLookupReply(record)
        if isinstance(request, NameHosted):  # asked of the actor's host: its method table
            return NameHostedReply(self.hosted_meta(request.ns, request.name, request.aid))
        if record is not None and record.aid == request.aid:
            if isinstance(request, NameRelease):
                self.forget(request.ns, request.name, request.aid)
            elif isinstance(request, NamePlaced):
                self.records[key] = dataclasses.replace(record, node=request.node, pending=False)
            else:  # NameMoved
                self.records[key] = dataclasses.replace(record, node=request.node)
        return NamesOk()

    def _holder_alive(self, record: NameRecord) -> bool:
        # a detached actor outlives its owner: its name lives as long as its host, judged by its
        # owner while this arbiter has not met the host (sparse peering)
        holders = [record.node, record.owner] if record.detached else [record.owner]
        for holder in holders:
            if holder == self.node_id:
                return True
            alive = self.is_alive(holder) if holder is not None else None
            if alive is not None:
                return alive
        return False

    def shared(self) -> list[tuple[str, str, NameRecord]]:
        """The records a view carries: a pending claim stays with its arbiter (a copy could
        outlive its release)."""
        return [(ns, name, rec) for (ns, name), rec in self.records.items() if not rec.pending]

    def merge(self, records: list[tuple[str, str, NameRecord]]) -> None:
        """Records a peer's view carried: kept where this node has none of its own."""
        for ns, name, rec in records:
            if rec.aid not in self.released:
                self.records.setdefault((ns, name), rec)

    def forget(self, namespace: str, name: str, aid: bytes) -> None:
        """The actor ``aid`` gave its name back: its record (this node's copy, if it is not
        the arbiter) goes, and copies views still carry are not merged back."""
        record = self.records.get((namespace, name))
        if record is not None and record.aid == aid:
            del self.records[(namespace, name)]
        self.released[aid] = None
        if len(self.released) > RELEASED_MEMORY:
            self.released.popitem(last=False)

    def moved(self, namespace: str, name: str, aid: bytes, host: str) -> None:
        record = self.records.get((namespace, name))
        if record is not None and record.aid == aid:
            self.records[(namespace, name)] = dataclasses.replace(record, node=host)
