"""Lineage of owned task returns, and recovery of owned objects whose every copy is gone.

The owner node of a task's returns keeps the task's specification (function hash, arguments as
submitted, options, the retries it has left) while any of those returns is still referenced, or
while the lineage of a task whose arguments name one of them (top level or nested) is kept,
within a byte budget (`LATTICARAY_MAX_LINEAGE_BYTES`, oldest evicted first). A store-resident
object can go missing: the node that ran the task holds the only copy and died, or a store
evicted the owner's copy. `Recovery.ensure_local` makes an owned object present in this node's
store again, in this order:

1. the local store already has it (nothing to do);
2. another copy: the object exchange asks the last known holder, connected peers and the DHT's
   providers of the CID (a node that fetched the object as an argument holds a replica);
3. re-execution: the producing task is submitted again from its lineage (its lost arguments are
   recovered the same way first, recursively, when the new run resolves them; an owned argument
   every holder released is re-created from its kept lineage, and the re-run holds it until it
   ends). It spends the task's retry budget, shared with failure retries; `max_retries=0`
   forbids it.

Objects made by `put`, actor-call returns and tasks without lineage (released, evicted from the
budget) cannot be re-executed: the getter receives `ObjectLostError` naming the object, its CID
and why.

A borrowed object (owned by another node) is recovered by its owner: a borrower asks the owner
for it by object id (`/latticaray/object/1`), and the owner's handler runs `ensure_local` before
it answers. So the lineage here names borrowed arguments only by reference; a re-run resolves
them from their owners like any submission does.
"""

from __future__ import annotations

import collections
import logging
import os

from latticaray.runtime import refcount, serialization
from latticaray.runtime.errors import ObjectLostError
from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.protocol import ERROR, OK

log = logging.getLogger(__name__)

PENDING = -1
DEFAULT_MAX_LINEAGE_BYTES = 64 << 20
SPEC_OVERHEAD = 256  # bytes counted per task beside its inline arguments
REPLICA_FETCH_TIMEOUT = 5.0  # how long to look for another copy before re-executing
HOLDER_FETCH_TIMEOUT = 30.0  # the same, while the node that made it is alive (it has it)
EVICTED_MEMORY = 4096  # how many evicted task ids are remembered (for the error's reason)


def _copy_args(args: list) -> list:
    """Arguments as submitted: argument resolution rewrites the task's own list in place."""
    if args[0] == "b":
        return list(args)
    return ["l", [list(item) for item in args[1]], {k: list(v) for k, v in args[2].items()}]


def _args_size(args: list) -> int:
    if args[0] == "b":
        return len(args[1])
    items = list(args[1]) + list(args[2].values())
    return sum(len(item[1]) if item[0] == 0 and item[1] is not None else 32 for item in items)


class TaskSpec:
    """What re-running one task needs: its submission message and the retries it has left."""

    __slots__ = ("deps", "executions", "kept", "live", "msg", "retries_left", "size", "tid")

    def __init__(self, tid: bytes, msg: dict, retries_left: int, nret: int):
        self.tid = tid
        self.msg = msg
        self.retries_left = retries_left
        # returns still referenced: a bool for the common one-return task, else a set
        self.live: bool | set = True if nret == 1 else {object_id(tid, i) for i in range(nret)}
        args = msg["args"]
        self.size = SPEC_OVERHEAD + (len(args[1]) if args[0] == "b" else _args_size(args))
        self.executions = 1
        self.deps: tuple = ()  # tasks in the table whose returns the arguments name
        self.kept = 0  # specs in the table whose deps name this one


