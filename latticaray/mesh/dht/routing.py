"""Kademlia routing table: 256 k-buckets over XOR distance, LRS eviction with a ping check,
replacement caches, failure accounting and bucket refresh bookkeeping (sans-I/O).

Each bucket keeps its live contacts in least-recently-seen order (a dict's insertion order: the
first entry is the least recently seen). A full bucket never drops a contact it has not proven
dead: a newcomer goes to the bucket's replacement cache and the table asks its driver to ping the
least-recently-seen entry (:meth:`RoutingTable.observe` returns it). The driver reports the ping's
outcome with :meth:`RoutingTable.ping_result`.
"""

from __future__ import annotations

import random

from .keyspace import Contact, dht_id

__all__ = ["RoutingTable"]


class _Bucket:
    __slots__ = ("entries", "failures", "last_lookup", "next_ping", "pinging", "replacements")

    def __init__(self, now: float) -> None:
        self.entries: dict[bytes, Contact] = {}  # least recently seen first
        self.replacements: dict[bytes, Contact] = {}  # most recently seen last
        self.failures: dict[bytes, int] = {}
        self.pinging: bytes | None = None
        self.last_lookup = now
        self.next_ping = 0.0


class RoutingTable:
    """k-buckets of contacts around ``local_id``.

    ``k`` bounds each bucket, ``replacement_size`` each replacement cache; a contact is evicted
    after ``max_failures`` consecutive failed requests (at once if a replacement is waiting).
    A bucket asks for at most one liveness ping per ``ping_interval``; newcomers arriving in
    between wait in the replacement cache (a dead entry is also found by failed requests).
    """

    def __init__(
        self,
        local_id: int,
        k: int = 20,
        replacement_size: int = 8,
        max_failures: int = 2,
        refresh_interval: float = 3600.0,
        ping_interval: float = 30.0,
    ) -> None:
        self.ping_interval = ping_interval
        self.local_id = local_id
        self.k = k
        self.replacement_size = replacement_size
        self.max_failures = max_failures
        self.refresh_interval = refresh_interval
        self._buckets: dict[int, _Bucket] = {}
        self._size = 0

    # queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __contains__(self, peer_id: bytes) -> bool:
        return self.get(peer_id) is not None

    def _index(self, node_id: int) -> int:
        return (self.local_id ^ node_id).bit_length() - 1

    def get(self, peer_id: bytes, node_id: int | None = None) -> Contact | None:
        bucket = self._buckets.get(self._index(dht_id(peer_id) if node_id is None else node_id))
        return None if bucket is None else bucket.entries.get(peer_id)

    def contacts(self) -> list[Contact]:
        return [c for b in self._buckets.values() for c in b.entries.values()]

    def bucket_contents(self) -> dict[int, list[Contact]]:
        """Non-empty buckets by index, each least-recently-seen first (for tests and inspection)."""
        return {i: list(b.entries.values()) for i, b in sorted(self._buckets.items()) if b.entries}

    def replacement_contents(self) -> dict[int, list[Contact]]:
        return {
            i: list(b.replacements.values())
            for i, b in sorted(self._buckets.items())
            if b.replacements
        }

    def closest(
        self, target: int, count: int | None = None, exclude: bytes | None = None
    ) -> list[Contact]:
        """The ``count`` (default k) known contacts closest to ``target``, nearest first.

        Bucket ``j`` (the target's own bucket) holds the only contacts within distance 2**j of
        the target; buckets below ``j`` are all at distance [2**j, 2**(j+1)); bucket ``i > j`` at
        [2**i, 2**(i+1)). So buckets are visited in that order and only as many as needed.
        """
        count = self.k if count is None else count
        buckets = self._buckets
        j = self._index(target)
        found: list[Contact] = []
        if j < 0:  # the target is our own id: every bucket is "above" it, take them all
            for b in buckets.values():
                found.extend(b.entries.values())
        else:
            if j in buckets:
                found.extend(buckets[j].entries.values())
            for i, b in buckets.items():
                if i < j:
                    found.extend(b.entries.values())
            if len(found) < count + 1:
                for i in sorted(i for i in buckets if i > j):
                    found.extend(buckets[i].entries.values())
                    if len(found) >= count + 1:
                        break
        if exclude is not None:
            found = [c for c in found if c.peer_id != exclude]
        found.sort(key=lambda c: c.node_id ^ target)
        return found[:count]

    # updates ----------------------------------------------------------------------------------
    def observe(self, contact: Contact, now: float) -> Contact | None:
        """Record that ``contact`` is alive (it answered us, or sent us a valid request).

        Returns a contact the driver should ping (the least-recently-seen entry of a full
        bucket) or None. The newcomer waits in the replacement cache until that ping fails.
        """
        index = self._index(contact.node_id)
        if index < 0:
            return None
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket(now)
        entries = bucket.entries
        pid = contact.peer_id
        known = entries.pop(pid, None)
        if known is not None:
            entries[pid] = contact if contact.addrs or not known.addrs else known
            bucket.failures.pop(pid, None)
            return None
        if len(entries) < self.k:
            entries[pid] = contact
            bucket.replacements.pop(pid, None)
            self._size += 1
            return None
        repl = bucket.replacements
        repl.pop(pid, None)
        repl[pid] = contact
        if len(repl) > self.replacement_size:
            del repl[next(iter(repl))]
        if (bucket.pinging is not None and bucket.pinging in entries) or now < bucket.next_ping:
            return None
        lrs = next(iter(entries.values()))
        bucket.pinging = lrs.peer_id
        bucket.next_ping = now + self.ping_interval
        return lrs

    def ping_result(
        self, peer_id: bytes, alive: bool, now: float, node_id: int | None = None
    ) -> None:
        """Outcome of the liveness ping that :meth:`observe` asked for."""
        bucket = self._buckets.get(self._index(dht_id(peer_id) if node_id is None else node_id))
        if bucket is None:
            return
        if bucket.pinging == peer_id:
            bucket.pinging = None
        if peer_id not in bucket.entries:
            return
        if alive:
            bucket.entries[peer_id] = bucket.entries.pop(peer_id)
            bucket.failures.pop(peer_id, None)
        else:
            self._evict(bucket, peer_id)

    def failed(self, peer_id: bytes, now: float, node_id: int | None = None) -> bool:
        """A request to ``peer_id`` failed or timed out. Returns True if it was evicted."""
        bucket = self._buckets.get(self._index(dht_id(peer_id) if node_id is None else node_id))
        if bucket is None:
            return False
        if peer_id not in bucket.entries:
            bucket.replacements.pop(peer_id, None)
            return False
        count = bucket.failures.get(peer_id, 0) + 1
        if count >= self.max_failures or bucket.replacements:
            self._evict(bucket, peer_id)
            return True
        bucket.failures[peer_id] = count
        return False

    def remove(self, peer_id: bytes, node_id: int | None = None) -> None:
        bucket = self._buckets.get(self._index(dht_id(peer_id) if node_id is None else node_id))
        if bucket is not None and peer_id in bucket.entries:
            self._evict(bucket, peer_id)

    def _evict(self, bucket: _Bucket, peer_id: bytes) -> None:
        del bucket.entries[peer_id]
        bucket.failures.pop(peer_id, None)
        self._size -= 1
        if bucket.pinging == peer_id:
            bucket.pinging = None
        if bucket.replacements:
            newest = next(reversed(bucket.replacements))
            contact = bucket.replacements.pop(newest)
            bucket.entries[newest] = contact
            self._size += 1

    # refresh ----------------------------------------------------------------------------------
    def touch(self, target: int, now: float) -> None:
        """A lookup for ``target`` completed: its bucket counts as refreshed."""
        index = self._index(target)
        bucket = self._buckets.get(index)
        if bucket is not None:
            bucket.last_lookup = now

    def stale_buckets(self, now: float) -> list[int]:
        """Indices of non-empty buckets with no lookup in ``refresh_interval``."""
        return [
            i
            for i, b in sorted(self._buckets.items())
            if b.entries and now - b.last_lookup >= self.refresh_interval
        ]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> int:
        """A random id whose distance from us falls in bucket ``index``."""
        distance = (1 << index) | rng.getrandbits(index) if index > 0 else 1
        return self.local_id ^ distance
