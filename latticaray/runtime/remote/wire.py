"""The messages of the runtime's mesh protocols, typed; msgpack only at the edge.

Every message of `/latticaray/task/1`, `/admit/1`, `/runtime-view/1`, `/object/1`, `/names/1`,
`/ref/1` and `/latticaray/stream/1` (docs/protocol/runtime.md) is a frozen, slotted dataclass
here. A sender builds one and calls ``encode()`` (or ``to_wire()`` for the msgpack-ready map); a
receiver calls the protocol's ``decode_*`` function on the bytes it got, which checks every field
(type, presence, size) and returns the typed message, or raises `WireError` (an `RpcError` with
status INVALID_ARGUMENT, and a ValueError) naming what is wrong. Handlers then ``match`` on the
message's class. Constructors do not validate: messages built by this node are trusted, bytes
from a peer are not.

The encodings are the maps the runtime has always sent: the same keys, in the same order, with
the same msgpack types, so nodes with and without this module interoperate. A decoder ignores
keys it does not know (a newer peer may add some); an unknown task-session kind raises
`UnknownKind`, which a session skips (older executors skip kinds they do not know too).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias

import msgpack

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status
from latticaray.runtime.ids import OBJECT_ID_LEN, TASK_ID_LEN

ADMIT_PROTOCOL: Final = "/latticaray/admit/1"
RENEW_PROTOCOL: Final = "/latticaray/renew/1"
VIEW_PROTOCOL: Final = "/latticaray/runtime-view/1"
TASK_PROTOCOL: Final = "/latticaray/task/1"
OBJECT_PROTOCOL: Final = "/latticaray/object/1"
NAMES_PROTOCOL: Final = "/latticaray/names/1"
REF_PROTOCOL: Final = "/latticaray/ref/1"
STREAM_PROTOCOL: Final = "/latticaray/stream/1"

#: Values up to this size travel inline (in `done`/`yield`); larger ones as `part` chunks of it.
CHUNK: Final = 4 << 20
#: The largest message the RPC layer carries (RpcLimits.max_frame_size).
MAX_FRAME: Final = 16 << 20
#: Unary control requests (`ref`, `names`, `stream`) are refused above this size unread.
MAX_CONTROL_MESSAGE: Final = 1 << 20
MAX_ADMIT_REQUEST: Final = 4096
MAX_CREDENTIAL: Final = 2048
MAX_MANIFEST: Final = 2 << 20  # a store object's manifest block (objectstore.manifest)
MAX_REF_OPS: Final = 65536
#: Bounds of single fields: task/actor/method/namespace names, node ids, CIDs, code hashes,
#: lists (returns, CIDs, refs), option maps, exception class names, view contents.
MAX_NAME: Final = 4096
MAX_NODE_ID: Final = 256
MAX_CID: Final = 256
MAX_CODE_HASH: Final = 64
MAX_LIST: Final = 1 << 20
MAX_OPTS: Final = 1024
MAX_MRO: Final = 1024
MAX_REASON: Final = 64 << 10
MAX_RESOURCES: Final = 1024
MAX_VIEW_PEERS: Final = 65536
MAX_ADDRS: Final = 256
MAX_ADDR: Final = 1024
MAX_VIEW_NAMES: Final = 65536
MAX_INCARNATION: Final = 64  # a view's `inc`

BORROW: Final = 1
UNBORROW: Final = 0

#: Task arguments as the wire carries them: ``["b", bytes]`` or ``["l", [arg...], {name: arg}]``
#: with ``arg`` = ``[0, value]``, ``[0, store ref, object id, owner(, holder)]`` or
#: ``[1, object id, owner]``. Kept as the msgpack lists: the caller names store references by
#: CID in place just before sending, the executor replaces fetched ones in place.
WireArgs: TypeAlias = list[Any]
#: Options of a task or actor (a msgpack map with string keys, read by the node).
WireOpts: TypeAlias = dict[str, Any]
#: A reference pickled inside a value: ``[object id, owner node]``.
InnerRef: TypeAlias = list[Any]
#: A `part`'s slot: a result's index, or ``("y", index)`` for a streamed item.
Slot: TypeAlias = int | tuple[str, int]


class WireError(RpcError, ValueError):
    """A peer's message is malformed: not msgpack, not a map, a key missing, a field of the
    wrong type or over its bound. Raised from a handler, the RPC layer answers the caller
    with status INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.INVALID_ARGUMENT, message)


class UnknownKind(WireError):
    """A task-session message of a kind this node does not know (a newer peer's): skipped."""

    def __init__(self, kind: object) -> None:
        super().__init__(f"unknown task session message kind {kind!r}")
        self.kind = kind


