"""Typed errors of the libp2p-standard protocols (codecs, negotiation, handshakes, muxing)."""

from __future__ import annotations

from ..errors import ConnectionClosed, HandshakeError, MeshError, ProtocolViolation

__all__ = [
    "BlockNotHeld",
    "KeyDecodeError",
    "Libp2pHandshakeError",
    "MessageTooLarge",
    "MultistreamError",
    "ProtobufError",
    "ProtocolNotSupported",
    "StreamReset",
    "UnsupportedKeyType",
    "YamuxError",
]


class ProtobufError(ProtocolViolation, ValueError):
    """A protobuf message is truncated, malformed, or breaks a bound (field size, count)."""


class MessageTooLarge(ProtobufError):
    """A length-prefixed message declares more bytes than the reader allows."""


class KeyDecodeError(ProtobufError):
    """A libp2p ``PublicKey`` protobuf or its key material is malformed."""


class UnsupportedKeyType(KeyDecodeError):
    """A libp2p key type this node cannot verify (an unknown type or curve)."""


class MultistreamError(ProtocolViolation):
    """multistream-select: a malformed message, a wrong header, or a broken exchange."""


class ProtocolNotSupported(MultistreamError):
    """The remote answered ``na`` to every protocol proposed."""

    def __init__(self, protocols: tuple[str, ...]) -> None:
        super().__init__(f"remote supports none of {', '.join(protocols)}")
        self.protocols = protocols


class Libp2pHandshakeError(HandshakeError):
    """A Noise handshake failed: bad message, failed decryption, or a bad identity proof."""


class YamuxError(ProtocolViolation):
    """The remote broke the yamux protocol (bad frame, window overrun, unknown stream)."""


class StreamReset(ConnectionClosed):
    """The stream was reset (by either side) or its connection closed under it."""


class BlockNotHeld(MeshError):
    """A Bitswap peer answered DONT_HAVE for a block we asked it for."""
