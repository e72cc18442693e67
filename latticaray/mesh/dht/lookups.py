"""Client-side DHT operations, sans-I/O: the iterative Kademlia lookup and what is built on it.

:class:`Lookup` walks towards a target id with alpha requests in flight per (S/Kademlia disjoint)
path until the k closest peers that are not failed have answered; :class:`FindNodeOp`,
:class:`GetValueOp` (merging the records it meets) and :class:`GetProvidersOp` are lookups that
carry a request of their own, and :class:`StoreOp` stores on the k closest peers a lookup found.
Each is an :class:`Operation` a driver steps (``DhtCore``'s docstring shows the loop). They need
little of their node, written down as :class:`LookupHost`, which ``DhtCore`` implements: its
config and ids, its routing table, how it builds requests and validates records, and where to
report peers that answered or failed.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Protocol

from .config import DhtConfig
from .errors import RecordRejected
from .keyspace import RECORD_NAMESPACE, Contact, id_to_bytes, key_id, record_id
from .messages import FIND_NODE, GET_PROVIDERS, GET_VALUE
from .records import Record
from .routing import RoutingTable

__all__ = [
    "FindNodeOp",
    "GetProvidersOp",
    "GetValueOp",
    "Lookup",
    "LookupHost",
    "Operation",
    "StoreOp",
]


class LookupHost(Protocol):
    """What the operations need of their node (``DhtCore`` is one)."""

    @property
    def config(self) -> DhtConfig: ...
    @property
    def peer_id(self) -> bytes: ...
    @property
    def node_id(self) -> int: ...
    @property
    def routing(self) -> RoutingTable: ...
    def request(self, op: str, **fields: Any) -> dict[str, Any]: ...
    def validate(self, record: Record, now: float) -> None: ...
    def peer_responded(self, contact: Contact, now: float) -> None: ...
    def peer_failed(self, contact: Contact, now: float) -> None: ...


_NEW, _INFLIGHT, _DONE, _FAILED = 0, 1, 2, 3
_distance_of = attrgetter("distance")


class Operation:
    """A client-side DHT operation driven by requests and their outcomes."""

    done: bool = False
    messages: int = 0

    def next_requests(self, now: float) -> list[tuple[Contact, dict[str, Any]]]:
        raise NotImplementedError

    def on_response(self, contact: Contact, response: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def on_failure(self, contact: Contact, now: float) -> None:
        raise NotImplementedError

    def next_deadline(self) -> float | None:
        return None


class _Candidate:
    __slots__ = ("contact", "depth", "distance", "path", "sent_at", "state")

    def __init__(self, contact: Contact, distance: int, depth: int, path: int) -> None:
        self.contact = contact
        self.distance = distance
        self.state = _NEW
        self.sent_at = 0.0
        self.depth = depth
        self.path = path


class Lookup(Operation):
    """Iterative lookup of the k closest peers to ``target`` with alpha requests in flight per
    path; ends when the k closest non-failed candidates of every path have answered."""

    def __init__(
        self,
        host: LookupHost,
        target: int,
        request: dict[str, Any],
        now: float,
        seeds: Sequence[Contact] = (),
    ) -> None:
        cfg = host.config
        self.host = host
        self.target = target
        self.request = request
        self.k = cfg.k
        self.alpha = cfg.alpha
        self.stall = cfg.stall_timeout
        self.max_requests = cfg.max_lookup_requests
        self.paths = max(1, cfg.disjoint_paths)
        # per path: candidates nearest first, trimmed to the 2k non-failed nearest (a farther
        # peer can never enter the k closest while 2k nearer ones are still candidates)
        self._shortlists: list[list[_Candidate]] = [[] for _ in range(self.paths)]
        self._failed_counts = [0] * self.paths
        self._candidates: dict[bytes, _Candidate] = {}
        self._inflight: list[dict[bytes, float]] = [{} for _ in range(self.paths)]
        self.messages = 0
        self.done = False
        self.started = now
        initial = host.routing.closest(target, self.k)
        known = {c.peer_id for c in initial}
        initial += [c for c in seeds if c.peer_id not in known]
        for i, contact in enumerate(initial):
            self._add(contact, 1, i % self.paths)
        if not self._candidates:
            self._finish(now)

    def _add(self, contact: Contact, depth: int, path: int) -> None:
        pid = contact.peer_id
        if pid in self._candidates or pid == self.host.peer_id:
            return
        distance = contact.node_id ^ self.target
        shortlist = self._shortlists[path]
        cap = 2 * self.k + self._failed_counts[path]
        if len(shortlist) >= cap and distance >= shortlist[-1].distance:
            return
        cand = _Candidate(contact, distance, depth, path)
        self._candidates[pid] = cand
        insort(shortlist, cand, key=_distance_of)
        if len(shortlist) > cap:
            dropped = shortlist.pop()
            if dropped.state == _NEW:
                del self._candidates[dropped.contact.peer_id]
            elif dropped.state == _FAILED:
                self._failed_counts[path] -= 1

    def next_requests(self, now: float) -> list[tuple[Contact, dict[str, Any]]]:
        if self.done:
            return []
        out = []
        all_paths_done = True
        k = self.k
        stall = self.stall
        request = self.request
        for p in range(self.paths):
            inflight = self._inflight[p]
            active = 0
            for sent in inflight.values():
                if now - sent < stall:
                    active += 1
            budget = self.alpha - active
            if self.messages >= self.max_requests:
                budget = 0
            waiting = sent_here = False
            considered = 0
            for cand in self._shortlists[p]:
                state = cand.state
                if state == _FAILED:
                    continue
                considered += 1
                if considered > k:
                    break
                if state == _NEW:
                    waiting = True
                    if budget > 0:
                        cand.state = _INFLIGHT
                        cand.sent_at = now
                        inflight[cand.contact.peer_id] = now
                        budget -= 1
                        self.messages += 1
                        sent_here = True
                        out.append((cand.contact, request))
                elif state == _INFLIGHT:
                    waiting = True
            if waiting and (inflight or sent_here):
                all_paths_done = False
        if all_paths_done:
            self._finish(now)
        return out

    def next_deadline(self) -> float | None:
        stall_ends = [
            sent + self.stall for inflight in self._inflight for sent in inflight.values()
        ]
        return min(stall_ends) if stall_ends else None

    def on_response(self, contact: Contact, response: dict[str, Any], now: float) -> None:
        cand = self._candidates.get(contact.peer_id)
        if cand is None or cand.state != _INFLIGHT:
            return
        self._inflight[cand.path].pop(contact.peer_id, None)
        if "error" in response:
            cand.state = _FAILED
            self._failed_counts[cand.path] += 1
            return
        cand.state = _DONE
        self.host.peer_responded(cand.contact, now)
        if self.done:
            return
        self._handle_payload(cand, response, now)
        for peer in response.get("peers", ())[: self.k]:
            self._add(peer, cand.depth + 1, cand.path)

    def on_failure(self, contact: Contact, now: float) -> None:
        cand = self._candidates.get(contact.peer_id)
        if cand is None or cand.state != _INFLIGHT:
            return
        self._inflight[cand.path].pop(contact.peer_id, None)
        cand.state = _FAILED
        self._failed_counts[cand.path] += 1
        self.host.peer_failed(cand.contact, now)

    def _handle_payload(self, cand: _Candidate, response: dict[str, Any], now: float) -> None:
        """Hook for lookups that carry values (records, providers)."""

    def _finish(self, now: float) -> None:
        self.done = True
        self.host.routing.touch(self.target, now)

    def closest(self) -> list[Contact]:
        """The k closest peers that answered, nearest first."""
        answered = [c for c in self._candidates.values() if c.state == _DONE]
        answered.sort(key=lambda c: c.distance)
        return [c.contact for c in answered[: self.k]]

    def queried(self) -> int:
        return self.messages

    def seen(self, peer_id: bytes) -> Contact | None:
        """A contact this lookup heard of (answered or not), e.g. to learn a peer's addresses."""
        cand = self._candidates.get(peer_id)
        return None if cand is None else cand.contact