# --------------------------------------------------------------------------- field checks
def _describe(value: object) -> str:
    if isinstance(value, (bytes, str, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _bad(m: dict[Any, Any], key: str, where: str, expected: str) -> WireError:
    if key not in m:
        return WireError(f"{where} message has no {key!r}")
    return WireError(f"{where} message: {key!r} must be {expected}, not {_describe(m[key])}")


def _unpack_map(data: bytes, where: str) -> dict[Any, Any]:
    """A msgpack map (keys must be strings or bytes: every map of these protocols has string
    keys; the size of the data bounds every container in it)."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, TypeError, ExtraData, StackError...
        raise WireError(f"{where} message is not valid msgpack: {exc}") from None
    if type(message) is not dict:
        raise WireError(f"{where} message must be a msgpack map, not {_describe(message)}")
    return message


def _id(m: dict[Any, Any], key: str, where: str, size: int = TASK_ID_LEN) -> bytes:
    value = m.get(key)
    if type(value) is bytes and len(value) == size:
        return value
    raise _bad(m, key, where, f"{size} bytes")


def _bin(m: dict[Any, Any], key: str, where: str, limit: int) -> bytes:
    value = m.get(key)
    if type(value) is bytes and len(value) <= limit:
        return value
    raise _bad(m, key, where, f"bytes of at most {limit}")


def _opt_bin(m: dict[Any, Any], key: str, where: str, limit: int) -> bytes | None:
    value = m.get(key)
    if value is None or (type(value) is bytes and len(value) <= limit):
        return value
    raise _bad(m, key, where, f"nil or bytes of at most {limit}")


def _str(m: dict[Any, Any], key: str, where: str, limit: int) -> str:
    value = m.get(key)
    if type(value) is str and len(value) <= limit:
        return value
    raise _bad(m, key, where, f"a string of at most {limit} characters")


def _opt_str(m: dict[Any, Any], key: str, where: str, limit: int) -> str | None:
    value = m.get(key)
    if value is None or (type(value) is str and len(value) <= limit):
        return value
    raise _bad(m, key, where, f"nil or a string of at most {limit} characters")


def _int(m: dict[Any, Any], key: str, where: str, low: int, high: int) -> int:
    value = m.get(key)
    if type(value) is int and low <= value <= high:
        return value
    raise _bad(m, key, where, f"an integer in [{low}, {high}]")


def _flag(m: dict[Any, Any], key: str, where: str, default: bool) -> bool:
    """A boolean; an absent key or nil is ``default``. Integers are read as truth values
    (a flag a user passed as 0/1 travels as an integer)."""
    value = m.get(key)
    if value is None:
        return default
    if type(value) is bool or type(value) is int:
        return bool(value)
    raise _bad(m, key, where, "a boolean")


def _number(m: dict[Any, Any], key: str, where: str, optional: bool) -> float | int | None:
    value = m.get(key)
    if value is None and optional:
        return None
    if (type(value) is float and math.isfinite(value)) or type(value) is int:
        return value
    raise _bad(m, key, where, "nil or a finite number" if optional else "a finite number")


def _map(m: dict[Any, Any], key: str, where: str, limit: int) -> dict[str, Any]:
    value = m.get(key)
    if type(value) is dict and len(value) <= limit and all(type(k) is str for k in value):
        return value
    raise _bad(m, key, where, f"a map of at most {limit} string keys")


def _opt_map(m: dict[Any, Any], key: str, where: str, limit: int) -> dict[str, Any] | None:
    if m.get(key) is None:
        return None
    return _map(m, key, where, limit)


def _body(message: dict[Any, Any], where: str) -> dict[Any, Any]:
    body = message.get("m")
    if type(body) is dict:
        return body
    raise _bad(message, "m", where, "a map")


def _is_ref(ref: object) -> bool:
    return (
        type(ref) is list
        and len(ref) == 2
        and type(ref[0]) is bytes
        and len(ref[0]) == OBJECT_ID_LEN
        and type(ref[1]) is str
        and len(ref[1]) <= MAX_NODE_ID
    )


def _refs(m: dict[Any, Any], key: str, where: str) -> list[InnerRef] | None:
    """``[[object id, owner], ...]`` or absent."""
    value = m.get(key)
    if value is None:
        return None
    if type(value) is list and len(value) <= MAX_LIST and all(_is_ref(r) for r in value):
        return value
    raise _bad(m, key, where, "[[object id, owner node], ...]")


def _is_arg(item: object) -> bool:
    if type(item) is not list or not item:
        return False
    size = len(item)
    if item[0] == 0 and type(item[0]) is int:
        if size == 2:
            return type(item[1]) is bytes and len(item[1]) <= MAX_FRAME
        return (
            4 <= size <= 5
            and type(item[1]) is bytes
            and len(item[1]) <= MAX_FRAME
            and type(item[2]) is bytes
            and len(item[2]) == OBJECT_ID_LEN
            and type(item[3]) is str
            and len(item[3]) <= MAX_NODE_ID
            and (size == 4 or (type(item[4]) is str and len(item[4]) <= MAX_NODE_ID))
        )
    return (
        item[0] == 1
        and type(item[0]) is int
        and size == 3
        and type(item[1]) is bytes
        and len(item[1]) == OBJECT_ID_LEN
        and type(item[2]) is str
        and len(item[2]) <= MAX_NODE_ID
    )


def _args(m: dict[Any, Any], where: str) -> WireArgs:
    args = m.get("args")
    if type(args) is list and args:
        tag = args[0]
        if tag == "b":
            if len(args) == 2 and type(args[1]) is bytes and len(args[1]) <= MAX_FRAME:
                return args
        elif (
            tag == "l"
            and len(args) == 3
            and type(args[1]) is list
            and type(args[2]) is dict
            and len(args[1]) + len(args[2]) <= MAX_LIST
            and all(_is_arg(item) for item in args[1])
            and all(
                type(k) is str and len(k) <= MAX_NAME and _is_arg(v) for k, v in args[2].items()
            )
        ):
            return args
    raise _bad(m, "args", where, '["b", bytes] or ["l", [argument...], {name: argument}]')


def _checked(
    message: dict[Any, Any], key: str, where: str, ok: Callable[[Any], bool], expected: str
) -> Any:
    value = message.get(key)
    if ok(value):
        return value
    raise _bad(message, key, where, expected)


_packers = threading.local()


def _pack(obj: object) -> bytes:
    """msgpack with bin types, by one Packer per thread (packb would make one per message)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


class _Message:
    """What every message does: ``to_wire()`` gives its msgpack-ready map, ``encode()`` the
    bytes."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self) -> bytes:
        return _pack(self.to_wire())


# =========================================================================== /latticaray/task/1
# caller -> executor ---------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class SubmitTask(_Message):
    """``task``: run a task here. ``opts.placed`` is set (no re-placement); ``blob`` is the
    cloudpickled function the first time its hash goes to this peer; ``again``: sent again
    after the session broke or moved (deduplicated); ``got``: items a re-sent stream's caller
    has already."""

    KIND: ClassVar[str] = "task"
    tid: bytes
    fn: bytes
    name: str
    nret: int
    args: WireArgs
    opts: WireOpts
    blob: bytes | None = None
    again: bool = False
    got: int | None = None

    def body(self) -> dict[str, Any]:
        """The task's map (``m``), the form the node's submit path reads."""
        m: dict[str, Any] = {
            "tid": self.tid,
            "fn": self.fn,
            "name": self.name,
            "nret": self.nret,
            "args": self.args,
            "opts": self.opts,
        }
        if self.blob is not None:
            m["blob"] = self.blob
        if self.again:
            m["again"] = True
        if self.got is not None:
            m["got"] = self.got
        return m

    def to_wire(self) -> dict[str, Any]:
        return {"k": "task", "m": self.body()}

    @classmethod
    def from_wire(cls, message: dict[Any, Any]) -> SubmitTask:
        # checks written out: this is the hot path of remote tasks
        m = _body(message, "task")
        tid, fn, name, nret = m.get("tid"), m.get("fn"), m.get("name"), m.get("nret")
        opts, blob, got = m.get("opts"), m.get("blob"), m.get("got")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "task", f"{TASK_ID_LEN} bytes")
        if type(fn) is not bytes or len(fn) > MAX_CODE_HASH:
            raise _bad(m, "fn", "task", "a code hash")
        if type(name) is not str or len(name) > MAX_NAME:
            raise _bad(m, "name", "task", f"a string of at most {MAX_NAME} characters")
        if type(nret) is not int or not -1 <= nret <= MAX_LIST:
            raise _bad(m, "nret", "task", f"an integer in [-1, {MAX_LIST}]")
        if type(opts) is not dict or len(opts) > MAX_OPTS:
            raise _bad(m, "opts", "task", f"a map of at most {MAX_OPTS} options")
        if blob is not None and (type(blob) is not bytes or len(blob) > MAX_FRAME):
            raise _bad(m, "blob", "task", "nil or bytes")
        if got is not None and (type(got) is not int or got < 0):
            raise _bad(m, "got", "task", "a non-negative integer")
        return cls(
            tid, fn, name, nret, _args(m, "task"), opts, blob, _flag(m, "again", "task", False), got
        )


@dataclass(slots=True, frozen=True)
class CreateActor(_Message):
    """``create``: host an actor here. ``owner`` is the creating node (the host kills a
    non-detached actor when its owner leaves); ``blob`` the cloudpickled class, first time."""

    KIND: ClassVar[str] = "create"
    aid: bytes
    cls: bytes
    cname: str
    opts: WireOpts
    args: WireArgs
    owner: str
    blob: bytes | None = None

    def body(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "aid": self.aid,
            "cls": self.cls,
            "cname": self.cname,
            "opts": self.opts,
            "args": self.args,
            "owner": self.owner,
        }
        if self.blob is not None:
            m["blob"] = self.blob
        return m

    def to_wire(self) -> dict[str, Any]:
        return {"k": "create", "m": self.body()}

    @classmethod
    def from_wire(cls, message: dict[Any, Any]) -> CreateActor:
        m = _body(message, "create")
        return cls(
            _id(m, "aid", "create"),
            _bin(m, "cls", "create", MAX_CODE_HASH),
            _str(m, "cname", "create", MAX_NAME),
            _map(m, "opts", "create", MAX_OPTS),
            _args(m, "create"),
            _str(m, "owner", "create", MAX_NODE_ID),
            _opt_bin(m, "blob", "create", MAX_FRAME),
        )


@dataclass(slots=True, frozen=True)
class CallActor(_Message):
    """``acall``: call method ``m`` of a hosted actor (``again`` as for `SubmitTask`)."""

    KIND: ClassVar[str] = "acall"
    tid: bytes
    aid: bytes
    m: str
    nret: int
    name: str
    args: WireArgs
    again: bool = False

    def body(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "tid": self.tid,
            "aid": self.aid,
            "m": self.m,
            "nret": self.nret,
            "name": self.name,
            "args": self.args,
        }
        if self.again:
            m["again"] = True
        return m

    def to_wire(self) -> dict[str, Any]:
        return {"k": "acall", "m": self.body()}

    @classmethod
    def from_wire(cls, message: dict[Any, Any]) -> CallActor:
        m = _body(message, "acall")
        tid, aid, method, nret, name = (
            m.get("tid"),
            m.get("aid"),
            m.get("m"),
            m.get("nret"),
            m.get("name"),
        )
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "acall", f"{TASK_ID_LEN} bytes")
        if type(aid) is not bytes or len(aid) != TASK_ID_LEN:
            raise _bad(m, "aid", "acall", f"{TASK_ID_LEN} bytes")
        if type(method) is not str or len(method) > MAX_NAME:
            raise _bad(m, "m", "acall", f"a string of at most {MAX_NAME} characters")
        if type(nret) is not int or not -1 <= nret <= MAX_LIST:
            raise _bad(m, "nret", "acall", f"an integer in [-1, {MAX_LIST}]")
        if type(name) is not str or len(name) > MAX_NAME:
            raise _bad(m, "name", "acall", f"a string of at most {MAX_NAME} characters")
        return cls(
            tid, aid, method, nret, name, _args(m, "acall"), _flag(m, "again", "acall", False)
        )


@dataclass(slots=True, frozen=True)
class CancelTask(_Message):
    """``cancel``: cancel a task (``force`` kills its worker)."""

    KIND: ClassVar[str] = "cancel"
    tid: bytes
    force: bool

    def to_wire(self) -> dict[str, Any]:
        return {"k": "cancel", "tid": self.tid, "force": self.force}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> CancelTask:
        return cls(_id(m, "tid", "cancel"), _flag(m, "force", "cancel", False))


@dataclass(slots=True, frozen=True)
class AckItems(_Message):
    """``ack``: the streaming task's consumer took ``n`` items (backpressure credit)."""

    KIND: ClassVar[str] = "ack"
    tid: bytes
    n: int

    def to_wire(self) -> dict[str, Any]:
        return {"k": "ack", "tid": self.tid, "n": self.n}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> AckItems:
        tid, n = m.get("tid"), m.get("n")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "ack", f"{TASK_ID_LEN} bytes")
        if type(n) is not int or n < 0:
            raise _bad(m, "n", "ack", "a non-negative integer")
        return cls(tid, n)


@dataclass(slots=True, frozen=True)
class RefsHeld(_Message):
    """``held``: the caller counts the refs inside that task's results (``tid`` a task id), or
    inside one streamed item (``tid`` the item's object id): the executor lets go of them."""

    KIND: ClassVar[str] = "held"
    tid: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"k": "held", "tid": self.tid}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> RefsHeld:
        tid = m.get("tid")
        if type(tid) is not bytes or (len(tid) != TASK_ID_LEN and len(tid) != OBJECT_ID_LEN):
            raise _bad(m, "tid", "held", "a task or object id")
        return cls(tid)


