"""What a node reports about itself: state rows, the StateSource interface, and their wire codec.

The state API (``latticaray.util.state``), ``latticaray status``/``list`` and the dashboard read
one interface, :class:`StateSource`, which a runtime node implements and tests fake:

* ``local_report(limit)`` — this node's :class:`NodeReport`: its own :class:`NodeRow`, its links
  to peers (path type per link: Unix, QUIC/TCP direct, hole-punched, relayed; RTT), the tasks,
  actors, objects and transfers it knows first hand (at most ``limit`` rows of each kind);
* ``member_rows()`` — rows for the other members it knows from the mesh's membership view, marked
  ``stale`` (their resources as last advertised, no task counts);
* ``remote_report(node_id, limit, timeout)`` — another member's report, over the members-only
  state RPC (raises on failure).

Rows are frozen slotted dataclasses using Ray's field names where they fit. On the wire a report
is a msgpack array of rows, each row an array of its fields in declaration order; decoding checks
every field's type and bound before building a row (:func:`decode_report` raises
:class:`ReportDecodeError`), and ignores trailing fields a newer peer may add.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgpack

__all__ = [
    "DEFAULT_ROW_LIMIT",
    "MAX_ROWS",
    "ActorRow",
    "ActorStateName",
    "LinkRow",
    "NodeReport",
    "NodeRow",
    "NodeStateName",
    "ObjectRow",
    "PathType",
    "ReportDecodeError",
    "Row",
    "StateSource",
    "TaskRow",
    "TaskStateName",
    "TransferRow",
    "decode_report",
    "encode_report",
    "unpack_bounded",
]

REPORT_VERSION = 1
DEFAULT_ROW_LIMIT = 1000
MAX_ROWS = 10_000  # per kind in one report
MAX_STR = 4096
MAX_LIST = 64  # addresses of a node
MAX_MAP = 64  # resources of a node
MAX_REPORT_BYTES = 8 << 20


class PathType(str, enum.Enum):
    """How a node reaches a peer: the path type of its primary connection."""

    SELF = "self"
    UNIX = "unix"  # same host
    DIRECT = "direct"  # QUIC or TCP to an address the peer listens on
    PUNCHED = "punched"  # direct QUIC opened by hole punching
    RELAYED = "relayed"  # through a relay (circuit)
    NONE = "none"  # a member known but not connected


class NodeStateName(str, enum.Enum):
    ALIVE = "ALIVE"
    UNREACHABLE = "UNREACHABLE"  # known member whose report could not be had
    DEAD = "DEAD"


class TaskStateName(str, enum.Enum):
    PENDING_ARGS_AVAIL = "PENDING_ARGS_AVAIL"
    PENDING_NODE_ASSIGNMENT = "PENDING_NODE_ASSIGNMENT"
    SUBMITTED_TO_WORKER = "SUBMITTED_TO_WORKER"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"


class ActorStateName(str, enum.Enum):
    DEPENDENCIES_UNREADY = "DEPENDENCIES_UNREADY"
    PENDING_CREATION = "PENDING_CREATION"
    ALIVE = "ALIVE"
    RESTARTING = "RESTARTING"
    DEAD = "DEAD"


class ReportDecodeError(ValueError):
    """A state report from the network did not have the shape or bounds it must have."""


# --- field checks, derived once from each row class's annotations ----------------------------


def _str(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_STR:
        raise TypeError("a string of at most 4096 characters")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not -(2**63) <= v < 2**64:
        raise TypeError("an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError("a finite number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("a boolean")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _resources(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > MAX_MAP:
        raise TypeError("a map of at most 64 resources")
    return {_str(k): _float(x) for k, x in v.items()}


def _strings(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_LIST:
        raise TypeError("a list of at most 64 strings")
    return tuple(_str(x) for x in v)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "str": _str,
    "int": _int,
    "float": _float,
    "bool": _bool,
    "str | None": _optional(_str),
    "int | None": _optional(_int),
    "float | None": _optional(_float),
    "dict[str, float]": _resources,
    "tuple[str, ...]": _strings,
}


class Row:
    """Base of the row classes: wire form, dict form, and a decoder checking every field."""

    __slots__ = ()
    _checks: ClassVar[tuple[tuple[str, Callable[[Any], Any]], ...]] = ()
    _required: ClassVar[int] = 0

    @classmethod
    def _prepare(cls) -> None:
        checks = []
        required = 0
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if annotation not in _CHECKS:
                raise TypeError(f"{cls.__name__}.{f.name}: no wire check for {annotation!r}")
            checks.append((f.name, _CHECKS[annotation]))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required += 1
        cls._checks = tuple(checks)
        cls._required = required

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(name for name, _ in cls._checks)

    def to_wire(self) -> list[Any]:
        out: list[Any] = []
        for name, _ in self._checks:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            out.append(value)
        return out

    @classmethod
    def from_wire(cls, data: Any) -> Any:
        if not isinstance(data, (list, tuple)) or len(data) < cls._required:
            raise ReportDecodeError(f"{cls.__name__}: expected an array of its fields")
        kwargs = {}
        for (name, check), value in zip(cls._checks, data):
            try:
                kwargs[name] = check(value)
            except TypeError as exc:
                raise ReportDecodeError(f"{cls.__name__}.{name} must be {exc}") from None
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, _ in self._checks:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def __getitem__(self, key: str) -> Any:  # Ray's state rows read like dicts too
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


@dataclass(frozen=True, slots=True)
class NodeRow(Row):
    """One node of the mesh as a node sees it."""

    node_id: str
    node_name: str = ""  # host name (or what the node was named)
    state: str = NodeStateName.ALIVE.value
    is_self: bool = False  # the node the snapshot was taken from
    role: str = "worker"  # "driver" for a driver's embedded node
    addrs: tuple[str, ...] = ()
    reachability: str = "unknown"  # public / private / unknown
    resources_total: dict[str, float] = field(default_factory=dict)
    resources_used: dict[str, float] = field(default_factory=dict)
    tasks_running: int = 0
    tasks_queued: int = 0
    tasks_finished: int = 0  # since the node started
    tasks_failed: int = 0
    actors: int = 0
    objects: int = 0
    object_store_bytes: int = 0
    object_store_capacity: int = 0
    pid: int = 0
    start_time: float = 0.0  # unix seconds
    report_time: float = 0.0  # when this row was taken, by the node's clock
    stale: bool = False  # from the membership view only, not from the node itself


@dataclass(frozen=True, slots=True)
class LinkRow(Row):
    """A connection from one node to a peer."""

    src: str
    dst: str
    path: str = PathType.DIRECT.value
    transport: str = ""  # quic / tcp / unix / relay
    rtt_ms: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    remote_addr: str = ""


@dataclass(frozen=True, slots=True)
class TaskRow(Row):
    """A task or actor call, reported by the node that owns it or runs it."""

    task_id: str
    name: str = ""
    state: str = TaskStateName.PENDING_NODE_ASSIGNMENT.value
    type: str = "NORMAL_TASK"  # NORMAL_TASK / ACTOR_CREATION_TASK / ACTOR_TASK
    node_id: str = ""  # where it runs (or ran), "" while not placed
    owner_node_id: str = ""  # whose driver submitted it
    actor_id: str | None = None
    worker_pid: int | None = None
    attempt_number: int = 0
    submit_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class ActorRow(Row):
    """An actor hosted (or being created) on a node."""

    actor_id: str
    class_name: str = ""
    state: str = ActorStateName.PENDING_CREATION.value
    name: str | None = None
    ray_namespace: str = "default"
    node_id: str = ""
    pid: int | None = None
    num_restarts: int = 0
    is_detached: bool = False
    death_cause: str | None = None
    required_resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ObjectRow(Row):
    """An object a node owns or holds."""

    object_id: str
    node_id: str = ""
    object_size: int = 0
    cid: str | None = None  # content ID once known
    reference_type: str = "LOCAL_REFERENCE"  # LOCAL_REFERENCE / PINNED_IN_MEMORY / BORROWED
    task_status: str = "FINISHED"  # of the task producing it
    task_id: str | None = None
    spilled: bool = False


@dataclass(frozen=True, slots=True)
class TransferRow(Row):
    """An object moving between two nodes, seen from the node that fetches or sends it."""

    object_id: str
    node_id: str  # the reporting node
    peer: str = ""  # the other end ("" while providers are being found)
    direction: str = "in"  # in / out
    path: str = PathType.DIRECT.value
    bytes_done: int = 0
    bytes_total: int = 0
    start_time: float = 0.0


for _cls in (NodeRow, LinkRow, TaskRow, ActorRow, ObjectRow, TransferRow):
    _cls._prepare()


@dataclass(frozen=True, slots=True)
class NodeReport:
    """Everything one node reports about itself."""

    node: NodeRow
    links: tuple[LinkRow, ...] = ()
    tasks: tuple[TaskRow, ...] = ()
    actors: tuple[ActorRow, ...] = ()
    objects: tuple[ObjectRow, ...] = ()
    transfers: tuple[TransferRow, ...] = ()
    truncated: int = 0  # rows left out by the limit


_REPORT_PARTS: tuple[tuple[str, type[Row]], ...] = (
    ("links", LinkRow),
    ("tasks", TaskRow),
    ("actors", ActorRow),
    ("objects", ObjectRow),
    ("transfers", TransferRow),
)


def encode_report(report: NodeReport) -> bytes:
    parts: list[Any] = [REPORT_VERSION, report.node.to_wire()]
    for name, _ in _REPORT_PARTS:
        parts.append([row.to_wire() for row in getattr(report, name)])
    parts.append(report.truncated)
    return msgpack.packb(parts, use_bin_type=True)


def unpack_bounded(data: bytes, what: str, max_bytes: int, max_array: int, max_map: int) -> Any:
    """msgpack from the network, within its bounds (strings of at most MAX_STR, no binary)."""
    if len(data) > max_bytes:
        raise ReportDecodeError(f"{what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=0,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except Exception as exc:
        raise ReportDecodeError(f"{what} is not valid msgpack: {exc}") from None


def decode_report(data: bytes) -> NodeReport:
    """Parse a report from the network; every field is checked (ReportDecodeError)."""
    parts = unpack_bounded(data, "state report", MAX_REPORT_BYTES, MAX_ROWS, MAX_MAP)
    if not isinstance(parts, list) or len(parts) < 2 + len(_REPORT_PARTS) + 1:
        raise ReportDecodeError("state report must be an array of its parts")
    if parts[0] != REPORT_VERSION:
        raise ReportDecodeError(f"state report version {parts[0]!r} is not {REPORT_VERSION}")
    kwargs: dict[str, Any] = {"node": NodeRow.from_wire(parts[1])}
    for index, (name, cls) in enumerate(_REPORT_PARTS, start=2):
        rows = parts[index]
        if not isinstance(rows, list):
            raise ReportDecodeError(f"state report {name} must be an array")
        kwargs[name] = tuple(cls.from_wire(r) for r in rows)
    truncated = parts[2 + len(_REPORT_PARTS)]
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise ReportDecodeError("state report truncated count must be a non-negative integer")
    kwargs["truncated"] = truncated
    return NodeReport(**kwargs)


@runtime_checkable
class StateSource(Protocol):
    """What the state API, the CLI and the dashboard need from a node."""

    @property
    def node_id(self) -> str: ...

    def local_report(self, limit: int = DEFAULT_ROW_LIMIT) -> NodeReport:
        """This node's own rows (at most ``limit`` of each kind); cheap, no I/O."""
        ...

    def member_rows(self) -> list[NodeRow]:
        """Rows (``stale=True``) for the other members this node knows of."""
        ...

    async def remote_report(self, node_id: str, limit: int, timeout: float) -> NodeReport:
        """Another member's report over the members-only state RPC; raises on failure."""
        ...
