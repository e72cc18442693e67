"""Plain-text views of a mesh snapshot: ``latticaray status`` and ``latticaray list`` tables."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from latticaray.observe.gather import MeshSnapshot
from latticaray.observe.model import NodeStateName, PathType, Row

__all__ = ["format_bytes", "format_status", "format_table", "path_to"]

#: The columns `latticaray list KIND` prints by default (every field with --detail).
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "nodes": ("node_id", "node_name", "state", "role", "tasks_running", "tasks_queued", "actors"),
    "links": ("src", "dst", "path", "transport", "rtt_ms"),
    "tasks": ("task_id", "name", "state", "type", "node_id", "attempt_number"),
    "actors": ("actor_id", "class_name", "name", "state", "node_id", "pid", "num_restarts"),
    "objects": ("object_id", "object_size", "reference_type", "node_id", "cid"),
    "transfers": ("object_id", "node_id", "peer", "direction", "path", "bytes_done", "bytes_total"),
}


def short_id(node_id: str, width: int = 16) -> str:
    return node_id if len(node_id) <= width else node_id[: width - 1] + "…"


def format_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in sorted(value.items()))
    return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """Rows as aligned columns (``columns`` default: every field)."""
    if not rows:
        return "(none)"
    names = list(columns or type(rows[0]).field_names())
    cells = [[_cell(getattr(r, c, None)) for c in names] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(names)]
    head = "  ".join(c.upper().ljust(w) for c, w in zip(names, widths))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([head.rstrip(), *body])


def path_to(snapshot: MeshSnapshot, node_id: str) -> tuple[str, float | None]:
    """The path type and RTT (ms) from the observing node to ``node_id``."""
    if node_id == snapshot.observer:
        return PathType.SELF.value, None
    for link in snapshot.links:
        if link.src == snapshot.observer and link.dst == node_id:
            return link.path, link.rtt_ms
    return PathType.NONE.value, None


def _resources(used: dict[str, float], total: dict[str, float]) -> str:
    parts = []
    for name in sorted(total):
        if name == "memory" or name.startswith("object_store"):
            parts.append(f"{name} {format_bytes(used.get(name, 0))}/{format_bytes(total[name])}")
        else:
            parts.append(f"{name} {used.get(name, 0):g}/{total[name]:g}")
    return ", ".join(parts) or "-"


def format_status(snapshot: MeshSnapshot) -> str:
    """The mesh as the observing node sees it (what ``latticaray status`` prints)."""
    nodes = snapshot.nodes
    alive = sum(1 for n in nodes if n.state == NodeStateName.ALIVE.value and not n.stale)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.taken_at))
    lines = [
        f"mesh seen from {snapshot.observer} at {when}: {len(nodes)} nodes, {alive} reporting",
        "",
    ]
    rows = []
    for n in nodes:
        path, rtt = path_to(snapshot, n.node_id)
        rows.append(
            [
                short_id(n.node_id),
                n.node_name or "-",
                n.role,
                n.state if not n.stale or n.state != "ALIVE" else "KNOWN",
                path,
                "-" if rtt is None else f"{rtt:.1f} ms",
                _resources(n.resources_used, n.resources_total),
                f"{n.tasks_running}/{n.tasks_queued}",
                str(n.actors),
                f"{n.objects} ({format_bytes(n.object_store_bytes)})",
            ]
        )
    head = ["NODE", "NAME", "ROLE", "STATE", "PATH", "RTT", "RESOURCES USED/TOTAL",
            "RUN/QUEUED", "ACTORS", "OBJECTS"]  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else []
    if rows:
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
        lines.append("")
    total: Counter[str] = Counter()
    used: Counter[str] = Counter()
    for n in nodes:
        if n.state == NodeStateName.ALIVE.value:
            total.update(n.resources_total)
            used.update(n.resources_used)
    lines.append(f"resources: {_resources(dict(used), dict(total))}")
    states = Counter(t.state for t in snapshot.tasks)
    lines.append(
        "tasks: "
        f"{sum(n.tasks_running for n in nodes)} running, "
        f"{sum(n.tasks_queued for n in nodes)} queued, "
        f"{sum(n.tasks_finished for n in nodes)} finished, "
        f"{sum(n.tasks_failed for n in nodes)} failed"
        + (
            " (listed: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())) + ")"
            if states
            else ""
        )
    )
    actor_states = Counter(a.state for a in snapshot.actors)
    actors = f"actors: {len(snapshot.actors)}"
    if actor_states:
        actors += " (" + ", ".join(f"{k} {v}" for k, v in sorted(actor_states.items())) + ")"
    lines.append(actors)
    lines.append(
        f"objects: {sum(n.objects for n in nodes)}, "
        f"{format_bytes(sum(n.object_store_bytes for n in nodes))} in stores"
    )
    for t in snapshot.transfers:
        share = 100.0 * t.bytes_done / t.bytes_total if t.bytes_total else 0.0
        lines.append(
            f"transfer {short_id(t.object_id, 24)} {t.direction} at {short_id(t.node_id)} "
            f"{'from' if t.direction == 'in' else 'to'} {short_id(t.peer) or '?'} over {t.path}: "
            f"{share:.0f}% ({format_bytes(t.bytes_done)} of {format_bytes(t.bytes_total)})"
        )
    for node_id, why in sorted(snapshot.errors.items()):
        lines.append(f"no report from {node_id}: {why}")
    if snapshot.truncated:
        lines.append(f"({snapshot.truncated} rows left out by the per-node limit)")
    return "\n".join(lines)
