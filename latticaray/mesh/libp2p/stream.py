"""What every libp2p stream and connection offers, whatever multiplexes it (yamux, QUIC).

A libp2p connection carries many streams, each negotiated with multistream-select. Two
multiplexers exist here: yamux over Noise over TCP (:mod:`.connection`) and QUIC's own streams
(:mod:`latticaray.mesh.quicstreams`). Protocol code (identify, ping, Kademlia, Bitswap, relay,
DCUtR) is written against the two types of this module and runs unchanged on either:

* :class:`MuxedStream`: the negotiation (both roles, lazy) and the bounded reads every protocol
  uses (``read``, ``readexactly``, ``read_message``, ``read_all``) on top of four primitives
  a multiplexer supplies (``_recv``, ``_send_now``, ``write``, ``close_write``/``reset``);
* :class:`MuxedConnection`: the remote's identity and address, and ``open_stream``;
* :class:`ProtocolRouter`: protocol ID -> handler of inbound streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import ConnectionClosed, ProtocolViolation
from ..varint import VarintError, decode_varint
from .errors import MessageTooLarge, MultistreamError, StreamReset
from .multistream import MultistreamCore, MultistreamRole
from .protobuf import encode_length_prefixed

if TYPE_CHECKING:
    from ..identity import PeerId
    from ..multiaddr import Multiaddr
    from .keys import PublicKey

__all__ = [
    "DEFAULT_NEGOTIATION_TIMEOUT",
    "DEFAULT_STREAM_TIMEOUT",
    "MuxedConnection",
    "MuxedStream",
    "ProtocolRouter",
    "StreamHandler",
    "StreamRouter",
    "open_negotiated",
    "serve_inbound",
]

log = logging.getLogger(__name__)

DEFAULT_STREAM_TIMEOUT = 30.0
DEFAULT_NEGOTIATION_TIMEOUT = 10.0
_READ_CHUNK = 256 * 1024

StreamHandler = Callable[["MuxedStream"], Awaitable[None]]


class ProtocolRouter:
    """Protocol ID -> handler of inbound streams; what multistream answers for inbound streams."""

    __slots__ = ("_handlers", "_listeners")

    def __init__(self) -> None:
        self._handlers: dict[str, StreamHandler] = {}
        self._listeners: list[Callable[[], None]] = []

    def add(self, protocol: str, handler: StreamHandler) -> None:
        new = protocol not in self._handlers
        self._handlers[protocol] = handler
        if new:
            self._changed()

    def remove(self, protocol: str) -> None:
        if self._handlers.pop(protocol, None) is not None:
            self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a protocol is added or removed (identify push)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def protocols(self) -> list[str]:
        return list(self._handlers)

    def handler(self, protocol: str) -> StreamHandler | None:
        return self._handlers.get(protocol)


class StreamRouter(Protocol):
    """What a connection asks of its router for inbound streams (a :class:`ProtocolRouter`, or
    a per-connection view of one)."""

    @property
    def protocols(self) -> list[str]: ...

    def handler(self, protocol: str) -> StreamHandler | None: ...


class MuxedConnection(Protocol):
    """A libp2p connection as the protocols see it."""

    @property
    def remote_key(self) -> PublicKey: ...

    @property
    def remote_peer_id(self) -> bytes: ...

    @property
    def remote_peer_text(self) -> str: ...

    @property
    def mesh_peer_id(self) -> PeerId: ...

    @property
    def remote_multiaddr(self) -> Multiaddr | None: ...

    @property
    def is_closed(self) -> bool: ...

    async def open_stream(
        self, protocols: Sequence[str] | str, *, lazy: bool = False, timeout: float | None = None
    ) -> MuxedStream: ...


class MuxedStream:
    """One stream of a libp2p connection, after (or, lazily, during) multistream negotiation."""

    __slots__ = ("_negotiation", "_pushback", "protocol", "timeout")

    def __init__(self) -> None:
        self.protocol = ""
        #: Default deadline of reads and writes (None: none; a long-lived stream's owner has its
        #: own liveness checks).
        self.timeout: float | None = DEFAULT_STREAM_TIMEOUT
        self._negotiation: MultistreamCore | None = None
        self._pushback = b""

    # -- what a multiplexer supplies -----------------------------------------------------------
    @property
    def connection(self) -> MuxedConnection:
        raise NotImplementedError

    async def _recv(self, max_bytes: int, timeout: float | None) -> bytes:
        """Up to ``max_bytes`` received bytes, ``b""`` at the end of the stream; raises
        :class:`TimeoutError` after ``timeout`` and :class:`StreamReset` if reset."""
        raise NotImplementedError

    def _send_now(self, data: bytes) -> None:
        """Queue a few bytes at once (negotiation messages, far below any window)."""
        raise NotImplementedError

    async def write(self, data: bytes | memoryview, *, timeout: float | None = None) -> None:
        """Send all of ``data``, waiting for the peer's window (bounded by the timeout)."""
        raise NotImplementedError

    async def _close_write_now(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Abort both directions."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop whatever the peer still sends (after :meth:`close`)."""

    # -- negotiation ---------------------------------------------------------------------------
    def start_negotiation(self, core: MultistreamCore, *, lazy_protocol: str = "") -> None:
        """Send ``core``'s opening bytes; reads finish the negotiation. With ``lazy_protocol``
        the stream counts as speaking it already (lazy initiator)."""
        self._negotiation = core
        self._send_now(core.initiate())
        if lazy_protocol:
            self.protocol = lazy_protocol

    @property
    def negotiating(self) -> bool:
        return self._negotiation is not None

    @property
    def has_pushback(self) -> bool:
        """Bytes held back (negotiation leftovers, :meth:`unread`) that the next read returns."""
        return bool(self._pushback)

    async def finish_negotiation(self, timeout: float | None = None) -> None:
        core = self._negotiation
        if core is None:
            return
        deadline = time.monotonic() + (timeout or DEFAULT_NEGOTIATION_TIMEOUT)
        while core.selected is None:
            data = await self._recv_raw(max(0.001, deadline - time.monotonic()))
            if not data:
                raise MultistreamError("stream ended during multistream negotiation")
            try:
                events = core.receive(data)
            except MultistreamError:
                self.reset()
                raise
            out = core.data_to_send()
            if out:
                self._send_now(out)
            if events:
                self._pushback = events[0].leftover + self._pushback
                self.protocol = events[0].protocol
        self._negotiation = None

    async def _recv_raw(self, timeout: float) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback, b""
            return data
        return await self._recv(_READ_CHUNK, timeout)

    # -- reading -------------------------------------------------------------------------------
    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes``; ``b""`` at the end of the stream."""
        if self._negotiation is not None:
            await self.finish_negotiation(timeout)
        if self._pushback:
            data = self._pushback
            if len(data) > max_bytes:
                self._pushback = data[max_bytes:]
                return data[:max_bytes]
            self._pushback = b""
            return data
        return await self._recv(max_bytes, timeout or self.timeout)

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of what the next read returns."""
        if data:
            self._pushback = bytes(data) + self._pushback

    async def readexactly(self, nbytes: int, *, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout or DEFAULT_STREAM_TIMEOUT)
        out = bytearray()
        while len(out) < nbytes:
            chunk = await self.read(
                nbytes - len(out), timeout=max(0.001, deadline - time.monotonic())
            )
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), nbytes)
            out += chunk
        return bytes(out)

    async def read_message(self, max_size: int, *, timeout: float | None = None) -> bytes | None:
        """One ``uvarint(len) || message``; ``None`` at a clean end of stream."""
        deadline = time.monotonic() + (timeout or self.timeout or DEFAULT_STREAM_TIMEOUT)
        prefix = bytearray()
        while True:
            chunk = await self.read(16, timeout=max(0.001, deadline - time.monotonic()))
            if not chunk:
                if prefix:
                    raise ProtocolViolation("stream ended inside a length prefix")
                return None
            complete = False
            for index, byte in enumerate(chunk):
                prefix.append(byte)
                if not byte & 0x80:
                    self.unread(chunk[index + 1 :])
                    complete = True
                    break
                if len(prefix) >= 9:
                    raise ProtocolViolation("length prefix longer than 9 bytes")
            if complete:
                break
        try:
            length, _ = decode_varint(bytes(prefix))
        except VarintError as exc:
            raise ProtocolViolation(f"bad length prefix: {exc}") from None
        if length > max_size:
            raise MessageTooLarge(f"message of {length} bytes exceeds limit {max_size}")
        try:
            return await self.readexactly(length, timeout=max(0.001, deadline - time.monotonic()))
        except asyncio.IncompleteReadError:
            raise ProtocolViolation("stream ended inside a message") from None

    async def read_all(self, max_size: int, *, timeout: float | None = None) -> bytes:
        """Everything until the peer closes its side, at most ``max_size`` bytes."""
        deadline = time.monotonic() + (timeout or self.timeout or DEFAULT_STREAM_TIMEOUT)
        out = bytearray()
        while True:
            chunk = await self.read(_READ_CHUNK, timeout=max(0.001, deadline - time.monotonic()))
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > max_size:
                raise MessageTooLarge(f"stream carried more than {max_size} bytes")

    # -- writing -------------------------------------------------------------------------------
    async def write_message(self, message: bytes, *, timeout: float | None = None) -> None:
        await self.write(encode_length_prefixed(message), timeout=timeout)

    async def close_write(self) -> None:
        """Half-close (FIN): the peer reads the end of the stream; we may still read. A lazy
        initiator first waits for the echo, so a refusal is not mistaken for success."""
        if self._negotiation is not None:
            try:
                await self.finish_negotiation(None)
            except (MultistreamError, TimeoutError, StreamReset, ConnectionClosed):
                return
        await self._close_write_now()

    async def close(self) -> None:
        """Half-close, then drop the stream (anything the peer still sends is discarded)."""
        await self.close_write()
        self._forget()


