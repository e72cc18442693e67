"""`/latticaray/task/1`: the task session between a caller node and an executor node (submit, actor
create/call, cancel, acks, refs held, kill, fences; done, rejected, yield, part, created, fenced, log),
and its decoders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias

from latticaray.runtime.ids import OBJECT_ID_LEN, TASK_ID_LEN

from .fields import (
    CHUNK,
    MAX_CID,
    MAX_CODE_HASH,
    MAX_CONTROL_MESSAGE,
    MAX_FRAME,
    MAX_LIST,
    MAX_MRO,
    MAX_NAME,
    MAX_NODE_ID,
    MAX_OPTS,
    MAX_REASON,
    InnerRef,
    Message,
    Slot,
    UnknownKind,
    WireArgs,
    WireOpts,
    bad_field,
    body_of,
    checked,
    field_args,
    field_bin,
    field_flag,
    field_id,
    field_int,
    field_map,
    field_opt_bin,
    field_opt_str,
    field_refs,
    field_str,
    is_amounts,
    is_ref,
    unpack_map,
)

#: the longest death cause a `kill` carries
MAX_KILL_CAUSE: Final = 512


# =========================================================================== /latticaray/task/1
# caller -> executor ---------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class SubmitTask(Message):
    """``task``: run a task here. ``opts.placed`` is set (no re-placement); ``blob`` is the
    cloudpickled function the first time its hash goes to this peer; ``again``: sent again
    after the session broke or moved (deduplicated); ``got``: items a re-sent stream's caller
    has already; ``spill``: the caller may be answered `rejected` (its placement was free, not
    bound to this node)."""

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
    spill: bool = False

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
        if self.spill:
            m["spill"] = True
        return m

    def to_wire(self) -> dict[str, Any]:
        return {"k": "task", "m": self.body()}

    @classmethod
    def from_wire(cls, message: dict[Any, Any]) -> SubmitTask:
        # checks written out: this is the hot path of remote tasks
        m = body_of(message, "task")
        tid, fn, name, nret = m.get("tid"), m.get("fn"), m.get("name"), m.get("nret")
        opts, blob, got = m.get("opts"), m.get("blob"), m.get("got")
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise bad_field(m, "tid", "task", f"{TASK_ID_LEN} bytes")
        if type(fn) is not bytes or len(fn) > MAX_CODE_HASH:
            raise bad_field(m, "fn", "task", "a code hash")
        if type(name) is not str or len(name) > MAX_NAME:
            raise bad_field(m, "name", "task", f"a string of at most {MAX_NAME} characters")
        if type(nret) is not int or not -1 <= nret <= MAX_LIST:
            raise bad_field(m, "nret", "task", f"an integer in [-1, {MAX_LIST}]")
        if type(opts) is not dict or len(opts) > MAX_OPTS:
            raise bad_field(m, "opts", "task", f"a map of at most {MAX_OPTS} options")
        if blob is not None and (type(blob) is not bytes or len(blob) > MAX_FRAME):
            raise bad_field(m, "blob", "task", "nil or bytes")
        if got is not None and (type(got) is not int or got < 0):
            raise bad_field(m, "got", "task", "a non-negative integer")
        return cls(
            tid,
            fn,
            name,
            nret,
            field_args(m, "task"),
            opts,
            blob,
            field_flag(m, "again", "task", False),
            got,
            field_flag(m, "spill", "task", False),
        )


@dataclass(slots=True, frozen=True)
class CreateActor(Message):
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
        m = body_of(message, "create")
        return cls(
            field_id(m, "aid", "create"),
            field_bin(m, "cls", "create", MAX_CODE_HASH),
            field_str(m, "cname", "create", MAX_NAME),
            field_map(m, "opts", "create", MAX_OPTS),
            field_args(m, "create"),
            field_str(m, "owner", "create", MAX_NODE_ID),
            field_opt_bin(m, "blob", "create", MAX_FRAME),
        )


@dataclass(slots=True, frozen=True)
class CallActor(Message):
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
        m = body_of(message, "acall")
        tid, aid, method, nret, name = (
            m.get("tid"),
            m.get("aid"),
            m.get("m"),
            m.get("nret"),
            m.get("name"),
        )
        if type(tid) is not bytes or len(tid) != TASK_ID_LEN:
            raise bad_field(m, "tid", "acall", f"{TASK_ID_LEN} bytes")
        if type(aid) is not bytes or len(aid) != TASK_ID_LEN:
            raise bad_field(m, "aid", "acall", f"{TASK_ID_LEN} bytes")
        if type(method) is not str or len(method) > MAX_NAME:
            raise bad_field(m, "m", "acall", f"a string of at most {MAX_NAME} characters")
        if type(nret) is not int or not -1 <= nret <= MAX_LIST:
            raise bad_field(m, "nret", "acall", f"an integer in [-1, {MAX_LIST}]")
        if type(name) is not str or len(name) > MAX_NAME:
            raise bad_field(m, "name", "acall", f"a string of at most {MAX_NAME} characters")
        return cls(
            tid,
            aid,
            method,
            nret,
            name,
            field_args(m, "acall"),
            field_flag(m, "again", "acall", False),
        )


@dataclass(slots=True, frozen=True)
class CancelTask(Message):
    """``cancel``: cancel a task (``force`` kills its worker)."""

    KIND: ClassVar[str] = "cancel"
    tid: bytes
    force: bool

    def to_wire(self) -> dict[str, Any]:
        return {"k": "cancel", "tid": self.tid, "force": self.force}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> CancelTask:
        return cls(field_id(m, "tid", "cancel"), field_flag(m, "force", "cancel", False))


@dataclass(slots=True, frozen=True)
class AckItems(Message):
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
            raise bad_field(m, "tid", "ack", f"{TASK_ID_LEN} bytes")
        if type(n) is not int or n < 0:
            raise bad_field(m, "n", "ack", "a non-negative integer")
        return cls(tid, n)


@dataclass(slots=True, frozen=True)
class RefsHeld(Message):
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
            raise bad_field(m, "tid", "held", "a task or object id")
        return cls(tid)


@dataclass(slots=True, frozen=True)
class KillActor(Message):
    """``kill``: kill a hosted actor (``no_restart``: for good; ``cause``: why, when it is not
    a kill() call, e.g. its owner reclaimed it: no handle is left)."""

    KIND: ClassVar[str] = "kill"
    aid: bytes
    no_restart: bool
    cause: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": "kill", "aid": self.aid, "no_restart": self.no_restart}
        if self.cause is not None:
            out["cause"] = self.cause
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> KillActor:
        return cls(
            field_id(m, "aid", "kill"),
            field_flag(m, "no_restart", "kill", True),
            field_opt_str(m, "cause", "kill", MAX_KILL_CAUSE),
        )


def _cid_list(value: object) -> bool:
    return (
        type(value) is list
        and len(value) <= MAX_LIST
        and all(type(c) is str and len(c) <= MAX_CID for c in value)
    )


@dataclass(slots=True, frozen=True)
class ResultsFetched(Message):
    """``fetched``: the executor need not keep these store results for the caller any more."""

    KIND: ClassVar[str] = "fetched"
    cids: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"k": "fetched", "cids": self.cids}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> ResultsFetched:
        return cls(checked(m, "cids", "fetched", _cid_list, "a list of CIDs"))


@dataclass(slots=True, frozen=True)
class Fence(Message):
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
            r is None or (type(r) is list and len(r) <= MAX_LIST and all(is_ref(x) for x in r))
            for r in value
        )
    )


@dataclass(slots=True, frozen=True)
class TaskDone(Message):
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
            raise bad_field(m, "tid", "done", f"{TASK_ID_LEN} bytes")
        if vals is not None:
            if type(vals) is not list or len(vals) > MAX_LIST:
                raise bad_field(m, "vals", "done", "a list of values")
            for v in vals:
                if v is not None and (type(v) is not bytes or len(v) > CHUNK):
                    raise bad_field(m, "vals", "done", f"a list of nil or bytes of at most {CHUNK}")
        mro = None
        if err is not None:
            if type(err) is not bytes or len(err) > MAX_FRAME:
                raise bad_field(m, "err", "done", "nil or bytes (a pickled exception)")
            mro = m.get("mro")
            if mro is not None and not _mro(mro):
                raise bad_field(m, "mro", "done", "a list of class names")
        if inner is not None and not _inner_per_result(inner):
            raise bad_field(m, "inner", "done", "a list per result of [[object id, owner], ...]")
        return cls(tid, vals, err, mro, inner)


@dataclass(slots=True, frozen=True)
class TaskRejected(Message):
    """``rejected``: the answer to a `SubmitTask` marked ``spill`` that found this node full
    (busy, and its caller's share of the bounded fair queue taken): it did not run and nothing
    of it is kept here. ``why`` says so; ``total``, ``avail``, ``queued``, ``running`` and
    ``qlimit`` are the node's view now, so the caller corrects its snapshot before it places the
    task again (spillback)."""

    KIND: ClassVar[str] = "rejected"
    tid: bytes
    why: str
    total: dict[str, float]
    avail: dict[str, float]
    queued: int
    running: int
    qlimit: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": "rejected",
            "tid": self.tid,
            "why": self.why,
            "total": self.total,
            "avail": self.avail,
            "queued": self.queued,
            "running": self.running,
        }
        if self.qlimit is not None:
            out["qlimit"] = self.qlimit
        return out

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> TaskRejected:
        where = "rejected"
        return cls(
            field_id(m, "tid", where),
            field_str(m, "why", where, MAX_REASON),
            checked(m, "total", where, is_amounts, "a map of resource amounts"),
            checked(m, "avail", where, is_amounts, "a map of resource amounts"),
            field_int(m, "queued", where, 0, 2**63 - 1),
            field_int(m, "running", where, 0, 2**63 - 1),
            None if m.get("qlimit") is None else field_int(m, "qlimit", where, 0, 2**63 - 1),
        )


@dataclass(slots=True, frozen=True)
class YieldItem(Message):
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
            raise bad_field(m, "tid", "yield", f"{TASK_ID_LEN} bytes")
        if type(i) is not int or i < 0:
            raise bad_field(m, "i", "yield", "a non-negative integer")
        if d is not None and (type(d) is not bytes or len(d) > CHUNK):
            raise bad_field(m, "d", "yield", f"nil or bytes of at most {CHUNK}")
        return cls(tid, i, d, None if m.get("inner") is None else field_refs(m, "inner", "yield"))


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
class ValuePart(Message):
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
            raise bad_field(m, "tid", "part", f"{TASK_ID_LEN} bytes")
        if slot is None:
            raise bad_field(m, "slot", "part", 'a result index or ["y", item index]')
        if type(d) is not bytes or len(d) > CHUNK:
            raise bad_field(m, "d", "part", f"bytes of at most {CHUNK}")
        return cls(tid, slot, d)


@dataclass(slots=True, frozen=True)
class ActorCreated(Message):
    """``created``: the answer to `CreateActor`; ``error`` a pickled exception if it failed."""

    KIND: ClassVar[str] = "created"
    aid: bytes
    error: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"k": "created", "aid": self.aid, "error": self.error}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> ActorCreated:
        return cls(field_id(m, "aid", "created"), field_opt_bin(m, "error", "created", MAX_FRAME))


@dataclass(slots=True, frozen=True)
class Fenced(Message):
    """``fenced``: every message sent before the `Fence` has been dispatched."""

    KIND: ClassVar[str] = "fenced"

    def to_wire(self) -> dict[str, Any]:
        return {"k": "fenced"}

    @classmethod
    def from_wire(cls, m: dict[Any, Any]) -> Fenced:
        return cls()


@dataclass(slots=True, frozen=True)
class WorkerOutput(Message):
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
            raise bad_field(m, "b", "log", f"bytes of at most {MAX_CONTROL_MESSAGE}")
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
TaskReply: TypeAlias = (
    TaskDone | TaskRejected | YieldItem | ValuePart | ActorCreated | Fenced | WorkerOutput
)

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
    "rejected": TaskRejected.from_wire,
    "yield": YieldItem.from_wire,
    "part": ValuePart.from_wire,
    "created": ActorCreated.from_wire,
    "fenced": Fenced.from_wire,
    "log": WorkerOutput.from_wire,
}


def decode_task_request(data: bytes) -> TaskRequest:
    """A caller's task-session message (executor side). Raises `UnknownKind` for a kind this
    node does not know (skip it), `WireError` for a malformed message."""
    message = unpack_map(data, "task session")
    kind: Any = message.get("k")
    try:
        decode = TASK_REQUEST_KINDS[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        raise UnknownKind(kind) from None
    return decode(message)


def decode_task_reply(data: bytes) -> TaskReply:
    """An executor's task-session message (caller side); errors as `decode_task_request`."""
    message = unpack_map(data, "task session")
    kind: Any = message.get("k")
    try:
        decode = TASK_REPLY_KINDS[kind]
    except (KeyError, TypeError):  # TypeError: an unhashable kind
        raise UnknownKind(kind) from None
    return decode(message)
