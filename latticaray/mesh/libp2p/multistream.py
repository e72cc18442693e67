"""multistream-select 1.0: which protocol a connection or stream speaks, as a sans-I/O core.

Each message is ``uvarint(len) || text || "\\n"``. Both sides first send the header
``/multistream/1.0.0``; the initiator then proposes protocols one at a time and the responder
echoes the one it accepts or answers ``na``. ``ls`` asks the responder for its list.

Lazy negotiation: an initiator with a single protocol sends the header, the proposal and its
first application bytes in one write, without waiting for the echo (rust-libp2p's ``V1Lazy``);
the echo is consumed when it arrives, and ``na`` then fails the stream.

:class:`MultistreamCore` is fed received bytes and returns :class:`ProtocolSelected` with the
bytes that followed negotiation (they belong to the selected protocol). Every message is bounded
(:data:`MAX_MESSAGE`), and so is the number of proposals a responder answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..varint import VarintError, decode_varint, encode_varint
from .errors import MultistreamError, ProtocolNotSupported

__all__ = [
    "MAX_MESSAGE",
    "MULTISTREAM_PROTOCOL",
    "MultistreamCore",
    "MultistreamRole",
    "MultistreamState",
    "ProtocolSelected",
    "encode_message",
]

MULTISTREAM_PROTOCOL = "/multistream/1.0.0"
NA = "na"
LS = "ls"
#: The largest message accepted (length prefix value, newline included).
MAX_MESSAGE = 1024
#: Proposals a responder answers with ``na`` before it gives up on the stream.
MAX_ATTEMPTS = 32
_MAX_LS_BYTES = 64 * 1024


class MultistreamRole(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class MultistreamState(Enum):
    AWAIT_HEADER = "await-header"
    AWAIT_RESPONSE = "await-response"  # initiator: a proposal is out
    AWAIT_PROPOSAL = "await-proposal"  # responder
    SELECTED = "selected"
    FAILED = "failed"


_TRANSITIONS: dict[MultistreamState, frozenset[MultistreamState]] = {
    MultistreamState.AWAIT_HEADER: frozenset(
        {MultistreamState.AWAIT_RESPONSE, MultistreamState.AWAIT_PROPOSAL, MultistreamState.FAILED}
    ),
    MultistreamState.AWAIT_RESPONSE: frozenset(
        {MultistreamState.AWAIT_RESPONSE, MultistreamState.SELECTED, MultistreamState.FAILED}
    ),
    MultistreamState.AWAIT_PROPOSAL: frozenset(
        {MultistreamState.AWAIT_PROPOSAL, MultistreamState.SELECTED, MultistreamState.FAILED}
    ),
    MultistreamState.SELECTED: frozenset(),
    MultistreamState.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ProtocolSelected:
    """Negotiation finished on ``protocol``; ``leftover`` bytes already belong to it."""

    protocol: str
    leftover: bytes


def encode_message(text: str) -> bytes:
    body = text.encode("utf-8") + b"\n"
    if len(body) > MAX_MESSAGE:
        raise MultistreamError(f"multistream message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return encode_varint(len(body)) + body


def _check_protocol(protocol: str) -> str:
    if not protocol or "\n" in protocol or protocol in (NA, LS, MULTISTREAM_PROTOCOL):
        raise MultistreamError(f"{protocol!r} cannot be negotiated as a protocol")
    encode_message(protocol)
    return protocol


class MultistreamCore:
    """One side of a multistream-select negotiation on one stream (or raw connection).

    Initiator: ``protocols`` in order of preference. Responder: the protocols it accepts.
    Call :meth:`initiate` once for the opening bytes, then :meth:`receive` with each chunk read;
    send whatever :meth:`data_to_send` returns after each call. :meth:`receive` returns
    ``[ProtocolSelected]`` once done and raises :class:`MultistreamError` on a broken exchange
    (:class:`ProtocolNotSupported` when every proposal was refused).
    """

    __slots__ = (
        "_attempts",
        "_buf",
        "_next",
        "_out",
        "_protocols",
        "_state",
        "lazy",
        "role",
        "selected",
    )

    def __init__(
        self, role: MultistreamRole, protocols: Sequence[str], *, lazy: bool = False
    ) -> None:
        if not protocols:
            raise MultistreamError("multistream needs at least one protocol")
        if lazy and (role is not MultistreamRole.INITIATOR or len(protocols) != 1):
            raise MultistreamError("lazy negotiation is for an initiator with one protocol")
        self.role = role
        self.lazy = lazy
        self._protocols = tuple(_check_protocol(p) for p in protocols)
        self._state = MultistreamState.AWAIT_HEADER
        self._buf = bytearray()
        self._out = bytearray()
        self._next = 0  # initiator: index of the proposal awaiting an answer
        self._attempts = 0
        self.selected: str | None = None

    @property
    def state(self) -> MultistreamState:
        return self._state

    @property
    def optimistic_protocol(self) -> str | None:
        """Under lazy negotiation, the protocol the initiator may already write."""
        return (
            self._protocols[0] if self.lazy and self._state is not MultistreamState.FAILED else None
        )

    def _to(self, state: MultistreamState) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise MultistreamError(
                f"multistream: no transition {self._state.value} -> {state.value}"
            )
        self._state = state

    def _fail(self, exc: MultistreamError) -> MultistreamError:
        self._state = MultistreamState.FAILED
        return exc

    def initiate(self) -> bytes:
        """The opening bytes: the header, and the first proposal on the initiator side."""
        self._out += encode_message(MULTISTREAM_PROTOCOL)
        if self.role is MultistreamRole.INITIATOR:
            self._out += encode_message(self._protocols[0])
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _pop_message(self) -> str | None:
        if not self._buf:
            return None
        try:
            length, start = decode_varint(bytes(self._buf[:10]))
        except VarintError as exc:
            if all(b & 0x80 for b in self._buf) and len(self._buf) < 2:
                return None
            raise self._fail(MultistreamError(f"bad multistream length prefix: {exc}")) from None
        if length > MAX_MESSAGE or length == 0:
            raise self._fail(MultistreamError(f"multistream message length {length} out of range"))
        if len(self._buf) - start < length:
            return None
        body = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        if not body.endswith(b"\n"):
            raise self._fail(MultistreamError("multistream message does not end with a newline"))
        try:
            return body[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(MultistreamError("multistream message is not UTF-8")) from None

    def receive(self, data: bytes) -> list[ProtocolSelected]:
        if self._state in (MultistreamState.SELECTED, MultistreamState.FAILED):
            raise MultistreamError(f"multistream negotiation already {self._state.value}")
        self._buf += data
        while self._state not in (MultistreamState.SELECTED, MultistreamState.FAILED):
            message = self._pop_message()
            if message is None:
                return []
            if self._state is MultistreamState.AWAIT_HEADER:
                if message != MULTISTREAM_PROTOCOL:
                    raise self._fail(
                        MultistreamError(
                            f"remote does not speak {MULTISTREAM_PROTOCOL}: {message!r}"
                        )
                    )
                if self.role is MultistreamRole.INITIATOR:
                    self._to(MultistreamState.AWAIT_RESPONSE)
                else:
                    self._to(MultistreamState.AWAIT_PROPOSAL)
            elif self._state is MultistreamState.AWAIT_RESPONSE:
                self._on_response(message)
            else:
                self._on_proposal(message)
        leftover = bytes(self._buf)
        self._buf.clear()
        assert self.selected is not None
        return [ProtocolSelected(self.selected, leftover)]

    def _on_response(self, message: str) -> None:
        proposed = self._protocols[self._next]
        if message == proposed:
            self.selected = proposed
            self._to(MultistreamState.SELECTED)
            return
        if message != NA:
            raise self._fail(
                MultistreamError(f"proposed {proposed!r} but the remote answered {message!r}")
            )
        self._next += 1
        if self.lazy or self._next >= len(self._protocols):
            raise self._fail(ProtocolNotSupported(self._protocols))
        self._to(MultistreamState.AWAIT_RESPONSE)
        self._out += encode_message(self._protocols[self._next])

    def _on_proposal(self, message: str) -> None:
        self._attempts += 1
        if self._attempts > MAX_ATTEMPTS:
            raise self._fail(MultistreamError(f"remote proposed more than {MAX_ATTEMPTS} times"))
        if message == LS:
            self._out += self._ls_answer()
        elif message in self._protocols:
            self.selected = message
            self._out += encode_message(message)
            self._to(MultistreamState.SELECTED)
            return
        else:
            self._out += encode_message(NA)
        self._to(MultistreamState.AWAIT_PROPOSAL)

    def _ls_answer(self) -> bytes:
        body = b"".join(encode_message(p) for p in self._protocols) + b"\n"
        if len(body) > _MAX_LS_BYTES:
            raise self._fail(MultistreamError("protocol list too long to send"))
        return encode_varint(len(body)) + body
