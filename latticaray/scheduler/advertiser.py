"""Capacity advertisement: what each node tells the mesh about its resources and load.

Wire record (``docs/protocol/scheduler.md``, format ``/latticaray/capacity/1``): a msgpack map

    {"v": 1, "node": <peer id str>, "seq": int, "time": float (advertiser wall clock),
     "total": {res: float}, "avail": {res: float}, "labels": {str: str},
     "queued": int, "running": int, "qlimit": int | None, "store_free": int, "accepting": bool}

stored in the DHT under ``capacity/<resource>`` for every resource the node has (``capacity/CPU``,
``capacity/GPU``, ``capacity/<custom>``) with the node's peer-ID bytes as the subkey. The DHT
signs each record with the publisher's host key and only lets a peer write its own subkey; the
decoder additionally checks that the ad names the record's publisher. Records expire after a short
TTL and are refreshed on change (rate-limited) and on a timer well inside the TTL, so a dead node
drops out of placement within one TTL. The same totals, availability and labels go to the CRDT
``members`` entry, which small meshes read as their whole view.

* :class:`CapacityAd` — encode/decode (size-bounded, validated; :class:`InvalidCapacityAd`).
* :class:`AdvertiserCore` — sans-I/O: fed ``now`` and the node's state version, says when to
  publish and what (:class:`PublishAd`).
* :class:`CapacityAdvertiser` — asyncio driver writing to a ``DhtService`` and ``Members``.
* Snapshot builders (pure): :func:`view_from_ad`, :func:`views_from_dht`,
  :func:`view_from_member`, :func:`member_views`, :func:`build_snapshot`; and
  :class:`CandidateSampler`, the large-mesh path that reads only the DHT key of the resource a
  request needs and samples from it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import InvalidCapacityAd
from .local import LocalScheduler
from .policy import ClusterSnapshot, NodeView
from .resources import CPU, normalize

__all__ = [
    "CAPACITY_FORMAT",
    "CAPACITY_PREFIX",
    "MAX_AD_BYTES",
    "AdvertiserCore",
    "CandidateSampler",
    "CapacityAd",
    "CapacityAdvertiser",
    "PublishAd",
    "build_snapshot",
    "capacity_key",
    "member_views",
    "view_from_ad",
    "view_from_member",
    "views_from_dht",
]

log = logging.getLogger(__name__)

CAPACITY_FORMAT = "/latticaray/capacity/1"
CAPACITY_PREFIX = b"capacity/"
MAX_AD_BYTES = 8 * 1024
_MAX_ENTRIES = 64
_MAX_LABEL_LEN = 256


def capacity_key(resource: str) -> bytes:
    return CAPACITY_PREFIX + resource.encode()


@dataclass(frozen=True)
class CapacityAd:
    node: str
    seq: int
    time: float
    total: dict[str, float]
    available: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    queue_limit: int | None = None
    store_free: int = 0
    #: False while the node drains (takes no new work); it stays a member.
    accepting: bool = True

    def encode(self) -> bytes:
        data = msgpack.packb(
            {
                "v": 1,
                "node": self.node,
                "seq": self.seq,
                "time": float(self.time),
                "total": self.total,
                "avail": self.available,
                "labels": self.labels,
                "queued": self.queued,
                "running": self.running,
                "qlimit": self.queue_limit,
                "store_free": self.store_free,
                "accepting": self.accepting,
            },
            use_bin_type=True,
        )
        if len(data) > MAX_AD_BYTES:
            raise InvalidCapacityAd(
                f"capacity ad is {len(data)} bytes, over the {MAX_AD_BYTES} limit"
            )
        return data

    @classmethod
    def decode(cls, data: bytes, publisher: str | None = None) -> CapacityAd:
        """Parse and validate; ``publisher`` (the DHT record's signer) must be the ad's node."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_AD_BYTES:
            raise InvalidCapacityAd(f"capacity ad must be at most {MAX_AD_BYTES} bytes")
        try:
            obj = msgpack.unpackb(
                bytes(data),
                raw=False,
                strict_map_key=True,
                max_map_len=_MAX_ENTRIES,
                max_array_len=_MAX_ENTRIES,
                max_str_len=MAX_AD_BYTES,
                max_bin_len=MAX_AD_BYTES,
            )
        except Exception as exc:  # msgpack raises several unrelated types on malformed input
            raise InvalidCapacityAd(f"capacity ad is not valid msgpack: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise InvalidCapacityAd("capacity ad must be a map with v=1")
        try:
            node = obj["node"]
            seq, when = obj["seq"], obj["time"]
            queued, running, qlimit = obj["queued"], obj["running"], obj.get("qlimit")
            store_free = obj.get("store_free", 0)
            accepting = obj.get("accepting", True)
            if not isinstance(accepting, bool):
                raise InvalidCapacityAd("accepting must be a boolean")
            if not isinstance(node, str) or not 0 < len(node) <= 128:
                raise InvalidCapacityAd("node must be a peer id string")
            if publisher is not None and node != publisher:
                raise InvalidCapacityAd(
                    f"ad names node {node[:64]} but was published by {publisher}"
                )
            for name, value in (
                ("seq", seq),
                ("queued", queued),
                ("running", running),
                ("store_free", store_free),
            ):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidCapacityAd(f"{name} must be a non-negative integer")
            if qlimit is not None and (
                isinstance(qlimit, bool) or not isinstance(qlimit, int) or qlimit < 0
            ):
                raise InvalidCapacityAd("qlimit must be a non-negative integer or nil")
            if (
                isinstance(when, bool)
                or not isinstance(when, (int, float))
                or not math.isfinite(when)
            ):
                raise InvalidCapacityAd("time must be a finite number")
            total = normalize(_as_map(obj["total"], "total"))
            available = normalize(_as_map(obj["avail"], "avail"))
            labels = _as_map(obj.get("labels", {}), "labels")
            for k, v in labels.items():
                if (
                    not isinstance(k, str)
                    or not isinstance(v, str)
                    or len(k) > _MAX_LABEL_LEN
                    or len(v) > _MAX_LABEL_LEN
                ):
                    raise InvalidCapacityAd("labels must map short strings to short strings")
        except KeyError as exc:
            raise InvalidCapacityAd(f"capacity ad lacks field {exc}") from None
        except ValueError as exc:  # ResourceError from normalize
            raise InvalidCapacityAd(f"capacity ad has bad resources: {exc}") from None
        return cls(
            node,
            seq,
            float(when),
            total,
            available,
            labels,
            queued,
            running,
            qlimit,
            store_free,
            accepting,
        )


def _as_map(value: Any, name: str) -> dict:
    if not isinstance(value, dict) or len(value) > _MAX_ENTRIES:
        raise InvalidCapacityAd(f"{name} must be a map of at most {_MAX_ENTRIES} entries")
    return value


# sans-I/O core --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishAd:
    """Write ``ad`` under each of ``keys`` (subkey = the node's peer-ID bytes) until ``expiration``."""

    ad: CapacityAd
    keys: tuple[bytes, ...]
    expiration: float
    #: Keys the node advertised before but no longer has (let them expire; nothing to write).
    dropped: tuple[bytes, ...] = ()


class AdvertiserCore:
    """When to advertise: on change (at most every ``min_interval``) and every ``refresh_interval``.

    ``ttl`` is the records' lifetime; ``refresh_interval`` must be well inside it.
    """

    def __init__(
        self,
        node_id: str,
        *,
        ttl: float = 15.0,
        refresh_interval: float = 5.0,
        min_interval: float = 0.25,
    ) -> None:
        if not 0 < refresh_interval < ttl:
            raise ValueError("refresh_interval must be positive and shorter than ttl")
        self.node_id = node_id
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self.min_interval = min_interval
        self._seq = 0
        self._last_publish: float | None = None
        self._published_version: int | None = None
        self._keys: tuple[bytes, ...] = ()

    def next_deadline(self, version: int) -> float | None:
        if self._last_publish is None:
            return None  # publish at once
        if version != self._published_version:
            return self._last_publish + self.min_interval
        return self._last_publish + self.refresh_interval

    def poll(
        self, now: float, version: int, view: NodeView, store_free: int = 0
    ) -> PublishAd | None:
        """Return what to publish now, or None (not due yet)."""
        deadline = self.next_deadline(version)
        if deadline is not None and now < deadline:
            return None
        self._seq += 1
        self._last_publish = now
        self._published_version = version
        ad = CapacityAd(
            self.node_id,
            view.seq or self._seq,  # the node's own change count when it has one
            now,
            dict(view.total),
            dict(view.available),
            dict(view.labels),
            view.queued,
            view.running,
            view.queue_limit,
            store_free,
            view.alive,
        )
        keys = tuple(sorted(capacity_key(r) for r in (set(view.total) | {CPU})))
        dropped = tuple(k for k in self._keys if k not in keys)
        self._keys = keys
        return PublishAd(ad, keys, now + self.ttl, dropped)


# asyncio driver -------------------------------------------------------------------------------


class CapacityAdvertiser:
    """Publishes a node's capacity to the DHT (``capacity/<resource>``) and CRDT ``members``.

    ``dht`` needs ``await put(key, value, expiration, subkey=...)``; ``members`` (optional) needs
    ``upsert_self(resources_total=, resources_available=, labels=)``. ``clock`` is wall time.
    """

    def __init__(
        self,
        local: LocalScheduler,
        peer_id: str,
        peer_id_bytes: bytes,
        dht: Any = None,
        members: Any = None,
        *,
        core: AdvertiserCore | None = None,
        clock: Callable[[], float] | None = None,
        store_free: Callable[[], int] | None = None,
        put_timeout: float = 10.0,
    ) -> None:
        import time

        self.local = local
        self.peer_id = peer_id
        self.subkey = peer_id_bytes
        self.dht = dht
        self.members = members
        self.core = core or AdvertiserCore(peer_id)
        self.clock = clock or time.time
        self.store_free = store_free or (lambda: 0)
        self.put_timeout = put_timeout
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.published = 0
        self.failures = 0
        self._failing: set[bytes] = set()  # keys whose last put failed (warned once a streak)

    def notify_change(self) -> None:
        """Call after the local scheduler's state changed (optional: the timer catches it)."""
        self._wake.set()

    async def publish_once(self) -> PublishAd | None:
        action = self.core.poll(
            self.clock(), self.local.version, self.local.view(self.clock()), self.store_free()
        )
        if action is not None:
            await self._publish(action)
        return action

    async def _publish(self, action: PublishAd) -> None:
        value = action.ad.encode()
        if self.dht is not None:
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(
                        self.dht.put(key, value, action.expiration, subkey=self.subkey),
                        self.put_timeout,
                    )
                    for key in action.keys
                ),
                return_exceptions=True,
            )
            for key, result in zip(action.keys, results):
                if isinstance(result, BaseException):
                    self.failures += 1
                    why = str(result) or type(result).__name__  # a timeout says nothing itself
                    if key in self._failing:  # said once a streak: the rest is debug
                        log.debug("capacity ad put %r failed again: %s", key, why)
                    else:
                        self._failing.add(key)
                        log.warning(
                            "capacity ad put %r failed: %s (retried each refresh; "
                            "further failures are logged at debug level)",
                            key,
                            why,
                        )
                elif key in self._failing:
                    self._failing.discard(key)
                    log.info("capacity ad put %r succeeded again", key)
        if self.members is not None:
            try:
                self.members.upsert_self(
                    resources_total=action.ad.total,
                    resources_available=action.ad.available,
                    labels=action.ad.labels,
                )
            except Exception as exc:  # a replica refusing our own entry must not stop the loop
                self.failures += 1
                log.warning("members upsert failed: %s", exc)
        self.published += 1

    async def run(self) -> None:
        while True:
            await self.publish_once()
            deadline = self.core.next_deadline(self.local.version)
            delay = 0.0 if deadline is None else max(0.0, deadline - self.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.01))
                # changed: respect the rate limit before publishing again
                deadline = self.core.next_deadline(self.local.version)
                if deadline is not None:
                    await asyncio.sleep(max(0.0, deadline - self.clock()))
            except TimeoutError:
                pass

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name="capacity-advertiser"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


