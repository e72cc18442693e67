"""A node's bounded neighbourhood: the few dozen peers it keeps live load views of (sans-I/O).

No node keeps views of everyone. :class:`Neighbourhood` holds at most ``limit`` peers:

* *bootstrap* peers (pinned, at most ``pinned`` of them: never evicted while the node runs);
* peers *used* lately: this node placed work on them, or they hold arguments of its work;
* peers *found* through capacity ads (added when work is placed on them, like used ones).

Adding a peer beyond the limit evicts the least recently used unpinned one. The node's driver
subscribes to the views of the peers added (they push their view to it) and unsubscribes from
the evicted ones.

:class:`ViewPublisher` is the other side: the peers that subscribed to this node's view (at most
``max_subscribers``) and when to push it to them. A push goes out when the view changed in a way
that matters to placement (:func:`view_class`: room for one more CPU task or not, queue full or
not, totals, labels, accepting; or the load moved by at least ``load_step``), at most every
``min_interval`` s, plus a heartbeat every ``heartbeat`` s. An idle node therefore sends nothing
but heartbeats; load views are also refreshed for free by the hints every placement reply
carries.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .policy import NodeView
from .resources import CPU

__all__ = ["Neighbourhood", "ViewPublisher", "view_class"]


@dataclass
class _Neighbour:
    kind: str  # "bootstrap" | "used" | "found"
    since: float
    last_used: float


class Neighbourhood:
    """At most ``limit`` peers whose views this node keeps; LRU eviction, bootstrap pinned."""

    def __init__(self, limit: int = 32, pinned: int = 8) -> None:
        if limit < 1 or pinned < 0 or pinned > limit:
            raise ValueError("need limit >= 1 and 0 <= pinned <= limit")
        self.limit = limit
        self.pinned = pinned
        self._peers: OrderedDict[str, _Neighbour] = OrderedDict()
        self._pinned: set[str] = set()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def peers(self) -> list[str]:
        return list(self._peers)

    def add(self, node_id: str, kind: str, now: float) -> tuple[bool, list[str]]:
        """Add (or refresh) a peer; returns (newly added, peers evicted to make room)."""
        entry = self._peers.get(node_id)
        if entry is not None:
            entry.last_used = now
            self._peers.move_to_end(node_id)
            return False, []
        if kind == "bootstrap" and len(self._pinned) < self.pinned:
            self._pinned.add(node_id)
        self._peers[node_id] = _Neighbour(kind, now, now)
        evicted: list[str] = []
        while len(self._peers) > self.limit:
            victim = next((n for n in self._peers if n not in self._pinned), None)
            if victim is None or victim == node_id:
                break
            del self._peers[victim]
            evicted.append(victim)
        if node_id not in self._peers:  # everything else pinned: it could not stay
            return False, evicted
        return True, evicted

    def touch(self, node_id: str, now: float) -> None:
        entry = self._peers.get(node_id)
        if entry is not None:
            entry.last_used = now
            self._peers.move_to_end(node_id)

    def remove(self, node_id: str) -> bool:
        self._pinned.discard(node_id)
        return self._peers.pop(node_id, None) is not None


def view_class(view: NodeView, load_step: float = 0.25) -> tuple[object, ...]:
    """What of a view matters to placement; a push is due when this changes."""
    cpu_free = view.available.get(CPU, 0.0)
    queue_full = view.queue_limit is not None and view.queued >= view.queue_limit
    load = (view.running + view.queued) / view.cpu_slots
    return (
        tuple(sorted(view.total.items())),
        tuple(sorted(view.labels.items())),
        view.alive,
        cpu_free >= 1.0,
        queue_full,
        int(load / load_step) if load_step > 0 else 0,
        tuple(sorted((k, v > 0) for k, v in view.available.items() if k != CPU)),
    )


@dataclass
class _Subscriber:
    since: float
    last_push: float | None = None
    pushed_class: tuple[object, ...] | None = None
    #: a one-shot watcher (a submitter this node refused for want of room): pushed once,
    #: on the next change, then dropped; forgotten at this time if nothing changed
    once_until: float | None = None


class ViewPublisher:
    """Who gets this node's view pushed, and when (on a placement-relevant change, rate
    limited, and a slow heartbeat)."""

    def __init__(
        self,
        *,
        max_subscribers: int = 64,
        max_watchers: int = 256,
        min_interval: float = 2.0,
        heartbeat: float = 30.0,
        load_step: float = 0.0,
    ) -> None:
        self.max_subscribers = max_subscribers
        self.max_watchers = max_watchers
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.load_step = load_step
        self._subs: OrderedDict[str, _Subscriber] = OrderedDict()
        self.pushes = 0

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._subs

    def subscribers(self) -> list[str]:
        return [n for n, s in self._subs.items() if s.once_until is None]

    def subscribe(self, node_id: str, now: float) -> bool:
        """Accept a subscriber (False when full: it relies on ads and reply hints instead).
        The caller answers the subscription with the current view (a push of its own)."""
        sub = self._subs.get(node_id)
        if sub is not None:
            sub.once_until = None
            return True
        if len(self.subscribers()) >= self.max_subscribers:
            return False
        self._subs[node_id] = _Subscriber(now)
        return True

    def unsubscribe(self, node_id: str) -> None:
        self._subs.pop(node_id, None)

    def watch_once(self, node_id: str, view: NodeView, now: float, ttl: float = 5.0) -> None:
        """Push the view once to ``node_id`` when it next changes (within ``ttl``): a submitter
        this node refused learns at once when room appears. Subscribers need no watch; a full
        table drops the request."""
        if node_id in self._subs or len(self._subs) >= self.max_subscribers + self.max_watchers:
            return
        self._subs[node_id] = _Subscriber(
            now, now, view_class(view, self.load_step), once_until=now + ttl
        )

    def sent(self, node_id: str, view: NodeView, now: float) -> None:
        """The view reached ``node_id`` another way (a subscription answer, a reply hint)."""
        sub = self._subs.get(node_id)
        if sub is not None:
            sub.last_push = now
            sub.pushed_class = view_class(view, self.load_step)

    def due(self, view: NodeView, now: float) -> list[str]:
        """Subscribers to push ``view`` to now; they are marked as pushed."""
        cls = view_class(view, self.load_step)
        out = []
        done = []
        for node_id, sub in self._subs.items():
            last = sub.last_push
            if sub.once_until is not None:
                if sub.pushed_class != cls:
                    out.append(node_id)
                    done.append(node_id)
                elif now >= sub.once_until:
                    done.append(node_id)
                continue
            # (1e-9: a wakeup at last + interval must find it due despite float rounding)
            if last is None or now - last >= self.heartbeat - 1e-9:
                pass
            elif sub.pushed_class == cls or now - last < self.min_interval - 1e-9:
                continue
            sub.last_push = now
            sub.pushed_class = cls
            out.append(node_id)
        for node_id in done:
            del self._subs[node_id]
        self.pushes += len(out)
        return out

    def next_wakeup(self, view: NodeView, now: float) -> float | None:
        if not self._subs:
            return None
        cls = view_class(view, self.load_step)
        times = []
        for sub in self._subs.values():
            if sub.once_until is not None:
                times.append(now if sub.pushed_class != cls else sub.once_until)
                continue
            if sub.last_push is None:
                return now
            if sub.pushed_class != cls:
                times.append(sub.last_push + self.min_interval)
            times.append(sub.last_push + self.heartbeat)
        return min(times)
