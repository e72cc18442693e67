"""The sans-I/O Kademlia node: request handling, iterative lookups and the operations built on
them (find node, get/put value with subkeys, provide/find providers), plus maintenance.

Nothing here reads a clock or touches a socket. Server side, a driver decodes a request and calls
:meth:`DhtCore.handle_request`, which returns the response. Client side, a method such as
:meth:`DhtCore.get_value` returns an :class:`Operation`; the driver loops::

    for contact, request in op.next_requests(now): send, then later
        op.on_response(contact, response, now)   or   op.on_failure(contact, now)
    ... until op.done, waking at op.next_deadline() to let stalled requests free their slot

and drains :meth:`DhtCore.take_pings` (liveness checks the routing table asked for). The asyncio
driver (service.py) and the simulator driver (latticaray/mesh/sim/dht.py) are two such loops.
"""

from __future__ import annotations

import functools
import random
from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from .errors import RecordRejected
from .keyspace import (
    RECORD_NAMESPACE,
    Contact,
    dht_id,
    id_from_bytes,
    id_to_bytes,
    key_id,
    record_id,
)
from .messages import (
    ADD_PROVIDER,
    FIND_NODE,
    GET_PROVIDERS,
    GET_VALUE,
    PING,
    PUT_VALUE,
    error_response,
)
from .records import (
    ProviderStore,
    Record,
    RecordPolicy,
    RecordStore,
    RecordValidator,
    default_validators,
    validate_record,
)
from .routing import RoutingTable

__all__ = [
    "DhtConfig",
    "DhtCore",
    "FindNodeOp",
    "GetProvidersOp",
    "GetValueOp",
    "Lookup",
    "Operation",
    "StoreOp",
]


@dataclass
class DhtConfig:
    k: int = 20
    alpha: int = 3
    #: S/Kademlia disjoint paths: each peer is queried by at most one path; 1 = plain Kademlia
    disjoint_paths: int = 1
    #: a request unanswered this long stops holding one of the alpha slots (it may still answer)
    stall_timeout: float = 1.0
    #: drivers abandon a request after this long and report it failed
    request_timeout: float = 5.0
    max_lookup_requests: int = 300
    replacement_size: int = 8
    max_failures: int = 2
    #: a full bucket asks for at most one liveness ping of its least-recently-seen entry this often
    ping_interval: float = 30.0
    refresh_interval: float = 3600.0
    republish_interval: float = 3600.0
    provider_ttl: float = 24 * 3600.0
    max_provider_ttl: float = 48 * 3600.0
    reprovide_interval: float = 12 * 3600.0
    #: a node in server mode answers requests and enters others' routing tables; a client-mode
    #: node (behind a NAT, a driver) only asks
    server_mode: bool = True
    policy: RecordPolicy = field(default_factory=RecordPolicy)
    max_records: int = 100_000
    per_publisher_records: int = 1_000
    per_publisher_bytes: int = 16 * 1024 * 1024
    max_providers: int = 100_000
    max_providers_per_key: int = 64
    per_provider_keys: int = 10_000


_NEW, _INFLIGHT, _DONE, _FAILED = 0, 1, 2, 3
_distance_of = attrgetter("distance")
#: records per message and their total bytes, kept well under the codec's message bound
RECORDS_PER_MESSAGE = 200
RECORD_BYTES_PER_MESSAGE = 1536 * 1024


