"""The Channel contract: an authenticated, reliable, ordered duplex byte stream.

Every transport (a QUIC stream, a TCP+TLS connection, a Unix socket, a TLS session tunnelled
through a relay) hands the RPC layer a :class:`Channel`. The RPC session multiplexes calls over it
with its own framing and per-call flow control, so transports need only move bytes, apply write
backpressure, and say who is on the other end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .identity import PeerId
    from .multiaddr import Multiaddr


@runtime_checkable
class Channel(Protocol):
    #: The authenticated identity of the remote end (verified during the handshake).
    remote_peer: PeerId
    #: Our own identity.
    local_peer: PeerId
    #: The address of the remote as this side sees it (the observed address for identify).
    remote_addr: Multiaddr | None
    #: Short transport name for metrics and path reporting: "quic", "tcp", "unix", "relay", ...
    transport: str

    async def read(self, max_bytes: int) -> bytes:
        """Return between 1 and ``max_bytes`` bytes; ``b""`` at end of stream."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for sending. Never blocks; callers must ``await drain()`` regularly."""

    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark (write backpressure).

        Raises :class:`~latticaray.mesh.errors.ConnectionClosed` if the channel closed.
        """

    def close(self) -> None:
        """Close gracefully (flush what was written, then end the stream)."""

    def abort(self) -> None:
        """Close at once, dropping unsent data."""

    @property
    def is_closed(self) -> bool:
        """True once the channel is closed in either direction."""
