"""The state API: what the mesh is running, from Python, with Ray's names.

    from latticaray.util.state import list_nodes, list_tasks, summarize_tasks
    list_tasks(filters=[("state", "=", "RUNNING")])
    list_objects(filters=[("object_size", ">", 1 << 20)], limit=10)

Every call takes one snapshot of the mesh as the driver's node knows it: its own rows and the
reports of the members it knows, asked over the members-only state RPC with ``timeout``
(``latticaray.observe.gather``). No head node is involved. ``address`` is where the snapshot
comes from: ``None`` for the node of this driver (``latticaray.init()``, embedded or attached,
or the node running this task), or any :class:`~latticaray.observe.model.StateSource`.

When some member did not answer, ``raise_on_missing_output=True`` (Ray's default) raises
:class:`StateApiError` naming them; with ``False`` the rows that could be had are returned.
``detail`` changes nothing: every row always carries all its fields (what Ray returns only with
``detail=True``); it is accepted so that Ray code runs unchanged.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from typing import Any

from latticaray.observe import query
from latticaray.observe.gather import MeshSnapshot, decode_snapshot, gather
from latticaray.observe.model import (
    ActorRow,
    LinkRow,
    NodeRow,
    ObjectRow,
    StateSource,
    TaskRow,
    TransferRow,
)
from latticaray.observe.query import Filter

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TIMEOUT",
    "StateApiError",
    "get_actor",
    "get_node",
    "get_objects",
    "get_task",
    "list_actors",
    "list_links",
    "list_nodes",
    "list_objects",
    "list_tasks",
    "list_transfers",
    "snapshot",
    "summarize_actors",
    "summarize_objects",
    "summarize_tasks",
]

DEFAULT_LIMIT = 100
DEFAULT_TIMEOUT = 30.0


class StateApiError(RuntimeError):
    """The state could not be read, or part of the mesh did not answer."""


def snapshot(
    address: StateSource | None = None,
    *,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    remote: bool = True,
) -> MeshSnapshot:
    """One snapshot of the mesh (every list and summary below reads one)."""
    if address is None:
        from latticaray.runtime import context

        core = context.current_core()
        if core is None:
            raise StateApiError(
                "no state source: call latticaray.init() first, or pass address=<StateSource>"
            )
        reply = core.request({"op": "state", "limit": limit, "timeout": timeout, "remote": remote})
        if "snapshot" not in reply:
            raise StateApiError(f"the node did not answer the state request: {reply!r:.200}")
        return decode_snapshot(reply["snapshot"])
    if isinstance(address, StateSource):
        return asyncio.run(gather(address, limit=limit, timeout=timeout, remote=remote))
    raise TypeError(f"address must be None or a StateSource, not {type(address).__name__}")


def _rows(
    kind: str,
    address: StateSource | None,
    filters: Sequence[Filter] | None,
    limit: int,
    timeout: float,
    raise_on_missing_output: bool,
) -> list[Any]:
    snap = snapshot(address, limit=limit, timeout=timeout)
    if snap.errors and raise_on_missing_output:
        missing = "; ".join(f"{node}: {why}" for node, why in sorted(snap.errors.items()))
        raise StateApiError(
            f"{len(snap.errors)} node(s) did not report (pass raise_on_missing_output=False "
            f"to list what could be had): {missing}"
        )
    if snap.truncated:
        warnings.warn(
            f"{snap.truncated} rows were left out by the per-node limit of {limit}",
            stacklevel=3,
        )
    return query.list_rows(snap, kind, filters, limit)


def list_nodes(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[NodeRow]:
    """Nodes of the mesh: state, path from this node, resources, task and object counts."""
    return _rows("nodes", address, filters, limit, timeout, raise_on_missing_output)


def list_links(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[LinkRow]:
    """Connections between nodes: path type (unix, direct, punched, relayed), RTT, bytes."""
    return _rows("links", address, filters, limit, timeout, raise_on_missing_output)


def list_tasks(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[TaskRow]:
    """Tasks and actor calls the nodes know of."""
    return _rows("tasks", address, filters, limit, timeout, raise_on_missing_output)


def list_actors(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[ActorRow]:
    """Actors hosted in the mesh."""
    return _rows("actors", address, filters, limit, timeout, raise_on_missing_output)


def list_objects(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[ObjectRow]:
    """Objects owned or held by the nodes (one row per holder)."""
    return _rows("objects", address, filters, limit, timeout, raise_on_missing_output)


def list_transfers(
    address: StateSource | None = None,
    filters: Sequence[Filter] | None = None,
    limit: int = DEFAULT_LIMIT,
    timeout: float = DEFAULT_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
) -> list[TransferRow]:
    """Objects moving between nodes now, with their progress."""
    return _rows("transfers", address, filters, limit, timeout, raise_on_missing_output)


def _one(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def get_node(
    id: str, address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> NodeRow | None:
    return _one(list_nodes(address, [("node_id", "=", id)], timeout=timeout))


def get_task(
    id: str, address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> TaskRow | None:
    return _one(list_tasks(address, [("task_id", "=", id)], timeout=timeout))


def get_actor(
    id: str, address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> ActorRow | None:
    return _one(list_actors(address, [("actor_id", "=", id)], timeout=timeout))


def get_objects(
    id: str, address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[ObjectRow]:
    """Every holder's row for an object (by object ID or CID)."""
    rows = list_objects(address, timeout=timeout, limit=10_000)
    return [r for r in rows if id in (r.object_id, r.cid)]


def summarize_tasks(
    address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    return query.summarize_tasks(snapshot(address, limit=10_000, timeout=timeout))


def summarize_actors(
    address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    return query.summarize_actors(snapshot(address, limit=10_000, timeout=timeout))


def summarize_objects(
    address: StateSource | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    return query.summarize_objects(snapshot(address, limit=10_000, timeout=timeout))
