"""What tasks and actors take from this node, and the placement groups it owns and holds.

One role: a node's resources as its work consumes them. There is one
:class:`~latticaray.scheduler.resources.ResourceLedger` per node: tasks are admitted against it
(or against the ledger of their placement group's bundle reserved here) by the
:class:`~latticaray.scheduler.core.SchedulerCore`'s
:class:`~latticaray.scheduler.local.LocalScheduler` (tasks.py), actors acquire from it here;
either way the allocation says which GPU ids they get (the worker sets
``CUDA_VISIBLE_DEVICES`` to them).

Placement groups go through the node's :class:`~latticaray.scheduler.core.SchedulerCore` (over
the same ledger, so a reserved bundle is no longer free for other work) driven by a
:class:`~latticaray.scheduler.driver.SchedulerDriver`: as the owner of a group (created by one
of this node's drivers) it plans the bundles over the views of its peers and claims them in two
phases over ``/latticaray/sched/1`` (prepare / commit / abort / release); as a holder it serves
those calls for other owners. The group's record goes to the cluster state's
``placement_groups`` collection (pending / created / removed, the node of each bundle), which
every node reads to learn where a group's bundles are (``placement_group_table``, tasks of a
group submitted on another node). A holder releases the bundles of an owner that leaves the
mesh; an attached driver's groups are removed when it disconnects (``lifetime="detached"``:
when removed). Work placed in a bundle that goes away ends: actors are killed; running tasks
finish (their resources were the bundle's).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.scheduler.core import EndTasks, SchedulerConfig, SchedulerCore, StartLocal
from latticaray.scheduler.driver import SchedulerDriver
from latticaray.scheduler.errors import InsufficientResources
from latticaray.scheduler.local import AdmissionKind, QueueAdmission
from latticaray.scheduler.placement_groups import (
    GroupCreated,
    GroupPending,
    GroupState,
    PlacementGroupError,
    validate_bundles,
)
from latticaray.scheduler.policy import NodeView
from latticaray.scheduler.resources import Allocation, ResourceLedger

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

__all__ = ["WAIT", "NodeResources", "PlacementGroupError"]

log = logging.getLogger(__name__)

_GROUP_ID = re.compile(r"^pg[0-9a-f]{24}$")
MAX_GROUPS = 10_000
MAX_PARKED = 100_000
#: the bound of the node's fair task queue for peers' tasks: this many waiting tasks per CPU, at
#: least MIN_QUEUE. A caller learns of room a network round trip late (a `done`, a view every
#: 0.3 s), so a node keeps about that long of short tasks waiting to stay busy; a deeper queue
#: would only let stale views pile work on a few nodes (the rest waits at the submitters).
QUEUE_PER_CPU = 8
MIN_QUEUE = 16


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


#: what :meth:`NodeResources.target` returns while the group is not created yet
WAIT = _Wait()


class NodeResources:
    """The node's ledger, its bundle reservations and the placement groups it owns."""

    def __init__(self, node: RuntimeNode, ledger: ResourceLedger):
        self.node = node
        self.node_id = node.node_id
        self.ledger = ledger
        cpus = ledger.total.get("CPU", 0.0)
        self.core = SchedulerCore(
            node.node_id,
            ledger,
            config=SchedulerConfig(queue_limit=max(MIN_QUEUE, int(QUEUE_PER_CPU * cpus))),
        )
        self.core.local.bundles.on_drop = self._bundle_dropped
        self.driver: SchedulerDriver | None = None
        #: allocation id -> (ledger it came from, allocation, (group, index) or None)
        self.held: dict[str, tuple[ResourceLedger, Allocation, tuple[str, int] | None]] = {}
        #: groups this node owns: id -> record (name, strategy, bundles, detached, client)
        self.owned: dict[str, dict[str, Any]] = {}
        #: groups other nodes own, from the cluster state: id -> record
        self.known: dict[str, dict[str, Any]] = {}
        self.parked: dict[str, list[Callable[[], None]]] = {}
        self._parked_count = 0
        self.crdt: Any = None  # latticaray.state PlacementGroups once the node is in a mesh

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """On the node's loop: the core's timers run (retries, leases)."""
        self.driver = SchedulerDriver(None, self.core, on_action=self._on_action)
        self.driver.start()

    def attach(self, mesh: Any, allowed: Callable[[str], bool], state: Any = None) -> None:
        """The node is in a mesh: serve ``sched/1`` and read/write group records."""
        assert self.driver is not None
        self.driver.attach(mesh, allowed)
        if state is not None:
            from latticaray.state.placement_groups import PlacementGroups

            self.crdt = PlacementGroups(state.replica)
            self.crdt.watch(self._record_changed)

    async def stop(self) -> None:
        if self.driver is not None:
            await self.driver.stop()

    def _now(self) -> float:
        assert self.driver is not None
        return self.driver.now()

    def _apply(self, actions: list) -> None:
        assert self.driver is not None
        self.driver.apply(actions)

    # ------------------------------------------------------------------ acquiring
    def acquire(self, alloc_id: str, demand: dict, opts: dict) -> Allocation:
        """Take ``demand`` for a task or actor: from its bundle's ledger when ``opts`` names
        a placement group (``pg``: [group, index]), else from the node's. Raises
        InsufficientResources (wait for room) or PlacementGroupError (no such bundle here)."""
        pg = opts.get("pg")
        if not pg:
            alloc = self.ledger.acquire(alloc_id, demand)
            self.held[alloc_id] = (self.ledger, alloc, None)
            return alloc
        group_id, index = str(pg[0]), int(pg[1])
        bundles = self.core.local.bundles
        indexes = [index] if index >= 0 else bundles.indexes(group_id)
        short: InsufficientResources | None = None
        too_big = False
        for i in indexes:
            ledger = bundles.ledger_for(group_id, i)
            if ledger is None:
                continue
            if not ledger.could_ever_fit(demand):
                too_big = True
                continue
            try:
                alloc = ledger.acquire(alloc_id, demand)
            except InsufficientResources as exc:
                short = exc
                continue
            self.held[alloc_id] = (ledger, alloc, (group_id, i))
            return alloc
        if short is not None:
            raise short
        where = "any bundle" if index < 0 else f"bundle {index}"
        if too_big:
            raise PlacementGroupError(
                f"{dict(demand)} is more than {where} of placement group {group_id} holds"
            )
        where = "any bundle" if index < 0 else f"bundle {index}"
        raise PlacementGroupError(
            f"{where} of placement group {group_id} is not held on node {self.node_id} "
            "(removed, or its node changed)"
        )

    def release(self, alloc_id: str) -> bool:
        """Give back what ``alloc_id`` holds (idempotent); True when it held something."""
        held = self.held.pop(alloc_id, None)
        if held is None:
            return False
        held[0].release(alloc_id)
        return True

    def gpu_ids(self, alloc_id: str) -> list[str] | None:
        """The GPU ids of a held allocation (None: the node has no GPUs to hand out)."""
        if not self.ledger.total.get("GPU"):
            return None
        held = self.held.get(alloc_id)
        return [] if held is None else held[1].gpu_ids

    def _bundle_dropped(self, group_id: str, index: int) -> None:
        """A bundle held here went away: actors in it end (running tasks finish)."""
        actors = [
            alloc_id
            for alloc_id, (_, _, where) in self.held.items()
            if where == (group_id, index) and alloc_id.startswith("actor-")
        ]
        for alloc_id in actors:
            del self.held[alloc_id]
            aid = bytes.fromhex(alloc_id[len("actor-") :])
            self.node.loop.call_soon(  # type: ignore[union-attr]
                self.node.actors.kill, {"aid": aid, "no_restart": True}, None
            )

    # ------------------------------------------------------------------ placing work
    def target(self, pg: list, retry: Callable[[], None]) -> Any:
        """Where work of the group's bundle runs: a node id, WAIT (the group is not created
        yet: ``retry`` is called when it is) or the PlacementGroupError to fail it with."""
        group_id, index = str(pg[0]), int(pg[1])
        nodes = self.core.group_nodes(group_id)
        if nodes is None:
            known = self.known.get(group_id)
            if known is not None and known["state"] == "created":
                nodes = tuple(known["nodes"])
        if nodes is None:
            owned = self.owned.get(group_id)
            known = self.known.get(group_id)
            if owned is None and (known is None or known["state"] == "removed"):
                return PlacementGroupError(f"placement group {group_id} is unknown or removed")
            if self._parked_count >= MAX_PARKED:
                return PlacementGroupError("too many tasks wait for placement groups")
            self.parked.setdefault(group_id, []).append(retry)
            self._parked_count += 1
            return WAIT
        if index >= len(nodes):
            return PlacementGroupError(
                f"placement group {group_id} has {len(nodes)} bundles, no bundle {index}"
            )
        if index >= 0:
            return nodes[index]
        if self.node_id in nodes:
            return self.node_id
        return nodes[0]

    def _unpark(self, group_id: str) -> None:
        waiting = self.parked.pop(group_id, [])
        self._parked_count -= len(waiting)
        for retry in waiting:
            retry()

    async def wait_created(self, group_id: str, timeout: float) -> bool:
        """Whether the group is created within ``timeout`` s (False: still pending, or
        unknown, or removed meanwhile)."""
        retry = lambda: None  # noqa: E731
        found = self.target([group_id, -1], retry)
        if found is not WAIT:
            return not isinstance(found, BaseException)
        assert self.node.loop is not None
        future: asyncio.Future[None] = self.node.loop.create_future()

        def created() -> None:
            if not future.done():
                future.set_result(None)

        waiters = self.parked[group_id]
        waiters[waiters.index(retry)] = created
        try:
            await asyncio.wait_for(future, max(0.0, timeout))
        except TimeoutError:
            return False
        return not isinstance(self.target([group_id, -1], retry), BaseException | _Wait)

    # ------------------------------------------------------------------ owner side
    def handle(self, message: dict, client: Any) -> dict:
        """A client's placement-group request (``do``: create, remove, table, lookup)."""
        do = message.get("do")
        if do == "create":
            return self._create(message, client)
        if do == "remove":
            self.remove(str(message.get("id", "")))
            return {}
        if do == "table":
            return {"table": self.table()}
        if do == "lookup":
            return {"found": self.lookup(message.get("id"), message.get("name"))}
        raise ValueError(f"unknown placement-group request {do!r}")

    def _create(self, message: dict, client: Any) -> dict:
        group_id = message.get("id")
        if not isinstance(group_id, str) or not _GROUP_ID.match(group_id):
            raise PlacementGroupError("a placement group id is 'pg' and 24 hex digits")
        if group_id in self.owned:
            raise PlacementGroupError(f"placement group {group_id} exists")
        if len(self.owned) >= MAX_GROUPS:
            raise PlacementGroupError(f"this node owns {MAX_GROUPS} placement groups already")
        strategy = str(message.get("strategy"))
        bundles = validate_bundles(message.get("bundles") or [], strategy)
        name = str(message.get("name") or "")
        if name and self.lookup(None, name) is not None:
            raise PlacementGroupError(f"a placement group named {name!r} exists")
        detached = bool(message.get("detached"))
        self.owned[group_id] = {
            "name": name,
            "strategy": strategy,
            "bundles": bundles,
            "detached": detached,
        }
        if not detached and isinstance(getattr(client, "owned_groups", None), list):
            client.owned_groups.append(group_id)
        now = self._now()
        self._seed_views(now)
        self._apply(self.core.create_group(group_id, bundles, strategy, now))
        self._publish(group_id)
        return {}

    def remove(self, group_id: str) -> None:
        if group_id not in self.owned:
            return
        self._apply(self.core.remove_group(group_id, self._now()))
        del self.owned[group_id]
        if self.crdt is not None:
            self._publish_removed(group_id)
        waiting = self.parked.pop(group_id, [])
        self._parked_count -= len(waiting)
        for retry in waiting:  # they fail: the group is gone
            retry()

    def client_gone(self, client: Any) -> None:
        """An attached driver disconnected: the groups it created (not detached) end."""
        for group_id in getattr(client, "owned_groups", ()):
            self.remove(group_id)

    def _state(self, group_id: str) -> str:
        group = self.core.groups.get(group_id)
        if group is None:
            return "removed"
        return "created" if group.state is GroupState.CREATED else "pending"

    def _nodes(self, group_id: str) -> list[str]:
        group = self.core.groups.get(group_id)
        if group is None:
            return []
        return [group.nodes.get(i, "") for i in range(len(group.bundles))]

    def nodes_in_use(self) -> set[str]:
        """The nodes holding bundles of the groups this node owns."""
        return {n for group_id in self.owned for n in self._nodes(group_id) if n}

    def table(self) -> dict:
        out = {}
        for group_id, rec in self.known.items():
            out[group_id] = {
                "name": rec["name"],
                "strategy": rec["strategy"],
                "state": rec["state"].upper(),
                "bundles": rec["bundles"],
                "bundles_to_node_id": rec["nodes"],
            }
        for group_id, rec in self.owned.items():
            out[group_id] = {
                "name": rec["name"],
                "strategy": rec["strategy"],
                "state": self._state(group_id).upper(),
                "bundles": rec["bundles"],
                "bundles_to_node_id": self._nodes(group_id),
            }
        return out

    def lookup(self, group_id: Any, name: Any) -> dict | None:
        for gid, rec in list(self.owned.items()) + list(self.known.items()):
            if gid in self.owned and rec is not self.owned[gid]:
                continue
            if (group_id is not None and gid == group_id) or (name and rec["name"] == name):
                if gid not in self.owned and rec["state"] == "removed":
                    continue
                return {"id": gid, "bundles": rec["bundles"], "strategy": rec["strategy"]}
        return None

    # ------------------------------------------------------------------ views and peers
    def _seed_views(self, now: float) -> None:
        remote = self.node.remote
        if remote is None:
            return
        actions: list = []
        for view in list(remote.membership.snapshot.nodes.values()):
            if view.node_id != self.node_id:
                actions += self.core.on_view(view, now)
        self._apply(actions)

    def planning(self) -> bool:
        """Whether an owned group waits for nodes (then peers' views are fed to the core)."""
        return any(g.state is not GroupState.CREATED for g in self.core.groups.values())

    def on_view(self, view: NodeView) -> None:
        if self.driver is not None and self.planning():
            self.driver.on_view(view)

    def node_gone(self, node_id: str) -> None:
        """A peer left: its groups' bundles here are released, ours on it placed again."""
        if self.driver is not None:
            self.driver.node_gone(node_id)

    def _on_action(self, action: Any) -> None:
        if isinstance(action, StartLocal):  # a queued task started as a bundle changed
            self.node.tasks.started_by_scheduler(
                [
                    QueueAdmission(
                        AdmissionKind.STARTED,
                        action.request.task_id,
                        self.node_id,
                        allocation=action.allocation,
                    )
                ]
            )
            self.node.tasks.dispatch()
        elif isinstance(action, EndTasks):
            # tasks running in a removed bundle finish (their resources were the bundle's);
            # those queued for it cannot run
            self.node.tasks.dropped_by_scheduler(action.dropped, action.reason)
        elif isinstance(action, GroupCreated):
            self._publish(action.group_id)
            self._unpark(action.group_id)
        elif isinstance(action, GroupPending):
            self._publish(action.group_id)

    # ------------------------------------------------------------------ cluster state
    def _publish(self, group_id: str) -> None:
        rec = self.owned.get(group_id)
        if self.crdt is None or rec is None:
            return
        try:
            self.crdt.put(
                group_id,
                name=rec["name"],
                strategy=rec["strategy"],
                bundles=rec["bundles"],
                state=self._state(group_id),
                nodes=self._nodes(group_id),
            )
        except Exception as exc:  # the record is informational for other nodes
            log.warning("placement group %s not recorded: %s", group_id, exc)

    def _publish_removed(self, group_id: str) -> None:
        try:
            self.crdt.drop(group_id)
        except Exception as exc:
            log.warning("placement group %s removal not recorded: %s", group_id, exc)

    def _record_changed(self, group_id: str, record: Any) -> None:
        if group_id in self.owned:
            return
        if record is None:
            self.known.pop(group_id, None)
            self.core.note_group(group_id, None, self._now())
            return
        self.known[group_id] = {
            "name": record.name,
            "strategy": record.strategy,
            "bundles": [dict(b) for b in record.bundles],
            "state": record.state,
            "nodes": list(record.nodes),
        }
        if record.state == "created":
            self._unpark(group_id)
