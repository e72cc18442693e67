"""The ``/latticaray/bitswap/1`` wire messages: want-lists, presences, blocks, have-bitmaps.

A fetcher opens one server-stream call per :class:`Request` (a want-list for one root, with
cancels); the provider streams back :class:`Response` messages (presences, then blocks). Messages
are msgpack maps encoded here at the edge (docs/protocol/bitswap.md); decoding bounds sizes and
counts and raises :class:`~..errors.CodecError` on anything malformed. A one-block response is
encoded and decoded without copying its block. Have-bitmaps (bit i, LSB first in byte i // 8, set =
block i held) are built with :func:`bitmap_from_flags` and read with :func:`bitmap_has`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ..cid import Cid
from ..errors import CodecError, InvalidCid
from ..manifest import MAX_BLOCK_SIZE

__all__ = [
    "BLOCK_RESPONSE_OVERHEAD",
    "BLOCK_RESPONSE_PREFIX",
    "DONT_HAVE",
    "HAVE",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_WANTS_PER_REQUEST",
    "PENDING",
    "PROTOCOL_ID",
    "WANT_BLOCK",
    "WANT_HAVE",
    "Request",
    "Response",
    "WantEntry",
    "bitmap_from_flags",
    "bitmap_has",
    "decode_request",
    "decode_response",
    "encode_block_response",
    "encode_request",
    "encode_response",
]

PROTOCOL_ID = "/latticaray/bitswap/1"
WANT_HAVE, WANT_BLOCK = 0, 1
HAVE, DONT_HAVE = 0, 1
#: Root presence with the bitmap of blocks a partial holder has asked for and not yet received
#: (sent only to requests that set ``pending``).
PENDING = 2

MAX_REQUEST_BYTES = 256 * 1024
MAX_WANTS_PER_REQUEST = 1024
MAX_RESPONSE_BYTES = MAX_BLOCK_SIZE + 64 * 1024
_MAX_BITMAP_BYTES = 64 * 1024
#: Bytes a block response adds to its block (msgpack envelope, CID, RPC message cost), rounded up.
#: Bytes a block response adds to its block (msgpack envelope, CID, RPC message cost), rounded up.
BLOCK_RESPONSE_OVERHEAD = 256


@dataclass(frozen=True)
class WantEntry:
    cid: Cid
    kind: int = WANT_BLOCK  # WANT_HAVE or WANT_BLOCK
    priority: int = 0  # higher first
    send_dont_have: bool = True


@dataclass
class Request:
    root: Cid | None
    wants: list[WantEntry] = field(default_factory=list)
    cancels: list[Cid] = field(default_factory=list)
    #: ask a partial holder to add its PENDING bitmap to its root presences
    pending: bool = False


@dataclass
class Response:
    #: (cid, HAVE | DONT_HAVE, bitmap | None). A HAVE for a root with a bitmap comes from a
    #: partial holder: bit i (LSB first in byte i // 8) set = it holds block i.
    presences: list[tuple[Cid, int, bytes | None]] = field(default_factory=list)
    blocks: list[tuple[Cid, bytes | memoryview]] = field(default_factory=list)


def encode_request(request: Request) -> bytes:
    message = {
        "v": 1,
        "root": bytes(request.root) if request.root is not None else None,
        "wants": [[bytes(w.cid), w.kind, w.priority, w.send_dont_have] for w in request.wants],
        "cancel": [bytes(c) for c in request.cancels],
    }
    if request.pending:
        message["pend"] = True
    encoded: bytes = msgpack.packb(message)
    return encoded


def _unpack(data: bytes | memoryview, limit: int, what: str) -> Any:
    if len(data) > limit:
        raise CodecError(f"{what} of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            max_bin_len=limit,
            max_array_len=MAX_WANTS_PER_REQUEST,
            max_map_len=16,
            max_str_len=64,
        )
    except Exception as exc:
        raise CodecError(f"malformed {what}: {exc}") from None


def _cid(value: Any) -> Cid:
    if not isinstance(value, bytes):
        raise CodecError("CID field is not bytes")
    try:
        return Cid.decode(value)
    except InvalidCid as exc:
        raise CodecError(f"bad CID: {exc}") from None


def decode_request(data: bytes | memoryview) -> Request:
    message = _unpack(data, MAX_REQUEST_BYTES, "bitswap request")
    if not isinstance(message, dict) or message.get("v") != 1:
        raise CodecError("bitswap request is not a version-1 map")
    root = message.get("root")
    wants, cancels = message.get("wants", []), message.get("cancel", [])
    if not isinstance(wants, list) or not isinstance(cancels, list):
        raise CodecError("bitswap request wants/cancel must be lists")
    entries = []
    for entry in wants:
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or entry[1] not in (WANT_HAVE, WANT_BLOCK)
            or not isinstance(entry[2], int)
            or not isinstance(entry[3], bool)
        ):
            raise CodecError("malformed want-list entry")
        entries.append(WantEntry(_cid(entry[0]), entry[1], entry[2], entry[3]))
    pending = message.get("pend", False)
    if not isinstance(pending, bool):
        raise CodecError("bitswap request pend must be a bool")
    return Request(
        _cid(root) if root is not None else None, entries, [_cid(c) for c in cancels], pending
    )


def encode_response(response: Response) -> bytes:
    encoded: bytes = msgpack.packb(
        {
            "p": [[bytes(c), t, b] for c, t, b in response.presences],
            "b": [[bytes(c), data] for c, data in response.blocks],
        }
    )
    return encoded


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def encode_block_response(cid: Cid, data: bytes | memoryview) -> bytes:
    """``encode_response(Response(blocks=[(cid, data)]))`` with a single copy of ``data``."""
    packer = msgpack.Packer()
    prefix = (
        packer.pack_map_header(2)
        + packer.pack("p")
        + packer.pack_array_header(0)
        + packer.pack("b")
        + packer.pack_array_header(1)
        + packer.pack_array_header(2)
        + packer.pack(bytes(cid))
        + _bin_header(len(data))
    )
    return b"".join((prefix, data))


#: How every one-block response begins (as :func:`encode_block_response` writes it): the map
#: ``{"p": [], "b": [[``, up to the bin header of the CID that follows.
BLOCK_RESPONSE_PREFIX = b"\x82\xa1p\x90\xa1b\x91\x92"


def _decode_block_response(data: bytes | memoryview) -> Response | None:
    """The common one-block response, its block a view of ``data`` (no copy); None if ``data``
    is not exactly that shape (the general decoder then handles it)."""
    view = memoryview(data).cast("B")
    start = len(_BLOCK_PREFIX_VIEW)
    if view.nbytes < start + 4 or view[:start] != _BLOCK_PREFIX_VIEW or view[start] != 0xC4:
        return None
    cid_end = start + 2 + view[start + 1]
    if cid_end >= view.nbytes:
        return None
    kind = view[cid_end]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(kind)
    if width is None or cid_end + 1 + width > view.nbytes:
        return None
    length = int.from_bytes(view[cid_end + 1 : cid_end + 1 + width], "big")
    body = cid_end + 1 + width
    if body + length != view.nbytes:
        return None
    if length > MAX_BLOCK_SIZE:
        raise CodecError(f"block of {length} bytes exceeds {MAX_BLOCK_SIZE}")
    cid = _cid(bytes(view[start + 2 : cid_end]))
    return Response(blocks=[(cid, view[body:])])


_BLOCK_PREFIX_VIEW = memoryview(BLOCK_RESPONSE_PREFIX)


def decode_response(data: bytes | memoryview) -> Response:
    """Decode and validate a response; a one-block response's block is a view of ``data``."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise CodecError(
            f"bitswap response of {len(data)} bytes exceeds the {MAX_RESPONSE_BYTES}-byte limit"
        )
    fast = _decode_block_response(data)
    if fast is not None:
        return fast
    message = _unpack(data, MAX_RESPONSE_BYTES, "bitswap response")
    if not isinstance(message, dict):
        raise CodecError("bitswap response is not a map")
    presences, blocks = message.get("p", []), message.get("b", [])
    if not isinstance(presences, list) or not isinstance(blocks, list):
        raise CodecError("bitswap response p/b must be lists")
    out = Response()
    for entry in presences:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or entry[1] not in (HAVE, DONT_HAVE, PENDING)
            or (entry[1] == PENDING and not isinstance(entry[2], bytes))
            or not (
                entry[2] is None
                or (isinstance(entry[2], bytes) and len(entry[2]) <= _MAX_BITMAP_BYTES)
            )
        ):
            raise CodecError("malformed presence entry")
        out.presences.append((_cid(entry[0]), entry[1], entry[2]))
    for entry in blocks:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], bytes):
            raise CodecError("malformed block entry")
        if len(entry[1]) > MAX_BLOCK_SIZE:
            raise CodecError(f"block of {len(entry[1])} bytes exceeds {MAX_BLOCK_SIZE}")
        out.blocks.append((_cid(entry[0]), entry[1]))
    return out


def bitmap_from_flags(flags: bytes | bytearray) -> bytes:
    """Pack one-byte-per-block flags into a bitmap (LSB first)."""
    return np.packbits(
        np.frombuffer(bytes(flags), dtype=np.uint8) != 0, bitorder="little"
    ).tobytes()


def bitmap_has(bitmap: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (index & 7)))
