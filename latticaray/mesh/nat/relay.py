"""Circuit relay (sans-I/O core): reservations, circuits and their limits.

A public node offers a relay. A private node *reserves* a slot (per-peer duration, renewed before
it expires); then any peer may open a *circuit* to it through the relay. The relay splices the
two byte streams and only ever sees the ciphertext of the end-to-end secure session the two peers
run inside (see ``latticaray/mesh/nat/tunnel.py``). Each circuit has a byte budget and a maximum
duration; total reservation slots and circuits are bounded, per peer and overall.

Refusals are :class:`RelayRefused` with a status code: PERMISSION_DENIED (not allowed to use this
relay, or the request itself arrived over a relayed connection — relays never chain hops),
NO_RESERVATION (the target holds no reservation), RESOURCE_LIMIT_EXCEEDED (slots or circuits
full, per peer, per IP or overall), RATE_LIMITED (reservation and circuit requests, renewals
included, are limited per peer and per source IP by token buckets), MALFORMED.

Wire messages (protocol id ``/latticaray/relay/1``, docs/protocol/nat.md):
``reserve {}`` -> ``reserve_resp {s, ttl, bytes, secs, m}``; ``connect {peer}`` ->
``connect_resp {s, cid, bytes, secs, m}``; relay->target on the reservation stream:
``incoming {src, cid}``; target opens a new stream: ``accept {cid}`` -> ``accept_resp {s, m}``.
After an OK ``connect_resp``/``accept_resp`` the stream carries raw circuit bytes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..ratelimit import KeyedRateLimiter
from . import wire
from .errors import (
    MALFORMED,
    NO_RESERVATION,
    OK,
    PERMISSION_DENIED,
    RATE_LIMITED,
    RESOURCE_LIMIT_EXCEEDED,
    CircuitLimitExceeded,
    RelayRefused,
)

PROTOCOL_ID = "/latticaray/relay/1"


@dataclass
class RelayConfig:
    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    reservation_ttl: float = 3600.0
    max_circuits: int = 256
    max_circuits_per_peer: int = 16
    max_circuits_per_ip: int = 64  # circuits opened from one source IP
    circuit_max_bytes: int = 1 << 30  # per direction-summed circuit budget
    circuit_max_duration: float = 3600.0
    allowed_peers: frozenset[str] | None = None  # who may reserve/connect; None = anyone
    denied_peers: frozenset[str] = frozenset()
    #: reservation and circuit requests (renewals included), per requesting peer and per IP
    requests_per_peer_rate: float = 2.0
    requests_per_peer_burst: int = 20
    requests_per_ip_rate: float = 10.0
    requests_per_ip_burst: int = 60


@dataclass
class Reservation:
    peer: str
    ip: str
    expires: float


@dataclass
class Circuit:
    circuit_id: int
    src: str
    dst: str
    opened: float
    deadline: float
    byte_limit: int
    bytes_relayed: int = 0
    accepted: bool = False
    src_ip: str | None = None


class RelayCore:
    """The relay's bookkeeping; the driver splices streams and reports bytes moved."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig()
        self.reservations: dict[str, Reservation] = {}
        self.circuits: dict[int, Circuit] = {}
        self._ids = itertools.count(1)
        self.refusals: dict[str, int] = {}
        cfg = self.config
        self._per_peer = KeyedRateLimiter(cfg.requests_per_peer_rate, cfg.requests_per_peer_burst)
        self._per_ip = KeyedRateLimiter(cfg.requests_per_ip_rate, cfg.requests_per_ip_burst)

    def _refuse(self, code: str, message: str) -> RelayRefused:
        self.refusals[code] = self.refusals.get(code, 0) + 1
        return RelayRefused(code, message)

    def _check_allowed(self, peer: str) -> None:
        cfg = self.config
        if peer in cfg.denied_peers or (
            cfg.allowed_peers is not None and peer not in cfg.allowed_peers
        ):
            raise self._refuse(PERMISSION_DENIED, f"peer {peer} is not allowed to use this relay")

    def _check_rate(self, peer: str, ip: str | None, now: float) -> None:
        if not self._per_peer.take(peer, now):
            raise self._refuse(RATE_LIMITED, f"peer {peer} sends requests too fast")
        if ip is not None and not self._per_ip.take(ip, now):
            raise self._refuse(RATE_LIMITED, f"{ip} sends requests too fast")

    def reserve(self, peer: str, ip: str, via_relay: bool, now: float) -> Reservation:
        """Create or renew ``peer``'s reservation (``ip``: its observed IP)."""
        self.expire(now)
        if via_relay:
            raise self._refuse(
                PERMISSION_DENIED,
                "reservation requested over a relayed connection; relays do not chain",
            )
        self._check_allowed(peer)
        self._check_rate(peer, ip, now)
        existing = self.reservations.get(peer)
        if existing is None:
            if len(self.reservations) >= self.config.max_reservations:
                raise self._refuse(
                    RESOURCE_LIMIT_EXCEEDED,
                    f"all {self.config.max_reservations} reservation slots are taken",
                )
            same_ip = sum(1 for r in self.reservations.values() if r.ip == ip)
            if same_ip >= self.config.max_reservations_per_ip:
                raise self._refuse(
                    RESOURCE_LIMIT_EXCEEDED,
                    f"{ip} already holds {same_ip} reservations (limit "
                    f"{self.config.max_reservations_per_ip})",
                )
        reservation = Reservation(peer, ip, now + self.config.reservation_ttl)
        self.reservations[peer] = reservation
        return reservation

    def cancel_reservation(self, peer: str) -> None:
        self.reservations.pop(peer, None)

    def open_circuit(
        self, src: str, dst: str, via_relay: bool, now: float, ip: str | None = None
    ) -> Circuit:
        """``src`` (from ``ip``) asks for a circuit to ``dst``; returns it (pending the
        target's accept)."""
        self.expire(now)
        if via_relay:
            raise self._refuse(
                PERMISSION_DENIED,
                "circuit requested over a relayed connection; relayed hops are refused",
            )
        if src == dst:
            raise self._refuse(MALFORMED, "a peer cannot open a circuit to itself")
        self._check_allowed(src)
        self._check_rate(src, ip, now)
        if dst not in self.reservations:
            raise self._refuse(NO_RESERVATION, f"peer {dst} holds no reservation on this relay")
        if len(self.circuits) >= self.config.max_circuits:
            raise self._refuse(
                RESOURCE_LIMIT_EXCEEDED, f"the relay already carries {len(self.circuits)} circuits"
            )
        for peer in (src, dst):
            count = sum(1 for c in self.circuits.values() if peer in (c.src, c.dst))
            if count >= self.config.max_circuits_per_peer:
                raise self._refuse(
                    RESOURCE_LIMIT_EXCEEDED,
                    f"peer {peer} already has {count} circuits (limit "
                    f"{self.config.max_circuits_per_peer})",
                )
        if ip is not None:
            from_ip = sum(1 for c in self.circuits.values() if c.src_ip == ip)
            if from_ip >= self.config.max_circuits_per_ip:
                raise self._refuse(
                    RESOURCE_LIMIT_EXCEEDED,
                    f"{ip} already has {from_ip} circuits (limit "
                    f"{self.config.max_circuits_per_ip})",
                )
        circuit = Circuit(
            next(self._ids),
            src,
            dst,
            now,
            now + self.config.circuit_max_duration,
            self.config.circuit_max_bytes,
            src_ip=ip,
        )
        self.circuits[circuit.circuit_id] = circuit
        return circuit

    def accept_circuit(self, circuit_id: int, acceptor: str, now: float) -> Circuit:
        circuit = self.circuits.get(circuit_id)
        if circuit is None or circuit.accepted:
            raise self._refuse(MALFORMED, f"no pending circuit {circuit_id}")
        if circuit.dst != acceptor:
            raise self._refuse(
                PERMISSION_DENIED, f"circuit {circuit_id} is for {circuit.dst}, not for {acceptor}"
            )
        circuit.accepted = True
        return circuit

    def account(self, circuit_id: int, nbytes: int, now: float) -> int:
        """Record ``nbytes`` relayed; returns bytes left. Raises CircuitLimitExceeded past a limit."""
        circuit = self.circuits.get(circuit_id)
        if circuit is None:
            raise CircuitLimitExceeded(f"circuit {circuit_id} is closed")
        circuit.bytes_relayed += nbytes
        if circuit.bytes_relayed > circuit.byte_limit:
            self.circuits.pop(circuit_id, None)
            raise CircuitLimitExceeded(
                f"circuit {circuit_id} exceeded its {circuit.byte_limit}-byte limit"
            )
        if now > circuit.deadline:
            self.circuits.pop(circuit_id, None)
            raise CircuitLimitExceeded(
                f"circuit {circuit_id} exceeded its "
                f"{self.config.circuit_max_duration:.0f} s duration limit"
            )
        return circuit.byte_limit - circuit.bytes_relayed

    def close_circuit(self, circuit_id: int) -> None:
        self.circuits.pop(circuit_id, None)

    def expire(self, now: float) -> tuple[list[str], list[int]]:
        """Drop expired reservations and over-time circuits; returns (peers, circuit ids)."""
        peers = [p for p, r in self.reservations.items() if r.expires <= now]
        for p in peers:
            del self.reservations[p]
        circuits = [cid for cid, c in self.circuits.items() if c.deadline <= now]
        for cid in circuits:
            del self.circuits[cid]
        return peers, circuits

    def next_timer(self) -> float | None:
        times = [r.expires for r in self.reservations.values()]
        times += [c.deadline for c in self.circuits.values()]
        return min(times) if times else None


