"""Birthday probing planner (sans-I/O): a direct path between a cone NAT and a symmetric NAT.

A symmetric (endpoint-dependent) NAT gives every destination a new random public port, so the
port the hard side's peer should aim at is unknown. The hard side opens ``hard_sockets`` sockets
and sends from each to the easy side's mapped endpoint, creating that many random mappings on
its NAT. The easy side (one socket, one stable mapping) sends probes to random ports of the hard
side's public IP. A probe that lands on one of the hard side's mappings is let in (it matches the
reply direction of that mapping); the hard side answers from that socket and the easy side's NAT
lets the answer in because the easy side probed that port. With n mappings among N ports and m
probes, P(success) = 1 - (1 - n/N)^m. Everything is bounded: probe count, rate and time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class BirthdayConfig:
    hard_sockets: int = 256
    max_probes: int = 4096
    probe_rate: float = 4000.0  # easy-side probes per second
    time_budget: float = 4.0  # seconds, either side
    port_lo: int = 1024
    port_hi: int = 65535
    hard_resend_interval: float = 0.5  # the hard side refreshes its mappings this often

    def __post_init__(self) -> None:
        if not 1 <= self.port_lo <= self.port_hi <= 65535:
            raise ValueError("port range must be within 1..65535")
        if self.hard_sockets < 1 or self.hard_sockets > 1024:
            raise ValueError("hard_sockets must be in 1..1024 (each is a file descriptor)")
        if self.max_probes < 1 or self.max_probes > (self.port_hi - self.port_lo + 1):
            raise ValueError("max_probes must be between 1 and the size of the port range")


def success_probability(hard_sockets: int, probes: int, port_range: int = 64512) -> float:
    """Chance that ``probes`` distinct random ports hit one of ``hard_sockets`` random mappings."""
    if hard_sockets <= 0 or probes <= 0:
        return 0.0
    return 1.0 - math.exp(probes * math.log1p(-min(hard_sockets, port_range - 1) / port_range))


class EasySideProber:
    """Yields batches of destination ports for the easy side, paced and bounded."""

    def __init__(self, config: BirthdayConfig, start: float, rng: random.Random) -> None:
        self.config = config
        self.start = start
        self.deadline = start + config.time_budget
        self._rng = rng
        self._sent = 0
        self._seen: set[int] = set()
        self.hit_port: int | None = None

    @property
    def probes_sent(self) -> int:
        return self._sent

    def finished(self, now: float) -> bool:
        return (
            self.hit_port is not None
            or now >= self.deadline
            or self._sent >= self.config.max_probes
        )

    def next_batch(self, now: float) -> list[int]:
        """Ports to probe now: as many as the rate allows since ``start``, none when finished."""
        if self.finished(now):
            return []
        allowed = min(
            self.config.max_probes, int((now - self.start) * self.config.probe_rate + 1e-6) + 1
        )
        ports = []
        span = self.config.port_hi - self.config.port_lo + 1
        while self._sent < allowed and len(self._seen) < span:
            port = self._rng.randint(self.config.port_lo, self.config.port_hi)
            if port in self._seen:
                continue
            self._seen.add(port)
            ports.append(port)
            self._sent += 1
        return ports

    def on_reply(self, port: int) -> bool:
        """A reply arrived from the hard side's ``port``; True if it is one we probed."""
        if port in self._seen:
            self.hit_port = port
            return True
        return False


class HardSidePlan:
    """When the hard side (re)sends from its sockets toward the easy side's mapped endpoint."""

    def __init__(self, config: BirthdayConfig, start: float) -> None:
        self.config = config
        self.deadline = start + config.time_budget
        self._next_send = start
        self.rounds = 0
        self.hit_socket: int | None = None

    def sends_due(self, now: float) -> bool:
        if self.hit_socket is not None or now >= self.deadline or now < self._next_send:
            return False
        self._next_send = now + self.config.hard_resend_interval
        self.rounds += 1
        return True

    def finished(self, now: float) -> bool:
        return self.hit_socket is not None or now >= self.deadline

    def next_timer(self) -> float:
        return min(self._next_send, self.deadline)
