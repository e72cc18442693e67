"""NodeActivity: what a node's tasks did, counted where it happens, cheaply.

The task table calls it at submission, placement, retry and completion. It keeps the node's
counts (tasks finished and failed here), a bounded ring of recently ended tasks for the state
API, submission times of live tasks (for placement latency), and adds to the process's
Prometheus tallies (latticaray.observe.metrics). Each call is a few dictionary and integer
operations on the node's event loop.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from latticaray.observe import metrics
from latticaray.observe.model import TaskRow

__all__ = ["RECENT_TASKS", "NodeActivity", "task_kind"]

RECENT_TASKS = 1000  # ended tasks kept for `latticaray list tasks`


def task_kind(rec: Any) -> str:
    return "actor_task" if "aid" in rec.msg else "task"


class NodeActivity:
    """Counts and recent history of one node's tasks."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.finished = 0  # tasks that ran here and ended with a result
        self.failed = 0  # ... with an error
        self.recent: collections.deque[TaskRow] = collections.deque(maxlen=RECENT_TASKS)
        self.submitted_at: dict[bytes, float] = {}
        self.started_at: dict[bytes, float] = {}
        self.placed_on: dict[bytes, str] = {}  # live tasks a peer runs for us: its node id
        self._submitted = {k: metrics.TASKS_SUBMITTED.labels(k) for k in ("task", "actor_task")}
        self._finished = {k: metrics.TASKS_FINISHED.labels(k) for k in ("task", "actor_task")}
        self._failed = {k: metrics.TASKS_FAILED.labels(k) for k in ("task", "actor_task")}
        self._retried = {k: metrics.TASKS_RETRIED.labels(k) for k in ("task", "actor_task")}
        self._placed_local = metrics.PLACEMENT_LATENCY.labels("local")
        self._placed_remote = metrics.PLACEMENT_LATENCY.labels("remote")

    def submitted(self, rec: Any, owned: bool) -> None:
        """A task entered the node's table (``owned``: its submitter is a client of this node)."""
        self.submitted_at[rec.tid] = time.time()
        if owned:
            self._submitted[task_kind(rec)].add()

    def placed(self, rec: Any, target: str | None) -> None:
        """Placed on node ``target`` (None: here)."""
        if target is not None:
            self.placed_on[rec.tid] = target
        else:
            self.placed_on.pop(rec.tid, None)
        at = self.submitted_at.get(rec.tid)
        if at is not None:
            timing = self._placed_local if target is None else self._placed_remote
            timing.observe(time.time() - at)

    def started(self, rec: Any) -> None:
        self.started_at[rec.tid] = time.time()

    def retried(self, rec: Any) -> None:
        self._retried[task_kind(rec)].add()

    def recently_ended(self, task_id: str) -> TaskRow | None:
        """The row of a task that ended here lately (hex id), newest first; None if not kept."""
        for row in reversed(self.recent):
            if row.task_id == task_id:
                return row
        return None

    def ended(self, rec: Any, failed: bool, error_type: str | None, owner: str) -> None:
        """A task left the table; counted as run here unless it was placed on a peer."""
        tid = rec.tid
        submitted = self.submitted_at.pop(tid, 0.0)
        started = self.started_at.pop(tid, None)
        ran_on = self.placed_on.pop(tid, None)
        ran_here = ran_on is None
        kind = task_kind(rec)
        if ran_here:
            if failed:
                self.failed += 1
                self._failed[kind].add()
            else:
                self.finished += 1
                self._finished[kind].add()
        self.recent.append(
            TaskRow(
                task_id=tid.hex(),
                name=rec.name,
                state="FAILED" if failed else "FINISHED",
                type="ACTOR_TASK" if kind == "actor_task" else "NORMAL_TASK",
                node_id=ran_on if ran_on is not None else self.node_id,
                owner_node_id=owner,
                submit_time=submitted,
                start_time=started,
                end_time=time.time(),
                error_type=error_type,
            )
        )
