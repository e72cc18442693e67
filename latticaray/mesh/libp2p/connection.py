"""The asyncio shell of a libp2p connection: a byte pipe upgraded with Noise and yamux.

:func:`upgrade` runs the libp2p upgrade over an ``asyncio`` stream pair, the same for both
roles: multistream-select ``/noise``, the Noise XX handshake, multistream-select
``/yamux/1.0.0`` inside the encrypted channel, then a yamux session. The result,
:class:`Libp2pConnection`, opens outbound streams (multistream-negotiated, optionally lazily)
and hands inbound ones to the handler :class:`ProtocolRouter` names for their protocol.

Everything here is glue: the protocol rules live in the sans-I/O cores
(:mod:`.multistream`, :mod:`.noise`, :mod:`.yamux`). Every wait has a deadline and every read
a bound: the yamux window bounds what a stream buffers, and handshakes have a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import ConnectionClosed, HandshakeError, MultiaddrError, ProtocolViolation
from ..identity import PeerId
from ..multiaddr import Multiaddr
from .errors import StreamReset, YamuxError
from .keys import PrivateKey, PublicKey, peer_id_to_text
from .multistream import MultistreamCore, MultistreamRole
from .noise import NOISE_PROTOCOL, NoiseCore, NoiseData, NoiseHandshakeDone, NoiseRole
from .stream import (
    DEFAULT_STREAM_TIMEOUT,
    MuxedStream,
    ProtocolRouter,
    StreamHandler,
    StreamRouter,
    open_negotiated,
    serve_inbound,
)
from .yamux import (
    YAMUX_PROTOCOL,
    GoAwayCode,
    YamuxCore,
    YamuxGoAway,
    YamuxPong,
    YamuxStreamData,
    YamuxStreamEnded,
    YamuxStreamOpened,
    YamuxStreamReset,
    YamuxTimeout,
    YamuxWindowOpened,
)

__all__ = [
    "DEFAULT_STREAM_TIMEOUT",
    "ByteReader",
    "ByteWriter",
    "Libp2pConnection",
    "Libp2pStream",
    "ProtocolRouter",
    "StreamHandler",
    "upgrade",
]

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_READ_CHUNK = 256 * 1024


class ByteReader(Protocol):
    """The read half of the byte pipe a connection is upgraded over (``asyncio.StreamReader``,
    or a relayed stream: :class:`~latticaray.mesh.libp2p.pipe.StreamPipe`)."""

    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    """The write half of that pipe (``asyncio.StreamWriter`` or a ``StreamPipe``)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class Libp2pStream(MuxedStream):
    """One yamux stream after multistream negotiation (or, lazily, during it)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_eof",
        "_readable",
        "_reset",
        "_writable",
        "stream_id",
    )

    def __init__(self, conn: Libp2pConnection, stream_id: int) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._reset = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    @property
    def connection(self) -> Libp2pConnection:
        return self._conn

    # -- fed by the connection
    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _on_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def _on_reset(self) -> None:
        self._reset = True
        self._readable.set()
        self._writable.set()

    def _on_window(self) -> None:
        self._writable.set()

    # -- the multiplexer's primitives
    async def _recv(self, max_bytes: int, timeout: float | None) -> bytes:
        while not self._buffered and not self._eof and not self._reset:
            self._readable.clear()
            try:
                await asyncio.wait_for(self._readable.wait(), timeout)
            except TimeoutError:
                raise TimeoutError(f"no data on stream {self.protocol or self.stream_id}") from None
        if not self._buffered:
            if self._reset:
                raise StreamReset(f"stream {self.protocol or self.stream_id} was reset")
            return b""
        chunk = self._pop(max_bytes)
        self._conn._consumed(self.stream_id, len(chunk))
        return chunk

    def _pop(self, nbytes: int) -> bytes:
        parts: list[bytes] = []
        wanted = nbytes
        while wanted and self._chunks:
            head = self._chunks[0]
            if len(head) <= wanted:
                parts.append(self._chunks.popleft())
                wanted -= len(head)
            else:
                parts.append(head[:wanted])
                self._chunks[0] = head[wanted:]
                wanted = 0
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(chunk)
        return chunk

    def _send_now(self, data: bytes) -> None:
        self._conn._write_stream(self.stream_id, data)

    def send_some(self, data: memoryview) -> int:
        """Queue as much of ``data`` as the peer's window takes now; how much that was."""
        if self._reset:
            raise StreamReset(f"stream {self.protocol or self.stream_id} was reset")
        self._writable.clear()
        return self._conn._send(self.stream_id, data)

    async def wait_writable(self, timeout: float | None) -> None:
        """Wait until the peer grants window (or the stream resets)."""
        try:
            await asyncio.wait_for(self._writable.wait(), timeout)
        except TimeoutError:
            raise TimeoutError("peer granted no window before the deadline") from None

    async def write(self, data: bytes | memoryview, *, timeout: float | None = None) -> None:
        """Send all of ``data``, waiting for the peer's window (bounded by the timeout)."""
        limit = timeout or self.timeout
        deadline = None if limit is None else time.monotonic() + limit
        view = memoryview(data)
        while view:
            view = view[self.send_some(view) :]
            if view:
                await self.wait_writable(_remaining(deadline))
        await self._conn._drain(_remaining(deadline))

    async def _close_write_now(self) -> None:
        self._conn._close_stream(self.stream_id)

    def reset(self) -> None:
        if not self._reset:
            self._reset = True
            self._conn._reset_stream(self.stream_id)

    def _forget(self) -> None:
        self._conn._forget(self.stream_id)

    @property
    def is_reset(self) -> bool:
        return self._reset


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class Libp2pConnection:
    """A Noise-secured, yamux-multiplexed libp2p connection over one asyncio stream pair."""

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        noise: NoiseCore,
        yamux: YamuxCore,
        remote: NoiseHandshakeDone,
        router: StreamRouter,
        *,
        initial: bytes = b"",
        remote_multiaddr: Multiaddr | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._noise = noise
        self._yamux = yamux
        self.remote_key: PublicKey = remote.remote_key
        self.remote_peer_id: bytes = remote.remote_peer_id
        self.router = router
        self._streams: dict[int, Libp2pStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._closed = asyncio.Event()
        self._close_reason: BaseException | None = None
        self._close_callbacks: list[Callable[[Libp2pConnection], None]] = []
        self._initial = initial
        self._reader_task: asyncio.Task[None] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("sockname")
        self.remote_address: tuple[str, int] | None = tuple(peer[:2]) if peer else None
        self.local_address: tuple[str, int] | None = tuple(sock[:2]) if sock else None
        #: set for a connection that is not a TCP socket of its own (a relayed circuit)
        self._remote_multiaddr = remote_multiaddr

    # ---- identity
    @property
    def remote_peer_text(self) -> str:
        return peer_id_to_text(self.remote_peer_id)

    @property
    def mesh_peer_id(self) -> PeerId:
        """The remote's mesh :class:`PeerId` (any key type; it carries the key)."""
        return PeerId.from_key(self.remote_key)

    @property
    def remote_multiaddr(self) -> Multiaddr | None:
        """``/ip4|ip6/<host>/tcp/<port>`` of the remote as this end sees it (for a relayed
        connection, its circuit address)."""
        if self._remote_multiaddr is not None:
            return self._remote_multiaddr
        return _tcp_multiaddr(self.remote_address)

    @property
    def local_multiaddr(self) -> Multiaddr | None:
        return _tcp_multiaddr(self.local_address)

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> BaseException | None:
        return self._close_reason

    @property
    def outbound(self) -> bool:
        """True on the end that dialed (the yamux client)."""
        return self._yamux.is_client

    def on_close(self, callback: Callable[[Libp2pConnection], None]) -> None:
        """``callback(conn)`` once the connection has closed (soon, if it already has)."""
        if self._closed.is_set():
            asyncio.get_running_loop().call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    def start(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_loop())
        if self._yamux.keepalive is not None:
            self._timer_task = asyncio.ensure_future(self._timer_loop())

    # ---- streams
    async def open_stream(
        self, protocols: Sequence[str] | str, *, lazy: bool = False, timeout: float | None = None
    ) -> Libp2pStream:
        """Open a stream and negotiate one of ``protocols`` (first preferred) on it.

        ``lazy`` (one protocol only) returns at once: the first read checks the echo.
        """
        stream = self.new_stream()
        await open_negotiated(stream, protocols, lazy=lazy, timeout=timeout)
        return stream

    def new_stream(self) -> Libp2pStream:
        """A fresh outbound stream, not negotiated yet."""
        self._check_open()
        try:
            stream_id = self._yamux.open_stream()
        except YamuxError as exc:
            raise ConnectionClosed(str(exc)) from None
        stream = Libp2pStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def _serve_inbound(self, stream: Libp2pStream) -> None:
        router = self.router
        await serve_inbound(stream, router.protocols, router.handler, self.remote_peer_text)

    # ---- ping (yamux's own, for liveness; /ipfs/ping/1.0.0 is a protocol of its own)
    async def yamux_ping(self, timeout: float = 10.0) -> float:
        self._check_open()
        opaque = self._yamux.ping(time.monotonic())
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[opaque] = fut
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(opaque, None)

    # ---- calls from streams
    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ConnectionClosed(f"connection to {self.remote_peer_text} is closed")

    def _flush(self) -> None:
        out = self._yamux.data_to_send()
        if out and not self._closed.is_set():
            self._writer.write(self._noise.encrypt(out))

    def _send(self, stream_id: int, data: memoryview) -> int:
        self._check_open()
        try:
            taken = self._yamux.send(stream_id, data)
        except YamuxError as exc:
            raise StreamReset(str(exc)) from None
        self._flush()
        return taken

    def _write_stream(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            taken = self._send(stream_id, view)
            if not taken:  # negotiation bytes are tiny; a zero window here is a broken peer
                raise StreamReset(f"no window to negotiate on stream {stream_id}")
            view = view[taken:]

    async def _drain(self, timeout: float | None) -> None:
        self._check_open()
        try:
            await asyncio.wait_for(self._writer.drain(), timeout)
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"connection to {self.remote_peer_text} lost: {exc}") from None

    def _consumed(self, stream_id: int, nbytes: int) -> None:
        if self._closed.is_set():
            return
        self._yamux.consumed(stream_id, nbytes)
        self._flush()

    def _close_stream(self, stream_id: int) -> None:
        if self._closed.is_set():
            return
        with contextlib.suppress(YamuxError):
            self._yamux.close_stream(stream_id)
        self._flush()
        if self._yamux.stream_state(stream_id) is None:
            self._streams.pop(stream_id, None)

    def _reset_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if self._closed.is_set():
            return
        self._yamux.reset_stream(stream_id)
        self._flush()

    def _forget(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and self._yamux.stream_state(stream_id) is not None:
            self._yamux.consumed(stream_id, stream._buffered)

    # ---- the read loop
    async def _read_loop(self) -> None:
        reason: BaseException | None = None
        try:
            if self._initial:
                self._on_bytes(self._initial)
                self._initial = b""
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    reason = ConnectionClosed(f"{self.remote_peer_text} closed the connection")
                    break
                if self._on_bytes(data):
                    break
        except (ProtocolViolation, HandshakeError) as exc:
            log.debug("connection to %s broke the protocol: %s", self.remote_peer_text, exc)
            reason = exc
            self._flush_quietly()
        except (ConnectionError, OSError) as exc:
            reason = ConnectionClosed(f"connection to {self.remote_peer_text} lost: {exc}")
        finally:
            self._shutdown(reason)

    def _flush_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._flush()

    def _on_bytes(self, data: bytes) -> bool:
        """Feed received bytes; True when the session is over (Go Away or keepalive timeout)."""
        now = time.monotonic()
        for noise_event in self._noise.receive(data):
            if not isinstance(noise_event, NoiseData):
                continue
            for event in self._yamux.receive(noise_event.data, now):
                if self._dispatch(event):
                    return True
        self._flush()
        return False

    def _dispatch(self, event: object) -> bool:
        if isinstance(event, YamuxStreamData):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_data(event.data)
            else:  # a stream we dropped: give the window back
                self._yamux.consumed(event.stream_id, len(event.data))
        elif isinstance(event, YamuxStreamOpened):
            stream = Libp2pStream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            task = asyncio.ensure_future(self._serve_inbound(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, YamuxStreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
        elif isinstance(event, YamuxStreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream._on_reset()
        elif isinstance(event, YamuxWindowOpened):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_window()
        elif isinstance(event, YamuxPong):
            fut = self._pings.get(event.opaque)
            if fut is not None and not fut.done():
                fut.set_result(event.rtt)
        elif isinstance(event, YamuxGoAway):
            return not self._streams
        elif isinstance(event, YamuxTimeout):
            return True
        return False

    async def _timer_loop(self) -> None:
        while not self._closed.is_set():
            when = self._yamux.get_timer()
            delay = 1.0 if when is None else max(0.0, when - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
            if self._closed.is_set():
                return
            for event in self._yamux.handle_timer(time.monotonic()):
                if isinstance(event, YamuxTimeout):
                    self._shutdown(ConnectionClosed(f"{self.remote_peer_text} stopped answering"))
                    return
            self._flush()

    def _shutdown(self, reason: BaseException | None) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        for stream in list(self._streams.values()):
            stream._on_reset()
        self._streams.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("connection closed"))
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._timer_task is not None:
            self._timer_task.cancel()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("connection close callback failed")

    async def close(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Go Away, then close the socket and every stream."""
        if not self._closed.is_set():
            self._yamux.go_away(code)
            self._flush_quietly()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.drain(), 1.0)
        self._shutdown(None)
        tasks = [t for t in (self._reader_task, self._timer_task, *self._tasks) if t is not None]
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _tcp_multiaddr(address: tuple[str, int] | None) -> Multiaddr | None:
    if address is None:
        return None
    host = address[0].removeprefix("::ffff:")
    proto = "ip6" if ":" in host else "ip4"
    try:
        return Multiaddr.parse(f"/{proto}/{host}/tcp/{address[1]}")
    except MultiaddrError:
        return None


async def _read_bounded(reader: ByteReader, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("libp2p upgrade timed out")
    try:
        data = await asyncio.wait_for(reader.read(65536 + 2), remaining)
    except TimeoutError:
        raise TimeoutError("libp2p upgrade timed out") from None
    if not data:
        raise ConnectionClosed("the remote closed the connection during the upgrade")
    return data


async def upgrade(
    reader: ByteReader,
    writer: ByteWriter,
    identity: PrivateKey,
    router: StreamRouter,
    *,
    initiator: bool,
    expected_peer_id: bytes | None = None,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    stream_window: int | None = None,
    keepalive: float | None = None,
    remote_multiaddr: Multiaddr | None = None,
) -> Libp2pConnection:
    """multistream ``/noise`` -> Noise XX -> multistream ``/yamux/1.0.0`` -> yamux session, over
    a TCP socket or any byte pipe (a relayed stream, ``remote_multiaddr`` its circuit address)."""
    deadline = time.monotonic() + timeout
    role = MultistreamRole.INITIATOR if initiator else MultistreamRole.RESPONDER
    # 1. select the security protocol on the raw connection
    ms = MultistreamCore(role, [NOISE_PROTOCOL])
    writer.write(ms.initiate())
    leftover = b""
    while ms.selected is None:
        events = ms.receive(await _read_bounded(reader, deadline))
        writer.write(ms.data_to_send())
        if events:
            leftover = events[0].leftover
    # 2. Noise XX
    noise = NoiseCore(
        NoiseRole.INITIATOR if initiator else NoiseRole.RESPONDER,
        identity,
        expected_peer_id=expected_peer_id,
    )
    writer.write(noise.initiate())
    pending = leftover
    plain = bytearray()
    while noise.remote is None:
        data = pending or await _read_bounded(reader, deadline)
        pending = b""
        for event in noise.receive(data):
            if isinstance(event, NoiseData):
                plain += event.data
        writer.write(noise.data_to_send())
    remote = noise.remote
    # 3. select the muxer inside the secure channel
    ms = MultistreamCore(role, [YAMUX_PROTOCOL])
    writer.write(noise.encrypt(ms.initiate()))
    rest = b""
    while ms.selected is None:
        if not plain:
            for event in noise.receive(await _read_bounded(reader, deadline)):
                if isinstance(event, NoiseData):
                    plain += event.data
            continue
        events = ms.receive(bytes(plain))
        plain.clear()
        out = ms.data_to_send()
        if out:
            writer.write(noise.encrypt(out))
        if events:
            rest = events[0].leftover
    await asyncio.wait_for(writer.drain(), max(0.001, deadline - time.monotonic()))
    yamux = YamuxCore(
        initiator,
        stream_window=stream_window or 256 * 1024,
        keepalive=keepalive,
    )
    conn = Libp2pConnection(
        reader, writer, noise, yamux, remote, router, remote_multiaddr=remote_multiaddr
    )
    if rest:
        for yamux_event in yamux.receive(rest, time.monotonic()):
            conn._dispatch(yamux_event)
        conn._flush()
    conn.start()
    return conn
