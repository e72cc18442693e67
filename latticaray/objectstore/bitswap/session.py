"""A Bitswap fetch session: fetch one object (root manifest, then its blocks) from changing peers.

Sans-I/O: :class:`FetchSession` is fed events with ``now`` and returns actions
(:mod:`.actions`). It asks want-have broadly and want-block for the manifest from the best peers,
keeps each peer's state (:mod:`.peers`: full or partial holder, have-bitmap, load, delivery rate,
backoff), has its :class:`~.schedule.BlockSchedule` choose the blocks to ask of whom, re-requests
on timeout or when a provider fails, drops and penalizes peers that send bad blocks, uses partial
holders (peers still fetching) through their have-bitmaps, asked again every refresh interval, and
fails with ``ObjectNotFound`` at its deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import Any

from ..cid import Cid
from ..errors import BlockVerificationError, CodecError, ObjectNotFound
from ..manifest import Manifest
from .actions import (
    BlockSink,
    CancelRequest,
    Completed,
    Failed,
    FindProviders,
    ManifestReady,
    Penalize,
    SendRequest,
)
from .config import SessionConfig
from .messages import (
    BLOCK_RESPONSE_OVERHEAD,
    DONT_HAVE,
    HAVE,
    PENDING,
    WANT_BLOCK,
    WANT_HAVE,
    Request,
    Response,
    WantEntry,
)
from .peers import Inflight, PeerState
from .schedule import BlockSchedule, late_at

__all__ = ["FetchSession"]


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
        self.peers: dict[Hashable, PeerState] = {}
        self.done = False
        self.bytes_received = 0
        self.duplicate_blocks = 0
        self._inflight: dict[int, Inflight] = {}
        self._blocks = BlockSchedule()
        self._missing_count = 0
        self._request_ids = itertools.count(1)
        self._next_provider_lookup = float("inf")
        self._next_refresh = float("inf")
        self._last_now = float("-inf")

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
            self.peers[peer] = PeerState(peer)
        return actions + self._schedule(now)

    def attach_sink(self, sink: BlockSink, now: float) -> list[Any]:
        """Give the session the writer for the object's blocks (after ManifestReady)."""
        assert self.manifest is not None
        self.sink = sink
        self._blocks.arrange(len(self.manifest.blocks), self.config, sink.has_block)
        for state in self.peers.values():
            self._set_bitmap(state, state.bitmap)
            self._set_pending(state, state.pending)
        self._missing_count = self._blocks.unassigned()
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
                self._blocks.invalidate_rarity()
            state.inflight -= len(inflight.blocks) + inflight.manifest
            for index in inflight.blocks:
                if self._blocks.owns(request_id, index):
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
            state.record_failure(now, self.config)
            self._blocks.invalidate_rarity()
        self._return_blocks(request_id, inflight)
        return self._schedule(now)

    def on_peer_gone(self, peer: Hashable, now: float) -> list[Any]:
        state = self.peers.get(peer)
        if state is None:
            return []
        state.dropped = True
        self._blocks.invalidate_rarity()
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
        if (
            self.config.endgame
            and self.sink is not None
            and self.manifest is not None
            and self._blocks.all_assigned()
        ):
            chunk, slack = self.manifest.chunk_size, self.config.endgame_slack
            late = [
                late_at(f, self.peers, chunk, slack) for f in self._inflight.values() if f.blocks
            ]
            times += [t for t in late if t > self._last_now]
        return min(times)

    def describe(self) -> dict[str, Any]:
        """A snapshot of the session for logs and debugging."""
        return {
            "root": str(self.root),
            "done": self.done,
            "missing": self._missing_count,
            "unassigned": self._blocks.unassigned(),
            "inflight_requests": len(self._inflight),
            "peers": {str(p.peer)[-8:]: p.describe(self._last_now) for p in self.peers.values()},
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
        wanted = self._blocks.unassigned_sample(64)
        return any(not any(p.can_serve(i) for p in live) for i in wanted)

    def _requeue(self, request_id: int, index: int) -> None:
        if self._blocks.release(index, request_id):
            inflight = self._inflight.get(request_id)
            if inflight is not None and index in inflight.blocks:
                inflight.blocks.remove(index)
                state = self.peers.get(inflight.peer)
                if state is not None:
                    state.inflight -= 1
            if self.sink is not None and not self.sink.has_block(index):
                self._blocks.need_again(index)

    def _return_blocks(self, request_id: int, inflight: Inflight) -> None:
        for index in inflight.blocks:
            if self._blocks.release(index, request_id, redo_endgame=True):
                if self.sink is not None and not self.sink.has_block(index):
                    self._blocks.need_again(index)

    def _on_block(
        self, state: PeerState, request_id: int, cid: Cid, data: bytes | memoryview, now: float
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
        self._blocks.release(index, request_id)
        if inflight is not None and index in inflight.blocks:
            inflight.blocks.remove(index)
            state.inflight -= 1
        state.bytes_received += len(data)
        if (
            inflight is not None
            and state.record_delivery(len(data), inflight.started, now, self.config.rate_period)
            and not state.full
        ):
            self._blocks.invalidate_rarity()  # a slow partial holder stops counting as a source
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
            self._blocks.filled(place)
            self._missing_count -= 1
        if self._missing_count == 0:
            self.done = True
            actions: list[Any] = [CancelRequest(f.peer, rid) for rid, f in self._inflight.items()]
            self._inflight.clear()
            return actions + [Completed(self.manifest)]
        return []

    def _bad_block(self, state: PeerState, index: int | None, reason: str) -> list[Any]:
        state.bad_blocks += 1
        if state.bad_blocks >= self.config.max_bad_blocks or index is None:
            state.dropped = True
            self._blocks.invalidate_rarity()
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

    def _set_bitmap(self, state: PeerState, bitmap: bytes | None) -> None:
        count = len(self.manifest.blocks) if self.manifest is not None else None
        state.set_bitmap(bitmap, count, self._blocks.order)
        self._blocks.invalidate_rarity()

    def _set_pending(self, state: PeerState, bitmap: bytes | None) -> None:
        count = len(self.manifest.blocks) if self.manifest is not None else None
        state.set_pending(bitmap, count, self._blocks.order)
        self._blocks.invalidate_rarity()

    def pending_flags(self) -> bytes | None:
        """One byte per block, 1 = asked for and not yet received (for PENDING presences)."""
        if self.manifest is None or self.done:
            return None
        return self._blocks.requested_flags(len(self.manifest.blocks))

    def _schedule_blocks(self, now: float) -> list[Any]:
        manifest = self.manifest
        assert manifest is not None  # blocks are scheduled once the manifest is known
        batches = self._blocks.plan(
            self.peers, self._inflight, self.config, manifest.chunk_size, now
        )
        actions: list[Any] = []
        per_request = self.config.blocks_per_request
        for peer, indices in batches.items():
            state = self.peers[peer]
            for start in range(0, len(indices), per_request):
                chunk = indices[start : start + per_request]
                wants = [WantEntry(manifest.blocks[i], WANT_BLOCK, 0, True) for i in chunk]
                actions.append(self._send(state, Request(self.root, wants), chunk, False, now))
        return actions

    def _send(
        self, state: PeerState, request: Request, blocks: list[int], manifest: bool, now: float
    ) -> SendRequest:
        request_id = next(self._request_ids)
        timeout = self._request_timeout(len(blocks) + manifest)
        request.pending = self.config.share_pending
        self._inflight[request_id] = Inflight(
            state.peer, list(blocks), manifest, now, now + timeout
        )
        for index in blocks:
            self._blocks.claim(index, request_id)
        state.inflight += len(blocks) + manifest
        state.last_request_start = now
        window = 0
        if blocks and self.manifest is not None:
            sizes = sum(self.manifest.sizes[i] for i in blocks)
            window = sizes + BLOCK_RESPONSE_OVERHEAD * len(blocks)
        return SendRequest(state.peer, request_id, request, timeout, window)
