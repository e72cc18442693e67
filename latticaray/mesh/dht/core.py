"""The sans-I/O Kademlia node: its routing table and stores, the requests it answers, the
operations it starts (find node, get/put value with subkeys, provide/find providers), maintenance.

Nothing here reads a clock or touches a socket. Server side, a driver decodes a request and calls
:meth:`DhtCore.handle_request`, which returns the response. Client side, a method such as
:meth:`DhtCore.get_value` returns an :class:`~.lookups.Operation` (the iterative lookups live in
lookups.py, needing of the node only what ``LookupHost`` names); the driver loops::

    for contact, request in op.next_requests(now): send, then later
        op.on_response(contact, response, now)   or   op.on_failure(contact, now)
    ... until op.done, waking at op.next_deadline() to let stalled requests free their slot

and drains :meth:`DhtCore.take_pings` (liveness checks the routing table asked for). The asyncio
driver (service.py) and the simulator driver (latticaray/mesh/sim/dht.py) are two such loops.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from .config import DhtConfig
from .errors import RecordRejected
from .keyspace import Contact, dht_id, id_from_bytes, id_to_bytes, key_id, record_id
from .lookups import FindNodeOp, GetProvidersOp, GetValueOp, Operation, StoreOp
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
    RecordStore,
    RecordValidator,
    default_validators,
    validate_record,
)
from .routing import RoutingTable

__all__ = ["DhtCore", "batch_records"]

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
        return GetValueOp(self, key, now, quorum, local=self.records.get(key, now))

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

    def stop_providing(self, key: bytes) -> None:
        """No longer re-announce ``key``; forget our own provider record of it."""
        self.provided.pop(key, None)
        self.providers.remove(key, self.peer_id)

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
        return GetProvidersOp(self, key, count, now, local=self.providers.get(key, now))

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
