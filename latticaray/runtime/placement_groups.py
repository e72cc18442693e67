"""Placement groups in the user API, as in Ray's ``ray.util.placement_group``.

    pg = placement_group([{"CPU": 1, "GPU": 1}] * 4, strategy="STRICT_SPREAD")
    latticaray.get(pg.ready())          # or pg.wait(timeout_seconds=10)
    f.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 2)).remote()
    remove_placement_group(pg)

The group's bundles are reserved across nodes atomically by the scheduler's two-phase claim
(`latticaray.scheduler.placement_groups`) run by the node this process belongs to, which owns
the group (`latticaray.runtime.local.resources`): the group is released when its owner leaves
the mesh, and when the attached driver that created it disconnects unless
``lifetime="detached"`` (then it lives until removed or its owner node leaves).
``pg.ready()`` is, as in Ray, a zero-resource task placed in bundle 0: it runs once the group
is created.
``placement_group_table()`` lists the groups the owner's node knows (its own and those recorded
in the cluster state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from latticaray.scheduler.placement_groups import (
    STRATEGIES,
    PlacementGroupError,
    validate_bundles,
)

__all__ = [
    "PlacementGroup",
    "PlacementGroupError",
    "PlacementGroupSchedulingStrategy",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]


def _call(op: str, payload: dict, timeout: float | None = None) -> Any:
    """A placement-group request to the node this process belongs to (it owns the groups
    this process creates)."""
    from latticaray.runtime import context
    from latticaray.runtime.client import raise_error_value

    reply = context.require_core().request({"op": "pg", "do": op} | payload, timeout)
    if "error" in reply:
        raise_error_value(reply["error"])
    return reply


class PlacementGroup:
    """A handle to a placement group (picklable: tasks may carry it)."""

    def __init__(self, id: str, bundle_specs: Sequence[Mapping[str, float]], strategy: str = ""):
        self.id = id
        self.bundle_specs = [dict(b) for b in bundle_specs]
        self.strategy = strategy

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> Any:
        """An ObjectRef that resolves (to True) once every bundle is reserved."""
        return (
            _ready_task()
            .options(scheduling_strategy=PlacementGroupSchedulingStrategy(self, 0))
            .remote()
        )

    def wait(self, timeout_seconds: float = 30) -> bool:
        """True once the group is created, False if it is not within ``timeout_seconds`` (or
        was removed). One request to this process's node, which answers when it knows."""
        reply = _call("wait", {"id": self.id, "timeout": timeout_seconds}, timeout_seconds + 30)
        return bool(reply["ok"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id}, {len(self.bundle_specs)} bundles, {self.strategy})"

    def __reduce__(self) -> tuple:
        return (PlacementGroup, (self.id, self.bundle_specs, self.strategy))


_READY: Any = None


def _ready_task() -> Any:
    global _READY
    if _READY is None:
        from latticaray.runtime import api

        @api.remote(num_cpus=0, max_retries=0)
        def _placement_group_ready() -> bool:
            return True

        _READY = _placement_group_ready
    return _READY


class PlacementGroupSchedulingStrategy:
    """Run a task or actor in a placement group's bundle (``-1``: any bundle of it).

    ``placement_group_capture_child_tasks=True`` makes the tasks it submits run in the group
    too (unless they choose another strategy)."""

    def __init__(
        self,
        placement_group: PlacementGroup,
        placement_group_bundle_index: int = -1,
        placement_group_capture_child_tasks: bool = False,
    ):
        if not isinstance(placement_group, PlacementGroup):
            raise TypeError(
                f"placement_group must be a PlacementGroup, got {type(placement_group).__name__}"
            )
        index = placement_group_bundle_index
        if not isinstance(index, int) or isinstance(index, bool) or index < -1:
            raise ValueError(f"placement_group_bundle_index must be an int >= -1, got {index!r}")
        if index >= placement_group.bundle_count:
            raise ValueError(
                f"placement group {placement_group.id} has {placement_group.bundle_count} "
                f"bundles; there is no bundle {index}"
            )
        self.placement_group = placement_group
        self.placement_group_bundle_index = index
        self.placement_group_capture_child_tasks = bool(placement_group_capture_child_tasks)

    def to_wire(self) -> dict:
        return {
            "pg": self.placement_group.id,
            "bundle": self.placement_group_bundle_index,
            "capture": self.placement_group_capture_child_tasks,
        }


def placement_group(
    bundles: Sequence[Mapping[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: str | None = None,
    _soft_target_node_id: str | None = None,
    bundle_label_selector: Sequence[Mapping[str, str]] | None = None,
) -> PlacementGroup:
    """Reserve ``bundles`` (resource maps) across the mesh with ``strategy`` (PACK, SPREAD,
    STRICT_PACK, STRICT_SPREAD). Returns at once; ``pg.ready()`` / ``pg.wait()`` wait for it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}: use one of {STRATEGIES}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if _soft_target_node_id is not None:
        raise ValueError("_soft_target_node_id is not supported")
    if bundle_label_selector:
        raise ValueError("bundle_label_selector is not supported")
    if not isinstance(name, str) or len(name) > 256:
        raise ValueError("name must be a string of at most 256 characters")
    specs = validate_bundles(bundles, strategy)
    group_id = "pg" + os.urandom(12).hex()
    _call(
        "create",
        {
            "id": group_id,
            "bundles": [dict(b) for b in specs],
            "strategy": strategy,
            "name": name,
            "detached": lifetime == "detached",
        },
    )
    return PlacementGroup(group_id, specs, strategy)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Release every bundle; tasks and actors running in them end."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError("remove_placement_group takes a PlacementGroup")
    _call("remove", {"id": placement_group.id})


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The group created with ``name`` (ValueError when none is known)."""
    found = _call("lookup", {"name": placement_group_name})["found"]
    if not found:
        raise ValueError(f"no placement group named {placement_group_name!r}")
    return PlacementGroup(found["id"], found["bundles"], found["strategy"])


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict:
    """``{id: {"name", "strategy", "state", "bundles", "bundles_to_node_id"}}`` (one group's
    entry when given)."""
    table = {
        group_id: entry
        | {
            "bundles": dict(enumerate(entry["bundles"])),
            "bundles_to_node_id": dict(enumerate(entry["bundles_to_node_id"])),
        }
        for group_id, entry in _call("table", {})["table"].items()
    }
    if placement_group is not None:
        return table.get(placement_group.id, {})
    return table


def get_current_placement_group() -> PlacementGroup | None:
    """The group the running task or actor was placed in (None outside one)."""
    from latticaray.runtime import context

    current = context.current_placement_group.get()
    if current is None:
        return None
    found = _call("lookup", {"id": current[0]})["found"]
    if not found:
        return None
    return PlacementGroup(found["id"], found["bundles"], found["strategy"])
