"""Placement groups: bundles of resources reserved atomically across nodes (sans-I/O).

A placement group is a list of *bundles* (resource maps) and a strategy (Ray's four):

* ``PACK`` — as few nodes as possible (one if one fits them all), else spread over more;
* ``STRICT_PACK`` — all bundles on one node, or the group waits;
* ``SPREAD`` — each bundle on a different node where possible, else the least used;
* ``STRICT_SPREAD`` — each bundle on a different node, or the group waits.

Three pieces, none of which does I/O or reads a clock:

* :func:`plan_bundles` chooses a node per bundle from a :class:`ClusterSnapshot` (what is free
  now, as advertised), or says why it cannot yet.
* :class:`GroupCoordinator` runs at the group's owner: a two-phase claim. It sends
  :class:`PrepareBundle` to every chosen node (each reserves the bundle's resources under a lease
  or refuses with a fresh view); when every bundle is prepared it sends :class:`CommitBundle`
  (the reservation becomes permanent) and the group is ``CREATED``; if any refuses, fails or does
  not answer within ``prepare_timeout`` it sends :class:`AbortBundle` to the others and plans
  again after ``retry_interval`` with the refusals' views. A group no known node set can hold
  stays ``PENDING`` (and is placed when a node that fits joins). ``remove`` releases everything.
  A bundle whose node dies is planned again (``RESCHEDULING``).
* :class:`BundleReservations` runs on every node: the bundles it holds, each a
  :class:`~latticaray.scheduler.resources.ResourceLedger` over the resources its reservation took
  from the node's ledger (tasks of the bundle acquire from it, GPU ids among the bundle's
  devices). Prepared reservations expire at their lease (an owner that died mid-claim leaves
  nothing behind); committed ones last until released by the owner or the owner's death.

The lifecycle of a group is :class:`GroupState` with the transition table ``GROUP_TRANSITIONS``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from .errors import InsufficientResources, ResourceError, SchedulerError
from .policy import ClusterSnapshot, NodeView, labels_match
from .resources import Allocation, ResourceLedger, fits, normalize, total_of

__all__ = [
    "GROUP_TRANSITIONS",
    "PACK",
    "SPREAD",
    "STRATEGIES",
    "STRICT_PACK",
    "STRICT_SPREAD",
    "AbortBundle",
    "BundleReply",
    "BundleReservations",
    "CommitBundle",
    "GroupCoordinator",
    "GroupCreated",
    "GroupEvent",
    "GroupPending",
    "GroupState",
    "IllegalGroupTransition",
    "PlacementGroupError",
    "PrepareBundle",
    "ReleaseGroup",
    "plan_bundles",
    "validate_bundles",
]

PACK: Final = "PACK"
SPREAD: Final = "SPREAD"
STRICT_PACK: Final = "STRICT_PACK"
STRICT_SPREAD: Final = "STRICT_SPREAD"
STRATEGIES: Final = (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)

MAX_BUNDLES = 1024


class PlacementGroupError(SchedulerError, ValueError):
    """A placement group is malformed (no bundles, empty bundle, unknown strategy...)."""


def validate_bundles(bundles: Sequence[Mapping[str, float]], strategy: str) -> list[dict]:
    """Normalized bundles, or :class:`PlacementGroupError` saying what is wrong."""
    if strategy not in STRATEGIES:
        raise PlacementGroupError(
            f"unknown placement strategy {strategy!r}: use one of {', '.join(STRATEGIES)}"
        )
    if not isinstance(bundles, (list, tuple)) or not bundles:
        raise PlacementGroupError("a placement group needs a non-empty list of bundles")
    if len(bundles) > MAX_BUNDLES:
        raise PlacementGroupError(f"at most {MAX_BUNDLES} bundles per placement group")
    out = []
    for i, bundle in enumerate(bundles):
        if not isinstance(bundle, Mapping):
            raise PlacementGroupError(f"bundle {i} must be a dict of resources, got {bundle!r}")
        try:
            normalized = normalize(bundle)
        except ResourceError as exc:
            raise PlacementGroupError(f"bundle {i}: {exc}") from exc
        if not normalized:
            raise PlacementGroupError(f"bundle {i} reserves nothing ({dict(bundle)!r})")
        out.append(normalized)
    return out


# planning -------------------------------------------------------------------------------------


def _room(view: NodeView, taken: Mapping[str, float]) -> dict[str, float]:
    return {k: v - taken.get(k, 0.0) for k, v in view.available.items()}


def _take(taken: dict[str, float], bundle: Mapping[str, float]) -> None:
    for k, v in bundle.items():
        taken[k] = taken.get(k, 0.0) + v


def plan_bundles(
    snapshot: ClusterSnapshot,
    bundles: Sequence[Mapping[str, float]],
    strategy: str,
    *,
    fixed: Mapping[int, str] | None = None,
    excluded: frozenset[str] = frozenset(),
    selector: Mapping[str, str] | None = None,
) -> tuple[dict[int, str] | None, str]:
    """A node for every bundle not in ``fixed`` (already placed), or (None, why not).

    Plans on what nodes advertise as free now (reservations need room now); nodes of
    ``excluded`` (refused this round) are skipped. Deterministic for a given snapshot: among
    equals the least loaded, then the smallest id.
    """
    fixed = dict(fixed or {})
    todo = [i for i in range(len(bundles)) if i not in fixed]
    nodes = [
        v
        for v in snapshot.nodes.values()
        if v.alive and v.node_id not in excluded and labels_match(v.labels, selector or {})
    ]
    nodes.sort(key=lambda v: ((v.running + v.queued) / v.cpu_slots, v.node_id))
    taken: dict[str, dict[str, float]] = {v.node_id: {} for v in nodes}
    by_id = {v.node_id: v for v in nodes}
    used = set(fixed.values())
    plan: dict[int, str] = {}
    if not todo:
        return plan, ""
    if not nodes:
        return None, "no live node is known"

    def fits_on(node_id: str, bundle: Mapping[str, float]) -> bool:
        view = by_id.get(node_id)
        return view is not None and fits(_room(view, taken[node_id]), bundle)

    if strategy in (PACK, STRICT_PACK):
        anchor = next(iter(used), None)
        need = total_of(bundles[i] for i in todo)
        one = [v.node_id for v in nodes if fits(v.available, need)]
        if anchor is not None and anchor in by_id and fits_on(anchor, need):
            one = [anchor]
        if strategy == STRICT_PACK:
            if anchor is not None and used != {anchor}:
                return None, "STRICT_PACK bundles are on several nodes"
            if anchor is not None:
                one = [anchor] if anchor in by_id and fits_on(anchor, need) else []
            if not one:
                return None, f"no node has {need} free for every bundle (STRICT_PACK)"
            return dict.fromkeys(todo, one[0]), ""
        if one:
            return dict.fromkeys(todo, one[0]), ""
        # first fit, largest bundles first, onto nodes already used before new ones
        order = sorted(todo, key=lambda i: -sum(bundles[i].values()))
        for i in order:
            choices = [n for n in (*used, *by_id) if n in by_id]
            target = next((n for n in choices if fits_on(n, bundles[i])), None)
            if target is None:
                return None, f"no node has {dict(bundles[i])} free for bundle {i} (PACK)"
            plan[i] = target
            used.add(target)
            _take(taken[target], bundles[i])
        return plan, ""
    # SPREAD / STRICT_SPREAD: a different node per bundle
    count: dict[str, int] = dict.fromkeys(by_id, 0)
    for n in used:
        if n in count:
            count[n] += 1
    for i in todo:
        fresh = [n for n in by_id if count[n] == 0 and fits_on(n, bundles[i])]
        if fresh:
            target = fresh[0]
        elif strategy == STRICT_SPREAD:
            return None, (
                f"bundle {i} ({dict(bundles[i])}) needs a node no other bundle of the group "
                f"uses, and none with room is known (STRICT_SPREAD)"
            )
        else:
            reuse = [n for n in by_id if fits_on(n, bundles[i])]
            if not reuse:
                return None, f"no node has {dict(bundles[i])} free for bundle {i} (SPREAD)"
            target = min(reuse, key=lambda n: (count[n], n))
        plan[i] = target
        count[target] += 1
        _take(taken[target], bundles[i])
    return plan, ""


# the owner's two-phase claim -------------------------------------------------------------------


class GroupState(enum.Enum):
    PENDING = "pending"  # waiting for nodes that can hold it
    PREPARING = "preparing"  # reservations asked for, answers awaited
    CREATED = "created"  # every bundle committed
    RESCHEDULING = "rescheduling"  # a bundle's node died: that bundle is being placed again
    REMOVED = "removed"  # released by its owner (terminal)


class GroupEvent(enum.Enum):
    PLAN = "plan"  # a plan was made: prepare requests sent
    REFUSED = "refused"  # a prepare was refused, failed or timed out: abort, wait, plan again
    COMMIT = "commit"  # every bundle prepared: commit
    NODE_LOST = "node_lost"  # a node holding committed bundles died
    REMOVE = "remove"


GROUP_TRANSITIONS: Final[Mapping[GroupState, Mapping[GroupEvent, GroupState]]] = {
    GroupState.PENDING: {
        GroupEvent.PLAN: GroupState.PREPARING,
        GroupEvent.REMOVE: GroupState.REMOVED,
    },
    GroupState.PREPARING: {
        GroupEvent.REFUSED: GroupState.PENDING,
        GroupEvent.COMMIT: GroupState.CREATED,
        GroupEvent.REMOVE: GroupState.REMOVED,
    },
    GroupState.CREATED: {
        GroupEvent.NODE_LOST: GroupState.RESCHEDULING,
        GroupEvent.REMOVE: GroupState.REMOVED,
    },
    GroupState.RESCHEDULING: {
        GroupEvent.PLAN: GroupState.PREPARING,
        GroupEvent.NODE_LOST: GroupState.RESCHEDULING,
        GroupEvent.REMOVE: GroupState.REMOVED,
    },
    GroupState.REMOVED: {},
}


class IllegalGroupTransition(SchedulerError):
    pass


def group_transition(state: GroupState, event: GroupEvent) -> GroupState:
    try:
        return GROUP_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalGroupTransition(
            f"placement group: no move {event.value} from {state.value}"
        ) from None


@dataclass(frozen=True)
class PrepareBundle:
    """Reserve ``resources`` on ``node_id`` for bundle ``index`` until ``lease`` s from receipt."""

    node_id: str
    group_id: str
    index: int
    resources: dict[str, float]
    owner: str
    lease: float
    attempt: int


@dataclass(frozen=True)
class CommitBundle:
    node_id: str
    group_id: str
    index: int
    attempt: int


@dataclass(frozen=True)
class AbortBundle:
    node_id: str
    group_id: str
    index: int
    attempt: int


@dataclass(frozen=True)
class ReleaseGroup:
    """Release every bundle of the group that ``node_id`` holds."""

    node_id: str
    group_id: str


@dataclass(frozen=True)
class GroupCreated:
    """Every bundle is committed: ``nodes[i]`` holds bundle ``i`` (record it, wake waiters)."""

    group_id: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class GroupPending:
    """The group cannot be placed now (logged once per reason change)."""

    group_id: str
    reason: str


@dataclass(frozen=True)
class BundleReply:
    """A node's answer to a prepare or commit: ``ok``, or why not with its current view."""

    group_id: str
    index: int
    attempt: int
    ok: bool
    reason: str = ""
    hint: NodeView | None = None


