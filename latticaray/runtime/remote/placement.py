"""Where a task runs: this node, an admitted peer, or nowhere yet (waiting for capacity).

The scheduler's PlacementPolicy decides over the ClusterSnapshot of admitted peers' views
(membership.py), preferring the nodes that hold a task's store-held arguments; a node-affinity
strategy names its node (one this node never met is met first, capacity.py). Work no admitted
node can take waits for the DHT's capacity ads to name one (capacity.py, DEFERRED) unless the
affinity is hard.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.errors import TaskUnschedulableError
from latticaray.runtime.local.records import TaskRecord
from latticaray.scheduler.policy import (
    DecisionKind,
    ObjectInfo,
    PlacementPolicy,
    PlacementRequest,
)

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime

#: store-held arguments of one task whose holders the policy looks at
MAX_ARGS_LOOKED_AT = 64


class Placer:
    """Placement decisions of one node over its peers."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node_id = remote.node_id
        self.policy = PlacementPolicy()

    def task_ended(self, rec: TaskRecord, node_id: str) -> None:
        """A task placed on ``node_id`` ended there: the policy stops counting it against the
        node (its anti-herding memory would otherwise hold it until a later view covers it, and
        steer the next task away from an idle holder of its argument)."""
        self.policy.forget(rec.tid.hex(), node_id)

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
        target = self.place(rec.tid.hex(), rec.demand, strategy, rec.excluded, self.arguments(rec))
        hard_affinity = isinstance(strategy, dict) and not strategy.get("soft")
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
    ) -> str | TaskUnschedulableError | None:
        """A node for the demand (this one or a peer), None (run here: nothing better), or
        the TaskUnschedulableError no node can take it with. ``args``: where its arguments
        are (the policy prefers their holders)."""
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
        return None
