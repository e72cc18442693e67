"""Peer liveness: the phi-accrual detector's shared parts (:mod:`.phi`, also used by the runtime's
member liveness), a sans-I/O detector with keepalives and redial (:mod:`.core`), and its asyncio
shell for a mesh node (:mod:`.service`)."""

from .core import (
    TRANSITIONS,
    LivenessChanged,
    LivenessConfig,
    LivenessCore,
    PeerLiveness,
    Probe,
    Redial,
)
from .phi import ArrivalWindow, PhiSettings, RedialBackoff
from .service import LivenessHost, LivenessService

__all__ = [
    "TRANSITIONS",
    "ArrivalWindow",
    "LivenessChanged",
    "LivenessConfig",
    "LivenessCore",
    "LivenessHost",
    "LivenessService",
    "PeerLiveness",
    "PhiSettings",
    "Probe",
    "Redial",
    "RedialBackoff",
]
