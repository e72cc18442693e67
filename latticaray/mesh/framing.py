"""Wire framing of ``/latticaray/rpc/1``: a sans-I/O frame encoder and incremental decoder.

A frame is ``u32 body_len | u16 header_len | header | payload`` (big endian), where ``header`` is
a msgpack array ``[kind, call_id, flags, *fields]`` and ``payload`` is raw bytes carried as is
(never re-encoded). ``body_len`` counts header_len's two bytes, the header and the payload.

The decoder never trusts the peer: it bounds the header and payload sizes before buffering them,
checks the header's shape, and raises :class:`~latticaray.mesh.errors.ProtocolViolation` (or
:class:`~latticaray.mesh.errors.FrameTooLarge`) with a precise message on any violation. It owns
no socket and no clock; the RPC session feeds it the bytes it read. See docs/protocol/rpc.md.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import FrameTooLarge, ProtocolViolation

PROTOCOL_ID = "/latticaray/rpc/1"

PREFIX = struct.Struct("!IH")
PREFIX_SIZE = PREFIX.size
MAX_HEADER_SIZE = 4096

# Frame kinds (header[0]).
OPEN = 1  # [1, call_id, flags, service, call_type, timeout_ms]; payload = first message if MSG
MESSAGE = 2  # [2, call_id, flags]; payload = one message if MSG (else a bare half-close)
CREDIT = 3  # [3, call_id, flags, n_bytes]; receiver grants n_bytes more of stream window
CANCEL = 4  # [4, call_id, flags]; caller abandons the call (or callee drops it)
ERROR = 5  # [5, call_id, flags, code, message]; payload = remote traceback (utf-8, may be empty)
GOAWAY = 6  # [6, 0, 0, code, message]; the session is closing (e.g. after a violation)

KIND_NAMES = {
    OPEN: "OPEN",
    MESSAGE: "MESSAGE",
    CREDIT: "CREDIT",
    CANCEL: "CANCEL",
    ERROR: "ERROR",
    GOAWAY: "GOAWAY",
}
_MIN_FIELDS = {OPEN: 6, MESSAGE: 3, CREDIT: 4, CANCEL: 3, ERROR: 5, GOAWAY: 5}

# Flags (header[2]), a bit set.
FLAG_END = 0x01  # the sender's direction of this call ends with this frame
FLAG_MSG = 0x02  # the payload is a message (possibly empty)
FLAG_RESPONSE = 0x04  # sent by the callee: the call id belongs to the receiver's outgoing calls

# Call types carried in OPEN.
UNARY = 0
SERVER_STREAM = 1
CLIENT_STREAM = 2
BIDI = 3
CALL_TYPE_NAMES = {
    UNARY: "unary",
    SERVER_STREAM: "server-stream",
    CLIENT_STREAM: "client-stream",
    BIDI: "bidi",
}

MAX_CALL_ID = (1 << 63) - 1
MAX_SERVICE_NAME = 256

_pack_prefix = PREFIX.pack
_unpack_prefix = PREFIX.unpack_from
#: One reusable packer: ``msgpack.packb`` builds a new Packer per call (about 2x slower).
_packb = msgpack.Packer().pack
_unpackb = msgpack.unpackb

#: Payloads at most this long are copied into the frame's prefix buffer (one write piece);
#: longer ones stay separate pieces so they are never copied before the socket write.
INLINE_PAYLOAD = 8192


class FrameEncoder:
    """The send queue of a session: ``put(header, payload)`` encodes a frame into write pieces.

    ``take()`` hands over the queued pieces and whether one of them is a large payload kept
    as a piece of its own (a payload longer than INLINE_PAYLOAD is never copied before the
    socket write); ``pending`` counts the queued bytes. ``on_first()`` is called when a frame is
    put into an empty queue (so the owner knows to schedule a write). After ``close()`` frames
    are dropped.
    """

    __slots__ = ("_on_first", "closed", "large", "pending", "pieces")

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self._on_first = on_first
        self.pieces: list[bytes | bytearray | memoryview] = []
        self.pending = 0
        self.large = False
        self.closed = False

    def put(self, header: list[Any], payload: bytes | bytearray | memoryview = b"") -> None:
        if self.closed:
            return
        h = _packb(header)
        plen = len(payload)
        hlen = len(h)
        out = self.pieces
        was_empty = not out
        if plen == 0:
            out.append(_pack_prefix(2 + hlen, hlen) + h)
        elif plen <= INLINE_PAYLOAD:
            out.append(b"".join((_pack_prefix(2 + hlen + plen, hlen), h, payload)))
        else:
            out.append(_pack_prefix(2 + hlen + plen, hlen) + h)
            out.append(payload)
            self.large = True
        self.pending += 6 + hlen + plen
        if was_empty and self._on_first is not None:
            self._on_first()

    def take(self) -> tuple[list[bytes | bytearray | memoryview], bool]:
        pieces, large = self.pieces, self.large
        self.pieces = []
        self.pending = 0
        self.large = False
        return pieces, large

    def close(self) -> None:
        self.closed = True
        self.take()


def encode_frame(
    header: list[Any], payload: bytes | bytearray | memoryview = b""
) -> list[bytes | bytearray | memoryview]:
    """Return the frame as a list of write pieces (the payload is not copied when large)."""
    encoder = FrameEncoder()
    encoder.put(header, payload)
    return encoder.take()[0]


#: An incomplete frame with at least this much payload is collected as a list of the received
#: chunks and joined once when complete (one copy), instead of growing a buffer.
LARGE_PAYLOAD = 64 * 1024


class FrameDecoder:
    """Incremental frame parser: ``feed(data)`` returns the complete frames it contained.

    Each frame is returned as ``(header, payload)`` with ``header`` a validated list and
    ``payload`` a ``bytes`` object. ``max_payload`` bounds each frame's payload; nothing beyond
    the current frame (at most ``max_payload`` + header) is ever buffered.
    """

    __slots__ = ("_buf", "_large", "_max_body", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._max_body = 2 + MAX_HEADER_SIZE + max_payload
        self._buf = bytearray()
        # [header, chunks, bytes still missing] of a large frame being collected
        self._large: list[Any] | None = None

    @property
    def has_partial(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self._large is not None or bool(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        if self._large is not None:
            return sum(len(c) for c in self._large[1])
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[list[Any], bytes]]:
        frames: list[tuple[list[Any], bytes]] = []
        pos = 0
        large = self._large
        if large is not None:
            missing = large[2]
            n = len(data)
            if n < missing:
                large[1].append(data)
                large[2] = missing - n
                return frames
            large[1].append(data if n == missing else memoryview(data)[:missing])
            frames.append((large[0], b"".join(large[1])))
            self._large = None
            if n == missing:
                return frames
            pos = missing
        buf = self._buf
        view: bytes | memoryview
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            view = data
        end = len(view)
        append = frames.append
        max_body = self._max_body
        try:
            while end - pos >= PREFIX_SIZE:
                body_len, hlen = _unpack_prefix(view, pos)
                if body_len > max_body:
                    raise FrameTooLarge(
                        f"frame of {body_len} bytes exceeds the limit of {max_body} "
                        f"(max payload {self.max_payload})"
                    )
                if hlen > MAX_HEADER_SIZE or hlen == 0 or hlen + 2 > body_len:
                    raise ProtocolViolation(
                        f"frame header length {hlen} is invalid for a body of {body_len} bytes"
                    )
                stop = pos + 4 + body_len
                hstart = pos + PREFIX_SIZE
                pstart = hstart + hlen
                if stop > end:
                    if stop - pstart >= LARGE_PAYLOAD and end >= pstart:
                        header = _decode_header(view[hstart:pstart])
                        tail = bytes(view[pstart:end]) if buf else memoryview(data)[pstart:end]
                        self._large = [header, [tail] if end > pstart else [], stop - end]
                        pos = end
                    break
                try:
                    header = _unpackb(view[hstart:pstart])
                except Exception as exc:
                    raise ProtocolViolation(f"frame header is not valid msgpack: {exc}") from None
                _check_header(header)
                if pstart == stop:
                    append((header, b""))
                elif buf:
                    append((header, bytes(view[pstart:stop])))
                else:
                    append((header, data[pstart:stop]))
                pos = stop
        finally:
            if isinstance(view, memoryview):
                view.release()
        if buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += memoryview(data)[pos:]
        return frames


def _decode_header(raw: bytes | memoryview) -> list[Any]:
    try:
        header: list[Any] = _unpackb(raw)
    except Exception as exc:
        raise ProtocolViolation(f"frame header is not valid msgpack: {exc}") from None
    _check_header(header)
    return header


def _check_header(header: object) -> None:
    if type(header) is not list or len(header) < 3:
        raise ProtocolViolation(
            f"frame header must be an array [kind, call_id, flags, ...], "
            f"got {type(header).__name__}"
        )
    kind, call_id, flags = header[0], header[1], header[2]
    if type(call_id) is not int or not 0 <= call_id <= MAX_CALL_ID:
        raise ProtocolViolation(f"invalid call id {call_id!r}")
    if type(flags) is not int or not 0 <= flags <= 0xFF:
        raise ProtocolViolation(f"invalid flags {flags!r}")
    if type(kind) is not int or kind not in _MIN_FIELDS:
        raise ProtocolViolation(f"unknown frame kind {kind!r}")
    if kind == MESSAGE:
        return
    if len(header) < _MIN_FIELDS[kind]:
        raise ProtocolViolation(
            f"{KIND_NAMES[kind]} frame header has {len(header)} fields, needs {_MIN_FIELDS[kind]}"
        )
    if kind == OPEN:
        service, call_type, timeout_ms = header[3], header[4], header[5]
        if type(service) is not str or not 0 < len(service) <= MAX_SERVICE_NAME:
            raise ProtocolViolation("OPEN frame carries an invalid service name")
        if type(call_type) is not int or call_type not in CALL_TYPE_NAMES:
            raise ProtocolViolation(f"OPEN frame carries an unknown call type {call_type!r}")
        if type(timeout_ms) is not int or timeout_ms < 0:
            raise ProtocolViolation(f"OPEN frame carries an invalid timeout {timeout_ms!r}")
    elif kind == CREDIT:
        n = header[3]
        if type(n) is not int or not 0 < n <= (1 << 40):
            raise ProtocolViolation(f"CREDIT frame carries an invalid grant {n!r}")
    elif kind == ERROR or kind == GOAWAY:
        if type(header[3]) is not str or type(header[4]) is not str:
            raise ProtocolViolation(f"{KIND_NAMES[kind]} frame needs string code and message")
