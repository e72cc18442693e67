"""Placement policy: a sans-I/O function from (cluster snapshot, request) to a decision.

The policy never does I/O and never reads a clock: it is handed a :class:`ClusterSnapshot` (what
the submitter currently believes about the nodes: capacity and load as advertised, labels, where
argument objects live) and a :class:`PlacementRequest`, and returns a :class:`Decision`:

* ``PLACE`` on a node — send the task there (the node re-checks and may reject: spillback);
* ``WAIT`` — some node could run it, but none looks able to take it now (every sampled candidate
  is full and its queue is full): hold it and retry when ads change (backpressure);
* ``INFEASIBLE`` — no known node can *ever* satisfy the hard constraints.

How a node is chosen (strategy ``DEFAULT``):

1. *Feasibility* (hard): the node is alive, not excluded by an earlier rejection of this request,
   its total capacity covers the request, its labels match the selector, node affinity (hard) and
   ``local_only`` hold. The feasible set is cached per (demand, selector) until the membership or
   totals change, so a 1,000-node snapshot is scanned once per request shape, not per task.
2. *Candidates*: every feasible holder of an argument object, plus ``choices`` (default 2) nodes
   sampled uniformly from the feasible set (power-of-d choices).
3. *Estimated state*: the advertised availability and queue, minus what *this* policy placed there
   since the ad was made (anti-herding: a submitter never sends a burst to one node because it
   looked idle in a stale ad). Placements are forgotten once a newer ad covers them, when rejected,
   or after ``pending_max_age``.
4. *Locality first*: the holder with the most argument bytes wins if it can start the task now, or
   would queue it no deeper than ``locality_slack`` x the mesh's mean load, or than
   ``locality_queue`` tasks per CPU (so locality never piles work on one node). When every
   holder is full and the mesh is saturated (mean load >= 1) or no node looked at could start
   it now either, the request WAITs up to ``locality_delay`` seconds for a slot next to its data
   (delay scheduling) instead of queueing behind strangers far from it; when other nodes are
   free it waits up to ``locality_wait_free`` (default 0) when its arguments are at least
   ``locality_wait_min_bytes`` (moving them would cost more than the wait).
5. *Load*: otherwise the least loaded of the sampled nodes (free now beats queueing; then
   ``(running + queued + 1) / CPUs``); if none is free, ``extra_samples_when_full`` more are
   looked at before queueing, and in meshes of up to ``full_scan_limit`` feasible nodes every one
   is looked at before deciding to WAIT.

``SPREAD`` walks the feasible nodes round-robin (per submitter), taking the first that can start
the task now (else the least loaded of those looked at). ``NodeAffinity(node, soft=False)`` places
only on that node; with ``soft=True`` it falls back to ``DEFAULT`` when that node cannot take it.

Placement groups (PACK/SPREAD bundles) fit this shape later: a bundle is a request whose demand is
reserved (not run) on the chosen node under renamed resources (``CPU_group_<pg>``); PACK places
bundles one by one with the earlier bundles' node as a soft affinity, SPREAD with them excluded;
the tasks of the group then carry a hard affinity to their bundle's resources.
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .resources import CPU, Normalized, fits, normalize, shortfall

__all__ = [
    "DEFAULT",
    "SPREAD",
    "ClusterSnapshot",
    "Decision",
    "DecisionKind",
    "NodeAffinity",
    "NodeView",
    "ObjectInfo",
    "PlacementPolicy",
    "PlacementRequest",
    "labels_match",
]

DEFAULT = "DEFAULT"
SPREAD = "SPREAD"


@dataclass(frozen=True)
class NodeAffinity:
    """Place on ``node_id``; with ``soft`` fall back to DEFAULT when it cannot take the task."""

    node_id: str
    soft: bool = False


Strategy = str | NodeAffinity


@dataclass
class NodeView:
    """What a submitter believes about one node (from its latest capacity ad or a rejection hint)."""

    node_id: str
    total: dict[str, float]
    available: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    #: When the ad was made, on the submitter's clock (the snapshot builder converts).
    ad_time: float = 0.0
    #: The node's bounded queue size (None: unbounded).
    queue_limit: int | None = None
    alive: bool = True
    #: The node's own count of its state changes when it made this view (0: unknown). Views
    #: travel by different paths (pushes, answers, ads) and may arrive out of order: a view
    #: with a lower ``seq`` than the one held is older, whenever it arrived.
    seq: int = 0

    @property
    def cpu_slots(self) -> float:
        return max(self.total.get(CPU, 0.0), 1.0)


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size and the nodes known to hold it."""

    size: int
    holders: frozenset[str]


