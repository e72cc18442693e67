"""A synchronous in-memory mesh of SchedulerCores for tests: every action is delivered at once.

``Mesh.step`` routes a core's actions to their peers (placements, view fetches and
subscriptions, DHT capacity lookups answered from every node's ad, placement-group messages)
and collects what reaches the driver side (starts, placements, failures) per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latticaray.scheduler.core import (
    EndTasks,
    LookupCapacity,
    SchedulerConfig,
    SchedulerCore,
    StartLocal,
    Subscribe,
    Unsubscribe,
)
from latticaray.scheduler.placement_groups import (
    AbortBundle,
    BundleReply,
    CommitBundle,
    GroupCreated,
    GroupPending,
    PrepareBundle,
    ReleaseGroup,
)
from latticaray.scheduler.resources import ResourceLedger
from latticaray.scheduler.submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement


@dataclass
class Outcome:
    started: dict[str, object] = field(default_factory=dict)  # task id -> allocation
    placed: dict[str, str] = field(default_factory=dict)  # task id -> node (remote/queued)
    failed: dict[str, Exception] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    created: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    ended: list[EndTasks] = field(default_factory=list)


class Mesh:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.cores: dict[str, SchedulerCore] = {}
        self.out: dict[str, Outcome] = {}
        self.subs: dict[str, set[str]] = {}  # node -> nodes subscribed to it
        self.down: set[str] = set()
        self.now = 0.0
        self.messages = 0
        self.lookups = 0

    def add(self, node_id: str, resources: dict, gpu_ids=None, labels=None, seed: int = 0):
        core = SchedulerCore(
            node_id,
            ResourceLedger(resources, gpu_ids=gpu_ids),
            labels=labels,
            config=self.config,
            seed=seed,
        )
        self.cores[node_id] = core
        self.out[node_id] = Outcome()
        self.subs[node_id] = set()
        return core

    def view(self, node_id: str):
        return self.cores[node_id].local.view(self.now)

    def push_views(self) -> None:
        """Neighbours push their views to their subscribers."""
        for node, subscribers in self.subs.items():
            for sub in list(subscribers):
                if node in self.down or sub in self.down:
                    continue
                self.messages += 1
                self.step(sub, self.cores[sub].on_view(self.view(node), self.now))

    def step(self, node_id: str, actions: list) -> None:
        core = self.cores[node_id]
        out = self.out[node_id]
        for action in actions:
            if isinstance(action, StartLocal):
                out.started[action.request.task_id] = action.allocation
            elif isinstance(action, Placed):
                out.placed[action.task_id] = action.node_id
            elif isinstance(action, PlacementFailed):
                out.failed[action.task_id] = action.error
            elif isinstance(action, PlacementWarning):
                out.warnings.append(action.message)
            elif isinstance(action, SendPlacement):
                self.messages += 2
                if action.node_id in self.down or action.node_id not in self.cores:
                    self.step(node_id, core.on_send_failed(action.request.task_id, self.now))
                    continue
                target = self.cores[action.node_id]
                admission = target.offer(action.request, self.now)
                if admission.allocation is not None:
                    self.out[action.node_id].started[action.request.task_id] = admission.allocation
                self.step(node_id, core.on_admission(admission, self.now))
                # the runtime's replies carry the executor's view
                self.step(node_id, core.on_view(self.view(action.node_id), self.now))
            elif isinstance(action, LookupCapacity):
                self.lookups += 1
                views = [
                    self.view(n)
                    for n, c in self.cores.items()
                    if n not in self.down and action.resource in c.local.ledger.total
                ]
                self.step(node_id, core.on_capacity(action.resource, views, self.now))
            elif isinstance(action, Subscribe):
                if action.node_id in self.cores and action.node_id not in self.down:
                    self.subs[action.node_id].add(node_id)
                    self.step(node_id, core.on_view(self.view(action.node_id), self.now))
            elif isinstance(action, Unsubscribe):
                if action.node_id in self.subs:
                    self.subs[action.node_id].discard(node_id)
            elif isinstance(action, PrepareBundle):
                if action.node_id in self.down:
                    self.step(
                        node_id,
                        core.bundle_send_failed(
                            action.group_id, action.index, action.attempt, self.now
                        ),
                    )
                    continue
                reply = self.cores[action.node_id].prepare_bundle(action, node_id, self.now)
                self.step(node_id, core.on_bundle_reply(reply, self.now))
            elif isinstance(action, CommitBundle):
                if action.node_id not in self.down:
                    reply = self.cores[action.node_id].commit_bundle(action, self.now)
                    assert isinstance(reply, BundleReply)
            elif isinstance(action, AbortBundle):
                if action.node_id not in self.down:
                    self.step(
                        action.node_id, self.cores[action.node_id].abort_bundle(action, self.now)
                    )
            elif isinstance(action, ReleaseGroup):
                if action.node_id not in self.down:
                    target = self.cores[action.node_id]
                    self.step(action.node_id, target.release_group_here(action.group_id, self.now))
            elif isinstance(action, GroupCreated):
                out.created[action.group_id] = action.nodes
            elif isinstance(action, GroupPending):
                out.pending.append(action.reason)
            elif isinstance(action, EndTasks):
                out.ended.append(action)
            else:
                raise AssertionError(f"unhandled action {action!r}")

    def finish(self, node_id: str, task_id: str) -> None:
        self.step(node_id, self.cores[node_id].finish(task_id, self.now))

    def poll(self, node_id: str) -> None:
        self.step(node_id, self.cores[node_id].poll(self.now))

    def kill(self, node_id: str) -> None:
        self.down.add(node_id)
        for other, core in self.cores.items():
            if other != node_id and other not in self.down:
                self.step(other, core.node_gone(node_id, self.now))
