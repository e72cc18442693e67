"""A fake StateSource: a small mesh with every path type, for the state API, CLI and dashboard.

The observing node is a driver on a laptop; it reaches a worker on the same host over Unix, a
public worker directly over QUIC, a cone-NAT worker through a hole-punched QUIC path, and a
symmetric-NAT worker through a relay; one more member is known from the membership view but
does not answer. Reports are counted so tests can check what was asked.
"""

from __future__ import annotations

import asyncio
import time

from latticaray.observe.model import (
    ActorRow,
    LinkRow,
    NodeReport,
    NodeRow,
    ObjectRow,
    TaskRow,
    TransferRow,
    decode_report,
    encode_report,
)

DRIVER = "12D3KooWDriverLaptop000000000000000000000000000001"
LOCAL = "12D3KooWLocalWorker0000000000000000000000000000002"
PUBLIC = "12D3KooWPublicWorker000000000000000000000000000003"
CONE = "12D3KooWConeNatWorker00000000000000000000000000004"
SYMMETRIC = "12D3KooWSymmetricNat0000000000000000000000000000005"
GONE = "12D3KooWGoneAway0000000000000000000000000000000006"

PATHS = {LOCAL: "unix", PUBLIC: "direct", CONE: "punched", SYMMETRIC: "relayed"}
TRANSPORTS = {LOCAL: "unix", PUBLIC: "quic", CONE: "quic", SYMMETRIC: "relay"}
RTTS = {LOCAL: 0.08, PUBLIC: 12.5, CONE: 31.0, SYMMETRIC: 74.2}
NAMES = {
    DRIVER: "laptop",
    LOCAL: "laptop",
    PUBLIC: "pub1",
    CONE: "hostB",
    SYMMETRIC: "hostC",
    GONE: "old",
}


def _node(node_id: str, **kw) -> NodeRow:
    base = {
        "node_id": node_id,
        "node_name": NAMES[node_id],
        "role": "driver" if node_id == DRIVER else "worker",
        "addrs": (f"/ip4/198.18.0.{len(NAMES[node_id])}/udp/4001/quic-v1",),
        "reachability": "public" if node_id == PUBLIC else "private",
        "resources_total": {"CPU": 4.0, "memory": float(8 << 30)},
        "resources_used": {"CPU": 1.0, "memory": float(1 << 30)},
        "pid": 1000 + len(node_id) + ord(node_id[9]),
        "start_time": time.time() - 3600,
        "report_time": time.time(),
    }
    base.update(kw)
    return NodeRow(**base)


class FakeSource:
    """Implements StateSource; ``remote_report`` goes through the wire codec like the real RPC."""

    def __init__(self, observer: str = DRIVER, delay: float = 0.0) -> None:
        self._observer = observer
        self.delay = delay
        self.asked: list[str] = []
        self.tick = 0  # moves transfers and counts forward, like a live mesh

    @property
    def node_id(self) -> str:
        return self._observer

    def report_of(self, node_id: str, limit: int) -> NodeReport:
        now = time.time()
        t = self.tick
        if node_id == DRIVER:
            links = tuple(
                LinkRow(
                    src=DRIVER,
                    dst=peer,
                    path=PATHS[peer],
                    transport=TRANSPORTS[peer],
                    rtt_ms=RTTS[peer],
                    bytes_sent=1000 * (i + 1),
                    bytes_received=5000 * (i + 1),
                )
                for i, peer in enumerate(PATHS)
            )
            tasks = tuple(
                TaskRow(
                    task_id=f"t{i:04d}",
                    name="square" if i % 3 else "Counter.incr",
                    type="NORMAL_TASK" if i % 3 else "ACTOR_TASK",
                    state=("FINISHED", "RUNNING", "PENDING_NODE_ASSIGNMENT", "FAILED")[i % 4],
                    node_id=(LOCAL, PUBLIC, CONE, SYMMETRIC)[i % 4],
                    owner_node_id=DRIVER,
                    submit_time=now - 10,
                    error_type="ValueError" if i % 4 == 3 else None,
                )
                for i in range(12)
            )
            objects = (
                ObjectRow(
                    object_id="obj-big",
                    node_id=DRIVER,
                    object_size=200 << 20,
                    cid="bafyreibigobject",
                    reference_type="PINNED_IN_MEMORY",
                ),
                ObjectRow(object_id="obj-small", node_id=DRIVER, object_size=1200),
            )
            transfers = (
                TransferRow(
                    object_id="bafyreibigobject",
                    node_id=DRIVER,
                    peer=SYMMETRIC,
                    direction="out",
                    path="relayed",
                    bytes_done=min(200 << 20, (60 + 10 * t) << 20),
                    bytes_total=200 << 20,
                    start_time=now - 5,
                ),
            )
            node = _node(
                DRIVER,
                is_self=self._observer == DRIVER,
                tasks_finished=100 + 5 * t,
                tasks_failed=3,
                objects=2,
                object_store_bytes=(200 << 20) + 1200,
                object_store_capacity=2 << 30,
                resources_total={},
                resources_used={},
            )
            report = NodeReport(node, links, tasks[:limit], (), objects[:limit], transfers)
            return report
        actors = ()
        if node_id == PUBLIC:
            actors = (
                ActorRow(
                    actor_id="a1",
                    class_name="Counter",
                    state="ALIVE",
                    name="counter",
                    node_id=PUBLIC,
                    pid=4242,
                ),
                ActorRow(
                    actor_id="a2",
                    class_name="Counter",
                    state="DEAD",
                    node_id=PUBLIC,
                    death_cause="killed",
                ),
            )
        if node_id == CONE:
            actors = (
                ActorRow(actor_id="a3", class_name="Trainer", state="ALIVE", node_id=CONE, pid=7),
            )
        tasks = ()
        if node_id == PUBLIC:  # the executing node reports a task its owner has as pending
            tasks = (
                TaskRow(
                    task_id="t0002",
                    name="square",
                    state="RUNNING",
                    node_id=PUBLIC,
                    owner_node_id=DRIVER,
                    worker_pid=4343,
                ),
            )
        links = (LinkRow(src=node_id, dst=DRIVER, path=PATHS[node_id], rtt_ms=RTTS[node_id]),)
        node = _node(
            node_id,
            tasks_running=1 + t % 2,
            tasks_queued=t % 3,
            tasks_finished=10 * (1 + len(node_id) % 3) + t,
            actors=len(actors),
            objects=1,
            object_store_bytes=5 << 20,
            object_store_capacity=4 << 30,
        )
        objects = (ObjectRow(object_id="obj-big", node_id=node_id, object_size=200 << 20),)
        return NodeReport(node, links, tasks[:limit], actors[:limit], objects[:limit], ())

    def local_report(self, limit: int = 1000) -> NodeReport:
        return self.report_of(self._observer, limit)

    def member_rows(self) -> list[NodeRow]:
        ids = [DRIVER, LOCAL, PUBLIC, CONE, SYMMETRIC, GONE]
        return [_node(n, stale=True) for n in ids if n != self._observer]

    async def remote_report(self, node_id: str, limit: int, timeout: float) -> NodeReport:
        self.asked.append(node_id)
        if self.delay:
            await asyncio.sleep(self.delay)
        if node_id == GONE:
            raise TimeoutError("no answer")
        return decode_report(encode_report(self.report_of(node_id, limit)))