@dataclass
class PlacementRequest:
    """One task or actor to place. ``args`` are (cid, size) of by-reference arguments."""

    task_id: str
    resources: dict[str, float]
    submitter: str
    strategy: Strategy = DEFAULT
    label_selector: dict[str, str | Sequence[str]] = field(default_factory=dict)
    local_only: bool = False
    args: tuple[tuple[bytes | str, int], ...] = ()
    #: Nodes that rejected this request already (spillback hints); never chosen again.
    excluded: frozenset[str] = frozenset()
    #: When the submitter first tried to place it (for delay scheduling); set by the Submitter.
    submitted_at: float | None = None
    #: Who on the submitting node asked for it (a driver, a worker): the submitter's waiting
    #: requests are served round-robin over owners. Empty: the submitter itself.
    owner: str = ""
    #: A placement-group bundle to run in: (group id, bundle index, -1 for any bundle). The
    #: node re-checks the request against that bundle's reservation, not its free resources.
    bundle: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.resources, Normalized):
            self.resources = normalize(self.resources)


class DecisionKind(Enum):
    PLACE = "place"
    WAIT = "wait"
    INFEASIBLE = "infeasible"


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    node_id: str | None = None
    reason: str = ""
    #: Bytes of the request's arguments already on the chosen node.
    local_bytes: int = 0
    #: True when a feasible node holding argument bytes existed among the candidates.
    holder_available: bool = False
    #: The chosen node looked able to start it at once (False: it will queue there).
    room_now: bool = True


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str | Sequence[str]]) -> bool:
    """Equality per key; a list/tuple/set value means "one of these"."""
    for key, wanted in selector.items():
        have = labels.get(key)
        if isinstance(wanted, str):
            if have != wanted:
                return False
        elif have not in wanted:
            return False
    return True


def _selector_key(selector: Mapping[str, str | Sequence[str]]) -> tuple[object, ...]:
    return tuple(
        sorted((k, v if isinstance(v, str) else tuple(sorted(v))) for k, v in selector.items())
    )


class ClusterSnapshot:
    """A submitter's view of the mesh: node views and object locations.

    Load-only updates (same totals, labels and liveness) keep the feasibility cache; membership
    or capacity changes invalidate it. ``objects`` is used as given (not copied), so several
    snapshots on one node can share one table of object locations.
    """

    def __init__(
        self,
        nodes: Iterable[NodeView] = (),
        objects: dict[bytes | str, ObjectInfo] | None = None,
        local_node: str | None = None,
    ) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.objects: dict[bytes | str, ObjectInfo] = objects if objects is not None else {}
        self.local_node = local_node
        self.version = 0
        self._feasible_cache: dict[tuple[object, ...], list[str]] = {}
        self._load_sum = 0.0
        self._alive = 0
        for view in nodes:
            self.update_node(view)

    def update_node(self, view: NodeView) -> None:
        """Insert or replace a node's view; older ads than the one held are ignored."""
        old = self.nodes.get(view.node_id)
        if old is not None and (
            view.ad_time < old.ad_time or (view.seq and old.seq and view.seq < old.seq)
        ):
            return
        self.nodes[view.node_id] = view
        if old is not None:
            self._account(old, -1)
        self._account(view, +1)
        if (
            old is None
            or old.total != view.total
            or old.labels != view.labels
            or old.alive != view.alive
        ):
            self._invalidate()

    def remove_node(self, node_id: str) -> None:
        old = self.nodes.pop(node_id, None)
        if old is not None:
            self._account(old, -1)
            self._invalidate()

    def _account(self, view: NodeView, sign: int) -> None:
        if view.alive and view.total.get(CPU, 0.0) > 0:  # (a node without CPUs runs nothing)
            self._alive += sign
            self._load_sum += sign * (view.running + view.queued) / view.cpu_slots

    def mean_load(self) -> float:
        """Mean over live nodes with CPUs of (running + queued) per CPU, as advertised."""
        return max(0.0, self._load_sum / self._alive) if self._alive else 0.0

    def set_object(self, cid: bytes | str, size: int, holders: Iterable[str]) -> None:
        self.objects[cid] = ObjectInfo(int(size), frozenset(holders))

    def _invalidate(self) -> None:
        self.version += 1
        self._feasible_cache.clear()

    def feasible_nodes(
        self, demand: Mapping[str, float], selector: Mapping[str, str | Sequence[str]]
    ) -> list[str]:
        """Alive nodes whose *total* capacity and labels satisfy the request (sorted ids)."""
        key = (tuple(sorted(demand.items())), _selector_key(selector))
        cached = self._feasible_cache.get(key)
        if cached is None:
            cached = sorted(
                n.node_id
                for n in self.nodes.values()
                if n.alive and fits(n.total, demand) and labels_match(n.labels, selector)
            )
            self._feasible_cache[key] = cached
        return cached