@dataclass(slots=True, frozen=True)
class KillActor(_Message):
    """``kill``: kill a hosted actor (``no_restart``: for good)."""

    KIND: ClassVar[str] = "kill"
    aid: bytes
    no_restart: bool

    def to_wire(self) -> dict[str, Any]:
        return {"k": "kill", "aid": self.aid, "no_restart": self.no_restart}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> KillActor:
        return cls(_id(m, "aid", "kill"), _flag(m, "no_restart", "kill", True))


def _cid_list(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_LIST
        and all(type(c) is str and len(c) <= MAX_CID for c in value)
    )


@dataclass(slots=True, frozen=True)
class ResultsFetched(_Message):
    """``fetched``: the executor need not keep these store results for the caller any more."""

    KIND: ClassVar[str] = "fetched"
    cids: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"k": "fetched", "cids": self.cids}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> ResultsFetched:
        return cls(_checked(m, "cids", "fetched", _cid_list, "a list of CIDs"))


@dataclass(slots=True, frozen=True)
class Fence(_Message):
    """``fence``: the caller moves to a new session; answer `Fenced` once every earlier
    message of this session has been dispatched."""

    KIND: ClassVar[str] = "fence"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "fence"}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> Fence:
        return cls()


# executor -> caller ---------------------------------------------------------------------------
def _mro(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_MRO
        and all(type(n) is str and len(n) <= MAX_NAME for n in value)
    )


