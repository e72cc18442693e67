"""AutoNAT (sans-I/O): is each of my candidate addresses reachable from the internet?

A client asks several peers ("servers") to dial it back on its candidate addresses (listen
addresses and addresses peers observed via identify). Each (probe, address) gets a fresh random
nonce; the server sends the nonce to that address from a *different* port than the one the request
came in on, so a NAT or stateful firewall that only lets replies through drops it. The client
counts an address as reachable only when a dial-back with the right nonce, from that server's IP,
arrives on it. Per address the outcome is ``public`` / ``private`` / ``unknown`` from the last votes
of distinct servers, and is re-checked over time.

Servers protect themselves and third parties: a request may only name addresses at the IP the
server observed the request from (no amplification against someone else), the number of addresses
per request is bounded, and requests are rate limited per requester IP and globally.

Wire messages (msgpack, see docs/protocol/nat.md, protocol id ``/latticaray/autonat/1``):
``dial {id, a: [[ip, port]...], n: [nonce...]}``, ``dial_resp {id, r: [status...]}``,
``dial_back {n}``.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..ratelimit import KeyedRateLimiter, TokenBucket
from . import wire
from .addresses import AddressPolicy, Endpoint
from .errors import (
    MALFORMED,
    PERMISSION_DENIED,
    RATE_LIMITED,
    DialBackRefused,
    ForgedDialBack,
    MalformedMessage,
)

PROTOCOL_ID = "/latticaray/autonat/1"
NONCE_SIZE = 16
DIALED = "DIALED"


class Reachability(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


# ------------------------------------------------------------------------------------ messages
def encode_dial_request(probe_id: int, entries: list[tuple[Endpoint, bytes]]) -> bytes:
    return wire.encode(
        "dial", id=probe_id, a=[list(ep) for ep, _ in entries], n=[nonce for _, nonce in entries]
    )


def decode_dial_request(
    msg: dict[str, Any], max_addrs: int
) -> tuple[int, list[tuple[Endpoint, bytes]]]:
    probe_id = wire.get_int(msg, "id", 0, 2**63)
    endpoints = wire.get_endpoints(msg, "a", max_addrs)
    nonces = msg.get("n")
    if not isinstance(nonces, list) or len(nonces) != len(endpoints):
        raise MalformedMessage("field 'n' must hold one nonce per address")
    for nonce in nonces:
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise MalformedMessage(f"each nonce must be {NONCE_SIZE} bytes")
    return probe_id, list(zip(endpoints, nonces))


def encode_dial_response(probe_id: int, statuses: list[str]) -> bytes:
    return wire.encode("dial_resp", id=probe_id, r=statuses)


def decode_dial_response(msg: dict[str, Any], max_addrs: int) -> tuple[int, list[str]]:
    return wire.get_int(msg, "id", 0, 2**63), wire.get_str_list(msg, "r", max_addrs, 64)


def encode_dial_back(nonce: bytes) -> bytes:
    return wire.encode("dial_back", n=nonce)


def decode_dial_back(msg: dict[str, Any]) -> bytes:
    return wire.get_bytes(msg, "n", NONCE_SIZE, NONCE_SIZE)


# ------------------------------------------------------------------------------------ server
@dataclass
class AutoNatServerConfig:
    max_addrs_per_request: int = 8
    per_ip_rate: float = 0.5  # requests per second, per requester IP
    per_ip_burst: int = 4
    global_rate: float = 20.0
    global_burst: int = 40
    dial_back_copies: int = 3  # UDP dial-backs are repeated to survive loss


@dataclass(frozen=True)
class DialBack:
    """Action: send ``encode_dial_back(nonce)`` to ``endpoint`` from the dial-back socket."""

    endpoint: Endpoint
    nonce: bytes


@dataclass
class DialPlan:
    probe_id: int
    dial_backs: list[DialBack]
    statuses: list[str]  # one per requested address, DIALED or a refusal code

    def response(self) -> bytes:
        return encode_dial_response(self.probe_id, self.statuses)


class AutoNatServerCore:
    """Decides which dial-backs to perform for a request; the driver sends them."""

    def __init__(
        self, config: AutoNatServerConfig | None = None, policy: AddressPolicy | None = None
    ) -> None:
        self.config = config or AutoNatServerConfig()
        self.policy = policy or AddressPolicy()
        self._per_ip = KeyedRateLimiter(self.config.per_ip_rate, self.config.per_ip_burst)
        self._global: TokenBucket | None = None
        self.refused = 0

    def handle_request(self, observed: Endpoint, msg: dict[str, Any], now: float) -> DialPlan:
        """Plan dial-backs for a decoded ``dial`` message received from ``observed``.

        Raises :class:`DialBackRefused` (RATE_LIMITED) when over a rate limit and
        :class:`MalformedMessage` for bad fields. Addresses not at ``observed``'s IP, or not
        publicly routable by policy, are refused one by one with PERMISSION_DENIED.
        """
        if self._global is None:
            self._global = TokenBucket(self.config.global_rate, self.config.global_burst, now)
        probe_id, entries = decode_dial_request(msg, self.config.max_addrs_per_request)
        observed_ip = observed[0]
        if not self._per_ip.take(observed_ip, now) or not self._global.take(now):
            self.refused += 1
            raise DialBackRefused(RATE_LIMITED, f"too many dial-back requests from {observed_ip}")
        dial_backs, statuses = [], []
        for endpoint, nonce in entries:
            if endpoint[0] != observed_ip:
                statuses.append(PERMISSION_DENIED)  # never dial a third party (amplification)
            elif not self.policy.is_public(endpoint[0]):
                statuses.append(PERMISSION_DENIED)
            else:
                dial_backs.append(DialBack(endpoint, nonce))
                statuses.append(DIALED)
        return DialPlan(probe_id, dial_backs, statuses)


# ------------------------------------------------------------------------------------ client
@dataclass
class AutoNatClientConfig:
    servers_per_round: int = 3
    min_confirmations: int = 2  # votes from distinct servers needed for public/private
    vote_window: int = 4  # the last N votes of an address decide its status
    dial_back_timeout: float = 3.0  # after the server says DIALED, wait this long for the nonce
    response_timeout: float = 5.0
    recheck_public: float = 300.0
    recheck_private: float = 120.0
    recheck_unknown: float = 15.0
    max_candidates: int = 32


@dataclass
class AddressState:
    endpoint: Endpoint
    reachability: Reachability = Reachability.UNKNOWN
    votes: deque[tuple[str, bool]] = field(default_factory=deque)  # (server, reachable)
    next_check: float = 0.0
    in_flight: bool = False
    last_changed: float = 0.0


@dataclass
class Probe:
    """Action: send ``request`` (an encoded ``dial``) to ``server``."""

    server: str
    probe_id: int
    request: bytes
    entries: list[tuple[Endpoint, bytes]]
    server_ip: str | None
    deadline: float
    answered: bool = False
    statuses: dict[Endpoint, str] = field(default_factory=dict)
    confirmed: set[Endpoint] = field(default_factory=set)


class AutoNatClientCore:
    """Tracks candidate addresses and the votes that classify them."""

    def __init__(
        self,
        config: AutoNatClientConfig | None = None,
        policy: AddressPolicy | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config or AutoNatClientConfig()
        self.policy = policy or AddressPolicy()
        self._random_bytes = random_bytes
        self._addrs: dict[Endpoint, AddressState] = {}
        self._probes: dict[int, Probe] = {}
        self._nonces: dict[bytes, tuple[int, Endpoint]] = {}
        self._next_probe_id = 1
        self.forged = 0

    # candidates ---------------------------------------------------------------------------
    def add_candidate(self, endpoint: Endpoint, now: float) -> bool:
        if endpoint in self._addrs or not self.policy.is_routable_candidate(endpoint[0]):
            return False
        if len(self._addrs) >= self.config.max_candidates:
            return False
        self._addrs[endpoint] = AddressState(endpoint, next_check=now)
        return True

    def status(self, endpoint: Endpoint) -> Reachability:
        state = self._addrs.get(endpoint)
        return state.reachability if state else Reachability.UNKNOWN

    def statuses(self) -> dict[Endpoint, Reachability]:
        return {ep: st.reachability for ep, st in self._addrs.items()}

    def public_addresses(self) -> list[Endpoint]:
        return [ep for ep, st in self._addrs.items() if st.reachability is Reachability.PUBLIC]

    def reachability(self) -> Reachability:
        """Public if any address is; else private if any address was found private (the others
        could not be tested, e.g. a LAN address the servers refuse to dial); else unknown."""
        values = [st.reachability for st in self._addrs.values()]
        if Reachability.PUBLIC in values:
            return Reachability.PUBLIC
        if Reachability.PRIVATE in values:
            return Reachability.PRIVATE
        return Reachability.UNKNOWN

    # probing ------------------------------------------------------------------------------
    def probes_due(self, now: float, servers: list[tuple[str, str | None]]) -> list[Probe]:
        """Start a round for every address due a check. ``servers``: (server id, server IP).

        Each chosen server gets one request naming every due address with fresh nonces.
        """
        due = [st for st in self._addrs.values() if not st.in_flight and st.next_check <= now]
        if not due or not servers:
            return []
        probes = []
        for server, server_ip in servers[: self.config.servers_per_round]:
            entries = []
            probe_id = self._next_probe_id
            self._next_probe_id += 1
            for st in due:
                nonce = self._random_bytes(NONCE_SIZE)
                self._nonces[nonce] = (probe_id, st.endpoint)
                entries.append((st.endpoint, nonce))
            probe = Probe(
                server,
                probe_id,
                encode_dial_request(probe_id, entries),
                entries,
                server_ip,
                now + self.config.response_timeout,
            )
            self._probes[probe_id] = probe
            probes.append(probe)
        for st in due:
            st.in_flight = True
        return probes

    def on_response(self, server: str, msg: dict[str, Any], now: float) -> None:
        probe_id, statuses = decode_dial_response(msg, len(self._addrs) + 1)
        probe = self._probes.get(probe_id)
        if probe is None:
            return  # already finished: every dial-back arrived before this response
        if probe.server != server or probe.answered:
            raise MalformedMessage(f"unexpected dial response {probe_id} from {server}")
        if len(statuses) != len(probe.entries):
            raise MalformedMessage("dial response must hold one status per requested address")
        probe.answered = True
        probe.deadline = now + self.config.dial_back_timeout
        for (endpoint, _), status in zip(probe.entries, statuses):
            probe.statuses[endpoint] = status

    def on_refused(self, server: str, probe_id: int, now: float) -> None:
        """The server refused the whole request (e.g. rate limited): no votes from it."""
        probe = self._probes.pop(probe_id, None)
        if probe is not None:
            self._finish(probe, now)

    def on_dial_back(self, msg: dict[str, Any], source: Endpoint, now: float) -> Endpoint:
        """A dial-back arrived (on our shared socket). Returns the confirmed address.

        Raises :class:`ForgedDialBack` for an unknown nonce, or one arriving from an IP other
        than the server's.
        """
        nonce = decode_dial_back(msg)
        entry = self._nonces.get(nonce)
        if entry is None:
            self.forged += 1
            raise ForgedDialBack(
                f"dial-back from {source[0]}:{source[1]} carries a nonce this "
                "node never issued (or one already used)"
            )
        probe_id, endpoint = entry
        probe = self._probes.get(probe_id)
        if probe is None:
            self.forged += 1
            raise ForgedDialBack("dial-back for a probe that already finished")
        if probe.server_ip is not None and source[0] != probe.server_ip:
            self.forged += 1
            raise ForgedDialBack(
                f"dial-back for {probe.server}'s probe came from {source[0]}, "
                f"not from the server's IP {probe.server_ip}"
            )
        del self._nonces[nonce]
        probe.confirmed.add(endpoint)
        if len(probe.confirmed) == len(probe.entries):
            self._finish(self._probes.pop(probe_id), now)
        return endpoint

    def tick(self, now: float) -> None:
        """Finish probes past their deadline (unconfirmed DIALED addresses vote private)."""
        for probe_id in [p.probe_id for p in self._probes.values() if p.deadline <= now]:
            self._finish(self._probes.pop(probe_id), now)

    @property
    def pending_probes(self) -> int:
        return len(self._probes)

    def finish_pending(self, now: float) -> None:
        """Finish every probe now, as if its deadline had passed (end of a driver's round)."""
        for probe_id in list(self._probes):
            self._finish(self._probes.pop(probe_id), now)

    def next_timer(self) -> float | None:
        times = [p.deadline for p in self._probes.values()]
        times += [st.next_check for st in self._addrs.values() if not st.in_flight]
        return min(times) if times else None

    def _finish(self, probe: Probe, now: float) -> None:
        for endpoint, nonce in probe.entries:
            self._nonces.pop(nonce, None)
            state = self._addrs.get(endpoint)
            if state is None:
                continue
            if endpoint in probe.confirmed:
                self._vote(state, probe.server, True)
            elif probe.statuses.get(endpoint) == DIALED:
                self._vote(state, probe.server, False)
        for endpoint, _ in probe.entries:
            state = self._addrs.get(endpoint)
            if state is None:
                continue
            if not any(endpoint in (e for e, _ in p.entries) for p in self._probes.values()):
                state.in_flight = False
                self._classify(state, now)

    def _vote(self, state: AddressState, server: str, reachable: bool) -> None:
        state.votes = deque(
            ((s, r) for s, r in state.votes if s != server), maxlen=self.config.vote_window
        )
        state.votes.append((server, reachable))

    def _classify(self, state: AddressState, now: float) -> None:
        yes = sum(1 for _, r in state.votes if r)
        no = len(state.votes) - yes
        need = self.config.min_confirmations
        if yes >= need and yes > no:
            new = Reachability.PUBLIC
        elif no >= need and no > yes:
            new = Reachability.PRIVATE
        else:
            new = Reachability.UNKNOWN
        if new is not state.reachability:
            state.reachability = new
            state.last_changed = now
        delay = {
            Reachability.PUBLIC: self.config.recheck_public,
            Reachability.PRIVATE: self.config.recheck_private,
            Reachability.UNKNOWN: self.config.recheck_unknown,
        }[new]
        state.next_check = now + delay


def decode_message(data: bytes) -> dict[str, Any]:
    """Decode any AutoNAT message (bounded); the caller dispatches on ``msg['t']``."""
    return wire.decode(data)


__all__ = [
    "MALFORMED",
    "PROTOCOL_ID",
    "AutoNatClientConfig",
    "AutoNatClientCore",
    "AutoNatServerConfig",
    "AutoNatServerCore",
    "DialBack",
    "DialPlan",
    "Probe",
    "Reachability",
    "decode_message",
    "encode_dial_back",
]