GroupAction = (
    PrepareBundle | CommitBundle | AbortBundle | ReleaseGroup | GroupCreated | GroupPending
)


@dataclass
class _Round:
    attempt: int
    plan: dict[int, str]
    started: float
    prepared: set[int] = field(default_factory=set)


class GroupCoordinator:
    """The owner's side of one placement group: plans, prepares, commits, re-plans, removes."""

    def __init__(
        self,
        group_id: str,
        bundles: Sequence[Mapping[str, float]],
        strategy: str,
        owner: str,
        *,
        prepare_timeout: float = 5.0,
        lease: float = 10.0,
        retry_interval: float = 0.5,
        selector: Mapping[str, str] | None = None,
    ) -> None:
        self.group_id = group_id
        self.bundles = validate_bundles(bundles, strategy)
        self.strategy = strategy
        self.owner = owner
        self.prepare_timeout = prepare_timeout
        self.lease = lease
        self.retry_interval = retry_interval
        self.selector = dict(selector or {})
        self.state = GroupState.PENDING
        #: bundle index -> node holding it (committed)
        self.nodes: dict[int, str] = {}
        self.reason = "not planned yet"
        self._attempt = 0
        self._round: _Round | None = None
        self._not_before = 0.0
        self._refused: set[str] = set()
        self._reported: str | None = None

    def _move(self, event: GroupEvent) -> None:
        self.state = group_transition(self.state, event)

    @property
    def created(self) -> bool:
        return self.state is GroupState.CREATED

    def next_wakeup(self, now: float) -> float | None:
        if self.state in (GroupState.PENDING, GroupState.RESCHEDULING):
            return max(now, self._not_before)
        if self._round is not None:
            return self._round.started + self.prepare_timeout
        return None

    def poll(self, snapshot: ClusterSnapshot, now: float) -> list[GroupAction]:
        """Plan when waiting (and not backing off); time out a round whose answers are late."""
        if self.state in (GroupState.PENDING, GroupState.RESCHEDULING):
            if now < self._not_before:
                return []
            return self._plan(snapshot, now)
        rnd = self._round
        if rnd is not None and now - rnd.started >= self.prepare_timeout:
            missing = sorted(set(rnd.plan) - rnd.prepared)
            return self._give_up(now, f"no answer from {[rnd.plan[i] for i in missing]}")
        return []

    def _plan(self, snapshot: ClusterSnapshot, now: float) -> list[GroupAction]:
        plan, why = plan_bundles(
            snapshot,
            self.bundles,
            self.strategy,
            fixed=self.nodes,
            excluded=frozenset(self._refused),
            selector=self.selector,
        )
        self._refused.clear()
        if plan is None:
            self.reason = why
            self._not_before = now + self.retry_interval
            if why != self._reported:
                self._reported = why
                return [GroupPending(self.group_id, why)]
            return []
        self._attempt += 1
        self._move(GroupEvent.PLAN)
        self._round = _Round(self._attempt, plan, now)
        if not plan:  # nothing left to place (re-planning found every bundle placed)
            return self._commit()
        return [
            PrepareBundle(
                node, self.group_id, i, dict(self.bundles[i]), self.owner, self.lease, self._attempt
            )
            for i, node in sorted(plan.items())
        ]

    def on_reply(self, reply: BundleReply, now: float) -> list[GroupAction]:
        """A node answered a prepare of the current round (late or foreign answers ignored)."""
        rnd = self._round
        if rnd is None or reply.attempt != rnd.attempt or reply.index not in rnd.plan:
            return []
        if not reply.ok:
            node = rnd.plan[reply.index]
            self._refused.add(node)
            return self._give_up(now, f"node {node} refused bundle {reply.index}: {reply.reason}")
        rnd.prepared.add(reply.index)
        if rnd.prepared == set(rnd.plan):
            return self._commit()
        return []

    def on_send_failed(self, index: int, attempt: int, now: float) -> list[GroupAction]:
        rnd = self._round
        if rnd is None or attempt != rnd.attempt or index not in rnd.plan:
            return []
        node = rnd.plan[index]
        self._refused.add(node)
        return self._give_up(now, f"node {node} unreachable for bundle {index}")

    def _give_up(self, now: float, why: str) -> list[GroupAction]:
        rnd = self._round
        assert rnd is not None
        self._round = None
        self._move(GroupEvent.REFUSED)
        self.reason = why
        self._not_before = now + self.retry_interval
        # abort every reservation of the round, answered or not (a late prepare is undone too)
        return [AbortBundle(node, self.group_id, i, rnd.attempt) for i, node in rnd.plan.items()]

    def _commit(self) -> list[GroupAction]:
        rnd = self._round
        assert rnd is not None
        self._round = None
        self.nodes.update(rnd.plan)
        self._move(GroupEvent.COMMIT)
        self.reason = ""
        self._reported = None
        actions: list[GroupAction] = [
            CommitBundle(node, self.group_id, i, rnd.attempt)
            for i, node in sorted(rnd.plan.items())
        ]
        actions.append(
            GroupCreated(self.group_id, tuple(self.nodes[i] for i in range(len(self.bundles))))
        )
        return actions

    def node_gone(self, node_id: str, now: float) -> list[GroupAction]:
        """A node died: its committed bundles are placed again; a round using it gives up."""
        actions: list[GroupAction] = []
        rnd = self._round
        if rnd is not None and node_id in rnd.plan.values():
            actions += self._give_up(now, f"node {node_id} died while the group was being placed")
        lost = [i for i, n in self.nodes.items() if n == node_id]
        if lost and self.state in (GroupState.CREATED, GroupState.RESCHEDULING):
            for i in lost:
                del self.nodes[i]
            if self.strategy == STRICT_PACK:
                # all on one node: the survivors (none) and the lost ones are placed together
                for node in set(self.nodes.values()):
                    actions.append(ReleaseGroup(node, self.group_id))
                self.nodes.clear()
            self._move(GroupEvent.NODE_LOST)
            self._not_before = now
        elif lost:
            for i in lost:
                del self.nodes[i]
        return actions

    def remove(self) -> list[GroupAction]:
        """Release everything held or asked for (idempotent)."""
        if self.state is GroupState.REMOVED:
            return []
        nodes = set(self.nodes.values())
        if self._round is not None:
            nodes |= set(self._round.plan.values())
        self._round = None
        self._move(GroupEvent.REMOVE)
        return [ReleaseGroup(node, self.group_id) for node in sorted(nodes)]

    def bundle_node(self, index: int) -> str | None:
        return self.nodes.get(index)


