"""Per-peer Bitswap ledgers and the upload policy against free riding. Sans-I/O.

:class:`Ledgers` counts the bytes and blocks sent to and received from each peer
(:class:`PeerLedger`) and allocates the provider's upload slots: when slots are contended, peers
that gave back are served first, and a peer far in debt beyond a free allowance waits behind
everyone else (it is never starved: it is served when nobody else waits).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["Ledgers", "PeerLedger"]


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
