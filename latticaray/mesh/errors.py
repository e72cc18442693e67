"""Typed errors of the mesh layer (identity, handshakes, dialing, framing, RPC) and RPC status codes."""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every error raised by latticaray.mesh."""


class MultiaddrError(MeshError, ValueError):
    """A multiaddr string or byte form is malformed or uses an unsupported protocol."""


class HandshakeError(MeshError):
    """A secure handshake failed: bad certificate, bad signature, wrong ALPN, or timeout."""


class PeerIdMismatch(HandshakeError):
    """The remote proved an identity other than the peer ID we dialed."""

    def __init__(self, expected: object, actual: object) -> None:
        super().__init__(f"dialed peer {expected} but the remote authenticated as {actual}")
        self.expected = expected
        self.actual = actual


class PeerUnreachable(MeshError):
    """No known address of the peer could be dialed (or none is known)."""


class ConnectionClosed(MeshError):
    """The connection or channel closed while an operation was in flight."""


class ProtocolViolation(MeshError):
    """The remote sent a malformed frame or broke the protocol; the connection is closed."""


class FrameTooLarge(ProtocolViolation):
    """A frame or message exceeded the configured size limit."""


class RpcError(MeshError):
    """A call failed on the remote side (or was refused); carries a status code.

    ``remote_traceback`` is the formatted remote traceback where the server chose to share it.
    """

    def __init__(self, code: str, message: str, remote_traceback: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.remote_traceback = remote_traceback


class RpcTimeout(RpcError, TimeoutError):
    """The call's deadline passed before it completed."""

    def __init__(self, message: str = "deadline exceeded") -> None:
        super().__init__("DEADLINE_EXCEEDED", message)


class RpcCancelled(RpcError):
    """The call was cancelled by the other side."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__("CANCELLED", message)


class RpcUnimplemented(RpcError):
    """The remote has no service of that name (or not of that call kind)."""

    def __init__(self, message: str) -> None:
        super().__init__("UNIMPLEMENTED", message)


class RpcConnectionLost(RpcError, ConnectionClosed):
    """The session carrying the call closed (peer died, channel broke, or a protocol violation)."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


class Status:
    """Status codes carried in ERROR frames (names follow gRPC's)."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"


def error_for_status(code: str, message: str, remote_traceback: str | None = None) -> RpcError:
    """The exception a caller raises for an RPC error status received from the remote."""
    if code == Status.DEADLINE_EXCEEDED:
        return RpcTimeout(f"remote: {message}")
    if code == Status.CANCELLED:
        return RpcCancelled(f"remote: {message}")
    if code == Status.UNIMPLEMENTED:
        return RpcUnimplemented(message)
    return RpcError(code, message, remote_traceback)