# ------------------------------------------------------------------------------- messages
def reserve_refused(error: RelayRefused) -> bytes:
    return wire.encode("reserve_resp", s=error.code, m=error.message)


def reserve_response(reservation: Reservation, config: RelayConfig, now: float) -> bytes:
    return wire.encode(
        "reserve_resp",
        s=OK,
        ttl=reservation.expires - now,
        bytes=config.circuit_max_bytes,
        secs=config.circuit_max_duration,
        m="",
    )


def connect_refused(error: RelayRefused) -> bytes:
    return wire.encode("connect_resp", s=error.code, m=error.message, cid=0)


def connect_response(circuit: Circuit) -> bytes:
    return wire.encode(
        "connect_resp",
        s=OK,
        cid=circuit.circuit_id,
        bytes=circuit.byte_limit,
        secs=circuit.deadline - circuit.opened,
        m="",
    )


def check_status(msg: dict[str, Any], expected_type: str) -> dict[str, Any]:
    """Raise :class:`RelayRefused` unless ``msg`` is an OK ``expected_type`` reply."""
    if msg.get("t") != expected_type:
        raise RelayRefused(MALFORMED, f"expected {expected_type}, got {msg.get('t')!r}")
    status = wire.get_str(msg, "s", 64)
    if status != OK:
        raise RelayRefused(status, wire.get_str(msg, "m", 1024, optional=True) or "refused")
    return msg
