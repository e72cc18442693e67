"""Placement candidates from the capacity nodes advertise in the DHT (`capacity/<resource>`).

The runtime places work with the scheduler's PlacementPolicy over a ClusterSnapshot of admitted
peers. Peers reach that snapshot through the views they push; this module adds the nodes that
advertise the demanded resources in the DHT, so work can land on a member this node was never
told about (a sparse mesh, a node that joined through another bootstrap, a rare resource):

* :class:`CapacityDirectoryCore` (sans-I/O, fed ``now``): which `capacity/<resource>` keys to
  read and when (on demand, at most every ``min_gap`` s per key, backing off while the DHT has
  nothing; in the background every ``refresh_interval`` s for keys demanded lately), the cached
  answers (``ttl``), the requests waiting for capacity and their deadlines, and the nodes not to
  dial again yet.
* :class:`DhtPlacement`: the asyncio driver for one node's Membership (membership.py). It
  reads the keys, admits the advertised nodes it has not met (the usual `/latticaray/admit/1`
  exchange: only admitted members get work; from then on they push views like any peer), puts
  the ad's view into the snapshot until the peer's first pushed view arrives, and retries the
  waiting requests. A request still infeasible at its deadline fails with
  TaskUnschedulableError. A named actor's creation waits here under a pending claim on its
  name (`NameService.claim_named_actor`): the host the wait finds fills the claim in; at the
  deadline the name is given back (names.py).

Bounds: one lookup in flight per key, at most ``max_keys`` keys tracked, ``sample_size`` ads
kept per key, ``max_admissions`` admissions in flight and ``max_new_per_lookup`` started per
answer, ``max_waiting`` waiting requests.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from latticaray.mesh.errors import MeshError
from latticaray.mesh.identity import PeerId
from latticaray.runtime.errors import TaskUnschedulableError
from latticaray.scheduler.advertiser import CandidateSampler, capacity_key, views_from_dht
from latticaray.scheduler.policy import NodeView
from latticaray.scheduler.resources import fits

log = logging.getLogger(__name__)


class Deferred:
    """What `Placer.place_task` returns for a request left waiting for capacity."""

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = Deferred()


@dataclasses.dataclass
class _Parked:
    """How the runtime places a waiting request again, fails it, or sees it settled elsewhere."""

    retry: Callable[[], None]
    fail: Callable[[BaseException], None]
    settled: Callable[[], bool]


@dataclasses.dataclass
class _Key:
    """What the directory knows of one `capacity/<resource>` key."""

    demanded_at: float
    views: list[NodeView] = dataclasses.field(default_factory=list)
    fetched_at: float | None = None
    last_lookup: float | None = None
    in_flight: bool = False
    empty_streak: int = 0


@dataclasses.dataclass
class _Waiting:
    request_id: str
    resource: str
    demand: dict
    since: float
    deadline: float
    reason: str


class CapacityDirectoryCore:
    """Sans-I/O bookkeeping of DHT capacity lookups and of requests waiting for capacity."""

    def __init__(
        self,
        *,
        ttl: float = 3.0,
        refresh_interval: float = 5.0,
        min_gap: float = 1.0,
        idle_backoff_max: float = 60.0,
        interest_window: float = 60.0,
        max_keys: int = 16,
        sample_size: int = 32,
        wait_timeout: float = 10.0,
        max_waiting: int = 4096,
        redial_after: float = 20.0,
        background_peers: int = 8,
        seed: int | None = None,
    ):
        if not 0 < min_gap <= refresh_interval <= idle_backoff_max:
            raise ValueError("need 0 < min_gap <= refresh_interval <= idle_backoff_max")
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.min_gap = min_gap
        self.idle_backoff_max = idle_backoff_max
        self.interest_window = interest_window
        self.max_keys = max_keys
        self.sample_size = sample_size
        self.wait_timeout = wait_timeout
        self.max_waiting = max_waiting
        self.redial_after = redial_after
        self.background_peers = background_peers
        self.rng = random.Random(seed)
        self.keys: collections.OrderedDict[str, _Key] = collections.OrderedDict()
        self.waiting: dict[str, _Waiting] = {}
        self._no_dial: dict[str, float] = {}

    # keys and lookups ----------------------------------------------------------------------
    @staticmethod
    def key_resource(demand: dict) -> str:
        """The key read for a demand: its rarest resource (custom, then GPU, then CPU)."""
        return CandidateSampler.key_resource({k: v for k, v in demand.items() if v})

    def demand(self, resource: str, now: float) -> None:
        """Work demanding ``resource`` was placed: keep its key fresh (least recent evicted)."""
        key = self.keys.get(resource)
        if key is None:
            key = self.keys[resource] = _Key(now)
            while len(self.keys) > self.max_keys:
                victim = next((r for r, k in self.keys.items() if not k.in_flight), None)
                if victim is None:
                    break
                del self.keys[victim]
        key.demanded_at = now
        self.keys.move_to_end(resource)

    def _gap(self, key: _Key, urgent: bool) -> float:
        """Least time between lookups of a key; doubles per further answer that named no node."""
        base = self.min_gap if urgent else self.refresh_interval
        ceiling = self.refresh_interval if urgent else self.idle_backoff_max
        return min(ceiling, base * (2 ** min(max(0, key.empty_streak - 1), 16)))

    def lookup_due(self, resource: str, now: float, urgent: bool) -> bool:
        key = self.keys.get(resource)
        if key is None or key.in_flight:
            return False
        if key.last_lookup is None:
            return True
        if not urgent and now - key.demanded_at > self.interest_window:
            return False
        return now - key.last_lookup >= self._gap(key, urgent)

    def due(self, now: float) -> list[str]:
        """Keys to read now: waited on (urgent) or demanded lately (background refresh)."""
        urgent = {w.resource for w in self.waiting.values()}
        return [r for r in list(self.keys) if self.lookup_due(r, now, r in urgent)]

    def lookup_started(self, resource: str, now: float) -> None:
        key = self.keys.get(resource)
        if key is None:
            self.demand(resource, now)
            key = self.keys[resource]
        key.in_flight = True
        key.last_lookup = now

    def lookup_done(
        self, resource: str, views: list[NodeView] | None, now: float, own_node: str | None = None
    ) -> list[NodeView]:
        """Record an answer (None: the lookup failed); returns the views kept (sampled)."""
        key = self.keys.get(resource)
        kept = [v for v in views or [] if v.node_id != own_node and v.alive]
        if len(kept) > self.sample_size:
            kept = self.rng.sample(kept, self.sample_size)
        if key is None:
            return kept
        key.in_flight = False
        key.empty_streak = 0 if kept else key.empty_streak + 1
        if views is not None:
            key.views = kept
            key.fetched_at = now
        return kept

    def cached(self, resource: str, now: float) -> list[NodeView]:
        key = self.keys.get(resource)
        if key is None or key.fetched_at is None or now - key.fetched_at > self.ttl:
            return []
        return key.views

    # dialing -------------------------------------------------------------------------------
    def worth_meeting(self, resource: str, total: dict, known: int) -> bool:
        """Whether to admit an advertiser of ``resource`` this node has not met: it could take a
        request waiting on the key, or (nothing waits) fewer than ``background_peers`` admitted
        nodes have the resource (``known``, counting admissions under way)."""
        demands = [w.demand for w in self.waiting.values() if w.resource == resource]
        if demands:
            return any(fits(total, demand) for demand in demands)
        return known < self.background_peers

    def may_dial(self, node_id: str, now: float) -> bool:
        until = self._no_dial.get(node_id)
        if until is not None and now >= until:
            del self._no_dial[node_id]
            until = None
        return until is None

    def hold_off(self, node_id: str, now: float) -> None:
        """Do not dial ``node_id`` for ``redial_after`` s (it failed, or it left the mesh: its
        ads outlive it by up to their TTL)."""
        self._no_dial[node_id] = now + self.redial_after
        if len(self._no_dial) > 4 * self.max_waiting:
            for node in [n for n, t in self._no_dial.items() if t <= now]:
                del self._no_dial[node]

    # waiting requests ----------------------------------------------------------------------
    def wait(self, request_id: str, demand: dict, reason: str, now: float) -> bool:
        """Hold a request no admitted node can take until capacity shows up or its deadline;
        False when too many already wait (the caller fails it)."""
        entry = self.waiting.get(request_id)
        resource = self.key_resource(demand)
        if entry is None:
            if len(self.waiting) >= self.max_waiting:
                return False
            entry = self.waiting[request_id] = _Waiting(
                request_id, resource, dict(demand), now, now + self.wait_timeout, reason
            )
            self.demand(resource, now)
        entry.reason = reason
        return True

    def release(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    def expired(self, now: float) -> list[_Waiting]:
        out = [w for w in self.waiting.values() if now >= w.deadline]
        for entry in out:
            del self.waiting[entry.request_id]
        return out

    def next_wakeup(self, now: float) -> float | None:
        """When to look again (deadlines, urgent and background lookups); None: nothing to do."""
        times = [w.deadline for w in self.waiting.values()]
        urgent = {w.resource for w in self.waiting.values()}
        for resource, key in self.keys.items():
            if key.in_flight:
                continue
            is_urgent = resource in urgent
            if not is_urgent and now - key.demanded_at > self.interest_window:
                continue
            last = key.last_lookup
            times.append(now if last is None else last + self._gap(key, is_urgent))
        return min(times) if times else None


class DhtPlacement:
    """Draws placement candidates for one node's Membership from the DHT capacity keys."""

    def __init__(
        self,
        membership,
        dht,
        core: CapacityDirectoryCore | None = None,
        *,
        get_timeout: float = 5.0,
        dial_timeout: float = 10.0,
        max_admissions: int = 4,
        max_new_per_lookup: int = 8,
        clock=time.monotonic,
    ):
        self.membership = membership
        self.dht = dht
        self.core = core or CapacityDirectoryCore()
        self.get_timeout = get_timeout
        self.dial_timeout = dial_timeout
        self.max_new_per_lookup = max_new_per_lookup
        self.clock = clock
        self.parked: dict[str, _Parked] = {}
        self.stats: collections.Counter = collections.Counter()
        self._admitting: set[str] = set()
        #: members being met for work pinned to them: node id -> (retry, fail) of that work
        self._meeting: dict[
            str, list[tuple[Callable[[], None], Callable[[BaseException], None]]]
        ] = {}
        self._admission_slots = asyncio.Semaphore(max_admissions)
        self._wake = asyncio.Event()
        self._retry = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = self.membership.spawn(self._run())

    # hooks the runtime calls -----------------------------------------------------------------
    def note_demand(self, demand: dict) -> None:
        resource = self.core.key_resource(demand)
        key = self.core.keys.get(resource)
        now = self.clock()
        if key is None or now - key.demanded_at > 1.0:
            self.core.demand(resource, now)
            self._wake.set()

    def defer(
        self,
        request_id: str,
        demand: dict,
        reason: str,
        *,
        retry: Callable[[], None],
        fail: Callable[[BaseException], None],
        settled: Callable[[], bool],
    ):
        """No admitted node can take the request: DEFERRED while it waits for the DHT to name
        one (``retry`` places it again, ``fail`` ends it at its deadline, ``settled`` says it
        ended meanwhile), or the TaskUnschedulableError for it when too many wait already."""
        if request_id not in self.core.waiting:
            self.stats["deferred"] += 1
        if not self.core.wait(request_id, demand, reason, self.clock()):
            return TaskUnschedulableError(
                request_id,
                f"{reason} (and {len(self.core.waiting)} requests already wait for capacity)",
            )
        self.parked[request_id] = _Parked(retry, fail, settled)
        self._wake.set()
        return DEFERRED

    def meet(
        self,
        node_id: str,
        *,
        retry: Callable[[], None],
        fail: Callable[[BaseException], None],
    ) -> Deferred:
        """Work pinned to a member this node has not met (a hard node affinity): find it
        (its connection, else the DHT), be admitted, then ``retry`` places it there; ``fail``
        when it cannot be reached. At most ``max_admissions`` meetings run at once; requests
        for a node being met wait for that meeting."""
        waiting = self._meeting.get(node_id)
        if waiting is not None:
            waiting.append((retry, fail))
            return DEFERRED
        self._meeting[node_id] = [(retry, fail)]
        self.stats["meetings"] += 1
        self.membership.spawn(self._meet(node_id))
        return DEFERRED

    async def _meet(self, node_id: str) -> None:
        error: BaseException | None = None
        for _attempt in range(2):  # a busy peer may miss the first admission's deadline
            try:
                peer = PeerId.from_string(node_id)
                async with self._admission_slots:
                    if self.membership.mesh.connection_to(
                        peer
                    ) is None and not self._addrs_from_state(peer):
                        await asyncio.wait_for(self.dht.find_peer(peer), self.dial_timeout)
                    await asyncio.wait_for(self.membership.admit_with(peer), self.dial_timeout)
            except (TimeoutError, MeshError, ValueError, OSError) as exc:
                error = exc
            if self.membership.is_alive(node_id) or isinstance(error, ValueError):
                break
        waiting = self._meeting.pop(node_id, [])
        if self.membership.is_alive(node_id):
            for retry, _fail in waiting:
                retry()
            return
        why = f"node affinity to {node_id}, which could not be reached and admitted"
        if error is not None:
            why += f" ({type(error).__name__}: {error})"
        for _retry, fail in waiting:
            fail(ConnectionError(why))

    def _addrs_from_state(self, peer: PeerId) -> bool:
        """The addresses the member published in the cluster state's `members` entry, put
        in the peer store; False when it has none there."""
        state = self.membership.remote.state
        info = None if state is None else state.members.get(peer)
        if info is None or not info.addrs:
            return False
        try:
            self.membership.mesh.add_addrs(peer, list(info.addrs))
        except (MeshError, ValueError) as exc:
            log.debug("addresses of %s from the cluster state refused: %s", peer, exc)
            return False
        return True

    def withdraw(self, request_id: str) -> None:
        """The request no longer waits (its creator gave up): forget it without failing it."""
        self.parked.pop(request_id, None)
        self.core.release(request_id)

    def peer_gone(self, node_id: str) -> None:
        self.core.hold_off(node_id, self.clock())

    def peer_ready(self) -> None:
        """An admitted peer's capacity became known: waiting requests may fit now."""
        if self.core.waiting:
            self._retry = True
            self._wake.set()

    # the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            now = self.clock()
            for entry in self.core.expired(now):
                parked = self.parked.pop(entry.request_id, None)
                if parked is not None and not parked.settled():
                    self.stats["unschedulable"] += 1
                    parked.fail(
                        TaskUnschedulableError(
                            entry.request_id,
                            f"{entry.reason}; nor any node advertising "
                            f"capacity/{entry.resource} in the DHT",
                            waited_s=now - entry.since,
                        )
                    )
            if self._retry:
                self._retry = False
                self._retry_waiting()
            for resource in self.core.due(now):
                self.core.lookup_started(resource, now)
                self.membership.spawn(self._lookup(resource))
            wakeup = self.core.next_wakeup(self.clock())
            self._wake.clear()
            timeout = None if wakeup is None else max(0.01, wakeup - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _retry_waiting(self) -> None:
        """Place the waiting requests again; one still infeasible waits on (same deadline)."""
        for request_id in list(self.core.waiting):
            parked = self.parked.pop(request_id, None)
            if parked is not None and not parked.settled():
                self.stats["retried"] += 1
                parked.retry()
            if request_id not in self.parked:
                self.core.release(request_id)

    async def _lookup(self, resource: str) -> None:
        views = None
        try:
            result = await asyncio.wait_for(self.dht.get(capacity_key(resource)), self.get_timeout)
            views, problems = views_from_dht(result, self.clock())
            if problems:
                log.debug(
                    "capacity/%s: %d bad ads skipped (%s)", resource, len(problems), problems[0]
                )
        except (TimeoutError, MeshError, OSError) as exc:
            log.debug("capacity/%s lookup failed: %r", resource, exc)
            self.stats["lookup_failures"] += 1
        finally:
            kept = self.core.lookup_done(resource, views, self.clock(), self.membership.node_id)
            self._wake.set()
        self.stats["lookups"] += 1
        self._use(resource, kept)

    def _use(self, resource: str, views: list[NodeView]) -> None:
        """Ads of admitted peers fill in until their first pushed view; advertisers not met yet
        are admitted when worth it (a few at a time)."""
        membership = self.membership
        now = self.clock()
        started = 0
        known = len(self._admitting) + sum(
            1
            for v in membership.snapshot.nodes.values()
            if v.alive and v.node_id != membership.node_id and v.total.get(resource, 0) > 0
        )
        for view in views:
            state = membership.peers.get(view.node_id)
            if state is not None and state.alive:
                if not state.view:
                    membership.snapshot.update_node(view)
                    self.peer_ready()
                continue
            if (
                started >= self.max_new_per_lookup
                or view.node_id in self._admitting
                or not self.core.may_dial(view.node_id, now)
                or not self.core.worth_meeting(resource, view.total, known + started)
            ):
                continue
            started += 1
            self._admitting.add(view.node_id)
            membership.spawn(self._admit(view))

    async def _admit(self, view: NodeView) -> None:
        node_id = view.node_id
        try:
            async with self._admission_slots:
                peer = PeerId.from_string(node_id)
                self.stats["admissions_tried"] += 1
                if self.membership.mesh.connection_to(peer) is None:
                    await asyncio.wait_for(self.dht.find_peer(peer), self.dial_timeout)
                await asyncio.wait_for(self.membership.admit_with(peer), self.dial_timeout)
        except (TimeoutError, MeshError, ValueError, OSError) as exc:
            log.debug("advertiser %s not reached: %r", node_id, exc)
        finally:
            self._admitting.discard(node_id)
        state = self.membership.peers.get(node_id)
        if state is None or not state.alive:
            self.core.hold_off(node_id, self.clock())
            return
        self.stats["admitted"] += 1
        if not state.view:
            view.ad_time = self.clock()
            self.membership.snapshot.update_node(view)
        self.peer_ready()
