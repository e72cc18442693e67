"""Prometheus metrics of one process: the registry, the metric families, and cheap recorders.

Every layer records here without importing the runtime (this module imports nothing else from
latticaray). A process normally hosts one node, so the registry is per process; several nodes in
one process (tests) add up.

Recording is kept cheap because some of it sits on hot paths (a frame sent, a task finished):

* :class:`Tally` is a counter family whose children are plain ints (``child.add(n)`` costs about
  a tenth of ``prometheus_client.Counter.inc``, which takes a lock). Add to a child from one
  thread only: the event loop that owns the thing counted.
* :class:`Timing` is a histogram family with fixed buckets, plain lists and ``bisect``.
* :class:`Sampled` is a gauge family read at scrape time from callbacks (queue depth, store
  bytes, connections per path): nothing is recorded on the hot path at all.

Children are made once (``FAMILY.labels(...)``) and kept by the recording code; a family holds
at most ``MAX_CHILDREN`` label sets, later ones fold into one child labelled ``other``.

    from latticaray.observe import metrics
    metrics.TASKS_SUBMITTED.labels("task").add()
    handle = metrics.QUEUE_DEPTH.register(lambda: [((), len(queue))]); handle()  # unregister
    body, content_type = metrics.exposition()
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "BYTES_MOVED",
    "CONNECTIONS",
    "DHT_OPERATIONS",
    "LOG_LINES",
    "MAX_CHILDREN",
    "OBJECT_STORE_BYTES",
    "OBJECT_STORE_CAPACITY",
    "OBJECT_STORE_EVICTIONS",
    "OBJECT_STORE_OBJECTS",
    "PLACEMENT_LATENCY",
    "QUEUE_DEPTH",
    "REGISTRY",
    "RELAY_RESERVATIONS",
    "RPC_LATENCY",
    "TASKS_FAILED",
    "TASKS_FINISHED",
    "TASKS_RETRIED",
    "TASKS_RUNNING",
    "TASKS_SUBMITTED",
    "Sampled",
    "Tally",
    "Timing",
    "exposition",
    "start_http_server",
]

MAX_CHILDREN = 512
OTHER = "other"

#: Latency buckets in seconds, 100 µs to 60 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c == "_" for c in name) or name[0].isdigit():
        raise ValueError(f"bad metric name {name!r}")


class _Family:
    """A named family of children keyed by label values, bounded in number."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        for label in labelnames:
            _check_name(label)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()

    def _child(self, values: tuple[str, ...], make: Callable[[], object]) -> object:
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {self.labelnames}, got {len(values)} value(s)"
            )
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.get(values)
                if child is None:
                    if len(self._children) >= MAX_CHILDREN:
                        values = (OTHER,) * len(self.labelnames)
                        child = self._children.get(values)
                    if child is None:
                        child = make()
                        self._children[values] = child
        return child

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        with self._lock:
            return list(self._children.items())


class TallyChild:
    """One counter: a plain int (add from the owning thread only)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def add(self, amount: int = 1) -> None:
        self.value += amount


class Tally(_Family):
    """A counter family of plain-int children (exported as ``<name>_total``)."""

    def labels(self, *values: str) -> TallyChild:
        child = self._child(tuple(str(v) for v in values), TallyChild)
        assert isinstance(child, TallyChild)
        return child

    def values(self) -> dict[tuple[str, ...], int]:
        """Every child's count by its label values."""
        return {k: c.value for k, c in self._items() if isinstance(c, TallyChild)}

    def total(self) -> int:
        """The sum over every child (tests and summaries)."""
        return sum(self.values().values())

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            assert isinstance(child, TallyChild)
            family.add_metric(list(values), child.value)
        yield family


class TimingChild:
    """One histogram: counts per bucket and a running sum (observe from one thread only)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        if seconds != seconds:  # NaN: never recorded
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


class Timing(_Family):
    """A histogram family (seconds) with fixed buckets."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or math.isinf(bounds[-1]):
            raise ValueError("buckets must be finite, increasing and not empty")
        self.bounds = bounds

    def labels(self, *values: str) -> TimingChild:
        child = self._child(tuple(str(v) for v in values), lambda: TimingChild(self.bounds))
        assert isinstance(child, TimingChild)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._items():
            assert isinstance(child, TimingChild)
            counts = list(child.counts)  # one copy: buckets and count agree
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(self.bounds, counts):
                running += n
                buckets.append((repr(bound), running))
            buckets.append(("+Inf", running + counts[-1]))
            family.add_metric(list(values), buckets, child.sum)
        yield family