def _inner_per_result(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_LIST
        and all(
            r is None or (type(r) is list and len(r) <= MAX_LIST and all(_is_ref(x) for x in r))
            for r in value
        )
    )


@dataclass(slots=True, frozen=True)
class TaskDone(_Message):
    """``done``: a task's results (``vals``; an entry is nil when the value came as `part`s)
    or its error (``err``, a pickled exception, with its class names ``mro``). ``inner``: per
    result, the refs pickled inside it, held by the executor until `RefsHeld`. ``mro`` goes
    with ``err`` only. A streaming
    task's ``done`` carries neither (its items came as `YieldItem`s) unless it failed."""

    KIND: ClassVar[str] = "done"
    tid: bytes
    vals: list[bytes | None] | None = None
    err: bytes | None = None
    mro: list[str] | None = None
    inner: list[list[InnerRef] | None] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": "done", "tid": self.tid}
        if self.err is not None:
            out["err"] = self.err
            if self.mro is not None:
                out["mro"] = self.mro
        if self.vals is not None:
            out["vals"] = self.vals
        if self.inner is not None:
            out["inner"] = self.inner
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> TaskDone:
        tid, vals, err, inner = m.get("tid"), m.get("vals"), m.get("err"), m.get("inner")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "done", f"{TASK_ID_LEN} bytes")
        if vals is not None:
            if type(vals) is not list or len(vals) > MAX_LIST:
                raise _bad(m, "vals", "done", "a list of values")
            for v in vals:
                if v is not None and (type(v) is not bytes or len(v) > CHUNK):
                    raise _bad(m, "vals", "done", f"a list of nil or bytes of at most {CHUNK}")
        mro = None
        if err is not None:
            if type(err) is not bytes or len(err) > MAX_FRAME:
                raise _bad(m, "err", "done", "nil or bytes (a pickled exception)")
            mro = m.get("mro")
            if mro is not None and not _mro(mro):
                raise _bad(m, "mro", "done", "a list of class names")
        if inner is not None and not _inner_per_result(inner):
            raise _bad(m, "inner", "done", "a list per result of [[object id, owner], ...]")
        return cls(tid, vals, err, mro, inner)


@dataclass(slots=True, frozen=True)
class YieldItem(_Message):
    """``yield``: item ``i`` of a streaming task (``d`` nil when it came as `part`s), with the
    refs pickled inside it (``inner``), held by the executor until `RefsHeld` of the item."""

    KIND: ClassVar[str] = "yield"
    tid: bytes
    i: int
    d: bytes | None
    inner: list[InnerRef] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": "yield", "tid": self.tid, "i": self.i, "d": self.d}
        if self.inner is not None:
            out["inner"] = self.inner
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> YieldItem:
        tid, i, d = m.get("tid"), m.get("i"), m.get("d")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "yield", f"{TASK_ID_LEN} bytes")
        if type(i) is not int or i < 0:
            raise _bad(m, "i", "yield", "a non-negative integer")
        if d is not None and (type(d) is not bytes or len(d) > CHUNK):
            raise _bad(m, "d", "yield", f"nil or bytes of at most {CHUNK}")
        return cls(tid, i, d, None if m.get("inner") is None else _refs(m, "inner", "yield"))


