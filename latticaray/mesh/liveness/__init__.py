"""Peer liveness: a sans-I/O phi-accrual failure detector with keepalives and redial
(:mod:`.core`), and its asyncio shell for a mesh node (:mod:`.service`)."""

from .core import (
    TRANSITIONS,
    LivenessChanged,
    LivenessConfig,
    LivenessCore,
    PeerLiveness,
    Probe,
    Redial,
)
from .service import LivenessHost, LivenessService

__all__ = [
    "TRANSITIONS",
    "LivenessChanged",
    "LivenessConfig",
    "LivenessCore",
    "LivenessHost",
    "LivenessService",
    "PeerLiveness",
    "Probe",
    "Redial",
]
