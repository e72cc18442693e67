"""Where a task runs: this node, an admitted peer, or nowhere yet (waiting for room or capacity).

The scheduler's PlacementPolicy decides over the ClusterSnapshot of admitted peers' views
(membership.py), preferring the nodes that hold a task's store-held arguments; a node-affinity
strategy names its node (one this node never met is met first, capacity.py). Work no admitted
node could ever take waits for the DHT's capacity ads to name one (capacity.py, DEFERRED) unless
the affinity is hard.

Nodes admit work through their LocalScheduler (scheduler/local.py): each runs what fits, queues
a bounded number of tasks fairly between submitters, and rejects a peer's task when it is busy
and its queue has no room for that peer, answering with its fresh view (`rejected`). A rejected
task is placed again over the corrected snapshot (spillback, at most MAX_SPILLS times before it
is sent bound to its node). When every known node is busy with a full queue (this one
included), a task waits here in the submitter-side backlog (`waiting`): FIFOs per (owner, demand
and strategy), served round-robin as room appears (a peer's view, a peer's `done`, a task of this
node ending), so one owner's tasks do not wait behind another's, nor CPU tasks behind a GPU task
no node has room for.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.errors import TaskCancelledError, TaskUnschedulableError
from latticaray.runtime.local.records import TaskRecord
from latticaray.runtime.local.tasks import submitter_of
from latticaray.runtime.remote.capacity import DEFERRED
from latticaray.runtime.remote.wire import TaskRejected
from latticaray.runtime.states import TaskEvent
from latticaray.scheduler.policy import (
    DecisionKind,
    NodeView,
    ObjectInfo,
    PlacementPolicy,
    PlacementRequest,
)

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime

#: store-held arguments of one task whose holders the policy looks at
MAX_ARGS_LOOKED_AT = 64
#: times one task may be rejected by busy peers and placed again before it is sent bound to
#: the node placement chose (which then queues it past its bound)
MAX_SPILLS = 4
#: waiting tasks placed again per event loop turn (each costs a placement decision)
MAX_DRAIN = 256


class _Waiting:
    def __repr__(self) -> str:
        return "WAITING"


#: what :meth:`Placer.place` returns (``may_wait=True``) when every candidate is busy and full
WAITING = _Waiting()


class Placer:
    """Placement decisions of one node over its peers."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node_id = remote.node_id
        self.policy = PlacementPolicy()
        #: tasks no known node had room for: the submitter-side backlog (see the module), a FIFO
        #: per (owner, demand and strategy) in round-robin order
        self.waiting: collections.OrderedDict[str, collections.deque[TaskRecord]] = (
            collections.OrderedDict()
        )
        self._drain_due = False
        self._draining = False
        self._parked: TaskRecord | None = None

    def task_ended(self, rec: TaskRecord, node_id: str) -> None:
        """A task placed on ``node_id`` ended there: the policy stops counting it against the
        node (its anti-herding memory would otherwise hold it until a later view covers it, and
        steer the next task away from an idle holder of its argument), and the node's view is
        taken to have one task fewer (the next view or rejection hint corrects it)."""
        self.policy.forget(rec.tid.hex(), node_id)
        snapshot = self.remote.membership.snapshot
        view = snapshot.nodes.get(node_id)
        if view is not None and (view.queued or view.running):
            if view.queued:
                view = dataclasses.replace(view, queued=view.queued - 1)
            else:
                available = dict(view.available)
                for name, amount in rec.demand.items():
                    available[name] = min(
                        view.total.get(name, 0.0), available.get(name, 0.0) + amount
                    )
                view = dataclasses.replace(view, running=view.running - 1, available=available)
            snapshot.update_node(view)
        self.capacity_changed()

    # ------------------------------------------------------------------ spillback
    def may_spill(self, rec: TaskRecord) -> bool:
        """Whether the node a task is sent to may reject it (its placement was free, not bound
        to that node by a placement group or a hard affinity, and it has spills left)."""
        opts = rec.msg["opts"]
        strategy = opts.get("strategy")
        if opts.get("pg") or (isinstance(strategy, dict) and not strategy.get("soft")):
            return False
        return rec.spills < MAX_SPILLS

    def rejected(self, rec: TaskRecord, node_id: str, hint: TaskRejected) -> None:
        """``node_id`` was busy with a full queue: its fresh view corrects the snapshot and the
        task is placed again (elsewhere, or here, or it waits for room)."""
        remote = self.remote
        remote.stats["tasks_spilled"] += 1
        rec.spills += 1
        self.policy.forget(rec.tid.hex(), node_id)
        membership = remote.membership
        if node_id in membership.snapshot.nodes:
            membership.snapshot.update_node(
                NodeView(
                    node_id,
                    dict(hint.total),
                    dict(hint.avail),
                    queued=hint.queued,
                    running=hint.running,
                    ad_time=time.monotonic(),
                    queue_limit=hint.qlimit,
                )
            )
        tasks = remote.node.tasks
        if rec.cancelled:
            tasks.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            return
        rec.move(TaskEvent.SPILL)
        tasks.schedule(rec)

    # ------------------------------------------------------------------ waiting for room
    def capacity_changed(self) -> None:
        """Room may have appeared somewhere (a view, a task ended): waiting tasks are placed
        again, soon (not from inside the caller's own dispatch)."""
        if self.waiting and not self._drain_due and not self.remote.stopped:
            loop = self.remote.node.loop
            if loop is not None:
                self._drain_due = True
                loop.call_soon(self._drain)

    @staticmethod
    def waiting_key(rec: TaskRecord) -> str:
        """The backlog FIFO a task waits in: its owner's, for its demand and strategy."""
        strategy = rec.msg["opts"].get("strategy")
        return f"{submitter_of(rec.client)}|{sorted(rec.demand.items())}|{strategy}"

    def _drain(self) -> None:
        """Place waiting tasks again: the head of each FIFO in turn, until every FIFO's head
        still finds no room (or MAX_DRAIN decisions were made: the rest in the next turn)."""
        self._drain_due = False
        waiting = self.waiting
        tasks = self.remote.node.tasks
        tries = 0
        blocked: set[str] = set()
        while waiting and tries < MAX_DRAIN:
            progressed = False
            for key in list(waiting):
                if key in blocked or key not in waiting:
                    continue
                queue = waiting[key]
                rec = queue.popleft()
                if not queue:
                    del waiting[key]
                if rec.done:
                    progressed = True
                    continue
                tries += 1
                self._parked = None
                self._draining = True
                try:
                    tasks.place_again(rec)
                finally:
                    self._draining = False
                if self._parked is rec:  # still no room: back to the head of its FIFO
                    queue = waiting[key]
                    queue.pop()
                    queue.appendleft(rec)
                    blocked.add(key)
                else:
                    progressed = True
                if key in waiting:
                    waiting.move_to_end(key)  # round-robin
                if tries >= MAX_DRAIN:
                    break
            if not progressed:
                return
        if waiting:
            self.capacity_changed()  # more than one turn's worth: go on in the next turn

    def place_task(self, rec: TaskRecord) -> Any:
        """A peer's id, None (run here), DEFERRED (waits for DHT capacity ads) or the
        TaskUnschedulableError to fail the task with."""
        remote = self.remote
        tasks = remote.node.tasks
        capacity = remote.capacity
        if capacity is not None:
            capacity.note_demand(rec.demand)
        if not remote.membership.alive_peers() and (
            capacity is None or remote.node.ledger.could_ever_fit(rec.demand)
        ):
            return None
        strategy = rec.msg["opts"].get("strategy")
        hard_affinity = isinstance(strategy, dict) and not strategy.get("soft")
        if isinstance(strategy, dict) and not hard_affinity and rec.spills:
            strategy = None  # its soft-affinity node rejected it: placed as any other task
        key = self.waiting_key(rec) if self.waiting and not hard_affinity else None
        if key is not None and not self._draining and key in self.waiting:
            target: Any = WAITING  # behind its owner's tasks like it that wait already
        else:
            target = self.place(
                rec.tid.hex(), rec.demand, strategy, rec.excluded, self.arguments(rec), True
            )
        if target is WAITING:
            self.waiting.setdefault(key or self.waiting_key(rec), collections.deque()).append(rec)
            self._parked = rec
            if not self._draining:  # (one placed again and still waiting is not counted twice)
                self.remote.stats["tasks_waited"] += 1
            return DEFERRED  # placed again on the next sign of room (capacity_changed)
        if (
            isinstance(target, TaskUnschedulableError)
            and capacity is not None
            and hard_affinity
            and strategy["affinity"] != self.node_id
            and not (rec.excluded and strategy["affinity"] in rec.excluded)
            and not remote.membership.is_alive(strategy["affinity"])
        ):
            # a member this node never met (sparse peering): meet it, then place again
            return capacity.meet(
                strategy["affinity"],
                retry=lambda: tasks.resume(rec),
                fail=lambda exc: tasks.fail_unless_done(
                    rec, TaskUnschedulableError(rec.tid.hex(), str(exc))
                ),
            )
        if (
            isinstance(target, TaskUnschedulableError)
            and capacity is not None
            and not hard_affinity
        ):
            return capacity.defer(
                rec.tid.hex(),
                rec.demand,
                target.reason,
                retry=lambda: tasks.place_again(rec),
                fail=lambda exc: tasks.fail(rec, exc),
                settled=lambda: rec.done,
            )
        return target

    def arguments(self, rec: TaskRecord) -> dict[str, ObjectInfo]:
        """Where the task's store-held arguments are (their CIDs: this node when its store has
        them, the node that made them when it holds the only copy), so the policy prefers those
        nodes. Their size is taken as the store threshold, a lower bound (an object is in a
        store only from that size up; its holder knows the rest)."""
        args = rec.msg["args"]
        if args[0] == "b":
            return {}
        node = self.remote.node
        entries = node.objects.entries
        out: dict[str, ObjectInfo] = {}
        for item in list(args[1]) + list(args[2].values()):
            if not (item[0] == 0 and len(item) > 2 and serialization.is_store_ref(item[1])):
                continue
            cid = serialization.store_name(item[1])
            holders = set()
            entry = entries.get(item[2])
            if entry is not None and entry.holder:
                holders.add(entry.holder)
            try:
                if node.store is not None and node.store.contains(cid):
                    holders.add(self.node_id)
            except Exception:  # not a name this store knows
                pass
            if holders and len(out) < MAX_ARGS_LOOKED_AT:
                out[cid] = ObjectInfo(serialization.STORE_THRESHOLD, frozenset(holders))
        return out

    def place(
        self,
        request_id: str,
        demand: dict,
        strategy: Any,
        excluded: set[str] | None = None,
        args: dict[str, ObjectInfo] | None = None,
        may_wait: bool = False,
    ) -> Any:
        """A node for the demand (this one or a peer), None (run here: nothing better), or
        the TaskUnschedulableError no node can take it with. ``args``: where its arguments
        are (the policy prefers their holders). ``may_wait``: WAITING rather than None when
        every candidate (this node included) is busy with a full queue."""
        membership = self.remote.membership
        if isinstance(strategy, dict):
            target = strategy["affinity"]
            alive = target == self.node_id or membership.is_alive(target)
            if alive and not (excluded and target in excluded):
                return target
            if not strategy.get("soft"):
                return TaskUnschedulableError(
                    request_id,
                    f"node affinity to {target}, which is not an alive member of the mesh",
                )
            strategy = None
        membership.snapshot.update_node(membership.node_view())
        request = PlacementRequest(
            request_id,
            dict(demand),
            self.node_id,
            strategy="SPREAD" if strategy == "SPREAD" else "DEFAULT",
            excluded=frozenset(excluded or ()),
            args=tuple((cid, info.size) for cid, info in (args or {}).items()),
        )
        objects = membership.snapshot.objects
        if args:
            objects.update(args)  # for this decision only
        try:
            decision = self.policy.place(membership.snapshot, request, time.monotonic())
        finally:
            for cid in args or ():
                objects.pop(cid, None)
        if decision.kind is DecisionKind.PLACE:
            return decision.node_id
        if decision.kind is DecisionKind.INFEASIBLE:
            return TaskUnschedulableError(request_id, decision.reason)
        return WAITING if may_wait else None
