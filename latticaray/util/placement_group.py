"""Placement groups, as Ray's ``ray.util.placement_group`` (implemented in
:mod:`latticaray.runtime.placement_groups`)."""

from latticaray.runtime.placement_groups import (
    PlacementGroup,
    PlacementGroupError,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = [
    "PlacementGroup",
    "PlacementGroupError",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