async def serve_inbound(
    stream: MuxedStream,
    protocols: Sequence[str],
    handler_for: Callable[[str], StreamHandler | None],
    peer_text: str,
) -> None:
    """Answer an inbound stream's negotiation offering ``protocols`` and run the handler of the
    protocol chosen; a failed negotiation or handler resets the stream."""
    if not protocols:
        stream.reset()
        return
    stream.start_negotiation(MultistreamCore(MultistreamRole.RESPONDER, protocols))
    try:
        await stream.finish_negotiation(DEFAULT_NEGOTIATION_TIMEOUT)
    except (MultistreamError, TimeoutError, StreamReset, ConnectionClosed) as exc:
        log.debug("inbound stream from %s: negotiation failed: %s", peer_text, exc)
        stream.reset()
        return
    handler = handler_for(stream.protocol)
    if handler is None:  # removed while negotiating
        stream.reset()
        return
    try:
        await handler(stream)
    except Exception as exc:
        log.debug("handler of %s from %s failed: %r", stream.protocol, peer_text, exc)
        stream.reset()


async def open_negotiated(
    stream: MuxedStream,
    protocols: Sequence[str] | str,
    *,
    lazy: bool = False,
    timeout: float | None = None,
) -> MuxedStream:
    """Negotiate one of ``protocols`` (first preferred) as the initiator on a new stream.
    ``lazy`` (one protocol only) returns at once: the first read checks the echo."""
    if isinstance(protocols, str):
        protocols = [protocols]
    core = MultistreamCore(MultistreamRole.INITIATOR, protocols, lazy=lazy)
    stream.start_negotiation(core, lazy_protocol=protocols[0] if lazy else "")
    if lazy:
        return stream
    try:
        await stream.finish_negotiation(timeout)
    except BaseException:
        stream.reset()
        raise
    return stream