# snapshot builders (pure) ---------------------------------------------------------------------


def view_from_ad(
    ad: CapacityAd, received_at: float, max_age: float = 15.0, now: float | None = None
) -> NodeView:
    """A :class:`NodeView` on the *submitter's* clock: the ad counts as made when received
    (clocks of different nodes are not compared). An ad older than ``max_age`` marks the node
    not alive."""
    alive = ad.accepting and (True if now is None else (now - received_at) <= max_age)
    return NodeView(
        ad.node,
        dict(ad.total),
        dict(ad.available),
        dict(ad.labels),
        queued=ad.queued,
        running=ad.running,
        ad_time=received_at,
        queue_limit=ad.queue_limit,
        alive=alive,
        seq=ad.seq,
    )


def _record_parts(record: Any) -> tuple[bytes, str | None]:
    """(value, publisher peer id string or None) of a DHT value in any of its shapes."""
    if isinstance(record, (bytes, bytearray)):
        return bytes(record), None
    value = getattr(record, "value", None)
    publisher = getattr(record, "publisher", None)
    if isinstance(publisher, (bytes, bytearray)):
        try:
            from latticaray.mesh.identity import PeerId

            publisher = str(PeerId.from_bytes(bytes(publisher)))
        except Exception:
            publisher = None
    elif publisher is not None:
        publisher = str(publisher)
    if not isinstance(value, (bytes, bytearray)):
        raise InvalidCapacityAd("DHT value carries no bytes")
    return bytes(value), publisher