class LineageTable:
    """Task specs of owned returns while they are referenced, within a byte budget."""

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            max_bytes = int(
                os.environ.get("LATTICARAY_MAX_LINEAGE_BYTES", DEFAULT_MAX_LINEAGE_BYTES)
            )
        self.max_bytes = max_bytes
        self.bytes = 0
        self.specs: dict[bytes, TaskSpec] = {}  # in submission order: oldest evicted first
        self.no_lineage: dict[bytes, list] = {}  # owned task -> [why it has none, live returns]
        self.evicted: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def record(self, tid: bytes, message: dict, retries_left: int, nret: int) -> None:
        if nret < 1:
            return
        if retries_left == 0:
            self.no_lineage[tid] = ["its task has max_retries=0", nret]
            return
        deps = self._deps_of(tid, message)
        if message["args"][0] != "b":  # resolution rewrites "l" arguments in place
            message = dict(message, args=_copy_args(message["args"]))
        spec = TaskSpec(tid, message, retries_left, nret)
        if deps:
            spec.deps = deps
            for dep in deps:
                self.specs[dep].kept += 1
        self.specs[tid] = spec
        self.bytes += spec.size
        while self.bytes > self.max_bytes and self.specs:
            old_tid = next(iter(self.specs))
            self._drop(old_tid)
            self.evicted[old_tid] = None
            if len(self.evicted) > EVICTED_MEMORY:
                self.evicted.popitem(last=False)

    def _deps_of(self, tid: bytes, message: dict) -> tuple:
        """Owned tasks in the table whose returns the arguments name (a task id in the table
        is one this node owns)."""
        if "inner" not in message and message["args"][0] != "l":
            return ()
        deps = {task_of(oid) for oid, _owner in refcount.task_arg_refs(message)}
        deps.discard(tid)
        return tuple(dep for dep in deps if dep in self.specs)

    def record_actor_call(self, tid: bytes, nret: int) -> None:
        if nret >= 1:
            self.no_lineage[tid] = [
                "it is the return of an actor call (actor outputs are not re-executed)",
                nret,
            ]

    def completed(self, tid: bytes, retries_left: int, failed: bool) -> None:
        spec = self.specs.get(tid)
        if spec is None:
            return
        if failed:  # an error value is held by the owner itself: nothing to re-create
            self._drop(tid)
            return
        spec.retries_left = retries_left

    def released(self, oid: bytes) -> None:
        tid = task_of(oid)
        spec = self.specs.get(tid)
        if spec is None:
            known = self.no_lineage.get(tid)
            if known is not None:
                known[1] -= 1
                if known[1] <= 0:
                    del self.no_lineage[tid]
            return
        if spec.live is True:
            spec.live = False
        elif spec.live:
            spec.live.discard(oid)
        if not spec.live and not spec.kept:
            self._drop(tid)

    def revived(self, oid: bytes) -> None:
        """A released return is being re-created (an argument of a re-run): referenced again."""
        spec = self.specs.get(task_of(oid))
        if spec is None:
            return
        if isinstance(spec.live, set):
            spec.live.add(oid)
        else:
            spec.live = True

    def _drop(self, tid: bytes) -> None:
        """Forget a spec, and the specs only it kept (iteratively: chains may be long)."""
        todo = [tid]
        while todo:
            spec = self.specs.pop(todo.pop(), None)
            if spec is None:
                continue
            self.bytes -= spec.size
            for dep in spec.deps:
                kept = self.specs.get(dep)
                if kept is None:  # evicted or failed meanwhile
                    continue
                kept.kept -= 1
                if not kept.kept and not kept.live:
                    todo.append(dep)

    def why_not(self, tid: bytes) -> str:
        known = self.no_lineage.get(tid)
        if known is not None:
            return known[0]
        if tid in self.evicted:
            return (
                f"its lineage was evicted (lineage budget {self.max_bytes} bytes, "
                f"LATTICARAY_MAX_LINEAGE_BYTES)"
            )
        return (
            "it was created by put() or yielded by a streaming task (only returns of "
            "normal tasks can be re-executed)"
        )