@dataclass
class _Pending:
    """Placements this policy made to one node that its latest ad may not show yet."""

    #: task id -> (placed at, demand, expected to queue there)
    entries: OrderedDict[str, tuple[float, dict[str, float], bool]] = field(
        default_factory=OrderedDict
    )
    resources: dict[str, float] = field(default_factory=dict)
    queued: int = 0

    def add(self, task_id: str, now: float, demand: Mapping[str, float], queues: bool) -> None:
        self.remove(task_id)
        self.entries[task_id] = (now, dict(demand), queues)
        self.queued += queues
        if not queues:
            for k, v in demand.items():
                self.resources[k] = self.resources.get(k, 0.0) + v

    def remove(self, task_id: str) -> None:
        entry = self.entries.pop(task_id, None)
        if entry is not None:
            self._subtract(entry)

    def prune(self, covered_before: float, expired_before: float) -> None:
        cutoff = max(covered_before, expired_before)
        while self.entries:
            placed_at = next(iter(self.entries.values()))[0]
            if placed_at >= cutoff:
                break
            self._subtract(self.entries.popitem(last=False)[1])

    def _subtract(self, entry: tuple[float, dict[str, float], bool]) -> None:
        _placed_at, demand, queues = entry
        self.queued -= queues
        if queues:
            return
        for k, v in demand.items():
            left = self.resources.get(k, 0.0) - v
            if left <= 1e-9:
                self.resources.pop(k, None)
            else:
                self.resources[k] = left


@dataclass
class _Estimate:
    node: NodeView
    room_now: bool
    queue_space: bool
    load_after: float
    local_bytes: int