def views_from_dht(result: Any, received_at: float) -> tuple[list[NodeView], list[str]]:
    """Node views from a DHT ``get(capacity/<res>)`` answer (a map subkey -> record).

    Returns (views, problems): bad ads are skipped and described, never raised.
    """
    if result is None:
        return [], []
    records: Iterable[Any] = result.values() if isinstance(result, Mapping) else [result]
    views: dict[str, NodeView] = {}
    problems: list[str] = []
    for record in records:
        try:
            value, publisher = _record_parts(record)
            ad = CapacityAd.decode(value, publisher)
        except InvalidCapacityAd as exc:
            problems.append(str(exc))
            continue
        views.setdefault(ad.node, view_from_ad(ad, received_at))
    return list(views.values()), problems


def view_from_member(member: Any, now: float, alive: bool = True) -> NodeView:
    """A view from a CRDT ``members`` entry (``MemberInfo``): no queue length is advertised
    there, so ``running`` is estimated from the CPUs in use."""
    total = dict(member.resources_total)
    available = dict(member.resources_available)
    running = int(max(0.0, total.get(CPU, 0.0) - available.get(CPU, 0.0)))
    return NodeView(
        str(member.peer_id),
        total,
        available,
        dict(member.labels),
        queued=0,
        running=running,
        ad_time=float(getattr(member, "heartbeat", now)),
        alive=alive,
    )