class Recovery:
    """Makes owned store objects present again: local store, other copies, then lineage."""

    def __init__(self, node, table: LineageTable | None = None):
        self.node = node
        self.table = table or LineageTable()
        self.stats = collections.Counter()

    # ---- hooks the node calls
    def on_submit(self, rec, client) -> None:
        if getattr(client, "kind", None) == "remote":
            return  # this node executes for another owner: the owner keeps the lineage
        self.table.record(rec.tid, rec.msg, rec.retries_left, rec.nret)

    def on_complete(self, rec, failed: bool) -> None:
        self.table.completed(rec.tid, rec.retries_left, failed)

    def on_release(self, oid: bytes) -> None:
        self.table.released(oid)

    def is_missing(self, entry) -> bool:
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

    def is_lost(self, entry) -> bool:
        """Missing here, and no known live holder: recover it before a task may use it.
        (A result still held by a live executor is passed on by reference instead.)"""
        if not self.is_missing(entry):
            return False
        holder = entry.holder
        if holder is None:
            return True
        cluster = self.node.cluster
        state = cluster.peers.get(holder) if cluster is not None else None
        return state is None or not state.alive

    def fetch_args_first(self, rec) -> bool:
        """Before a task runs on this node: store arguments held only elsewhere come here
        (recovered if lost). True when that is under way; the task is queued afterwards."""
        args = rec.msg["args"]
        if args[0] == "b":
            return False
        objects = self.node.objects
        todo = []
        for item in list(args[1]) + list(args[2].values()):
            if item[0] == 0 and len(item) > 2 and serialization.is_store_ref(item[1]):
                entry = objects.get(item[2])
                if entry is not None and self.is_missing(entry):
                    todo.append((item, entry))
        if not todo:
            return False
        self.node.loop.create_task(self._fetch_args(rec, todo))
        return True

    async def _fetch_args(self, rec, todo: list) -> None:
        node = self.node
        for item, entry in todo:
            try:
                entry = await self.ensure_local(item[2], entry)
            except Exception as exc:  # a bug must not leave the task waiting forever
                node._fail(
                    rec, ObjectLostError(f"recovering argument {item[2].hex()} failed: {exc!r}")
                )
                return
            if entry.status != OK:
                node._fail_with_blob(rec, entry.data)
                return
            item[1] = entry.data  # a re-executed task may have made a new value (new CID)
            cid = serialization.store_name(entry.data)
            node.store_refs[cid] += 1  # as argument resolution pins: held until the task ends
            if rec.pins is None:
                rec.pins = []
            rec.pins.append(cid)
        if not rec.done:
            node.ready_queue.append(rec)
            node._dispatch()

    # ---- recovery
    async def ensure_local(self, oid: bytes, entry):
        """Wait for `entry` (owned, in the node's table) and make its value readable here.

        Returns the entry: OK with a local store copy, or ERROR (the task's error, or
        ObjectLostError when no copy exists and it cannot be re-executed).
        """
        node = self.node
        while True:
            await entry.sealed()
            if not self.is_missing(entry):
                return entry
            cid = serialization.store_cid(entry.data)
            fetched = await self._fetch_copy(cid, entry.holder)
            if node.objects.get(oid) is not entry:
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
            if not unchanged or task_of(oid) in node.tasks:
                continue  # another getter re-executed it meanwhile: wait for that run
            why = self._reexecute(oid, cid)
            if why is not None:
                self.stats["lost"] += 1
                self._drop_copy(entry)
                entry.status = ERROR
                entry.data = serialization.dumps_code(
                    ObjectLostError(
                        f"object {oid.hex()} ({cid}) is lost: no node holds a copy and it cannot "
                        f"be re-executed: {why}",
                        object_id=oid.hex(),
                        cid=cid,
                        reason=why,
                    )
                )
                return entry

    async def _fetch_copy(self, cid: str, holder: str | None) -> bool:
        cluster = self.node.cluster
        exchange = getattr(cluster, "exchange", None)
        if exchange is None:
            return False
        try:
            # from the holder while it lives (it has the copy); then any other copy
            if holder is None or not await cluster.fetch_while_alive(
                cid, holder, HOLDER_FETCH_TIMEOUT
            ):
                await exchange.fetch(cid, timeout=REPLICA_FETCH_TIMEOUT)
        except Exception as exc:  # no provider answered in time: the object is lost
            log.info("no copy of %s found (%r)", cid, exc)
            return False
        self.stats["fetched_replicas"] += 1
        return True

    def _adopt(self, entry, cid: str) -> None:
        """A copy is in the local store now: count it as this node's, free the holder's pin."""
        node = self.node
        if entry.holder is not None:
            holder, entry.holder = entry.holder, None
            node.store_refs[cid] += 1
            if node.cluster is not None:
                node.cluster.unpin_at(holder, [cid])

    def _drop_copy(self, entry) -> None:
        """The entry stops referring to its store copy (lost, or about to be re-created)."""
        node = self.node
        data = entry.data
        if not serialization.is_store_ref(data):
            return
        cid = serialization.store_name(data)
        if entry.holder is not None:
            holder, entry.holder = entry.holder, None
            if node.cluster is not None:
                node.cluster.unpin_at(holder, [cid])
        elif node.store_refs.get(cid, 0) > 0:
            node._unpin(cid)
        if entry.cid is not None:
            node.cid_index.pop(entry.cid, None)
            entry.cid = None

    def _reexecute(self, oid: bytes, cid: str) -> str | None:
        """Submit the producing task again; None when it was, else why it cannot be."""
        from latticaray.runtime.node import ObjectEntry, TaskRecord  # node imports this module

        node = self.node
        tid = task_of(oid)
        spec = self.table.specs.get(tid)
        if spec is None:
            return self.table.why_not(tid)
        if spec.retries_left == 0:
            return (
                f"its task has no retries left (max_retries spent on "
                f"{spec.executions - 1} re-executions and failure retries)"
            )
        if spec.retries_left > 0:
            spec.retries_left -= 1
        spec.executions += 1
        self.stats["reexecuted"] += 1
        msg = {k: v for k, v in spec.msg.items() if k not in ("blob", "parent")}
        msg["args"] = _copy_args(spec.msg["args"])
        opts = msg["opts"]
        nret = msg["nret"]
        rec = TaskRecord(
            tid,
            msg,
            nret,
            spec.retries_left,
            opts.get("retry_exc"),
            opts.get("res") or {"CPU": 1.0},
            msg.get("name", "task"),
        )
        rec.client = node.local_client()
        log.info(
            "object %s (%s) is lost: re-executing task %s (%s)", oid.hex(), cid, rec.name, tid.hex()
        )
        for i in range(nret):
            ret = object_id(tid, i)
            entry = node.objects.get(ret)
            if entry is None:  # released meanwhile: the new value is dropped once sealed
                entry = node.objects[ret] = ObjectEntry()
                entry.released = True
                continue
            if entry.status == PENDING:
                continue
            self._drop_copy(entry)
            entry.status = PENDING
            entry.data = None
        node.tasks[tid] = rec
        self._hold_args(rec)
        node._resolve_args(rec, node._schedule)
        return None

    def _hold_args(self, rec) -> None:
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
            entry = node.objects.get(oid)
            if entry is None:
                self._revive(oid)
            elif entry.released and oid not in node.refs.counts:
                # its producer is running again and nothing holds it: this re-run will
                entry.released = False
                node.refs.counts[oid] = 0
                self.table.revived(oid)
        node.refs.pin_task(rec.tid, refs)

    def _revive(self, oid: bytes) -> None:
        """An owned object every holder released: a pending entry, sealed by a re-run of its
        task (or with `ObjectLostError` when it has no lineage), held by nothing until the
        caller pins it."""
        from latticaray.runtime.node import ObjectEntry  # node imports this module

        node = self.node
        node.objects[oid] = ObjectEntry()
        node.refs.counts[oid] = 0
        if task_of(oid) in node.tasks:
            return  # its task is running (another return of it was lost): that run seals it
        why = self._reexecute(oid, "released")
        if why is None:
            self.stats["revived"] += 1
            self.table.revived(oid)
            return
        self.stats["lost"] += 1
        node._seal(
            oid,
            ERROR,
            serialization.dumps_code(
                ObjectLostError(
                    f"object {oid.hex()} was released by every holder and cannot be re-executed for "
                    f"a task that needs it again: {why}",
                    object_id=oid.hex(),
                    reason=why,
                )
            ),
        )
