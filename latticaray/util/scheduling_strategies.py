"""Scheduling strategies, as Ray's ``ray.util.scheduling_strategies``."""

from latticaray.runtime.api import NodeAffinitySchedulingStrategy
from latticaray.runtime.placement_groups import PlacementGroupSchedulingStrategy

__all__ = ["NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy"]
