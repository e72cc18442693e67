"""Bitswap-style block exchange, sans-I/O: wire messages, per-peer ledgers, fetch sessions.

Protocol ``/latticaray/bitswap/1`` (docs/protocol/bitswap.md). A fetcher opens one server-stream
call per request; the request carries a want-list, the provider streams back presences and blocks.

* :func:`encode_request` / :func:`decode_request`, :func:`encode_response` / :func:`decode_response`
  -- msgpack messages, size- and count-bounded on decode.
* :class:`Ledgers` -- bytes sent/received per peer and the upload policy against free riding:
  when upload slots are contended, peers that gave back are served first, and a peer far in debt
  beyond a free allowance waits behind everyone else (it is never starved: it is served when
  nobody else waits).
* :class:`FetchSession` -- fetches one object (root manifest, then its blocks). Fed events with
  ``now``; returns actions. It asks want-have broadly and want-block from the best peers, spreads
  blocks across providers by their load and measured throughput, re-requests on timeout or when a
  provider fails, drops and penalizes peers that send bad blocks, uses partial holders (peers still
  fetching) through their have-bitmaps, and fails with ``ObjectNotFound`` at its deadline.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol

import msgpack

from .cid import Cid
from .errors import BlockVerificationError, CodecError, InvalidCid, ObjectNotFound
from .manifest import MAX_BLOCK_SIZE, Manifest

__all__ = [
    "PROTOCOL_ID", "WANT_HAVE", "WANT_BLOCK", "HAVE", "DONT_HAVE", "WantEntry", "Request",
    "Response", "encode_request", "decode_request", "encode_response", "decode_response",
    "Ledgers", "FetchSession", "SessionConfig", "SendRequest", "CancelRequest", "FindProviders",
    "ManifestReady", "Penalize", "Completed", "Failed", "BlockSink",
]

PROTOCOL_ID = "/latticaray/bitswap/1"
WANT_HAVE, WANT_BLOCK = 0, 1
HAVE, DONT_HAVE = 0, 1

MAX_REQUEST_BYTES = 256 * 1024
MAX_WANTS_PER_REQUEST = 1024
MAX_RESPONSE_BYTES = MAX_BLOCK_SIZE + 64 * 1024
_MAX_BITMAP_BYTES = 64 * 1024
#: Bytes a block response adds to its block (msgpack envelope, CID, RPC message cost), rounded up.
_RESPONSE_OVERHEAD = 256


# --- messages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WantEntry:
    cid: Cid
    kind: int = WANT_BLOCK          # WANT_HAVE or WANT_BLOCK
    priority: int = 0               # higher first
    send_dont_have: bool = True


@dataclass
class Request:
    root: Cid | None
    wants: list[WantEntry] = field(default_factory=list)
    cancels: list[Cid] = field(default_factory=list)


@dataclass
class Response:
    #: (cid, HAVE | DONT_HAVE, bitmap | None). A HAVE for a root with a bitmap comes from a
    #: partial holder: bit i (LSB first in byte i // 8) set = it holds block i.
    presences: list[tuple[Cid, int, bytes | None]] = field(default_factory=list)
    blocks: list[tuple[Cid, bytes | memoryview]] = field(default_factory=list)


def encode_request(request: Request) -> bytes:
    return msgpack.packb({
        "v": 1,
        "root": bytes(request.root) if request.root is not None else None,
        "wants": [[bytes(w.cid), w.kind, w.priority, w.send_dont_have] for w in request.wants],
        "cancel": [bytes(c) for c in request.cancels],
    })


def _unpack(data: bytes | memoryview, limit: int, what: str) -> Any:
    if len(data) > limit:
        raise CodecError(f"{what} of {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return msgpack.unpackb(data, max_bin_len=limit, max_array_len=MAX_WANTS_PER_REQUEST,
                               max_map_len=16, max_str_len=64)
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
        if (not isinstance(entry, list) or len(entry) != 4 or entry[1] not in (WANT_HAVE, WANT_BLOCK)
                or not isinstance(entry[2], int) or not isinstance(entry[3], bool)):
            raise CodecError("malformed want-list entry")
        entries.append(WantEntry(_cid(entry[0]), entry[1], entry[2], entry[3]))
    return Request(_cid(root) if root is not None else None, entries, [_cid(c) for c in cancels])


def encode_response(response: Response) -> bytes:
    return msgpack.packb({
        "p": [[bytes(c), t, b] for c, t, b in response.presences],
        "b": [[bytes(c), data] for c, data in response.blocks],
    })


def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def encode_block_response(cid: Cid, data: bytes | memoryview) -> bytes:
    """``encode_response(Response(blocks=[(cid, data)]))`` with a single copy of ``data``."""
    packer = msgpack.Packer()
    prefix = (packer.pack_map_header(2) + packer.pack("p") + packer.pack_array_header(0)
              + packer.pack("b") + packer.pack_array_header(1) + packer.pack_array_header(2)
              + packer.pack(bytes(cid)) + _bin_header(len(data)))
    return b"".join((prefix, data))


_BLOCK_RESPONSE_PREFIX = b"\x82\xa1p\x90\xa1b\x91\x92"  # {"p": [], "b": [[ ... (as encoded above)


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
    length = int.from_bytes(view[cid_end + 1:cid_end + 1 + width], "big")
    body = cid_end + 1 + width
    if body + length != view.nbytes:
        return None
    if length > MAX_BLOCK_SIZE:
        raise CodecError(f"block of {length} bytes exceeds {MAX_BLOCK_SIZE}")
    cid = _cid(bytes(view[start + 2:cid_end]))
    return Response(blocks=[(cid, view[body:])])


_BLOCK_PREFIX_VIEW = memoryview(_BLOCK_RESPONSE_PREFIX)


def decode_response(data: bytes | memoryview) -> Response:
    """Decode and validate a response; a one-block response's block is a view of ``data``."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise CodecError(f"bitswap response of {len(data)} bytes exceeds the {MAX_RESPONSE_BYTES}-byte limit")
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
        if (not isinstance(entry, list) or len(entry) != 3 or entry[1] not in (HAVE, DONT_HAVE)
                or not (entry[2] is None or (isinstance(entry[2], bytes)
                                             and len(entry[2]) <= _MAX_BITMAP_BYTES))):
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
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def bitmap_has(bitmap: bytes, index: int) -> bool:
    byte = index >> 3
    return byte < len(bitmap) and bool(bitmap[byte] & (1 << (index & 7)))