def _slot(value: object) -> Slot | None:
    """A part's slot as the caller keys it (``["y", i]`` as a tuple), or None if malformed."""
    if type(value) is int:
        return value if 0 <= value <= MAX_LIST else None
    if (
        type(value) is list
        and len(value) == 2
        and value[0] == "y"
        and type(value[1]) is int
        and value[1] >= 0
    ):
        return ("y", value[1])
    return None


@dataclass(slots=True, frozen=True)
class ValuePart(_Message):
    """``part``: a chunk of a large value, in order; the `TaskDone` (``slot`` = result index)
    or `YieldItem` (``slot`` = ``("y", index)``) that follows has nil in its place."""

    KIND: ClassVar[str] = "part"
    tid: bytes
    slot: Slot
    d: bytes | memoryview

    def to_wire(self) -> dict[str, Any]:
        return {"k": "part", "tid": self.tid, "slot": self.slot, "d": self.d}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> ValuePart:
        tid, slot, d = m.get("tid"), _slot(m.get("slot")), m.get("d")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise _bad(m, "tid", "part", f"{TASK_ID_LEN} bytes")
        if slot is None:
            raise _bad(m, "slot", "part", 'a result index or ["y", item index]')
        if type(d) is not bytes or len(d) > CHUNK:
            raise _bad(m, "d", "part", f"bytes of at most {CHUNK}")
        return cls(tid, slot, d)


@dataclass(slots=True, frozen=True)
class ActorCreated(_Message):
    """``created``: the answer to `CreateActor`; ``error`` a pickled exception if it failed."""

    KIND: ClassVar[str] = "created"
    aid: bytes
    error: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"k": "created", "aid": self.aid, "error": self.error}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> ActorCreated:
        return cls(_id(m, "aid", "created"), _opt_bin(m, "error", "created", MAX_FRAME))


@dataclass(slots=True, frozen=True)
class Fenced(_Message):
    """``fenced``: every message sent before the `Fence` has been dispatched."""

    KIND: ClassVar[str] = "fenced"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "fenced"}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> Fenced:
        return cls()


@dataclass(slots=True, frozen=True)
class WorkerOutput(_Message):
    """``log``: lines the worker running one of the caller's tasks printed (an encoded
    ``latticaray.observe.logs.LogBatch``). Sent on the session before that task's `TaskDone`,
    so the caller shows a task's output before its result (Ray's ``log_to_driver``)."""

    KIND: ClassVar[str] = "log"
    b: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"k": "log", "b": self.b}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> WorkerOutput:
        b = m.get("b")
        if type(b) is not bytes or len(b) > MAX_CONTROL_MESSAGE:
            raise _bad(m, "b", "log", f"bytes of at most {MAX_CONTROL_MESSAGE}")
        return cls(b)


TaskRequest: TypeAlias = (
    SubmitTask
    | CreateActor
    | CallActor
    | CancelTask
    | AckItems
    | RefsHeld
    | KillActor
    | ResultsFetched
    | Fence
)
TaskReply: TypeAlias = TaskDone | YieldItem | ValuePart | ActorCreated | Fenced | WorkerOutput

#: The dispatch tables: kind -> decoder of a caller's message, and of an executor's.
TASK_REQUEST_KINDS: Final[dict[str, Callable[[dict[Any, Any]], TaskRequest]]] = {
    "task": SubmitTask.from_wire,
    "create": CreateActor.from_wire,
    "acall": CallActor.from_wire,
    "cancel": CancelTask.from_wire,
    "ack": AckItems.from_wire,
    "held": RefsHeld.from_wire,
    "kill": KillActor.from_wire,
    "fetched": ResultsFetched.from_wire,
    "fence": Fence.from_wire,
}
TASK_REPLY_KINDS: Final[dict[str, Callable[[dict[Any, Any]], TaskReply]]] = {
    "done": TaskDone.from_wire,
    "yield": YieldItem.from_wire,
    "part": ValuePart.from_wire,
    "created": ActorCreated.from_wire,
    "fenced": Fenced.from_wire,
    "log": WorkerOutput.from_wire,
}


def decode_task_request(data: bytes) -> TaskRequest:
    """A caller's task-session message (executor side). Raises `UnknownKind` for a kind this
    node does not know (skip it), `WireError` for a malformed message."""
    message = _unpack_map(data, "task session")
    kind: Any = message.get("k")
    try:
        decode = TASK_REQUEST_KINDS[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        raise UnknownKind(kind) from None
    return decode(message)


def decode_task_reply(data: bytes) -> TaskReply:
    """An executor's task-session message (caller side); errors as `decode_task_request`."""
    message = _unpack_map(data, "task session")
    kind: Any = message.get("k")
    try:
        decode = TASK_REPLY_KINDS[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        raise UnknownKind(kind) from None
    return decode(message)


# ========================================================================== /latticaray/admit/1
@dataclass(slots=True, frozen=True)
class Admit(_Message):
    """A membership credential (``lrc1.…``), the request and its reply alike (admit/1, and
    renew/1: the current credential, answered with the renewed one). ``iss`` (in an admit
    reply): the answering node holds the mesh key, so it renews credentials."""

    cred: str
    iss: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"cred": self.cred, "iss": True} if self.iss else {"cred": self.cred}


def decode_admit(data: bytes) -> Admit:
    """An admission request or reply: at most 4 KiB, a map whose ``cred`` is a string."""
    if len(data) > MAX_ADMIT_REQUEST:
        raise WireError(f"admission message of {len(data)} bytes exceeds {MAX_ADMIT_REQUEST}")
    message = _unpack_map(data, "admission")
    return Admit(_str(message, "cred", "admission", MAX_CREDENTIAL), message.get("iss") is True)


# ===================================================================== /latticaray/runtime-view/1
@dataclass(slots=True, frozen=True)
class NameRecord(_Message):
    """A named actor's record at its name's arbiter: ``node`` its host (nil while the claim is
    pending placement), ``owner`` the claimant. ``wait_s`` (the claimant's placement wait) is
    kept once a claim was pending."""

    aid: bytes
    node: str | None
    owner: str
    meta: dict[str, Any] | None
    detached: bool
    pending: bool = False
    wait_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "aid": self.aid,
            "node": self.node,
            "owner": self.owner,
            "meta": self.meta,
            "detached": self.detached,
        }
        if self.pending:
            out["pending"] = True
        if self.pending or self.wait_s is not None:
            out["wait_s"] = self.wait_s
        return out

    @classmethod
    def from_wire(cls, m: object, where: str) -> NameRecord:
        if type(m) is not dict:
            raise WireError(f"{where}: a name record must be a map, not {_describe(m)}")
        wait_s = _number(m, "wait_s", where, optional=True)
        return cls(
            _id(m, "aid", where),
            _opt_str(m, "node", where, MAX_NODE_ID),
            _str(m, "owner", where, MAX_NODE_ID),
            _opt_map(m, "meta", where, MAX_OPTS),
            _flag(m, "detached", where, False),
            _flag(m, "pending", where, False),
            None if wait_s is None else float(wait_s),
        )


