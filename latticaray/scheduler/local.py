"""Node-side admission: re-check a placement against the local ledger, run, queue or reject.

A submitter's view is stale, so the node it chose decides for itself (sans-I/O, ``now`` passed
in). :meth:`LocalScheduler.offer` answers one of:

* ``STARTED`` — the resources were acquired; the runtime hands the task to a worker;
* ``QUEUED`` — it fits the node's total but not what is free now, and the bounded queue has room;
  it starts later, in an order fair between submitters (round-robin over per-submitter FIFOs);
* ``REJECTED`` — the queue is full (``infeasible=False``) or the node can never run it
  (``infeasible=True``: labels or totals). The reply carries a fresh :class:`NodeView` as a hint
  so the submitter corrects its snapshot before it spills the request over to another node.

When a task finishes (:meth:`finish`) or its worker dies (:meth:`reclaim_owner`) its resources
return to the ledger and queued requests that now fit are started.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from .errors import QueueFull
from .policy import NodeView, PlacementRequest, labels_match
from .resources import Allocation, ResourceLedger

__all__ = ["AdmissionKind", "FairQueue", "LocalScheduler", "QueueAdmission"]

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Bounded per-submitter FIFOs served round-robin.

    ``limit`` bounds the total; ``per_submitter_limit`` stops one submitter from filling it.
    """

    def __init__(self, limit: int, per_submitter_limit: int | None = None) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.per_submitter_limit = per_submitter_limit
        self._queues: OrderedDict[str, deque[tuple[str, T]]] = OrderedDict()
        self._keys: set[str] = set()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def submitters(self) -> list[str]:
        return list(self._queues)

    def has_room(self, submitter: str) -> bool:
        if self._size >= self.limit:
            return False
        if self.per_submitter_limit is not None:
            return len(self._queues.get(submitter, ())) < self.per_submitter_limit
        return True

    def push(self, submitter: str, key: str, item: T) -> None:
        if self._size >= self.limit:
            raise QueueFull(f"queue full ({self.limit} waiting)")
        if not self.has_room(submitter):
            raise QueueFull(f"submitter {submitter} already has {self.per_submitter_limit} waiting")
        self._queues.setdefault(submitter, deque()).append((key, item))
        self._keys.add(key)
        self._size += 1

    def remove(self, key: str) -> T | None:
        if key not in self._keys:
            return None
        self._keys.discard(key)
        for submitter, queue in self._queues.items():
            for i, (k, item) in enumerate(queue):
                if k == key:
                    del queue[i]
                    self._size -= 1
                    if not queue:
                        del self._queues[submitter]
                    return item
        return None

    def pop_ready(self, can_run: Callable[[T], bool]) -> T | None:
        """Pop the head of the first submitter (in round-robin order) whose head can run."""
        for submitter, queue in self._queues.items():
            key, item = queue[0]
            if can_run(item):
                queue.popleft()
                self._keys.discard(key)
                self._size -= 1
                del self._queues[submitter]
                if queue:
                    self._queues[submitter] = queue  # to the back of the rotation
                return item
        return None


class AdmissionKind(Enum):
    STARTED = "started"
    QUEUED = "queued"
    REJECTED = "rejected"


@dataclass(frozen=True)
class QueueAdmission:
    kind: AdmissionKind
    task_id: str
    node_id: str
    reason: str = ""
    allocation: Allocation | None = None
    #: On REJECTED: the node's current state, to correct the submitter's snapshot.
    hint: NodeView | None = None
    #: On REJECTED: the node can never run this request (not merely busy).
    infeasible: bool = False