# --- ledgers and the upload policy ---------------------------------------------------------------

@dataclass
class PeerLedger:
    sent: int = 0
    received: int = 0
    blocks_sent: int = 0
    blocks_received: int = 0
    bad_blocks: int = 0

    def debt_ratio(self) -> float:
        return self.sent / (self.received + 1)


class Ledgers:
    """Per-peer byte accounting and fair allocation of upload slots.

    ``request_slot(peer, token)`` returns True if the token may send at once, else queues it;
    ``release_slot(token)`` frees a slot and returns the tokens now granted. Waiting tokens are
    granted by (free rider?, debt ratio, arrival): a free rider has been sent more than
    ``free_allowance`` bytes and owes more than ``max_debt_ratio`` times what it gave.
    """

    def __init__(self, upload_slots: int = 8, free_allowance: int = 256 << 20,
                 max_debt_ratio: float = 4.0) -> None:
        self.upload_slots = upload_slots
        self.free_allowance = free_allowance
        self.max_debt_ratio = max_debt_ratio
        self.peers: dict[Hashable, PeerLedger] = {}
        self._active: set[Hashable] = set()
        self._waiting: list[tuple[tuple[bool, float, int], Hashable, Hashable]] = []
        self._arrivals = itertools.count()

    def ledger(self, peer: Hashable) -> PeerLedger:
        found = self.peers.get(peer)
        if found is None:
            found = self.peers[peer] = PeerLedger()
        return found

    def record_sent(self, peer: Hashable, nbytes: int) -> None:
        ledger = self.ledger(peer)
        ledger.sent += nbytes
        ledger.blocks_sent += 1

    def record_received(self, peer: Hashable, nbytes: int) -> None:
        ledger = self.ledger(peer)
        ledger.received += nbytes
        ledger.blocks_received += 1

    def record_bad_block(self, peer: Hashable) -> None:
        self.ledger(peer).bad_blocks += 1

    def is_free_rider(self, peer: Hashable) -> bool:
        ledger = self.ledger(peer)
        return ledger.sent > self.free_allowance and ledger.debt_ratio() > self.max_debt_ratio

    def _rank(self, peer: Hashable) -> tuple[bool, float, int]:
        return (self.is_free_rider(peer), self.ledger(peer).debt_ratio(), next(self._arrivals))

    def request_slot(self, peer: Hashable, token: Hashable) -> bool:
        if len(self._active) < self.upload_slots and not self._waiting:
            self._active.add(token)
            return True
        heapq.heappush(self._waiting, (self._rank(peer), token, peer))
        return False

    def release_slot(self, token: Hashable) -> list[Hashable]:
        """Free ``token``'s slot (or drop it from the queue); return tokens granted now."""
        if token in self._active:
            self._active.discard(token)
        else:
            self._waiting = [w for w in self._waiting if w[1] != token]
            heapq.heapify(self._waiting)
        granted = []
        while self._waiting and len(self._active) < self.upload_slots:
            _, waiting_token, _ = heapq.heappop(self._waiting)
            self._active.add(waiting_token)
            granted.append(waiting_token)
        return granted

    @property
    def waiting(self) -> int:
        return len(self._waiting)