def batch_records(records: list[Record]) -> list[list[Record]]:
    """Split records into batches that each fit one message."""
    batches: list[list[Record]] = []
    current: list[Record] = []
    size = 0
    for record in records:
        if current and (
            len(current) >= RECORDS_PER_MESSAGE or size + record.size > RECORD_BYTES_PER_MESSAGE
        ):
            batches.append(current)
            current, size = [], 0
        current.append(record)
        size += record.size
    if current:
        batches.append(current)
    return batches


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
        core: DhtCore,
        target: int,
        request: dict[str, Any],
        now: float,
        seeds: Sequence[Contact] = (),
    ) -> None:
        cfg = core.config
        self.core = core
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
        initial = core.routing.closest(target, self.k)
        known = {c.peer_id for c in initial}
        initial += [c for c in seeds if c.peer_id not in known]
        for i, contact in enumerate(initial):
            self._add(contact, 1, i % self.paths)
        if not self._candidates:
            self._finish(now)

    def _add(self, contact: Contact, depth: int, path: int) -> None:
        pid = contact.peer_id
        if pid in self._candidates or pid == self.core.peer_id:
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
        self.core.peer_responded(cand.contact, now)
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
        self.core.peer_failed(cand.contact, now)

    def _handle_payload(self, cand: _Candidate, response: dict[str, Any], now: float) -> None:
        """Hook for lookups that carry values (records, providers)."""

    def _finish(self, now: float) -> None:
        self.done = True
        self.core.routing.touch(self.target, now)

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
    per subkey). ``hops`` is the lookup depth at which a record was first found. With ``quorum``
    it stops as soon as that many peers have returned valid records (faster, but a subkey map
    may then be read from fewer replicas)."""

    def __init__(self, core: DhtCore, key: bytes, now: float, quorum: int | None = None) -> None:
        self.key = key
        self.records: dict[bytes | None, Record] = {}
        self.hops: int | None = None
        self.rejected = 0
        self.quorum = quorum
        self.holders = 0
        for record in core.records.get(key, now):
            self.records[record.subkey] = record
        super().__init__(core, record_id(key), core.request(GET_VALUE, key=key), now)

    def _handle_payload(self, cand: _Candidate, response: dict[str, Any], now: float) -> None:
        found = False
        for record in response.get("records", ()):
            if record.key != self.key:
                self.rejected += 1
                continue
            try:
                self.core.validate(record, now)
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
    """Finds up to ``count`` providers of ``key``; :meth:`take_new` hands them out as found."""

    def __init__(self, core: DhtCore, key: bytes, count: int, now: float) -> None:
        self.key = key
        self.count = count
        self.providers: dict[bytes, Contact] = {}
        self._new: list[Contact] = []
        for contact in core.providers.get(key, now):
            self._note(contact)
        super().__init__(core, key_id(key), core.request(GET_PROVIDERS, key=key), now)
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
        core: DhtCore,
        key: bytes,
        request: dict[str, Any],
        now: float,
        store_locally: Callable[[float], object],
        *,
        provider: bool = False,
    ) -> None:
        self.core = core
        self.key = key
        self.request = request
        self._store_locally = store_locally
        # a record lives at /latticaray/<key>, a provider record at the CID's multihash
        preimage = key if provider else RECORD_NAMESPACE + key
        self.target = key_id(preimage)
        self.lookup = core.find_node(self.target, now, key=preimage)
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
            if len(closest) < self.core.config.k or (self.core.node_id ^ target) < (
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
            self.core.peer_failed(contact, now)
            self.errors["unreachable"] = self.errors.get("unreachable", 0) + 1
            self.done = not self._pending

    @property
    def result(self) -> int:
        """How many nodes hold the record now (including us)."""
        return len(self.stored_at) + (1 if self.stored_locally else 0)


class DhtCore:
    """One DHT node's state and protocol logic (sans-I/O)."""

    def __init__(
        self,
        peer_id: bytes,
        addrs: tuple[str, ...] = (),
        config: DhtConfig | None = None,
        validators: dict[bytes, RecordValidator] | None = None,
        now: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = cfg = config or DhtConfig()
        self.peer_id = peer_id
        self.node_id = dht_id(peer_id)
        self.addrs = tuple(addrs)
        self.validators = default_validators() if validators is None else validators
        self.rng = rng or random.Random(self.node_id)
        self.routing = RoutingTable(
            self.node_id,
            k=cfg.k,
            replacement_size=cfg.replacement_size,
            max_failures=cfg.max_failures,
            refresh_interval=cfg.refresh_interval,
            ping_interval=cfg.ping_interval,
        )
        self.records = RecordStore(
            cfg.max_records, cfg.per_publisher_records, cfg.per_publisher_bytes
        )
        self.providers = ProviderStore(
            cfg.max_providers, cfg.max_providers_per_key, cfg.per_provider_keys
        )
        #: records we published ourselves, republished until they expire: (key, subkey) -> [record, last]
        self.published: dict[tuple[bytes, bytes | None], list[Any]] = {}
        #: keys we provide: key -> last announcement time
        self.provided: dict[bytes, float] = {}
        self._pings: list[Contact] = []
        self.stats = {"requests_served": 0, "bad_requests": 0, "records_rejected": 0}

    @property
    def contact(self) -> Contact:
        return Contact(self.peer_id, self.addrs, self.node_id)

    # routing feedback --------------------------------------------------------------------------
    def peer_responded(self, contact: Contact, now: float) -> None:
        lrs = self.routing.observe(contact, now)
        if lrs is not None:
            self._pings.append(lrs)

    def peer_failed(self, contact: Contact, now: float) -> None:
        self.routing.failed(contact.peer_id, now, contact.node_id)

    def take_pings(self) -> list[Contact]:
        """Contacts the routing table wants pinged; report with :meth:`ping_done`."""
        pings, self._pings = self._pings, []
        return pings

    def ping_done(self, contact: Contact, alive: bool, now: float) -> None:
        self.routing.ping_result(contact.peer_id, alive, now, contact.node_id)

    # requests we send ------------------------------------------------------------------------
    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": op, "server": self.config.server_mode}
        if self.addrs:
            msg["addrs"] = self.addrs
        msg.update(fields)
        return msg

    def validate(self, record: Record, now: float) -> None:
        validate_record(record, now, self.config.policy, self.validators)

    def find_node(self, target: int, now: float, key: bytes | None = None) -> FindNodeOp:
        """Look ``target`` up; ``key`` is its preimage when known (a peer ID, a record's
        libp2p key), which a foreign libp2p node needs (it hashes the key itself)."""
        request = self.request(FIND_NODE, target=id_to_bytes(target))
        if key is not None:
            request["key"] = key
        return FindNodeOp(self, target, request, now)

    def bootstrap(self, seeds: list[Contact], now: float) -> FindNodeOp:
        """Join: look ourselves up starting from the seeds (fills our neighbourhood and announces
        us to it). A seed enters the routing table only once it answers. Follow with
        :meth:`refresh_ops` (``all_buckets=True``) to fill farther buckets."""
        seeds = [s for s in seeds if s.peer_id != self.peer_id]
        return FindNodeOp(
            self,
            self.node_id,
            self.request(FIND_NODE, target=id_to_bytes(self.node_id), key=self.peer_id),
            now,
            seeds,
        )

    def refresh_ops(self, now: float, all_buckets: bool = False) -> list[FindNodeOp]:
        """Lookups of a random id in each stale bucket (or, after joining, in every bucket
        farther than our closest neighbour)."""
        if all_buckets:
            contents = self.routing.bucket_contents()
            if not contents:
                return []
            indices = list(range(min(contents) + 1, 256))
        else:
            indices = self.routing.stale_buckets(now)
        return [self.find_node(self.routing.random_id_in_bucket(i, self.rng), now) for i in indices]

    def get_value(self, key: bytes, now: float, quorum: int | None = None) -> GetValueOp:
        return GetValueOp(self, key, now, quorum)

    def put(self, records: list[Record], now: float, publish: bool = True) -> StoreOp:
        """Store records of one key on its k closest peers. Each is validated here first (raises
        :class:`RecordRejected`); with ``publish`` we also republish them until they expire."""
        if not records:
            raise ValueError("put needs at least one record")
        key = records[0].key
        for record in records:
            if record.key != key:
                raise ValueError("all records of one put must share the key")
            self.validate(record, now)
            if publish:
                self.published[(key, record.subkey)] = [record, now]

        def store_locally(t: float) -> None:
            for record in records:
                self.records.store(record, t)

        return StoreOp(
            self, key, self.request(PUT_VALUE, records=list(records)), now, store_locally
        )

    def add_provider(self, key: bytes, now: float) -> StoreOp:
        """Announce ourselves as a provider of ``key`` to its k closest peers (re-announced every
        ``reprovide_interval``)."""
        self.provided[key] = now
        ttl = self.config.provider_ttl

        def store_locally(t: float) -> None:
            self.providers.add(key, self.contact, t + ttl, t)

        return StoreOp(
            self,
            key,
            self.request(ADD_PROVIDER, key=key, ttl=ttl),
            now,
            store_locally,
            provider=True,
        )

    def get_providers(self, key: bytes, count: int, now: float) -> GetProvidersOp:
        return GetProvidersOp(self, key, count, now)

    # requests we answer ----------------------------------------------------------------------
    def handle_request(
        self, sender: Contact, request: dict[str, Any], now: float
    ) -> dict[str, Any]:
        """Answer one decoded request from the authenticated peer ``sender``."""
        self.stats["requests_served"] += 1
        if sender.peer_id == self.peer_id:
            return error_response("bad_request", "a node does not query itself")
        if request.get("server", True):
            addrs = request.get("addrs")
            self.peer_responded(sender.with_addrs(addrs) if addrs else sender, now)
        op = request["op"]
        k = self.config.k
        if op == PING:
            return {}
        if op == FIND_NODE:
            target = id_from_bytes(request["target"])
            return {"peers": self.routing.closest(target, k, exclude=sender.peer_id)}
        if op == GET_VALUE:
            key = request["key"]
            held = self.records.get(key, now)
            if len(held) > 1:  # the newest first, so a truncated answer keeps the freshest
                held.sort(key=lambda r: r.expiration, reverse=True)
            return {
                "records": batch_records(held)[0] if held else [],
                "peers": self.routing.closest(record_id(key), k, exclude=sender.peer_id),
            }
        if op == GET_PROVIDERS:
            key = request["key"]
            return {
                "providers": self.providers.get(key, now)[:k],
                "peers": self.routing.closest(key_id(key), k, exclude=sender.peer_id),
            }
        if op == PUT_VALUE:
            return {"results": [self._store_one(r, now) for r in request["records"]]}
        if op == ADD_PROVIDER:
            ttl = min(request["ttl"], self.config.max_provider_ttl)
            contact = sender.with_addrs(request.get("addrs") or sender.addrs)
            try:
                self.providers.add(request["key"], contact, now + ttl, now)
            except RecordRejected as exc:
                return error_response(exc.reason, exc.message)
            return {}
        self.stats["bad_requests"] += 1
        return error_response("bad_request", f"unknown operation {op!r}")

    def _store_batch(self, records: list[Record], now: float) -> None:
        for record in records:
            self._store_one(record, now)

    def _store_one(self, record: Record, now: float) -> str | None:
        try:
            self.validate(record, now)
            return None if self.records.store(record, now) else "stale"
        except RecordRejected as exc:
            self.stats["records_rejected"] += 1
            return exc.reason

    # maintenance -----------------------------------------------------------------------------
    def maintenance(self, now: float) -> list[Operation]:
        """Expiry sweeps, then the operations now due: bucket refreshes, republishing our own
        records and the replicas we hold (unless a peer stored them with us recently), and
        re-announcing what we provide."""
        self.records.sweep(now)
        self.providers.sweep(now)
        ops: list[Operation] = list(self.refresh_ops(now))
        interval = self.config.republish_interval
        by_key: dict[bytes, list[Record]] = {}
        for slot, entry in list(self.published.items()):
            record, last = entry
            if record.expiration <= now:
                del self.published[slot]
            elif now - last >= interval:
                entry[1] = now
                by_key.setdefault(slot[0], []).append(record)
        for key, held in self.records.items():
            if key not in by_key and now - self.records.last_refreshed.get(key, now) >= interval:
                live = [r for r in held if r.expiration > now]
                if live:
                    by_key[key] = live
                    self.records.last_refreshed[key] = now
        for key, records in by_key.items():
            for batch in batch_records(records):
                ops.append(
                    StoreOp(
                        self,
                        key,
                        self.request(PUT_VALUE, records=batch),
                        now,
                        functools.partial(self._store_batch, batch),
                    )
                )
        for key, last in list(self.provided.items()):
            if now - last >= self.config.reprovide_interval:
                ops.append(self.add_provider(key, now))
        return ops