class LocalScheduler:
    """One node's admission control and fair local queue over a :class:`ResourceLedger`."""

    def __init__(
        self,
        node_id: str,
        ledger: ResourceLedger,
        *,
        labels: Mapping[str, str] | None = None,
        queue_limit: int | None = None,
        per_submitter_limit: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.ledger = ledger
        self.labels = dict(labels or {})
        if queue_limit is None:
            # One waiting request per CPU keeps workers busy between placements; deeper queues
            # only let stale-ad herding pile work on a few nodes (the backlog waits at submitters).
            queue_limit = max(1, int(ledger.total.get("CPU", 1)))
        self.queue: FairQueue[PlacementRequest] = FairQueue(queue_limit, per_submitter_limit)
        self._running: dict[str, PlacementRequest] = {}
        #: Bumped on every change of load or capacity (the advertiser refreshes on change).
        self.version = 0
        self.accepting = True

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def view(self, now: float) -> NodeView:
        return NodeView(
            self.node_id,
            self.ledger.total,
            self.ledger.available,
            dict(self.labels),
            queued=self.queued,
            running=self.running,
            ad_time=now,
            queue_limit=self.queue.limit,
            alive=self.accepting,
        )

    def offer(self, request: PlacementRequest, now: float) -> QueueAdmission:
        """Admit, queue or reject ``request`` (which a submitter placed here)."""
        if request.task_id in self._running or request.task_id in self.queue:
            return QueueAdmission(
                AdmissionKind.REJECTED,
                request.task_id,
                self.node_id,
                reason="duplicate task id",
                hint=self.view(now),
            )
        if not labels_match(self.labels, request.label_selector):
            return self._reject(
                request,
                now,
                f"labels {self.labels} do not match {request.label_selector}",
                infeasible=True,
            )
        if not self.ledger.could_ever_fit(request.resources, normalized=True):
            return self._reject(
                request,
                now,
                f"total capacity {self.ledger.total} cannot hold {request.resources}",
                infeasible=True,
            )
        if not self.accepting:
            return self._reject(request, now, "node is draining", infeasible=True)
        if self.ledger.can_fit(request.resources, normalized=True):
            allocation = self.ledger.acquire(request.task_id, request.resources)
            self._running[request.task_id] = request
            self.version += 1
            return QueueAdmission(
                AdmissionKind.STARTED,
                request.task_id,
                self.node_id,
                reason="resources free",
                allocation=allocation,
            )
        if not self.queue.has_room(request.submitter):
            return self._reject(request, now, f"busy and queue full ({self.queued} waiting)")
        self.queue.push(request.submitter, request.task_id, request)
        self.version += 1
        return QueueAdmission(
            AdmissionKind.QUEUED,
            request.task_id,
            self.node_id,
            reason=f"waiting for {self.ledger.missing(request.resources, normalized=True)}",
        )

    def _reject(
        self, request: PlacementRequest, now: float, reason: str, infeasible: bool = False
    ) -> QueueAdmission:
        return QueueAdmission(
            AdmissionKind.REJECTED,
            request.task_id,
            self.node_id,
            reason=reason,
            hint=self.view(now),
            infeasible=infeasible,
        )

    def finish(self, task_id: str, now: float) -> list[QueueAdmission]:
        """``task_id`` ended: release its resources and start queued requests that now fit."""
        if self._running.pop(task_id, None) is None:
            return []
        self.ledger.release(task_id)
        self.version += 1
        return self._dispatch()

    def cancel(self, task_id: str, now: float) -> list[QueueAdmission]:
        """Drop a queued request, or end a running one; returns requests started as a result."""
        if self.queue.remove(task_id) is not None:
            self.version += 1
            return []
        return self.finish(task_id, now)

    def bind_worker(self, task_id: str, worker_id: str) -> None:
        """Record which worker runs ``task_id`` so :meth:`reclaim_owner` can free it."""
        self.ledger.set_owner(task_id, worker_id)

    def reclaim_owner(self, worker_id: str, now: float) -> tuple[list[str], list[QueueAdmission]]:
        """A worker died: free what it held; returns (tasks it was running, newly started)."""
        freed = self.ledger.release_owner(worker_id)
        for allocation in freed:
            self._running.pop(allocation.allocation_id, None)
        if freed:
            self.version += 1
        return [a.allocation_id for a in freed], self._dispatch()

    def _dispatch(self) -> list[QueueAdmission]:
        started: list[QueueAdmission] = []
        while len(self.queue):
            request = self.queue.pop_ready(
                lambda r: self.ledger.can_fit(r.resources, normalized=True)
            )
            if request is None:
                break
            allocation = self.ledger.acquire(request.task_id, request.resources)
            self._running[request.task_id] = request
            started.append(
                QueueAdmission(
                    AdmissionKind.STARTED,
                    request.task_id,
                    self.node_id,
                    reason="dequeued",
                    allocation=allocation,
                )
            )
        if started:
            self.version += 1
        return started
