"""Scheduler: capacity advertisement, placement policy (sans-I/O), local resource accounting.

Modules: ``resources`` (ResourceLedger, GPU ids), ``policy`` (PlacementPolicy over a
ClusterSnapshot), ``local`` (node admission, fair bounded queue), ``submitter`` (spillback,
waiting, infeasible timeout), ``advertiser`` (capacity records in the DHT and CRDT members),
``service`` (``/latticaray/sched/1`` over a MeshNode), ``sim`` (many-node simulation).
"""

from .errors import (
    InsufficientResources,
    InvalidCapacityAd,
    QueueFull,
    ResourceError,
    SchedulerError,
    UnschedulableError,
)
from .local import AdmissionKind, FairQueue, LocalScheduler, QueueAdmission
from .policy import (
    DEFAULT,
    SPREAD,
    ClusterSnapshot,
    Decision,
    DecisionKind,
    NodeAffinity,
    NodeView,
    ObjectInfo,
    PlacementPolicy,
    PlacementRequest,
)
from .resources import Allocation, ResourceLedger, normalize
from .submitter import Placed, PlacementFailed, PlacementWarning, SendPlacement, Submitter

__all__ = [
    "DEFAULT",
    "SPREAD",
    "AdmissionKind",
    "Allocation",
    "ClusterSnapshot",
    "Decision",
    "DecisionKind",
    "FairQueue",
    "InsufficientResources",
    "InvalidCapacityAd",
    "LocalScheduler",
    "NodeAffinity",
    "NodeView",
    "ObjectInfo",
    "Placed",
    "PlacementFailed",
    "PlacementPolicy",
    "PlacementRequest",
    "PlacementWarning",
    "QueueAdmission",
    "QueueFull",
    "ResourceError",
    "ResourceLedger",
    "SchedulerError",
    "SendPlacement",
    "Submitter",
    "UnschedulableError",
    "normalize",
]
