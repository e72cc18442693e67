"""NAT mapping-type detection (sans-I/O) from the addresses several peers observed.

Send from ONE local socket to two or more observer endpoints and collect the source address each
saw (the "mapped" address). Same mapped address for every destination: endpoint-independent
mapping ("cone"; hole punching works). Different: endpoint-dependent ("symmetric"; needs birthday
probing or a relay). Mapped equal to a local address: no NAT. The endpoints are peers at different
IPs, or one observer's main and alternate port (RFC 5780's OTHER-ADDRESS idea), so a mesh with a
single public node still tells a symmetric NAT from a cone one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .addresses import Endpoint


class NatType(enum.Enum):
    UNKNOWN = "unknown"
    NO_NAT = "no-nat"
    ENDPOINT_INDEPENDENT = "endpoint-independent"  # cone
    ENDPOINT_DEPENDENT = "endpoint-dependent"  # symmetric

    @property
    def is_hard(self) -> bool:
        return self is NatType.ENDPOINT_DEPENDENT


@dataclass(frozen=True)
class NatReport:
    nat_type: NatType
    mapped: tuple[Endpoint, ...]  # distinct mapped endpoints seen
    port_preserving: bool | None  # mapped port == local port (None when unknown)
    observers: int  # distinct observer endpoints

    @property
    def public_ip(self) -> str | None:
        ips = {ip for ip, _ in self.mapped}
        return next(iter(ips)) if len(ips) == 1 else None


class NatTypeDetector:
    """Accumulates (observer endpoint, mapped) pairs for one local socket and classifies its NAT.

    Observations older than ``max_age`` are dropped (mappings and paths change).
    """

    def __init__(
        self,
        local_endpoints: list[Endpoint] | None = None,
        min_observers: int = 2,
        max_age: float = 600.0,
        max_observations: int = 64,
    ) -> None:
        self.local_endpoints = set(local_endpoints or [])
        self.min_observers = min_observers
        self.max_age = max_age
        self.max_observations = max_observations
        self._obs: dict[Endpoint, tuple[Endpoint, float]] = {}  # observer -> (mapped, when)

    def observe(self, observer: Endpoint, mapped: Endpoint, now: float) -> None:
        observer = (observer[0], observer[1])
        if observer not in self._obs and len(self._obs) >= self.max_observations:
            oldest = min(self._obs, key=lambda k: self._obs[k][1])
            del self._obs[oldest]
        self._obs[observer] = (mapped, now)

    def report(self, now: float) -> NatReport:
        fresh = {ep: m for ep, (m, t) in self._obs.items() if now - t <= self.max_age}
        mapped = tuple(sorted(set(fresh.values())))
        local_ports = {port for _, port in self.local_endpoints}
        port_preserving = (
            all(port in local_ports for _, port in mapped) if mapped and local_ports else None
        )
        if mapped and self.local_endpoints and all(m in self.local_endpoints for m in mapped):
            kind = NatType.NO_NAT
        elif len(fresh) < self.min_observers:
            kind = NatType.UNKNOWN
        elif len(mapped) == 1:
            kind = NatType.ENDPOINT_INDEPENDENT
        else:
            kind = NatType.ENDPOINT_DEPENDENT
        return NatReport(kind, mapped, port_preserving, len(fresh))