def _amounts(value: object) -> bool:
    return (
        type(value) is dict
        and len(value) <= MAX_RESOURCES
        and all(
            type(k) is str
            and len(k) <= MAX_NAME
            and (type(v) is int or (type(v) is float and math.isfinite(v)))
            for k, v in value.items()
        )
    )


def _peer_addrs(value: object) -> bool:
    return (
        type(value) is dict
        and len(value) <= MAX_VIEW_PEERS
        and all(
            type(k) is str
            and len(k) <= MAX_NODE_ID
            and type(v) is list
            and len(v) <= MAX_ADDRS
            and all(type(a) is str and len(a) <= MAX_ADDR for a in v)
            for k, v in value.items()
        )
    )


@dataclass(slots=True, frozen=True)
class RuntimeView(_Message):
    """A node's resources and load, the members it knows (``peers``: node id -> multiaddrs)
    and the named-actor records it arbitrates (pending ones left out), pushed every 0.3 s.
    ``inc``: the sending process's incarnation (a new one: it restarted under the same peer id);
    ``bye``: it is leaving the mesh (sent as it stops)."""

    total: dict[str, float]
    avail: dict[str, float]
    queued: int
    running: int
    peers: dict[str, list[str]]
    names: list[tuple[str, str, NameRecord]]
    inc: bytes | None = None
    bye: bool = False

    def to_wire(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "total": self.total,
            "avail": self.avail,
            "queued": self.queued,
            "running": self.running,
            "peers": self.peers,
            "names": [[ns, name, record.to_wire()] for ns, name, record in self.names],
        }
        if self.inc is not None:
            m["inc"] = self.inc
        if self.bye:
            m["bye"] = True
        return m


def decode_view(data: bytes) -> RuntimeView:
    m = _unpack_map(data, "runtime view")
    where = "runtime view"
    names = m.get("names")
    if type(names) is not list or len(names) > MAX_VIEW_NAMES:
        raise _bad(m, "names", where, "a list of [namespace, name, record]")
    records = []
    for entry in names:
        if not (
            type(entry) is list
            and len(entry) == 3
            and type(entry[0]) is str
            and len(entry[0]) <= MAX_NAME
            and type(entry[1]) is str
            and len(entry[1]) <= MAX_NAME
        ):
            raise WireError(f"{where}: names entries are [namespace, name, record]")
        records.append((entry[0], entry[1], NameRecord.from_wire(entry[2], where)))
    return RuntimeView(
        _checked(m, "total", where, _amounts, "a map of resource amounts"),
        _checked(m, "avail", where, _amounts, "a map of resource amounts"),
        _int(m, "queued", where, 0, 2**63 - 1),
        _int(m, "running", where, 0, 2**63 - 1),
        _checked(m, "peers", where, _peer_addrs, "a map of node id -> [multiaddr, ...]"),
        records,
        _opt_bin(m, "inc", where, MAX_INCARNATION),
        _flag(m, "bye", where, False),
    )


# ========================================================================= /latticaray/object/1
@dataclass(slots=True, frozen=True)
class ObjectById(_Message):
    """Ask an object's owner for it by object id (it waits until the object is sealed, and
    recovers a lost one). ``blocks``: a store object may come in its store form."""

    oid: bytes
    blocks: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"oid": self.oid, "blocks": True} if self.blocks else {"oid": self.oid}


@dataclass(slots=True, frozen=True)
class ObjectByCid(_Message):
    """Ask any holder for an object by CID. ``blocks``: a store object may come in its store
    form."""

    cid: str
    blocks: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"cid": self.cid, "blocks": True} if self.blocks else {"cid": self.cid}


@dataclass(slots=True, frozen=True)
class ObjectWhere(_Message):
    """A peer on this host (over the same-host Unix path) asks where the object lies: the
    reply is `ObjectPlace` naming this node's store, which the asker copies the object from
    (checking every block) instead of the bytes crossing a socket; else `ObjectMissing`. An
    older node takes it for `ObjectByCid` and sends the bytes: the asker then hangs up."""

    cid: str

    def to_wire(self) -> dict[str, Any]:
        return {"cid": self.cid, "where": True}


ObjectRequest: TypeAlias = ObjectById | ObjectByCid | ObjectWhere


def decode_object_request(data: bytes) -> ObjectRequest:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"object request of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = _unpack_map(data, "object request")
    blocks = m.get("blocks") is True
    if "oid" in m:
        return ObjectById(_id(m, "oid", "object request", OBJECT_ID_LEN), blocks)
    if m.get("where") is True:
        return ObjectWhere(_str(m, "cid", "object request", MAX_CID))
    return ObjectByCid(_str(m, "cid", "object request", MAX_CID), blocks)