def member_views(members: Any, wall_now: float, local_now: float) -> list[NodeView]:
    """Views of the alive CRDT members with ad times moved onto the local (event loop) clock:
    a heartbeat ``age`` seconds old gets ``ad_time = local_now - age``."""
    views = []
    for member in members.alive(wall_now):
        view = view_from_member(member, wall_now)
        view.ad_time = local_now - max(0.0, wall_now - view.ad_time)
        views.append(view)
    return views


def build_snapshot(
    members: Iterable[Any] = (),
    dht_views: Iterable[NodeView] = (),
    objects: Mapping[Any, tuple[int, Iterable[str]]] | None = None,
    local_node: str | None = None,
    now: float = 0.0,
) -> ClusterSnapshot:
    """Merge the CRDT member view and DHT ads into a :class:`ClusterSnapshot`.

    DHT ads carry queue lengths, so for a node present in both the DHT view wins.
    """
    snapshot = ClusterSnapshot(local_node=local_node)
    by_node: dict[str, NodeView] = {}
    for member in members:
        view = view_from_member(member, now)
        by_node[view.node_id] = view
    for view in dht_views:
        by_node[view.node_id] = view
    for view in by_node.values():
        snapshot.update_node(view)
    for cid, (size, holders) in (objects or {}).items():
        snapshot.set_object(cid, size, holders)
    return snapshot


class CandidateSampler:
    """Large-mesh view: read ``capacity/<res>`` for the scarcest resource a request needs and
    keep a random sample of at most ``sample_size`` nodes from it (cached for ``max_age`` s)."""

    def __init__(
        self,
        dht: Any,
        *,
        sample_size: int = 64,
        max_age: float = 2.0,
        get_timeout: float = 5.0,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.dht = dht
        self.sample_size = sample_size
        self.max_age = max_age
        self.get_timeout = get_timeout
        self.rng = random.Random(seed)
        self.clock = clock or time.monotonic
        self._cache: dict[str, tuple[float, list[NodeView]]] = {}
        self.problems: list[str] = []

    @staticmethod
    def key_resource(demand: Mapping[str, float]) -> str:
        """Custom resources first (rarest), then GPU, then CPU."""
        custom = sorted(k for k in demand if k not in (CPU, "GPU", "memory", "object_store_memory"))
        if custom:
            return custom[0]
        return "GPU" if demand.get("GPU") else CPU

    async def candidates(self, demand: Mapping[str, float]) -> list[NodeView]:
        resource = self.key_resource(demand)
        now = self.clock()
        cached = self._cache.get(resource)
        if cached is not None and now - cached[0] <= self.max_age:
            return cached[1]
        result = await asyncio.wait_for(self.dht.get(capacity_key(resource)), self.get_timeout)
        views, problems = views_from_dht(result, now)
        self.problems = problems[-16:]
        if len(views) > self.sample_size:
            views = self.rng.sample(views, self.sample_size)
        self._cache[resource] = (now, views)
        return views
