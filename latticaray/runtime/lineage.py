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

This module is sans-I/O: `Recovery` is told what happened (submissions, completions, releases)
and answers what to do about a missing object with an action (`FetchCopy`, `Reexecute`,
`Lost`); the node's `ObjectRecovery` (local/recovery.py) checks the store, fetches and
re-submits.

A borrowed object (owned by another node) is recovered by its owner: a borrower asks the owner
for it by object id (`/latticaray/object/1`), and the owner's handler runs `ensure_local` before
it answers. So the lineage here names borrowed arguments only by reference; a re-run resolves
them from their owners like any submission does.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, TypeAlias

from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.refcount import task_arg_refs

#: A task's submission message (the node <-> worker `submit` map)
Message: TypeAlias = dict[str, Any]

DEFAULT_MAX_LINEAGE_BYTES = 64 << 20
SPEC_OVERHEAD = 256  # bytes counted per task beside its inline arguments
# how long a search for another copy may go without anything of it arriving, before the object
# is re-executed (a copy that is coming, however slowly, is waited for)
REPLICA_FETCH_TIMEOUT = 5.0
HOLDER_FETCH_TIMEOUT = 30.0  # the same, while the node that made it is alive (it has it)
EVICTED_MEMORY = 4096  # how many evicted task ids are remembered (for the error's reason)


def _copy_args(args: list[Any]) -> list[Any]:
    """Arguments as submitted: argument resolution rewrites the task's own list in place."""
    if args[0] == "b":
        return list(args)
    return ["l", [list(item) for item in args[1]], {k: list(v) for k, v in args[2].items()}]


def _args_size(args: list[Any]) -> int:
    if args[0] == "b":
        return len(args[1])
    items = list(args[1]) + list(args[2].values())
    return sum(len(item[1]) if item[0] == 0 and item[1] is not None else 32 for item in items)


@dataclasses.dataclass(slots=True)
class NoLineage:
    """An owned task whose returns cannot be re-executed: why, and how many are referenced."""

    why: str
    live: int


class TaskSpec:
    """What re-running one task needs: its submission message and the retries it has left."""

    __slots__ = ("deps", "executions", "kept", "live", "msg", "retries_left", "size", "tid")

    def __init__(self, tid: bytes, msg: Message, retries_left: int, nret: int):
        self.tid = tid
        self.msg = msg
        self.retries_left = retries_left
        # returns still referenced: a bool for the common one-return task, else a set
        self.live: bool | set[bytes] = (
            True if nret == 1 else {object_id(tid, i) for i in range(nret)}
        )
        args = msg["args"]
        self.size = SPEC_OVERHEAD + (len(args[1]) if args[0] == "b" else _args_size(args))
        self.executions = 1
        self.deps: tuple[bytes, ...] = ()  # tasks in the table whose returns the arguments name
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
        # owned task -> (why it has none, live returns)
        self.no_lineage: dict[bytes, NoLineage] = {}
        self.evicted: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def record(self, tid: bytes, message: Message, retries_left: int, nret: int) -> None:
        if nret < 1:
            return
        if retries_left == 0:
            self.no_lineage[tid] = NoLineage("its task has max_retries=0", nret)
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

    def _deps_of(self, tid: bytes, message: Message) -> tuple[bytes, ...]:
        """Owned tasks in the table whose returns the arguments name (a task id in the table
        is one this node owns)."""
        if "inner" not in message and message["args"][0] != "l":
            return ()
        deps = {task_of(oid) for oid, _owner in task_arg_refs(message)}
        deps.discard(tid)
        return tuple(dep for dep in deps if dep in self.specs)

    def record_actor_call(self, tid: bytes, nret: int) -> None:
        if nret >= 1:
            self.no_lineage[tid] = NoLineage(
                "it is the return of an actor call (actor outputs are not re-executed)", nret
            )

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
                known.live -= 1
                if known.live <= 0:
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
            return known.why
        if tid in self.evicted:
            return (
                f"its lineage was evicted (lineage budget {self.max_bytes} bytes, "
                f"LATTICARAY_MAX_LINEAGE_BYTES)"
            )
        return (
            "it was created by put() or yielded by a streaming task (only returns of "
            "normal tasks can be re-executed)"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FetchCopy:
    """Look for another copy of the object by its CID: from ``holder`` (the node that made it)
    while it lives, else from any provider; each search ends once nothing of the object arrived
    for ``holder_timeout`` / ``timeout`` s."""

    cid: str
    holder: str | None
    holder_timeout: float = HOLDER_FETCH_TIMEOUT
    timeout: float = REPLICA_FETCH_TIMEOUT


@dataclasses.dataclass(frozen=True, slots=True)
class Reexecute:
    """Submit the producing task again: ``msg`` is its submission as first made (arguments as
    submitted), to run with ``retries_left``; ``execution`` counts its runs, this one included."""

    tid: bytes
    msg: Message
    retries_left: int
    execution: int


@dataclasses.dataclass(frozen=True, slots=True)
class Lost:
    """No copy and no way to re-create it: the object is lost, for ``why``."""

    why: str


class Recovery:
    """What to do about an owned store object that is missing here: another copy, then its
    lineage (local store first is the caller's check). Keeps the lineage table."""

    def __init__(self, table: LineageTable | None = None):
        self.table = table or LineageTable()

    # ---- what happened
    def submitted(self, tid: bytes, message: Message, retries_left: int, nret: int) -> None:
        """A task this node owns was submitted (not one it runs for another owner)."""
        self.table.record(tid, message, retries_left, nret)

    def actor_call(self, tid: bytes, nret: int) -> None:
        self.table.record_actor_call(tid, nret)

    def completed(self, tid: bytes, retries_left: int, failed: bool) -> None:
        self.table.completed(tid, retries_left, failed)

    def released(self, oid: bytes) -> None:
        self.table.released(oid)

    def revived(self, oid: bytes) -> None:
        self.table.revived(oid)

    # ---- what to do
    def next_step(
        self, oid: bytes, cid: str, holder: str | None, copy_tried: bool
    ) -> FetchCopy | Reexecute | Lost:
        """The object ``oid`` (store ``cid``) has no copy here: look for another copy first;
        when that found none, re-execute its task if its lineage allows, else it is lost."""
        if not copy_tried:
            return FetchCopy(cid, holder)
        return self.reexecute(oid)

    def reexecute(self, oid: bytes) -> Reexecute | Lost:
        """Re-create ``oid`` from its task's lineage (spending one of its retries)."""
        tid = task_of(oid)
        spec = self.table.specs.get(tid)
        if spec is None:
            return Lost(self.table.why_not(tid))
        if spec.retries_left == 0:
            return Lost(
                f"its task has no retries left (max_retries spent on "
                f"{spec.executions - 1} re-executions and failure retries)"
            )
        if spec.retries_left > 0:
            spec.retries_left -= 1
        spec.executions += 1
        msg = {k: v for k, v in spec.msg.items() if k not in ("blob", "parent")}
        msg["args"] = _copy_args(spec.msg["args"])
        return Reexecute(tid, msg, spec.retries_left, spec.executions)
