"""Reference counting with owners and borrowers: which objects a node keeps, and for how long.

The node where an object is created (put, or a task's result) owns it. Its `RefTable` counts
*holds* on each object it owns:

* one per process of the node (driver, worker, attached driver) holding at least one ObjectRef
  to it: the creating process holds it from the start; a process that deserializes a copy posts
  `borrow`, and every process posts `release` when its last copy is dropped;
* one per submitted task whose arguments carry the ref (top level or nested): released when the
  task is done;
* one per object containing the ref (a list of refs put in the store, refs inside a result or
  a streamed item): released when the containing object is;
* one for each item a streaming task yielded that no process has taken from its generator yet
  (`ObjectRefGenerator`): taking it hands this hold to the taking process; dropping the
  generator (or the death of the process that submitted the task) releases the items not taken,
  and the items a dropped generator's task still yields are released as they arrive;
* and a set of *borrower* nodes: other nodes holding it for any of the reasons above, which
  registered with `/latticaray/ref/1` and unregister when their own count drops to zero. A
  borrower node that dies is dropped from every set.

When the count is zero and no borrower is left, the object leaves the node's table and its store
copy is unpinned (deleted, and no longer provided), and the refs it contained are let go of in
turn. A node holding a ref owned elsewhere counts it the same way and is a borrower at the owner
while its count is positive. Registrations to one owner travel in order on one queue; a node
finishes sending them before it reports a task done or acknowledges refs inside a result
(`held`), so an owner never sees the last other holder leave before the new one arrives.

Actor handles are counted the same way, under the actor's id (16 bytes, never an object's id):
the node that creates a non-detached actor owns it and counts the creating process's handle
(`create_actor`); a copy deserialized elsewhere is a borrow, a handle inside a task's arguments
or an object is held like a ref, and so is every call made through a handle until the call is
done (its pending calls keep it alive). When the count is zero and no borrower is left the
actor is *reclaimed*: `node.actors.reclaim` ends it, instead of an object being freed.
Detached actors are not counted (they live until killed).

Refs and handles pickled outside the runtime's own serialization (user code calling pickle)
cannot be tracked and pin their object (keep their actor alive) for the process's lifetime.
"""

from __future__ import annotations

import asyncio
import collections
import logging

log = logging.getLogger(__name__)

BORROW = 1
UNBORROW = 0
DELIVERY_ATTEMPTS = 4  # to an owner that is still a live member (a connection being replaced)
RETRY_DELAY = 0.25


def track_holds(client) -> None:
    """Count what this process (a worker, an attached driver) holds, so that when it dies or
    disconnects its holds are given back. The embedded driver dies with its node: not tracked."""
    client.ref_holds = {}


