"""One snapshot of the mesh as a node knows it: its own report plus its members' reports.

:func:`gather` asks a :class:`~latticaray.observe.model.StateSource` for its local report and,
concurrently and with a deadline, for the reports of the members it knows (at most
``max_nodes``; the rest appear as the membership view's stale rows). A member that does not
answer is listed ``UNREACHABLE`` with the reason in ``errors``. Nothing here needs a head node:
any member gives the view it has.

A task can be reported twice (by the node that submitted it and the node running it); the row
furthest along its lifecycle is kept. Objects are kept per holder, as Ray lists them.

A process attached to a node (a driver, ``latticaray status``) gets the node's snapshot in the
form :func:`encode_snapshot` gives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from latticaray.observe.model import (
    DEFAULT_ROW_LIMIT,
    MAX_REPORT_BYTES,
    MAX_ROWS,
    ActorRow,
    LinkRow,
    NodeReport,
    NodeRow,
    NodeStateName,
    ObjectRow,
    ReportDecodeError,
    Row,
    StateSource,
    TaskRow,
    TaskStateName,
    TransferRow,
    unpack_bounded,
)

__all__ = [
    "MeshSnapshot",
    "decode_snapshot",
    "encode_snapshot",
    "gather",
]

_TASK_RANK = {s.value: i for i, s in enumerate(TaskStateName)}


@dataclass
class MeshSnapshot:
    """Rows from every node that answered, as one view."""

    observer: str
    taken_at: float
    nodes: list[NodeRow] = field(default_factory=list)
    links: list[LinkRow] = field(default_factory=list)
    tasks: list[TaskRow] = field(default_factory=list)
    actors: list[ActorRow] = field(default_factory=list)
    objects: list[ObjectRow] = field(default_factory=list)
    transfers: list[TransferRow] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    truncated: int = 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the dashboard's /api/snapshot)."""
        return {
            "observer": self.observer,
            "taken_at": self.taken_at,
            "nodes": [r.as_dict() for r in self.nodes],
            "links": [r.as_dict() for r in self.links],
            "tasks": [r.as_dict() for r in self.tasks],
            "actors": [r.as_dict() for r in self.actors],
            "objects": [r.as_dict() for r in self.objects],
            "transfers": [r.as_dict() for r in self.transfers],
            "errors": dict(self.errors),
            "truncated": self.truncated,
        }


_SNAPSHOT_PARTS: tuple[tuple[str, type[Row]], ...] = (
    ("nodes", NodeRow),
    ("links", LinkRow),
    ("tasks", TaskRow),
    ("actors", ActorRow),
    ("objects", ObjectRow),
    ("transfers", TransferRow),
)
MAX_SNAPSHOT_BYTES = 4 * MAX_REPORT_BYTES


def encode_snapshot(snapshot: MeshSnapshot) -> bytes:
    """A snapshot for a local client (``latticaray status`` attached to a node)."""
    parts: list[Any] = [snapshot.observer, snapshot.taken_at]
    for name, _ in _SNAPSHOT_PARTS:
        parts.append([row.to_wire() for row in getattr(snapshot, name)])
    parts.append(dict(snapshot.errors))
    parts.append(snapshot.truncated)
    return msgpack.packb(parts, use_bin_type=True)


def decode_snapshot(data: bytes) -> MeshSnapshot:
    """Parse :func:`encode_snapshot`'s bytes, checking every row (ReportDecodeError)."""
    parts = unpack_bounded(data, "snapshot", MAX_SNAPSHOT_BYTES, MAX_ROWS * 4, MAX_ROWS)
    if not isinstance(parts, list) or len(parts) < 2 + len(_SNAPSHOT_PARTS) + 2:
        raise ReportDecodeError("snapshot must be an array of its parts")
    observer, taken_at = parts[0], parts[1]
    if not isinstance(observer, str) or not isinstance(taken_at, (int, float)):
        raise ReportDecodeError("snapshot must start with its observer and time")
    snap = MeshSnapshot(observer=observer, taken_at=float(taken_at))
    for index, (name, cls) in enumerate(_SNAPSHOT_PARTS, start=2):
        rows = parts[index]
        if not isinstance(rows, list):
            raise ReportDecodeError(f"snapshot {name} must be an array")
        setattr(snap, name, [cls.from_wire(r) for r in rows])
    errors, truncated = parts[2 + len(_SNAPSHOT_PARTS)], parts[3 + len(_SNAPSHOT_PARTS)]
    if not isinstance(errors, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in errors.items()
    ):
        raise ReportDecodeError("snapshot errors must map node IDs to reasons")
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise ReportDecodeError("snapshot truncated count must be a non-negative integer")
    snap.errors, snap.truncated = errors, truncated
    return snap


def _merge(snapshot: MeshSnapshot, report: NodeReport, tasks: dict[str, TaskRow]) -> None:
    snapshot.nodes.append(report.node)
    snapshot.links.extend(report.links)
    snapshot.actors.extend(report.actors)
    snapshot.objects.extend(report.objects)
    snapshot.transfers.extend(report.transfers)
    snapshot.truncated += report.truncated
    for row in report.tasks:
        seen = tasks.get(row.task_id)
        if seen is None or _TASK_RANK.get(row.state, -1) > _TASK_RANK.get(seen.state, -1):
            tasks[row.task_id] = row


async def gather(
    source: StateSource,
    *,
    limit: int = DEFAULT_ROW_LIMIT,
    timeout: float = 5.0,
    remote: bool = True,
    max_nodes: int = 64,
    concurrency: int = 16,
) -> MeshSnapshot:
    """A snapshot from ``source`` and (``remote``) the members it knows."""
    limit = max(0, int(limit))
    local = source.local_report(limit)
    snapshot = MeshSnapshot(observer=source.node_id, taken_at=time.time())
    tasks: dict[str, TaskRow] = {}
    _merge(snapshot, local, tasks)
    members = [m for m in source.member_rows() if m.node_id != source.node_id]
    asked = members[: max(0, max_nodes - 1)] if remote else []
    slots = asyncio.Semaphore(max(1, concurrency))

    async def ask(row: NodeRow) -> tuple[NodeRow, NodeReport | None, str | None]:
        async with slots:
            try:
                report = await asyncio.wait_for(
                    source.remote_report(row.node_id, limit, timeout), timeout
                )
            except Exception as exc:
                return row, None, f"{type(exc).__name__}: {exc}"[:500]
            if report.node.node_id != row.node_id:
                return row, None, f"answered as {report.node.node_id}"
            return row, report, None

    results = await asyncio.gather(*(ask(row) for row in asked))
    for row, report, error in results:
        if report is not None:
            _merge(snapshot, report, tasks)
        else:
            snapshot.errors[row.node_id] = error or "no report"
            if row.state == NodeStateName.ALIVE.value:
                row = dataclasses.replace(row, state=NodeStateName.UNREACHABLE.value, stale=True)
            snapshot.nodes.append(row)
    snapshot.nodes.extend(members[len(asked) :])
    snapshot.tasks = list(tasks.values())
    return snapshot
