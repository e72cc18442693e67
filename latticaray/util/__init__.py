"""Utilities beside the core API, named as Ray's ``ray.util`` (``latticaray.util.state``,
``latticaray.util.placement_group``, ``latticaray.util.scheduling_strategies``), and
``latticaray.util.ipfs`` (sharing objects with IPFS peers, on a node started with ``ipfs=True``)."""

from latticaray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = [
    "PlacementGroup",
    "get_current_placement_group",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
