"""Simulator driver for the DHT: runs many :class:`~latticaray.mesh.dht.core.DhtCore` objects over
a :class:`VirtualNetwork` with a virtual clock, the same way the asyncio service drives one core
over mesh RPC.

Messages travel as the in-memory dicts the core produces (the msgpack codec is exercised by the
asyncio driver and its tests; here its byte size is estimated). A request the virtual network drops
or a node that is down surfaces as a timeout ``config.request_timeout`` after it was sent, exactly
as a real RPC deadline would. To keep the event queue small, that timeout is only scheduled once
the request is known to be lost: dropped at send (loss, partition, destination down), its response
dropped, or its destination leaving while it is in flight (use :meth:`SimDht.leave`; changing
partitions under in-flight requests is not supported).

Join procedure (Kademlia's): a new node adds one live seed, looks up its own id, then looks up a
random id in every bucket farther than its closest neighbour (``join_refresh="all"``). A cheaper
variant, ``join_refresh=n``, refreshes only the ``n`` farthest of those buckets (0: self-lookup
only); the rest fill from the traffic the node sees and from periodic bucket refresh. Nodes join
one after another at ``join_interval`` of virtual time, so lookups of overlapping joins run
concurrently.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Hashable
from typing import Any

from ..dht.config import DhtConfig
from ..dht.core import DhtCore
from ..dht.keyspace import Contact
from ..dht.lookups import Operation
from ..dht.messages import PING
from ..identity import KeyPair
from . import Simulator, TimerHandle, VirtualNetwork

__all__ = ["SimDht"]

_HEADER_BYTES = 48
_CONTACT_BYTES = 40 + 30


def _message_size(msg: dict[str, Any]) -> int:
    size = _HEADER_BYTES
    for name in ("peers", "providers"):
        size += _CONTACT_BYTES * len(msg.get(name, ()))
    for record in msg.get("records", ()):
        size += record.size + 12
    return size


class _Request:
    __slots__ = ("contact", "lost", "on_ping", "op", "sent_at", "src")

    def __init__(
        self,
        src: bytes,
        op: Operation | None,
        contact: Contact,
        sent_at: float,
        on_ping: Callable[[bool], None] | None = None,
    ) -> None:
        self.src = src
        self.op = op
        self.contact = contact
        self.sent_at = sent_at
        self.lost = False
        self.on_ping = on_ping


class SimDht:
    """A population of DHT cores on one virtual network."""

    def __init__(
        self,
        seed: int = 0,
        config: DhtConfig | None = None,
        latency: tuple[float, float] = (0.005, 0.05),
        loss: float = 0.0,
        keys: Callable[[int], KeyPair] | None = None,
        join_refresh: str | int = "all",
    ) -> None:
        self.join_refresh = join_refresh
        self.sim = Simulator(seed=seed)
        self.rng = random.Random(seed ^ 0x5EED)
        self.config = config or DhtConfig()
        self._base_latency: dict[bytes, float] = {}
        self.net = VirtualNetwork(self.sim, latency=self._link_latency, loss=loss)
        self._latency_range = latency
        self.nodes: dict[bytes, DhtCore] = {}
        self.keypairs: dict[bytes, KeyPair] = {}
        self.contacts: dict[bytes, Contact] = {}
        self._pending: dict[int, _Request] = {}
        self._next_rid = 0
        self._wakeups: dict[int, TimerHandle] = {}
        #: id(op) -> (op, on_done) of operations driven by run_op and not yet finished
        self._on_done: dict[int, tuple[Operation, Callable[[Operation], None] | None]] = {}
        # host keys derived from the seed, so peer IDs (and so the whole run) repeat exactly
        key_rng = random.Random(seed ^ 0x6B657973)
        self._key_factory = keys or (lambda i: KeyPair.from_private_bytes(key_rng.randbytes(32)))
        self._created = 0
        self.joined: set[bytes] = set()

    # population ------------------------------------------------------------------------------
    def new_node(self) -> DhtCore:
        keypair = self._key_factory(self._created)
        self._created += 1
        pid = keypair.peer_id.to_bytes()
        core = DhtCore(
            pid, config=self.config, now=self.sim.now, rng=random.Random(self.rng.getrandbits(64))
        )
        self.nodes[pid] = core
        self.keypairs[pid] = keypair
        self.contacts[pid] = core.contact
        lo, hi = self._latency_range
        self._base_latency[pid] = self.rng.uniform(lo, hi) / 2
        self.net.attach(pid, functools.partial(self._on_message, pid))
        return core

    def live_nodes(self) -> list[bytes]:
        return [p for p in self.nodes if self.net.is_up(p)]

    def join(
        self, core: DhtCore, seed: bytes | None, on_joined: Callable[[DhtCore], None] | None = None
    ) -> None:
        """Run the join procedure for ``core`` (seed None: the first node, nothing to do)."""
        if seed is None:
            self.joined.add(core.peer_id)
            if on_joined:
                on_joined(core)
            return

        attempts = [0]

        def after_self_lookup(_op: Operation) -> None:
            if len(core.routing) == 0 and attempts[0] < 3:  # the seed was unreachable: retry
                attempts[0] += 1
                self.run_op(
                    core, core.bootstrap([self.contacts[seed]], self.sim.now), after_self_lookup
                )
                return
            refreshes = core.refresh_ops(self.sim.now, all_buckets=True)
            if self.join_refresh != "all":
                # refresh_ops lists buckets nearest first: keep the farthest n
                refreshes = (
                    refreshes[len(refreshes) - int(self.join_refresh) :]
                    if int(self.join_refresh)
                    else []
                )
            remaining = [len(refreshes)]

            def one_done(_op2: Operation) -> None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self.joined.add(core.peer_id)
                    if on_joined:
                        on_joined(core)

            if not refreshes:
                remaining[0] = 1
                one_done(_op)
            for op in refreshes:
                self.run_op(core, op, one_done)

        self.run_op(core, core.bootstrap([self.contacts[seed]], self.sim.now), after_self_lookup)

    def grow(self, count: int, join_interval: float = 0.05) -> list[DhtCore]:
        """Add ``count`` nodes joining one every ``join_interval`` seconds; each uses a random
        node that has finished joining as its seed. Runs until all have joined."""
        cores = [self.new_node() for _ in range(count)]
        for i, core in enumerate(cores):
            self.sim.call_later(i * join_interval, self._join_with_random_seed, core)
        target = len(self.joined) + count
        self.sim.run(stop=lambda: len(self.joined) >= target)
        return cores

    def _join_with_random_seed(self, core: DhtCore) -> None:
        live = [p for p in self._joined_list() if self.net.is_up(p)]
        self.join(core, self.rng.choice(live) if live else None)

    def _joined_list(self) -> list[bytes]:
        # sorted for determinism: set iteration order depends on hashing of bytes (stable, but
        # sorting makes the choice independent of insertion history)
        return sorted(self.joined)

    def leave(self, peer_id: bytes) -> None:
        """The node vanishes without notice (crash or network loss)."""
        self.net.set_down(peer_id)
        self.joined.discard(peer_id)
        for rid, req in self._pending.items():
            if req.contact.peer_id == peer_id:
                self._lost(rid, req)

    def run_for(self, duration: float) -> None:
        """Advance virtual time by ``duration``, processing every event due meanwhile."""
        self.sim.run(until=self.sim.now + duration)

    # operations ------------------------------------------------------------------------------
    def run_op(
        self, core: DhtCore, op: Operation, on_done: Callable[[Operation], None] | None = None
    ) -> Operation:
        """Drive ``op`` on ``core``; ``on_done(op)`` is called once when it completes."""
        self._on_done[id(op)] = (op, on_done)
        self._pump(core, op)
        return op

    def run_until_done(self, core: DhtCore, op: Operation, limit: float = 600.0) -> Operation:
        finished: list[Operation] = []
        self.run_op(core, op, finished.append)
        deadline = self.sim.now + limit
        self.sim.run(until=deadline, stop=lambda: bool(finished))
        if not finished:
            raise TimeoutError(f"operation did not finish within {limit}s of virtual time")
        return op

    def _pump(self, core: DhtCore, op: Operation) -> None:
        if not self.net.is_up(core.peer_id):
            return
        now = self.sim.now
        if op.done and id(op) not in self._on_done:
            return
        for contact, request in op.next_requests(now):
            self._send_request(core, contact, request, op)
        self._send_pings(core)
        if op.done:
            entry = self._on_done.pop(id(op), None)
            if entry is not None and entry[1] is not None:
                entry[1](op)
            return
        deadline = op.next_deadline()
        if deadline is not None and deadline > now:
            key = id(op)
            old = self._wakeups.get(key)
            if old is not None:
                old.cancel()
            self._wakeups[key] = self.sim.call_at(deadline, self._wake, core, op)

    def _wake(self, core: DhtCore, op: Operation) -> None:
        self._wakeups.pop(id(op), None)
        self._pump(core, op)

    def _send_request(
        self,
        core: DhtCore,
        contact: Contact,
        request: dict[str, Any],
        op: Operation | None,
        on_ping: Callable[[bool], None] | None = None,
    ) -> None:
        rid = self._next_rid
        self._next_rid += 1
        req = _Request(core.peer_id, op, contact, self.sim.now, on_ping)
        self._pending[rid] = req
        delivered = self.net.send(
            core.peer_id,
            contact.peer_id,
            ("req", rid, request),
            size=_message_size(request),
            kind=request["op"],
        )
        if not delivered or not self.net.is_up(contact.peer_id):
            self._lost(rid, req)

    def _lost(self, rid: int, req: _Request) -> None:
        """The request or its response will never arrive: time out when the deadline passes."""
        if not req.lost:
            req.lost = True
            self.sim.call_at(req.sent_at + self.config.request_timeout, self._timeout, rid)

    def _send_pings(self, core: DhtCore) -> None:
        for contact in core.take_pings():
            self._send_request(
                core,
                contact,
                core.request(PING),
                None,
                on_ping=functools.partial(self._ping_done, core, contact),
            )

    def _link_latency(self, a: Hashable, b: Hashable) -> float:
        lat = self._base_latency
        return lat[a] + lat[b]  # type: ignore[index]  # the network's node names are our peer ids

    def _ping_done(self, core: DhtCore, contact: Contact, alive: bool) -> None:
        core.ping_done(contact, alive, self.sim.now)

    def _on_message(self, dst: bytes, src: Hashable, msg: Any, size: int) -> None:
        self._deliver(src, dst, msg)  # type: ignore[arg-type]

    def _deliver(self, src: bytes, dst: bytes, msg: tuple[Any, ...]) -> None:
        kind, rid, body = msg
        if kind == "req":
            core = self.nodes[dst]
            response = core.handle_request(self.contacts[src], body, self.sim.now)
            self._send_pings(core)
            if not self.net.send(dst, src, ("resp", rid, response), size=_message_size(response)):
                req = self._pending.get(rid)
                if req is not None:
                    self._lost(rid, req)
            return
        req = self._pending.pop(rid, None)
        if req is None:
            return
        self._complete(req, body)

    def _timeout(self, rid: int) -> None:
        req = self._pending.pop(rid, None)
        if req is not None:
            self._complete(req, None)

    def _complete(self, req: _Request, response: dict[str, Any] | None) -> None:
        core = self.nodes[req.src]
        if not self.net.is_up(req.src):
            return
        now = self.sim.now
        if req.op is None:
            if req.on_ping is not None:
                req.on_ping(response is not None and "error" not in response)
            return
        if response is None:
            req.op.on_failure(req.contact, now)
        else:
            req.op.on_response(req.contact, response, now)
        self._pump(core, req.op)
