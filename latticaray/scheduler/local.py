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
from .placement_groups import BundleReservations
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
        self._keys: dict[str, tuple[str, T]] = {}
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

    def push(self, submitter: str, key: str, item: T, *, bounded: bool = True) -> None:
        """Queue ``item`` behind ``submitter``'s earlier ones. ``bounded=False``: a submitter that
        cannot go elsewhere (the node's own clients) queues past the limits; it still counts
        toward them, so other submitters find the queue full sooner."""
        if bounded and self._size >= self.limit:
            raise QueueFull(f"queue full ({self.limit} waiting)")
        if bounded and not self.has_room(submitter):
            raise QueueFull(f"submitter {submitter} already has {self.per_submitter_limit} waiting")
        self._queues.setdefault(submitter, deque()).append((key, item))
        self._keys[key] = (submitter, item)
        self._size += 1

    def get(self, key: str) -> T | None:
        entry = self._keys.get(key)
        return None if entry is None else entry[1]

    def keys(self) -> list[str]:
        return list(self._keys)

    def remove(self, key: str) -> T | None:
        entry = self._keys.pop(key, None)
        if entry is None:
            return None
        submitter, item = entry
        queue = self._queues[submitter]
        for i, (k, _item) in enumerate(queue):
            if k == key:
                del queue[i]
                break
        self._size -= 1
        if not queue:
            del self._queues[submitter]
        return item

    def pop_ready(self, can_run: Callable[[T], bool]) -> T | None:
        """Pop the head of the first submitter (in round-robin order) whose head can run."""
        for submitter, queue in self._queues.items():
            key, item = queue[0]
            if can_run(item):
                queue.popleft()
                del self._keys[key]
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
    """One node's admission control and fair local queue over a :class:`ResourceLedger`.

    Placement-group bundles the node holds (:class:`BundleReservations`) are ledgers of their
    own: a request naming a bundle starts or queues against that bundle's reservation.
    """

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
        self.bundles = BundleReservations(ledger, node_id)
        #: task id -> (request, the ledger it holds resources in)
        self._running: dict[str, tuple[PlacementRequest, ResourceLedger]] = {}
        #: running tasks whose resources were lent out (their worker blocks on a get)
        self._lent: set[str] = set()
        self._version = 0
        self.accepting = True
        self._view: NodeView | None = None
        self._view_version = -1

    @property
    def version(self) -> int:
        """Bumped on every change of load or capacity (the advertiser refreshes on change)."""
        return self._version + self.bundles.version

    @version.setter
    def version(self, value: int) -> None:
        self._version = value - self.bundles.version

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def is_running(self, task_id: str) -> bool:
        return task_id in self._running

    def view(self, now: float) -> NodeView:
        """This node's view (cached per version; ``ad_time`` is set to ``now``)."""
        version = self.version
        view = self._view
        if view is None or self._view_version != version:
            view = self._view = NodeView(
                self.node_id,
                self.ledger.total,
                self.ledger.available,
                dict(self.labels),
                queued=self.queued,
                running=self.running,
                ad_time=now,
                queue_limit=self.queue.limit,
                alive=self.accepting,
                seq=version + 1,
            )
            self._view_version = version
        else:
            view.ad_time = now
        return view

    def _bundle_ledger(self, request: PlacementRequest) -> tuple[ResourceLedger | None, str]:
        assert request.bundle is not None
        group, index = request.bundle
        if index >= 0:
            ledger = self.bundles.ledger_for(group, index)
            if ledger is None:
                return None, f"bundle {index} of placement group {group} is not held here"
            if not ledger.could_ever_fit(request.resources, normalized=True):
                return None, (
                    f"bundle {index} of placement group {group} holds {ledger.total}, "
                    f"less than {dict(request.resources)}"
                )
            return ledger, ""
        ledgers = [self.bundles.ledger_for(group, i) for i in self.bundles.indexes(group)]
        fitting = [
            lg
            for lg in ledgers
            if lg is not None and lg.could_ever_fit(request.resources, normalized=True)
        ]
        if not fitting:
            return None, f"no bundle of placement group {group} here can hold {request.resources}"
        free = [lg for lg in fitting if lg.can_fit(request.resources, normalized=True)]
        return (free or fitting)[0], ""

    def offer(
        self, request: PlacementRequest, now: float, *, bounded: bool = True
    ) -> QueueAdmission:
        """Admit, queue or reject ``request`` (which a submitter placed here). ``bounded=False``:
        its submitter cannot be sent elsewhere (a client of this node, work bound to this node):
        it queues past the queue's bound instead of being rejected for a full queue (it is still
        rejected when the node can never run it)."""
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
        if request.bundle is not None:
            ledger, why = self._bundle_ledger(request)
            if ledger is None:
                return self._reject(request, now, why, infeasible=True)
        else:
            ledger = self.ledger
            if not ledger.could_ever_fit(request.resources, normalized=True):
                return self._reject(
                    request,
                    now,
                    f"total capacity {self.ledger.total} cannot hold {request.resources}",
                    infeasible=True,
                )
        if not self.accepting:
            return self._reject(request, now, "node is draining", infeasible=True)
        if ledger.can_fit(request.resources, normalized=True):
            allocation = self._start(request, ledger)
            return QueueAdmission(
                AdmissionKind.STARTED,
                request.task_id,
                self.node_id,
                reason="resources free",
                allocation=allocation,
            )
        if bounded and not self.queue.has_room(request.submitter):
            return self._reject(request, now, f"busy and queue full ({self.queued} waiting)")
        self.queue.push(request.submitter, request.task_id, request, bounded=bounded)
        self._version += 1
        return QueueAdmission(
            AdmissionKind.QUEUED,
            request.task_id,
            self.node_id,
            reason=f"waiting for {ledger.missing(request.resources, normalized=True)}",
        )

    def _start(self, request: PlacementRequest, ledger: ResourceLedger) -> Allocation:
        # every caller checked can_fit on this ledger just before (offer, dispatch)
        allocation = ledger.acquire(request.task_id, request.resources, fits=True)
        self._running[request.task_id] = (request, ledger)
        self._version += 1
        return allocation

    def allocation_of(self, task_id: str) -> Allocation | None:
        """What a task running here holds (None when it is not running, or lent its share)."""
        entry = self._running.get(task_id)
        return None if entry is None else entry[1].allocation(task_id)

    def request_of(self, task_id: str) -> PlacementRequest | None:
        """The request of a task running here."""
        entry = self._running.get(task_id)
        return None if entry is None else entry[0]

    def has_room_any(self) -> bool:
        """Whether one more request could start or queue here (the queue is not full)."""
        return len(self.queue) < self.queue.limit

    def has_room(self, request: PlacementRequest) -> bool:
        """Would :meth:`offer` start or queue ``request`` now (no rejection)?"""
        if request.bundle is not None:
            return True
        return self.ledger.can_fit(request.resources, normalized=True) or self.queue.has_room(
            request.submitter
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
        entry = self._running.pop(task_id, None)
        if entry is None:
            return []
        if task_id in self._lent:
            self._lent.discard(task_id)
        else:
            entry[1].release(task_id)
        self._version += 1
        return self.dispatch()

    def lend(self, task_id: str) -> list[QueueAdmission]:
        """The task's worker blocks (a ``get`` of objects not ready): its resources go to other
        work meanwhile, as Ray does; they are not taken back when it resumes."""
        entry = self._running.get(task_id)
        if entry is None or task_id in self._lent:
            return []
        self._lent.add(task_id)
        entry[1].release(task_id)
        self._version += 1
        return self.dispatch()

    def cancel(self, task_id: str, now: float) -> list[QueueAdmission]:
        """Drop a queued request, or end a running one; returns requests started as a result."""
        if self.queue.remove(task_id) is not None:
            self._version += 1
            return []
        return self.finish(task_id, now)

    def bind_worker(self, task_id: str, worker_id: str) -> None:
        """Record which worker runs ``task_id`` so :meth:`reclaim_owner` can free it."""
        entry = self._running.get(task_id)
        (entry[1] if entry is not None else self.ledger).set_owner(task_id, worker_id)

    def reclaim_owner(self, worker_id: str, now: float) -> tuple[list[str], list[QueueAdmission]]:
        """A worker died: free what it held; returns (tasks it was running, newly started)."""
        ledgers = [self.ledger] + [
            lg
            for g in self.bundles.groups()
            for lg in (self.bundles.ledger_for(g, i) for i in self.bundles.indexes(g))
            if lg is not None
        ]
        freed = [a for lg in ledgers for a in lg.release_owner(worker_id)]
        for allocation in freed:
            self._running.pop(allocation.allocation_id, None)
        if freed:
            self._version += 1
        return [a.allocation_id for a in freed], self.dispatch()

    # placement-group bundles -------------------------------------------------------------------
    def release_group(
        self, group_id: str, now: float, owner: str | None = None
    ) -> tuple[list[str], list[str]]:
        """Release the group's bundles here (those of ``owner`` only, when given): returns
        (tasks running in them, which must be ended; queued requests of the group, dropped)."""
        released = self.bundles.release_group(group_id, owner)
        return self._bundles_gone(group_id, bool(released))

    def release_bundle_owner(self, owner: str, now: float) -> tuple[list[str], list[str]]:
        """The owner of placement groups died: release its bundles here (see release_group)."""
        running: list[str] = []
        dropped: list[str] = []
        for group in sorted({r.group_id for r in self.bundles.release_owner(owner)}):
            r, d = self._bundles_gone(group, True)
            running += r
            dropped += d
        return running, dropped

    def expire_bundles(self, now: float) -> bool:
        """Drop prepared reservations whose lease passed; True when any did."""
        return bool(self.bundles.expire(now))

    def _bundles_gone(self, group_id: str, released: bool) -> tuple[list[str], list[str]]:
        running = [
            tid
            for tid, (req, _lg) in self._running.items()
            if req.bundle is not None
            and req.bundle[0] == group_id
            and self.bundles.ledger_for(group_id, req.bundle[1]) is None
        ]
        for tid in running:
            del self._running[tid]
            self._lent.discard(tid)
        dropped = [
            tid
            for tid in self.queue.keys()
            if (req := self.queue.get(tid)) is not None
            and req.bundle is not None
            and req.bundle[0] == group_id
        ]
        for tid in dropped:
            self.queue.remove(tid)
        if released or running or dropped:
            self._version += 1
        return running, dropped

    def _ledger_of(self, request: PlacementRequest) -> ResourceLedger | None:
        if request.bundle is None:
            return self.ledger
        ledger, _why = self._bundle_ledger(request)
        return ledger

    def dispatch(self) -> list[QueueAdmission]:
        """Start queued requests that fit now (round-robin over submitters)."""
        started: list[QueueAdmission] = []
        picked: list[ResourceLedger] = []
        # demands that did not fit a ledger in this call: dispatch only takes resources, so they
        # still do not (the heads of many submitters often ask for the same thing)
        short: set[tuple[int, tuple[tuple[str, float], ...]]] = set()

        def can_run(r: PlacementRequest) -> bool:
            ledger = self._ledger_of(r)
            if ledger is None:
                return False
            key = (id(ledger), tuple(r.resources.items()))
            if key in short:
                return False
            if ledger.can_fit(r.resources, normalized=True):
                picked.append(ledger)
                return True
            short.add(key)
            return False

        while len(self.queue):
            request = self.queue.pop_ready(can_run)
            if request is None:
                break
            allocation = self._start(request, picked[-1])
            started.append(
                QueueAdmission(
                    AdmissionKind.STARTED,
                    request.task_id,
                    self.node_id,
                    reason="dequeued",
                    allocation=allocation,
                )
            )
        return started