# --- fetch sessions ------------------------------------------------------------------------------

class BlockSink(Protocol):
    """Where a session puts verified blocks (the store's ObjectWriter implements this)."""

    def write_block(self, index: int, data: bytes | memoryview) -> bool: ...
    def has_block(self, index: int) -> bool: ...


@dataclass(frozen=True)
class SendRequest:
    peer: Hashable
    request_id: int
    request: Request
    timeout: float
    #: Bytes of blocks the request asks for (0 when unknown, e.g. the manifest): the driver
    #: opens the stream with at least this receive window, so every requested block can be in
    #: flight at once instead of one window's worth per round trip.
    window: int = 0


@dataclass(frozen=True)
class CancelRequest:
    peer: Hashable
    request_id: int


@dataclass(frozen=True)
class FindProviders:
    root: Cid


@dataclass(frozen=True)
class ManifestReady:
    manifest: Manifest


@dataclass(frozen=True)
class Penalize:
    peer: Hashable
    reason: str


@dataclass(frozen=True)
class Completed:
    manifest: Manifest


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass
class SessionConfig:
    #: Blocks in flight per peer (a peer's pipeline depth).
    window: int = 8
    #: Blocks per request (one stream); a request's timeout grows with its size.
    blocks_per_request: int = 4
    #: Peers asked want-block for the root manifest at once (the rest get want-have).
    manifest_fanout: int = 2
    #: Timeout of a request of n blocks: base + n * per_block.
    request_timeout_base: float = 5.0
    request_timeout_per_block: float = 5.0
    #: How often partial holders are asked again for their have-bitmaps, and how often providers
    #: are looked up again while no peer can serve a missing block.
    refresh_interval: float = 1.0
    provider_retry_interval: float = 2.0
    #: A peer that sent this many bad blocks is dropped from the session.
    max_bad_blocks: int = 2
    #: After a failed request (timeout, connection lost) a peer gets no new requests for
    #: backoff_base * 2**(failures-1) s, at most backoff_max; a success resets it. Failures alone
    #: never drop a peer: under load a live provider can time out, and one that died costs only
    #: the requests sent after each backoff (the end game covers their blocks).
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    #: Blocks are fetched in a per-session random order (seeded by ``order_seed``, else by the
    #: session's own randomness) so that concurrent fetchers hold different blocks and can trade.
    random_order: bool = True
    order_seed: int | None = None
    #: End game: once every missing block is in flight, idle peers also ask for blocks still
    #: in flight elsewhere (the first copy wins), so a stalled provider cannot hold up the end.
    endgame: bool = True


@dataclass
class _Peer:
    peer: Hashable
    full: bool = False
    bitmap: bytes | None = None
    lacks: set[int] = field(default_factory=set)
    asked_have: float = float("-inf")
    answered_have: bool = False
    inflight: int = 0
    failures: int = 0
    bad_blocks: int = 0
    dropped: bool = False
    bytes_received: int = 0
    throughput: float = 0.0     # bytes/s EWMA over completed requests
    last_request_start: float = 0.0
    retry_at: float = float("-inf")

    def can_serve(self, index: int) -> bool:
        if self.dropped or index in self.lacks:
            return False
        return self.full or (self.bitmap is not None and bitmap_has(self.bitmap, index))


@dataclass
class _Inflight:
    peer: Hashable
    blocks: list[int]
    manifest: bool
    started: float
    deadline: float


