"""NodeStateSource: a runtime node as a StateSource (latticaray.observe.model).

It reads the node's parts where they live: the task table and the recently ended tasks
(activity.py), hosted actors, owned objects and the store's totals, the resource ledger; and,
when the node is part of a mesh, its connections (the path type of each: Unix, direct QUIC or
TCP, hole-punched, relayed), the members it admitted and their pushed views, and the object
exchange's fetches in flight. Another member's report comes over the members-only
``/latticaray/report/1`` (remote/observe.py); the RTT of that link is measured with a ping first.

It also feeds the process's scrape-time gauges (queue depth, running tasks, store bytes,
connections per path, relay reservations); ``close()`` takes them back.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from latticaray.observe import metrics
from latticaray.observe.model import (
    DEFAULT_ROW_LIMIT,
    ActorRow,
    LinkRow,
    NodeReport,
    NodeRow,
    ObjectRow,
    PathType,
    TaskRow,
    TransferRow,
)
from latticaray.runtime.states import ActorState, TaskState

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

__all__ = ["NodeStateSource", "path_of"]

_TASK_STATE = {
    TaskState.RESOLVING: "PENDING_ARGS_AVAIL",
    TaskState.SCHEDULING: "PENDING_NODE_ASSIGNMENT",
    TaskState.DEFERRED: "PENDING_NODE_ASSIGNMENT",
    TaskState.QUEUED: "SUBMITTED_TO_WORKER",
    TaskState.RUNNING: "RUNNING",
    TaskState.REMOTE: "RUNNING",
    TaskState.STREAMING: "RUNNING",
    TaskState.CANCELLING: "RUNNING",
    TaskState.FINISHED: "FINISHED",
    TaskState.FAILED: "FAILED",
}
_ACTOR_STATE = {
    ActorState.PENDING: "PENDING_CREATION",
    ActorState.ALIVE: "ALIVE",
    ActorState.RESTARTING: "RESTARTING",
    ActorState.DEAD: "DEAD",
}
_HOST = socket.gethostname()


def path_of(conn: Any, punched: bool) -> str:
    """The path type of a mesh connection."""
    if conn is None:
        return PathType.NONE.value
    if conn.relayed:
        return PathType.RELAYED.value
    if conn.transport == "unix":
        return PathType.UNIX.value
    return PathType.PUNCHED.value if punched else PathType.DIRECT.value


def _owner(rec: Any, node_id: str) -> str:
    client = rec.client
    return client.node_id if getattr(client, "kind", "") == "remote" else node_id


class NodeStateSource:
    """What one RuntimeNode (and its mesh, if any) reports about itself."""

    def __init__(self, node: RuntimeNode, mesh_runtime: Any = None) -> None:
        self.node = node
        self.mesh_runtime = mesh_runtime
        self.started = time.time()
        self.rtts: dict[str, float] = {}  # node id -> ms, from the last ping
        self.role = "worker"  # "driver": the node embedded in a driver process (init())
        self._unregister = [
            metrics.QUEUE_DEPTH.register(lambda: [((), len(node.tasks.ready_queue))]),
            metrics.TASKS_RUNNING.register(lambda: [((), self._running())]),
            metrics.OBJECT_STORE_BYTES.register(lambda: [((), self._store().get("used", 0))]),
            metrics.OBJECT_STORE_CAPACITY.register(
                lambda: [((), self._store().get("capacity", 0))]
            ),
            metrics.OBJECT_STORE_OBJECTS.register(lambda: [((), self._store().get("objects", 0))]),
            metrics.CONNECTIONS.register(self._connections_by_path),
            metrics.RELAY_RESERVATIONS.register(self._reservations),
        ]

    def close(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister.clear()

    @property
    def node_id(self) -> str:
        return self.node.node_id

    # ------------------------------------------------------------------ pieces
    @property
    def _mesh(self) -> Any:
        return getattr(self.mesh_runtime, "mesh", None)

    @property
    def _nat(self) -> Any:
        return getattr(self.mesh_runtime, "nat", None)

    def _store(self) -> dict[str, int]:
        store = self.node.store
        if store is None:
            return {}
        try:
            return dict(store.stats())
        except Exception:
            return {}

    def _running(self) -> int:
        node = self.node
        return node.workers.running() + sum(len(a.inflight) for a in node.actors.hosted.values())

    def _punched(self, peer: Any) -> bool:
        nat = self._nat
        link = nat.links.get(peer) if nat is not None else None
        return link is not None and getattr(link.metrics, "upgraded_at", None) is not None

    def _connections_by_path(self) -> list[tuple[tuple[str], float]]:
        mesh = self._mesh
        if mesh is None:
            return []
        counts: dict[str, int] = {}
        for conn in mesh.connections.connections():
            if not conn.closed:
                path = path_of(conn, self._punched(conn.peer_id))
                counts[path] = counts.get(path, 0) + 1
        return [((path,), float(n)) for path, n in counts.items()]

    def _reservations(self) -> list[tuple[tuple[()], float]]:
        nat = self._nat
        client = getattr(nat, "relay_client", None)
        return [((), float(len(client.reservations)))] if client is not None else []

    # ------------------------------------------------------------------ StateSource
    def node_row(self) -> NodeRow:
        node = self.node
        ledger = node.ledger
        total = dict(ledger.total)
        available = dict(ledger.available)
        used = {k: max(0.0, v - available.get(k, 0.0)) for k, v in total.items()}
        store = self._store()
        mesh_runtime = self.mesh_runtime
        nat = self._nat
        reachability = "unknown"
        if nat is not None:
            reachability = "public" if nat.is_public else "private"
        return NodeRow(
            node_id=node.node_id,
            node_name=_HOST,
            role=self.role,
            addrs=tuple(str(a)[:4096] for a in getattr(mesh_runtime, "advertised_addrs", [])[:64]),
            reachability=reachability,
            resources_total=total,
            resources_used=used,
            tasks_running=self._running(),
            tasks_queued=len(node.tasks.ready_queue),
            tasks_finished=node.activity.finished,
            tasks_failed=node.activity.failed,
            actors=node.actors.alive_count(),
            objects=int(store.get("objects", len(node.objects.entries))),
            object_store_bytes=int(store.get("used", 0)),
            object_store_capacity=int(store.get("capacity", 0)),
            pid=os.getpid(),
            start_time=self.started,
            report_time=time.time(),
            is_self=True,
        )

    def links(self) -> list[LinkRow]:
        mesh = self._mesh
        if mesh is None:
            return []
        rows = []
        for peer in mesh.connected_peers():
            conn = mesh.connection_to(peer)
            if conn is None:
                continue
            rows.append(
                LinkRow(
                    src=self.node_id,
                    dst=str(peer),
                    path=path_of(conn, self._punched(peer)),
                    transport=conn.transport,
                    rtt_ms=self.rtts.get(str(peer)),
                    remote_addr=str(conn.remote_addr or "")[:4096],
                )
            )
        return rows

    def tasks(self, limit: int) -> tuple[list[TaskRow], int]:
        node = self.node
        rows: list[TaskRow] = []
        now = time.time()
        activity = node.activity
        for rec in list(node.tasks.records.values()):
            if len(rows) >= limit:
                break
            running_here = rec.worker is not None
            worker = rec.worker
            rows.append(
                TaskRow(
                    task_id=rec.tid.hex(),
                    name=rec.name,
                    state=_TASK_STATE.get(rec.state, "PENDING_NODE_ASSIGNMENT"),
                    type="ACTOR_TASK" if "aid" in rec.msg else "NORMAL_TASK",
                    node_id=node.node_id if running_here else (rec.remote_peer or ""),
                    owner_node_id=_owner(rec, node.node_id),
                    actor_id=rec.msg["aid"].hex() if "aid" in rec.msg else None,
                    worker_pid=worker.proc.pid if running_here and worker.proc else None,
                    submit_time=activity.submitted_at.get(rec.tid, now),
                    start_time=activity.started_at.get(rec.tid),
                )
            )
        live = len(rows)
        recent = list(activity.recent)[-max(0, limit - live) :] if limit > live else []
        dropped = max(0, len(node.tasks.records) - live) + len(activity.recent) - len(recent)
        return rows + recent, dropped

    def actors(self, limit: int) -> list[ActorRow]:
        rows = []
        for aid, actor in list(self.node.actors.hosted.items())[:limit]:
            worker = actor.worker
            rows.append(
                ActorRow(
                    actor_id=aid.hex(),
                    class_name=str(actor.msg.get("cname", "actor"))[:256],
                    state=_ACTOR_STATE.get(actor.state, "PENDING_CREATION"),
                    name=actor.name,
                    ray_namespace=actor.namespace,
                    node_id=self.node_id,
                    pid=worker.proc.pid if worker is not None and worker.proc else None,
                    num_restarts=actor.restarts,
                    is_detached=actor.opts.get("lifetime") == "detached",
                    death_cause=(actor.death_cause or None) if actor.dead else None,
                    required_resources=dict(actor.demand),
                )
            )
        return rows

    def objects(self, limit: int) -> tuple[list[ObjectRow], int]:
        entries = self.node.objects.entries
        rows: list[ObjectRow] = []
        for oid, entry in list(entries.items())[:limit]:
            data = entry.data
            rows.append(
                ObjectRow(
                    object_id=oid.hex(),
                    node_id=entry.holder or self.node_id,
                    object_size=len(data) if isinstance(data, (bytes, bytearray)) else 0,
                    cid=entry.cid,
                    reference_type="BORROWED" if entry.holder else "LOCAL_REFERENCE",
                    task_status="PENDING" if entry.status == -1 else "FINISHED",
                    task_id=oid[:-4].hex() if len(oid) > 4 else None,
                )
            )
        return rows, max(0, len(entries) - len(rows))

    def transfers(self) -> list[TransferRow]:
        """Objects coming in: the exchange's fetches (Bitswap) and fetches from a member over
        ``/latticaray/object/1`` (by id or CID), each with its bytes done and total."""
        rows = []
        exchange = getattr(self.mesh_runtime, "exchange", None)
        fetches = getattr(exchange, "fetches", None)
        for cid, done, total, started in fetches() if fetches is not None else ():
            rows.append(
                TransferRow(
                    object_id=str(cid),
                    node_id=self.node_id,
                    direction="in",
                    bytes_done=done,
                    bytes_total=total,
                    start_time=started,
                )
            )
        remote = getattr(self.node, "remote", None)
        inflight = getattr(getattr(remote, "objects", None), "inflight", None) or {}
        for cid, done, total, started, peer in list(inflight.values()):
            rows.append(
                TransferRow(
                    object_id=cid,
                    node_id=self.node_id,
                    peer=peer,
                    direction="in",
                    bytes_done=done,
                    bytes_total=total,
                    start_time=started,
                )
            )
        return rows

    def local_report(self, limit: int = DEFAULT_ROW_LIMIT) -> NodeReport:
        tasks, dropped_tasks = self.tasks(limit)
        objects, dropped_objects = self.objects(limit)
        return NodeReport(
            node=self.node_row(),
            links=tuple(self.links()),
            tasks=tuple(tasks),
            actors=tuple(self.actors(limit)),
            objects=tuple(objects),
            transfers=tuple(self.transfers()),
            truncated=dropped_tasks + dropped_objects,
        )

    def member_rows(self) -> list[NodeRow]:
        remote = self.node.remote
        if remote is None:
            return []
        rows = []
        for node_id, peer in list(remote.membership.peers.items()):
            view = peer.view
            total = dict(view.total) if view is not None else {}
            avail = dict(view.avail) if view is not None else {}
            rows.append(
                NodeRow(
                    node_id=node_id,
                    state="ALIVE" if peer.alive else "DEAD",
                    resources_total=total,
                    resources_used={k: max(0.0, v - avail.get(k, 0.0)) for k, v in total.items()},
                    tasks_running=view.running if view is not None else 0,
                    tasks_queued=view.queued if view is not None else 0,
                    stale=True,
                )
            )
        for node_id, alive, total, avail in remote.membership.beyond_neighbourhood():
            rows.append(
                NodeRow(
                    node_id=node_id,
                    state="ALIVE" if alive else "DEAD",
                    resources_total=total,
                    resources_used={k: max(0.0, v - avail.get(k, 0.0)) for k, v in total.items()},
                    stale=True,
                )
            )
        return rows

    async def remote_report(self, node_id: str, limit: int, timeout: float) -> NodeReport:
        remote = self.node.remote
        if remote is None:
            raise RuntimeError("this node is not part of a mesh")
        return await remote.observe.request_report(node_id, limit, timeout, self.rtts)