SampleFn = Callable[[], Iterable[tuple[Sequence[str], float]]]


class Sampled:
    """A gauge family whose values are read from callbacks when it is scraped.

    Each callback returns ``[(label_values, value), ...]``; values with the same labels from
    several callbacks (several nodes in one process) are added. A callback that raises is
    skipped for that scrape.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        _check_name(name)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._sources: dict[int, SampleFn] = {}
        self._next = 0
        self._lock = threading.Lock()

    def register(self, fn: SampleFn) -> Callable[[], None]:
        """Add a callback; returns a function that removes it again."""
        with self._lock:
            key = self._next
            self._next += 1
            self._sources[key] = fn

        def unregister() -> None:
            with self._lock:
                self._sources.pop(key, None)

        return unregister

    def values(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            sources = list(self._sources.values())
        out: dict[tuple[str, ...], float] = {}
        for fn in sources:
            try:
                samples = list(fn())
            except Exception:
                continue
            for labels, value in samples:
                key = tuple(str(v) for v in labels)
                if len(key) != len(self.labelnames):
                    continue
                out[key] = out.get(key, 0.0) + float(value)
        return out

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, value in self.values().items():
            family.add_metric(list(values), value)
        yield family


REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)


_F = TypeVar("_F", Tally, Timing, Sampled)


def _register(family: _F) -> _F:
    REGISTRY.register(family)
    return family


# --- tasks and placement (runtime, scheduler) -------------------------------------------------
TASKS_SUBMITTED = _register(
    Tally(
        "latticaray_tasks_submitted",
        "Tasks, actor creations and actor calls submitted through this node",
        ("kind",),
    )
)
TASKS_FINISHED = _register(
    Tally("latticaray_tasks_finished", "Tasks that finished with a result", ("kind",))
)
TASKS_FAILED = _register(
    Tally("latticaray_tasks_failed", "Tasks that finished with an error", ("kind",))
)
TASKS_RETRIED = _register(
    Tally("latticaray_tasks_retried", "Task attempts started again after a failure", ("kind",))
)
QUEUE_DEPTH = _register(
    Sampled("latticaray_task_queue_depth", "Tasks waiting on this node for arguments or resources")
)
TASKS_RUNNING = _register(
    Sampled("latticaray_tasks_running", "Tasks and actor calls running on this node's workers")
)
PLACEMENT_LATENCY = _register(
    Timing(
        "latticaray_placement_latency_seconds",
        "From submission to the task's placement on a node",
        ("where",),
    )
)

# --- object store -----------------------------------------------------------------------------
OBJECT_STORE_BYTES = _register(
    Sampled("latticaray_object_store_bytes", "Bytes held in this node's object store")
)
OBJECT_STORE_CAPACITY = _register(
    Sampled("latticaray_object_store_capacity_bytes", "Capacity of this node's object store")
)
OBJECT_STORE_OBJECTS = _register(
    Sampled("latticaray_object_store_objects", "Objects held in this node's object store")
)
OBJECT_STORE_EVICTIONS = _register(
    Tally(
        "latticaray_object_store_evictions",
        "Objects the store evicted or spilled to disk to make room",
        ("action",),
    )
)

# --- mesh -------------------------------------------------------------------------------------
BYTES_MOVED = _register(
    Tally(
        "latticaray_bytes_moved",
        "Bytes sent and received per path type (unix, direct, punched, relayed)",
        ("path", "direction"),
    )
)
CONNECTIONS = _register(
    Sampled("latticaray_connections", "Open peer connections per path type", ("path",))
)
RELAY_RESERVATIONS = _register(
    Sampled("latticaray_relay_reservations", "Relay reservations held (as client) and served")
)
DHT_OPERATIONS = _register(
    Tally("latticaray_dht_operations", "DHT operations by kind and outcome", ("op", "outcome"))
)
RPC_LATENCY = _register(
    Timing(
        "latticaray_rpc_latency_seconds",
        "Unary RPC latency seen by the caller, per protocol",
        ("protocol",),
    )
)

# --- driver logs ------------------------------------------------------------------------------
LOG_LINES = _register(
    Tally(
        "latticaray_log_lines",
        "Worker output lines at the driver: printed, deduplicated or dropped by the rate limit",
        ("outcome",),
    )
)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def start_http_server(port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on its own thread (for ``latticaray start --metrics-port``); the
    server (``server_port``: the port, ``shutdown()``) and its thread."""
    from prometheus_client import start_http_server as _start

    return _start(port, addr=addr, registry=REGISTRY)