class FetchSession:
    """Fetch one object by root CID from a changing set of peers. Sans-I/O.

    Driver loop: call :meth:`start`, then feed :meth:`add_peers`, :meth:`on_response`,
    :meth:`on_request_done`, :meth:`on_request_failed` and :meth:`on_timer` (at
    :meth:`next_timer`); carry out the returned actions. On :class:`ManifestReady` the driver opens
    a block sink (the store writer) and calls :meth:`attach_sink`.
    """

    def __init__(self, root: Cid, deadline: float, config: SessionConfig | None = None) -> None:
        self.root = root
        self.deadline = deadline
        self.config = config or SessionConfig()
        self.manifest: Manifest | None = None
        self.sink: BlockSink | None = None
        self.peers: dict[Hashable, _Peer] = {}
        self.done = False
        self.bytes_received = 0
        self.duplicate_blocks = 0
        self._inflight: dict[int, _Inflight] = {}
        self._block_owner: dict[int, int] = {}   # block index -> request id in flight
        self._missing: list[int] = []
        self._missing_count = 0
        self._request_ids = itertools.count(1)
        self._next_provider_lookup = float("inf")
        self._next_refresh = float("inf")
        self._last_now = float("-inf")
        self._duplicated: set[int] = set()

    # --- progress ----------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int | None:
        return self.manifest.size if self.manifest else None

    @property
    def blocks_missing(self) -> int:
        return self._missing_count if self.manifest else -1

    # --- events ------------------------------------------------------------------------------
    def start(self, now: float, peers: list[Hashable] = ()) -> list[Any]:
        self._next_provider_lookup = now + self.config.provider_retry_interval
        actions: list[Any] = [FindProviders(self.root)]
        actions += self.add_peers(peers, now)
        return actions

    def add_peers(self, peers: list[Hashable], now: float) -> list[Any]:
        if self.done:
            return []
        actions: list[Any] = []
        for peer in peers:
            if peer in self.peers:
                continue
            self.peers[peer] = _Peer(peer)
        return actions + self._schedule(now)

    def attach_sink(self, sink: BlockSink, now: float) -> list[Any]:
        """Give the session the writer for the object's blocks (after ManifestReady)."""
        assert self.manifest is not None
        self.sink = sink
        self._missing = [i for i in range(len(self.manifest.blocks)) if not sink.has_block(i)]
        if self.config.random_order:
            random.Random(self.config.order_seed).shuffle(self._missing)
        else:
            self._missing.reverse()  # pop() takes the lowest index first
        self._missing_count = len(self._missing)
        if self._missing_count == 0:
            self.done = True
            return [Completed(self.manifest)]
        return self._schedule(now)

    def on_response(self, peer: Hashable, request_id: int, response: Response, now: float) -> list[Any]:
        if self.done:
            return []
        state = self.peers.get(peer)
        if state is None:
            return []
        actions: list[Any] = []
        for cid, kind, bitmap in response.presences:
            if cid == self.root:
                state.answered_have = True
                if kind == HAVE:
                    state.full = bitmap is None
                    state.bitmap = bitmap
                    state.lacks.clear()  # a fresh answer supersedes earlier DONT_HAVEs
                else:
                    state.full, state.bitmap = False, None
            elif self.manifest is not None and kind == DONT_HAVE:
                index = self.manifest.index_of(cid)
                if index is not None:
                    state.lacks.add(index)
                    self._requeue(request_id, index)
        for cid, data in response.blocks:
            actions += self._on_block(state, request_id, cid, data, now)
            if self.done:
                return actions
        return actions + self._schedule(now)

    def on_request_done(self, peer: Hashable, request_id: int, now: float) -> list[Any]:
        """The request's stream ended normally: blocks it did not deliver are asked elsewhere."""
        inflight = self._inflight.pop(request_id, None)
        if inflight is None or self.done:
            return []
        state = self.peers.get(peer)
        if state is not None:
            state.failures = 0
            state.inflight -= len(inflight.blocks) + inflight.manifest
            for index in inflight.blocks:
                if self._block_owner.get(index) == request_id:
                    state.lacks.add(index)  # asked, not delivered, no DONT_HAVE: treat as absent
            if inflight.manifest and self.manifest is None:
                state.answered_have = True
        self._return_blocks(request_id, inflight)
        return self._schedule(now)

    def on_request_failed(self, peer: Hashable, request_id: int, reason: str, now: float) -> list[Any]:
        """The request's stream failed (peer gone, RPC error, timeout): move its blocks."""
        inflight = self._inflight.pop(request_id, None)
        if inflight is None or self.done:
            return []
        state = self.peers.get(peer)
        if state is not None:
            state.inflight -= len(inflight.blocks) + inflight.manifest
            state.failures += 1
            state.retry_at = now + min(self.config.backoff_max,
                                       self.config.backoff_base * 2 ** min(state.failures - 1, 16))
        self._return_blocks(request_id, inflight)
        return self._schedule(now)

    def on_peer_gone(self, peer: Hashable, now: float) -> list[Any]:
        state = self.peers.get(peer)
        if state is None:
            return []
        state.dropped = True
        actions: list[Any] = []
        for request_id, inflight in list(self._inflight.items()):
            if inflight.peer == peer:
                actions.append(CancelRequest(peer, request_id))
                actions += self.on_request_failed(peer, request_id, "peer gone", now)
        return actions + self._schedule(now)

    def on_timer(self, now: float) -> list[Any]:
        if self.done:
            return []
        if now >= self.deadline:
            return self._fail(now)
        actions: list[Any] = []
        for request_id, inflight in list(self._inflight.items()):
            if now >= inflight.deadline:
                actions.append(CancelRequest(inflight.peer, request_id))
                actions += self.on_request_failed(inflight.peer, request_id, "timeout", now)
        if now >= self._next_provider_lookup:
            self._next_provider_lookup = now + self.config.provider_retry_interval
            if self._starved():
                actions.append(FindProviders(self.root))
        return actions + self._schedule(now)

    def next_timer(self) -> float:
        if self.done:
            return float("inf")
        times = [self.deadline, self._next_provider_lookup, self._next_refresh]
        if self.manifest is not None:
            times += [p.retry_at for p in self.peers.values() if not p.dropped and p.retry_at > self._last_now]
        times += [inflight.deadline for inflight in self._inflight.values()]
        return min(times)

    def describe(self) -> dict[str, Any]:
        """A snapshot of the session for logs and debugging."""
        return {
            "root": str(self.root), "done": self.done, "missing": self._missing_count,
            "unassigned": len(self._missing), "inflight_requests": len(self._inflight),
            "peers": {str(p.peer)[-8:]: {"full": p.full, "bitmap": p.bitmap is not None,
                                         "lacks": len(p.lacks), "inflight": p.inflight,
                                         "failures": p.failures, "dropped": p.dropped,
                                         "retry_in": round(p.retry_at - self._last_now, 2)}
                      for p in self.peers.values()},
        }

    # --- internals ---------------------------------------------------------------------------
    def _fail(self, now: float) -> list[Any]:
        self.done = True
        actions: list[Any] = [CancelRequest(f.peer, rid) for rid, f in self._inflight.items()]
        self._inflight.clear()
        if self.manifest is None:
            error = ObjectNotFound(self.root, "no peer provided the object before the deadline")
        else:
            error = ObjectNotFound(self.root, f"fetch incomplete at the deadline "
                                              f"({self._missing_count} of {len(self.manifest.blocks)} blocks missing)")
        return actions + [Failed(error)]

    def _starved(self) -> bool:
        """True when some wanted data has no live peer known to hold it."""
        live = [p for p in self.peers.values() if not p.dropped]
        if self.manifest is None:
            return not any(p.full or p.bitmap is not None or not p.answered_have for p in live)
        return any(not any(p.can_serve(i) for p in live) for i in self._missing[-64:])

    def _requeue(self, request_id: int, index: int) -> None:
        if self._block_owner.get(index) == request_id:
            del self._block_owner[index]
            inflight = self._inflight.get(request_id)
            if inflight is not None and index in inflight.blocks:
                inflight.blocks.remove(index)
                state = self.peers.get(inflight.peer)
                if state is not None:
                    state.inflight -= 1
            if self.sink is not None and not self.sink.has_block(index):
                self._missing.append(index)

    def _return_blocks(self, request_id: int, inflight: _Inflight) -> None:
        for index in inflight.blocks:
            if self._block_owner.get(index) == request_id:
                del self._block_owner[index]
                self._duplicated.discard(index)
                if self.sink is not None and not self.sink.has_block(index):
                    self._missing.append(index)

    def _on_block(self, state: _Peer, request_id: int, cid: Cid, data: bytes, now: float) -> list[Any]:
        if self.manifest is None:
            if cid != self.root:
                return []
            try:
                self.manifest = Manifest.decode(self.root, data)
            except (BlockVerificationError, CodecError) as exc:
                return self._bad_block(state, None, f"bad manifest: {exc}")
            inflight = self._inflight.get(request_id)
            if inflight is not None and inflight.manifest:
                inflight.manifest = False
                state.inflight -= 1
            state.full = state.full or state.bitmap is None
            state.answered_have = True
            return [ManifestReady(self.manifest)]
        index = self.manifest.index_of(cid)
        if index is None or self.sink is None:
            return []
        try:
            fresh = self.sink.write_block(index, data)
        except BlockVerificationError as exc:
            state.lacks.add(index)
            self._requeue(request_id, index)
            return self._bad_block(state, index, str(exc))
        inflight = self._inflight.get(request_id)
        if self._block_owner.get(index) == request_id:
            del self._block_owner[index]
        if inflight is not None and index in inflight.blocks:
            inflight.blocks.remove(index)
            state.inflight -= 1
        state.bytes_received += len(data)
        if inflight is not None and now > inflight.started:
            rate = len(data) / (now - inflight.started)
            state.throughput = rate if state.throughput == 0 else 0.7 * state.throughput + 0.3 * rate
        if not fresh:
            self.duplicate_blocks += 1
            return []
        self.bytes_received += len(data)
        self._missing_count -= 1
        if self._missing_count == 0:
            self.done = True
            actions: list[Any] = [CancelRequest(f.peer, rid) for rid, f in self._inflight.items()]
            self._inflight.clear()
            return actions + [Completed(self.manifest)]
        return []

    def _bad_block(self, state: _Peer, index: int | None, reason: str) -> list[Any]:
        state.bad_blocks += 1
        if state.bad_blocks >= self.config.max_bad_blocks or index is None:
            state.dropped = True
        return [Penalize(state.peer, reason)]

    def _request_timeout(self, blocks: int) -> float:
        return self.config.request_timeout_base + blocks * self.config.request_timeout_per_block

    def _schedule(self, now: float) -> list[Any]:
        self._last_now = now
        if self.done:
            return []
        if self.manifest is None:
            return self._schedule_manifest(now)
        if self.sink is None:
            return []
        return self._refresh_partials(now) + self._schedule_blocks(now)

    def _schedule_manifest(self, now: float) -> list[Any]:
        actions: list[Any] = []
        live = sorted((p for p in self.peers.values() if not p.dropped), key=lambda p: str(p.peer))
        asking_block = sum(1 for f in self._inflight.values() if f.manifest)
        for state in live:
            if state.inflight or (state.answered_have and not state.full and state.bitmap is None):
                continue
            if state.answered_have and state.bitmap is not None and not state.full:
                pass  # partial holders have the manifest too (they hold it to know the blocks)
            wants = []
            manifest = False
            if asking_block < self.config.manifest_fanout or state.full or state.bitmap is not None:
                wants.append(WantEntry(self.root, WANT_BLOCK, 10, True))
                manifest = True
                asking_block += 1
            elif not state.answered_have and state.asked_have < now - self.config.refresh_interval:
                wants.append(WantEntry(self.root, WANT_HAVE, 10, True))
                state.asked_have = now
            else:
                continue
            actions.append(self._send(state, Request(self.root, wants), [], manifest, now))
        return actions

    def _refresh_partials(self, now: float) -> list[Any]:
        actions: list[Any] = []
        self._next_refresh = float("inf")
        for state in sorted(self.peers.values(), key=lambda p: str(p.peer)):
            if state.dropped or state.full:
                continue
            due = state.asked_have + self.config.refresh_interval
            if due <= now:
                state.asked_have = now
                actions.append(self._send(state, Request(self.root, [WantEntry(self.root, WANT_HAVE, 10, True)]),
                                          [], False, now))
            else:
                self._next_refresh = min(self._next_refresh, due)
        return actions

    def _schedule_blocks(self, now: float) -> list[Any]:
        actions: list[Any] = []
        cfg = self.config
        live = [p for p in self.peers.values() if not p.dropped and (p.full or p.bitmap is not None)
                and p.retry_at <= now]
        if not live:
            return actions
        # peers by expected speed: measured throughput, unknown peers get the benefit of the doubt
        known = [p.throughput for p in live if p.throughput > 0]
        default_rate = max(known) if known else 1.0
        batches: dict[Hashable, list[int]] = {}
        skipped: list[int] = []
        budget = {p.peer: cfg.window - p.inflight for p in live}
        while self._missing:
            index = self._missing.pop()
            if self.sink is not None and self.sink.has_block(index) or index in self._block_owner:
                continue
            best = None
            best_cost = 0.0
            for state in live:
                if budget[state.peer] <= 0 or not state.can_serve(index):
                    continue
                rate = state.throughput or default_rate
                cost = (cfg.window - budget[state.peer] + 1) / rate
                if best is None or cost < best_cost or (cost == best_cost and str(state.peer) < str(best.peer)):
                    best, best_cost = state, cost
            if best is None:
                skipped.append(index)
                if all(budget[p.peer] <= 0 for p in live):
                    break
                continue
            budget[best.peer] -= 1
            batches.setdefault(best.peer, []).append(index)
        self._missing.extend(reversed(skipped))
        if cfg.endgame and not self._missing and self._block_owner:
            self._assign_endgame(live, budget, batches)
        for peer, indices in batches.items():
            state = self.peers[peer]
            for start in range(0, len(indices), cfg.blocks_per_request):
                chunk = indices[start:start + cfg.blocks_per_request]
                wants = [WantEntry(self.manifest.blocks[i], WANT_BLOCK, 0, True) for i in chunk]
                actions.append(self._send(state, Request(self.root, wants), chunk, False, now))
        return actions

    def _assign_endgame(self, live: list[_Peer], budget: dict[Hashable, int],
                        batches: dict[Hashable, list[int]]) -> None:
        for index, request_id in sorted(self._block_owner.items()):
            if index in self._duplicated:
                continue
            owner = self._inflight[request_id].peer
            for state in sorted(live, key=lambda p: str(p.peer)):
                if state.peer != owner and budget[state.peer] > 0 and state.can_serve(index):
                    budget[state.peer] -= 1
                    batches.setdefault(state.peer, []).append(index)
                    self._duplicated.add(index)
                    break

    def _send(self, state: _Peer, request: Request, blocks: list[int], manifest: bool, now: float) -> SendRequest:
        request_id = next(self._request_ids)
        timeout = self._request_timeout(len(blocks) + manifest)
        self._inflight[request_id] = _Inflight(state.peer, list(blocks), manifest, now, now + timeout)
        for index in blocks:
            self._block_owner.setdefault(index, request_id)
        state.inflight += len(blocks) + manifest
        state.last_request_start = now
        window = 0
        if blocks and self.manifest is not None:
            window = sum(self.manifest.sizes[i] for i in blocks) + _RESPONSE_OVERHEAD * len(blocks)
        return SendRequest(state.peer, request_id, request, timeout, window)


