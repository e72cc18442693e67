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
:class:`~latticaray.scheduler.errors.QueueFull`: backpressure to the caller).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from .errors import QueueFull, UnschedulableError
from .local import AdmissionKind, QueueAdmission
from .policy import ClusterSnapshot, DecisionKind, PlacementPolicy, PlacementRequest

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
        self._in_flight: dict[str, _InFlight] = {}
        self._attempts: dict[str, int] = {}
        self._waiting: OrderedDict[str, PlacementRequest] = OrderedDict()
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
        found = (self._waiting.pop(task_id, None) is not None) or found
        found = (self._infeasible.pop(task_id, None) is not None) or found
        self._attempts.pop(task_id, None)
        return found

    def pending_requests(self) -> list[PlacementRequest]:
        """Requests waiting for capacity or infeasible right now (not in flight)."""
        return list(self._waiting.values()) + [i.request for i in self._infeasible.values()]

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`poll` should next run (None: nothing is waiting)."""
        times = [i.since + self.infeasible_timeout for i in self._infeasible.values()]
        if self._waiting or self._infeasible:
            times.append(now + self.retry_interval)
        return min(times) if times else None

    # events ------------------------------------------------------------------------------------
    def submit(self, request: PlacementRequest, now: float) -> list[Action]:
        if len(self._waiting) + len(self._infeasible) >= self.max_waiting:
            raise QueueFull(
                f"submitter {self.submitter_id} already holds {self.max_waiting} "
                f"requests waiting for capacity"
            )
        self._attempts[request.task_id] = 0
        if request.submitted_at is None:
            request = dataclasses.replace(request, submitted_at=now)
        return self._try(request, now)

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
        tried = waits = 0
        still_waiting: list[tuple[str, PlacementRequest]] = []
        for task_id in list(self._waiting):
            if tried >= self.retry_batch or waits >= self.max_consecutive_waits:
                break
            tried += 1
            request = self._waiting.pop(task_id)
            decision = self.policy.place(self.snapshot, request, now)
            if decision.kind is DecisionKind.WAIT:
                waits += 1
                still_waiting.append((task_id, request))
                continue
            waits = 0
            actions.extend(self._act(request, decision, now))
        for task_id, request in reversed(still_waiting):  # keep FIFO order
            self._waiting[task_id] = request
            self._waiting.move_to_end(task_id, last=False)
        return actions

    # internals ---------------------------------------------------------------------------------
    def _try(self, request: PlacementRequest, now: float) -> list[Action]:
        if self._attempts.get(request.task_id, 0) >= self.max_attempts:
            # Bounded spillback: wait for fresher ads, then start over with no exclusions.
            self._attempts[request.task_id] = 0
            self._waiting[request.task_id] = dataclasses.replace(request, excluded=frozenset())
            return []
        decision = self.policy.place(self.snapshot, request, now)
        return self._act(request, decision, now)

    def _act(self, request: PlacementRequest, decision, now: float) -> list[Action]:
        if decision.kind is DecisionKind.PLACE:
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
            self._waiting[request.task_id] = dataclasses.replace(request, excluded=frozenset())
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