# node side ------------------------------------------------------------------------------------


@dataclass
class _Reservation:
    group_id: str
    index: int
    owner: str
    allocation: Allocation
    attempt: int
    expires: float | None  # None once committed
    ledger: ResourceLedger


def _alloc_id(group_id: str, index: int) -> str:
    return f"pg:{group_id}:{index}"


class BundleReservations:
    """The bundles one node holds, over that node's :class:`ResourceLedger`."""

    def __init__(self, ledger: ResourceLedger, node_id: str = "") -> None:
        self.ledger = ledger
        self.node_id = node_id
        self._bundles: dict[tuple[str, int], _Reservation] = {}
        self.version = 0
        #: called with (group id, index) when a reservation ends (released, expired, aborted):
        #: the runtime ends what it ran in the bundle
        self.on_drop: Callable[[str, int], None] | None = None

    def __len__(self) -> int:
        return len(self._bundles)

    def groups(self) -> set[str]:
        return {g for g, _ in self._bundles}

    def prepare(
        self,
        group_id: str,
        index: int,
        resources: Mapping[str, float],
        owner: str,
        attempt: int,
        lease: float,
        now: float,
    ) -> tuple[bool, str]:
        """Reserve a bundle until ``now + lease`` unless committed. A repeat of the same
        attempt is answered again; a newer attempt replaces an uncommitted older one."""
        key = (group_id, index)
        held = self._bundles.get(key)
        if held is not None:
            if held.expires is None:
                return False, f"bundle {index} of {group_id} is already committed here"
            if held.attempt == attempt:
                return True, "prepared (again)"
            self._drop(key)
        try:
            allocation = self.ledger.acquire(_alloc_id(group_id, index), resources, owner=None)
        except InsufficientResources as exc:
            return False, str(exc)
        except ResourceError as exc:
            return False, str(exc)
        self._bundles[key] = _Reservation(
            group_id,
            index,
            owner,
            allocation,
            attempt,
            now + lease,
            ResourceLedger.for_allocation(allocation),
        )
        self.version += 1
        return True, "prepared"

    def commit(
        self, group_id: str, index: int, attempt: int, owner: str | None = None
    ) -> tuple[bool, str]:
        held = self._bundles.get((group_id, index))
        if held is None or held.attempt != attempt or (owner is not None and held.owner != owner):
            return False, f"bundle {index} of {group_id} is not prepared here (lease expired?)"
        held.expires = None
        self.version += 1
        return True, "committed"

    def abort(self, group_id: str, index: int, attempt: int, owner: str | None = None) -> bool:
        held = self._bundles.get((group_id, index))
        if held is None or held.attempt != attempt or held.expires is None:
            return False
        if owner is not None and held.owner != owner:
            return False
        self._drop((group_id, index))
        return True

    def release_group(self, group_id: str, owner: str | None = None) -> list[_Reservation]:
        """Release every bundle of the group here (only ``owner``'s, when given); returns them
        (their tasks must end)."""
        out = [
            r
            for k, r in self._bundles.items()
            if k[0] == group_id and (owner is None or r.owner == owner)
        ]
        for r in out:
            self._drop((r.group_id, r.index))
        return out

    def release_owner(self, owner: str) -> list[_Reservation]:
        """The owner died: release every bundle it reserved here (committed or not)."""
        out = [r for r in self._bundles.values() if r.owner == owner]
        for r in out:
            self._drop((r.group_id, r.index))
        return out

    def expire(self, now: float) -> list[_Reservation]:
        """Prepared reservations whose lease passed without a commit (the owner vanished)."""
        out = [r for r in self._bundles.values() if r.expires is not None and now >= r.expires]
        for r in out:
            self._drop((r.group_id, r.index))
        return out

    def next_expiry(self) -> float | None:
        times = [r.expires for r in self._bundles.values() if r.expires is not None]
        return min(times) if times else None

    def ledger_for(self, group_id: str, index: int) -> ResourceLedger | None:
        """The ledger of a committed bundle (None: not held here, or only prepared)."""
        held = self._bundles.get((group_id, index))
        if held is None or held.expires is not None:
            return None
        return held.ledger

    def indexes(self, group_id: str) -> list[int]:
        return sorted(
            i for (g, i), r in self._bundles.items() if g == group_id and r.expires is None
        )

    def _drop(self, key: tuple[str, int]) -> None:
        held = self._bundles.pop(key)
        self.ledger.release(held.allocation.allocation_id)
        self.version += 1
        if self.on_drop is not None:
            self.on_drop(*key)

    def describe(self) -> list[dict]:
        return [
            dataclasses.asdict(r.allocation) | {"committed": r.expires is None}
            for r in self._bundles.values()
        ]