class FindNodeOp(Lookup):
    @property
    def result(self) -> list[Contact]:
        return self.closest()


class GetValueOp(Lookup):
    """GET: walks to the key's k closest peers, merging every valid record seen (newest expiration
    per subkey), starting from the records we hold (``local``). ``hops`` is the lookup depth at
    which a record was first found. With ``quorum``
    it stops as soon as that many peers have returned valid records (faster, but a subkey map
    may then be read from fewer replicas)."""

    def __init__(
        self,
        host: LookupHost,
        key: bytes,
        now: float,
        quorum: int | None = None,
        local: Sequence[Record] = (),
    ) -> None:
        self.key = key
        self.records: dict[bytes | None, Record] = {}
        self.hops: int | None = None
        self.rejected = 0
        self.quorum = quorum
        self.holders = 0
        for record in local:  # the records we hold ourselves
            self.records[record.subkey] = record
        super().__init__(host, record_id(key), host.request(GET_VALUE, key=key), now)

    def _handle_payload(self, cand: _Candidate, response: dict[str, Any], now: float) -> None:
        found = False
        for record in response.get("records", ()):
            if record.key != self.key:
                self.rejected += 1
                continue
            try:
                self.host.validate(record, now)
            except RecordRejected:
                self.rejected += 1
                continue
            found = True
            old = self.records.get(record.subkey)
            if old is None or record.newer_than(old):
                self.records[record.subkey] = record
        if found:
            self.holders += 1
            if self.hops is None:
                self.hops = cand.depth
            if self.quorum is not None and self.holders >= self.quorum:
                self._finish(now)

    @property
    def result(self) -> dict[bytes | None, Record]:
        return self.records