# --- serving -------------------------------------------------------------------------------------

@dataclass
class ServePlan:
    """What to answer to one request: presences first, then blocks in priority order.

    ``blocks`` holds ``(cid, index)``; index ``-1`` is the manifest (root) block itself.
    """

    presences: list[tuple[Cid, int, bytes | None]] = field(default_factory=list)
    blocks: list[tuple[Cid, int]] = field(default_factory=list)


def plan_response(request: Request, manifest: Manifest | None, have_flags: bytes | None) -> ServePlan:
    """Decide the answer to ``request`` for a holder of ``manifest``.

    ``manifest`` is None when we know nothing of the request's root; ``have_flags`` is None when
    we hold the whole object, else one byte per block (non-zero = held) for a partial holder.
    """
    plan = ServePlan()
    root = request.root
    cancelled = set(request.cancels)
    wants = sorted(request.wants, key=lambda w: -w.priority)
    for want in wants:
        if want.cid in cancelled:
            continue
        if manifest is None or root is None or manifest.root != root:
            if want.send_dont_have:
                plan.presences.append((want.cid, DONT_HAVE, None))
            continue
        if want.cid == root:
            if want.kind == WANT_HAVE:
                bitmap = None if have_flags is None else bitmap_from_flags(have_flags)
                plan.presences.append((root, HAVE, bitmap))
            else:
                plan.blocks.append((root, -1))
            continue
        index = manifest.index_of(want.cid)
        held = index is not None and (have_flags is None or bool(have_flags[index]))
        if not held:
            if want.send_dont_have:
                plan.presences.append((want.cid, DONT_HAVE, None))
        elif want.kind == WANT_HAVE:
            plan.presences.append((want.cid, HAVE, None))
        else:
            plan.blocks.append((want.cid, index))
    return plan
