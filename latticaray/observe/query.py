"""Filters, lists and summaries over a mesh snapshot (pure functions; Ray's shapes).

Filters are Ray's ``(key, predicate, value)`` triples. ``=`` and ``!=`` compare a row's field
with the value as Ray does (strings case-insensitively, so ``("state", "=", "running")`` works;
numbers and booleans parsed from strings); ``<``, ``<=``, ``>``, ``>=`` compare numeric fields.
An unknown key or predicate raises ``ValueError`` naming what is allowed.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from latticaray.observe.gather import MeshSnapshot
from latticaray.observe.model import (
    ActorRow,
    LinkRow,
    NodeRow,
    ObjectRow,
    Row,
    TaskRow,
    TransferRow,
)

__all__ = [
    "KINDS",
    "Filter",
    "apply_filters",
    "list_rows",
    "summarize_actors",
    "summarize_objects",
    "summarize_tasks",
]

Filter = tuple[str, str, Any]

#: The kinds of rows a snapshot has, by the name `latticaray list` takes.
KINDS: dict[str, type[Row]] = {
    "nodes": NodeRow,
    "links": LinkRow,
    "tasks": TaskRow,
    "actors": ActorRow,
    "objects": ObjectRow,
    "transfers": TransferRow,
}

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
PREDICATES = ("=", "!=", *_ORDER)


def _coerce(value: Any, like: Any) -> Any:
    """The filter value as the type of the row's field (Ray's CLI passes strings)."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def _matches(row: Any, key: str, predicate: str, value: Any) -> bool:
    field_value = getattr(row, key)
    if predicate in ("=", "!="):
        if field_value is None:
            equal = value is None or str(value).strip().lower() in ("", "none", "null")
        elif isinstance(field_value, str):
            equal = field_value.lower() == str(value).lower()
        elif isinstance(field_value, (tuple, dict)):
            equal = str(value) in field_value
        else:
            try:
                equal = field_value == _coerce(value, field_value)
            except ValueError:
                equal = False
        return equal if predicate == "=" else not equal
    if field_value is None or isinstance(field_value, (str, tuple, dict, bool)):
        return False
    return _ORDER[predicate](field_value, float(value))


def apply_filters(
    rows: Iterable[Any], cls: type[Row], filters: Sequence[Filter] | None
) -> list[Any]:
    """Rows of class ``cls`` that match every filter."""
    checked: list[Filter] = []
    names = cls.field_names()
    for item in filters or ():
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {item!r}")
        key, predicate, value = item
        if key not in names:
            raise ValueError(f"{cls.__name__} has no field {key!r}; filterable: {', '.join(names)}")
        if predicate not in PREDICATES:
            raise ValueError(f"unknown predicate {predicate!r}; use one of {PREDICATES}")
        if predicate in _ORDER:
            try:
                float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{predicate} needs a number, got {value!r}") from None
        checked.append((key, predicate, value))
    return [r for r in rows if all(_matches(r, k, p, v) for k, p, v in checked)]


def list_rows(
    snapshot: MeshSnapshot,
    kind: str,
    filters: Sequence[Filter] | None = None,
    limit: int | None = None,
) -> list[Any]:
    """Rows of ``kind`` (a key of :data:`KINDS`) that match, at most ``limit``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    rows = apply_filters(getattr(snapshot, kind), KINDS[kind], filters)
    return rows if limit is None else rows[: max(0, int(limit))]


def summarize_tasks(snapshot: MeshSnapshot) -> dict[str, Any]:
    """Task counts per function (or actor method) and state, as Ray's summarize_tasks."""
    summary: dict[str, dict[str, Any]] = {}
    by_type: Counter[str] = Counter()
    for row in snapshot.tasks:
        entry = summary.setdefault(
            row.name,
            {"func_or_class_name": row.name, "type": row.type, "state_counts": Counter()},
        )
        entry["state_counts"][row.state] += 1
        by_type[row.type] += 1
    for entry in summary.values():
        entry["state_counts"] = dict(entry["state_counts"])
    return {
        "cluster": {
            "summary": summary,
            "total_tasks": by_type["NORMAL_TASK"],
            "total_actor_tasks": by_type["ACTOR_TASK"],
            "total_actor_scheduled": by_type["ACTOR_CREATION_TASK"],
            "summary_by": "func_name",
        }
    }


def summarize_actors(snapshot: MeshSnapshot) -> dict[str, Any]:
    """Actor counts per class and state."""
    summary: dict[str, dict[str, Any]] = {}
    for row in snapshot.actors:
        entry = summary.setdefault(
            row.class_name, {"class_name": row.class_name, "state_counts": Counter()}
        )
        entry["state_counts"][row.state] += 1
    for entry in summary.values():
        entry["state_counts"] = dict(entry["state_counts"])
    return {"cluster": {"summary": summary, "total_actors": len(snapshot.actors)}}


def summarize_objects(snapshot: MeshSnapshot) -> dict[str, Any]:
    """Object counts and bytes per node and reference type."""
    per_node: dict[str, dict[str, Any]] = {}
    for row in snapshot.objects:
        entry = per_node.setdefault(
            row.node_id, {"total_objects": 0, "total_size_bytes": 0, "ref_types": Counter()}
        )
        entry["total_objects"] += 1
        entry["total_size_bytes"] += row.object_size
        entry["ref_types"][row.reference_type] += 1
    for entry in per_node.values():
        entry["ref_types"] = dict(entry["ref_types"])
    return {
        "cluster": {
            "summary": per_node,
            "total_objects": len(snapshot.objects),
            "total_size_bytes": sum(r.object_size for r in snapshot.objects),
        }
    }
