"""The scheduler of one node, sans-I/O: what the runtime and the simulator both drive.

:class:`SchedulerCore` is fed events with ``now`` and returns actions; it owns no socket and
reads no clock. It joins the scheduler's parts into the one placement path of a node:

* as a **submitter** (work this node's drivers and workers submit): a
  :class:`~latticaray.scheduler.submitter.Submitter` over a
  :class:`~latticaray.scheduler.policy.PlacementPolicy` and a
  :class:`~latticaray.scheduler.policy.ClusterSnapshot` of what this node knows: its own exact
  view, the views of a bounded :class:`~latticaray.scheduler.neighbourhood.Neighbourhood` (at
  most a few dozen peers, never everyone) and a sample of the DHT's `capacity/<resource>` ads
  (:class:`~latticaray.scheduler.directory.CapacityDirectory`). Requests carry their arguments'
  CIDs and sizes; :meth:`note_object` says where they live, so the policy prefers their holders.
  A request no known node can take now waits (fair per owner, bounded); one no known node could
  *ever* take waits ``capacity_wait`` s for capacity ads to name one, then fails with
  :class:`~latticaray.scheduler.errors.UnschedulableError`;
* as an **executor** (work placed on this node, by itself or by peers): a
  :class:`~latticaray.scheduler.local.LocalScheduler` that starts, queues (bounded, round-robin
  over submitting nodes) or rejects with a fresh view, so a submitter whose view was stale
  spills the request over to another node;
* as the **owner of placement groups**: a
  :class:`~latticaray.scheduler.placement_groups.GroupCoordinator` per group (two-phase claim),
  and as a **holder of bundles**: the local scheduler's reservations.

Actions for the driver (runtime or simulator):

* :class:`StartLocal` — run the request here now, with its allocation (GPU ids);
* :class:`~latticaray.scheduler.submitter.SendPlacement` — offer it to a peer (which answers
  with a :class:`~latticaray.scheduler.local.QueueAdmission`: feed :meth:`on_admission`, or
  :meth:`on_send_failed`);
* :class:`~latticaray.scheduler.submitter.Placed` — a peer accepted it (or it queued here);
* :class:`~latticaray.scheduler.submitter.PlacementFailed` /
  :class:`~latticaray.scheduler.submitter.PlacementWarning`;
* :class:`LookupCapacity` — read DHT `capacity/<resource>` (feed :meth:`on_capacity`);
* :class:`Subscribe` / :class:`Unsubscribe` — start / stop receiving a peer's view pushes
  (feed :meth:`on_view`);
* :class:`EndTasks` — tasks that must end here (their placement group was removed);
* the placement-group actions of :mod:`~latticaray.scheduler.placement_groups` addressed to
  peers (the ones addressed to this node are handled inside).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .directory import CapacityDirectory, key_resource
from .errors import UnschedulableError
from .local import AdmissionKind, LocalScheduler, QueueAdmission
from .neighbourhood import Neighbourhood
from .placement_groups import (
    AbortBundle,
    BundleReply,
    CommitBundle,
    GroupAction,
    GroupCoordinator,
    GroupCreated,
    PrepareBundle,
    ReleaseGroup,
)
from .policy import (
    ClusterSnapshot,
    Decision,
    DecisionKind,
    NodeAffinity,
    NodeView,
    ObjectInfo,
    PlacementPolicy,
    PlacementRequest,
)
from .resources import Allocation, ResourceLedger
from .submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement, Submitter

__all__ = [
    "Action",
    "CapacityExpired",
    "CapacityFound",
    "EndTasks",
    "LookupCapacity",
    "SchedulerConfig",
    "SchedulerCore",
    "StartLocal",
    "Subscribe",
    "Unsubscribe",
]


@dataclass(frozen=True)
class StartLocal:
    """Run ``request`` on this node now; ``allocation`` holds its resources (and GPU ids)."""

    request: PlacementRequest
    allocation: Allocation


@dataclass(frozen=True)
class LookupCapacity:
    """Read DHT `capacity/<resource>`; answer with :meth:`SchedulerCore.on_capacity`."""

    resource: str


@dataclass(frozen=True)
class Subscribe:
    """``node_id`` entered the neighbourhood: ask it to push its view here."""

    node_id: str


@dataclass(frozen=True)
class Unsubscribe:
    node_id: str


@dataclass(frozen=True)
class CapacityFound:
    """A deferred decision (:meth:`SchedulerCore.defer`) can be made now: decide again."""

    key: str


@dataclass(frozen=True)
class CapacityExpired:
    """A deferred decision found no node within ``capacity_wait``."""

    key: str
    error: UnschedulableError


@dataclass(frozen=True)
class EndTasks:
    """Tasks running here that must end (``reason``), and queued ones dropped."""

    running: tuple[str, ...]
    dropped: tuple[str, ...]
    reason: str


Action = (
    StartLocal
    | SendPlacement
    | Placed
    | PlacementFailed
    | PlacementWarning
    | LookupCapacity
    | Subscribe
    | Unsubscribe
    | EndTasks
    | CapacityFound
    | CapacityExpired
    | GroupAction
)


@dataclass
class SchedulerConfig:
    #: peers whose live views this node keeps (bootstrap ones pinned, at most ``pinned``)
    neighbours: int = 32
    pinned: int = 8
    #: a request no known node could ever take fails after this long (capacity ads may name one)
    capacity_wait: float = 10.0
    #: rejections before a request waits for fresher views
    max_attempts: int = 4
    #: this node's queue (None: one waiting request per CPU) and its per-submitter share
    queue_limit: int | None = None
    per_submitter_queue: int | None = None
    #: requests waiting for capacity at this node as a submitter, in all and per owner
    max_waiting: int = 10_000_000
    per_owner_waiting: int | None = None
    retry_interval: float = 0.5
    #: capacity-ad views of nodes outside the neighbourhood: kept this long, at most this many
    ad_ttl: float = 30.0
    max_ad_nodes: int = 256
    #: nodes heard of from the cluster state are taken as candidates up to this many known
    seed_candidates: int = 16
    #: arguments at least this large draw their work to their holders
    locality_min_bytes: int = 1 << 20
    #: placement policy
    choices: int = 2
    locality_slack: float = 1.3
    locality_delay: float = 5.0
    locality_wait_free: float = 5.0
    locality_queue: float = 2.0
    #: capacity directory (DHT keys)
    directory_ttl: float = 10.0
    directory_refresh: float = 10.0
    directory_min_gap: float = 0.5
    directory_sample: int = 32
    #: placement groups
    group_prepare_timeout: float = 5.0
    group_lease: float = 10.0
    group_retry: float = 0.5


class SchedulerCore:
    """One node's placement: submitter, executor and placement-group owner (sans-I/O)."""

    def __init__(
        self,
        node_id: str,
        ledger: ResourceLedger,
        *,
        labels: Mapping[str, str] | None = None,
        config: SchedulerConfig | None = None,
        seed: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = cfg = config or SchedulerConfig()
        self.local = LocalScheduler(
            node_id,
            ledger,
            labels=labels,
            queue_limit=cfg.queue_limit,
            per_submitter_limit=cfg.per_submitter_queue,
        )
        self.objects: OrderedDict[bytes | str, ObjectInfo] = OrderedDict()
        self.snapshot = ClusterSnapshot(objects=self.objects, local_node=node_id)
        self.policy = PlacementPolicy(
            seed=seed,
            choices=cfg.choices,
            locality_slack=cfg.locality_slack,
            locality_delay=cfg.locality_delay,
            locality_wait_free=cfg.locality_wait_free,
            locality_queue=cfg.locality_queue,
        )
        self.submitter = Submitter(
            node_id,
            self.policy,
            self.snapshot,
            max_attempts=cfg.max_attempts,
            infeasible_timeout=cfg.capacity_wait,
            max_waiting=cfg.max_waiting,
            retry_interval=cfg.retry_interval,
            per_owner_limit=cfg.per_owner_waiting,
        )
        self.neighbourhood = Neighbourhood(cfg.neighbours, cfg.pinned)
        self.directory = CapacityDirectory(
            ttl=cfg.directory_ttl,
            refresh_interval=cfg.directory_refresh,
            min_gap=cfg.directory_min_gap,
            sample_size=cfg.directory_sample,
            seed=seed,
        )
        self.max_objects = 100_000
        self._ad_nodes: OrderedDict[str, float] = OrderedDict()  # node -> when its ad came
        self._used_once: OrderedDict[str, float] = OrderedDict()
        #: holder node -> task ids (oldest first) with large arguments on it
        self._by_holder: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._affinity_hard: set[str] = set()
        self._last_demand: dict[str, float] = {}
        self._local_version = -1
        #: placement groups this node owns, and those it knows of (id -> bundle nodes)
        self.groups: dict[str, GroupCoordinator] = {}
        self.known_groups: dict[str, tuple[str, ...]] = {}
        self._group_waiting: dict[str, list[PlacementRequest]] = {}
        #: decisions waiting for capacity: key -> (request, since, reason)
        self._deferred: dict[str, tuple[PlacementRequest, float, str]] = {}
        self.stats: dict[str, int] = {}

    # helpers -----------------------------------------------------------------------------------
    def _fail(self, task_id: str, reason: str, now: float) -> list[Action]:
        self._affinity_hard.discard(task_id)
        return [*self.submitter.fail(task_id, reason, now)]

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _sync_local(self, now: float) -> None:
        """Keep this node's own (exact) view in the snapshot."""
        version = self.local.version
        if version != self._local_version or self.node_id not in self.snapshot.nodes:
            self._local_version = version
            self.snapshot.update_node(self.local.view(now))
        else:
            self.snapshot.nodes[self.node_id].ad_time = now

    def _others_known(self) -> bool:
        nodes = self.snapshot.nodes
        return len(nodes) > 1 or (len(nodes) == 1 and self.node_id not in nodes)

    def note_object(self, cid: bytes | str, size: int, holders: Sequence[str]) -> None:
        """Where an argument object lives (this node's store, the node that produced it,
        provider records); the policy prefers its holders."""
        info = ObjectInfo(int(size), frozenset(holders))
        objects = self.objects
        if cid in objects:
            objects.move_to_end(cid)
        objects[cid] = info
        while len(objects) > self.max_objects:
            objects.popitem(last=False)

    def forget_object(self, cid: bytes | str) -> None:
        self.objects.pop(cid, None)

    # submitter side ----------------------------------------------------------------------------
    def submit(self, request: PlacementRequest, now: float) -> list[Action]:
        """Place ``request`` (work of this node's drivers or workers)."""
        self._sync_local(now)
        if request.bundle is not None:
            return self._submit_in_group(request, now)
        strategy = request.strategy
        if isinstance(strategy, NodeAffinity) and not strategy.soft:
            self._affinity_hard.add(request.task_id)
        if (
            isinstance(strategy, NodeAffinity)
            and strategy.node_id != self.node_id
            and strategy.node_id not in self.snapshot.nodes
            and not request.local_only
        ):
            # a node this one has no view of: ask it directly, its answer decides
            return self._run(self.submitter.send_direct(request, strategy.node_id, now), now)
        if not self._others_known() and not isinstance(strategy, NodeAffinity):
            return self._submit_alone(request, now)
        self._index_holders(request)
        target = self._unknown_holder(request)
        if target is not None:
            # its large arguments are all on nodes this one has no view of: offer it to the
            # holder with the most bytes (its answer carries its view; a refusal spills over)
            self._count("holder_direct")
            return self._run(self.submitter.send_direct(request, target, now), now)
        return self._run(self.submitter.submit(request, now), now)

    def _submit_alone(self, request: PlacementRequest, now: float) -> list[Action]:
        """No other node is known: this node runs it, it waits here, or it waits for capacity
        ads (the policy has nothing to choose from)."""
        local = self.local
        if request.local_only or local.ledger.could_ever_fit(request.resources, normalized=True):
            if local.has_room(request) and not self.submitter.waiting:
                self.submitter.check_room(request)
                return self._offer_local(request, now, attempts=1)
            self.submitter.park(request, now)
            self._count("parked")
            return []
        self._demand(request, now, urgent=True)
        return self._run(
            self.submitter.hold_infeasible(
                request,
                f"this node has {local.ledger.total} and knows no other node",
                now,
            ),
            now,
        )

    def _offer_local(self, request: PlacementRequest, now: float, attempts: int) -> list[Action]:
        admission = self.local.offer(request, now)
        self._sync_local(now)
        if admission.kind is AdmissionKind.STARTED:
            assert admission.allocation is not None
            return [StartLocal(request, admission.allocation)]
        if admission.kind is AdmissionKind.QUEUED:
            return [Placed(request.task_id, self.node_id, admission, attempts, 0, False, "local")]
        self.submitter.return_waiting([request])
        return []

    def _demand(self, request: PlacementRequest, now: float, urgent: bool = False) -> None:
        """Work that must wait demands its key: it is read (and kept fresh while work waits),
        so a node whose known peers take its work reads nothing."""
        resource = key_resource(request.resources)
        last = self._last_demand.get(resource)
        if urgent or last is None or now - last > 1.0:
            self._last_demand[resource] = now
            self.directory.demand(resource, now)

    def _index_holders(self, request: PlacementRequest) -> None:
        """Remember which nodes hold the request's large arguments, so that when one of them
        shows room the request is asked about first (not after everything else waiting)."""
        for cid, size in request.args:
            if size < self.config.locality_min_bytes:
                continue
            info = self.objects.get(cid)
            if info is None:
                continue
            for holder in info.holders:
                waiting = self._by_holder.get(holder)
                if waiting is None:
                    if len(self._by_holder) >= 4 * self.config.max_ad_nodes:
                        self._by_holder.popitem(last=False)
                    waiting = self._by_holder[holder] = OrderedDict()
                waiting[request.task_id] = None
                while len(waiting) > 256:
                    waiting.popitem(last=False)

    def _unknown_holder(self, request: PlacementRequest) -> str | None:
        """The node holding most of the request's large arguments, when no holder of them is
        known here (else None: the policy weighs the known holders)."""
        if not request.args or isinstance(request.strategy, NodeAffinity) or request.local_only:
            return None
        nodes = self.snapshot.nodes
        held: dict[str, int] = {}
        for cid, size in request.args:
            if size < self.config.locality_min_bytes:
                continue
            info = self.objects.get(cid)
            if info is None:
                continue
            for holder in info.holders:
                if holder == self.node_id or holder in nodes:
                    return None
                held[holder] = held.get(holder, 0) + size
        if not held:
            return None
        return min(held, key=lambda n: (-held[n], n))

    def on_admission(self, admission: QueueAdmission, now: float) -> list[Action]:
        """A peer answered a :class:`SendPlacement` (started, queued, or rejected with a hint)."""
        self._sync_local(now)
        if admission.hint is not None:
            self._learn(admission.hint, now)
            if admission.kind is not AdmissionKind.REJECTED:
                # the answer's view was made after the node took the request: it counts it,
                # so this node's memory of having sent it there must not count it again
                self.policy.forget(admission.task_id, admission.node_id)
        if admission.kind is AdmissionKind.REJECTED and admission.task_id in self._affinity_hard:
            request = self.submitter.request_of(admission.task_id)
            if (
                request is not None
                and isinstance(request.strategy, NodeAffinity)
                and admission.infeasible
            ):
                self._affinity_hard.discard(admission.task_id)
                return self._fail(
                    admission.task_id,
                    f"node affinity to {request.strategy.node_id}, which can never run it: "
                    f"{admission.reason}",
                    now,
                )
        return self._run(self.submitter.on_admission(admission, now), now)

    def on_send_failed(self, task_id: str, now: float) -> list[Action]:
        """A :class:`SendPlacement` never reached its peer (unreachable, timed out)."""
        self._sync_local(now)
        node = self.submitter.in_flight_to(task_id)
        request = self.submitter.request_of(task_id)
        if (
            task_id in self._affinity_hard
            and request is not None
            and isinstance(request.strategy, NodeAffinity)
            and request.strategy.node_id == node
        ):
            self._affinity_hard.discard(task_id)
            return self._fail(
                task_id,
                f"node affinity to {node}, which is not reachable (not a live member of the mesh)",
                now,
            )
        return self._run(self.submitter.on_send_failed(task_id, now), now)

    def cancel(self, task_id: str, now: float) -> list[Action]:
        """The submitter gave up ``task_id`` (cancelled): stop placing it; if it was queued or
        running here, free its slot."""
        self._affinity_hard.discard(task_id)
        self.submitter.cancel(task_id)
        for waiting in self._group_waiting.values():
            waiting[:] = [r for r in waiting if r.task_id != task_id]
        return self._started(self.local.cancel(task_id, now), now)

    # decisions made elsewhere (actors) --------------------------------------------------------
    def decide(self, request: PlacementRequest, now: float) -> Decision:
        """The policy's choice for ``request`` over what this node knows, without sending it
        (the runtime places actors this way: their creation carries them to the node). A PLACE
        is remembered for anti-herding like any placement."""
        self._sync_local(now)
        return self.policy.place(self.snapshot, request, now)

    def defer(self, request: PlacementRequest, reason: str, now: float) -> list[Action]:
        """``request`` could not be decided (no known node can take it): look for capacity;
        :class:`CapacityFound` when one can, :class:`CapacityExpired` after
        ``capacity_wait``."""
        if request.task_id not in self._deferred:
            self._deferred[request.task_id] = (request, now, reason)
        self._demand(request, now, urgent=True)
        return []

    def withdraw(self, key: str) -> None:
        self._deferred.pop(key, None)

    def _deferred_actions(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for key, (request, since, reason) in list(self._deferred.items()):
            if now - since >= self.config.capacity_wait:
                del self._deferred[key]
                actions.append(
                    CapacityExpired(
                        key,
                        UnschedulableError(
                            key,
                            f"{reason}; nor any node advertising capacity for it",
                            waited_s=now - since,
                        ),
                    )
                )
                continue
            decision = self.policy.place(self.snapshot, request, now)
            if decision.kind is DecisionKind.PLACE:
                assert decision.node_id is not None
                self.policy.forget(key, decision.node_id)  # the caller decides again
                del self._deferred[key]
                actions.append(CapacityFound(key))
        return actions

    # what this node learns ---------------------------------------------------------------------
    def add_neighbour(self, node_id: str, now: float, kind: str = "bootstrap") -> list[Action]:
        """A peer to keep a live view of (bootstrap peers are pinned)."""
        if node_id == self.node_id:
            return []
        added, evicted = self.neighbourhood.add(node_id, kind, now)
        actions: list[Action] = [Unsubscribe(n) for n in evicted]
        for node in evicted:
            self._demote(node, now)
        if added:
            actions.append(Subscribe(node_id))
        return actions

    def _note_use(self, node_id: str, now: float) -> list[Action]:
        """Work was sent to ``node_id``. A node used again while it is remembered as used once
        joins the neighbourhood (one-off placements, e.g. next to scattered data, do not churn
        it); its answers' views keep it known meanwhile."""
        if node_id in self.neighbourhood:
            self.neighbourhood.touch(node_id, now)
            return []
        if self._used_once.pop(node_id, None) is None:
            self._used_once[node_id] = now
            while len(self._used_once) > 4 * self.config.neighbours:
                self._used_once.popitem(last=False)
            return []
        added, evicted = self.neighbourhood.add(node_id, "used", now)
        actions: list[Action] = []
        for node in evicted:
            self._demote(node, now)
            actions.append(Unsubscribe(node))
        if added:
            actions.append(Subscribe(node_id))
        return actions

    def _demote(self, node_id: str, now: float) -> None:
        """An evicted neighbour's view lingers like an ad's until it expires."""
        if node_id in self.snapshot.nodes:
            self._ad_nodes[node_id] = now
            self._ad_nodes.move_to_end(node_id)

    def neighbours(self) -> list[str]:
        return self.neighbourhood.peers()

    def on_view(self, view: NodeView, now: float) -> list[Action]:
        """A peer's current view (a push from a neighbour, a fetch answer, a reply's hint);
        ``view.ad_time`` is when it was received, on this node's clock."""
        self._sync_local(now)
        self._learn(view, now)
        actions: list[Action] = []
        if (
            view.alive
            and (self.submitter.waiting or self.submitter.infeasible)
            and (
                view.available.get("CPU", 0.0) >= 1.0
                or view.queue_limit is None
                or view.queued < view.queue_limit
            )
        ):
            local_work = self._by_holder.get(view.node_id)
            if local_work:
                # work whose data this node holds is asked about first
                ids = [t for t in local_work if self.submitter.is_waiting(t)]
                for task_id in [t for t in local_work if not self.submitter.is_waiting(t)]:
                    if self.submitter.request_of(task_id) is None:
                        del local_work[task_id]  # placed, failed or cancelled: forget it
                actions += self._run(self.submitter.retry_ids(ids[:16], now), now)
            actions += self._run(self.submitter.retry_waiting(now, limit=16, max_waits=4), now)
        if self._deferred and view.alive:
            actions += self._deferred_actions(now)
        return actions

    def _learn(self, view: NodeView, now: float) -> None:
        if view.node_id == self.node_id:
            return
        self.snapshot.update_node(view)
        if view.node_id not in self.neighbourhood:
            self._ad_nodes[view.node_id] = now
            self._ad_nodes.move_to_end(view.node_id)
            self._trim_ads()

    def _trim_ads(self) -> None:
        while len(self._ad_nodes) > self.config.max_ad_nodes:
            node, _when = self._ad_nodes.popitem(last=False)
            if node not in self.neighbourhood:
                self.snapshot.remove_node(node)

    def on_capacity(self, resource: str, views: list[NodeView] | None, now: float) -> list[Action]:
        """The answer to :class:`LookupCapacity` (None: the lookup failed). Views carry
        ``ad_time`` = receipt time."""
        self._sync_local(now)
        known = self.snapshot.nodes
        kept = self.directory.done(
            resource, views, now, self.node_id, is_new=lambda v: v.node_id not in known
        )
        for view in kept:
            if view.node_id in self.neighbourhood and view.node_id in self.snapshot.nodes:
                continue  # its pushed view is fresher than its ad
            self._learn(view, now)
        self._count("capacity_answers")
        actions: list[Action] = []
        if kept and (self.submitter.waiting or self.submitter.infeasible):
            actions += self._run(self.submitter.poll(now), now)
        if kept and self._deferred:
            actions += self._deferred_actions(now)
        return actions

    def on_candidates(self, views: list[NodeView], now: float) -> list[Action]:
        """Nodes heard of another way (the cluster state's member entries): known like ads,
        when this node knows fewer than ``seed_candidates`` nodes (so a node that just joined
        has somewhere to place beside its bootstrap peers)."""
        self._sync_local(now)
        added = 0
        for view in views:
            if len(self.snapshot.nodes) >= self.config.seed_candidates:
                break
            if view.node_id != self.node_id and view.node_id not in self.snapshot.nodes:
                self._learn(view, now)
                added += 1
        if added and (self.submitter.waiting or self.submitter.infeasible):
            return self._run(self.submitter.retry_waiting(now, limit=16, max_waits=4), now)
        return []

    def node_gone(self, node_id: str, now: float) -> list[Action]:
        """A peer left the mesh (disconnected, stopped answering)."""
        self.snapshot.remove_node(node_id)
        self._ad_nodes.pop(node_id, None)
        self._by_holder.pop(node_id, None)
        actions: list[Action] = []
        if self.neighbourhood.remove(node_id):
            actions.append(Unsubscribe(node_id))
        for group in list(self.groups.values()):
            actions += self._group_actions(group.node_gone(node_id, now), now)
        running, dropped = self.local.release_bundle_owner(node_id, now)
        if running or dropped:
            actions.append(
                EndTasks(
                    tuple(running),
                    tuple(dropped),
                    f"the owner of their placement group, {node_id}, left the mesh",
                )
            )
        actions += self._started(self.local.dispatch(), now)
        return actions

    # executor side -----------------------------------------------------------------------------
    def offer(self, request: PlacementRequest, now: float) -> QueueAdmission:
        """A peer placed ``request`` here: start it, queue it, or reject it with a hint."""
        admission = self.local.offer(request, now)
        self._sync_local(now)
        return admission

    def finish(self, task_id: str, now: float) -> list[Action]:
        """Work placed here ended: free its resources; start what now fits (queued here, or
        waiting at this node as a submitter)."""
        return self._started(self.local.finish(task_id, now), now)

    def lend(self, task_id: str, now: float) -> list[Action]:
        """The task's worker blocks on a get: its resources run other work meanwhile."""
        return self._started(self.local.lend(task_id), now)

    def worker_died(self, worker_id: str, now: float) -> tuple[list[str], list[Action]]:
        """A worker died: its tasks' resources come back; returns (its tasks, actions)."""
        tasks, started = self.local.reclaim_owner(worker_id, now)
        return tasks, self._started(started, now)

    def _started(self, admissions: list[QueueAdmission], now: float) -> list[Action]:
        self._sync_local(now)
        actions: list[Action] = []
        for admission in admissions:
            request = self.local.request_of(admission.task_id)
            assert request is not None and admission.allocation is not None
            actions.append(StartLocal(request, admission.allocation))
        if self.submitter.waiting and self.local.has_room_any():
            if self._others_known():
                actions += self._run(
                    self.submitter.retry_waiting(now, limit=len(admissions) + 2, max_waits=2), now
                )
            else:
                actions += self._drain_alone(now)
        return actions

    def _drain_alone(self, now: float) -> list[Action]:
        """No other node is known: waiting requests go to this node's queue in turn while it
        has room (no policy to consult)."""
        actions: list[Action] = []
        local = self.local
        while self.submitter.waiting and local.has_room_any():
            heads = self.submitter.take_waiting(1)
            if not heads:
                break
            request = heads[0]
            if not local.has_room(request):
                self.submitter.return_waiting(heads)
                break
            actions += self._offer_local(request, now, attempts=1)
        return actions

    # timers ------------------------------------------------------------------------------------
    def _urgent_resources(self) -> set[str]:
        """Keys read at the urgent pace: no known node could ever take work waiting on them.
        (Work that waits because every known node is busy keeps its key demanded, so the key
        is refreshed at the background pace: in a saturated mesh more lookups find nothing.)"""
        out = {key_resource(r.resources) for r in self.submitter.infeasible_requests()}
        out.update(key_resource(r.resources) for r, _since, _why in self._deferred.values())
        return out

    def poll(self, now: float) -> list[Action]:
        """Timers: retries, infeasible deadlines, capacity lookups, view-fetch and lease
        timeouts, placement groups."""
        self._sync_local(now)
        actions: list[Action] = []
        cutoff = now - self.config.ad_ttl
        while self._ad_nodes:
            node, when = next(iter(self._ad_nodes.items()))
            if when > cutoff:
                break
            del self._ad_nodes[node]
            if node not in self.neighbourhood:
                self.snapshot.remove_node(node)
        if self.local.expire_bundles(now):
            actions += self._started(self.local.dispatch(), now)
        actions += self._run(self.submitter.poll(now), now)
        if self._deferred:
            actions += self._deferred_actions(now)
        if self.submitter.waiting and self.snapshot.mean_load() >= 1.0:
            # work waits and the nodes this one knows are full: look for more capacity
            for request in self.submitter.take_waiting(1):
                self._demand(request, now)
                self.submitter.return_waiting([request])
        for resource in self.directory.due(now, self._urgent_resources()):
            self.directory.started(resource, now)
            actions.append(LookupCapacity(resource))
        for group in list(self.groups.values()):
            actions += self._group_actions(group.poll(self.snapshot, now), now)
        return actions

    def next_wakeup(self, now: float) -> float | None:
        times: list[float] = []
        wake = self.submitter.next_wakeup(now)
        if wake is not None:
            times.append(wake)
        wake = self.directory.next_wakeup(now, self._urgent_resources())
        if wake is not None:
            times.append(wake)
        expiry = self.local.bundles.next_expiry()
        if expiry is not None:
            times.append(expiry)
        if self._ad_nodes:
            times.append(next(iter(self._ad_nodes.values())) + self.config.ad_ttl)
        for group in self.groups.values():
            wake = group.next_wakeup(now)
            if wake is not None:
                times.append(wake)
        for _request, since, _reason in self._deferred.values():
            times.append(min(since + self.config.capacity_wait, now + self.config.retry_interval))
        return min(times) if times else None

    # the submitter's actions -------------------------------------------------------------------
    def _run(self, actions: list, now: float) -> list[Action]:
        """Carry out the actions addressed to this node itself; pass on the rest."""
        out: list[Action] = []
        work = list(actions)
        while work:
            action = work.pop(0)
            if isinstance(action, SendPlacement):
                if action.node_id == self.node_id:
                    admission = self.local.offer(action.request, now)
                    self._sync_local(now)
                    if admission.kind is AdmissionKind.STARTED:
                        self.submitter.on_admission(admission, now)  # clears the in-flight entry
                        assert admission.allocation is not None
                        out.append(StartLocal(action.request, admission.allocation))
                    else:
                        work[:0] = self.submitter.on_admission(admission, now)
                    continue
                out += self._note_use(action.node_id, now)
                self._count("sent")
                out.append(action)
                continue
            if isinstance(action, Placed | PlacementFailed):
                self._affinity_hard.discard(action.task_id)
            out.append(action)
        return out

    # placement groups (owner side) -------------------------------------------------------------
    def create_group(
        self,
        group_id: str,
        bundles: Sequence[Mapping[str, float]],
        strategy: str,
        now: float,
        selector: Mapping[str, str] | None = None,
    ) -> list[Action]:
        """Start placing a placement group this node owns (two-phase claim)."""
        if group_id in self.groups:
            return []
        cfg = self.config
        group = GroupCoordinator(
            group_id,
            bundles,
            strategy,
            self.node_id,
            prepare_timeout=cfg.group_prepare_timeout,
            lease=cfg.group_lease,
            retry_interval=cfg.group_retry,
            selector=selector,
        )
        self.groups[group_id] = group
        self._sync_local(now)
        for bundle in group.bundles:
            self._demand(PlacementRequest("", bundle, self.node_id), now)
        return self._group_actions(group.poll(self.snapshot, now), now)

    def remove_group(self, group_id: str, now: float) -> list[Action]:
        group = self.groups.pop(group_id, None)
        actions: list[Action] = []
        if group is not None:
            actions += self._group_actions(group.remove(), now)
        self.known_groups.pop(group_id, None)
        for request in self._group_waiting.pop(group_id, []):
            actions += self._fail(request.task_id, f"placement group {group_id} was removed", now)
        return actions

    def on_bundle_reply(self, reply: BundleReply, now: float) -> list[Action]:
        group = self.groups.get(reply.group_id)
        if reply.hint is not None:
            self._learn(reply.hint, now)
        if group is None:
            return []
        return self._group_actions(group.on_reply(reply, now), now)

    def bundle_send_failed(self, group_id: str, index: int, attempt: int, now: float) -> list:
        group = self.groups.get(group_id)
        if group is None:
            return []
        return self._group_actions(group.on_send_failed(index, attempt, now), now)

    def note_group(self, group_id: str, nodes: Sequence[str] | None, now: float) -> list[Action]:
        """A placement group another node owns (from the cluster state): its bundles' nodes,
        or None when it was removed."""
        if nodes is None:
            self.known_groups.pop(group_id, None)
            return []
        self.known_groups[group_id] = tuple(nodes)
        return self._unpark_group(group_id, now)

    def group_nodes(self, group_id: str) -> tuple[str, ...] | None:
        group = self.groups.get(group_id)
        if group is not None:
            if not group.created:
                return None
            return tuple(group.nodes[i] for i in range(len(group.bundles)))
        return self.known_groups.get(group_id)

    def _group_actions(self, actions: list, now: float) -> list[Action]:
        """Carry out group actions addressed to this node; pass on the others."""
        out: list[Action] = []
        work = list(actions)
        while work:
            action = work.pop(0)
            if isinstance(action, GroupCreated):
                out.append(action)
                out += self._unpark_group(action.group_id, now)
                continue
            node = getattr(action, "node_id", None)
            if node != self.node_id:
                out.append(action)
                continue
            if isinstance(action, PrepareBundle):
                ok, why = self.local.bundles.prepare(
                    action.group_id,
                    action.index,
                    action.resources,
                    action.owner,
                    action.attempt,
                    action.lease,
                    now,
                )
                group = self.groups.get(action.group_id)
                if group is not None:
                    reply = BundleReply(action.group_id, action.index, action.attempt, ok, why)
                    work[:0] = group.on_reply(reply, now)
            elif isinstance(action, CommitBundle):
                self.local.bundles.commit(action.group_id, action.index, action.attempt)
            elif isinstance(action, AbortBundle):
                self.local.bundles.abort(action.group_id, action.index, action.attempt)
                out += self._started(self.local.dispatch(), now)
            elif isinstance(action, ReleaseGroup):
                out += self.release_group_here(action.group_id, now)
        self._sync_local(now)
        return out

    def _submit_in_group(self, request: PlacementRequest, now: float) -> list[Action]:
        assert request.bundle is not None
        group_id, index = request.bundle
        nodes = self.group_nodes(group_id)
        if nodes is None:
            if group_id not in self.groups and group_id not in self.known_groups:
                return self._fail(
                    request.task_id, f"placement group {group_id} is unknown or removed", now
                )
            self.submitter.check_room(request)
            self._group_waiting.setdefault(group_id, []).append(request)
            return []
        if index >= len(nodes):
            return self._fail(
                request.task_id,
                f"placement group {group_id} has {len(nodes)} bundles, no bundle {index}",
                now,
            )
        if index >= 0:
            target = nodes[index]
        else:
            target = min(set(nodes), key=lambda n: (self.policy.pending_count(n), n))
        request = dataclasses.replace(request, strategy=NodeAffinity(target, soft=False))
        self._affinity_hard.add(request.task_id)
        if target != self.node_id and target not in self.snapshot.nodes:
            return self._run(self.submitter.send_direct(request, target, now), now)
        return self._run(self.submitter.submit(request, now), now)

    def _unpark_group(self, group_id: str, now: float) -> list[Action]:
        actions: list[Action] = []
        for request in self._group_waiting.pop(group_id, []):
            actions += self._submit_in_group(request, now)
        return actions

    # placement groups (holder side) ------------------------------------------------------------
    def prepare_bundle(self, message: PrepareBundle, caller: str, now: float) -> BundleReply:
        """A peer (the group's owner, authenticated as ``caller``) asks for a reservation."""
        ok, why = self.local.bundles.prepare(
            message.group_id,
            message.index,
            message.resources,
            caller,
            message.attempt,
            message.lease,
            now,
        )
        self._sync_local(now)
        hint = None if ok else self.local.view(now)
        return BundleReply(message.group_id, message.index, message.attempt, ok, why, hint)

    def commit_bundle(
        self, message: CommitBundle, now: float, owner: str | None = None
    ) -> BundleReply:
        ok, why = self.local.bundles.commit(message.group_id, message.index, message.attempt, owner)
        return BundleReply(message.group_id, message.index, message.attempt, ok, why)

    def abort_bundle(
        self, message: AbortBundle, now: float, owner: str | None = None
    ) -> list[Action]:
        self.local.bundles.abort(message.group_id, message.index, message.attempt, owner)
        return self._started(self.local.dispatch(), now)

    def release_group_here(
        self, group_id: str, now: float, owner: str | None = None
    ) -> list[Action]:
        """Release the bundles of ``group_id`` this node holds (only its ``owner``'s, when
        given: a peer releases only groups it owns); tasks in them end."""
        running, dropped = self.local.release_group(group_id, now, owner)
        actions: list[Action] = []
        if running or dropped:
            actions.append(
                EndTasks(tuple(running), tuple(dropped), f"placement group {group_id} was removed")
            )
        return actions + self._started(self.local.dispatch(), now)
