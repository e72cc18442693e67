"""Scheduler simulation over :mod:`latticaray.mesh.sim`: many nodes, submitters, stale ads.

The same sans-I/O objects that run in a node — :class:`PlacementPolicy`, :class:`Submitter`,
:class:`LocalScheduler` — are driven here by the virtual clock and network:

* every node advertises its view (capacity, load) every ``ad_period`` seconds (jittered) to a
  board standing in for the DHT ``capacity/*`` keys and the CRDT member view; each submitter
  re-reads the board every ``view_period`` seconds, so placements are made on stale ads;
* a placement is a request message to the chosen node and an admission reply (2 messages per
  attempt); a rejection carries a hint and the submitter spills over to another node;
* tasks need CPU (some a GPU or a custom resource, some a label) and take one argument object held
  by 1-3 nodes, drawn in proportion to their CPUs (objects are results of earlier tasks); a task
  runs for an exponentially distributed time;
* node queues are bounded (``queue_per_cpu``); what does not fit waits at the submitters.

``policy="random"`` swaps in :class:`RandomPlacement` as a baseline.

:func:`run_simulation` returns a :class:`SimulationResult` with the load balance at saturation,
data-local placement, placement latency in messages and seconds, and spillback counts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from latticaray.mesh.sim import Simulator, VirtualNetwork

from .local import AdmissionKind, LocalScheduler
from .policy import (
    ClusterSnapshot,
    Decision,
    DecisionKind,
    NodeView,
    ObjectInfo,
    PlacementPolicy,
    PlacementRequest,
)
from .resources import ResourceLedger, fits
from .submitter import Placed, PlacementFailed, SendPlacement, Submitter

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
    ad_period: float = 1.0
    view_period: float = 1.0
    latency: float = 0.005
    queue_per_cpu: int = 1
    gpu_task_fraction: float = 0.02
    custom_task_fraction: float = 0.005
    label_task_fraction: float = 0.05
    max_attempts: int = 4
    choices: int = 2
    locality_slack: float = 1.3
    locality_delay: float = 10.0
    sample_every: float = 0.5
    #: None: each submitter reads every node's ad (the CRDT member view of a small mesh). N: it
    #: reads N random nodes per refresh from ``capacity/CPU`` plus samples of the GPU and custom
    #: resource keys, and fetches the ads of its arguments' holders (2 messages each) — the
    #: large-mesh path where no node knows everyone.
    view_sample: int | None = None
    #: "latticaray" (this package's policy) or "random" (baseline: uniform random feasible node
    #: with room in its ad, no locality, no anti-herding memory).
    policy: str = "latticaray"
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
    messages: int = 0
    #: holder ad fetches in sampled-view mode (messages)
    lookup_messages: int = 0

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
        return {
            "nodes": self.config.nodes,
            "submitters": self.config.submitters,
            "tasks": self.config.tasks,
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
            "data_local_fraction": round(self.placed_with_data / self.with_feasible_holder, 4)
            if self.with_feasible_holder
            else None,
            "tasks_with_feasible_holder": self.with_feasible_holder,
            "messages_per_placement_mean": round(2 * statistics.mean(att), 3),
            "messages_per_placement_p99": 2 * att[min(len(att) - 1, int(0.99 * len(att)))],
            "messages_per_placement_max": 2 * att[-1],
            "placement_latency_s_p50": round(lat[len(lat) // 2], 4),
            "placement_latency_s_p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
            "submitter_latency_jain_index": self.jain_index(),
            "spillbacks": self.spillbacks,
            "nonlocal_reasons": dict(sorted(self.nonlocal_reasons.items())),
            "placed_on_infeasible_node": self.infeasible_placements,
            "virtual_time_s": round(self.virtual_time, 2),
            "events": self.events,
            "messages": self.messages,
            "holder_lookup_messages_per_task": round(self.lookup_messages / max(1, self.placed), 3),
        }


class RandomPlacement(PlacementPolicy):
    """Baseline: a uniformly random feasible node whose ad shows room (or queue space)."""

    def _place_default(self, snapshot, request, now):
        feasible = self._feasible(snapshot, request)
        if not feasible:
            return self._no_candidate(snapshot, request)
        for _ in range(8):
            view = snapshot.nodes[feasible[self.rng.randrange(len(feasible))]]
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

    def _record(self, node_id, request, now, queues):
        pass  # no anti-herding memory


def run_simulation(config: SimulationConfig) -> SimulationResult:
    sim = Simulator(seed=config.seed)
    rng = sim.rng
    net = VirtualNetwork(sim, latency=config.latency)
    result = SimulationResult(config)

    # heterogeneous nodes ---------------------------------------------------------------------
    node_ids = [f"n{i:04d}" for i in range(config.nodes)]
    locals_: dict[str, LocalScheduler] = {}
    for i, nid in enumerate(node_ids):
        cpus = rng.choice([2, 4, 4, 8, 8, 16, 32])
        total: dict[str, float] = {"CPU": cpus, "memory": cpus * 4 * 2**30}
        if i % 10 == 3:
            total["GPU"] = rng.choice([1, 2, 4, 8])
        if i % 50 == 7:
            total["accel"] = 4
        labels = {"zone": "us" if i % 3 else "eu"}
        locals_[nid] = LocalScheduler(
            nid, ResourceLedger(total), labels=labels, queue_limit=config.queue_per_cpu * cpus
        )
    board: dict[str, NodeView] = {nid: ls.view(0.0) for nid, ls in locals_.items()}
    gpu_nodes = [n for n in node_ids if "GPU" in locals_[n].ledger.total]
    accel_nodes = [n for n in node_ids if "accel" in locals_[n].ledger.total]

    # submitters ------------------------------------------------------------------------------
    submitter_ids = node_ids[:: max(1, config.nodes // config.submitters)][: config.submitters]
    submitters: dict[str, Submitter] = {}
    # Object locations come from the DHT provider records; every submitter sees the same table.
    object_table: dict = {}
    for k, sid in enumerate(submitter_ids):
        initial = board.values() if config.view_sample is None else []
        snapshot = ClusterSnapshot(initial, objects=object_table, local_node=sid)
        policy_class = RandomPlacement if config.policy == "random" else PlacementPolicy
        policy = policy_class(
            seed=config.seed * 1000 + k,
            choices=config.choices,
            locality_slack=config.locality_slack,
            locality_delay=config.locality_delay,
            settle_time=2 * config.latency,
        )
        submitters[sid] = Submitter(
            sid,
            policy,
            snapshot,
            max_attempts=config.max_attempts,
            infeasible_timeout=5.0,
            retry_interval=0.2,
        )
    objects: dict[str, tuple[int, frozenset[str]]] = {}
    submitted_at: dict[str, float] = {}
    holders_of_task: dict[str, frozenset[str]] = {}
    feasible_holder: dict[str, bool] = {}
    poll_armed: set[str] = set()

    def is_feasible(nid: str, req: PlacementRequest) -> bool:
        ls = locals_[nid]
        return ls.ledger.could_ever_fit(req.resources) and all(
            ls.labels.get(k) == v for k, v in req.label_selector.items()
        )

    # node side -------------------------------------------------------------------------------
    def schedule_finish(ls: LocalScheduler, task_id: str) -> None:
        sim.call_later(rng.expovariate(1.0 / config.mean_duration), finish, ls, task_id)

    def finish(ls: LocalScheduler, task_id: str) -> None:
        result.finished += 1
        for admission in ls.finish(task_id, sim.now):
            schedule_finish(ls, admission.task_id)

    @dataclass
    class _PlaceMsg:
        node_target: str
        request: PlacementRequest

    def handle_actions(sid: str, actions) -> None:
        for action in actions:
            if isinstance(action, SendPlacement):
                if not is_feasible(action.node_id, action.request):
                    result.infeasible_placements += 1
                if action.attempt > 1:
                    result.spillbacks += 1
                net.send(
                    sid,
                    action.node_id,
                    ("place", _PlaceMsg(action.node_id, action.request)),
                    size=300,
                    kind="place",
                )
            elif isinstance(action, Placed):
                result.placed += 1
                result.attempts.append(action.attempts)
                latency = sim.now - submitted_at.pop(action.task_id)
                result.latencies.append(latency)
                acc = result.per_submitter.setdefault(sid, [0.0, 0])
                acc[0] += latency
                acc[1] += 1
                if feasible_holder.pop(action.task_id):
                    result.with_feasible_holder += 1
                    if action.node_id in holders_of_task[action.task_id]:
                        result.placed_with_data += 1
                    else:
                        why = action.reason + (
                            " (saturated)" if submitters[sid].snapshot.mean_load() >= 1 else ""
                        )
                        result.nonlocal_reasons[why] = result.nonlocal_reasons.get(why, 0) + 1
                del holders_of_task[action.task_id]
            elif isinstance(action, PlacementFailed):
                result.failed += 1
        arm_poll(sid)

    def arm_poll(sid: str) -> None:
        sub = submitters[sid]
        if sid in poll_armed or not (sub.waiting or sub.infeasible):
            return
        poll_armed.add(sid)
        sim.call_later(sub.retry_interval, run_poll, sid)

    def run_poll(sid: str) -> None:
        poll_armed.discard(sid)
        handle_actions(sid, submitters[sid].poll(sim.now))

    # every node receives both requests (as a node) and admissions (as a submitter)
    def make_handler(nid: str):
        def handler(src, msg, size) -> None:
            kind, payload = msg
            if kind == "place":
                ls = locals_[nid]
                admission = ls.offer(payload.request, sim.now)
                if admission.kind is AdmissionKind.STARTED:
                    schedule_finish(ls, payload.request.task_id)
                net.send(nid, src, ("admission", admission), size=200, kind="admission")
            else:
                handle_actions(nid, submitters[nid].on_admission(payload, sim.now))

        return handler

    for nid in node_ids:
        net.attach(nid, make_handler(nid))

    # ads and views ---------------------------------------------------------------------------
    def advertise(nid: str) -> None:
        board[nid] = locals_[nid].view(sim.now)
        if sim.now < config.time_limit:
            sim.call_later(config.ad_period, advertise, nid)

    def fetch_holders(sid: str, holders) -> None:
        snapshot = submitters[sid].snapshot
        for h in holders:
            known = snapshot.nodes.get(h)
            if known is None or sim.now - known.ad_time > config.view_period:
                snapshot.update_node(board[h])
                result.lookup_messages += 2

    def refresh_view(sid: str) -> None:
        sub = submitters[sid]
        if config.view_sample is None:
            for view in board.values():
                sub.snapshot.update_node(view)
        else:
            picks = rng.sample(node_ids, min(config.view_sample, len(node_ids)))
            picks += rng.sample(gpu_nodes, min(config.view_sample, len(gpu_nodes)))
            picks += accel_nodes  # a rare resource's key is small: read whole
            for nid in picks:
                sub.snapshot.update_node(board[nid])
            for request in sub.pending_requests()[:32]:  # keep waiting tasks' holders current
                fetch_holders(sid, holders_of_task.get(request.task_id, ()))
        handle_actions(sid, sub.poll(sim.now))
        if sim.now < config.time_limit and (result.placed + result.failed) < config.tasks:
            sim.call_later(config.view_period, refresh_view, sid)

    for nid in node_ids:
        sim.call_later(rng.uniform(0, config.ad_period), advertise, nid)
    for sid in submitter_ids:
        sim.call_later(rng.uniform(0, config.view_period), refresh_view, sid)

    # workload --------------------------------------------------------------------------------
    cpu_cum_weights: list[float] = []
    for nid in node_ids:
        cpu_cum_weights.append(
            (cpu_cum_weights[-1] if cpu_cum_weights else 0.0) + locals_[nid].ledger.total["CPU"]
        )

    def make_task(k: int, sid: str) -> PlacementRequest:
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
        cid = f"obj{k}"
        replicas = rng.choice([1, 2, 3])
        # Objects are results of earlier tasks, so nodes hold them in proportion to their CPUs.
        if "GPU" in resources and rng.random() < 0.5:
            holders = frozenset(rng.sample(gpu_nodes, min(replicas, len(gpu_nodes))))
        else:
            holders = frozenset(rng.choices(node_ids, cum_weights=cpu_cum_weights, k=replicas))
        size = rng.choice([1, 4, 16, 64]) * 2**20
        objects[cid] = (size, holders)
        return PlacementRequest(
            f"{sid}/t{k}", resources, sid, label_selector=selector, args=((cid, size),)
        )

    def arrive(k: int, sid: str) -> None:
        sub = submitters[sid]
        request = make_task(k, sid)
        cid = str(request.args[0][0])
        size, holders = objects[cid]
        object_table[cid] = ObjectInfo(size, holders)
        submitted_at[request.task_id] = sim.now
        holders_of_task[request.task_id] = holders
        feasible_holder[request.task_id] = any(is_feasible(h, request) for h in holders)
        if config.view_sample is not None:
            fetch_holders(sid, holders)
        handle_actions(sid, sub.submit(request, sim.now))

    for k in range(config.tasks):
        sid = submitter_ids[k % len(submitter_ids)]
        sim.call_at(rng.uniform(0, config.arrival_window), arrive, k, sid)

    # load samples ----------------------------------------------------------------------------
    def sample() -> None:
        loads = []
        busy = 0.0
        total_cpu = 0.0
        queued_total = 0
        for ls in locals_.values():
            cpus = ls.ledger.total["CPU"]
            loads.append((ls.running + ls.queued) / cpus)
            busy += cpus - ls.ledger.available.get("CPU", 0.0)
            total_cpu += cpus
            queued_total += ls.queued
        utilization = busy / total_cpu
        waiting = sum(s.waiting for s in submitters.values())
        if utilization > 0.9 and (queued_total + waiting) > total_cpu * 0.5:
            mean = sum(loads) / len(loads)
            result.saturated_ratios.append(max(loads) / mean)
            result.saturated_utilization.append(utilization)
        if sim.now < config.time_limit and result.finished + result.failed < config.tasks:
            sim.call_later(config.sample_every, sample)

    sim.call_later(config.sample_every, sample)
    sim.run(until=config.time_limit, stop=lambda: result.finished + result.failed >= config.tasks)
    result.virtual_time = sim.now
    result.events = sim.events_processed
    result.messages = net.stats.messages_sent
    if any(math.isnan(r) for r in result.saturated_ratios):
        raise AssertionError("load sample produced NaN")
    return result
