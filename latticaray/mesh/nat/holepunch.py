"""Hole punching coordination, DCUtR-like (sans-I/O), plus per-connection path metrics.

Runs over an existing relayed connection between two peers:

1. The *initiator* sends ``hp_connect {a: observed addrs, nat, tok}`` and starts a clock.
2. The *responder* answers ``hp_connect`` with its own addrs and NAT type; the initiator now
   knows the relay round-trip time.
3. The initiator sends ``hp_sync`` and starts punching RTT/2 later; the responder starts punching
   when ``hp_sync`` arrives, so both open at about the same moment.
4. Punch mode: ``direct`` (both sides spray the other's addresses from their shared socket), or
   ``birthday`` when exactly one side is behind an endpoint-dependent NAT (see birthday.py), or
   ``none`` when both are (stay relayed).
5. The driver reports the outcome; on failure the initiator retries (up to ``max_attempts``),
   then gives up and the connection stays on the relay. On success the traffic migrates to the
   direct path and the relay is kept as a fallback.

Punch packets carry ``tok``, a random token exchanged over the (end-to-end encrypted) relayed
connection, so a third party cannot steer a punch; the session run over the direct path then
authenticates the peer again.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from . import wire
from .addresses import Endpoint
from .errors import MalformedMessage
from .nattype import NatType

PROTOCOL_ID = "/latticaray/dcutr/1"
TOKEN_SIZE = 16
MAX_ADDRS = 16


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class PunchMode(enum.Enum):
    DIRECT = "direct"
    BIRTHDAY_EASY = "birthday-easy"  # we are the cone side: probe many ports
    BIRTHDAY_HARD = "birthday-hard"  # we are the symmetric side: open many sockets
    DIAL = "dial"  # they are publicly reachable: we just dial them
    AWAIT = "await"  # we are publicly reachable: they dial us
    NONE = "none"


def choose_mode(
    ours: NatType, theirs: NatType, our_public: bool = False, their_public: bool = False
) -> PunchMode:
    """How to get a direct path, from both sides' NAT types and AutoNAT reachability."""
    if their_public and not our_public:
        return PunchMode.DIAL
    if our_public and not their_public:
        return PunchMode.AWAIT
    if ours.is_hard and theirs.is_hard:
        return PunchMode.NONE
    if ours.is_hard:
        return PunchMode.BIRTHDAY_HARD
    if theirs.is_hard:
        return PunchMode.BIRTHDAY_EASY
    return PunchMode.DIRECT


@dataclass
class HolePunchConfig:
    max_attempts: int = 3
    retry_delay: float = 1.0
    message_timeout: float = 5.0
    enabled: bool = True


# ----------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class SendMessage:
    data: bytes


@dataclass(frozen=True)
class StartPunch:
    """Start punching at ``at`` (absolute time, same clock as ``now``)."""

    attempt: int
    at: float
    mode: PunchMode
    remote_addrs: tuple[Endpoint, ...]
    token: bytes
    remote_tcp_port: int = 0  # the peer's TCP port for simultaneous open (0: none)


@dataclass(frozen=True)
class PunchSucceeded:
    attempt: int
    remote: Endpoint


@dataclass(frozen=True)
class GiveUp:
    reason: str


Action = SendMessage | StartPunch | PunchSucceeded | GiveUp
"""What a :class:`HolePunchSession` asks its driver to do."""