@dataclass(slots=True, frozen=True)
class ObjectHeader(_Message):
    """The first frame of an object reply: status ``s`` (0 ok, 1 error: the bytes are a
    pickled exception) and the object's CID, then raw chunks of at most `CHUNK` adding up to
    ``size`` bytes. ``man`` (a store object in its store form, for a request with ``blocks``):
    the object's manifest block, whose CID is ``cid``; the chunks are then its payload, whose
    blocks the manifest names."""

    s: int
    size: int
    cid: str | None
    man: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"s": self.s, "size": self.size, "cid": self.cid}
        if self.man is not None:
            out["man"] = self.man
        return out


@dataclass(slots=True, frozen=True)
class ObjectMissing(_Message):
    """The object reply when this node does not have the object (and will not)."""

    why: str

    def to_wire(self) -> dict[str, Any]:
        return {"missing": True, "why": self.why}


@dataclass(slots=True, frozen=True)
class ObjectPlace(_Message):
    """The reply to `ObjectWhere`: the root directory of the store that holds the object."""

    root: str

    def to_wire(self) -> dict[str, Any]:
        return {"root": self.root}


def decode_object_header(data: bytes) -> ObjectHeader | ObjectMissing | ObjectPlace:
    m = _unpack_map(data, "object reply header")
    where = "object reply header"
    if m.get("missing"):
        why = m.get("why")
        return ObjectMissing(why[:MAX_REASON] if type(why) is str else "not found")
    if "root" in m:
        return ObjectPlace(_str(m, "root", where, MAX_ADDR))
    return ObjectHeader(
        _int(m, "s", where, 0, 1),
        _int(m, "size", where, 0, 2**63 - 1),
        _opt_str(m, "cid", where, MAX_CID),
        _opt_bin(m, "man", where, MAX_MANIFEST),
    )


# ========================================================================== /latticaray/names/1
@dataclass(slots=True, frozen=True)
class NameClaim(_Message):
    """Claim ``ns/name`` for actor ``aid`` at its arbiter. ``host`` nil with ``pending``: the
    creation waits for DHT capacity (up to ``wait_s``) and sends `NamePlaced` when placed."""

    OP: ClassVar[str] = "claim"
    ns: str
    name: str
    aid: bytes
    owner: str
    host: str | None
    meta: dict[str, Any] | None
    get_if_exists: bool
    detached: bool
    pending: bool = False
    wait_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "op": "claim",
            "ns": self.ns,
            "name": self.name,
            "aid": self.aid,
            "owner": self.owner,
            "host": self.host,
            "meta": self.meta,
            "get_if_exists": self.get_if_exists,
            "detached": self.detached,
        }
        if self.pending:
            out["pending"] = True
            out["wait_s"] = self.wait_s
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameClaim:
        wait_s = _number(m, "wait_s", "claim", optional=True)
        pending = _flag(m, "pending", "claim", False)
        return cls(
            _str(m, "ns", "claim", MAX_NAME),
            _str(m, "name", "claim", MAX_NAME),
            _id(m, "aid", "claim"),
            _str(m, "owner", "claim", MAX_NODE_ID),
            _opt_str(m, "host", "claim", MAX_NODE_ID),
            _opt_map(m, "meta", "claim", MAX_OPTS),
            _flag(m, "get_if_exists", "claim", False),
            _flag(m, "detached", "claim", False),
            pending,
            None if wait_s is None or not pending else float(wait_s),  # only read when pending
        )


@dataclass(slots=True, frozen=True)
class NameLookup(_Message):
    """The record of ``ns/name`` (answered with `NameLookupReply`)."""

    OP: ClassVar[str] = "lookup"
    ns: str
    name: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "lookup", "ns": self.ns, "name": self.name}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameLookup:
        return cls(_str(m, "ns", "lookup", MAX_NAME), _str(m, "name", "lookup", MAX_NAME))


@dataclass(slots=True, frozen=True)
class NameRelease(_Message):
    """Give the name back (if ``aid`` still holds it)."""

    OP: ClassVar[str] = "release"
    ns: str
    name: str
    aid: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": "release", "ns": self.ns, "name": self.name, "aid": self.aid}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameRelease:
        return cls(
            _str(m, "ns", "release", MAX_NAME),
            _str(m, "name", "release", MAX_NAME),
            _id(m, "aid", "release"),
        )


@dataclass(slots=True, frozen=True)
class NamePlaced(_Message):
    """A pending claim's actor found its host ``node``."""

    OP: ClassVar[str] = "placed"
    ns: str
    name: str
    aid: bytes
    node: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "ns": self.ns, "name": self.name, "aid": self.aid, "node": self.node}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NamePlaced:
        where = cls.OP
        return cls(
            _str(m, "ns", where, MAX_NAME),
            _str(m, "name", where, MAX_NAME),
            _id(m, "aid", where),
            _str(m, "node", where, MAX_NODE_ID),
        )


@dataclass(slots=True, frozen=True)
class NameMoved(_Message):
    """The owner restarted the named actor on ``node`` (its host died)."""

    OP: ClassVar[str] = "moved"
    ns: str
    name: str
    aid: bytes
    node: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "ns": self.ns, "name": self.name, "aid": self.aid, "node": self.node}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameMoved:
        where = cls.OP
        return cls(
            _str(m, "ns", where, MAX_NAME),
            _str(m, "name", where, MAX_NAME),
            _id(m, "aid", where),
            _str(m, "node", where, MAX_NODE_ID),
        )


@dataclass(slots=True, frozen=True)
class NameHosted(_Message):
    """Asked of the node hosting the actor: its method table (`NameHostedReply`)."""

    OP: ClassVar[str] = "hosted"
    ns: str
    name: str
    aid: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": "hosted", "ns": self.ns, "name": self.name, "aid": self.aid}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> NameHosted:
        return cls(
            _str(m, "ns", "hosted", MAX_NAME),
            _str(m, "name", "hosted", MAX_NAME),
            _id(m, "aid", "hosted"),
        )


