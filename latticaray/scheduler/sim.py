"""Scheduler simulation: many nodes, each a :class:`SchedulerCore`, on a virtual network.

The node's placement code is the runtime's: every simulated node is a
:class:`~latticaray.scheduler.core.SchedulerCore` (policy, submitter, local queue, bounded
neighbourhood, capacity directory), driven here by the virtual clock and network of
:mod:`latticaray.mesh.sim` exactly as the runtime drives it with real messages and timers:

* a placement is a request to the chosen node and its admission reply (2 messages); the reply
  carries the node's current view (as the runtime's replies do), a rejection spills over;
* neighbours push their views to subscribers on placement-relevant changes, rate limited
  (:class:`~latticaray.scheduler.neighbourhood.ViewPublisher`); subscribing is 2 messages (none
  when it rides on a placement to the same node), unsubscribing 1;
* each node publishes its capacity ad to the DHT every ``ad_period`` s (jittered); a
  `capacity/<resource>` lookup returns a random sample of at most ``dht_answer`` current ads
  after ``dht_latency`` s and costs ``dht_lookup_messages`` messages (25.7 at 10,000 nodes in
  ``bench/dht.py``); a publish costs ``dht_publish_messages`` (a lookup plus 20 stores);
* tasks need CPU (some a GPU, a custom resource or a label) and take one argument object held
  by 1-3 nodes: drawn from the whole mesh in proportion to their CPUs (``holders="anywhere"``),
  or mostly among the nodes the submitter's own earlier tasks ran on (``holders="graph"``: the
  arguments are results of its earlier tasks, as in a task graph); a task runs for an
  exponentially distributed time; node queues are bounded, the rest waits at the submitters.

``policy="random"`` swaps each core's policy for :class:`RandomPlacement` (uniformly random
feasible node with room in its view; no locality, no anti-herding) as a baseline.

:func:`run_simulation` returns a :class:`SimulationResult` with the load balance at saturation,
data-local placement, messages per placement (and their kinds), latency and spillbacks.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from latticaray.mesh.sim import Simulator, VirtualNetwork

from .core import (
    EndTasks,
    LookupCapacity,
    SchedulerConfig,
    SchedulerCore,
    StartLocal,
    Subscribe,
    Unsubscribe,
)
from .local import AdmissionKind, QueueAdmission
from .neighbourhood import ViewPublisher
from .policy import (
    ClusterSnapshot,
    Decision,
    DecisionKind,
    NodeView,
    PlacementPolicy,
    PlacementRequest,
)
from .resources import ResourceLedger, fits
from .submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement

__all__ = ["RandomPlacement", "SimulationConfig", "SimulationResult", "run_simulation"]


@dataclass
class SimulationConfig:
    nodes: int = 1000
    submitters: int = 50
    tasks: int = 100_000
    seed: int = 1
    #: Seconds over which tasks arrive (uniformly at random per submitter).
    arrival_window: float = 10.0
    mean_duration: float = 2.0
    #: CPUs per node, drawn uniformly from this list
    cpu_choices: tuple[int, ...] = (2, 4, 4, 8, 8, 16, 32)
    latency: float = 0.005
    queue_per_cpu: int = 1
    gpu_task_fraction: float = 0.02
    custom_task_fraction: float = 0.005
    label_task_fraction: float = 0.05
    max_attempts: int = 4
    choices: int = 2
    locality_slack: float = 1.3
    locality_delay: float = 10.0
    locality_wait_free: float = 10.0
    locality_queue: float = 2.0
    sample_every: float = 0.5
    #: the node's bounded neighbourhood, and the bootstrap peers each starts with
    neighbours: int = 32
    bootstrap: int = 8
    #: capacity ads: republished every ad_period s; a lookup answers with at most dht_answer
    ad_period: float = 30.0
    dht_answer: int = 64
    dht_latency: float = 0.03
    dht_lookup_messages: float = 25.7
    dht_publish_messages: float = 65.7
    #: view pushes to subscribers: at most every push_interval s per subscriber, on change
    push_interval: float = 2.0
    push_heartbeat: float = 30.0
    push_load_step: float = 0.0
    #: "latticaray" (SchedulerCore's policy) or "random" (baseline)
    policy: str = "latticaray"
    #: where argument objects live: "anywhere" (1-3 nodes of the whole mesh, in proportion to
    #: their CPUs) or "graph" (results of the submitter's own earlier tasks: with probability
    #: ``graph_fraction`` the nodes its last ``graph_window`` tasks ran on, else anywhere)
    holders: str = "anywhere"
    #: share of tasks whose argument is large (1-64 MiB: data locality matters); the others
    #: take a small one (64 KiB, below the scheduler's locality threshold)
    large_arg_fraction: float = 1.0
    graph_fraction: float = 0.8
    graph_window: int = 256
    #: Stop the run after this much virtual time even if tasks remain (bounded loops).
    time_limit: float = 600.0


@dataclass
class SimulationResult:
    config: SimulationConfig
    placed: int = 0
    failed: int = 0
    finished: int = 0
    attempts: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    #: submitter -> [sum of placement latencies, count]
    per_submitter: dict[str, list[float]] = field(default_factory=dict)
    with_feasible_holder: int = 0
    placed_with_data: int = 0
    spillbacks: int = 0
    infeasible_placements: int = 0
    saturated_ratios: list[float] = field(default_factory=list)
    #: Why tasks that had a feasible holder were placed elsewhere (policy reason -> count).
    nonlocal_reasons: dict[str, int] = field(default_factory=dict)
    saturated_utilization: list[float] = field(default_factory=list)
    virtual_time: float = 0.0
    events: int = 0
    #: messages by kind (placement path and background)
    messages: dict[str, float] = field(default_factory=dict)
    neighbourhood_max: int = 0
    snapshot_max: int = 0

    def count(self, kind: str, n: float = 1) -> None:
        self.messages[kind] = self.messages.get(kind, 0) + n

    def jain_index(self) -> float | None:
        """Jain's fairness index of the submitters' mean placement latency (1.0 = all equal)."""
        means = [total / count for total, count in self.per_submitter.values() if count]
        if not means or not any(means):
            return None
        return round(sum(means) ** 2 / (len(means) * sum(m * m for m in means)), 4)

    def summary(self) -> dict:
        att = sorted(self.attempts) or [0]
        lat = sorted(self.latencies) or [0.0]
        ratios = sorted(self.saturated_ratios)
        placed = max(1, self.placed)
        m = self.messages
        placement_path = sum(m.get(k, 0) for k in ("place", "lookup", "subscribe", "push"))
        seconds = max(self.virtual_time, 1e-9)
        return {
            "nodes": self.config.nodes,
            "submitters": self.config.submitters,
            "tasks": self.config.tasks,
            "policy": self.config.policy,
            "placed": self.placed,
            "failed": self.failed,
            "finished": self.finished,
            # None when the run never reached saturation (no sample qualified)
            "max_mean_load_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
            "max_mean_load_ratio_p90": round(ratios[int(0.9 * (len(ratios) - 1))], 3)
            if ratios
            else None,
            "max_mean_load_ratio_worst": round(ratios[-1], 3) if ratios else None,
            "saturated_samples": len(self.saturated_ratios),
            "cpu_utilization_at_saturation": round(statistics.mean(self.saturated_utilization), 3)
            if self.saturated_utilization
            else None,
            # over tasks with a large argument (>= 1 MiB) on a node that could run them
            "data_local_fraction": round(self.placed_with_data / self.with_feasible_holder, 4)
            if self.with_feasible_holder
            else None,
            "tasks_with_feasible_holder": self.with_feasible_holder,
            "attempts_per_placement_mean": round(statistics.mean(att), 3),
            "placement_messages_per_placement_mean": round(m.get("place", 0) / placed, 3),
            "messages_per_placement_max": 2 * att[-1],
            "messages_per_placement_p99": 2 * att[min(len(att) - 1, int(0.99 * len(att)))],
            "messages_per_placement_all": round(placement_path / placed, 3),
            "messages_per_placement_by_kind": {
                k: round(v / placed, 3) for k, v in sorted(m.items())
            },
            "ad_publish_messages_per_node_per_s": round(
                m.get("ads", 0) / self.config.nodes / seconds, 3
            ),
            "placement_latency_s_p50": round(lat[len(lat) // 2], 4),
            "placement_latency_s_p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
            "submitter_latency_jain_index": self.jain_index(),
            "spillbacks": self.spillbacks,
            "nonlocal_reasons": dict(sorted(self.nonlocal_reasons.items())),
            "placed_on_infeasible_node": self.infeasible_placements,
            "neighbourhood_max": self.neighbourhood_max,
            "snapshot_nodes_max": self.snapshot_max,
            "virtual_time_s": round(self.virtual_time, 2),
            "events": self.events,
        }


class RandomPlacement(PlacementPolicy):
    """Baseline: a uniformly random feasible node whose view shows room (or queue space)."""

    def _place_default(
        self, snapshot: ClusterSnapshot, request: PlacementRequest, now: float
    ) -> Decision:
        feasible = self._feasible(snapshot, request)
        if not feasible:
            return self._no_candidate(snapshot, request)
        for _ in range(8):
            view = snapshot.nodes[feasible[self.rng.randrange(len(feasible))]]
            if view.node_id in request.excluded:
                continue
            room = fits(view.available, request.resources)
            if room or view.queue_limit is None or view.queued < view.queue_limit:
                return Decision(
                    DecisionKind.PLACE,
                    view.node_id,
                    reason="random",
                    local_bytes=self._local_bytes(view.node_id, request, snapshot),
                    room_now=room,
                )
        return Decision(DecisionKind.WAIT, reason="random candidates were full")

    def _record(self, node_id: str, request: PlacementRequest, now: float, queues: bool) -> None:
        pass  # no anti-herding memory


@dataclass
class _Msg:
    kind: str
    body: Any


def run_simulation(config: SimulationConfig) -> SimulationResult:
    sim = Simulator(seed=config.seed)
    rng = sim.rng
    net = VirtualNetwork(sim, latency=config.latency)
    result = SimulationResult(config)

    # nodes -----------------------------------------------------------------------------------
    node_ids = [f"n{i:05d}" for i in range(config.nodes)]
    cores: dict[str, SchedulerCore] = {}
    publishers: dict[str, ViewPublisher] = {}
    ads: dict[str, NodeView] = {}  # the DHT's current ad of each node
    by_resource: dict[str, list[str]] = {"CPU": [], "GPU": [], "accel": []}
    scfg = SchedulerConfig(
        neighbours=config.neighbours,
        max_attempts=config.max_attempts,
        choices=config.choices,
        locality_slack=config.locality_slack,
        locality_delay=config.locality_delay,
        locality_wait_free=config.locality_wait_free,
        locality_queue=config.locality_queue,
        capacity_wait=5.0,
        retry_interval=0.2,
        directory_sample=config.dht_answer,
        max_ad_nodes=4 * config.dht_answer,
        locality_min_bytes=1 << 20,
    )
    for i, nid in enumerate(node_ids):
        cpus = rng.choice(config.cpu_choices)
        total: dict[str, float] = {"CPU": cpus, "memory": cpus * 4 * 2**30}
        if i % 10 == 3:
            total["GPU"] = rng.choice([1, 2, 4, 8])
        if i % 50 == 7:
            total["accel"] = 4
        labels = {"zone": "us" if i % 3 else "eu"}
        core = SchedulerCore(
            nid,
            ResourceLedger(total),
            labels=labels,
            config=SchedulerConfig(**{**scfg.__dict__, "queue_limit": config.queue_per_cpu * cpus}),
            seed=config.seed * 100_003 + i,
        )
        if config.policy == "random":
            core.policy = core.submitter.policy = RandomPlacement(seed=config.seed * 7 + i)
        cores[nid] = core
        publishers[nid] = ViewPublisher(
            min_interval=config.push_interval,
            heartbeat=config.push_heartbeat,
            load_step=config.push_load_step,
        )
        for resource in ("CPU", "GPU", "accel"):
            if resource in total:
                by_resource[resource].append(nid)
    submitter_ids = node_ids[:: max(1, config.nodes // config.submitters)][: config.submitters]
    holders_of_task: dict[str, frozenset[str]] = {}
    feasible_holder: dict[str, bool] = {}
    submitted_at: dict[str, float] = {}
    wakeups: dict[str, float] = {}  # node -> time of its scheduled poll
    push_at: dict[str, float] = {}  # node -> time of its scheduled push check
    started_on: dict[str, str] = {}  # task id -> node running it
    ran_on: dict[str, list[str]] = {}  # submitter -> nodes its latest tasks ran on

    def is_feasible(nid: str, req: PlacementRequest) -> bool:
        local = cores[nid].local
        return local.ledger.could_ever_fit(req.resources) and all(
            local.labels.get(k) == v for k, v in req.label_selector.items()
        )

    # driving a core ----------------------------------------------------------------------------
    def arm(nid: str) -> None:
        when = cores[nid].next_wakeup(sim.now)
        if when is None or when > config.time_limit:
            return
        when = max(when, sim.now + 0.001)
        scheduled = wakeups.get(nid)
        if scheduled is not None and scheduled <= when:
            return
        wakeups[nid] = when
        sim.call_at(when, fire, nid, when)

    def fire(nid: str, when: float) -> None:
        if wakeups.get(nid) != when:
            return  # superseded by an earlier wakeup
        del wakeups[nid]
        handle(nid, cores[nid].poll(sim.now))

    def changed(nid: str) -> None:
        """The node's load changed: push its view to subscribers when due."""
        if not len(publishers[nid]):
            return
        when = publishers[nid].next_wakeup(cores[nid].local.view(sim.now), sim.now)
        if when is None:
            return
        when = max(when, sim.now)
        scheduled = push_at.get(nid)
        if scheduled is not None and scheduled <= when:
            return
        push_at[nid] = when
        sim.call_at(when, push, nid, when)

    def push(nid: str, when: float) -> None:
        if push_at.get(nid) != when:
            return  # superseded by an earlier one
        del push_at[nid]
        view = cores[nid].local.view(sim.now)
        for sub in publishers[nid].due(view, sim.now):
            result.count("push")
            net.send(nid, sub, _Msg("view", snapshot_view(view)), size=300, kind="push")
        changed(nid)

    def snapshot_view(view: NodeView) -> NodeView:
        return NodeView(
            view.node_id,
            dict(view.total),
            dict(view.available),
            dict(view.labels),
            queued=view.queued,
            running=view.running,
            ad_time=view.ad_time,
            queue_limit=view.queue_limit,
            alive=view.alive,
        )

    def received(view: NodeView) -> NodeView:
        view = snapshot_view(view)
        view.ad_time = sim.now
        return view

    def start(nid: str, task_id: str) -> None:
        started_on[task_id] = nid
        sid = task_id.split("/", 1)[0]
        recent = ran_on.setdefault(sid, [])
        recent.append(nid)
        if len(recent) > config.graph_window:
            del recent[: len(recent) - config.graph_window]
        sim.call_later(rng.expovariate(1.0 / config.mean_duration), finish, nid, task_id)

    def finish(nid: str, task_id: str) -> None:
        result.finished += 1
        started_on.pop(task_id, None)
        handle(nid, cores[nid].finish(task_id, sim.now))
        changed(nid)

    def handle(nid: str, actions: Sequence[object]) -> None:
        # a subscription to a node that is sent a placement in the same batch rides on the
        # offer (its reply carries the view anyway): no message of its own
        riding = {a.node_id for a in actions if isinstance(a, SendPlacement)} & {
            a.node_id for a in actions if isinstance(a, Subscribe)
        }
        for action in actions:
            if isinstance(action, StartLocal):
                start(nid, action.request.task_id)
                if action.request.submitter == nid:
                    placed(nid, action.request.task_id, nid, 1, "local")
            elif isinstance(action, SendPlacement):
                if not is_feasible(action.node_id, action.request):
                    result.infeasible_placements += 1
                if action.attempt > 1:
                    result.spillbacks += 1
                result.count("place", 2)
                sub = action.node_id in riding
                riding.discard(action.node_id)
                net.send(nid, action.node_id, _Msg("offer", (action.request, sub)), size=300)
            elif isinstance(action, Placed):
                placed(nid, action.task_id, action.node_id, action.attempts, action.reason)
            elif isinstance(action, PlacementFailed):
                result.failed += 1
            elif isinstance(action, LookupCapacity):
                result.count("lookup", config.dht_lookup_messages)
                sim.call_later(config.dht_latency, dht_answer, nid, action.resource)
            elif isinstance(action, Subscribe):
                if action.node_id in riding:
                    continue
                result.count("subscribe", 2)
                net.send(nid, action.node_id, _Msg("subscribe", None), size=100)
            elif isinstance(action, Unsubscribe):
                result.count("subscribe", 1)
                net.send(nid, action.node_id, _Msg("unsubscribe", None), size=100)
            elif isinstance(action, PlacementWarning | EndTasks):
                pass
            else:
                raise AssertionError(f"unexpected action {action!r}")
        arm(nid)

    def placed(sid: str, task_id: str, node: str, attempts: int, reason: str) -> None:
        if task_id not in submitted_at:
            return
        result.placed += 1
        result.attempts.append(attempts)
        latency = sim.now - submitted_at.pop(task_id)
        result.latencies.append(latency)
        acc = result.per_submitter.setdefault(sid, [0.0, 0])
        acc[0] += latency
        acc[1] += 1
        if feasible_holder.pop(task_id):
            result.with_feasible_holder += 1
            if node in holders_of_task[task_id]:
                result.placed_with_data += 1
            else:
                why = reason + (" (saturated)" if cores[sid].snapshot.mean_load() >= 1 else "")
                result.nonlocal_reasons[why] = result.nonlocal_reasons.get(why, 0) + 1
        del holders_of_task[task_id]

    def dht_answer(nid: str, resource: str) -> None:
        holders = by_resource.get(resource, [])
        picks = rng.sample(holders, min(config.dht_answer, len(holders)))
        views = [received(ads[p]) for p in picks if p in ads]
        handle(nid, cores[nid].on_capacity(resource, views, sim.now))

    def make_handler(nid: str) -> Any:
        core = cores[nid]

        def on_message(src: str, msg: _Msg, size: int) -> None:
            kind = msg.kind
            if kind == "offer":
                request, subscribe = msg.body
                admission = core.offer(request, sim.now)
                if admission.allocation is not None:
                    start(nid, request.task_id)
                    changed(nid)
                if subscribe:
                    publishers[nid].subscribe(src, sim.now)
                view = core.local.view(sim.now)
                if admission.kind is AdmissionKind.REJECTED and not admission.infeasible:
                    publishers[nid].watch_once(src, view, sim.now)
                    changed(nid)
                publishers[nid].sent(src, view, sim.now)
                net.send(nid, src, _Msg("admission", (admission, snapshot_view(view))), size=300)
                arm(nid)
            elif kind == "admission":
                admission, view = msg.body
                assert isinstance(admission, QueueAdmission)
                view.ad_time = sim.now
                admission = dataclasses.replace(admission, hint=view)  # as the runtime's answers
                handle(nid, core.on_admission(admission, sim.now))
                handle(nid, core.on_view(view, sim.now))
            elif kind == "subscribe":
                publishers[nid].subscribe(src, sim.now)
                view = core.local.view(sim.now)
                publishers[nid].sent(src, view, sim.now)
                net.send(nid, src, _Msg("view", snapshot_view(view)), size=300)
            elif kind == "unsubscribe":
                publishers[nid].unsubscribe(src)
            elif kind == "view":
                msg.body.ad_time = sim.now
                handle(nid, core.on_view(msg.body, sim.now))

        return on_message

    for nid in node_ids:
        net.attach(nid, make_handler(nid))

    # ads ---------------------------------------------------------------------------------------
    def advertise(nid: str) -> None:
        ads[nid] = snapshot_view(cores[nid].local.view(sim.now))
        result.count("ads", config.dht_publish_messages)
        if sim.now < config.time_limit and result.finished + result.failed < config.tasks:
            sim.call_later(config.ad_period, advertise, nid)

    for nid in node_ids:
        ads[nid] = snapshot_view(cores[nid].local.view(0.0))
        sim.call_later(rng.uniform(0, config.ad_period), advertise, nid)
    for sid in submitter_ids:
        for peer in rng.sample(node_ids, min(config.bootstrap + 1, len(node_ids))):
            if peer != sid and len(cores[sid].neighbours()) < config.bootstrap:
                handle(sid, cores[sid].add_neighbour(peer, 0.0))

    # workload --------------------------------------------------------------------------------
    cpu_cum: list[float] = []
    for nid in node_ids:
        cpu_cum.append((cpu_cum[-1] if cpu_cum else 0.0) + cores[nid].local.ledger.total["CPU"])
    gpu_nodes = by_resource["GPU"]

    def make_task(k: int, sid: str) -> tuple[PlacementRequest, frozenset[str]]:
        u = rng.random()
        resources: dict[str, float] = {"CPU": 1}
        selector: dict[str, str | Sequence[str]] = {}
        if u < config.gpu_task_fraction:
            resources["GPU"] = rng.choice([0.25, 0.5, 1])
        elif u < config.gpu_task_fraction + config.custom_task_fraction:
            resources["accel"] = 1
        elif (
            u < config.gpu_task_fraction + config.custom_task_fraction + config.label_task_fraction
        ):
            selector = {"zone": "eu"}
        replicas = rng.choice([1, 2, 3])
        recent = ran_on.get(sid)
        if "GPU" in resources and rng.random() < 0.5 and gpu_nodes:
            holders = frozenset(rng.sample(gpu_nodes, min(replicas, len(gpu_nodes))))
        elif config.holders == "graph" and recent and rng.random() < config.graph_fraction:
            holders = frozenset(rng.choice(recent) for _ in range(replicas))
        else:
            holders = frozenset(rng.choices(node_ids, cum_weights=cpu_cum, k=replicas))
        if rng.random() < config.large_arg_fraction:
            size = rng.choice([1, 4, 16, 64]) * 2**20
        else:
            size = 64 * 1024
        cid = f"obj{k}"
        request = PlacementRequest(
            f"{sid}/t{k}", resources, sid, label_selector=selector, args=((cid, size),)
        )
        return request, holders

    def arrive(k: int, sid: str) -> None:
        request, holders = make_task(k, sid)
        core = cores[sid]
        cid, size = request.args[0]
        core.note_object(cid, size, sorted(holders))
        submitted_at[request.task_id] = sim.now
        holders_of_task[request.task_id] = holders
        feasible_holder[request.task_id] = size >= scfg.locality_min_bytes and any(
            is_feasible(h, request) for h in holders
        )
        handle(sid, core.submit(request, sim.now))
        changed(sid)

    for k in range(config.tasks):
        sid = submitter_ids[k % len(submitter_ids)]
        sim.call_at(rng.uniform(0, config.arrival_window), arrive, k, sid)

    # load samples ----------------------------------------------------------------------------
    def sample() -> None:
        loads = []
        busy = 0.0
        total_cpu = 0.0
        queued_total = 0
        for core in cores.values():
            local = core.local
            cpus = local.ledger.total["CPU"]
            loads.append((local.running + local.queued) / cpus)
            busy += cpus - local.ledger.available.get("CPU", 0.0)
            total_cpu += cpus
            queued_total += local.queued
        utilization = busy / total_cpu
        waiting = sum(cores[s].submitter.waiting for s in submitter_ids)
        if utilization > 0.9 and (queued_total + waiting) > total_cpu * 0.5:
            mean = sum(loads) / len(loads)
            result.saturated_ratios.append(max(loads) / mean)
            result.saturated_utilization.append(utilization)
        for s in submitter_ids:
            result.neighbourhood_max = max(result.neighbourhood_max, len(cores[s].neighbours()))
            result.snapshot_max = max(result.snapshot_max, len(cores[s].snapshot.nodes))
        if sim.now < config.time_limit and result.finished + result.failed < config.tasks:
            sim.call_later(config.sample_every, sample)

    sim.call_later(config.sample_every, sample)
    sim.run(until=config.time_limit, stop=lambda: result.finished + result.failed >= config.tasks)
    result.virtual_time = sim.now
    result.events = sim.events_processed
    if any(math.isnan(r) for r in result.saturated_ratios):
        raise AssertionError("load sample produced NaN")
    return result
