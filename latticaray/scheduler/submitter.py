"""Submitter side of placement: spillback retries, waiting for capacity, infeasible timeouts.

:class:`Submitter` is a sans-I/O state machine owned by the node that submits tasks. It asks the
:class:`~latticaray.scheduler.policy.PlacementPolicy` for a node and returns *actions* for its
driver to carry out:

* :class:`SendPlacement` — send the request to ``node_id`` (RPC ``/latticaray/sched/1``);
* :class:`Placed` — the node accepted it (started or queued it there);
* :class:`PlacementWarning` — a request is infeasible right now (logged once, clearly);
* :class:`PlacementFailed` — it stayed infeasible past ``infeasible_timeout``
  (carries :class:`~latticaray.scheduler.errors.UnschedulableError`).

Spillback: a rejection's hint replaces the node's view in the snapshot and the node is excluded
for this request; after ``max_attempts`` rejections the request waits (exclusions cleared) and is
retried on :meth:`poll`. Waiting requests are bounded by ``max_waiting`` (``submit`` raises
:class:`~latticaray.scheduler.errors.QueueFull`: backpressure to the caller) and by
``per_owner_limit`` per owner (``PlacementRequest.owner``: a driver or worker of this node); they
are retried round-robin over owners, FIFO within one, so one owner's backlog of a million tasks
does not starve another's.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import QueueFull, UnschedulableError
from .local import AdmissionKind, QueueAdmission
from .policy import ClusterSnapshot, Decision, DecisionKind, PlacementPolicy, PlacementRequest

__all__ = ["Placed", "PlacementFailed", "PlacementWarning", "SendPlacement", "Submitter"]


@dataclass(frozen=True)
class SendPlacement:
    node_id: str
    request: PlacementRequest
    attempt: int


@dataclass(frozen=True)
class Placed:
    task_id: str
    node_id: str
    admission: QueueAdmission
    attempts: int
    local_bytes: int
    holder_available: bool
    #: The policy's reason for the final choice ("locality", "free", "queued", ...).
    reason: str = ""


@dataclass(frozen=True)
class PlacementWarning:
    task_id: str
    message: str


@dataclass(frozen=True)
class PlacementFailed:
    task_id: str
    error: UnschedulableError


Action = SendPlacement | Placed | PlacementWarning | PlacementFailed


@dataclass
class _InFlight:
    request: PlacementRequest
    node_id: str
    attempt: int
    local_bytes: int
    holder_available: bool
    reason: str = ""


@dataclass
class _Infeasible:
    request: PlacementRequest
    since: float
    reason: str


class WaitingRequests:
    """Requests waiting for capacity: a FIFO per owner, served round-robin over owners."""

    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, deque[str]] = OrderedDict()
        self._requests: dict[str, PlacementRequest] = {}
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._requests

    def __iter__(self) -> Iterator[str]:
        return iter(self._requests)

    def values(self) -> list[PlacementRequest]:
        return list(self._requests.values())

    def count(self, owner: str) -> int:
        return self._counts.get(owner, 0)

    def _uncount(self, owner: str) -> None:
        left = self._counts[owner] - 1
        if left:
            self._counts[owner] = left
        else:
            del self._counts[owner]

    def add(self, request: PlacementRequest, front: bool = False) -> None:
        task_id = request.task_id
        if task_id in self._requests:
            self._requests[task_id] = request
            return
        self._requests[task_id] = request
        self._counts[request.owner] = self._counts.get(request.owner, 0) + 1
        queue = self._by_owner.get(request.owner)
        if queue is None:
            queue = self._by_owner[request.owner] = deque()
        if front:
            queue.appendleft(task_id)
        else:
            queue.append(task_id)

    def get(self, task_id: str) -> PlacementRequest | None:
        return self._requests.get(task_id)

    def pop(self, task_id: str) -> PlacementRequest | None:
        """Remove one request (lazily from its owner's FIFO)."""
        request = self._requests.pop(task_id, None)
        if request is not None:
            self._uncount(request.owner)
        return request

    def next_round(self, limit: int) -> list[PlacementRequest]:
        """Up to ``limit`` heads, one per owner in turn (owners served move to the back);
        they are taken out: put back with ``add(front=True)`` those that still wait."""
        out: list[PlacementRequest] = []
        while self._requests and len(out) < limit:
            progressed = False
            for owner in list(self._by_owner):
                queue = self._by_owner[owner]
                while queue and queue[0] not in self._requests:
                    queue.popleft()  # cancelled meanwhile
                if not queue:
                    del self._by_owner[owner]
                    continue
                out.append(self._requests.pop(queue.popleft()))
                self._uncount(owner)
                progressed = True
                self._by_owner.move_to_end(owner)
                if not queue:
                    del self._by_owner[owner]
                if len(out) >= limit:
                    break
            if not progressed:
                break
        return out


class Submitter:
    """Drives requests of one submitter through placement, spillback and waiting."""

    def __init__(
        self,
        submitter_id: str,
        policy: PlacementPolicy,
        snapshot: ClusterSnapshot,
        *,
        max_attempts: int = 4,
        infeasible_timeout: float = 30.0,
        max_waiting: int = 100_000,
        retry_interval: float = 0.5,
        retry_batch: int = 256,
        max_consecutive_waits: int = 32,
        per_owner_limit: int | None = None,
    ) -> None:
        self.submitter_id = submitter_id
        self.policy = policy
        self.snapshot = snapshot
        self.max_attempts = max_attempts
        self.infeasible_timeout = infeasible_timeout
        self.max_waiting = max_waiting
        self.retry_interval = retry_interval
        self.retry_batch = retry_batch
        self.max_consecutive_waits = max_consecutive_waits
        self.per_owner_limit = per_owner_limit
        self._in_flight: dict[str, _InFlight] = {}
        self._attempts: dict[str, int] = {}
        self._waiting = WaitingRequests()
        self._infeasible: dict[str, _Infeasible] = {}
        self.rejections = 0

    # introspection -----------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def infeasible(self) -> int:
        return len(self._infeasible)

    def cancel(self, task_id: str) -> bool:
        """Stop placing ``task_id`` (the caller gave up); a late reply for it is ignored."""
        found = False
        flight = self._in_flight.pop(task_id, None)
        if flight is not None:
            self.policy.forget(task_id, flight.node_id)
            found = True
        found = (self._waiting.pop(task_id) is not None) or found
        found = (self._infeasible.pop(task_id, None) is not None) or found
        self._attempts.pop(task_id, None)
        return found

    def pending_requests(self) -> list[PlacementRequest]:
        """Requests waiting for capacity or infeasible right now (not in flight)."""
        return self._waiting.values() + [i.request for i in self._infeasible.values()]

    def infeasible_requests(self) -> list[PlacementRequest]:
        return [i.request for i in self._infeasible.values()]

    def in_flight_to(self, task_id: str) -> str | None:
        flight = self._in_flight.get(task_id)
        return None if flight is None else flight.node_id

    def check_room(self, request: PlacementRequest) -> None:
        """Raise :class:`QueueFull` when ``request`` may not be accepted (bounds)."""
        if len(self._waiting) + len(self._infeasible) >= self.max_waiting:
            raise QueueFull(
                f"submitter {self.submitter_id} already holds {self.max_waiting} "
                f"requests waiting for capacity"
            )
        if (
            self.per_owner_limit is not None
            and self._waiting.count(request.owner) >= self.per_owner_limit
        ):
            raise QueueFull(
                f"owner {request.owner or self.submitter_id} already has "
                f"{self.per_owner_limit} requests waiting for capacity"
            )

    def park(self, request: PlacementRequest, now: float) -> None:
        """Hold ``request`` waiting for capacity without asking the policy (the caller knows
        no node can take it now); it is retried on :meth:`poll`, FIFO per owner."""
        self.check_room(request)
        self._attempts[request.task_id] = 0
        if request.submitted_at is None:
            request = dataclasses.replace(request, submitted_at=now)
        self._waiting.add(request)

    def hold_infeasible(self, request: PlacementRequest, reason: str, now: float) -> list[Action]:
        """Track ``request`` as infeasible now (the caller found no node could ever take it)."""
        self.check_room(request)
        self._attempts[request.task_id] = 0
        if request.submitted_at is None:
            request = dataclasses.replace(request, submitted_at=now)
        return self._act(request, Decision(DecisionKind.INFEASIBLE, reason=reason), now)

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`poll` should next run (None: nothing is waiting)."""
        times = [i.since + self.infeasible_timeout for i in self._infeasible.values()]
        if self._waiting or self._infeasible:
            times.append(now + self.retry_interval)
        return min(times) if times else None

    # events ------------------------------------------------------------------------------------
    def submit(self, request: PlacementRequest, now: float) -> list[Action]:
        self.check_room(request)
        self._attempts[request.task_id] = 0
        if request.submitted_at is None:
            request = dataclasses.replace(request, submitted_at=now)
        return self._try(request, now)

    def send_direct(self, request: PlacementRequest, node_id: str, now: float) -> list[Action]:
        """Send ``request`` to ``node_id`` without asking the policy (a node named by the
        request that this submitter has no view of yet: its answer decides)."""
        self.check_room(request)
        if request.submitted_at is None:
            request = dataclasses.replace(request, submitted_at=now)
        attempt = self._attempts.get(request.task_id, 0) + 1
        self._attempts[request.task_id] = attempt
        self._in_flight[request.task_id] = _InFlight(request, node_id, attempt, 0, False, "direct")
        return [SendPlacement(node_id, request, attempt)]

    def fail(self, task_id: str, reason: str, now: float) -> list[Action]:
        """Stop placing ``task_id`` and fail it with :class:`UnschedulableError`."""
        request = None
        flight = self._in_flight.pop(task_id, None)
        if flight is not None:
            self.policy.forget(task_id, flight.node_id)
            request = flight.request
        request = self._waiting.pop(task_id) or request
        held = self._infeasible.pop(task_id, None)
        if held is not None:
            request = held.request
        self._attempts.pop(task_id, None)
        waited = None
        if request is not None and request.submitted_at is not None:
            waited = now - request.submitted_at
        return [PlacementFailed(task_id, UnschedulableError(task_id, reason, waited_s=waited))]

    def request_of(self, task_id: str) -> PlacementRequest | None:
        flight = self._in_flight.get(task_id)
        if flight is not None:
            return flight.request
        held = self._infeasible.get(task_id)
        if held is not None:
            return held.request
        return self._waiting.get(task_id)

    def on_admission(self, admission: QueueAdmission, now: float) -> list[Action]:
        flight = self._in_flight.pop(admission.task_id, None)
        if flight is None:
            return []  # late or duplicate reply
        if admission.kind is not AdmissionKind.REJECTED:
            self._attempts.pop(admission.task_id, None)
            return [
                Placed(
                    admission.task_id,
                    flight.node_id,
                    admission,
                    flight.attempt,
                    flight.local_bytes,
                    flight.holder_available,
                    flight.reason,
                )
            ]
        self.rejections += 1
        self.policy.forget(admission.task_id, flight.node_id)
        if admission.hint is not None and admission.hint.node_id == flight.node_id:
            self.snapshot.update_node(admission.hint)
        request = dataclasses.replace(
            flight.request, excluded=flight.request.excluded | {flight.node_id}
        )
        return self._try(request, now)

    def on_send_failed(self, task_id: str, now: float) -> list[Action]:
        """The request never reached its node (unreachable, timeout): try another one.

        The node counts as not alive until an ad newer than this failure says otherwise."""
        flight = self._in_flight.pop(task_id, None)
        if flight is None:
            return []
        self.policy.forget(task_id, flight.node_id)
        view = self.snapshot.nodes.get(flight.node_id)
        if view is not None and view.alive:
            self.snapshot.update_node(
                dataclasses.replace(view, alive=False, ad_time=max(view.ad_time, now))
            )
        request = dataclasses.replace(
            flight.request, excluded=flight.request.excluded | {flight.node_id}
        )
        return self._try(request, now)

    def poll(self, now: float) -> list[Action]:
        """Retry waiting and infeasible requests; fail those infeasible for too long."""
        actions: list[Action] = []
        for task_id in list(self._infeasible):
            entry = self._infeasible[task_id]
            decision = self.policy.place(self.snapshot, entry.request, now)
            if decision.kind is DecisionKind.INFEASIBLE:
                if now - entry.since >= self.infeasible_timeout:
                    del self._infeasible[task_id]
                    self._attempts.pop(task_id, None)
                    actions.append(
                        PlacementFailed(
                            task_id,
                            UnschedulableError(
                                task_id, decision.reason, waited_s=now - entry.since
                            ),
                        )
                    )
                continue
            del self._infeasible[task_id]
            actions.extend(self._act(entry.request, decision, now))
        return actions + self.retry_waiting(now)

    def retry_ids(self, task_ids: list[str], now: float) -> list[Action]:
        """Ask the policy again for these waiting requests (e.g. the node holding their data
        has room now); those that must still wait keep their place."""
        actions: list[Action] = []
        still: list[PlacementRequest] = []
        for task_id in task_ids:
            request = self._waiting.pop(task_id)
            if request is None:
                continue
            decision = self.policy.place(self.snapshot, request, now)
            if decision.kind is DecisionKind.WAIT:
                still.append(request)
            else:
                actions.extend(self._act(request, decision, now))
        self.return_waiting(still)
        return actions

    def is_waiting(self, task_id: str) -> bool:
        return task_id in self._waiting

    def take_waiting(self, count: int) -> list[PlacementRequest]:
        """Take up to ``count`` waiting requests, round-robin over owners (give back the ones
        not placed with :meth:`return_waiting`)."""
        return self._waiting.next_round(count)

    def return_waiting(self, requests: list[PlacementRequest]) -> None:
        """Put requests back at the head of their owners' FIFOs (order kept)."""
        for request in reversed(requests):
            if request.task_id not in self._attempts:
                self._attempts[request.task_id] = 0
            self._waiting.add(request, front=True)

    def retry_waiting(
        self, now: float, limit: int | None = None, max_waits: int | None = None
    ) -> list[Action]:
        """Ask the policy again for waiting requests (round-robin over owners), stopping after
        ``max_waits`` (default ``max_consecutive_waits``) that must still wait."""
        actions: list[Action] = []
        waits = 0
        batch = self.retry_batch if limit is None else limit
        most = self.max_consecutive_waits if max_waits is None else max_waits
        still_waiting: list[PlacementRequest] = []
        while waits < most and batch > 0 and self._waiting:
            heads = self._waiting.next_round(min(batch, most - waits))
            if not heads:
                break
            batch -= len(heads)
            for request in heads:
                decision = self.policy.place(self.snapshot, request, now)
                if decision.kind is DecisionKind.WAIT:
                    waits += 1
                    still_waiting.append(request)
                    continue
                waits = 0
                actions.extend(self._act(request, decision, now))
        self.return_waiting(still_waiting)  # FIFO order per owner kept
        return actions

    # internals ---------------------------------------------------------------------------------
    def _try(self, request: PlacementRequest, now: float) -> list[Action]:
        if self._attempts.get(request.task_id, 0) >= self.max_attempts:
            # Bounded spillback: wait for fresher ads, then start over with no exclusions.
            self._attempts[request.task_id] = 0
            self._waiting.add(dataclasses.replace(request, excluded=frozenset()))
            return []
        decision = self.policy.place(self.snapshot, request, now)
        return self._act(request, decision, now)

    def _act(self, request: PlacementRequest, decision: Decision, now: float) -> list[Action]:
        if decision.kind is DecisionKind.PLACE:
            assert decision.node_id is not None
            attempt = self._attempts.get(request.task_id, 0) + 1
            self._attempts[request.task_id] = attempt
            self._in_flight[request.task_id] = _InFlight(
                request,
                decision.node_id,
                attempt,
                decision.local_bytes,
                decision.holder_available,
                decision.reason,
            )
            return [SendPlacement(decision.node_id, request, attempt)]
        if decision.kind is DecisionKind.WAIT:
            self._waiting.add(dataclasses.replace(request, excluded=frozenset()))
            return []
        first = request.task_id not in self._infeasible
        if first:
            self._infeasible[request.task_id] = _Infeasible(request, now, decision.reason)
            return [
                PlacementWarning(
                    request.task_id,
                    f"task {request.task_id} is infeasible right now: {decision.reason}; "
                    f"it fails with TaskUnschedulableError unless a node that fits "
                    f"joins within {self.infeasible_timeout:g}s",
                )
            ]
        return []
