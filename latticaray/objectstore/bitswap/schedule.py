"""Block scheduling for a fetch session: which missing block to ask of which peer, and the end game.

A :class:`BlockSchedule` keeps the session's blocks in "rank space": position k is the k-th block
of the session's order (random per session, so concurrent fetchers hold different blocks and can
trade). It knows which blocks are still to be asked for, which request first asked for each block
in flight, and which blocks the end game has duplicated. :meth:`BlockSchedule.plan` spreads the
blocks to ask for across providers by their load and measured delivery rate (each peer's window is
about a second of its rate), asks full holders first for blocks no partial holder has or has asked
for (rarest first: a seed's upload goes to what the swarm lacks), and in the end game, once every
missing block is in flight, duplicates only the late ones at idle peers. Sans-I/O: the session
feeds it peer states and ``now`` and turns the plan into requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np

from .config import SessionConfig
from .peers import Inflight, PeerState

__all__ = ["BlockSchedule", "late_at"]


def late_at(
    inflight: Inflight, peers: Mapping[Hashable, PeerState], chunk_size: int, slack: float
) -> float:
    """When a request's blocks count as late for the end game: twice the time the owner's
    in-flight blocks take at its measured rate (else at our best peer's), plus ``slack``."""
    owner = peers.get(inflight.peer)
    rate = owner.throughput if owner is not None else 0.0
    if rate <= 0:
        rate = max((p.throughput for p in peers.values() if not p.dropped), default=0.0)
    if rate <= 0 or owner is None:
        return (inflight.started + inflight.deadline) / 2
    expected = max(1, owner.inflight) * chunk_size / rate
    return inflight.started + 2 * expected + slack


def _sources(peers: Iterable[PeerState], slow_fraction: float) -> list[PeerState]:
    """Partial holders that count as a source of their blocks: live, not failing, not far
    slower than the best peer we know."""
    peers = list(peers)
    live = [
        p for p in peers if not p.dropped and not p.full and p.have is not None and p.failures == 0
    ]
    rates = [p.throughput for p in peers if not p.dropped and p.throughput > 0]
    floor = slow_fraction * max(rates) if rates else 0.0
    return [p for p in live if p.throughput == 0 or p.throughput >= floor]


class BlockSchedule:
    """The blocks of one fetch in the session's order, and who is asked for which."""

    def __init__(self) -> None:
        self.order = np.zeros(0, dtype=np.int64)  # position -> block index
        self._rank: list[int] = []  # block index -> position
        #: by position, 1 = still missing and not in flight: to be asked of some peer
        self._need = np.zeros(0, dtype=np.uint8)
        self._owner: dict[int, int] = {}  # block index -> request id in flight
        self._duplicated: set[int] = set()
        #: by position, 1 if no live partial holder is known to have it (recomputed when stale)
        self._rare = np.zeros(0, dtype=np.uint8)
        self._rare_stale = True

    def arrange(self, count: int, config: SessionConfig, held: Callable[[int], bool]) -> None:
        """Draw the order of the object's ``count`` blocks; those not ``held`` are to be asked."""
        order = list(range(count))
        if config.random_order:
            random.Random(config.order_seed).shuffle(order)
        self.order = np.array(order, dtype=np.int64)
        self._rank = [0] * len(order)
        for position, index in enumerate(order):
            self._rank[index] = position
        self._need = np.array([0 if held(i) else 1 for i in order], dtype=np.uint8)

    # --- the blocks to ask for -----------------------------------------------------------------
    def unassigned(self) -> int:
        """Blocks still to be asked of some peer."""
        return int(self._need.sum())

    def all_assigned(self) -> bool:
        return not self._need.any()

    def unassigned_sample(self, limit: int) -> list[int]:
        """Up to ``limit`` of the blocks still to be asked for, in the session's order."""
        sample: list[int] = self.order[np.flatnonzero(self._need)[:limit]].tolist()
        return sample

    def need_again(self, index: int) -> None:
        self._need[self._rank[index]] = 1

    def filled(self, index: int) -> None:
        """Block ``index`` is in the sink (it may come unasked: from a request given up on)."""
        self._need[self._rank[index]] = 0

    # --- blocks in flight ------------------------------------------------------------------------
    def claim(self, index: int, request_id: int) -> None:
        """``request_id`` asks for ``index``; the first request to ask for a block owns it."""
        self._owner.setdefault(index, request_id)

    def owns(self, request_id: int, index: int) -> bool:
        return self._owner.get(index) == request_id

    def release(self, index: int, request_id: int, *, redo_endgame: bool = False) -> bool:
        """Drop ``request_id``'s ownership of ``index``; False if it did not own it.
        ``redo_endgame``: the end game may duplicate the block again."""
        if self._owner.get(index) != request_id:
            return False
        del self._owner[index]
        if redo_endgame:
            self._duplicated.discard(index)
        return True

    def requested_flags(self, count: int) -> bytes:
        """One byte per block, 1 = asked for and not yet received (for PENDING presences)."""
        flags = np.zeros(count, dtype=np.uint8)
        if self._owner:
            flags[list(self._owner)] = 1
        return flags.tobytes()

    def invalidate_rarity(self) -> None:
        """What peers hold (or how they fare) changed: recompute which blocks are rare."""
        self._rare_stale = True

    # --- planning --------------------------------------------------------------------------------
    def plan(
        self,
        peers: Mapping[Hashable, PeerState],
        inflight: Mapping[int, Inflight],
        config: SessionConfig,
        chunk_size: int,
        now: float,
    ) -> dict[Hashable, list[int]]:
        """The blocks to ask of each peer now, by peer; marks them as no longer to be asked."""
        batches: dict[Hashable, list[int]] = {}
        live = [
            p
            for p in peers.values()
            if not p.dropped and (p.full or p.bitmap is not None) and p.retry_at <= now
        ]
        if not live:
            return batches
        # peers by expected speed: measured throughput, unknown peers get the benefit of the doubt
        known = [p.throughput for p in live if p.throughput > 0]
        default_rate = max(known) if known else 1.0
        budget = {p.peer: p.window(config, chunk_size) - p.inflight for p in live}
        load = {p.peer: p.inflight for p in live}
        spare = config.spare_full_holders and any(not p.full for p in live)
        taken: set[int] = set()

        def fill(candidates: list[PeerState], only_rare: bool) -> None:
            # the cheapest peer (load over rate) takes its next block in the session's order
            total = sum(budget[p.peer] for p in candidates)
            queues = {
                p.peer: iter(self._candidates(p, only_rare, total + len(taken), peers, config))
                for p in candidates
            }
            while candidates:
                best = min(
                    candidates,
                    key=lambda p: (
                        (load[p.peer] + 1) / (p.throughput or default_rate),
                        str(p.peer),
                    ),
                )
                index = next((i for i in queues[best.peer] if i not in taken), None)
                if index is None:
                    candidates.remove(best)
                    continue
                taken.add(index)
                budget[best.peer] -= 1
                load[best.peer] += 1
                if budget[best.peer] <= 0:
                    candidates.remove(best)
                batches.setdefault(best.peer, []).append(index)

        if self._need.any():
            fill([p for p in live if budget[p.peer] > 0], spare)
            if spare:  # full holders' budget left once no block only they have remains for them
                fill([p for p in live if p.full and budget[p.peer] > 0], False)
        for index in taken:
            self._need[self._rank[index]] = 0
        if config.endgame and not self._need.any() and self._owner:
            self._assign_endgame(live, budget, batches, peers, inflight, chunk_size, config, now)
        return batches

    def _rare_ranked(self, peers: Mapping[Hashable, PeerState], config: SessionConfig) -> Any:
        """By position in the session's order: 1 if no partial holder among the sources has it
        or has asked for it (then it will soon have it: asking a full holder too would make the
        full holder send it twice)."""
        if self._rare_stale or len(self._rare) != len(self._need):
            held = np.zeros(len(self._need), dtype=np.uint8)
            for state in _sources(peers.values(), config.slow_source_fraction):
                if state.have_ranked is not None:
                    held |= state.have_ranked
                if state.pending_ranked is not None:
                    held |= state.pending_ranked
            self._rare = (held == 0).astype(np.uint8)
            self._rare_stale = False
        return self._rare

    def _candidates(
        self,
        state: PeerState,
        only_rare: bool,
        count: int,
        peers: Mapping[Hashable, PeerState],
        config: SessionConfig,
    ) -> list[int]:
        """Up to ``count`` blocks ``state`` can serve that are needed, in the session's order."""
        if state.full:
            mask = self._need & self._rare_ranked(peers, config) if only_rare else self._need
        elif state.have_ranked is not None:
            mask = self._need & state.have_ranked
        else:
            return []
        positions = np.flatnonzero(mask)
        if state.lacks:
            return [i for i in self.order[positions].tolist() if i not in state.lacks][:count]
        chosen: list[int] = self.order[positions[:count]].tolist()
        return chosen

    def _assign_endgame(
        self,
        live: list[PeerState],
        budget: dict[Hashable, int],
        batches: dict[Hashable, list[int]],
        peers: Mapping[Hashable, PeerState],
        inflight: Mapping[int, Inflight],
        chunk_size: int,
        config: SessionConfig,
        now: float,
    ) -> None:
        for index, request_id in sorted(self._owner.items()):
            request = inflight[request_id]
            if (
                index in self._duplicated
                or late_at(request, peers, chunk_size, config.endgame_slack) > now
            ):
                continue
            for state in sorted(live, key=lambda p: str(p.peer)):
                if state.peer != request.peer and budget[state.peer] > 0 and state.can_serve(index):
                    budget[state.peer] -= 1
                    batches.setdefault(state.peer, []).append(index)
                    self._duplicated.add(index)
                    break
