"""When to read the DHT's `capacity/<resource>` keys, and what their answers said (sans-I/O).

A node learns of capacity beyond its neighbourhood from the ads nodes publish under
`capacity/<resource>` (advertiser.py). :class:`CapacityDirectory` decides which keys to read and
when, fed ``now``:

* a key is *demanded* when work needing its resource is placed; the key read for a demand is its
  rarest resource (custom, then GPU, then CPU: :func:`key_resource`);
* *urgent* keys (work no known node could ever run waits on them) are read at most every
  ``min_gap`` s, doubling up to ``refresh_interval`` while answers name no node new to the
  caller;
* keys demanded within ``interest_window`` s are refreshed every ``refresh_interval`` s,
  doubling up to ``idle_backoff_max`` while their answers name no new node; others are not read
  at all (an idle node reads nothing);
* an answer keeps a random sample of at most ``sample_size`` ads (so no node holds everyone's),
  cached for ``ttl`` s.

Bounds: at most ``max_keys`` keys tracked (least recently demanded dropped), one lookup in flight
per key.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .policy import NodeView
from .resources import CPU, GPU, MEMORY, OBJECT_STORE_MEMORY

__all__ = ["CapacityDirectory", "key_resource"]

_COMMON = (CPU, GPU, MEMORY, OBJECT_STORE_MEMORY)


def key_resource(demand: Mapping[str, float]) -> str:
    """The DHT key read for a demand: custom resources first (rarest), then GPU, then CPU."""
    custom = sorted(k for k, v in demand.items() if v and k not in _COMMON)
    if custom:
        return custom[0]
    return GPU if demand.get(GPU) else CPU


@dataclass
class _Key:
    demanded_at: float
    views: list[NodeView] = field(default_factory=list)
    fetched_at: float | None = None
    last_lookup: float | None = None
    in_flight: bool = False
    empty_streak: int = 0


class CapacityDirectory:
    """Which `capacity/<resource>` keys to read when, and the sampled ads they returned."""

    def __init__(
        self,
        *,
        ttl: float = 10.0,
        refresh_interval: float = 5.0,
        min_gap: float = 0.5,
        idle_backoff_max: float = 60.0,
        interest_window: float = 30.0,
        max_keys: int = 16,
        sample_size: int = 32,
        seed: int | None = None,
    ) -> None:
        if not 0 < min_gap <= refresh_interval <= idle_backoff_max:
            raise ValueError("need 0 < min_gap <= refresh_interval <= idle_backoff_max")
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.min_gap = min_gap
        self.idle_backoff_max = idle_backoff_max
        self.interest_window = interest_window
        self.max_keys = max_keys
        self.sample_size = sample_size
        self.rng = random.Random(seed)
        self.keys: OrderedDict[str, _Key] = OrderedDict()
        self.lookups = 0

    def demand(self, resource: str, now: float) -> None:
        """Work demanding ``resource`` was placed: keep its key fresh (least recent dropped)."""
        key = self.keys.get(resource)
        if key is None:
            key = self.keys[resource] = _Key(now)
            while len(self.keys) > self.max_keys:
                victim = next((r for r, k in self.keys.items() if not k.in_flight), None)
                if victim is None:
                    break
                del self.keys[victim]
        key.demanded_at = now
        self.keys.move_to_end(resource)

    def _gap(self, key: _Key, urgent: bool) -> float:
        base = self.min_gap if urgent else self.refresh_interval
        ceiling = self.refresh_interval if urgent else self.idle_backoff_max
        return float(min(ceiling, base * (2 ** min(max(0, key.empty_streak - 1), 16))))

    def _due(self, key: _Key, now: float, urgent: bool) -> bool:
        if key.in_flight:
            return False
        if key.last_lookup is None:
            return True
        if not urgent and now - key.demanded_at > self.interest_window:
            return False
        return now - key.last_lookup >= self._gap(key, urgent)

    def due(self, now: float, urgent: Iterable[str] = ()) -> list[str]:
        """Keys to read now; ``urgent`` are resources work waits on (demanded as a side effect)."""
        urgent_set = set(urgent)
        for resource in urgent_set:
            if resource not in self.keys:
                self.demand(resource, now)
        return [r for r, k in list(self.keys.items()) if self._due(k, now, r in urgent_set)]

    def started(self, resource: str, now: float) -> None:
        if resource not in self.keys:
            self.demand(resource, now)
        key = self.keys[resource]
        key.in_flight = True
        key.last_lookup = now
        self.lookups += 1

    def done(
        self,
        resource: str,
        views: list[NodeView] | None,
        now: float,
        own_node: str | None = None,
        is_new: Callable[[NodeView], bool] | None = None,
    ) -> list[NodeView]:
        """Record an answer (None: the lookup failed); returns the views kept (sampled).
        An answer that named no node new to the caller (``is_new``) backs the key off."""
        kept = [v for v in views or [] if v.node_id != own_node and v.alive]
        if len(kept) > self.sample_size:
            kept = self.rng.sample(kept, self.sample_size)
        key = self.keys.get(resource)
        if key is None:
            return kept
        key.in_flight = False
        fresh = any(is_new(v) for v in kept) if is_new is not None else bool(kept)
        key.empty_streak = 0 if fresh else key.empty_streak + 1
        if views is not None:
            key.views = kept
            key.fetched_at = now
        return kept

    def cached(self, resource: str, now: float) -> list[NodeView]:
        key = self.keys.get(resource)
        if key is None or key.fetched_at is None or now - key.fetched_at > self.ttl:
            return []
        return key.views

    def next_wakeup(self, now: float, urgent: Iterable[str] = ()) -> float | None:
        urgent_set = set(urgent)
        times: list[float] = []
        for resource, key in self.keys.items():
            if key.in_flight:
                continue
            is_urgent = resource in urgent_set
            if not is_urgent and now - key.demanded_at > self.interest_window:
                continue
            last = key.last_lookup
            times.append(now if last is None else last + self._gap(key, is_urgent))
        if urgent_set - set(self.keys):
            times.append(now)
        return min(times) if times else None
