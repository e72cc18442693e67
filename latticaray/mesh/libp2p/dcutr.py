"""DCUtR (``/libp2p/dcutr``): direct connection upgrade through a relay, codec and sans-I/O core.

``HolePunch{type=1 (CONNECT 100, SYNC 300), ObsAddrs=2}``, length-prefixed, at most 4 KiB. Roles
follow the spec: on a relayed connection the peer that *accepted* it (B) opens the DCUtR stream
and sends CONNECT with its observed addresses, measuring the time until A's CONNECT comes back
(the RTT); B then sends SYNC and dials A after RTT/2, while A dials B as soon as SYNC arrives, so
both dials meet in the middle (a TCP simultaneous open; for QUIC A dials and B sends the UDP
punch packets). :class:`DcutrCore` runs either role and returns :class:`DialAt` actions; the
attempt is retried by the shell (the spec allows 3 tries).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from .errors import ProtobufError
from .protobuf import Writer, parse_fields

__all__ = [
    "DCUTR_PROTOCOL",
    "MAX_DCUTR_MESSAGE",
    "DcutrCore",
    "DcutrRole",
    "DcutrState",
    "DialAt",
    "HolePunch",
    "HolePunchType",
]

DCUTR_PROTOCOL = "/libp2p/dcutr"
MAX_DCUTR_MESSAGE = 4096
MAX_OBS_ADDRS = 32


class HolePunchType(IntEnum):
    CONNECT = 100
    SYNC = 300


@dataclass(frozen=True, slots=True)
class HolePunch:
    type: HolePunchType
    obs_addrs: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        return (
            Writer().uint(1, int(self.type), always=True).repeated_bytes(2, self.obs_addrs).finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> HolePunch:
        if len(data) > MAX_DCUTR_MESSAGE:
            raise ProtobufError(f"DCUtR message of {len(data)} bytes exceeds {MAX_DCUTR_MESSAGE}")
        f = parse_fields(data, max_fields=MAX_OBS_ADDRS + 4)
        try:
            kind = HolePunchType(f.uint(1))
        except ValueError:
            raise ProtobufError("unknown DCUtR message type") from None
        return cls(kind, tuple(f.repeated_bytes(2, max_len=512, max_count=MAX_OBS_ADDRS)))


class DcutrRole(Enum):
    INITIATOR = "initiator"  # B: accepted the relayed connection, opens the DCUtR stream
    RESPONDER = "responder"  # A: dialed through the relay


class DcutrState(Enum):
    IDLE = "idle"
    AWAIT_CONNECT = "await-connect"
    AWAIT_SYNC = "await-sync"
    DONE = "done"
    FAILED = "failed"


_TRANSITIONS: dict[DcutrState, frozenset[DcutrState]] = {
    DcutrState.IDLE: frozenset({DcutrState.AWAIT_CONNECT, DcutrState.AWAIT_SYNC}),
    DcutrState.AWAIT_CONNECT: frozenset({DcutrState.DONE, DcutrState.FAILED}),
    DcutrState.AWAIT_SYNC: frozenset({DcutrState.DONE, DcutrState.FAILED}),
    DcutrState.DONE: frozenset(),
    DcutrState.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class DialAt:
    """Dial ``addrs`` (the remote's observed addresses) at time ``when``."""

    addrs: tuple[bytes, ...]
    when: float


class DcutrCore:
    """One DCUtR exchange. Initiator: :meth:`start`, then :meth:`receive` the CONNECT answer.
    Responder: :meth:`receive` CONNECT (answer it with :meth:`data_to_send`), then SYNC."""

    def __init__(self, role: DcutrRole, our_addrs: tuple[bytes, ...]) -> None:
        self.role = role
        self.our_addrs = our_addrs[:MAX_OBS_ADDRS]
        self.state = DcutrState.IDLE
        self.rtt: float | None = None
        self._sent_at = 0.0
        self._remote_addrs: tuple[bytes, ...] = ()
        self._out: list[HolePunch] = []

    def _to(self, state: DcutrState) -> None:
        if state not in _TRANSITIONS[self.state]:
            was, self.state = self.state, DcutrState.FAILED
            raise ProtobufError(f"DCUtR: unexpected message in state {was.value}")
        self.state = state

    def _fail(self, reason: str) -> ProtobufError:
        self.state = DcutrState.FAILED
        return ProtobufError(f"DCUtR: {reason}")

    def start(self, now: float) -> HolePunch:
        if self.role is not DcutrRole.INITIATOR:
            raise ValueError("only the initiator starts DCUtR")
        self._to(DcutrState.AWAIT_CONNECT)
        self._sent_at = now
        return HolePunch(HolePunchType.CONNECT, self.our_addrs)

    def data_to_send(self) -> list[HolePunch]:
        out, self._out = self._out, []
        return out

    def receive(self, message: HolePunch, now: float) -> DialAt | None:
        if self.role is DcutrRole.INITIATOR:
            if message.type is not HolePunchType.CONNECT:
                raise self._fail("expected CONNECT")
            self._to(DcutrState.DONE)
            self.rtt = now - self._sent_at
            self._out.append(HolePunch(HolePunchType.SYNC))
            return DialAt(message.obs_addrs, now + self.rtt / 2)
        if self.state is DcutrState.IDLE:
            if message.type is not HolePunchType.CONNECT:
                raise self._fail("the first message must be CONNECT")
            self._remote_addrs = message.obs_addrs
            self._to(DcutrState.AWAIT_SYNC)
            self._out.append(HolePunch(HolePunchType.CONNECT, self.our_addrs))
            return None
        if message.type is not HolePunchType.SYNC:
            raise self._fail("expected SYNC")
        self._to(DcutrState.DONE)
        return DialAt(self._remote_addrs, now)