NamesRequest: TypeAlias = NameClaim | NameLookup | NameRelease | NamePlaced | NameMoved | NameHosted

NAMES_OPS: Final[dict[str, Callable[[dict[Any, Any]], NamesRequest]]] = {
    "claim": NameClaim.from_wire,
    "lookup": NameLookup.from_wire,
    "release": NameRelease.from_wire,
    "placed": NamePlaced.from_wire,
    "moved": NameMoved.from_wire,
    "hosted": NameHosted.from_wire,
}


def decode_names_request(data: bytes) -> NamesRequest:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"names request of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = _unpack_map(data, "names request")
    op = m.get("op")
    decode = NAMES_OPS.get(op) if type(op) is str else None
    if decode is None:
        raise WireError(f"unknown names op {op!r}")
    return decode(m)


@dataclass(slots=True, frozen=True)
class NamesOk(_Message):
    """``{"ok": true}``: a claim granted; the answer to release, placed and moved too."""

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True}


@dataclass(slots=True, frozen=True)
class ClaimRefused(_Message):
    """A claim refused: the name is held (``existing``) for another actor by ``holder``."""

    existing: NameRecord
    holder: str

    def to_wire(self) -> dict[str, Any]:
        return {"ok": False, "existing": self.existing.to_wire(), "holder": self.holder}


@dataclass(slots=True, frozen=True)
class NameLookupReply(_Message):
    """The record of a name, or nil."""

    existing: NameRecord | None

    def to_wire(self) -> dict[str, Any]:
        return {"existing": None if self.existing is None else self.existing.to_wire()}


@dataclass(slots=True, frozen=True)
class NameHostedReply(_Message):
    """The hosted actor's method table; nil unless this node hosts that live actor under
    that name."""

    meta: dict[str, Any] | None

    def to_wire(self) -> dict[str, Any]:
        return {"meta": self.meta}


NamesReply: TypeAlias = NamesOk | ClaimRefused | NameLookupReply | NameHostedReply


def decode_names_reply(data: bytes) -> NamesReply:
    where = "names reply"
    m = _unpack_map(data, where)
    if "ok" in m:
        if m["ok"] is True:
            return NamesOk()
        return ClaimRefused(
            NameRecord.from_wire(m.get("existing"), where), _str(m, "holder", where, MAX_NODE_ID)
        )
    if "existing" in m:
        existing = m["existing"]
        return NameLookupReply(None if existing is None else NameRecord.from_wire(existing, where))
    if "meta" in m:
        return NameHostedReply(_opt_map(m, "meta", where, MAX_OPTS))
    raise WireError(f"{where} has none of 'ok', 'existing', 'meta': {sorted(map(str, m))}")


# ============================================================================ /latticaray/ref/1
def _ops(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_REF_OPS
        and all(
            type(op) is list
            and len(op) == 2
            and (op[0] == BORROW or op[0] == UNBORROW)
            and type(op[0]) is int
            and type(op[1]) is bytes
            and len(op[1]) == OBJECT_ID_LEN
            for op in value
        )
    )


@dataclass(slots=True, frozen=True)
class RefOps(_Message):
    """Borrow (`BORROW`) and unborrow (`UNBORROW`) registrations at an object's owner, in the
    order the borrower made them (at most `MAX_REF_OPS`). The reply is empty (no bytes)."""

    ops: list[list[Any]]

    def to_wire(self) -> dict[str, Any]:
        return {"ops": self.ops}


def decode_ref(data: bytes) -> RefOps:
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"reference update of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = _unpack_map(data, "reference update")
    return RefOps(_checked(m, "ops", "reference update", _ops, "[[0|1, object id], ...]"))


# ========================================================================= /latticaray/stream/1
@dataclass(slots=True, frozen=True)
class StreamNext(_Message):
    """Item ``i`` of a stream this node owns, waiting at most ``timeout`` s (the owner waits
    at most 20 s: the caller re-asks while it waits without a deadline)."""

    tid: bytes
    i: int
    timeout: float | None

    def to_wire(self) -> dict[str, Any]:
        return {"tid": self.tid, "i": self.i, "timeout": self.timeout}


def decode_stream_request(data: bytes) -> StreamNext:
    where = "stream request"
    if len(data) > MAX_CONTROL_MESSAGE:
        raise WireError(f"{where} of {len(data)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    m = _unpack_map(data, where)
    timeout = _number(m, "timeout", where, optional=True)
    return StreamNext(
        _id(m, "tid", where),
        _int(m, "i", where, 0, 2**63 - 1),
        None if timeout is None else float(timeout),
    )


@dataclass(slots=True, frozen=True)
class StreamItemRef(_Message):
    """The item: a borrow of object ``oid`` owned by ``owner``."""

    oid: bytes
    owner: str

    def to_wire(self) -> dict[str, Any]:
        return {"oid": self.oid, "owner": self.owner}


@dataclass(slots=True, frozen=True)
class StreamEnd(_Message):
    """The stream has no item ``i``: it ended before it."""

    def to_wire(self) -> dict[str, Any]:
        return {"end": True}


@dataclass(slots=True, frozen=True)
class StreamTimeout(_Message):
    """Item ``i`` did not come within the request's timeout."""

    def to_wire(self) -> dict[str, Any]:
        return {"timeout": True}


StreamReply: TypeAlias = StreamItemRef | StreamEnd | StreamTimeout


def decode_stream_reply(data: bytes) -> StreamReply:
    where = "stream reply"
    m = _unpack_map(data, where)
    if m.get("timeout"):
        return StreamTimeout()
    if m.get("end"):
        return StreamEnd()
    return StreamItemRef(_id(m, "oid", where, OBJECT_ID_LEN), _str(m, "owner", where, MAX_NODE_ID))