class RefTable:
    """One node's reference counts (owned and borrowed objects), borrowers and containment."""

    def __init__(self, node):
        self.node = node
        self.counts: dict[bytes, int] = {}  # oid -> holds on this node
        self.owners: dict[bytes, str] = {}  # borrowed oid -> its owner node
        self.borrowers: dict[bytes, set[str]] = {}  # owned oid -> nodes borrowing it
        self.contents: dict[bytes, list] = {}  # object -> [[oid, owner], ...] inside it
        self.task_pins: dict[bytes, list] = {}  # task or actor id -> refs its args carry
        self.forwarded: dict[bytes, tuple[str, list]] = {}  # tid -> (caller, refs in results)
        self.streamed: dict[bytes, tuple[object, set]] = {}  # streaming tid -> (submitter,
        #                                                       items no process took yet)
        self.dropped_streams: set[bytes] = set()  # generator dropped, task still yielding
        self.actors: set[bytes] = set()  # owned actors reclaimed when nothing holds them
        self._queues: dict[str, list] = {}
        self._senders: dict[str, asyncio.Task] = {}
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ holds
    def create(self, oid: bytes, client) -> None:
        """An object this node owns, held by the process that created its ref."""
        holds = client.ref_holds
        if holds is not None:
            holds[oid] = holds.get(oid, 0) + 1
        elif client.kind == "remote":
            return  # the caller node owns it; this node only runs the task
        self.counts[oid] = 1

    def create_actor(self, aid: bytes, client) -> None:
        """A non-detached actor this node owns, held by the handle of the process creating it:
        reclaimed (`node.actors.reclaim`) once nothing holds it any more."""
        self.actors.add(aid)
        self.create(aid, client)

    def hold(self, oid: bytes, owner: str, client=None) -> bool:
        """One more hold; False if the object is already gone from its owner (this node)."""
        counts = self.counts
        held = counts.get(oid)
        if held is None:
            if owner and owner != self.node.node_id:
                counts[oid] = 1
                self.owners[oid] = owner
                self._send(owner, BORROW, oid)
            elif oid in self.node.objects.entries:
                counts[oid] = 2  # not counted so far: whoever made it holds one
            else:
                return False
        else:
            counts[oid] = held + 1
        holds = getattr(client, "ref_holds", None)
        if holds is not None:
            holds[oid] = holds.get(oid, 0) + 1
        return True

    def release(self, oids, client) -> None:
        """A process let go of its last ref to each of `oids`."""
        holds = client.ref_holds
        counts = self.counts
        free = []
        for oid in oids:
            if holds is not None:
                left = holds.get(oid, 0) - 1
                if left > 0:
                    holds[oid] = left
                else:
                    holds.pop(oid, None)
            held = counts.get(oid)
            if held is not None:
                if held > 1:
                    counts[oid] = held - 1
                    continue
                if oid in self.owners or oid in self.borrowers or oid in self.contents:
                    self.unhold(oid)
                    continue
                del counts[oid]  # the common case: an object only this process referenced
            free.append(oid)
        if free:
            if self.actors:
                free = self._reclaim_actors(free)
            if free:
                self.node.objects.free(free)

    def _reclaim_actors(self, oids: list[bytes]) -> list[bytes]:
        """Reclaim the actors among ``oids`` (nothing holds them); the objects are returned."""
        actors = self.actors
        objects = []
        for oid in oids:
            if oid in actors:
                actors.discard(oid)
                self.node.actors.reclaim(oid)
            else:
                objects.append(oid)
        return objects

    def unhold(self, oid: bytes) -> None:
        counts = self.counts
        left = counts.get(oid)
        if left is None:
            return
        left -= 1
        if left > 0:
            counts[oid] = left
            return
        owner = self.owners.pop(oid, None)
        if owner is not None:
            del counts[oid]
            self._send(owner, UNBORROW, oid)
            return
        if self.borrowers.get(oid):
            counts[oid] = 0
            return
        self._free(oid)

    def _free(self, oid: bytes) -> None:
        self.counts.pop(oid, None)
        self.borrowers.pop(oid, None)
        if oid in self.actors:
            self._reclaim_actors([oid])
            return
        self.node.objects.free([oid])
        if self.contents:
            self.drop_contents(oid)

    def client_gone(self, client) -> None:
        """A process of this node died or disconnected: its holds go with it, and so do the
        streams it submitted (their generators died with it)."""
        for tid in [t for t, (owner, _) in self.streamed.items() if owner is client]:
            self.node.streams.drop({"tid": tid}, client)
        holds = getattr(client, "ref_holds", None)
        if not holds:
            return
        client.ref_holds = {}
        for oid, count in holds.items():
            for _ in range(count):
                self.unhold(oid)

    # ------------------------------------------------------------------ containment, task args
    def contain(self, outer: bytes, inner: list) -> None:
        """`outer` carries refs `inner` ([oid, owner] pairs): they live at least as long."""
        self._hold_under(self.contents, outer, inner)

    def drop_contents(self, outer: bytes) -> None:
        self._unhold_under(self.contents, outer)

    def pin_task(self, key: bytes, refs: list) -> None:
        self._hold_under(self.task_pins, key, refs)

    def task_done(self, key: bytes) -> None:
        self._unhold_under(self.task_pins, key)

    def _hold_under(self, table: dict, key: bytes, refs: list) -> None:
        """Hold each of ``refs`` ([oid, owner] pairs) on behalf of ``key`` in ``table``."""
        kept = [pair for pair in refs if self.hold(pair[0], pair[1])]
        if kept:
            table.setdefault(key, []).extend(kept)

    def _unhold_under(self, table: dict, key: bytes) -> None:
        for oid, _owner in table.pop(key, None) or ():
            self.unhold(oid)

    def forward(self, tid: bytes, caller: str, outers: list[bytes]) -> list | None:
        """Results of a caller's task leave this node: what they contain stays held here until
        the caller acknowledges that it holds them itself (`held`)."""
        refs: list[list] = []
        for outer in outers:
            refs.extend(self.contents.pop(outer, ()))
        if refs:
            self.forwarded[tid] = (caller, refs)
        return refs or None

    def held(self, tid: bytes, caller: str) -> None:
        entry = self.forwarded.get(tid)
        if entry is not None and entry[0] == caller:
            del self.forwarded[tid]
            for oid, _owner in entry[1]:
                self.unhold(oid)

    # ------------------------------------------------------------------ streamed items (owner side)
    def open_stream(self, tid: bytes, client) -> None:
        """`client` submitted a streaming task: this node owns its items."""
        if client is not None and client.kind != "remote":
            self.streamed[tid] = (client, set())

    def stream_item(self, tid: bytes, oid: bytes) -> bool:
        """A sealed item of a streaming task: if this node owns it, its generator holds it until
        a process takes it. False if the generator was dropped: the item is freed at once."""
        if tid in self.dropped_streams:
            self._free(oid)
            return False
        entry = self.streamed.get(tid)
        if entry is not None:
            self.counts[oid] = self.counts.get(oid, 0) + 1
            entry[1].add(oid)
        return True

    def take_item(self, tid: bytes, oid: bytes, client) -> bool:
        """A process takes an item from the generator: True if that hands it the generator's
        hold (its first taker); otherwise the process registers its copy as a borrow."""
        entry = self.streamed.get(tid)
        if entry is None or oid not in entry[1]:
            return False
        entry[1].discard(oid)
        holds = getattr(client, "ref_holds", None)
        if holds is not None:
            holds[oid] = holds.get(oid, 0) + 1
        return True

    def drop_stream(self, tid: bytes, running: bool) -> None:
        """The generator is gone: items nobody took are released, and so will be the items
        its task yields from now on, if it is still `running`."""
        entry = self.streamed.pop(tid, None)
        if running:
            self.dropped_streams.add(tid)
        if entry is not None:
            for oid in entry[1]:
                self.unhold(oid)

    def stream_end(self, tid: bytes) -> bool:
        """The streaming task is done: no more items will arrive. True if its generator was
        dropped already (nobody will read the end of the stream)."""
        entry = self.streamed.get(tid)
        if entry is not None and not entry[1]:
            del self.streamed[tid]
        if tid in self.dropped_streams:
            self.dropped_streams.discard(tid)
            return True
        return False

    # ------------------------------------------------------------------ borrowers (owner side)
    def on_ops(self, peer: str, ops: list) -> None:
        """Borrow registrations from another node, in the order it made them."""
        for op, oid in ops:
            if op == BORROW:
                if oid not in self.counts:
                    if oid not in self.node.objects.entries or oid in self.owners:
                        self.stats["borrow_of_freed"] += 1
                        continue
                    self.counts[oid] = 1  # not counted so far: its creator holds one
                self.borrowers.setdefault(oid, set()).add(peer)
            else:
                self._unborrow(oid, peer)

    def _unborrow(self, oid: bytes, peer: str) -> None:
        borrowers = self.borrowers.get(oid)
        if borrowers is None:
            return
        borrowers.discard(peer)
        if borrowers:
            return
        del self.borrowers[oid]
        if self.counts.get(oid) == 0:
            self._free(oid)

    def node_gone(self, peer: str) -> None:
        """A node left the mesh: it borrows nothing any more, and owes no acknowledgements."""
        for oid in [o for o, b in self.borrowers.items() if peer in b]:
            self._unborrow(oid, peer)
        for tid in [t for t, (caller, _) in self.forwarded.items() if caller == peer]:
            self.held(tid, peer)
        self._queues.pop(peer, None)

    # ------------------------------------------------------------------ borrower side
    def _send(self, owner: str, op: int, oid: bytes) -> None:
        if self.node.remote is None:
            return
        self._queues.setdefault(owner, []).append([op, oid])
        if owner not in self._senders:
            self._senders[owner] = self.node.spawn(self._drain(owner))

    async def _drain(self, owner: str) -> None:
        try:
            while True:
                batch = self._queues.get(owner)
                if not batch:
                    self._queues.pop(owner, None)
                    return
                self._queues[owner] = []
                await self._deliver(owner, batch)
        finally:
            self._senders.pop(owner, None)

    async def _deliver(self, owner: str, batch: list) -> None:
        remote = self.node.remote
        assert remote is not None
        for attempt in range(DELIVERY_ATTEMPTS):
            try:
                await remote.refs.call(owner, batch)
                self.stats["ref_calls"] += 1
                return
            except Exception as exc:
                if not remote.membership.is_alive(
                    owner
                ):  # the owner is gone: its objects went with it
                    log.debug("reference updates to %s dropped: %r", owner, exc)
                    return
                log.info("reference updates to %s failed (attempt %d): %r", owner, attempt + 1, exc)
                await asyncio.sleep(RETRY_DELAY * (attempt + 1))
        self.stats["ref_updates_lost"] += len(batch)

    def unsettled(self) -> bool:
        return bool(self._senders)

    async def settled(self) -> None:
        """Every registration made so far has reached its owner (or the owner is gone)."""
        while self._senders:
            await asyncio.gather(*list(self._senders.values()), return_exceptions=True)


def task_arg_refs(message: dict) -> list[list]:
    """Refs a task's arguments carry: top-level ref arguments and refs nested in values."""
    refs: list[list] = list(message.get("inner") or ())
    args = message.get("args")
    if args and args[0] == "l":
        for item in list(args[1]) + list(args[2].values()):
            if item[0] == 1:
                refs.append([item[1], item[2]])
    return refs
