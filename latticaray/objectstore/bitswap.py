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
  blocks across providers by their load and measured delivery rate (each peer's window is about a
  second of its rate), asks full holders first for blocks no partial holder has (rarest first:
  a seed's upload goes to what the swarm lacks), re-requests on timeout or when a provider fails,
  duplicates only late blocks in the end game, drops and penalizes peers that send bad blocks,
  uses partial holders (peers still fetching) through their have-bitmaps, and fails with
  ``ObjectNotFound`` at its deadline.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np

from .cid import Cid
from .errors import BlockVerificationError, CodecError, InvalidCid, ObjectNotFound
from .manifest import MAX_BLOCK_SIZE, Manifest

__all__ = [
    "DONT_HAVE",
    "HAVE",
    "PENDING",
    "PROTOCOL_ID",
    "WANT_BLOCK",
    "WANT_HAVE",
    "BlockSink",
    "CancelRequest",
    "Completed",
    "Failed",
    "FetchSession",
    "FindProviders",
    "Ledgers",
    "ManifestReady",
    "Penalize",
    "Request",
    "Response",
    "SendRequest",
    "SessionConfig",
    "WantEntry",
    "decode_request",
    "decode_response",
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
_RESPONSE_OVERHEAD = 256


# --- messages ------------------------------------------------------------------------------------


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
    length = int.from_bytes(view[cid_end + 1 : cid_end + 1 + width], "big")
    body = cid_end + 1 + width
    if body + length != view.nbytes:
        return None
    if length > MAX_BLOCK_SIZE:
        raise CodecError(f"block of {length} bytes exceeds {MAX_BLOCK_SIZE}")
    cid = _cid(bytes(view[start + 2 : cid_end]))
    return Response(blocks=[(cid, view[body:])])


_BLOCK_PREFIX_VIEW = memoryview(_BLOCK_RESPONSE_PREFIX)


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

    def __init__(
        self, upload_slots: int = 8, free_allowance: int = 256 << 20, max_debt_ratio: float = 4.0
    ) -> None:
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

    def bad_blocks(self, peer: Hashable) -> int:
        """Bad blocks received from ``peer`` so far (0 for a peer never met)."""
        found = self.peers.get(peer)
        return 0 if found is None else found.bad_blocks

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
    #: Most blocks in flight per peer (a peer's pipeline depth). Within it, a peer is sent about
    #: ``window_seconds`` of blocks at its measured delivery rate (at least ``min_window``; a peer
    #: of unknown rate gets ``min_window``): a contended seed, slow to each of its fetchers, then
    #: holds few blocks of each, and fetchers do not queue there blocks they could get elsewhere.
    window: int = 8
    min_window: int = 2
    window_seconds: float = 1.0
    #: A peer's delivery rate is sampled over at least this much time it spent busy for us.
    rate_period: float = 1.0
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
    #: ... but only for blocks that are late: asked longer ago than twice the time their peer's
    #: measured rate makes them due, plus this slack (so a healthy end sends no block twice).
    endgame_slack: float = 0.25
    #: Swarm policy (rarest first at full holders): a full holder (a seed) is asked first for
    #: blocks no partial holder (a fellow fetcher) has, so that its upload, which every fetcher
    #: shares, goes to blocks the swarm lacks; blocks partial holders have go to them, and to a
    #: full holder only with the budget it has left after that.
    spare_full_holders: bool = True
    #: Ask partial holders for their PENDING bitmaps: a block a fellow fetcher has asked for is not
    #: asked of a full holder first either (it will soon be at the fellow fetcher).
    share_pending: bool = True
    #: A partial holder delivering to us below this fraction of our best peer's rate does not
    #: count as a source: its blocks may then be asked of full holders too.
    slow_source_fraction: float = 0.1


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
    throughput: float = 0.0  # bytes/s EWMA of delivery rate while busy for us
    last_request_start: float = 0.0
    last_delivery: float = float("-inf")
    rate_bytes: int = 0
    rate_time: float = 0.0
    retry_at: float = float("-inf")
    #: one byte per block (non-zero = held), unpacked from ``bitmap`` once the manifest is known
    have: bytes | None = None
    have_ranked: Any = None  # the same as a numpy array in the session's block order
    pending: bytes | None = None  # its PENDING bitmap: blocks it has asked for
    pending_ranked: Any = None

    def can_serve(self, index: int) -> bool:
        if self.dropped or index in self.lacks:
            return False
        if self.full:
            return True
        if self.have is not None:
            return bool(self.have[index])
        return self.bitmap is not None and bitmap_has(self.bitmap, index)


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

    def __init__(
        self,
        root: Cid,
        deadline: float,
        config: SessionConfig | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self.root = root
        self.deadline = deadline
        #: Fail when nothing of the object (manifest or a new block) arrived for this long,
        #: whatever the deadline: a slow transfer goes on as long as it progresses.
        self.stall_timeout = stall_timeout
        self.last_progress: float | None = None  # set by start()
        self.config = config or SessionConfig()
        self.manifest: Manifest | None = None
        self.sink: BlockSink | None = None
        self.peers: dict[Hashable, _Peer] = {}
        self.done = False
        self.bytes_received = 0
        self.duplicate_blocks = 0
        self._inflight: dict[int, _Inflight] = {}
        self._block_owner: dict[int, int] = {}  # block index -> request id in flight
        # Blocks live in "rank space": position k is the k-th block of this session's order.
        self._order = np.zeros(0, dtype=np.int64)  # position -> block index
        self._rank: list[int] = []  # block index -> position
        #: by position, 1 = still missing and not in flight: to be asked of some peer
        self._need = np.zeros(0, dtype=np.uint8)
        self._missing_count = 0
        self._request_ids = itertools.count(1)
        self._next_provider_lookup = float("inf")
        self._next_refresh = float("inf")
        self._last_now = float("-inf")
        self._duplicated: set[int] = set()
        #: per block, 1 if no live partial holder is known to have it (recomputed when stale)
        self._rare = np.zeros(0, dtype=np.uint8)
        self._rare_stale = True

    # --- progress ----------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int | None:
        return self.manifest.size if self.manifest else None

    @property
    def blocks_missing(self) -> int:
        return self._missing_count if self.manifest else -1

    # --- events ------------------------------------------------------------------------------
    def start(self, now: float, peers: Sequence[Hashable] = ()) -> list[Any]:
        self.last_progress = now
        self._next_provider_lookup = now + self.config.provider_retry_interval
        actions: list[Any] = [FindProviders(self.root)]
        actions += self.add_peers(peers, now)
        return actions

    def add_peers(self, peers: Sequence[Hashable], now: float) -> list[Any]:
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
        order = list(range(len(self.manifest.blocks)))
        if self.config.random_order:
            random.Random(self.config.order_seed).shuffle(order)
        self._order = np.array(order, dtype=np.int64)
        self._rank = [0] * len(order)
        for position, index in enumerate(order):
            self._rank[index] = position
        self._need = np.array([0 if sink.has_block(i) else 1 for i in order], dtype=np.uint8)
        for state in self.peers.values():
            self._set_bitmap(state, state.bitmap)
            self._set_pending(state, state.pending)
        self._missing_count = int(self._need.sum())
        if self._missing_count == 0:
            self.done = True
            return [Completed(self.manifest)]
        return self._schedule(now)

    def on_response(
        self, peer: Hashable, request_id: int, response: Response, now: float
    ) -> list[Any]:
        if self.done:
            return []
        state = self.peers.get(peer)
        if state is None:
            return []
        actions: list[Any] = []
        for cid, kind, bitmap in response.presences:
            if cid == self.root and kind == PENDING:
                self._set_pending(state, bitmap)
            elif cid == self.root:
                state.answered_have = True
                if kind == HAVE:
                    state.full = bitmap is None
                    self._set_bitmap(state, bitmap)
                    if bitmap is not None:  # as fresh as a want-have's answer: no refresh due yet
                        state.asked_have = max(state.asked_have, now)
                    state.lacks.clear()  # a fresh answer supersedes earlier DONT_HAVEs
                else:
                    state.full = False
                    self._set_bitmap(state, None)
                    self._set_pending(state, None)
            elif self.manifest is not None and kind == DONT_HAVE:
                for index in self.manifest.indexes_of(cid):
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
            if state.failures:
                state.failures = 0
                self._rare_stale = True
            state.inflight -= len(inflight.blocks) + inflight.manifest
            for index in inflight.blocks:
                if self._block_owner.get(index) == request_id:
                    state.lacks.add(index)  # asked, not delivered, no DONT_HAVE: treat as absent
            if inflight.manifest and self.manifest is None:
                state.answered_have = True
        self._return_blocks(request_id, inflight)
        return self._schedule(now)

    def on_request_failed(
        self, peer: Hashable, request_id: int, reason: str, now: float
    ) -> list[Any]:
        """The request's stream failed (peer gone, RPC error, timeout): move its blocks."""
        inflight = self._inflight.pop(request_id, None)
        if inflight is None or self.done:
            return []
        state = self.peers.get(peer)
        if state is not None:
            state.inflight -= len(inflight.blocks) + inflight.manifest
            state.failures += 1
            self._rare_stale = True
            state.retry_at = now + min(
                self.config.backoff_max, self.config.backoff_base * 2 ** min(state.failures - 1, 16)
            )
        self._return_blocks(request_id, inflight)
        return self._schedule(now)

    def on_peer_gone(self, peer: Hashable, now: float) -> list[Any]:
        state = self.peers.get(peer)
        if state is None:
            return []
        state.dropped = True
        self._rare_stale = True
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
        stalled_at = self._stalled_at()
        if now >= stalled_at:
            return self._fail(now, stalled=now - stalled_at + (self.stall_timeout or 0.0))
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
        times = [self.deadline, self._stalled_at(), self._next_provider_lookup, self._next_refresh]
        if self.manifest is not None:
            times += [
                p.retry_at
                for p in self.peers.values()
                if not p.dropped and p.retry_at > self._last_now
            ]
        times += [inflight.deadline for inflight in self._inflight.values()]
        if self.config.endgame and self.sink is not None and not self._need.any():
            late = [self._late_at(f) for f in self._inflight.values() if f.blocks]
            times += [t for t in late if t > self._last_now]
        return min(times)

    def describe(self) -> dict[str, Any]:
        """A snapshot of the session for logs and debugging."""
        return {
            "root": str(self.root),
            "done": self.done,
            "missing": self._missing_count,
            "unassigned": int(self._need.sum()),
            "inflight_requests": len(self._inflight),
            "peers": {
                str(p.peer)[-8:]: {
                    "full": p.full,
                    "bitmap": p.bitmap is not None,
                    "lacks": len(p.lacks),
                    "inflight": p.inflight,
                    "failures": p.failures,
                    "dropped": p.dropped,
                    "retry_in": round(p.retry_at - self._last_now, 2),
                }
                for p in self.peers.values()
            },
        }

    # --- internals ---------------------------------------------------------------------------
    def _stalled_at(self) -> float:
        """When the fetch counts as stalled if nothing more arrives (inf: no stall timeout)."""
        if self.stall_timeout is None or self.last_progress is None:
            return float("inf")
        return self.last_progress + self.stall_timeout

    def _fail(self, now: float, stalled: float | None = None) -> list[Any]:
        self.done = True
        actions: list[Any] = [CancelRequest(f.peer, rid) for rid, f in self._inflight.items()]
        self._inflight.clear()
        when = "at the deadline" if stalled is None else f"after {stalled:.0f} s without progress"
        if self.manifest is None:
            error = ObjectNotFound(self.root, f"no peer provided the object ({when})")
        else:
            error = ObjectNotFound(
                self.root,
                f"fetch incomplete {when} "
                f"({self._missing_count} of {len(self.manifest.blocks)} blocks missing)",
            )
        return actions + [Failed(error)]

    def _starved(self) -> bool:
        """True when some wanted data has no live peer known to hold it."""
        live = [p for p in self.peers.values() if not p.dropped]
        if self.manifest is None:
            return not any(p.full or p.bitmap is not None or not p.answered_have for p in live)
        wanted = self._order[np.flatnonzero(self._need)[:64]].tolist()
        return any(not any(p.can_serve(i) for p in live) for i in wanted)

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
                self._need[self._rank[index]] = 1

    def _return_blocks(self, request_id: int, inflight: _Inflight) -> None:
        for index in inflight.blocks:
            if self._block_owner.get(index) == request_id:
                del self._block_owner[index]
                self._duplicated.discard(index)
                if self.sink is not None and not self.sink.has_block(index):
                    self._need[self._rank[index]] = 1

    def _on_block(
        self, state: _Peer, request_id: int, cid: Cid, data: bytes | memoryview, now: float
    ) -> list[Any]:
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
            self.last_progress = now
            return [ManifestReady(self.manifest)]
        places = self.manifest.indexes_of(cid)
        if not places or self.sink is None:
            return []
        inflight = self._inflight.get(request_id)
        index = places[0]
        if len(places) > 1 and inflight is not None:  # the place this request asked for, if any
            index = next((i for i in places if i in inflight.blocks), index)
        try:
            fresh = self.sink.write_block(index, data)
        except BlockVerificationError as exc:
            state.lacks.add(index)
            self._requeue(request_id, index)
            return self._bad_block(state, index, str(exc))
        if self._block_owner.get(index) == request_id:
            del self._block_owner[index]
        if inflight is not None and index in inflight.blocks:
            inflight.blocks.remove(index)
            state.inflight -= 1
        state.bytes_received += len(data)
        if inflight is not None:
            # delivery rate while the peer is busy for us: from the later of the request's start and
            # the previous block, so time spent waiting in the peer's queue behind our own earlier
            # blocks is not counted twice
            since = max(inflight.started, state.last_delivery)
            state.rate_bytes += len(data)
            state.rate_time += max(0.0, now - since)
            state.last_delivery = now
            # samples over at least rate_period of busy time: a peer that serves others between
            # our blocks delivers in bursts, and one burst is not its rate for us
            if state.rate_time > 0 and (
                state.throughput == 0 or state.rate_time >= self.config.rate_period
            ):
                rate = state.rate_bytes / state.rate_time
                state.throughput = (
                    rate if state.throughput == 0 else 0.5 * state.throughput + 0.5 * rate
                )
                state.rate_bytes, state.rate_time = 0, 0.0
                if not state.full:
                    self._rare_stale = True  # a slow partial holder stops counting as a source
        filled = [index] if fresh else []
        for other in places:  # the same content fills its other places without asking for them
            if (
                other != index
                and not self.sink.has_block(other)
                and self.sink.write_block(other, data)
            ):
                filled.append(other)
        if not filled:
            self.duplicate_blocks += 1
            return []
        self.last_progress = now
        for place in filled:
            self.bytes_received += len(data)
            self._need[self._rank[place]] = 0  # it may come unasked: from a request given up on
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
            self._rare_stale = True
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
                actions.append(
                    self._send(
                        state,
                        Request(self.root, [WantEntry(self.root, WANT_HAVE, 10, True)]),
                        [],
                        False,
                        now,
                    )
                )
            else:
                self._next_refresh = min(self._next_refresh, due)
        return actions

    def _set_bitmap(self, state: _Peer, bitmap: bytes | None) -> None:
        state.bitmap = bitmap
        state.have = None
        if bitmap is not None and self.manifest is not None:
            count = len(self.manifest.blocks)
            bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[:count]
            if len(bits) < count:
                bits = np.concatenate([bits, np.zeros(count - len(bits), dtype=np.uint8)])
            state.have = bits.tobytes()
            state.have_ranked = bits[self._order] if len(self._order) == count else None
        else:
            state.have_ranked = None
        self._rare_stale = True

    def _set_pending(self, state: _Peer, bitmap: bytes | None) -> None:
        state.pending = bitmap
        state.pending_ranked = None
        if (
            bitmap is not None
            and self.manifest is not None
            and len(self._order) == len(self.manifest.blocks)
        ):
            count = len(self.manifest.blocks)
            bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[:count]
            if len(bits) < count:
                bits = np.concatenate([bits, np.zeros(count - len(bits), dtype=np.uint8)])
            state.pending_ranked = bits[self._order]
        self._rare_stale = True

    def pending_flags(self) -> bytes | None:
        """One byte per block, 1 = asked for and not yet received (for PENDING presences)."""
        if self.manifest is None or self.done:
            return None
        flags = np.zeros(len(self.manifest.blocks), dtype=np.uint8)
        if self._block_owner:
            flags[list(self._block_owner)] = 1
        return flags.tobytes()

    def _window(self, state: _Peer) -> int:
        """Blocks to keep in flight at ``state``: about window_seconds at its measured rate."""
        cfg = self.config
        if state.throughput <= 0 or self.manifest is None:
            return min(cfg.window, cfg.min_window)
        wanted = int(state.throughput * cfg.window_seconds / self.manifest.chunk_size) + 1
        return max(cfg.min_window, min(cfg.window, wanted))

    def _sources(self) -> list[_Peer]:
        """Partial holders that count as a source of their blocks: live, not failing, not far
        slower than the best peer we know."""
        live = [
            p
            for p in self.peers.values()
            if not p.dropped and not p.full and p.have is not None and p.failures == 0
        ]
        rates = [p.throughput for p in self.peers.values() if not p.dropped and p.throughput > 0]
        floor = self.config.slow_source_fraction * max(rates) if rates else 0.0
        return [p for p in live if p.throughput == 0 or p.throughput >= floor]

    def _rare_ranked(self) -> Any:
        """By position in the session's order: 1 if no partial holder in :meth:`_sources` has it
        or has asked for it (then it will soon have it: asking a full holder too would make the
        full holder send it twice)."""
        if self._rare_stale or len(self._rare) != len(self._need):
            held = np.zeros(len(self._need), dtype=np.uint8)
            for state in self._sources():
                if state.have_ranked is not None:
                    held |= state.have_ranked
                if state.pending_ranked is not None:
                    held |= state.pending_ranked
            self._rare = (held == 0).astype(np.uint8)
            self._rare_stale = False
        return self._rare

    def _candidates(self, state: _Peer, only_rare: bool, count: int) -> list[int]:
        """Up to ``count`` blocks ``state`` can serve that are needed, in the session's order."""
        if state.full:
            mask = self._need & self._rare_ranked() if only_rare else self._need
        elif state.have_ranked is not None:
            mask = self._need & state.have_ranked
        else:
            return []
        positions = np.flatnonzero(mask)
        if state.lacks:
            return [i for i in self._order[positions].tolist() if i not in state.lacks][:count]
        chosen: list[int] = self._order[positions[:count]].tolist()
        return chosen

    def _schedule_blocks(self, now: float) -> list[Any]:
        actions: list[Any] = []
        cfg = self.config
        manifest = self.manifest
        assert manifest is not None  # blocks are scheduled once the manifest is known
        live = [
            p
            for p in self.peers.values()
            if not p.dropped and (p.full or p.bitmap is not None) and p.retry_at <= now
        ]
        if not live:
            return actions
        # peers by expected speed: measured throughput, unknown peers get the benefit of the doubt
        known = [p.throughput for p in live if p.throughput > 0]
        default_rate = max(known) if known else 1.0
        budget = {p.peer: self._window(p) - p.inflight for p in live}
        load = {p.peer: p.inflight for p in live}
        batches: dict[Hashable, list[int]] = {}
        spare = cfg.spare_full_holders and any(not p.full for p in live)
        taken: set[int] = set()

        def fill(peers: list[_Peer], only_rare: bool) -> None:
            # the cheapest peer (load over rate) takes its next block in the session's order
            total = sum(budget[p.peer] for p in peers)
            queues = {
                p.peer: iter(self._candidates(p, only_rare, total + len(taken))) for p in peers
            }
            while peers:
                best = min(
                    peers,
                    key=lambda p: (
                        (load[p.peer] + 1) / (p.throughput or default_rate),
                        str(p.peer),
                    ),
                )
                index = next((i for i in queues[best.peer] if i not in taken), None)
                if index is None:
                    peers.remove(best)
                    continue
                taken.add(index)
                budget[best.peer] -= 1
                load[best.peer] += 1
                if budget[best.peer] <= 0:
                    peers.remove(best)
                batches.setdefault(best.peer, []).append(index)

        if self._need.any():
            fill([p for p in live if budget[p.peer] > 0], spare)
            if spare:  # full holders' budget left once no block only they have remains for them
                fill([p for p in live if p.full and budget[p.peer] > 0], False)
        for index in taken:
            self._need[self._rank[index]] = 0
        if cfg.endgame and not self._need.any() and self._block_owner:
            self._assign_endgame(live, budget, batches)
        for peer, indices in batches.items():
            state = self.peers[peer]
            for start in range(0, len(indices), cfg.blocks_per_request):
                chunk = indices[start : start + cfg.blocks_per_request]
                wants = [WantEntry(manifest.blocks[i], WANT_BLOCK, 0, True) for i in chunk]
                actions.append(self._send(state, Request(self.root, wants), chunk, False, now))
        return actions

    def _assign_endgame(
        self, live: list[_Peer], budget: dict[Hashable, int], batches: dict[Hashable, list[int]]
    ) -> None:
        for index, request_id in sorted(self._block_owner.items()):
            if (
                index in self._duplicated
                or self._late_at(self._inflight[request_id]) > self._last_now
            ):
                continue
            owner = self._inflight[request_id].peer
            for state in sorted(live, key=lambda p: str(p.peer)):
                if state.peer != owner and budget[state.peer] > 0 and state.can_serve(index):
                    budget[state.peer] -= 1
                    batches.setdefault(state.peer, []).append(index)
                    self._duplicated.add(index)
                    break

    def _late_at(self, inflight: _Inflight) -> float:
        """When a request's blocks count as late for the end game: twice the time the owner's
        in-flight blocks take at its measured rate (else at our best peer's), plus a slack."""
        owner = self.peers.get(inflight.peer)
        rate = owner.throughput if owner is not None else 0.0
        if rate <= 0:
            rate = max((p.throughput for p in self.peers.values() if not p.dropped), default=0.0)
        if rate <= 0 or self.manifest is None or owner is None:
            return (inflight.started + inflight.deadline) / 2
        expected = max(1, owner.inflight) * self.manifest.chunk_size / rate
        return inflight.started + 2 * expected + self.config.endgame_slack

    def _send(
        self, state: _Peer, request: Request, blocks: list[int], manifest: bool, now: float
    ) -> SendRequest:
        request_id = next(self._request_ids)
        timeout = self._request_timeout(len(blocks) + manifest)
        request.pending = self.config.share_pending
        self._inflight[request_id] = _Inflight(
            state.peer, list(blocks), manifest, now, now + timeout
        )
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


def plan_response(
    request: Request,
    manifest: Manifest | None,
    have_flags: bytes | None,
    pending_flags: bytes | None = None,
) -> ServePlan:
    """Decide the answer to ``request`` for a holder of ``manifest``.

    ``manifest`` is None when we know nothing of the request's root; ``have_flags`` is None when
    we hold the whole object, else one byte per block (non-zero = held) for a partial holder.
    """
    plan = ServePlan()
    root = request.root
    cancelled = set(request.cancels)
    planned: set[Cid] = set()
    wants = sorted(request.wants, key=lambda w: -w.priority)
    if (
        have_flags is not None
        and manifest is not None
        and root == manifest.root
        and any(w.kind == WANT_BLOCK and w.cid not in cancelled for w in request.wants)
        and not any(w.cid == root and w.kind == WANT_HAVE for w in request.wants)
    ):
        # a partial holder's blocks change while it fetches: a block request (the manifest's too)
        # also gets its current have-bitmap, so the fetcher neither takes it for a full holder nor
        # keeps a stale view of it between want-haves
        plan.presences.append((root, HAVE, bitmap_from_flags(have_flags)))
        if request.pending and pending_flags is not None:
            plan.presences.append((root, PENDING, bitmap_from_flags(pending_flags)))
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
                if bitmap is not None and request.pending and pending_flags is not None:
                    plan.presences.append((root, PENDING, bitmap_from_flags(pending_flags)))
            else:
                plan.blocks.append((root, -1))
            continue
        places = manifest.indexes_of(want.cid)
        if have_flags is not None:
            places = tuple(i for i in places if have_flags[i])
        held = bool(places)
        if held and want.kind != WANT_HAVE:
            if want.cid in planned:
                continue  # one copy answers every place of a repeated block
            planned.add(want.cid)
        if not held:
            if want.send_dont_have:
                plan.presences.append((want.cid, DONT_HAVE, None))
        elif want.kind == WANT_HAVE:
            plan.presences.append((want.cid, HAVE, None))
        else:
            plan.blocks.append((want.cid, places[0]))
    return plan
