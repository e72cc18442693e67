"""Where a task runs: this node, an admitted peer, or nowhere yet (waiting for capacity).

The scheduler's PlacementPolicy decides over the ClusterSnapshot of admitted peers' views
(membership.py); a node-affinity strategy names its node. Work no admitted node can take waits
for the DHT's capacity ads to name one (capacity.py, DEFERRED) unless the affinity is hard.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from latticaray.runtime.errors import TaskUnschedulableError
from latticaray.runtime.local.records import TaskRecord
from latticaray.scheduler.policy import DecisionKind, PlacementPolicy, PlacementRequest

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime


class Placer:
    """Placement decisions of one node over its peers."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node_id = remote.node_id
        self.policy = PlacementPolicy()

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
        target = self.place(rec.tid.hex(), rec.demand, strategy, rec.excluded)
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

    def place(
        self, request_id: str, demand: dict, strategy: Any, excluded: set[str] | None = None
    ) -> str | TaskUnschedulableError | None:
        """A node for the demand (this one or a peer), None (run here: nothing better), or
        the TaskUnschedulableError no node can take it with."""
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
        )
        decision = self.policy.place(membership.snapshot, request, time.monotonic())
        if decision.kind is DecisionKind.PLACE:
            return decision.node_id
        if decision.kind is DecisionKind.INFEASIBLE:
            return TaskUnschedulableError(request_id, decision.reason)
        return None
