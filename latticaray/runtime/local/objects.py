"""The node's object table: entries it owns or holds, their store pins, and the object requests.

An entry is pending until its producer seals it (a put, a task's return, a streamed item). A
sealed store value is pinned in the node's `LocalStore` (`store_refs`, by store name) while the
entry lives; `free` drops entries nothing holds any more (refcount.py decides when), and
`forget` lets go of their store copy. Objects with equal content share one store file under
several names (local names linked to its CID, and the CID itself): a name whose count drops to
zero is released in the store (`LocalStore.release`), which deletes the file only when no other
name refers to it, a pinned CID included. `cid_index` maps a CID to every object id named by
it here. The requests `get`, `wait`, `cid` and `get_cid` of the
node's clients are answered here, recovering a lost store copy (local/recovery.py) or asking
the mesh (remote/) for objects owned elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.errors import ObjectLostError, ObjectNotFoundError
from latticaray.runtime.local.records import ERROR, OK, PENDING, ObjectEntry
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode


def is_store_data(data: bytes | None) -> bool:
    """Whether sealed bytes are a reference into a node's store (rather than a value)."""
    return data is not None and data[:1] == b"\x00" and serialization.is_store_ref(data)


class ObjectTable:
    """Objects of one node: entries by object id, CIDs known, store pins, hashing under way."""

    def __init__(self, node: RuntimeNode):
        self.node = node
        self.entries: dict[bytes, ObjectEntry] = {}
        self.cid_index: dict[str, dict[bytes, None]] = {}  # CID -> object ids (ordered set)
        self.store_refs: collections.Counter = collections.Counter()  # by store name
        self.on_cid_known: Callable[[str], Any] | None = None  # a store CID exposed (DHT)
        self.sent_by_cid: dict[str, list[str]] = {}  # CID -> local names awaiting "fetched"
        self.hashing: dict[str, asyncio.Future] = {}  # local name -> its resolution under way
        self.seal_count = 0  # the driver's wait() sleeps on seal_cond until this moves
        self.seal_waiters = 0
        self.seal_cond = threading.Condition()

    # ------------------------------------------------------------------ posts
    def put(self, message: dict, client: Any) -> None:
        data = message["d"]
        self.entries[message["oid"]] = ObjectEntry(OK, data)
        if data[:1] == b"\x00" and serialization.is_store_ref(data):
            self.store_refs[serialization.store_name(data)] += 1
        self.node.refs.create(message["oid"], client)

    def contain(self, message: dict, client: Any) -> None:
        """Refs pickled inside a put object: they live as long as it does."""
        self.node.refs.contain(message["oid"], message["inner"])

    def release(self, message: dict, client: Any) -> None:
        """A process dropped its last ref to these: objects nothing else holds are freed (by
        `free`, which drops them once sealed)."""
        self.node.refs.release(message["oids"], client)

    def borrow(self, message: dict, client: Any) -> None:
        hold = self.node.refs.hold
        for oid, owner in message["refs"]:
            hold(oid, owner or self.node.node_id, client)

    # ------------------------------------------------------------------ lifetime
    def free(self, oids: list[bytes]) -> None:
        """Nothing holds these any more: drop them (a pending one once it is sealed)."""
        entries = self.entries
        on_release = self.node.recovery.on_release
        for oid in oids:
            on_release(oid)
            entry = entries.get(oid)
            if entry is None:
                continue
            if entry.status == PENDING or entry.waiters:
                entry.released = True
                continue
            del entries[oid]
            self.forget(entry)

    def forget(self, entry: ObjectEntry) -> None:
        """An entry leaves the table: its CID is unknown here and its store copy unpinned."""
        if entry.cid is not None:
            self.unindex(entry)
        data = entry.data
        if is_store_data(data):
            assert data is not None
            if entry.holder is not None:  # the only copy is on the node that made it
                remote = self.node.remote
                if remote is not None:
                    remote.caller.unpin_at(entry.holder, [serialization.store_name(data)])
                return
            self.unpin(serialization.store_name(data))

    def pin(self, cid: str) -> None:
        self.store_refs[cid] += 1

    def unpin(self, name: str) -> None:
        """One pin of the store name ``name`` goes; with the last, the store lets go of the
        name, and of the file only if no other name refers to it (``pins_cid``)."""
        self.store_refs[name] -= 1
        if self.store_refs[name] <= 0:
            del self.store_refs[name]
            try:
                self.node.store.release(name, self.pins_cid)
            except Exception:
                pass  # already evicted or deleted: nothing to free

    def pins_cid(self, cid: str) -> bool:
        """Whether an entry here pins the store object ``cid`` by its CID (rather than by a
        local name linked to it, which the store counts itself)."""
        return self.store_refs.get(cid, 0) > 0

    def seal(self, oid: bytes, status: int, data: bytes | None) -> None:
        entry = self.entries.get(oid)
        if entry is None:
            entry = self.entries[oid] = ObjectEntry()
        if entry.status != PENDING:
            return
        entry.seal(status, data)
        self.seal_count += 1
        if self.seal_waiters:
            with self.seal_cond:
                self.seal_cond.notify_all()
        if entry.holder is None and is_store_data(data):
            assert data is not None
            self.store_refs[serialization.store_name(data)] += 1
        if entry.released:
            self.entries.pop(oid, None)
            self.forget(entry)
            self.node.refs.drop_contents(oid)

    def drop_copy(self, entry: ObjectEntry) -> None:
        """The entry stops referring to its store copy (lost, or about to be re-created)."""
        data = entry.data
        if data is None or not serialization.is_store_ref(data):
            return
        cid = serialization.store_name(data)
        if entry.holder is not None:
            holder, entry.holder = entry.holder, None
            remote = self.node.remote
            if remote is not None:
                remote.caller.unpin_at(holder, [cid])
        elif self.store_refs.get(cid, 0) > 0:
            self.unpin(cid)
        if entry.cid is not None:
            self.unindex(entry)
            entry.cid = None

    # ------------------------------------------------------------------ waiting
    def ready_entries(self, oids: list[bytes]) -> list[tuple[int, bytes | None]] | None:
        """Called from the driver thread: (status, data) of each if all are sealed, else None."""
        entries = self.entries
        out = []
        for oid in oids:
            entry = entries.get(oid)
            if entry is None or entry.status == PENDING or entry.holder is not None:
                return None
            out.append((entry.status, entry.data))
        return out

    async def entries_for(
        self, oids: list, timeout: float | None, k: int | None = None
    ) -> list[ObjectEntry] | None:
        """Wait until k (default all) of the objects are sealed; returns their entries."""
        entries = []
        for oid, owner in oids:
            entry = self.entries.get(oid)
            if entry is None:
                entry = await self.locate(oid, owner)
            entries.append(entry)
        need = len(entries) if k is None else min(k, len(entries))
        pending = [e for e in entries if e.status == PENDING]
        if len(entries) - len(pending) >= need:
            return entries
        future = asyncio.get_running_loop().create_future()
        remaining = [need - (len(entries) - len(pending))]

        def one_ready() -> None:
            remaining[0] -= 1
            if remaining[0] <= 0 and not future.done():
                future.set_result(None)

        for entry in pending:
            entry.on_ready(one_ready)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        return entries

    async def locate(self, oid: bytes, owner: str) -> ObjectEntry:
        """An object this node does not hold: fetched from its owner, else an error value."""
        node = self.node
        if node.remote is not None and owner and owner != node.node_id:
            return await node.remote.objects.fetch_object(oid, owner)
        entry = ObjectEntry()
        entry.seal(
            ERROR,
            error_blob(
                ObjectLostError(
                    f"object {oid.hex()} is not known to its owner node "
                    f"{owner[:16] or node.node_id[:16]} (released or never created)"
                )
            ),
        )
        return entry

    # ------------------------------------------------------------------ requests
    async def get(self, message: dict) -> dict:
        loop = asyncio.get_running_loop()
        timeout = message.get("timeout")
        deadline = None if timeout is None else loop.time() + timeout
        entries = await self.entries_for(message["oids"], timeout)
        if entries is None:
            return {"timeout": True}
        recovery = self.node.recovery
        for i, (oid, _owner) in enumerate(message["oids"]):
            entry = entries[i]
            if self.entries.get(oid) is entry and recovery.is_missing(entry):
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    entries[i] = await asyncio.wait_for(recovery.ensure_local(oid, entry), left)
                except TimeoutError:  # a re-execution it started goes on
                    return {"timeout": True}
        return {"vals": [(e.status, e.data) for e in entries]}

    async def wait(self, message: dict) -> dict:
        oids = message["oids"]
        found = await self.entries_for(oids, message.get("timeout"), message["k"])
        entries = found if found is not None else [self.entries.get(oid) for oid, _ in oids]
        ready = [i for i, e in enumerate(entries) if e is not None and e.status != PENDING]
        return {"ready": ready[: message["k"]]}

    async def cid(self, message: dict) -> dict:
        oid = message["oid"]
        entries = await self.entries_for([(oid, message.get("owner", ""))], None)
        assert entries is not None  # no timeout
        entry = entries[0]
        # (an object that failed still has a CID: its error is what it holds)
        if entry.cid is None:
            await self.resolve_off_loop(entry.data)  # cid_for then finds it linked
        return {"cid": self.cid_for(oid, entry)}

    async def get_by_cid(self, message: dict) -> dict:
        node = self.node
        cid = message["cid"]
        oid = self.oid_by_cid(cid)
        entry = self.entries.get(oid) if oid is not None else None
        if oid is not None and entry is not None and entry.status != PENDING:
            if node.recovery.is_missing(entry):
                entry = await node.recovery.ensure_local(oid, entry)
            return {"val": (entry.status, entry.data)}
        if node.store is not None and cid.startswith("bafy"):
            try:
                if node.store.contains(cid):
                    return {"val": (OK, serialization.STORE_MAGIC + cid.encode("ascii"))}
            except Exception:
                pass  # not a CID the store understands: ask the mesh
        if node.remote is not None:
            found = await node.remote.objects.fetch_by_cid(cid, message.get("timeout"))
            if found is not None:
                return {"val": found}
        return {"error": error_blob(ObjectNotFoundError(f"no peer of the mesh holds {cid}"))}

    # ------------------------------------------------------------------ naming by CID
    def oid_by_cid(self, cid: str) -> bytes | None:
        """An object id of this node named by ``cid`` (the earliest still here), or None."""
        oids = self.cid_index.get(cid)
        return next(iter(oids)) if oids else None

    def unindex(self, entry: ObjectEntry) -> None:
        """``entry`` (left the table, or losing its CID) is no longer found by its CID; the
        other objects named by it still are."""
        assert entry.cid is not None
        oids = self.cid_index.get(entry.cid)
        if oids is None:
            return
        entries = self.entries
        for oid in list(oids):
            found = entries.get(oid)
            if found is None or found is entry:
                del oids[oid]
        if not oids:
            del self.cid_index[entry.cid]

    def cid_for(self, oid: bytes, entry: ObjectEntry) -> str:
        if entry.cid is None:
            entry.cid = serialization.cid_of(entry.data)  # hashes a local put, once
            self.cid_index.setdefault(entry.cid, {})[oid] = None
            if self.on_cid_known is not None and serialization.is_store_ref(entry.data):
                self.on_cid_known(entry.cid)
        return entry.cid

    def portable(self, data: bytes, awaiting_fetch: bool = False) -> bytes:
        """A store reference about to leave this node, named by CID (hashing a local put now;
        the CID is announced). ``awaiting_fetch``: the receiver answers "fetched" with the CID,
        which ``name_fetched`` maps back to the name our pin count uses."""
        out = serialization.portable(data)
        if out is not data:
            cid = serialization.store_name(out)
            if awaiting_fetch:
                self.sent_by_cid.setdefault(cid, []).append(serialization.store_name(data))
            if self.on_cid_known is not None:
                self.on_cid_known(cid)
        return out

    def cid_pending(self, data: bytes | None) -> bool:
        """Whether naming ``data`` by CID would hash: a store reference under a local name
        whose object is not linked to its CID yet."""
        store = self.node.store
        if (
            data is None
            or not serialization.is_store_ref(data)
            or serialization.store_name(data)[:1] == "b"
            or store is None
        ):
            return False
        try:
            return store.cid_if_resolved(serialization.store_name(data)) is None
        except Exception:
            return False  # not a name the store knows: ``portable`` reports it as before

    async def resolve_off_loop(self, data: bytes | None) -> None:
        """Hash the local put ``data`` refers to (if it is not linked yet) on an executor
        thread; one resolution per object, shared by every caller waiting for it. Raises what
        the store raises (ObjectNotFound: the object was deleted meanwhile)."""
        if not self.cid_pending(data):
            return
        assert data is not None
        name = serialization.store_name(data)
        future = self.hashing.get(name)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(None, serialization.store_cid, data)
            self.hashing[name] = future
            future.add_done_callback(  # its error is read by the callers; mark it seen
                lambda f: (self.hashing.pop(name, None), f.cancelled() or f.exception())
            )
        await asyncio.shield(future)

    async def portable_async(self, data: bytes, awaiting_fetch: bool = False) -> bytes:
        """``portable`` with the hashing (if any) done off the event loop."""
        await self.resolve_off_loop(data)
        return self.portable(data, awaiting_fetch)

    def name_fetched(self, cid: str) -> str:
        """The local name a CID sent with ``awaiting_fetch`` was pinned under (else the CID)."""
        names = self.sent_by_cid.get(cid)
        if not names:
            return cid
        name = names.pop()
        if not names:
            del self.sent_by_cid[cid]
        return name

    def unpin_fetched(self, cids: list[str]) -> None:
        """A caller has its own copies of these results now (`fetched`): our pins go."""
        for cid in cids:
            name = self.name_fetched(cid)
            if self.store_refs.get(name, 0) > 0:
                self.unpin(name)