class PlacementPolicy:
    """Chooses nodes for requests; holds only anti-herding memory and a seeded RNG.

    ``settle_time`` is how long after a placement an ad must be made to be trusted to include it
    (about one network round trip); ``pending_max_age`` drops memory of placements whose node
    stopped advertising.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        choices: int = 2,
        locality_slack: float = 1.3,
        settle_time: float = 0.05,
        pending_max_age: float = 30.0,
        extra_samples_when_full: int = 8,
        locality_delay: float = 5.0,
        full_scan_limit: int = 128,
        locality_wait_free: float = 0.0,
        locality_queue: float = 1.0,
        locality_wait_min_bytes: int = 1 << 20,
    ) -> None:
        if choices < 1:
            raise ValueError("choices must be >= 1")
        self.rng = random.Random(seed)
        self.choices = choices
        self.locality_slack = locality_slack
        self.settle_time = settle_time
        self.pending_max_age = pending_max_age
        self.extra_samples_when_full = extra_samples_when_full
        self.locality_delay = locality_delay
        self.locality_wait_free = locality_wait_free
        self.locality_queue = locality_queue
        self.locality_wait_min_bytes = locality_wait_min_bytes
        self.full_scan_limit = full_scan_limit
        self._pending: dict[str, _Pending] = {}
        self._spread_cursor: dict[tuple[object, ...], int] = {}

    # anti-herding memory -----------------------------------------------------------------------
    def forget(self, task_id: str, node_id: str) -> None:
        """The node rejected (or finished accounting for) ``task_id``: drop it from the estimate."""
        pending = self._pending.get(node_id)
        if pending is not None:
            pending.remove(task_id)

    def pending_count(self, node_id: str) -> int:
        pending = self._pending.get(node_id)
        return len(pending.entries) if pending else 0

    def _estimate(
        self, view: NodeView, request: PlacementRequest, now: float, snapshot: ClusterSnapshot
    ) -> _Estimate:
        pending = self._pending.get(view.node_id)
        available = view.available
        extra_tasks = extra_queued = 0
        if pending is not None:
            pending.prune(view.ad_time - self.settle_time, now - self.pending_max_age)
            if pending.entries:
                extra_tasks = len(pending.entries)
                extra_queued = pending.queued
                available = {
                    k: v - pending.resources.get(k, 0.0) for k, v in view.available.items()
                }
        room_now = fits(available, request.resources)
        queued = view.queued + extra_queued
        queue_space = room_now or view.queue_limit is None or queued < view.queue_limit
        load_after = (view.running + view.queued + extra_tasks + 1) / view.cpu_slots
        return _Estimate(
            view,
            room_now,
            queue_space,
            load_after,
            self._local_bytes(view.node_id, request, snapshot),
        )

    @staticmethod
    def _args_bytes(request: PlacementRequest) -> int:
        return sum(size for _cid, size in request.args)

    @staticmethod
    def _local_bytes(node_id: str, request: PlacementRequest, snapshot: ClusterSnapshot) -> int:
        total = 0
        for cid, size in request.args:
            info = snapshot.objects.get(cid)
            if info is not None and node_id in info.holders:
                total += size
        return total

    def _record(self, node_id: str, request: PlacementRequest, now: float, queues: bool) -> None:
        self._pending.setdefault(node_id, _Pending()).add(
            request.task_id, now, request.resources, queues
        )

    # placement ---------------------------------------------------------------------------------
    def place(self, snapshot: ClusterSnapshot, request: PlacementRequest, now: float) -> Decision:
        """Decide where ``request`` goes. A PLACE decision is remembered for anti-herding."""
        decision = self._decide(snapshot, request, now)
        if decision.kind is DecisionKind.PLACE:
            assert decision.node_id is not None
            self._record(decision.node_id, request, now, queues=not decision.room_now)
        return decision

    def _decide(self, snapshot: ClusterSnapshot, request: PlacementRequest, now: float) -> Decision:
        strategy = request.strategy
        if request.local_only:
            if snapshot.local_node is None:
                return Decision(
                    DecisionKind.INFEASIBLE, reason="local_only requested but no local node"
                )
            strategy = NodeAffinity(snapshot.local_node, soft=False)
        if isinstance(strategy, NodeAffinity):
            return self._place_affinity(snapshot, request, strategy, now)
        if strategy == SPREAD:
            return self._place_spread(snapshot, request, now)
        if strategy == DEFAULT:
            return self._place_default(snapshot, request, now)
        return Decision(DecisionKind.INFEASIBLE, reason=f"unknown scheduling strategy {strategy!r}")

    def _infeasible_reason(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> str:
        alive = [n for n in snapshot.nodes.values() if n.alive]
        if not alive:
            return "no live node is known"
        by_labels = [n for n in alive if labels_match(n.labels, request.label_selector)]
        if not by_labels:
            return f"no node has labels {request.label_selector}"
        best = min(by_labels, key=lambda n: len(shortfall(n.total, request.resources)))
        short = shortfall(best.total, request.resources)
        if short:
            return (
                f"no node has total capacity for {request.resources} "
                f"(closest, {best.node_id}, lacks {short})"
            )
        return "no feasible node"

    def _no_candidate(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> Decision:
        """No feasible node is left: WAIT if only rejections ruled them out, else INFEASIBLE."""
        if snapshot.feasible_nodes(request.resources, request.label_selector):
            return Decision(
                DecisionKind.WAIT,
                reason=f"every feasible node rejected this request ({len(request.excluded)})",
            )
        return Decision(DecisionKind.INFEASIBLE, reason=self._infeasible_reason(snapshot, request))

    def _feasible(self, snapshot: ClusterSnapshot, request: PlacementRequest) -> list[str]:
        """Feasible node ids. Exclusions are filtered here only when they are a sizeable part of
        the list; otherwise callers skip them while sampling (cheaper on a 1,000-node list)."""
        nodes = snapshot.feasible_nodes(request.resources, request.label_selector)
        if request.excluded and len(nodes) <= 4 * len(request.excluded) + 64:
            nodes = [n for n in nodes if n not in request.excluded]
        return nodes

    def _node_feasible(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, node_id: str
    ) -> bool:
        view = snapshot.nodes.get(node_id)
        return (
            view is not None
            and view.alive
            and node_id not in request.excluded
            and fits(view.total, request.resources)
            and labels_match(view.labels, request.label_selector)
        )

    def _holders(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, ignore_excluded: bool = False
    ) -> set[str]:
        holders: set[str] = set()
        for cid, _size in request.args:
            info = snapshot.objects.get(cid)
            if info is not None:
                holders.update(info.holders)
        if ignore_excluded and request.excluded:
            request = dataclasses.replace(request, excluded=frozenset())
        return {h for h in holders if self._node_feasible(snapshot, request, h)}

    def _sample(self, feasible: list[str], count: int, taken: set[str]) -> list[str]:
        if len(feasible) <= count + len(taken):
            return [n for n in feasible if n not in taken]
        out: list[str] = []
        tries = 0
        while len(out) < count and tries < 4 * count + 8:
            tries += 1
            node = feasible[self.rng.randrange(len(feasible))]
            if node not in taken:
                taken.add(node)
                out.append(node)
        return out

    @staticmethod
    def _least_loaded(estimates: list[_Estimate]) -> _Estimate | None:
        usable = [e for e in estimates if e.queue_space]
        if not usable:
            return None
        return min(usable, key=lambda e: (not e.room_now, e.load_after, e.node.node_id))

    def _place_default(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, now: float
    ) -> Decision:
        feasible = self._feasible(snapshot, request)
        if not feasible:
            return self._no_candidate(snapshot, request)
        holders = sorted(self._holders(snapshot, request))
        holder_estimates = [
            self._estimate(snapshot.nodes[n], request, now, snapshot) for n in holders
        ]
        # Locality: a holder that can start it now, or would queue it no deeper than
        # locality_slack x the mesh's mean load, wins; most argument bytes first.
        limit = max(self.locality_queue, self.locality_slack * snapshot.mean_load())
        local = [
            e for e in holder_estimates if e.room_now or (e.queue_space and e.load_after <= limit)
        ]
        if local:
            nearest = min(
                local, key=lambda e: (-e.local_bytes, not e.room_now, e.load_after, e.node.node_id)
            )
            return Decision(
                DecisionKind.PLACE,
                nearest.node.node_id,
                reason="locality",
                local_bytes=nearest.local_bytes,
                holder_available=True,
                room_now=nearest.room_now,
            )
        has_holder = bool(holders) or bool(self._holders(snapshot, request, ignore_excluded=True))
        waited = None if request.submitted_at is None else now - request.submitted_at
        if (
            has_holder
            and waited is not None
            and waited < self.locality_delay
            and snapshot.mean_load() >= 1.0
        ):
            # Delay scheduling: the mesh is saturated and the holders are full; waiting a little
            # for a slot next to the data beats queueing behind strangers far from it.
            return Decision(
                DecisionKind.WAIT,
                reason="waiting for a node that holds the arguments",
                holder_available=True,
            )
        # Load: power-of-d choices among sampled nodes (busy holders still compete on load).
        taken = set(holders) | request.excluded
        sampled = [
            self._estimate(snapshot.nodes[n], request, now, snapshot)
            for n in self._sample(feasible, self.choices, taken)
        ]
        best = self._least_loaded(holder_estimates + sampled)
        if best is None or not best.room_now:
            # Everyone sampled is busy: look a little wider before queueing behind them.
            more = [
                self._estimate(snapshot.nodes[n], request, now, snapshot)
                for n in self._sample(feasible, self.extra_samples_when_full, taken)
            ]
            free = [e for e in more if e.room_now]
            best = self._least_loaded(([best] if best else []) + (free or more))
            if best is None and len(feasible) <= self.full_scan_limit:
                # Small mesh: before waiting, make sure no feasible node at all can take it.
                rest = [
                    self._estimate(snapshot.nodes[n], request, now, snapshot)
                    for n in feasible
                    if n not in taken
                ]
                best = self._least_loaded(rest)
        if best is None:
            return Decision(
                DecisionKind.WAIT,
                reason="every candidate node is full and its queue is full",
                holder_available=bool(holders),
            )
        if (
            has_holder
            and waited is not None
            and waited < (self.locality_delay if not best.room_now else self.locality_wait_free)
            and self._args_bytes(request) >= self.locality_wait_min_bytes
        ):
            # The holders are busy: no node looked at can start it now (or, with free nodes,
            # within locality_wait_free): wait for a slot next to the data rather than queue
            # behind strangers far from it.
            return Decision(
                DecisionKind.WAIT,
                reason="waiting for a node that holds the arguments",
                holder_available=True,
            )
        return Decision(
            DecisionKind.PLACE,
            best.node.node_id,
            reason="free" if best.room_now else "queued",
            local_bytes=best.local_bytes,
            holder_available=bool(holders),
            room_now=best.room_now,
        )

    def _place_spread(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, now: float
    ) -> Decision:
        feasible = self._feasible(snapshot, request)
        if not feasible:
            return self._no_candidate(snapshot, request)
        key = (
            request.submitter,
            tuple(sorted(request.resources.items())),
            _selector_key(request.label_selector),
        )
        start = self._spread_cursor.get(key, 0)
        looked: list[_Estimate] = []
        for i in range(min(len(feasible), 32)):
            node_id = feasible[(start + i) % len(feasible)]
            if node_id in request.excluded:
                continue
            estimate = self._estimate(snapshot.nodes[node_id], request, now, snapshot)
            looked.append(estimate)
            if estimate.room_now:
                self._spread_cursor[key] = (start + i + 1) % len(feasible)
                return Decision(
                    DecisionKind.PLACE, node_id, reason="spread", local_bytes=estimate.local_bytes
                )
        queue_ok = [e for e in looked if e.queue_space]
        if not queue_ok:
            return Decision(
                DecisionKind.WAIT, reason="every node looked at is full and its queue is full"
            )
        best = min(queue_ok, key=lambda e: (e.load_after, e.node.node_id))
        self._spread_cursor[key] = (feasible.index(best.node.node_id) + 1) % len(feasible)
        return Decision(
            DecisionKind.PLACE,
            best.node.node_id,
            reason="spread (queued)",
            local_bytes=best.local_bytes,
            room_now=False,
        )

    def _place_affinity(
        self,
        snapshot: ClusterSnapshot,
        request: PlacementRequest,
        strategy: NodeAffinity,
        now: float,
    ) -> Decision:
        target = strategy.node_id
        if self._node_feasible(snapshot, request, target):
            estimate = self._estimate(snapshot.nodes[target], request, now, snapshot)
            if estimate.room_now or estimate.queue_space:
                return Decision(
                    DecisionKind.PLACE,
                    target,
                    reason="node affinity",
                    local_bytes=estimate.local_bytes,
                    room_now=estimate.room_now,
                )
            if not strategy.soft:
                return Decision(DecisionKind.WAIT, reason=f"affinity node {target} is full")
        elif not strategy.soft:
            view = snapshot.nodes.get(target)
            if view is None or not view.alive:
                why = f"affinity node {target} is not a live member"
            elif target in request.excluded:
                return Decision(
                    DecisionKind.WAIT, reason=f"affinity node {target} rejected the request"
                )
            elif not labels_match(view.labels, request.label_selector):
                why = f"affinity node {target} does not have labels {request.label_selector}"
            else:
                why = (
                    f"affinity node {target} lacks {shortfall(view.total, request.resources)} "
                    f"even when idle"
                )
            return Decision(DecisionKind.INFEASIBLE, reason=why)
        return self._place_default(snapshot, request, now)