class GetProvidersOp(Lookup):
    """Finds up to ``count`` providers of ``key``, the ones we know (``local``) first;
    :meth:`take_new` hands them out as found."""

    def __init__(
        self, host: LookupHost, key: bytes, count: int, now: float, local: Sequence[Contact] = ()
    ) -> None:
        self.key = key
        self.count = count
        self.providers: dict[bytes, Contact] = {}
        self._new: list[Contact] = []
        for contact in local:  # the providers we know of ourselves
            self._note(contact)
        super().__init__(host, key_id(key), host.request(GET_PROVIDERS, key=key), now)
        if len(self.providers) >= count:
            self.done = True

    def _note(self, contact: Contact) -> None:
        if contact.peer_id not in self.providers and len(self.providers) < self.count:
            self.providers[contact.peer_id] = contact
            self._new.append(contact)

    def _handle_payload(self, cand: _Candidate, response: dict[str, Any], now: float) -> None:
        for contact in response.get("providers", ()):
            self._note(contact)
        if len(self.providers) >= self.count:
            self._finish(now)

    def take_new(self) -> list[Contact]:
        new, self._new = self._new, []
        return new

    @property
    def result(self) -> list[Contact]:
        return list(self.providers.values())


class StoreOp(Operation):
    """Two phases: a FIND_NODE lookup for the key, then one store request (PUT_VALUE or
    ADD_PROVIDER) to each of the k closest peers found. We store locally as well when we are
    among the k closest ourselves."""

    def __init__(
        self,
        host: LookupHost,
        key: bytes,
        request: dict[str, Any],
        now: float,
        store_locally: Callable[[float], object],
        *,
        provider: bool = False,
    ) -> None:
        self.host = host
        self.key = key
        self.request = request
        self._store_locally = store_locally
        # a record lives at /latticaray/<key>, a provider record at the key itself (a CID's
        # multihash); the lookup carries that preimage, which a foreign libp2p node hashes
        preimage = key if provider else RECORD_NAMESPACE + key
        self.target = key_id(preimage)
        self.lookup = FindNodeOp(
            host,
            self.target,
            host.request(FIND_NODE, target=id_to_bytes(self.target), key=preimage),
            now,
        )
        self._pending: dict[bytes, Contact] | None = None
        self.stored_at: list[bytes] = []
        self.errors: dict[str, int] = {}
        self.stored_locally = False
        self.done = False

    @property
    def messages(self) -> int:  # type: ignore[override]
        return self.lookup.messages + (
            len(self.stored_at) + sum(self.errors.values()) + len(self._pending or ())
        )

    def next_requests(self, now: float) -> list[tuple[Contact, dict[str, Any]]]:
        if self.done:
            return []
        if self._pending is None:
            out = self.lookup.next_requests(now)
            if not self.lookup.done:
                return out
            closest = self.lookup.closest()
            target = self.target
            if len(closest) < self.host.config.k or (self.host.node_id ^ target) < (
                closest[-1].node_id ^ target
            ):
                try:
                    self._store_locally(now)
                    self.stored_locally = True
                except RecordRejected as exc:
                    self.errors[exc.reason] = self.errors.get(exc.reason, 0) + 1
            self._pending = {c.peer_id: c for c in closest}
            if not self._pending:
                self.done = True
            return [(c, self.request) for c in closest]
        return []

    def next_deadline(self) -> float | None:
        return self.lookup.next_deadline() if self._pending is None else None

    def on_response(self, contact: Contact, response: dict[str, Any], now: float) -> None:
        if self._pending is None:
            self.lookup.on_response(contact, response, now)
            return
        if self._pending.pop(contact.peer_id, None) is None:
            return
        error = response.get("error")
        results = [r for r in response.get("results", ()) if r not in (None, "stale")]
        if error is None and not results:
            self.stored_at.append(contact.peer_id)
        for reason in [error] if error else results:
            self.errors[reason] = self.errors.get(reason, 0) + 1
        self.done = not self._pending

    def on_failure(self, contact: Contact, now: float) -> None:
        if self._pending is None:
            self.lookup.on_failure(contact, now)
            return
        if self._pending.pop(contact.peer_id, None) is not None:
            self.host.peer_failed(contact, now)
            self.errors["unreachable"] = self.errors.get("unreachable", 0) + 1
            self.done = not self._pending

    @property
    def result(self) -> int:
        """How many nodes hold the record now (including us)."""
        return len(self.stored_at) + (1 if self.stored_locally else 0)
