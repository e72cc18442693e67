"""Typed errors of the NAT-traversal layer (AutoNAT, relay, hole punching, rendezvous).

Every refusal a NAT service sends carries one of the status codes below, so a peer can tell
"over a limit" from "not allowed" from "malformed" without parsing prose.
"""

from __future__ import annotations

from ..errors import MeshError, ProtocolViolation

# Status codes shared by relay, AutoNAT and rendezvous replies (wire values, see docs/protocol/nat.md).
OK = "OK"
MALFORMED = "MALFORMED"
PERMISSION_DENIED = "PERMISSION_DENIED"
RESOURCE_LIMIT_EXCEEDED = "RESOURCE_LIMIT_EXCEEDED"
RATE_LIMITED = "RATE_LIMITED"
NO_RESERVATION = "NO_RESERVATION"
CONNECTION_FAILED = "CONNECTION_FAILED"
NOT_FOUND = "NOT_FOUND"

STATUS_CODES = frozenset(
    {
        OK,
        MALFORMED,
        PERMISSION_DENIED,
        RESOURCE_LIMIT_EXCEEDED,
        RATE_LIMITED,
        NO_RESERVATION,
        CONNECTION_FAILED,
        NOT_FOUND,
    }
)


class NatError(MeshError):
    """Base class of every error raised by latticaray.mesh.nat."""


class MalformedMessage(NatError, ProtocolViolation):
    """A NAT protocol message is not valid msgpack, is oversize, or has missing/mistyped fields."""


class NatRefused(NatError):
    """A NAT service refused a request; ``code`` is one of the status codes of this module."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class RelayRefused(NatRefused):
    """The relay refused a reservation or a circuit (limits, no reservation, not allowed)."""


class RendezvousRefused(NatRefused):
    """The rendezvous point refused a registration or a discovery."""


class DialBackRefused(NatRefused):
    """The AutoNAT server refused to dial back (rate limit, address not at the observed IP)."""


class ForgedDialBack(NatError):
    """A dial-back arrived with a nonce this node never issued, or for another address or probe."""


class CircuitLimitExceeded(NatError):
    """A relayed circuit used up its byte or duration budget; the relay closes it."""


class NotReachable(NatError):
    """A node in auto mode is neither public nor holds a relay reservation (the message says
    what it found and tried: AutoNAT servers met, NAT type, relays and why each failed)."""


class HolePunchFailed(NatError):
    """Every hole-punch attempt failed; the connection stays on the relay."""