class State(enum.Enum):
    IDLE = "idle"
    WAIT_CONNECT = "wait-connect"
    WAIT_SYNC = "wait-sync"
    PUNCHING = "punching"
    RETRY_WAIT = "retry-wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class HolePunchSession:
    """One coordination between two peers over their relayed connection."""

    def __init__(
        self,
        role: Role,
        our_addrs: list[Endpoint],
        our_nat: NatType,
        config: HolePunchConfig | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        our_public: bool = False,
        our_tcp_port: int = 0,
    ) -> None:
        self.role = role
        self.our_tcp_port = our_tcp_port
        self.remote_tcp_port = 0
        self.our_public = our_public
        self.remote_public = False
        self.our_addrs = list(our_addrs)[:MAX_ADDRS]
        self.our_nat = our_nat
        self.config = config or HolePunchConfig()
        self._random_bytes = random_bytes
        self.state = State.IDLE
        self.attempt = 0
        self.rtt: float | None = None
        self.token = b""
        self.remote_addrs: tuple[Endpoint, ...] = ()
        self.remote_nat = NatType.UNKNOWN
        self._sent_at = 0.0
        self._timer: float | None = None
        self.history: list[tuple[int, str]] = []

    # ---------------------------------------------------------------------- initiator side
    def start(self, now: float) -> list[Action]:
        if self.role is not Role.INITIATOR:
            raise RuntimeError("only the initiator starts a hole punch")
        if not self.config.enabled:
            self.state = State.FAILED
            return [GiveUp("hole punching is disabled")]
        return self._send_connect(now)

    def _send_connect(self, now: float) -> list[Action]:
        self.attempt += 1
        self.token = self._random_bytes(TOKEN_SIZE)
        self._sent_at = now
        self.state = State.WAIT_CONNECT
        self._timer = now + self.config.message_timeout
        return [SendMessage(self._connect_message())]

    def _connect_message(self) -> bytes:
        return wire.encode(
            "hp_connect",
            a=[list(a) for a in self.our_addrs],
            nat=self.our_nat.value,
            tok=self.token,
            n=self.attempt,
            pub=self.our_public,
            tcp=self.our_tcp_port,
        )

    # ------------------------------------------------------------------------ both sides
    def on_message(self, data: bytes, now: float) -> list[Action]:
        msg = wire.decode(data)
        kind = msg["t"]
        if kind == "hp_connect":
            addrs = tuple(wire.get_endpoints(msg, "a", MAX_ADDRS))
            nat_text = wire.get_str(msg, "nat", 32)
            try:
                nat = NatType(nat_text)
            except ValueError:
                raise MalformedMessage(f"unknown NAT type {nat_text!r}") from None
            attempt = wire.get_int(msg, "n", 1, 1000)
            token = wire.get_bytes(msg, "tok", TOKEN_SIZE, TOKEN_SIZE)
            self.remote_public = msg.get("pub") is True
            self.remote_tcp_port = wire.get_int(msg, "tcp", 0, 65535, optional=True, default=0)
            self.remote_addrs, self.remote_nat = addrs, nat
            if self.role is Role.RESPONDER:
                if not self.config.enabled:
                    self.state = State.FAILED
                    return [
                        SendMessage(wire.encode("hp_refuse", m="hole punching is disabled")),
                        GiveUp("hole punching is disabled"),
                    ]
                self.attempt, self.token = attempt, token
                self.state = State.WAIT_SYNC
                self._timer = now + self.config.message_timeout
                return [
                    SendMessage(
                        wire.encode(
                            "hp_connect",
                            a=[list(a) for a in self.our_addrs],
                            nat=self.our_nat.value,
                            tok=token,
                            n=attempt,
                            pub=self.our_public,
                            tcp=self.our_tcp_port,
                        )
                    )
                ]
            if (
                self.state is not State.WAIT_CONNECT
                or attempt != self.attempt
                or token != self.token
            ):
                raise MalformedMessage("unexpected hp_connect reply (wrong attempt or token)")
            self.rtt = max(0.0, now - self._sent_at)
            mode = choose_mode(self.our_nat, nat, self.our_public, self.remote_public)
            if mode is PunchMode.NONE:
                self.state = State.FAILED
                return [
                    SendMessage(wire.encode("hp_refuse", m="both sides are endpoint-dependent")),
                    GiveUp("both peers are behind endpoint-dependent (symmetric) NATs"),
                ]
            self.state = State.PUNCHING
            self._timer = None
            return [
                SendMessage(wire.encode("hp_sync", n=self.attempt)),
                StartPunch(
                    self.attempt, now + self.rtt / 2, mode, addrs, self.token, self.remote_tcp_port
                ),
            ]
        if kind == "hp_sync":
            attempt = wire.get_int(msg, "n", 1, 1000)
            if (
                self.role is not Role.RESPONDER
                or self.state is not State.WAIT_SYNC
                or attempt != self.attempt
            ):
                raise MalformedMessage("unexpected hp_sync")
            mode = choose_mode(self.our_nat, self.remote_nat, self.our_public, self.remote_public)
            if mode is PunchMode.NONE:
                self.state = State.FAILED
                return [GiveUp("both peers are behind endpoint-dependent (symmetric) NATs")]
            self.state = State.PUNCHING
            self._timer = None
            return [
                StartPunch(attempt, now, mode, self.remote_addrs, self.token, self.remote_tcp_port)
            ]
        if kind == "hp_refuse":
            self.state = State.FAILED
            return [GiveUp("peer refused: " + (wire.get_str(msg, "m", 256, optional=True) or ""))]
        raise MalformedMessage(f"unknown hole-punch message {kind!r}")

    def on_punch_result(self, attempt: int, remote: Endpoint | None, now: float) -> list[Action]:
        """The driver's punch for ``attempt`` finished: ``remote`` is the direct peer or None."""
        if attempt != self.attempt or self.state is not State.PUNCHING:
            return []
        self.history.append((attempt, "ok" if remote else "failed"))
        if remote is not None:
            self.state = State.SUCCEEDED
            return [PunchSucceeded(attempt, remote)]
        if self.role is Role.RESPONDER:
            self.state = State.WAIT_SYNC  # the initiator decides whether to retry
            self._timer = now + self.config.message_timeout + self.config.retry_delay
            return []
        if self.attempt >= self.config.max_attempts:
            self.state = State.FAILED
            return [GiveUp(f"no direct path after {self.attempt} attempts")]
        self.state = State.RETRY_WAIT
        self._timer = now + self.config.retry_delay
        return []

    def tick(self, now: float) -> list[Action]:
        if self._timer is None or now < self._timer:
            return []
        self._timer = None
        if self.state is State.RETRY_WAIT:
            return self._send_connect(now)
        if self.state in (State.WAIT_CONNECT, State.WAIT_SYNC):
            if self.role is Role.INITIATOR and self.attempt < self.config.max_attempts:
                return self._send_connect(now)
            self.state = State.FAILED
            return [GiveUp("the peer stopped answering the hole-punch coordination")]
        return []

    def next_timer(self) -> float | None:
        return self._timer

    @property
    def done(self) -> bool:
        return self.state in (State.SUCCEEDED, State.FAILED)


# ------------------------------------------------------------------------------- metrics
@dataclass
class PathMetrics:
    """Which path a connection uses, and how it got there (for status and the NAT matrix)."""

    peer: str
    path: str = "none"  # "direct", "punched", "birthday", "reversal", "relayed"
    started_at: float | None = None
    connected_at: float | None = None
    first_rpc_at: float | None = None
    upgraded_at: float | None = None
    punch_attempts: int = 0
    rtt_relay: float | None = None
    rtt_direct: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    def record(self, now: float, event: str) -> None:
        self.events.append((now, event))
        if len(self.events) > 64:
            del self.events[:-64]
