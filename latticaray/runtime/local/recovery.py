"""Recovery of owned objects whose store copy is gone, applying what lineage.Recovery decides.

A store-resident object this node owns can be missing here: the node that ran its task holds
the only copy (its `holder`) and died, or a store evicted our copy. `ensure_local` makes it
readable here again: the local store, another copy (`FetchCopy`: the object exchange asks the
holder, connected peers and the DHT's providers), then a re-execution of its task from lineage
(`Reexecute`), else `ObjectLostError` (`Lost`). See lineage.py for the order and the budget.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from latticaray.runtime import refcount, serialization
from latticaray.runtime.errors import ObjectLostError
from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.lineage import FetchCopy, Lost, Recovery, Reexecute
from latticaray.runtime.local.records import ERROR, OK, PENDING, ObjectEntry, TaskRecord
from latticaray.runtime.remote.objects import FETCH_DEADLINE

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

log = logging.getLogger(__name__)


class ObjectRecovery:
    """The node's side of lineage: hooks into the task lifecycle, and recovery of objects."""

    def __init__(self, node: RuntimeNode, core: Recovery | None = None):
        self.node = node
        self.core = core or Recovery()
        self.stats: collections.Counter = collections.Counter()

    # ------------------------------------------------------------------ lifecycle hooks
    def on_submit(self, rec: TaskRecord, client: Any) -> None:
        if getattr(client, "kind", None) == "remote":
            return  # this node executes for another owner: the owner keeps the lineage
        self.core.submitted(rec.tid, rec.msg, rec.retries_left, rec.nret)

    def on_actor_call(self, tid: bytes, nret: int) -> None:
        self.core.actor_call(tid, nret)

    def on_complete(self, rec: TaskRecord, failed: bool) -> None:
        self.core.completed(rec.tid, rec.retries_left, failed)

    def on_release(self, oid: bytes) -> None:
        self.core.released(oid)

    # ------------------------------------------------------------------ queries
    def is_missing(self, entry: ObjectEntry) -> bool:
        """Whether a sealed store-resident entry has no copy in this node's store."""
        if entry.status != OK or not serialization.is_store_ref(entry.data):
            return False
        if entry.holder is not None:
            return True
        store = self.node.store
        try:
            return store is not None and not store.contains(serialization.store_name(entry.data))
        except Exception:
            return True

    def is_lost(self, entry: ObjectEntry) -> bool:
        """Missing here, and no known live holder: recover it before a task may use it.
        (A result still held by a live executor is passed on by reference instead.)"""
        if not self.is_missing(entry):
            return False
        holder = entry.holder
        if holder is None:
            return True
        remote = self.node.remote
        return remote is None or not remote.membership.is_alive(holder)

    # ------------------------------------------------------------------ task arguments
    def fetch_args_first(self, rec: TaskRecord) -> bool:
        """Before a task runs on this node: store arguments held only elsewhere come here
        (recovered if lost). True when that is under way; the task is queued afterwards."""
        args = rec.msg["args"]
        if args[0] == "b":
            return False
        entries = self.node.objects.entries
        todo = []
        for item in list(args[1]) + list(args[2].values()):
            if item[0] == 0 and len(item) > 2 and serialization.is_store_ref(item[1]):
                entry = entries.get(item[2])
                if entry is not None and self.is_missing(entry):
                    todo.append((item, entry))
        if not todo:
            return False
        self.node.spawn(self._fetch_args(rec, todo))
        return True

    async def _fetch_args(self, rec: TaskRecord, todo: list) -> None:
        node = self.node
        for item, entry in todo:
            try:
                entry = await self.ensure_local(item[2], entry)
            except Exception as exc:  # a bug must not leave the task waiting forever
                node.tasks.fail(
                    rec, ObjectLostError(f"recovering argument {item[2].hex()} failed: {exc!r}")
                )
                return
            if entry.status != OK:
                node.tasks.fail_with_blob(rec, entry.data)
                return
            data = entry.data
            assert serialization.is_store_ref(data)  # OK, and missing: a store value
            item[1] = data  # a re-executed task may have made a new value (new CID)
            cid = serialization.store_name(data)
            node.objects.pin(cid)  # as argument resolution pins: held until the task ends
            if rec.pins is None:
                rec.pins = []
            rec.pins.append(cid)
        if not rec.done:
            node.tasks.run_here(rec)

    # ------------------------------------------------------------------ recovery
    async def ensure_local(self, oid: bytes, entry: ObjectEntry) -> ObjectEntry:
        """Wait for `entry` (owned, in the node's table) and make its value readable here.

        Returns the entry: OK with a local store copy, or ERROR (the task's error, or
        ObjectLostError when no copy exists and it cannot be re-executed).
        """
        node = self.node
        while True:
            await entry.sealed()
            if not self.is_missing(entry):
                return entry
            assert serialization.is_store_ref(entry.data)  # missing: a store value
            cid = serialization.store_cid(entry.data)
            step = self.core.next_step(oid, cid, entry.holder, copy_tried=False)
            assert isinstance(step, FetchCopy)
            fetched = await self._fetch_copy(step)
            if node.objects.entries.get(oid) is not entry:
                return entry  # released meanwhile: nobody here counts on it any more
            unchanged = (
                entry.status == OK
                and serialization.is_store_ref(entry.data)
                and serialization.store_cid(entry.data) == cid
            )
            if fetched and unchanged:
                self._adopt(entry, cid)
                if not self.is_missing(entry):
                    return entry
            if not unchanged or task_of(oid) in node.tasks.records:
                continue  # another getter re-executed it meanwhile: wait for that run
            step = self.core.next_step(oid, cid, entry.holder, copy_tried=True)
            if isinstance(step, Reexecute):
                self._reexecute(oid, cid, step)
                continue
            assert isinstance(step, Lost)
            self.stats["lost"] += 1
            node.objects.drop_copy(entry)
            entry.status = ERROR
            entry.data = serialization.error_blob(
                ObjectLostError(
                    f"object {oid.hex()} ({cid}) is lost: no node holds a copy and it cannot "
                    f"be re-executed: {step.why}",
                    object_id=oid.hex(),
                    cid=cid,
                    reason=step.why,
                )
            )
            return entry

    async def _fetch_copy(self, step: FetchCopy) -> bool:
        remote = self.node.remote
        exchange = remote.exchange if remote is not None else None
        if remote is None or exchange is None:
            return False
        try:
            # from the holder while it lives (it has the copy); then any other copy
            if step.holder is None or not await remote.objects.fetch_while_alive(
                step.cid, step.holder, step.holder_timeout
            ):
                # it may be far away and slow: the search ends when nothing arrives for
                # step.timeout, not while a copy is coming
                await exchange.fetch(step.cid, timeout=FETCH_DEADLINE, stall_timeout=step.timeout)
        except Exception as exc:  # no provider answered in time: the object is lost
            log.info("no copy of %s found (%r)", step.cid, exc)
            return False
        self.stats["fetched_replicas"] += 1
        return True

    def _adopt(self, entry: ObjectEntry, cid: str) -> None:
        """A copy is in the local store now: count it as this node's, free the holder's pin."""
        node = self.node
        if entry.holder is not None:
            holder, entry.holder = entry.holder, None
            node.objects.pin(cid)
            if node.remote is not None:
                node.remote.caller.unpin_at(holder, [cid])

    def _reexecute(self, oid: bytes, cid: str, step: Reexecute) -> None:
        """Submit the producing task again (its returns pending again meanwhile)."""
        node = self.node
        self.stats["reexecuted"] += 1
        tid = step.tid
        rec = TaskRecord.for_task(step.msg)
        rec.retries_left = step.retries_left
        rec.client = node.local_client()
        log.info(
            "object %s (%s) is lost: re-executing task %s (%s)", oid.hex(), cid, rec.name, tid.hex()
        )
        entries = node.objects.entries
        for i in range(rec.nret):
            ret = object_id(tid, i)
            entry = entries.get(ret)
            if entry is None:  # released meanwhile: the new value is dropped once sealed
                entry = entries[ret] = ObjectEntry()
                entry.released = True
                continue
            if entry.status == PENDING:
                continue
            node.objects.drop_copy(entry)
            entry.status = PENDING
            entry.data = None
        node.tasks.records[tid] = rec
        self._hold_args(rec)
        node.tasks.resolve_args(rec, node.tasks.args_ready)

    def _hold_args(self, rec: TaskRecord) -> None:
        """A re-run holds the refs its arguments carry until it ends, as a submission does.
        An owned one every holder released is re-created first, from the lineage that this
        task's lineage kept (its own re-run does the same for its arguments)."""
        node = self.node
        refs = refcount.task_arg_refs(rec.msg)
        if not refs:
            return
        for oid, owner in refs:
            if owner and owner != node.node_id:
                continue
            entry = node.objects.entries.get(oid)
            if entry is None:
                self._revive(oid)
            elif entry.released and oid not in node.refs.counts:
                # its producer is running again and nothing holds it: this re-run will
                entry.released = False
                node.refs.counts[oid] = 0
                self.core.revived(oid)
        node.refs.pin_task(rec.tid, refs)

    def _revive(self, oid: bytes) -> None:
        """An owned object every holder released: a pending entry, sealed by a re-run of its
        task (or with `ObjectLostError` when it has no lineage), held by nothing until the
        caller pins it."""
        node = self.node
        node.objects.entries[oid] = ObjectEntry()
        node.refs.counts[oid] = 0
        if task_of(oid) in node.tasks.records:
            return  # its task is running (another return of it was lost): that run seals it
        step = self.core.reexecute(oid)
        if isinstance(step, Reexecute):
            self._reexecute(oid, "released", step)
            self.stats["revived"] += 1
            self.core.revived(oid)
            return
        self.stats["lost"] += 1
        node.objects.seal(
            oid,
            ERROR,
            serialization.error_blob(
                ObjectLostError(
                    f"object {oid.hex()} was released by every holder and cannot be re-executed "
                    f"for a task that needs it again: {step.why}",
                    object_id=oid.hex(),
                    reason=step.why,
                )
            ),
        )
