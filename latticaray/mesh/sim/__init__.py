"""Deterministic discrete-event simulator for the sans-I/O protocol cores.

The cores (DHT, CRDT gossip, placement, ...) never read a clock or touch a socket: they are fed
events with a ``now`` and return actions. This harness supplies a virtual clock and a virtual
network (per-link latency, loss, partitions, node churn) so the *same* core objects can be run at
thousands of nodes on one machine, reproducibly from a seed.

Usage::

    sim = Simulator(seed=1)
    net = VirtualNetwork(sim, latency=lambda a, b: 0.02, loss=0.0)
    net.attach(node_id, on_message)          # on_message(src, msg, size) is called at delivery
    net.send(src, dst, msg, size=120)        # delivered later, or dropped (loss/partition/down)
    sim.call_later(1.0, callback, *args)     # timers
    sim.run(until=60.0)                      # process events in time order

Each event is a heap entry ``(time, seq, fn, args)``; ``seq`` breaks ties so runs are
deterministic.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NetworkStats", "Simulator", "TimerHandle", "VirtualNetwork"]


class TimerHandle:
    """A scheduled callback that can be cancelled before it fires."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Simulator:
    """Virtual clock and event queue. Time is in seconds (float)."""

    def __init__(self, seed: int = 0) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self._queue: list[tuple[float, int, TimerHandle, Callable[..., Any], tuple]] = []
        self._seq = 0
        self.events_processed = 0

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        if when < self.now:
            when = self.now
        handle = TimerHandle()
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, handle, fn, args))
        return handle

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        return self.call_at(self.now + max(0.0, delay), fn, *args)

    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> bool:
        """Process one event; return False when the queue is empty."""
        while self._queue:
            when, _, handle, fn, args = heapq.heappop(self._queue)
            if handle.cancelled:
                continue
            self.now = when
            self.events_processed += 1
            fn(*args)
            return True
        return False

    def run(
        self,
        until: float | None = None,
        max_events: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Run events in time order until ``until``, ``max_events``, ``stop()`` or an empty queue."""
        count = 0
        while self._queue:
            if until is not None and self._queue[0][0] > until:
                self.now = until
                return
            if max_events is not None and count >= max_events:
                return
            if not self.step():
                break  # only cancelled timers were left
            count += 1
            if stop is not None and stop():
                return
        if until is not None and self.now < until:
            self.now = until


@dataclass
class NetworkStats:
    messages_sent: int = 0
    messages_delivered: int = 0
    messages_dropped: int = 0
    bytes_sent: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)


class VirtualNetwork:
    """Datagram-style virtual network between node ids, driven by a :class:`Simulator`.

    ``latency(src, dst)`` gives the one-way delay in seconds; ``loss`` is a drop probability.
    Partitions are sets of node ids that cannot reach each other; a node that is ``down`` neither
    sends nor receives (its in-flight messages are lost on arrival).
    """

    def __init__(
        self,
        sim: Simulator,
        latency: Callable[[Hashable, Hashable], float] | float = 0.01,
        loss: float = 0.0,
    ) -> None:
        self.sim = sim
        self._latency = latency if callable(latency) else (lambda a, b, _l=float(latency): _l)
        self.loss = loss
        self._handlers: dict[Hashable, Callable[[Hashable, Any, int], None]] = {}
        self._down: set[Hashable] = set()
        self._group: dict[Hashable, int] = {}
        self.stats = NetworkStats()

    # membership -------------------------------------------------------------------------------
    def attach(self, node: Hashable, on_message: Callable[[Hashable, Any, int], None]) -> None:
        self._handlers[node] = on_message
        self._down.discard(node)

    def detach(self, node: Hashable) -> None:
        self._handlers.pop(node, None)

    def set_down(self, node: Hashable, down: bool = True) -> None:
        if down:
            self._down.add(node)
        else:
            self._down.discard(node)

    def is_up(self, node: Hashable) -> bool:
        return node in self._handlers and node not in self._down

    # partitions -------------------------------------------------------------------------------
    def partition(self, groups: list[set[Hashable]]) -> None:
        """Split the network: nodes in different groups cannot exchange messages."""
        self._group = {n: i for i, g in enumerate(groups) for n in g}

    def heal(self) -> None:
        self._group = {}

    def reachable(self, src: Hashable, dst: Hashable) -> bool:
        if not self._group:
            return True
        return self._group.get(src, -1) == self._group.get(dst, -1)

    # traffic ----------------------------------------------------------------------------------
    def send(
        self, src: Hashable, dst: Hashable, msg: Any, size: int = 100, kind: str | None = None
    ) -> bool:
        """Queue ``msg`` for delivery; returns False if it was dropped at send time."""
        st = self.stats
        st.messages_sent += 1
        st.bytes_sent += size
        if kind is not None:
            st.per_kind[kind] = st.per_kind.get(kind, 0) + 1
        if (
            src in self._down
            or not self.reachable(src, dst)
            or (self.loss and self.sim.rng.random() < self.loss)
        ):
            st.messages_dropped += 1
            return False
        self.sim.call_later(self._latency(src, dst), self._deliver, src, dst, msg, size)
        return True

    def _deliver(self, src: Hashable, dst: Hashable, msg: Any, size: int) -> None:
        handler = self._handlers.get(dst)
        if handler is None or dst in self._down or not self.reachable(src, dst):
            self.stats.messages_dropped += 1
            return
        self.stats.messages_delivered += 1
        handler(src, msg, size)
